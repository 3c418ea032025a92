"""The book at the smoke profile: report functions on a smoke study, every notebook executed with papermill, and a
strict Jupyter Book build (any notebook error or Sphinx warning fails), all in a temporary folder."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import pytest

from ppcr import report
from ppcr.book import broken_internal_links, build, copy_book_sources
from ppcr.metrics import box_centre_in

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("[0-9]*.ipynb"))


# ---------------------------------------------------------------------------------------------------------------
# report functions
# ---------------------------------------------------------------------------------------------------------------


def test_load_study_reads_every_results_file(study: report.Study) -> None:
    assert study.profile == "smoke" and study.preset == "tiny"
    assert {"glamm", "ppcr", "attn_box", "gt_box_oracle"} <= set(study.variants)
    assert study.seeds == [0]
    assert "synrefg/test" in study.keys and "synref/testA" in study.keys
    assert report.load_study(study.run_dir) is study  # cached


def test_paper_tables_parse() -> None:
    rows = report.paper_tables()
    assert {r["table"] for r in rows} == {"table1", "table2", "table3"}
    ppcr = [r for r in rows if r["table"] == "table1" and r["variant"] == "PPCR"]
    assert len(ppcr) == 16 and all(isinstance(r["value"], float) for r in ppcr)
    assert any(r["value"] is None for r in rows)  # the paper's dashes


def test_table1_has_paper_and_reproduced_rows(study: report.Study) -> None:
    t = report.table1(study)
    sources = [r["source"] for r in t.rows]
    paper = [r for r in t.rows if r["source"] == "paper"]
    assert len(paper) == 13 + 1  # 13 methods + the "Absolute" row
    assert any(r["method"] == "CRIS\u2020" for r in paper)  # excerpted rows marked
    repro = [r for r in t.rows if r["source"].startswith("reproduced")]
    # the profile's own recipe, labelled as such because the smoke profile has another one (`recipes: additions`)
    assert [r["method"] for r in repro][:2] == ["GLaMM-style, smoke's recipe", "PPCR, smoke's recipe"]
    assert sources.index(repro[0]["source"]) > sources.index("paper")
    key = report.column_key("refcocog", "mIoU", "test(U)")
    assert isinstance(repro[1][key], report.MeanStd)
    assert "not RefCOCO" in t.caption and "smoke" in t.caption and study.commit in t.caption
    assert "Starting weights: stages 0-1 trained inside this run" in t.caption  # smoke: foundation: train
    assert "Starting weights" in report.table2(study).caption and "Starting weights" in report.table3(study).caption
    html_text = report.to_html(t)
    assert html_text.count("<tr class=\"paper") == 14 and "RefCOCO ~ synref" in html_text
    assert "| Method |" in report.to_markdown(t)
    cris_cell = next(r for r in paper if r["method"] == "CRIS\u2020")[report.column_key("refcoco", "oIoU", "val")]
    assert cris_cell is None and report.format_cell(cris_cell) == "\u2013"


def test_tables_2_and_3(study: report.Study) -> None:
    t2, t3 = report.table2(study), report.table3(study)
    assert [r["variant"] for r in t2.rows if r["source"] != "paper"] == ["glamm", "spatial_re", "spatial_re_seg",
                                                                       "ppcr"]
    assert [r["variant"] for r in t3.rows if r["source"] == "paper"] == ["attn_box", "gt_box_oracle", "ppcr"]
    assert len([r for r in t3.rows if r["source"].startswith("reproduced")]) == 3
    sanity = [r["method"] for r in t3.rows if r["source"].startswith("sanity baseline")]
    assert sanity == ["fill GT box", "fill predicted box (attn_box)", "fill predicted box (ppcr)"]


def test_box_head_costs(study: report.Study) -> None:
    t = report.box_head_costs(study, repeats=3)
    mlp, attn = t.rows
    assert attn["params"] > mlp["params"] and attn["mflops"] > mlp["mflops"]
    assert mlp["us_per_expr"] > 0 and attn["us_per_expr"] > 0


def test_flop_count_matches_torch() -> None:
    """The analytic FLOPs: the MLP exactly; the attention head's linear layers as torch counts them (torch's counter
    leaves out the attention products, which the analytic count includes)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from ppcr.model.config import preset_config
    from ppcr.model.heads import AttentionBoxHead, MLPBoxHead

    cfg = preset_config("small")
    d, n = cfg.text.hidden_size, cfg.vision.num_image_tokens
    mlp = MLPBoxHead(d, cfg.box_head_hidden)
    attn = AttentionBoxHead(d, cfg.attn_box_dim, cfg.attn_box_layers, cfg.attn_box_heads, cfg.attn_box_queries, n)
    counted = []
    for head in (mlp, attn):
        with FlopCounterMode(display=False) as fc:
            head(torch.randn(1, d), torch.randn(1, n, d))
        counted.append(fc.get_total_flops())
    q, dim = 1 + cfg.attn_box_queries, cfg.attn_box_dim
    products = 2 * cfg.attn_box_layers * (2 * q * q * dim + 2 * q * n * dim)
    assert counted[0] == report.mlp_head_flops(d, cfg.box_head_hidden)
    assert counted[1] == report.attention_head_flops(d, dim, cfg.attn_box_layers, cfg.attn_box_queries, n) - products


def test_seed_summary_and_bootstrap(study: report.Study) -> None:
    seeds = report.seed_summary(study)
    assert seeds.rows and all(r["n_seeds"] == 1 and r["std"] is None for r in seeds.rows)
    gains = report.bootstrap_gains(study, n_boot=200)
    comparisons = {r["comparison"] for r in gains.rows}
    assert comparisons == {"ppcr \u2212 glamm", "ppcr \u2212 spatial_re", "spatial_re_seg \u2212 spatial_re",
                           "attn_box \u2212 ppcr", "gt_box_oracle \u2212 ppcr", "ppcr@additions \u2212 glamm@additions"}
    for r in gains.rows:
        assert r["ci_low"] <= r["delta"] + 1e-9 or math.isclose(r["ci_low"], r["delta"])
        assert r["ci_low"] <= r["ci_high"] and r["n"] > 0
        assert r["excludes_0"] == (r["ci_low"] > 0 or r["ci_high"] < 0)
    assert {r["metric"] for r in gains.rows} == {"mIoU", "oIoU"}


def test_claims_table(study: report.Study) -> None:
    claims = report.claims_table(study, n_boot=200)
    assert {r["claim"] for r in claims.rows} == {c[0] for c in report.CLAIMS}
    for r in claims.rows:
        assert r["n"] > 0 and r["ci_low"] <= r["ci_high"]
        cand, base = r["box_acc"].split(" / ")
        if "\u2014" in (cand, base):  # one side segments without a predicted box: the interval decides
            assert r["verdict"] in {"supported", "contradicted", "undecided"}
        elif max(float(cand), float(base)) < report.GROUNDED_BOX_ACC:  # two ungrounded boxes: nothing to compare
            assert r["verdict"] == "untestable: boxes not grounded"
    assert {r["box_acc"].split(" / ")[1] for r in claims.rows if r["comparison"] == "ppcr \u2212 glamm"} == {"\u2014"}
    oracle = {r["split"]: r["paper_delta"] for r in claims.rows if r["comparison"] == "gt_box_oracle \u2212 ppcr"}
    assert oracle["synref/val"] == round(87.79 - 81.1, 2)  # the paper's refcoco val rows


def test_box_conditional_gains(study: report.Study) -> None:
    table = report.box_conditional_gains(study, n_boot=200)
    assert {r["comparison"].split(" ")[0] for r in table.rows} <= set(report.BOX_VARIANTS)
    assert any(r["comparison"] == "ppcr \u2212 glamm" for r in table.rows)
    for (comparison, key) in {(r["comparison"], r["split"]) for r in table.rows}:
        candidate = comparison.split(" ")[0]
        a, b = report.paired_rows(study, "glamm", candidate, key)
        parts = {r["subset"]: r for r in table.rows if (r["comparison"], r["split"]) == (comparison, key)}
        inside = [i for i, r in enumerate(b) if box_centre_in(r["pred_box"], r["gt_box"])]
        assert sum(r["n"] for r in parts.values()) == len(a)
        assert parts.get("centre in the GT box", {"n": 0})["n"] == len(inside)
        assert math.isclose(sum(r["share"] for r in parts.values()), 100.0)
        # the two parts' means, weighted by their sizes, give the whole split's paired means back
        for side, rows in (("baseline", a), ("candidate", b)):
            whole = 100 * sum(r["iou"] for r in rows) / len(rows)
            assert math.isclose(sum(r[side] * r["n"] for r in parts.values()) / len(a), whole, rel_tol=1e-9)
        for r in parts.values():
            assert math.isclose(r["delta"], r["candidate"] - r["baseline"], abs_tol=1e-6)
            assert r["ci_low"] <= r["ci_high"]


def test_prompt_probe_table(smoke_study_run: Path, study: report.Study) -> None:
    index = json.loads((smoke_study_run / "study.json").read_text())
    assert set(index["prompt_probe"]) == {str(s) for s in study.seeds}
    probes = study.prompt_probe()
    table = report.prompt_probe_table(study)
    val_keys = [k for k in study.keys if k.endswith("/val")]
    assert val_keys and {r["split"] for r in table.rows} == set(val_keys)
    for key in val_keys:
        rows = {r["reader"]: r for r in table.rows if r["split"] == key}
        probe = rows["MLP probe on P_seg_txt alone"]
        expected = [probes[s]["splits"][key]["box_iou"] for s in study.seeds]
        assert math.isclose(probe["box_iou"].mean, sum(expected) / len(expected))
        assert all(probes[s]["splits"][key]["n"] == len(study.rows("ppcr", key, s)) for s in study.seeds)
        own = rows["ppcr: branch B reads the soft token, F_Map the box"]
        seed = study.seeds[0]
        ppcr_rows = study.rows("ppcr", key, seed)
        centre = 100 * sum(box_centre_in(r["pred_box"], r["gt_box"]) for r in ppcr_rows) / len(ppcr_rows)
        if own["seeds"] == 1:
            assert math.isclose(own["box_centre_in_gt"].mean, centre)
            assert math.isclose(own["box_iou"].mean, 100 * sum(r["box_iou"] for r in ppcr_rows) / len(ppcr_rows))


def test_foundation_llava_answer_is_shown_beside_the_readers(smoke_study_run: Path, study: report.Study) -> None:
    """The run's evaluation of its stage 0-1 weights (study.json `foundation_eval`) holds the LLaVA's decoded
    "where" box on the results files' val expressions; the probe table shows it as a reader and the front page as a
    column. A study without it shows neither."""
    index = json.loads((smoke_study_run / "study.json").read_text())
    assert set(index["foundation_eval"]) == {str(s) for s in study.seeds}
    answers = study.foundation_eval()[study.seeds[0]]["where_answer"]
    val_keys = [k for k in study.keys if k.endswith("/val")]
    assert set(answers) == set(val_keys)
    rows = {(r["split"], r["reader"]): r for r in report.prompt_probe_table(study).rows}
    status = {r["split"]: r for r in report.status_table(study).rows}
    for key in val_keys:
        assert answers[key]["n"] == len(study.rows("ppcr", key, study.seeds[0]))  # the same expressions
        row = rows[key, report.FOUNDATION_READER]
        assert row["box_acc50"].mean == answers[key]["box_acc50"] and row["box_iou"].mean == answers[key]["box_iou"]
        assert status[key]["llava_box_acc"] == answers[key]["box_acc50"]
    without = dataclasses.replace(study, index={k: v for k, v in study.index.items() if k != "foundation_eval"})
    assert not any(r["reader"] == report.FOUNDATION_READER for r in report.prompt_probe_table(without).rows)
    assert "llava_box_acc" not in [c.key for c in report.status_table(without).columns]


def test_where_answer_breakdown_partitions_the_answers_the_book_shows(study: report.Study) -> None:
    """The foundation evaluation's breakdown of the LLaVA's decoded "where" answer: for every val split the "all"
    row is the answer's acc@0.5, each cut splits the same expressions, the bars leave "all" out, and the table
    renders. A study without the breakdown has no rows."""
    answers = study.where_answers()[study.seeds[0]]
    rows = report.where_answer_rows(study)
    keys = [k for k in study.keys if k.endswith("/val")]
    assert list(dict.fromkeys(r["split"] for r in rows)) == keys
    for key in keys:
        mine = [r for r in rows if r["split"] == key]
        [everything] = [r for r in mine if r["group"] == "all"]
        assert everything["n"] == answers[key]["n"]
        assert everything["right"].mean == pytest.approx(answers[key]["box_acc50"])
        for cut in {r["cut"] for r in mine} - {"all"}:
            part = [r for r in mine if r["cut"] == cut]
            assert sum(r["n"] for r in part) == everything["n"]
            assert sum(r["n"] * r["right"].mean for r in part) / everything["n"] == pytest.approx(
                everything["right"].mean)
    bars = report.where_answer_bars(study)
    assert len(bars) == len(rows) - len(keys) and all(b["group"] != "all" for b in bars)
    assert "answer right (%)" in report.to_markdown(report.where_answer_table(study))
    without = dataclasses.replace(study, index={k: v for k, v in study.index.items() if k != "foundation_eval"})
    assert report.where_answer_rows(without) == [] and report.where_answer_bars(without) == []


def test_front_page_says_when_sam_no_longer_follows_the_box(study: report.Study) -> None:
    """`box_use_note`: a GT-box oracle more than `BOX_USE_DROP` points below the foundation's SAM given the same
    boxes is stated on the front page (SAM learned to lean on the semantic prompt), with the paper's oracle gain;
    within the margin, or without the foundation's evaluation, nothing is said."""
    key = "synref/val"
    assert "gt_box_oracle" in study.results
    assert report.foundation_sam_box_miou(study, key) is not None  # the key the run's foundation_eval writes
    oracle = report.cell(study, "gt_box_oracle", key, "mIoU").mean

    def with_foundation_sam(miou: float) -> report.Study:
        other = dataclasses.replace(study)
        other.foundation_eval = lambda: {0: {"final_eval": {"synref/miou_box": miou}}}  # type: ignore[method-assign]
        return other

    before = oracle + report.BOX_USE_DROP + 1
    far = with_foundation_sam(before)
    assert report.foundation_sam_box_miou(far, key) == before
    note = report.box_use_note(far, [key])
    assert note is not None and f"{key} {oracle:.1f} against {before:.1f}" in note
    assert f"the paper's oracle is {report.paper_delta('ppcr', 'gt_box_oracle', key):.1f} points above" in note
    acc = report.cell(study, "ppcr", key, "box_acc@0.5").mean
    assert f"ppcr's own box right for {acc:.1f} %" in note and "Trained on ppcr's own predicted boxes" in note
    assert note in report.not_reproduced(far)
    assert report.box_use_note(with_foundation_sam(oracle + report.BOX_USE_DROP - 1), [key]) is None
    assert report.box_use_note(far, ["synref/testA"]) is None  # the foundation's SAM is measured on val splits
    without = dataclasses.replace(study, index={k: v for k, v in study.index.items() if k != "foundation_eval"})
    assert report.box_use_note(without, [key]) is None


def test_claim_verdicts() -> None:
    assert report.claim_verdict("greater", 0.5, 2.0) == "supported"
    assert report.claim_verdict("greater", -2.0, -0.1) == "contradicted"
    assert report.claim_verdict("greater", -1.0, 1.0) == "undecided"
    assert report.claim_verdict("not_greater", -1.0, 1.0) == "supported"
    assert report.claim_verdict("not_greater", 0.2, 1.0) == "contradicted"
    with pytest.raises(ValueError):
        report.claim_verdict("less", 0, 1)
    assert report.paper_delta("glamm", "ppcr", "synref/val") == round(81.1 - 80.76, 2)
    assert report.paper_delta("ppcr", "gt_box_oracle", "synref+/val") == round(87.58 - 74.34, 2)


def test_breakdowns(study: report.Study) -> None:
    by_type = report.breakdown(study, "expr_type")
    groups = {r["group"] for r in by_type}
    assert groups <= {"attribute", "location", "relation"} and "relation" in groups
    assert all(0 <= r["mIoU"] <= 100 and r["n"] > 0 for r in by_type)
    by_distractors = report.breakdown(study, "distractors_same_category")
    assert {r["group"] for r in by_distractors} <= {"0", "1", "2", "3+"}
    assert report.breakdown_table(study, "expr_type").rows


def test_failure_cases_and_figure_inputs(study: report.Study) -> None:
    cases = report.failure_cases(study, "ppcr", k=6)
    assert 0 < len(cases) <= 6
    assert all(c["reason"] and c["condition"] for c in cases)
    ious = [c["row"]["iou"] for c in cases]
    assert min(ious) >= 0
    rows, reasons = report.failure_figure_rows(study, cases[:2])
    assert rows[0]["pred_mask"].shape == rows[0]["gt_mask"].shape and len(reasons) == 2
    fig6, note = report.qualitative_examples(study, k=2)
    assert len(fig6) == 2 and "Selected" in note and fig6[0]["oracle_mask"] is not None
    example = report.entity_example(study)
    assert example is not None and len(example["entity_boxes"]) >= 2 and example["target"].startswith("target")


def test_provenance(study: report.Study) -> None:
    line = report.provenance(study)
    assert "`smoke`" in line and study.commit in line and "not RefCOCO" in line and "made by" in line


# ---------------------------------------------------------------------------------------------------------------
# notebooks and the book
# ---------------------------------------------------------------------------------------------------------------


def test_notebooks_are_thin_parameterised_and_clean() -> None:
    assert [p.name for p in NOTEBOOKS] == ["00_benchmark.ipynb", "01_table1_main_results.ipynb", "02_table2_reasoning_ablation.ipynb",
                                           "03_table3_spatial_ablation.ipynb", "04_figures.ipynb",
                                           "05_beyond_the_paper.ipynb", "06_explorer.ipynb",
                                           "07_learning_curves.ipynb"]
    for path in NOTEBOOKS:
        nb = json.loads(path.read_text())
        assert nb["metadata"]["kernelspec"]["name"] == "python3"
        assert nb["cells"][0]["cell_type"] == "markdown"
        params = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
        assert len(params) == 1, path.name
        for name in ("profile", "run_dir", "seeds", "device", "data_root", "llava_path", "sam_checkpoint",
                     "output_dir"):
            assert f"{name} = " in "".join(params[0]["source"]), (path.name, name)
        for c in nb["cells"]:
            if c["cell_type"] == "code":
                assert not c.get("outputs") and c.get("execution_count") is None, f"{path.name} has outputs"
                assert len("".join(c["source"]).splitlines()) <= 12, f"{path.name}: keep the logic in ppcr.report"


def test_book_builds_strictly_at_smoke(smoke_study_run: Path, tmp_path: Path) -> None:
    book_dir = copy_book_sources(tmp_path / "book", REPO / "book", REPO / "_config.yml")
    assert build("smoke", smoke_study_run, progress=False, book_dir=book_dir, notebooks_dir=REPO / "notebooks",
                 strict=True, repo_url="https://github.com/example/ppcr", repo_branch="main") == 0
    html = tmp_path / "_build" / "html"
    assert broken_internal_links(html) == []
    for page in html.glob("*.html"):  # the builder's folders do not leak into the published pages
        assert str(REPO) not in page.read_text(), page.name
    assert f".../{smoke_study_run.name}" in (html / "01_table1_main_results.html").read_text()  # the provenance line
    front = (html / "intro.html").read_text()  # the status block, above the method's description
    assert "This build:" in front and "Not reproduced by this build" in front
    assert front.index("This build:") < front.index("id=\"the-three-steps\"")
    study = report.load_study(smoke_study_run)
    assert study.commit in front and report.study_date(study) in front
    page = (html / "01_table1_main_results.html").read_text()  # launch buttons open the source notebook
    assert "colab.research.google.com/github/example/ppcr/blob/main/notebooks/01_table1_main_results.ipynb" in page
    assert "mybinder.org/v2/gh/example/ppcr/main" in page and "https://github.com/example/ppcr/issues" in page
    for nb in NOTEBOOKS:
        page = html / f"{nb.stem}.html"
        assert page.is_file(), page
        assert "Traceback" not in page.read_text()
    assert (html / "intro.html").is_file() and (html / "reproduce.html").is_file()
    table1 = (html / "01_table1_main_results.html").read_text()
    assert "Results shown:" in table1 and "CMIRNet" in table1 and "reproduced (smoke)" in table1
    executed = json.loads((book_dir / "06_explorer.ipynb").read_text())
    state = executed["metadata"]["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    outputs = [m["state"].get("outputs", []) for m in state.values() if m["model_name"] == "OutputModel"]
    assert any(o and "image/png" in o[0]["data"] for o in outputs)  # the explorer's rendered view is saved


def test_a_failing_notebook_fails_the_build(smoke_study_run: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    nb = json.loads(NOTEBOOKS[0].read_text())
    nb["cells"].append({"cell_type": "code", "metadata": {}, "execution_count": None, "outputs": [],
                        "source": "raise RuntimeError('broken on purpose')"})
    (notebooks / "01_broken.ipynb").write_text(json.dumps(nb))
    book_dir = copy_book_sources(tmp_path / "book", REPO / "book", REPO / "_config.yml")
    assert build("smoke", smoke_study_run, progress=False, book_dir=book_dir, notebooks_dir=notebooks) == 1
    err = capsys.readouterr().err
    assert "01_broken.ipynb" in err and "broken on purpose" in err


def test_status_block_says_what_is_reproduced_and_what_is_not(smoke_study_run: Path) -> None:
    study = report.load_study(smoke_study_run)
    table = report.status_table(study)
    assert [r["split"] for r in table.rows] == ["synref/val", "synref+/val", "synrefg/val"]
    row = table.rows[0]
    for variant in ("glamm", "ppcr"):
        assert row[variant] == pytest.approx(report.cell(study, variant, "synref/val", "mIoU").mean)
    notes = report.not_reproduced(study)
    assert any("LLaVA-1.5-7B" in n for n in notes)  # SynRef only: the paper's setting is not run
    assert any("One training seed" in n for n in notes)
    ppcr_acc = max(r["box_acc"] for r in table.rows)
    assert any("Spatial grounding" in n for n in notes) == (ppcr_acc < report.GROUNDED_BOX_ACC)
    text = report.status_markdown(study)
    assert text.count("\n| ") == len(table.rows) + 2 and "smoke" in text
    # nothing in it reads as an HTML tag (the caption's "where is <the expression>?" was dropped by the renderer)
    assert "where is &lt;the expression&gt;?" in text and not re.search(r"<[A-Za-z/][^>]*>", text)
