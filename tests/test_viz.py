"""Figures (ppcr.viz), the `ppcr predict` command and the ipywidgets explorer, with a tiny model on a tiny REFER."""

from __future__ import annotations

import base64
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ppcr import viz  # noqa: E402
from ppcr.cli import main  # noqa: E402
from ppcr.report.explorer import PredictionExplorer  # noqa: E402
from ppcr.model.config import tiny_config  # noqa: E402
from ppcr.model.modeling_ppcr import PPCRModel  # noqa: E402
from ppcr.evaluation.predict import encode_mask_rle  # noqa: E402

WORDS = ["dog", "cat", "bird", "on", "top", "upper", "lower", "thin", "square", "in", "the", "corner", "left"]


@pytest.fixture(scope="module")
def model() -> PPCRModel:
    return PPCRModel.build(tiny_config(variant="ppcr"), extra_words=WORDS)


@pytest.fixture(scope="module")
def checkpoint(model: PPCRModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("viz") / "ckpt"
    model.save_pretrained(path)
    return path


def _scene() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rs = np.random.RandomState(0)
    image = rs.randint(0, 255, (24, 32, 3), dtype=np.uint8)
    mask = np.zeros((24, 32), dtype=bool)
    mask[4:12, 6:20] = True
    return image, mask, np.array([6.0, 4, 20, 12])


# ---------------------------------------------------------------------------------------------------------------
# figures
# ---------------------------------------------------------------------------------------------------------------


def test_overlay_and_png(tmp_path):
    image, mask, box = _scene()
    ax = viz.overlay(image, mask=mask, box=box, gt_mask=mask, gt_box=box + 1, title="t")
    assert isinstance(ax.figure, Figure) and len(ax.figure.axes) == 1
    assert len(ax.patches) == 2  # predicted + GT box
    assert ax.patches[1].get_linestyle() == "-" and ax.patches[0].get_linestyle() == "--"
    path = viz.save_overlay_png(tmp_path / "o.png", image, mask, box, "title")
    with Image.open(path) as im:
        assert im.format == "PNG"


def test_paper_figures(tmp_path):
    image, mask, box = _scene()
    fig1 = viz.fig1_entities(image, "the dog left of the cat", {"dog": box, "cat": [20, 2, 30, 20]}, mask,
                             target="dog")
    assert len(fig1.axes) == 1 and len(fig1.axes[0].patches) == 2
    row = {"image": image, "expression": "the dog", "gt_mask": mask, "gt_box": box, "glamm_mask": ~mask,
           "ppcr_mask": mask, "ppcr_box": box, "oracle_mask": mask}
    fig6 = viz.fig6_qualitative([row, {**row, "oracle_mask": None, "ppcr_iou": 0.5}])
    assert len(fig6.axes) == 2 * len(viz.FIG6_COLUMNS)
    assert "IoU 100.0" in fig6.axes[2].get_title() and "IoU 50.0" in fig6.axes[7].get_title()
    fig7 = viz.fig7_failures([{"image": image, "gt_mask": mask, "gt_box": box, "pred_mask": ~mask}] * 3,
                             ["occlusion", "blur", "ambiguity"])
    assert len(fig7.axes) == 3 and fig7.axes[1].get_title().startswith("blur")
    with pytest.raises(ValueError):
        viz.fig7_failures([row], [])
    bars = viz.bar_with_errors({"glamm": (60.0, 1.0), "ppcr": (70.0, 0.5)}, "mIoU", "seeds")
    assert len(bars.axes) == 1
    rows = [{"group": g, "variant": v, "mIoU": 50.0 + i, "n": 10}
            for i, (g, v) in enumerate([(g, v) for g in ("spatial", "attribute") for v in ("glamm", "ppcr")])]
    breakdown = viz.breakdown_plot(rows, title="by type")
    assert len(breakdown.axes) == 1 and len(breakdown.axes[0].patches) == 4
    for i, fig in enumerate((fig1, fig6, fig7, bars, breakdown)):
        fig.savefig(tmp_path / f"f{i}.png")
        assert (tmp_path / f"f{i}.png").stat().st_size > 0


def test_stage_panel_from_live_prediction(model):
    image, mask, box = _scene()
    pred = model.predict(image, "dog on top")[0]
    fig = viz.stage_panel(image, pred, gt_mask=mask, gt_box=box)
    assert len(fig.axes) == 4
    assert "P_seg_txt" in fig.axes[2].get_title() and "P_seg_box" in fig.axes[3].get_title()
    no_spatial = viz.stage_panel(image, {**pred, "box": None, "p_seg_box": None})
    assert len(no_spatial.axes) == 4


# ---------------------------------------------------------------------------------------------------------------
# ppcr predict
# ---------------------------------------------------------------------------------------------------------------


def test_predict_cli_writes_png_and_json(checkpoint, tiny_refer, tmp_path, capsys):
    image = tiny_refer.root / "images/mscoco/images/train2014/img1.png"
    out = tmp_path / "out" / "overlay.png"
    rc = main(["predict", "--checkpoint", str(checkpoint), "--image", str(image), "--expression", "dog on top",
               "--expression", "lower dog", "--out", str(out)])
    assert rc == 0
    with Image.open(out) as im:
        assert im.format == "PNG"
    record = json.loads(out.with_suffix(".json").read_text())
    assert [p["expression"] for p in record["predictions"]] == ["dog on top", "lower dog"]
    assert record["variant"] == "ppcr" and record["image_size"] == [20, 30]
    for p in record["predictions"]:
        assert len(p["box"]) == 4 and 0.0 <= p["box"][0] <= p["box"][2] <= 30.0
        assert isinstance(p["score"], float) and p["mask_rle"]["size"] == [20, 30]
    printed = capsys.readouterr().out
    assert "'dog on top': box [" in printed and "score" in printed


def test_unknown_words_of_the_word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from ppcr.model.tokenizer import build_word_tokenizer, unknown_words, unknown_words_warning

    tok = build_word_tokenizer(["dog", "on", "top", "of"])
    assert unknown_words(tok, "the zebra unicorn qwertyuiop") == ["zebra", "unicorn", "qwertyuiop"]
    assert unknown_words(tok, "The Zebra, the zebra on top of the dog") == ["Zebra"]  # original text, once
    assert unknown_words(tok, "the dog on top") == [] and unknown_words(tok, "  ") == []
    assert unknown_words_warning([]) == ""
    line = unknown_words_warning(["zebra", "unicorn"])
    assert "\n" not in line and "\u201czebra\u201d" in line and "\u201cunicorn\u201d" in line
    # a byte-level BPE (as LLaMA's falls back to bytes) has no unk token: every word is representable
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel()
    bpe.add_tokens(["the"])
    assert unknown_words(PreTrainedTokenizerFast(tokenizer_object=bpe), "the zebra unicorn") == []


def test_predict_cli_warns_about_unknown_words(checkpoint, tiny_refer, tmp_path, capsys):
    image = tiny_refer.root / "images/mscoco/images/train2014/img1.png"
    out = tmp_path / "overlay.png"
    rc = main(["predict", "--checkpoint", str(checkpoint), "--image", str(image), "--expression",
               "the zebra unicorn qwertyuiop", "--expression", "dog on top", "--out", str(out)])
    assert rc == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and warnings[0].startswith("ppcr predict: warning: 'the zebra unicorn qwertyuiop'")
    assert all(f"\u201c{w}\u201d" in warnings[0] for w in ("zebra", "unicorn", "qwertyuiop"))
    record = json.loads(out.with_suffix(".json").read_text())
    assert [p["unknown_words"] for p in record["predictions"]] == [["zebra", "unicorn", "qwertyuiop"], []]
    assert "'the zebra unicorn qwertyuiop': box" in captured.out  # still predicted


@pytest.mark.parametrize("case", ["missing_image", "corrupt_image", "empty_expression", "missing_checkpoint"])
def test_predict_cli_bad_input(case, checkpoint, tiny_refer, tmp_path, capsys):
    image = tiny_refer.root / "images/mscoco/images/train2014/img1.png"
    expression, ckpt = "dog", checkpoint
    if case == "missing_image":
        image = tmp_path / "nope.png"
    elif case == "corrupt_image":
        image = tmp_path / "bad.png"
        image.write_bytes(b"\x89PNG not really")
    elif case == "empty_expression":
        expression = "   "
    else:
        ckpt = tmp_path / "no_ckpt"
    rc = main(["predict", "--checkpoint", str(ckpt), "--image", str(image), "--expression", expression,
               "--out", str(tmp_path / "o.png")])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("ppcr predict: error:") and "\n" not in err and "Traceback" not in err
    expected = {"missing_image": "image not found", "corrupt_image": "cannot read image",
                "empty_expression": "empty referring expression", "missing_checkpoint": "checkpoint folder not found"}
    assert expected[case] in err
    assert not (tmp_path / "o.png").exists()


# ---------------------------------------------------------------------------------------------------------------
# explorer
# ---------------------------------------------------------------------------------------------------------------


def _fake_predictions(explorer_rows: list[dict], tiny_refer) -> list[dict]:
    """Rows as the evaluation writes them: one with a stored mask, one without."""
    from ppcr.data.refer import Refer

    refer = Refer(tiny_refer.root, "refcoco", "unc")
    out = []
    for r in explorer_rows:
        gt = refer.mask(r["ref_id"])
        out.append({"ref_id": r["ref_id"], "sent_id": r["sent_id"], "iou": 1.0, "box_iou": 1.0,
                    "pred_box": refer.box_xyxy(r["ref_id"]).tolist(), "mask_rle": encode_mask_rle(gt)})
    return out


def test_explorer_from_stored_predictions(tiny_refer):
    probe = PredictionExplorer(tiny_refer.root, {"refcoco": "unc"})
    rows = probe.rows_for("refcoco", "train")
    assert [(r["ref_id"], r["sent_id"]) for r in rows] == [(1, 10), (1, 11), (2, 20)]
    stored = _fake_predictions(rows, tiny_refer)
    no_mask = [{k: v for k, v in s.items() if k != "mask_rle"} for s in stored]
    explorer = PredictionExplorer(tiny_refer.root, {"refcoco": "unc"},
                                  predictions={"ppcr": {"refcoco/train": stored}, "glamm": {"refcoco/train": no_mask}})
    assert explorer.widget.children and explorer.run_button.disabled and explorer.text_widget.disabled
    assert list(explorer.split_widget.options) == ["train", "val", "testA", "testB"]
    assert [label for label, _ in explorer.index_widget.options][1] == "1: upper dog"
    fig = explorer.render("refcoco", "train", 1, ["ppcr", "glamm"])
    assert len(fig.axes) == 2
    assert "IoU 100.0" in fig.axes[0].get_title() and "no stored mask" in fig.axes[1].get_title()
    assert len(explorer.render("refcoco", "train", 0, ["ppcr"]).axes) == 1
    explorer.show(2)
    assert explorer.index_widget.value == 2
    assert len(explorer.output.outputs) == 1 and "image/png" in explorer.output.outputs[0]["data"]
    explorer.show(0, split="val")  # a split without predictions: panels say so
    assert explorer.split_widget.value == "val" and "image/png" in explorer.output.outputs[0]["data"]
    assert not explorer.run_expression("dog")  # no live model
    with pytest.raises(IndexError):
        explorer.render("refcoco", "train", 3, ["ppcr"])


def test_explorer_live_run(tiny_refer, model):
    explorer = PredictionExplorer(tiny_refer.root, {"refcoco": "unc"}, models={"ppcr": model})
    assert not explorer.run_button.disabled
    fig = explorer.render("refcoco", "val", 0, ["ppcr"])
    assert len(fig.axes) == 1 and "(live)" in fig.axes[0].get_title()
    explorer.show(0, split="testB")
    assert len(explorer.output.outputs) == 2  # the variants + the stage panel
    explorer.text_widget.value = "the bird in the corner"
    explorer.run_button.click()
    assert explorer.last_live["ppcr"]["expression"] == "the bird in the corner"
    assert len(explorer.output.outputs) == 2 and "live expression" in explorer.status.value
    assert "warning" not in explorer.status.value  # every word known
    assert explorer.run_expression("the zebra unicorn qwertyuiop")
    assert explorer.unknown_words("the zebra unicorn qwertyuiop") == ["zebra", "unicorn", "qwertyuiop"]
    status = explorer.status.value
    assert "<b>warning</b>" in status and "&lt;unk&gt;" in status and "<unk>" not in status
    assert all(f"\u201c{w}\u201d" in status for w in ("zebra", "unicorn", "qwertyuiop"))
    title = explorer.render("refcoco", "testB", 0, ["ppcr"], expression="the zebra unicorn").axes[0].get_title()
    assert "2 unknown words" in title
    assert not explorer.run_expression("   ") and "empty" in explorer.status.value


def test_static_explorer_links_every_panel_and_needs_no_script(tiny_refer):
    from html.parser import HTMLParser

    from ppcr.report.static_explorer import panel_id, static_explorer

    probe = PredictionExplorer(tiny_refer.root, {"refcoco": "unc"})
    stored = _fake_predictions(probe.rows_for("refcoco", "train"), tiny_refer)
    explorer = PredictionExplorer(tiny_refer.root, {"refcoco": "unc"},
                                  predictions={"ppcr": {"refcoco/train": stored}, "glamm": {"refcoco/train": stored}})
    examples = [("refcoco", "train", 0), ("refcoco", "train", 2)]
    page = static_explorer(explorer, examples, ["ppcr", "glamm"], explorer_id="x")

    class Collect(HTMLParser):
        ids, hrefs, imgs, tags, sizes = [], [], [], [], []

        def handle_starttag(self, tag, attrs):
            attrs = dict(attrs)
            self.tags.append(tag)
            if tag == "div" and "panel" in attrs.get("class", "").split():
                self.ids.append(attrs["id"])
            if tag == "a":
                self.hrefs.append(attrs["href"])
            if tag == "img":
                self.imgs.append(attrs["src"])
                self.sizes.append((int(attrs["width"]), int(attrs["height"])))

    seen = Collect()
    seen.feed(page)
    assert seen.ids == [panel_id("x", e, v) for e in range(2) for v in range(2)]
    assert {h.lstrip("#") for h in seen.hrefs} == set(seen.ids)  # every link lands on a panel, every panel is reached
    assert len(seen.imgs) == 4 and all(s.startswith("data:image/png;base64,") for s in seen.imgs)
    for src, (width, height) in zip(seen.imgs, seen.sizes):  # large enough to see a mask (the issue: ~180 px)
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as png:
            assert png.size == (width, height) and width >= 400 and png.mode == "P"  # a palette PNG: a small page
    assert len(page) < 4 * 150_000  # four panels, each under 150 kB of base64
    assert "script" not in seen.tags and page.count('class="panel first"') == 1
    assert f"\u201c{probe.rows_for('refcoco', 'train')[2]['expression']}\u201d" in page  # the example's expression
    with pytest.raises(ValueError):
        static_explorer(explorer, [], ["ppcr"])


CHROMIUM = "/usr/bin/chromium"


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian's chromium is not installed (apt-get install chromium)")
def test_static_explorer_switches_panels_in_a_headless_browser(tiny_refer, tmp_path):
    """The browser shows the first panel, and another one when the URL targets it (what a link click does)."""
    import subprocess

    from ppcr.report.static_explorer import panel_id, static_explorer

    probe = PredictionExplorer(tiny_refer.root, {"refcoco": "unc"})
    stored = _fake_predictions(probe.rows_for("refcoco", "train"), tiny_refer)
    explorer = PredictionExplorer(tiny_refer.root, {"refcoco": "unc"}, predictions={"ppcr": {"refcoco/train": stored}})
    page = tmp_path / "explorer.html"
    page.write_text("<html><body>" + static_explorer(explorer, [("refcoco", "train", 0), ("refcoco", "train", 2)],
                                                     ["ppcr"], explorer_id="x") + "</body></html>")

    def shot(fragment: str) -> np.ndarray:
        out = tmp_path / f"shot{fragment or '-none'}.png"
        subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                        "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
                        f"--user-data-dir={tmp_path / 'profile'}", "--window-size=500,500",
                        f"--screenshot={out}", f"file://{page}{fragment}"],
                       check=True, capture_output=True, timeout=120)
        return np.asarray(Image.open(out).convert("L"), dtype=np.int16)

    first, second, first_again = shot(""), shot(f"#{panel_id('x', 1, 0)}"), shot(f"#{panel_id('x', 0, 0)}")
    assert (first < 250).mean() > 0.05  # something is drawn
    assert np.abs(first - second).mean() > 1.0  # the other example's panel replaced the first
    assert np.abs(first - first_again).mean() < 0.5  # and its address brings the first back
