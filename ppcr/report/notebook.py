"""Small helpers for the notebooks' charts and sentences, and the glue to ppcr.report.explorer."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from ppcr.provenance import resolve_device
from ppcr.recipe.profile import model_variant
from ppcr.report.explorer import PredictionExplorer
from ppcr.report.static_explorer import static_explorer
from ppcr.report.study import Study
from ppcr.report.tables import cell


def metric_rows(study: Study, variants: list[str] | tuple[str, ...], metric: str = "mIoU") -> list[dict[str, Any]]:
    """Rows for `ppcr.viz.breakdown_plot`: group = dataset/split, variant, the metric's mean over seeds, n."""
    rows = []
    for key in study.keys:
        for variant in variants:
            value = cell(study, variant, key, metric)
            if value is not None:
                n = next(iter(study.results[variant].values()))["metrics"][key].get("n", 0)
                rows.append({"group": key, "variant": variant, metric: value.mean, "n": n})
    return rows


def summary_line(study: Study, variants: list[str] | tuple[str, ...], metric: str = "mIoU") -> str:
    """A markdown sentence: each variant's metric averaged over every evaluated dataset/split, best first."""
    means = {}
    for variant in variants:
        values = [c.mean for key in study.keys if (c := cell(study, variant, key, metric)) is not None]
        if values:
            means[variant] = statistics.fmean(values)
    if not means:
        return "This run has none of these variants."
    ranked = sorted(means.items(), key=lambda kv: -kv[1])
    text = ", ".join(f"`{v}` {m:.2f}" for v, m in ranked)
    return (f"**This run** ({study.profile}): {metric} averaged over the {len(study.keys)} evaluated dataset/splits, "
            f"best first: {text}. Whether a difference is more than noise: see the bootstrap intervals on the "
            f"'Beyond the paper' page.")


SHOWN_VARIANTS = ("glamm", "ppcr", "gt_box_oracle")  # the explorer's first view: Fig. 6's columns


def make_explorer(study: Study, live: bool = False, device: str = "cpu", data_root: str | Path | None = None,
                  llava_path: str | None = None, sam_checkpoint: str | None = None, seed: int | None = None,
                  shown: tuple[str, ...] = SHOWN_VARIANTS):
    """A `PredictionExplorer` over the study's stored predictions (first seed unless `seed`); with `live`, the
    variants' checkpoints listed in the results files are loaded so new expressions can be run. `shown`: the
    variants selected at first (the others stay selectable)."""

    predictions = {}
    for variant, by_seed in study.results.items():
        chosen = seed if seed is not None else min(by_seed)
        if chosen in by_seed:
            predictions[variant] = by_seed[chosen]["rows"]
    models = {}
    if live:  # (imported here: the model classes load transformers, peft and SAM, which only live models need)
        from ppcr.model.modeling_ppcr import PPCRModel

        overrides = {k: v for k, v in {"llava_path": llava_path, "sam_checkpoint": sam_checkpoint}.items() if v}
        for variant in predictions:
            checkpoint = study.checkpoint(variant, seed)
            if checkpoint and Path(checkpoint).is_dir():
                model = PPCRModel.from_pretrained(checkpoint, variant=model_variant(variant), **overrides)
                models[variant] = model.to(resolve_device(device)).eval()
    explorer = PredictionExplorer(study.data_root(data_root), study.datasets, predictions=predictions, models=models)
    selected = tuple(v for v in shown if v in explorer.variants)
    if selected:
        explorer.variants_widget.value = selected
    return explorer


def explorer_start(explorer: Any, study: Study, variant: str = "ppcr") -> tuple[str, str, int]:
    """(suite, split, index) of a first view: the RefCOCOg-like suite and its first expression that `variant`
    has a stored prediction for (evaluation may cover only part of a split)."""
    suite = "refcocog" if "refcocog" in study.datasets else ("synrefg" if "synrefg" in study.datasets
                                                             else next(iter(study.datasets)))
    for split in explorer.splits_for(suite):
        for row in explorer.rows_for(suite, split):
            if explorer.stored_prediction(variant, suite, split, row["ref_id"], row["sent_id"]) is not None:
                return suite, split, row["index"]
    return suite, explorer.splits_for(suite)[0], 0


def static_examples(explorer: Any, study: Study, k: int = 6, variant: str = "ppcr") -> list[tuple[str, str, int]]:
    """Up to `k` (suite, split, index) examples for the kernel-free explorer, taken in turn from each dataset's
    first split, among the expressions `variant` has a stored prediction for."""
    pools = []
    for suite in study.datasets:
        split = explorer.splits_for(suite)[0]
        split = "val" if "val" in explorer.splits_for(suite) else split
        pools.append([(suite, split, row["index"]) for row in explorer.rows_for(suite, split)
                      if explorer.stored_prediction(variant, suite, split, row["ref_id"], row["sent_id"])])
    picked: list[tuple[str, str, int]] = []
    for rank in range(max((len(p) for p in pools), default=0)):
        picked += [p[rank] for p in pools if rank < len(p)]
        if len(picked) >= k:
            break
    return picked[:k]


def static_view(explorer: Any, study: Study, k: int = 6) -> str:
    """The kernel-free explorer (`ppcr.report.static_explorer`) over `static_examples` and every variant of the study."""

    return static_explorer(explorer, static_examples(explorer, study, k), list(explorer.variants))
