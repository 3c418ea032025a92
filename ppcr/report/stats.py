"""Beyond the paper: spread over seeds, paired bootstrap intervals and which of the paper's claims a run supports."""

from __future__ import annotations

import statistics
from typing import Any

from ppcr.metrics import box_centre_in, paired_bootstrap
from ppcr.model.config import VARIANTS
from ppcr.report.study import Study
from ppcr.report.tables import (SYNREF_OF, TABLE2_VARIANTS, TABLE3_VARIANTS, Column, Table, cell, mean_std,
                                paper_tables, reproduced_caption)


def seed_summary(study: Study, metrics: tuple[str, ...] = ("oIoU", "mIoU", "P@0.5", "box_acc@0.5")) -> Table:
    """Every reproduced cell (variant x dataset/split x metric): mean, std, min, max and the per-seed values."""
    rows = []
    for variant in study.variants:
        for key in study.keys:
            for metric in metrics:
                values = {seed: res["metrics"][key][metric] for seed, res in sorted(study.results[variant].items())
                          if key in res.get("metrics", {}) and metric in res["metrics"][key]}
                if not values:
                    continue
                v = list(values.values())
                rows.append({"variant": variant, "split": key, "metric": metric, "n_seeds": len(v),
                             "mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else None,
                             "min": min(v), "max": max(v),
                             "per_seed": ", ".join(f"{s}: {x:.2f}" for s, x in values.items())})
    return Table(
        title="Spread over seeds of every reproduced cell",
        columns=[Column("variant", "variant"), Column("split", "dataset/split"), Column("metric", "metric"),
                 Column("n_seeds", "seeds"), Column("mean", "mean"), Column("std", "std"), Column("min", "min"),
                 Column("max", "max"), Column("per_seed", "per seed")],
        rows=rows,
        caption=("std is the sample standard deviation over seeds (\u2013 with one seed: train more seeds, e.g. the "
                 "synthetic profile's three, to see it). " + reproduced_caption(study)),
    )


# (baseline, candidate): the interval is for candidate - baseline
BOOTSTRAP_PAIRS: tuple[tuple[str, str], ...] = (("glamm", "ppcr"), ("spatial_re", "ppcr"),
                                                ("spatial_re", "spatial_re_seg"), ("ppcr", "attn_box"),
                                                ("ppcr", "gt_box_oracle"))

# The paper's claims as (claim, baseline, candidate, direction): "greater" = candidate beats baseline,
# "not_greater" = candidate is no better than baseline. Tables 1-3 of the paper, val mIoU.
CLAIMS: tuple[tuple[str, str, str, str], ...] = (
    ("PPCR beats semantic-only (GLaMM-style) prompting", "glamm", "ppcr", "greater"),
    ("the spatial prompt works better from P_seg_txt than from the expression", "spatial_re", "ppcr", "greater"),
    ("adding the expression to P_seg_txt does not help", "ppcr", "spatial_re_seg", "not_greater"),
    ("an attention box head is no better than the MLP (F_Map)", "ppcr", "attn_box", "not_greater"),
    ("the ground-truth box (oracle) is far better than the predicted one", "ppcr", "gt_box_oracle", "greater"),
)


def paired_rows(study: Study, baseline: str, candidate: str, key: str,
                seeds: list[int] | None = None) -> tuple[list[dict], list[dict]]:
    """The expressions both variants predicted on one "dataset/split", paired by (seed, ref_id, sent_id)."""
    a_rows, b_rows = [], []
    for seed in seeds if seeds is not None else study.seeds:
        b_by_id = {(r["ref_id"], r["sent_id"]): r for r in study.rows(candidate, key, seed)}
        for r in study.rows(baseline, key, seed):
            other = b_by_id.get((r["ref_id"], r["sent_id"]))
            if other is not None:
                a_rows.append(r)
                b_rows.append(other)
    return a_rows, b_rows


def _bootstrap_rows(a: list[dict], b: list[dict], metric: str, n_boot: int, seed: int) -> dict[str, float]:
    """`paired_bootstrap` of two variants' paired prediction rows (oIoU also needs their intersections/unions)."""
    kwargs: dict[str, Any] = {}
    if metric == "oIoU":
        kwargs = {"a_inter": [r["intersection"] for r in a], "a_union": [r["union"] for r in a],
                  "b_inter": [r["intersection"] for r in b], "b_union": [r["union"] for r in b]}
    return paired_bootstrap([r["iou"] for r in a], [r["iou"] for r in b], metric=metric, n_boot=n_boot, seed=seed,
                            **kwargs)


def _paired_splits(study: Study, baseline: str, candidate: str):
    """(key, baseline rows, candidate rows) for every dataset/split where both variants have paired rows."""
    if baseline not in study.results or candidate not in study.results:
        return
    for key in study.keys:
        a, b = paired_rows(study, baseline, candidate, key)
        if a:
            yield key, a, b


def bootstrap_gains(study: Study, pairs: tuple[tuple[str, str], ...] = BOOTSTRAP_PAIRS,
                    metrics: tuple[str, ...] = ("mIoU", "oIoU"), n_boot: int = 2000, seed: int = 0) -> Table:
    """Paired bootstrap 95% intervals of candidate - baseline (percentage points) per dataset/split and metric,
    pooled over seeds (pairs are (seed, ref_id, sent_id)); whether the interval excludes 0."""
    rows = []
    pairs = tuple(pairs) + tuple((f"glamm@{name}", f"ppcr@{name}") for name in study.recipes)  # each other recipe
    for baseline, candidate in pairs:
        for key, a, b in _paired_splits(study, baseline, candidate):
            for metric in metrics:
                res = _bootstrap_rows(a, b, metric, n_boot, seed)
                excludes = res["ci_low"] > 0 or res["ci_high"] < 0
                verdict = ("better" if res["ci_low"] > 0 else "worse") if excludes else "no clear difference"
                rows.append({"comparison": f"{candidate} \u2212 {baseline}", "split": key, "metric": metric,
                             "n": len(a), "delta": res["delta"], "ci_low": res["ci_low"], "ci_high": res["ci_high"],
                             "excludes_0": excludes, "verdict": verdict})
    return Table(
        title="Paired bootstrap intervals of the differences between variants",
        columns=[Column("comparison", "comparison"), Column("split", "dataset/split"), Column("metric", "metric"),
                 Column("n", "pairs"), Column("delta", "\u0394 (pp)"), Column("ci_low", "95% CI low"),
                 Column("ci_high", "95% CI high"), Column("excludes_0", "CI excludes 0"),
                 Column("verdict", "candidate is")],
        rows=rows,
        caption=(f"\u0394 = metric(candidate) \u2212 metric(baseline) in percentage points on the same expressions; "
                 f"{n_boot} paired resamples of (seed, ref_id, sent_id) pairs, percentile intervals. The paper "
                 f"reports no intervals; its gains over GLaMM are 0.3-1.9 points. " + reproduced_caption(study)),
    )


BOX_VARIANTS = ("ppcr", "attn_box", "spatial_re", "spatial_re_seg")  # the variants that segment from their own box


def box_conditional_gains(study: Study, baseline: str = "glamm", variants: tuple[str, ...] = BOX_VARIANTS,
                          n_boot: int = 2000, seed: int = 0) -> Table:
    """Each box variant against `baseline` (mIoU, paired), on the expressions where its predicted box's centre lies
    inside the ground-truth box and on the others, per dataset/split, pooled over seeds."""
    rows = []
    for candidate in variants:
        for key, a, b in _paired_splits(study, baseline, candidate):
            if any(r.get("pred_box") is None for r in b):  # a results file without the predicted boxes
                continue
            hits = [box_centre_in(r["pred_box"], r["gt_box"]) for r in b]
            for subset, keep in (("centre in the GT box", True), ("centre outside", False)):
                idx = [i for i, h in enumerate(hits) if h == keep]
                if not idx:
                    continue
                a_sub, b_sub = [a[i] for i in idx], [b[i] for i in idx]
                res = _bootstrap_rows(a_sub, b_sub, "mIoU", n_boot, seed)
                rows.append({"comparison": f"{candidate} \u2212 {baseline}", "split": key, "subset": subset,
                             "n": len(idx), "share": 100.0 * len(idx) / len(a),
                             "baseline": 100.0 * statistics.fmean(r["iou"] for r in a_sub),
                             "candidate": 100.0 * statistics.fmean(r["iou"] for r in b_sub),
                             "delta": res["delta"], "ci_low": res["ci_low"], "ci_high": res["ci_high"]})
    return Table(
        title="Where the predicted box points at the named object, and where it does not",
        columns=[Column("comparison", "comparison"), Column("split", "dataset/split"),
                 Column("subset", "candidate's box"), Column("n", "pairs"), Column("share", "share (%)"),
                 Column("baseline", "baseline mIoU"), Column("candidate", "candidate mIoU"),
                 Column("delta", "\u0394 (pp)"), Column("ci_low", "95% CI low"), Column("ci_high", "95% CI high")],
        rows=rows,
        caption=("The expressions of each split in two parts, by whether the centre of the candidate's predicted box "
                 "lies inside the ground-truth box; on each part the candidate's mIoU against the baseline's on the "
                 f"same expressions ({n_boot} paired resamples, percentile intervals). The parts are chosen by the "
                 "candidate's own box, so they are not random samples (the expressions it grounds may be the easier "
                 "ones, for the baseline too): they show what the box adds where it is right and costs where it is "
                 "wrong, not what a better box would give, which is the oracle's row. " + reproduced_caption(study)),
    )


def _box_row_figures(rows: list[dict[str, Any]]) -> dict[str, float] | None:
    """Box IoU, accuracy@0.5 and centre-in-GT (%) of a results file's rows (None without predicted boxes)."""
    if not rows or any(r.get("pred_box") is None for r in rows):
        return None
    ious = [r["box_iou"] for r in rows]
    return {"box_iou": 100.0 * statistics.fmean(ious),
            "box_acc50": 100.0 * statistics.fmean(float(v >= 0.5) for v in ious),
            "box_centre_in_gt": 100.0 * statistics.fmean(float(box_centre_in(r["pred_box"], r["gt_box"]))
                                                          for r in rows)}


PROBE_READERS = (("ppcr", "ppcr: branch B reads the soft token, F_Map the box"),
                 ("spatial_re", "spatial_re: branch B reads the expression"))
FOUNDATION_READER = "the foundation LLaVA's own \u201cwhere\u201d answer (decoded, before stages 2-3)"


def prompt_probe_table(study: Study) -> Table:
    """Per val split: the box an MLP probe reads off ppcr's P_seg_txt alone (`ppcr.evaluation.prompt_probe`) beside
    the boxes of ppcr and spatial_re on the same expressions; mean (std) over the seeds that have a probe."""
    probes = study.prompt_probe()
    answers = study.where_answers()
    rows = []
    keys = [k for k in study.keys if any(k in p["splits"] for p in probes.values())]
    for key in keys:
        seeds = [s for s in sorted(probes) if key in probes[s]["splits"]]
        readers = [("MLP probe on P_seg_txt alone", [probes[s]["splits"][key] for s in seeds])]
        for variant, label in PROBE_READERS:
            figures = [f for s in seeds if (f := _box_row_figures(study.rows(variant, key, s))) is not None]
            if figures:
                readers.append((label, figures))
        decoded = [answers[s][key] for s in sorted(answers) if key in answers[s]]
        if decoded:
            readers.append((FOUNDATION_READER, decoded))
        for label, figures in readers:
            rows.append({"split": key, "reader": label, "seeds": len(figures),
                         **{m: mean_std([f[m] for f in figures]) for m in ("box_iou", "box_acc50",
                                                                           "box_centre_in_gt")}})
    train = sorted({p["meta"].get("train_expressions") for p in probes.values()} - {None})
    return Table(
        title="How much of the box the semantic prompt holds",
        columns=[Column("split", "dataset/split"), Column("reader", "box read by"), Column("seeds", "seeds"),
                 Column("box_iou", "box IoU (%)"), Column("box_acc50", "box acc@0.5 (%)"),
                 Column("box_centre_in_gt", "centre in GT box (%)")],
        rows=rows,
        caption=("The probe: an MLP of F_Map's shape fitted by L1 on the P_seg_txt of "
                 f"{', '.join(map(str, train)) or '?'} train expressions of the trained ppcr model (frozen; no LLM in "
                 "between), scored on the val expressions of the results files; the other rows are the models' own "
                 "boxes on the same expressions. The probe is a reference, not a bound: it shows what a small reader "
                 "of P_seg_txt alone gets from this much training data. Where ppcr's box is below it, branch B has not "
                 "learned to read all that P_seg_txt holds; where both are low, P_seg_txt does not say where the "
                 "object is. The last row is the LLaVA the run starts from (stage 1, before stages 2-3) answering "
                 "the \u201cwhere\u201d question about the expression itself, its four box bins decoded greedily "
                 "(`MllmPretrainer.decode_where_bins`): how well this LLaVA grounds the expressions on its own, a "
                 "reference for every reader trained on top of it. "
                 + reproduced_caption(study)),
    )


GROUNDED_BOX_ACC = 10.0  # box acc@0.5 (%) above which a variant's predicted boxes follow the expression at all;
# a constant box scores about 1 % on SynRef, whose objects cover about 1.5 % of the image


def _box_acc_text(study: Study, variant: str, key: str) -> tuple[str, float | None]:
    """A variant's box accuracy@0.5 on a split, as text and value (None: the variant predicts no box)."""
    if VARIANTS[variant].eval_box != "pred":
        return "\u2014", None
    value = cell(study, variant, key, "box_acc@0.5")
    return ("n/a", None) if value is None else (f"{value.mean:.1f}", value.mean)


def claim_verdict(direction: str, ci_low: float, ci_high: float) -> str:
    """"supported" / "contradicted" / "undecided" for a claim's direction and a 95% interval of candidate - baseline."""
    if direction == "greater":
        return "supported" if ci_low > 0 else "contradicted" if ci_high < 0 else "undecided"
    if direction == "not_greater":
        return "contradicted" if ci_low > 0 else "supported"
    raise ValueError(f"unknown claim direction {direction!r}")


def claims_table(study: Study, metric: str = "mIoU", n_boot: int = 2000, seed: int = 0) -> Table:
    """Which of the paper's claims this run supports, per dataset/split, from paired bootstrap intervals."""
    rows = []
    for claim, baseline, candidate, direction in CLAIMS:
        for key, a, b in _paired_splits(study, baseline, candidate):
            res = _bootstrap_rows(a, b, metric, n_boot, seed)
            paper = paper_delta(baseline, candidate, key)
            (cand_text, cand_acc), (base_text, base_acc) = (_box_acc_text(study, v, key) for v in (candidate, baseline))
            verdict = claim_verdict(direction, res["ci_low"], res["ci_high"])
            predicted = [acc for acc in (cand_acc, base_acc) if acc is not None]
            if len(predicted) == 2 and max(predicted) < GROUNDED_BOX_ACC:
                verdict = "untestable: boxes not grounded"
            rows.append({"claim": claim, "comparison": f"{candidate} \u2212 {baseline}", "split": key, "n": len(a),
                         "delta": res["delta"], "ci_low": res["ci_low"], "ci_high": res["ci_high"],
                         "paper_delta": paper, "box_acc": f"{cand_text} / {base_text}", "verdict": verdict})
    return Table(
        title=f"Which of the paper's claims this run supports ({metric})",
        columns=[Column("claim", "claim"), Column("comparison", "comparison"), Column("split", "dataset/split"),
                 Column("n", "pairs"), Column("delta", "\u0394 (pp)"), Column("ci_low", "95% CI low"),
                 Column("ci_high", "95% CI high"), Column("paper_delta", "paper's \u0394 (pp)"),
                 Column("box_acc", "box acc@0.5 (%), candidate / baseline"), Column("verdict", "verdict")],
        rows=rows,
        caption=("supported: the paired-bootstrap 95% interval of candidate \u2212 baseline lies on the claimed side "
                 "of 0 (for 'no better' claims: the candidate is not significantly better); contradicted: it lies "
                 "on the other side; undecided: it contains 0. The claims between two variants that both segment "
                 f"from their predicted box are about how that box is predicted: where neither box reaches "
                 f"{GROUNDED_BOX_ACC:.0f} % accuracy@0.5 (a constant box gets about 1 %), the boxes do not follow "
                 "the expression and such a claim is marked untestable, whatever the interval says (\u2014: the "
                 "variant uses no predicted box). The paper's \u0394 comes from its Tables 2-3 on the split the suite "
                 "stands in for (synref: refcoco, synref+: refcoco+, synrefg: refcocog), where the paper reports "
                 "both rows. " + reproduced_caption(study)),
    )


def paper_delta(baseline: str, candidate: str, key: str) -> float | None:
    """The paper's candidate - baseline (mIoU, Tables 2-3) on the real dataset and split a SynRef "suite/split"
    stands in for (synref -> refcoco, synref+ -> refcoco+, synrefg val/test -> refcocog val(U)/test(U))."""
    suite, _, split = key.partition("/")
    real = {v: k for k, v in SYNREF_OF.items()}.get(suite)
    split = f"{split}(U)" if real == "refcocog" else split
    ours = {**TABLE2_VARIANTS, **TABLE3_VARIANTS}
    values: dict[str, float] = {}
    for row in paper_tables():
        variant = ours.get(row["variant"]) if row["table"] in ("table2", "table3") else None
        if variant and row["dataset"] == real and row["metric"] == "mIoU" and row["split"] == split \
                and row["value"] is not None:
            values[variant] = row["value"]
    if baseline not in values or candidate not in values:
        return None
    return round(values[candidate] - values[baseline], 2)
