"""An ipywidgets explorer over the pipeline's predictions, with optional live models.

    explorer = PredictionExplorer("data", {"synref": "unc"}, predictions=preds, models={"ppcr": model})
    explorer.show(0)        # render a state (saved with the notebook's widget state for the static book)
    explorer.widget         # the VBox to display

`predictions[variant]["<suite>/<split>"]` is a list of per-expression rows as the evaluation writes them:
ref_id, sent_id, iou (in [0, 1], as `ppcr.metrics.mask_iou` gives), box_iou, pred_box (pixel xyxy or None) and
optionally mask_rle (the predicted mask as COCO RLE). A variant's mask is drawn from mask_rle when present, from
its live model otherwise. With live models, a new expression can be typed and run; the first selected live variant
also gets the stage panel (`ppcr.viz.stage_panel`). Words of a typed expression that a live model's tokenizer does
not know (`ppcr.model.tokenizer.unknown_words`: the small presets read them as `<unk>`) are named in the status
line and in the panel's title, since the mask cannot follow them.

The logic lives in plain methods (`rows_for`, `render`, `run_expression`) that need no frontend; the widgets only
call them. Figures reach the Output area as PNG display data set on `Output.outputs`, so a rendered state is part
of the widget state a notebook saves.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ipywidgets as widgets
import numpy as np
from matplotlib.figure import Figure

from ppcr import viz
from ppcr.data.refer import Refer, decode_segmentation, load_image
from ppcr.metrics import box_iou, mask_iou

if TYPE_CHECKING:  # type names only: the model classes load transformers, peft and SAM, which only live models need
    from ppcr.model.modeling_ppcr import PPCRModel

LABEL_CHARS = 70


def figure_display_data(fig: Figure, dpi: int = 100) -> dict[str, Any]:
    """A Figure as a Jupyter display_data output (PNG), ready for `Output.outputs`."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return {
        "output_type": "display_data",
        "data": {"image/png": base64.b64encode(buf.getvalue()).decode("ascii"), "text/plain": repr(fig)},
        "metadata": {},
    }


def _text_output(text: str) -> dict[str, Any]:
    return {"output_type": "display_data", "data": {"text/plain": text}, "metadata": {}}


class PredictionExplorer:
    """Browse per-expression predictions of several variants on REFER-format suites; run live models if given.

    root: the data root holding <suite>/refs(<splitBy>).* and the images; suites: suite -> splitBy.
    predictions: variant -> "<suite>/<split>" -> rows (see the module docstring). models: variant -> PPCRModel.
    """

    def __init__(
        self,
        root: str | Path,
        suites: dict[str, str],
        predictions: dict[str, dict[str, list[dict[str, Any]]]] | None = None,
        models: dict[str, "PPCRModel"] | None = None,
    ) -> None:
        if not suites:
            raise ValueError("PredictionExplorer needs at least one suite")
        self.root = Path(root)
        self.suites = dict(suites)
        self.predictions = predictions or {}
        self.models = models or {}
        self.variants: list[str] = list(dict.fromkeys([*self.predictions, *self.models]))
        self._refers: dict[str, Refer] = {}
        self._rows: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self._by_sentence: dict[tuple[str, str], dict[tuple[int, Any], dict[str, Any]]] = {}
        self._live_cache: dict[tuple[str, str, str, int, str], dict[str, Any]] = {}
        self.last_live: dict[str, dict[str, Any]] = {}  # variant -> its latest live prediction
        self._suspend = False
        self._build_widgets()

    # -----------------------------------------------------------------------------------------------------------
    # data
    # -----------------------------------------------------------------------------------------------------------
    def refer(self, suite: str) -> Refer:
        """The REFER reader of a suite (loaded once)."""
        if suite not in self.suites:
            raise KeyError(f"unknown suite {suite!r}; known: {sorted(self.suites)}")
        if suite not in self._refers:
            self._refers[suite] = Refer(self.root, suite, self.suites[suite])
        return self._refers[suite]

    def splits_for(self, suite: str) -> list[str]:
        """The splits present in a suite."""
        return self.refer(suite).splits

    def rows_for(self, suite: str, split: str) -> list[dict[str, Any]]:
        """Every expression of a split, in the evaluation order (refs in file order, then sentences).

        Each row: index, ref_id, sent_id, ann_id, image_id, expression.
        """
        key = (suite, split)
        if key not in self._rows:
            refer = self.refer(suite)
            rows = []
            for ref_id in refer.ref_ids(split):
                ref = refer.ref(ref_id)
                for sentence in ref["sentences"]:
                    rows.append({
                        "index": len(rows),
                        "ref_id": int(ref_id),
                        "sent_id": sentence.get("sent_id"),
                        "ann_id": int(ref["ann_id"]),
                        "image_id": int(ref["image_id"]),
                        "expression": sentence.get("sent") or sentence.get("raw", ""),
                    })
            self._rows[key] = rows
        return self._rows[key]

    def stored_prediction(self, variant: str, suite: str, split: str, ref_id: int,
                          sent_id: Any) -> dict[str, Any] | None:
        """The pipeline's row for one expression of one variant, or None when it has none."""
        key = (variant, f"{suite}/{split}")
        if key not in self._by_sentence:
            rows = self.predictions.get(variant, {}).get(key[1], [])
            self._by_sentence[key] = {(int(r["ref_id"]), r.get("sent_id")): r for r in rows}
        return self._by_sentence[key].get((int(ref_id), sent_id))

    def live_prediction(self, variant: str, suite: str, split: str, index: int, expression: str) -> dict[str, Any]:
        """Run a variant's live model on the image of expression `index` (cached per text)."""
        key = (variant, suite, split, index, expression)
        if key not in self._live_cache:
            row = self.rows_for(suite, split)[index]
            refer = self.refer(suite)
            model = self.models[variant]
            image = load_image(refer.image_path(row["image_id"]))
            boxes = [refer.box_xyxy(row["ref_id"]).tolist()] if model.config.spec.eval_box == "gt" else None
            self._live_cache[key] = model.predict(image, [expression], boxes=boxes)[0]
        self.last_live[variant] = self._live_cache[key]
        return self._live_cache[key]

    def unknown_words(self, expression: str, variants: list[str] | tuple[str, ...] | None = None) -> list[str]:
        """The words of `expression` that the tokenizer of a live model among `variants` (default: every live one)
        does not know, in order, each once; [] without live models."""
        from ppcr.model.tokenizer import unknown_words  # loads transformers: only with live models

        words: dict[str, str] = {}
        for variant in (self.models if variants is None else variants):
            if variant in self.models:
                for word in unknown_words(self.models[variant].tokenizer, expression):
                    words.setdefault(word.casefold(), word)
        return list(words.values())

    # -----------------------------------------------------------------------------------------------------------
    # rendering
    # -----------------------------------------------------------------------------------------------------------
    def render(self, suite: str, split: str, index: int, variants: list[str] | tuple[str, ...] | None = None,
               expression: str | None = None) -> Figure:
        """One panel per variant for expression `index` of a split.

        Without `expression`, each panel shows the ground truth (green mask, dashed box) and the variant's
        prediction (red) with IoU and box IoU in the title: the stored mask (mask_rle) when present, else the live
        model's, else only the stored box. With `expression` (a new text), only live variants predict and no
        ground truth or IoU is shown (the ground truth belongs to the dataset's expression).
        """
        rows = self.rows_for(suite, split)
        if not 0 <= index < len(rows):
            raise IndexError(f"expression index {index} outside 0..{len(rows) - 1} of {suite}/{split}")
        variants = list(self.variants if variants is None else variants)
        row = rows[index]
        refer = self.refer(suite)
        image = load_image(refer.image_path(row["image_id"]))
        gt_mask, gt_box = refer.mask(row["ref_id"]), refer.box_xyxy(row["ref_id"])
        fig, axes = viz.new_figure(1, max(1, len(variants)), panel_inches=3.2)
        if not variants:
            viz.blank_panel(axes[0, 0], "select at least one variant")
        for ax, variant in zip(axes[0], variants):
            self._draw_variant(ax, variant, suite, split, row, image, gt_mask, gt_box, expression)
        fig.suptitle(f"{suite}/{split} #{index}: \u201c{expression or row['expression']}\u201d", fontsize=9)
        return fig

    def _draw_variant(self, ax, variant: str, suite: str, split: str, row: dict[str, Any], image: np.ndarray,
                      gt_mask: np.ndarray, gt_box: np.ndarray, expression: str | None) -> None:
        """Draw one variant's panel (see `render`)."""
        custom = expression is not None
        stored = None if custom else self.stored_prediction(variant, suite, split, row["ref_id"], row["sent_id"])
        gt = {} if custom else {"gt_mask": gt_mask, "gt_box": gt_box}
        h, w = image.shape[:2]
        if stored is not None and stored.get("mask_rle") is not None:
            mask = decode_segmentation(stored["mask_rle"], h, w)
            title = f"{variant}\n{_scores(stored.get('iou'), stored.get('box_iou'))}"
            viz.overlay(image, mask=mask, box=stored.get("pred_box"), ax=ax, title=title, **gt)
        elif variant in self.models:
            pred = self.live_prediction(variant, suite, split, row["index"], expression or row["expression"])
            if custom:
                title = f"{variant} (live)\nscore {pred['score']:.3f}"
                unknown = self.unknown_words(expression, [variant])
                if unknown:
                    title += f" \u00b7 {len(unknown)} unknown word{'s' if len(unknown) > 1 else ''}"
            else:
                b_iou = None if pred["box"] is None else box_iou(pred["box"], gt_box)
                title = f"{variant} (live)\n{_scores(mask_iou(pred['mask'], gt_mask), b_iou)}"
            viz.overlay(image, mask=pred["mask"], box=pred["box"], ax=ax, title=title, **gt)
        elif stored is not None:
            title = f"{variant} (no stored mask)\n{_scores(stored.get('iou'), stored.get('box_iou'))}"
            viz.overlay(image, box=stored.get("pred_box"), ax=ax, title=title, **gt)
        else:
            why = "no live model for a new expression" if custom else "no prediction for this expression"
            viz.overlay(image, ax=ax, title=f"{variant}\n{why}", **gt)

    def stage_figure(self, variants: list[str] | tuple[str, ...], suite: str, split: str,
                     index: int, expression: str | None = None) -> Figure | None:
        """The stage panel of the first selected variant that has a live model, or None when none has."""
        live = [v for v in variants if v in self.models]
        if not live:
            return None
        row = self.rows_for(suite, split)[index]
        refer = self.refer(suite)
        pred = self.live_prediction(live[0], suite, split, index, expression or row["expression"])
        image = load_image(refer.image_path(row["image_id"]))
        gt = {} if expression else {"gt_mask": refer.mask(row["ref_id"]), "gt_box": refer.box_xyxy(row["ref_id"])}
        fig = viz.stage_panel(image, pred, **gt)
        fig.suptitle(f"{live[0]}: \u201c{pred['expression']}\u201d", fontsize=9)
        return fig

    # -----------------------------------------------------------------------------------------------------------
    # widgets
    # -----------------------------------------------------------------------------------------------------------
    def _build_widgets(self) -> None:
        suite = next(iter(self.suites))
        live = bool(self.models)
        self.suite_widget = widgets.Dropdown(options=list(self.suites), value=suite, description="suite")
        self.split_widget = widgets.Dropdown(description="split")
        self.index_widget = widgets.Dropdown(description="expression", layout=widgets.Layout(width="60%"))
        self.variants_widget = widgets.SelectMultiple(options=self.variants, value=tuple(self.variants),
                                                      description="variants", rows=min(6, max(2, len(self.variants))))
        self.text_widget = widgets.Text(placeholder="type a new expression" if live else "(no live model given)",
                                        description="new", disabled=not live)
        self.run_button = widgets.Button(description="Run", disabled=not live, button_style="primary" if live else "")
        self.status = widgets.HTML()
        self.output = widgets.Output()
        self._fill_splits(suite)
        self.suite_widget.observe(self._on_suite, names="value")
        self.split_widget.observe(self._on_split, names="value")
        self.index_widget.observe(self._on_change, names="value")
        self.variants_widget.observe(self._on_change, names="value")
        self.run_button.on_click(self._on_run)
        self.widget = widgets.VBox([
            widgets.HBox([self.suite_widget, self.split_widget]),
            self.index_widget,
            self.variants_widget,
            widgets.HBox([self.text_widget, self.run_button]),
            self.status,
            self.output,
        ])

    def _fill_splits(self, suite: str) -> None:
        splits = self.splits_for(suite)
        self._suspend = True
        try:
            self.split_widget.options = splits
            self.split_widget.value = splits[0] if splits else None
        finally:
            self._suspend = False
        self._fill_expressions(suite, self.split_widget.value)

    def _fill_expressions(self, suite: str, split: str | None) -> None:
        rows = self.rows_for(suite, split) if split else []
        labels = [(f"{r['index']}: {_clip(r['expression'], LABEL_CHARS)}", r["index"]) for r in rows]
        self._suspend = True
        try:
            self.index_widget.options = labels
            self.index_widget.value = 0 if labels else None
        finally:
            self._suspend = False

    def _on_suite(self, change: dict[str, Any]) -> None:
        if not self._suspend:
            self._fill_splits(change["new"])
            self.show()

    def _on_split(self, change: dict[str, Any]) -> None:
        if not self._suspend:
            self._fill_expressions(self.suite_widget.value, change["new"])
            self.show()

    def _on_change(self, change: dict[str, Any]) -> None:
        if not self._suspend:
            self.show()

    def _on_run(self, _button: Any = None) -> None:
        self.run_expression(self.text_widget.value)

    def run_expression(self, expression: str) -> bool:
        """The "Run" button: segment a typed expression with the live models on the current image.

        Returns False (with the reason in the status line) when there is no live model or the text is empty.
        """
        if not self.models:
            self.status.value = "<b>no live model</b>: pass models= to run new expressions"
            return False
        text = " ".join(str(expression).split())
        if not text:
            self.status.value = "<b>empty expression</b>: type the text that names the object"
            return False
        self.show(expression=text)
        return True

    def show(self, index: int | None = None, suite: str | None = None, split: str | None = None,
             expression: str | None = None) -> None:
        """Render a state into the Output area (and move the widgets to it); also what the widgets call.

        Arguments left out keep the widgets' current values. A notebook can call this before displaying
        `widget` so the saved widget state holds a rendered view.
        """
        self._suspend = True
        try:
            if suite is not None and suite != self.suite_widget.value:
                self.suite_widget.value = suite
                self._fill_splits(suite)
                self._suspend = True
            if split is not None and split != self.split_widget.value:
                self.split_widget.value = split
                self._fill_expressions(self.suite_widget.value, split)
                self._suspend = True
            if index is not None:
                self.index_widget.value = int(index)
        finally:
            self._suspend = False
        suite, split, index = self.suite_widget.value, self.split_widget.value, self.index_widget.value
        variants = list(self.variants_widget.value)
        if split is None or index is None:
            self.output.outputs = (_text_output(f"{suite}: no expressions to show"),)
            return
        try:
            figures = [self.render(suite, split, index, variants, expression=expression)]
            stage = self.stage_figure(variants, suite, split, index, expression=expression)
            if stage is not None:
                figures.append(stage)
        except Exception as err:  # noqa: BLE001 - an explorer reports, it does not crash the notebook
            self.status.value = f"<b>error</b>: {type(err).__name__}: {err}"
            self.output.outputs = ()
            return
        self.status.value = self._live_status(expression, variants) if expression else ""
        self.output.outputs = tuple(figure_display_data(f) for f in figures)


    def _live_status(self, expression: str, variants: list[str]) -> str:
        """The status line (HTML) after a typed expression: the text, and the words a live model did not know."""
        from ppcr.model.tokenizer import unknown_words_warning  # loads transformers: only with live models

        text = f"live expression: \u201c{html.escape(expression)}\u201d"
        warning = unknown_words_warning(self.unknown_words(expression, variants))
        return text + (f"<br><b>warning</b>: {html.escape(warning)}" if warning else "")


def _scores(iou: float | None, b_iou: float | None) -> str:
    """Title line with the IoU and box IoU (given in [0, 1]) as percentages."""
    parts = [f"IoU {100 * float(iou):.1f}" if iou is not None else "IoU n/a"]
    if b_iou is not None:
        parts.append(f"box IoU {100 * float(b_iou):.1f}")
    return " \u00b7 ".join(parts)


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "\u2026"
