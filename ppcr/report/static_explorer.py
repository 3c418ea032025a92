"""A kernel-free explorer for the published book: pre-rendered panels and plain links, no server, no JavaScript.

    html = static_explorer(explorer, examples=[("synrefg", "val", 0), ...], variants=["glamm", "ppcr"])
    display(HTML(html))

Every (example, variant) pair is one panel: a PNG of that variant's stored prediction on that example (the same
drawing as `PredictionExplorer.render`) under a bar of links to the other variants of the example and to the
previous / next example. A link points at another panel's id; the CSS shows the panel that is the URL's
`:target` and, before any link is followed, the first one. So the page works from a saved notebook, in a static
HTML build and with a URL such as `06_explorer.html#<explorer id>-e2-v1` (what the browser test screenshots).

A panel is drawn at `PANEL_DPI` (a 3.2-inch figure: about 450 px, the image itself about 370 px, large enough to
see a mask) and stored as a 256-colour PNG, which keeps it near the size a 70-dpi full-colour PNG had (about
70 KB a panel, 90 KB in base64: 36 panels, 6 examples x 6 variants, make a page of about 3 MB).
"""

from __future__ import annotations

import base64
import html
import io

import matplotlib.pyplot as plt
from PIL import Image

from ppcr.report.explorer import PredictionExplorer

PANEL_DPI = 140
PANEL_COLORS = 256  # palette of the stored PNG (the figures are flat colours over a photo-like scene)


def panel_id(explorer_id: str, example: int, variant: int) -> str:
    return f"{explorer_id}-e{example}-v{variant}"


def panel_png(fig) -> tuple[bytes, int, int]:
    """A figure as a palette PNG at `PANEL_DPI` (the figure is closed): its bytes, width and height in pixels."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=PANEL_DPI)
    plt.close(fig)
    with Image.open(io.BytesIO(buf.getvalue())) as full:
        image = full.convert("RGB").quantize(colors=PANEL_COLORS, method=Image.Quantize.MEDIANCUT)
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=True)
    return out.getvalue(), image.width, image.height


def _link(target: str, text: str, current: bool = False) -> str:
    cls = ' class="current"' if current else ""
    return f'<a href="#{target}"{cls}>{html.escape(text)}</a>'


def static_explorer(explorer: "PredictionExplorer", examples: list[tuple[str, str, int]],
                    variants: list[str] | None = None, explorer_id: str = "ppcr-explorer") -> str:
    """The HTML of the kernel-free explorer over `examples` ((suite, split, index) each) and `variants`."""
    variants = list(explorer.variants if variants is None else variants)
    if not examples or not variants:
        raise ValueError("a static explorer needs at least one example and one variant")
    panels = []
    for e, (suite, split, index) in enumerate(examples):
        expression = explorer.rows_for(suite, split)[index]["expression"]
        for v, variant in enumerate(variants):
            png, width, height = panel_png(explorer.render(suite, split, index, [variant]))
            variant_links = " ".join(_link(panel_id(explorer_id, e, k), name, k == v)
                                     for k, name in enumerate(variants))
            prev = _link(panel_id(explorer_id, (e - 1) % len(examples), v), "\u2190 previous")
            nxt = _link(panel_id(explorer_id, (e + 1) % len(examples), v), "next \u2192")
            first = " first" if e == 0 and v == 0 else ""
            panels.append(
                f'<div class="panel{first}" id="{panel_id(explorer_id, e, v)}">'
                f'<div class="bar">example {e + 1} of {len(examples)} ({html.escape(suite)}/{html.escape(split)} '
                f'#{index}): \u201c{html.escape(expression)}\u201d {prev} {nxt}</div>'
                f'<div class="bar">variant: {variant_links}</div>'
                f'<img alt="{html.escape(variant)} on {html.escape(suite)}/{html.escape(split)} #{index}" '
                f'width="{width}" height="{height}" src="data:image/png;base64,{base64.b64encode(png).decode()}"/>'
                '</div>')
    style = (f"#{explorer_id} .panel {{display: none}} "
             f"#{explorer_id} .panel:target, #{explorer_id}:not(:has(.panel:target)) .panel.first {{display: block}} "
             f"#{explorer_id} .bar {{margin: 2px 0; font-size: 90%}} "
             f"#{explorer_id} .panel img {{max-width: 100%; height: auto}} "
             f"#{explorer_id} .bar a {{margin: 0 4px; padding: 1px 6px; border: 1px solid #999; border-radius: 4px; "
             f"text-decoration: none}} "
             f"#{explorer_id} .bar a.current {{background: #333; color: #fff}}")
    return (f'<div class="ppcr-static-explorer" id="{explorer_id}"><style>{style}</style>'
            + "".join(panels) + "</div>")
