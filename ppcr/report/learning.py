"""Learning curves: every training stage's held-out figures (and training loss) against the optimisation step.

Every stage evaluates on a fixed held-out subset while it trains (`ppcr.training.loop`), so a run folder holds, per
stage, `<run>/stages/seed<k>/<stage>-<hash>/` with `eval.csv` (step + one column per held-out metric), `log.csv`
(the training losses per step) and, once finished, `DONE.json` (`final_eval`, `eval_history`, ...):

    curves = load_curves("runs/demo")             # tidy records of every stage of every seed, and notes
    learning_figure(curves, show_loss=True)        # one panel per stage kind: stage 0 SAM, stage 1 MLLM, RIS
    final_table(curves)                            # each stage's last held-out figures, a ppcr.report.Table

Stage folders are named and read back by `ppcr.training.stage`: `sam_pretrain` (stage 0), `vision_pretrain` (stage 1a,
the CLIP tower's dense pretraining, when the profile has it), `mllm_pretrain` (stage 1),
`glamm_init` (stage 2, the GLaMM-style initialisation) and one folder per trained variant (stage 3). Runs that
start from the shipped foundation have no stage 0-1 folders; their curves are then read from the shipped
foundation's `curves.json` (beside its `manifest.json` in `ppcr/resources/foundation/`) and labelled "shipped
foundation". Stages
trained before held-out diagnostics existed have no evaluation history: they are left out with a note.
`foundation_eval-<hash>` folders (the stage 0-1 weights a run starts from, evaluated once on its own val splits)
have no curve; `final_table` lists their figures.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ppcr.model.shipped import CURVES
from ppcr.report.tables import Column, Table
from ppcr.training.stage import EVALUATION_STAGES, StageDir, stage_dirs, stage_kind
from ppcr.viz import blank_panel, new_figure

# ---------------------------------------------------------------------------------------------------------------
# what the stages are and what they measure
# ---------------------------------------------------------------------------------------------------------------

FOUNDATION_STAGES = ("sam_pretrain", "mllm_pretrain")
# folders that evaluate without training: `foundation_eval` holds stages 0-1 (trained here or shipped) evaluated once
# on this run's own val splits, DONE.json `final_eval` {"<suite>/<sam metric>": v, "mllm/<mllm metric>": v}
STAGE_KINDS = ("sam", "vision", "mllm", "ris")
KIND_TITLES = {"sam": "stage 0: SAM pretraining", "vision": "stage 1a: CLIP tower, dense pretraining",
               "mllm": "stage 1: MLLM pretraining", "ris": "stages 2-3: referring segmentation"}
# the held-out metrics each kind of stage logs (all in percent), in display order, with their labels
METRIC_LABELS = {
    "sam": {"miou_box": "mIoU, box prompt", "miou_point": "mIoU, point prompt",
            "miou_box_fill": "mIoU of filling the box (sanity)"},
    "vision": {"color_acc": "patch colour acc.", "shape_acc": "patch shape acc.", "pattern_acc": "patch pattern acc.",
               "size_acc": "patch size acc.", "background_acc": "background patches acc.",
               "box_l1": "patch box L1 (fraction of the side)"},  # not a percentage: in the table, not plotted
    "mllm": {"describe_token_acc": "describe: answer-token acc.", "where_token_acc": "where: answer-token acc.",
             "where_box_iou": "where: box IoU (teacher-forced bins)",
             "where_box_acc50": "where: box acc@0.5 (teacher-forced bins)",
             "where_free_box_iou": "where: box IoU (decoded)", "where_free_box_acc50": "where: box acc@0.5 (decoded)",
             "probe_box_iou": "grounding probe: box IoU", "probe_box_acc50": "grounding probe: box acc@0.5",
             "grounding_hit": "image tokens: top token on the target",
             "seg_slot_probe_box_iou": "grounding probe at the [SEG] slot: box IoU"},
    "ris": {"miou": "mIoU", "oiou": "oIoU", "box_acc50": "box acc@0.5", "box_iou": "box IoU",
            "box_centre_in": "box centre in the GT box", "miou_pred_box_fill": "mIoU of filling the predicted box",
            "oracle_miou": "mIoU with the GT box", "semantic_box_iou": "box IoU read from P_seg_txt (aux. head)"},
}
# stage-3 folders in the order of the paper's tables; others follow alphabetically
RIS_ORDER = ("glamm_init", "glamm", "spatial_re", "spatial_re_seg", "ppcr", "attn_box")
NOT_LOSSES = ("step", "lr", "samples_per_s")  # log.csv columns that are not loss terms
EVALUATION_KEYS = ("stage", "variant", "seed", "origin", "step", "kind")  # final-table row keys that are no metric
RUN = "run"
SHIPPED = "shipped foundation"


def stage_label(stage: str) -> str:
    """A short human name of a stage folder's stage."""
    if stage == "sam_pretrain":
        return "stage 0 (SAM)"
    if stage == "vision_pretrain":
        return "stage 1a (CLIP tower)"
    if stage == "mllm_pretrain":
        return "stage 1 (MLLM)"
    if stage == "glamm_init":
        return "stage 2: glamm_init"
    return f"stage 3: {stage}"


def _stage_order(stage: str) -> tuple[int, int, str]:
    if stage in EVALUATION_STAGES:
        return len(STAGE_KINDS), 0, stage
    kind = STAGE_KINDS.index(stage_kind(stage))
    rank = RIS_ORDER.index(stage) if stage in RIS_ORDER else len(RIS_ORDER)
    return kind, rank, stage


# ---------------------------------------------------------------------------------------------------------------
# finding and reading stage folders
# ---------------------------------------------------------------------------------------------------------------


def find_stage_dirs(run_dir: str | Path, seeds: Sequence[int] | None = None,
                    latest_only: bool = True) -> tuple[list[StageDir], list[str]]:
    """Every stage folder of a run (all seeds, or `seeds`), in stage order, and notes.

    A stage re-trained after a code change leaves the old copy (another fingerprint) in place; `latest_only` keeps
    the most recently written copy of each (seed, stage) and notes the others. Raises FileNotFoundError when the
    run has no stage folders at all.
    """
    run_dir = Path(run_dir)
    found = stage_dirs(run_dir)
    if seeds is not None:
        found = [s for s in found if s.seed in seeds]
    if not found:
        where = f" for seeds {list(seeds)}" if seeds is not None else ""
        raise FileNotFoundError(f"no stage folders under {run_dir}/stages/seed<k>/<stage>-<hash>/{where}: is "
                                f"{run_dir} a run folder? (train one with `python -m ppcr.pipeline study --out "
                                f"{run_dir}`)")
    notes: list[str] = []
    if latest_only:
        by_key: dict[tuple[int, str], list[StageDir]] = {}
        for s in found:
            by_key.setdefault((s.seed, s.stage), []).append(s)
        found = []
        for (seed, stage), copies in by_key.items():
            copies.sort(key=StageDir.modified)
            found.append(copies[-1])
            if len(copies) > 1:
                notes.append(f"{stage} (seed {seed}): {len(copies) - 1} older cached cop"
                             f"{'y' if len(copies) == 2 else 'ies'} ignored "
                             f"({', '.join(c.path.name for c in copies[:-1])}); shown: {copies[-1].path.name}")
    found.sort(key=lambda s: (_stage_order(s.stage), s.seed))
    return found, notes


def _read_csv(path: Path) -> list[dict[str, float]]:
    """A log written by `ppcr.training.loop._write_log`: one dict per row, numbers as floats, blanks left out."""
    with open(path, newline="") as f:
        rows = []
        for r in csv.DictReader(f):
            row = {}
            for k, v in r.items():
                if k is None or v in (None, ""):
                    continue
                try:
                    row[k] = float(v)
                except ValueError:
                    continue
            if "step" in row:
                rows.append(row)
        return rows


def read_eval_history(stage: StageDir) -> list[dict[str, float]]:
    """The stage's held-out figures per evaluation, [{"step": s, metric: value, ...}]: from eval.csv (also while
    the stage is still training), else DONE.json's `eval_history`; [] when it has none (old runs)."""
    path = stage.path / "eval.csv"
    if path.is_file():
        rows = _read_csv(path)
        if rows:
            return rows
    history = stage.done().get("eval_history") or []
    return [{k: float(v) for k, v in row.items() if _is_number(v)} for row in history if "step" in row]


def read_loss_log(stage: StageDir, terms: Sequence[str] | None = ("total",)) -> list[dict[str, float]]:
    """The stage's training losses per step from log.csv ([] without one); `terms` None: every loss term."""
    path = stage.path / "log.csv"
    if not path.is_file():
        return []
    keep = []
    for row in _read_csv(path):
        losses = {k: v for k, v in row.items() if k not in NOT_LOSSES and (terms is None or k in terms)}
        if losses:
            keep.append({"step": row["step"], **losses})
    return keep


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(float(value))


# ---------------------------------------------------------------------------------------------------------------
# tidy records
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Record:
    """One value of one curve. split: "held-out" (an evaluation) or "train" (a loss); origin: "run" or
    "shipped foundation" (read from the shipped foundation's `curves.json`)."""

    stage: str
    variant: str | None
    seed: int
    step: int
    metric: str
    value: float
    split: str = "held-out"
    origin: str = RUN

    @property
    def kind(self) -> str:
        return stage_kind(self.stage)


@dataclass
class LearningCurves:
    """A run's curves: the records, the stage folders they come from, and notes on what was left out."""

    run_dir: Path
    records: list[Record]
    stages: list[StageDir]
    notes: list[str] = field(default_factory=list)
    # one-off evaluations (no curve): rows for the final table, with "kind" (sam / mllm) and metric -> value
    evaluations: list[dict[str, Any]] = field(default_factory=list)

    def held_out(self) -> list[Record]:
        return [r for r in self.records if r.split == "held-out"]

    def losses(self) -> list[Record]:
        return [r for r in self.records if r.split == "train"]

    def curve(self, stage: str, metric: str, seed: int | None = None,
              split: str = "held-out") -> list[tuple[int, float]]:
        """(step, value) pairs of one stage's metric (first seed unless `seed`), by step."""
        rows = [r for r in self.records if r.stage == stage and r.metric == metric and r.split == split]
        if not rows:
            return []
        seed = min(r.seed for r in rows) if seed is None else seed
        return sorted((r.step, r.value) for r in rows if r.seed == seed)


def history_records(stage: str, variant: str | None, seed: int, history: list[dict[str, Any]],
                    split: str = "held-out", origin: str = RUN) -> list[Record]:
    """[{"step": s, metric: v}] -> one Record per (step, metric); non-numbers are left out."""
    return [Record(stage, variant, seed, int(row["step"]), metric, float(value), split, origin)
            for row in history for metric, value in row.items() if metric != "step" and _is_number(value)]


def default_manifest() -> Path:
    """Where the shipped foundation's manifest lives (it may not exist)."""
    return Path(str(resources.files("ppcr") / "resources" / "foundation" / "manifest.json"))


def shipped_records(manifest: str | Path | None = None) -> tuple[list[Record], list[str]]:
    """Stage 0, 1a and 1 held-out curves of the shipped foundation (`curves.json` beside its manifest), and notes;
    nothing when there is no manifest."""
    path = Path(manifest) if manifest is not None else default_manifest()
    if not path.is_file():
        return [], []
    curves_path = path.with_name(CURVES)
    try:
        curves = json.loads(curves_path.read_text())
    except (OSError, ValueError) as err:
        return [], [f"the shipped foundation's curves {curves_path} are unreadable ({err}): they are not shown"]
    records, notes = [], []
    for name in (*FOUNDATION_STAGES, "vision_pretrain"):
        history = curves.get(name) or []
        if history:
            records += history_records(name, None, 0, history, origin=SHIPPED)
        elif name in FOUNDATION_STAGES:
            notes.append(f"{name}: the shipped foundation has no evaluation history")
    return records, notes


def foundation_eval_rows(stage: StageDir) -> list[dict[str, Any]]:
    """A `foundation_eval` folder's figures as final-table rows: stage 0 per suite, stage 1 once (step None: a
    one-off evaluation of the weights the run starts from, on this run's own val splits)."""
    info = stage.done()
    origin = SHIPPED if info.get("foundation") == "shipped" else RUN
    rows: dict[str, dict[str, Any]] = {}
    for key, value in (info.get("final_eval") or {}).items():
        if "/" not in key or not _is_number(value):
            continue
        prefix, metric = key.split("/", 1)
        kind = "mllm" if prefix == "mllm" else "sam"
        name = (f"stage 0 (SAM) on this run's val: {prefix}" if kind == "sam"
                else "stage 1 (MLLM) on this run's val")
        row = rows.setdefault(name, {"stage": name, "variant": "", "seed": stage.seed, "origin": origin,
                                     "step": None, "kind": kind})
        row[metric] = float(value)
    return sorted(rows.values(), key=lambda r: (STAGE_KINDS.index(r["kind"]), r["stage"]))


def load_curves(run_dir: str | Path, seeds: Sequence[int] | None = None, loss_terms: Sequence[str] | None = ("total",),
                manifest: str | Path | None = None, latest_only: bool = True) -> LearningCurves:
    """Every stage's held-out history (and training loss, `loss_terms`; None: all terms, (): none) of a run.

    Stages without held-out history (old runs, or diagnostics turned off) are left out of the held-out records
    with a note (their losses are kept). When the run has no stage 0-1 folders (it starts from the shipped
    foundation), the shipped foundation's curves (`curves.json` beside `manifest`, default the package's) are added,
    labelled "shipped foundation". Raises FileNotFoundError when the run has no stage folders.
    """
    found, notes = find_stage_dirs(run_dir, seeds, latest_only)
    stages = [s for s in found if s.stage not in EVALUATION_STAGES]
    evaluations = [row for s in found if s.stage in EVALUATION_STAGES for row in foundation_eval_rows(s)]
    records: list[Record] = []
    for s in stages:
        history = read_eval_history(s)
        if history:
            records += history_records(s.stage, s.variant, s.seed, history)
        else:
            state = "finished" if s.finished else "not finished"
            notes.append(f"{s.stage} (seed {s.seed}, {state}): no held-out evaluation history (trained before "
                         f"held-out diagnostics, with them turned off, or not yet evaluated): left out")
        if loss_terms is None or loss_terms:
            records += history_records(s.stage, s.variant, s.seed, read_loss_log(s, loss_terms), split="train")
    if not any(s.stage in FOUNDATION_STAGES for s in stages):
        shipped, shipped_notes = shipped_records(manifest)
        records += shipped
        notes += shipped_notes
        if shipped:
            notes.append("stages 0-1: this run starts from the shipped foundation; its curves are those recorded "
                         "in the shipped curves.json (trained once with `python -m ppcr.foundation train`)")
    return LearningCurves(Path(run_dir), records, stages, notes, evaluations)


# ---------------------------------------------------------------------------------------------------------------
# the figure
# ---------------------------------------------------------------------------------------------------------------


def _metric_label(kind: str, metric: str) -> str:
    return METRIC_LABELS.get(kind, {}).get(metric, metric)


def _ordered_metrics(kind: str, metrics: set[str]) -> list[str]:
    return sorted(metrics, key=lambda m: _metric_order(kind, m))


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over up to `window` values (the first values average what precedes them)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _series(records: list[Record]) -> list[tuple[tuple[str, str, int, str], list[tuple[int, float]]]]:
    """Records grouped into lines keyed (stage, metric, seed, origin), each sorted by step, in stage order."""
    lines: dict[tuple[str, str, int, str], list[tuple[int, float]]] = {}
    for r in records:
        lines.setdefault((r.stage, r.metric, r.seed, r.origin), []).append((r.step, r.value))
    keys = sorted(lines, key=lambda k: (_stage_order(k[0]), _metric_order(stage_kind(k[0]), k[1]), k[2], k[3]))
    return [(k, sorted(lines[k])) for k in keys]


def _metric_order(kind: str, metric: str) -> tuple[int, str]:
    """Known metrics in display order (METRIC_LABELS), then the others alphabetically."""
    known = list(METRIC_LABELS.get(kind, {}))
    return (known.index(metric), metric) if metric in known else (len(known), metric)


def _line_label(name: str, seed: int, origin: str, n_seeds: int) -> str:
    label = name
    if n_seeds > 1:
        label += f", seed {seed}"
    if origin != RUN:
        label += f" ({origin})"
    return label


def _draw_held_out(ax: Axes, kind: str, records: list[Record], ris_metrics: Sequence[str]) -> None:
    """One line per metric (stages 0-1) or per stage and metric (RIS); seeds share a colour."""
    from matplotlib import colormaps

    colours = colormaps["tab10"].colors
    styles = ("-", "--", ":", "-.")
    n_seeds = len({r.seed for r in records})
    if kind == "ris":
        records = [r for r in records if r.metric in ris_metrics]
        names = sorted({r.stage for r in records}, key=_stage_order)
        colour_of = {s: colours[i % len(colours)] for i, s in enumerate(names)}
        style_of = {m: styles[i % len(styles)] for i, m in enumerate(ris_metrics)}
    else:
        if kind == "vision":  # the accuracies; box_l1 (a fraction of the image side, not %) is in the final table
            records = [r for r in records if r.metric != "box_l1"]
        names = _ordered_metrics(kind, {r.metric for r in records})
        colour_of = {m: colours[i % len(colours)] for i, m in enumerate(names)}
        style_of = {}
    for (stage, metric, seed, origin), points in _series(records):
        if kind == "ris":
            name = stage_label(stage) + ("" if len(ris_metrics) == 1 else f" {_metric_label(kind, metric)}")
            colour, style = colour_of[stage], style_of[metric]
        else:
            name, colour, style = _metric_label(kind, metric), colour_of[metric], "-"
        steps, values = zip(*points)
        ax.plot(steps, values, style, color=colour, marker="o" if len(points) < 30 else None, markersize=3,
                alpha=1.0 if seed == min(r.seed for r in records) else 0.6,
                label=_line_label(name, seed, origin, n_seeds))


def _draw_loss(ax: Axes, records: list[Record], window: int) -> Axes | None:
    """The training loss on a second y-axis behind `ax`: thin grey lines (one per stage and seed), smoothed over
    `window` steps; None (no axis) without loss records."""
    if not records:
        return None
    twin = ax.twinx()
    for (stage, metric, seed, _), points in _series(records):
        steps, values = zip(*points)
        twin.plot(steps, moving_average(values, window), color="0.55", linewidth=0.8, alpha=0.8,
                  label=f"training {metric} loss (right axis)" if len(twin.get_lines()) == 0 else "_nolegend_")
    twin.set_ylabel(f"training loss (mean of {window} steps)", color="0.4")
    twin.tick_params(axis="y", colors="0.4")
    ax.set_zorder(twin.get_zorder() + 1)  # the held-out lines and the legend in front of the loss
    ax.patch.set_visible(False)
    return twin


def learning_figure(curves: LearningCurves, show_loss: bool = False, ris_metrics: Sequence[str] = ("miou",),
                    loss_window: int = 25, panel_inches: float = 4.2) -> Figure:
    """Held-out metrics vs step, one panel per stage kind present: stage 0 (SAM; its three mIoUs), stage 1 (MLLM;
    answer-token accuracies and the box read off the answer) and the referring-segmentation stages (one line per
    stage folder, i.e. glamm_init and each variant, of each of `ris_metrics`). `show_loss` adds the training loss
    (smoothed) on a second axis. A run without any held-out history gives one panel saying so."""

    held_out = curves.held_out()
    kinds = [k for k in STAGE_KINDS if any(r.kind == k for r in held_out)]
    fig, axes = new_figure(1, max(1, len(kinds)), panel_inches=panel_inches)
    if not kinds:
        blank_panel(axes[0, 0], "no held-out evaluation history in this run\n(trained before held-out diagnostics?)")
        return fig
    for ax, kind in zip(axes[0], kinds):
        _draw_held_out(ax, kind, [r for r in held_out if r.kind == kind], ris_metrics)
        origins = {r.origin for r in held_out if r.kind == kind}
        title = KIND_TITLES[kind] + (" (shipped foundation)" if origins == {SHIPPED} else "")
        ax.set_title(title, fontsize="medium")
        ax.set_xlabel("optimisation step (counted from each stage's start)")
        ax.set_ylabel("held-out figure (%)" if kind != "ris" or len(ris_metrics) > 1
                      else f"held-out {_metric_label(kind, ris_metrics[0])} (%)")
        ax.grid(alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        twin = _draw_loss(ax, [r for r in curves.losses() if r.kind == kind and r.metric == "total"],
                          loss_window) if show_loss else None
        if twin is not None:
            more = twin.get_legend_handles_labels()
            handles, labels = handles + more[0], labels + more[1]
        ax.legend(handles, labels, loc="best", fontsize="x-small", framealpha=0.8)
    return fig


# ---------------------------------------------------------------------------------------------------------------
# the final figures
# ---------------------------------------------------------------------------------------------------------------


def final_rows(curves: LearningCurves) -> list[dict[str, Any]]:
    """One row per (stage, seed, origin) with held-out history: the figures of its last evaluation, the step it
    was taken at and the last logged training loss ("total"), if any; then the one-off evaluations
    (`foundation_eval`: the stage 0-1 weights on this run's own val splits, step empty)."""
    groups: dict[tuple[str, int, str], list[Record]] = {}
    for r in curves.held_out():
        groups.setdefault((r.stage, r.seed, r.origin), []).append(r)
    last_loss: dict[tuple[str, int, str], tuple[int, float]] = {}
    for r in curves.losses():
        key = (r.stage, r.seed, r.origin)
        if r.metric == "total" and r.step >= last_loss.get(key, (-1, 0.0))[0]:
            last_loss[key] = (r.step, r.value)
    rows = []
    for key in sorted(groups, key=lambda k: (_stage_order(k[0]), k[1], k[2])):
        stage, seed, origin = key
        step = max(r.step for r in groups[key])
        row: dict[str, Any] = {"stage": stage_label(stage), "variant": groups[key][0].variant or "", "seed": seed,
                               "origin": origin, "step": step}
        row.update({r.metric: r.value for r in groups[key] if r.step == step})
        if key in last_loss:
            row["loss_total"] = last_loss[key][1]
        rows.append(row)
    return rows + [{k: v for k, v in row.items() if k != "kind"} for row in curves.evaluations]


def final_table(curves: LearningCurves, digits: int = 2) -> Table:
    """Each stage's final held-out figures (the last evaluation, in %) as a `ppcr.report.Table`, metric columns
    grouped by stage kind; the notes say what was left out."""
    rows = final_rows(curves)
    present = {k for row in rows for k in row}
    columns = [Column("stage", "stage"), Column("variant", "variant"), Column("seed", "seed"),
               Column("origin", "from"), Column("step", "step")]
    for kind in STAGE_KINDS:
        metrics = {r.metric for r in curves.held_out() if r.kind == kind}
        metrics |= {k for row in curves.evaluations if row["kind"] == kind for k in row} - set(EVALUATION_KEYS)
        columns += [Column(m, _metric_label(kind, m), (KIND_TITLES[kind],))
                    for m in _ordered_metrics(kind, metrics) if m in present]
    if "loss_total" in present:
        columns.append(Column("loss_total", "last training loss"))
    return Table(
        title="Final held-out figures of every training stage",
        columns=columns, rows=rows, digits=digits,
        caption=(f"The last held-out evaluation of each stage folder of {curves.run_dir} (percent; step = the "
                 "optimisation step it was taken at). Held-out data: a fixed subset of the val splits, not the "
                 "evaluation splits of the tables. Rows from the \"shipped foundation\" come from its "
                 "curves.json (its own val data), except those \"on this run's val\": the weights the run starts from, "
                 "evaluated once on this run's val splits."),
        notes=list(curves.notes),
    )
