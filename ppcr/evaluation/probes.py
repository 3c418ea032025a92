"""The probes and measurements `notes/learning.md` cites, on a study's run folder: what limits ppcr's box.

    python -m ppcr.evaluation.probes box-errors RUN_DIR [--split synref/val]
    python -m ppcr.evaluation.probes state-probe RUN_DIR --model {foundation,start,trained} --variant ppcr --seed 0
    python -m ppcr.evaluation.probes answer-agreement RUN_DIR [--variants ppcr spatial_re ...]
    python -m ppcr.evaluation.probes where-breakdown RUN_DIR [--foundation-seed 0]
    python -m ppcr.evaluation.probes soft-token-scale RUN_DIR --variant ppcr --seed 0 [--model start]

Each subcommand prints its figures and, with `--json PATH`, writes them. `--profile` (default `demo`) names the
profile the run was made with (its datasets, evaluation subset and stages 0-1).

- `box_error_rows` (box-errors): from the per-expression rows of the results files, where each variant's predicted
  boxes go wrong: the object (centre outside the ground-truth box) or the extent (width and height ratios).
- `run_state_probe` (state-probe): an F_Map-shaped MLP (`ppcr.evaluation.prompt_probe.fit_box_probe`) fitted by L1
  on one internal state of a frozen model, for train expressions, then scored on the first val expressions of
  each suite: h[SEG] (the LLM's `[SEG]` state), P_seg_txt = text_hidden_fcs(h[SEG]) and branch B's query state
  P_seg_box, beside the model's own F_Map box. The model is the foundation before stage 2 (`foundation`), the
  model stage 3 starts from (`start`: stage 2's carried weights, branch B fresh) or a finished stage (`trained`).
  How alike the states are across expressions comes with it (`state_spread`).
- `run_answer_agreement` (answer-agreement): whether a variant's box is right (IoU >= 0.5) where the foundation
  LLaVA's own decoded "where" answer is right, and where it is wrong.
- `run_where_breakdown` (where-breakdown): which expressions the foundation LLaVA's own decoded "where" answer gets
  right, by the target's box side in vision tokens, whether the expression names the target's colour (SynRef) and
  occlusion: what a better foundation must learn.
- `soft_token_scale` (soft-token-scale): the length of the `[P_SEG]` soft token against the LLM's word embeddings
  and the projected image features.

Everything here reads models and files; nothing trains but the probes, except that the `foundation`, `start` and
answer-agreement models need the run's stages 0-1 (`base_weights`: shipped, or trained and cached in the run).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset, Subset
from tqdm.auto import tqdm

from ppcr.data.dataset import ReferSegDataset
from ppcr.data.refer import Refer
from ppcr.evaluation.foundation_eval import WHERE_GROUPS, group_shares, where_answer_ious, where_groups
from ppcr.evaluation.prompt_probe import fit_box_probe
from ppcr.metrics import box_centre_in, box_figures
from ppcr.model.heads import order_box
from ppcr.model.modeling_ppcr import PPCRModel, image_prep_for
from ppcr.model.tokenizer import load_tokenizer
from ppcr.recipe.profile import Profile, load_profile
from ppcr.training.data import data_root
from ppcr.training.diagnostics import batches
from ppcr.training.mllm_pretrain import MllmPretrainer, WithTargetAttributes, normalised_boxes
from ppcr.training.ris import base_weights, ris_start_model
from ppcr.training.stage import StageDir, stage_dirs

STATES = ("h_seg", "p_seg_txt", "p_seg_box")  # what `state-probe` can read, in the order of the pipeline
MODEL_SOURCES = ("foundation", "start", "trained")


def first(ds: Dataset, n: int | None) -> Dataset:
    """The first `n` items of `ds` (all of them for None): the expressions a results file holds."""
    return ds if n is None else Subset(ds, range(min(n, len(ds))))


def normalised_gt_boxes(batch: dict[str, Any]) -> torch.Tensor:
    """(B, 4) the batch's ground-truth xyxy boxes divided by their image's width / height."""
    return normalised_boxes(batch, [True] * len(batch["box"]))


# --------------------------------------------------------------------------------------------------------------
# box errors: the results files' predicted boxes against the ground truth
# --------------------------------------------------------------------------------------------------------------


def box_error_rows(run_dir: str | Path, split: str = "synref/val") -> list[dict[str, Any]]:
    """One row per (variant, seed) results file of `RUN_DIR/results/<variant>/seed<k>.json` with a predicted box on
    `split` (the GT-box oracle skipped: its box is ppcr's): the share of predicted box centres inside the GT box
    (%), the median distance between the two centres (as a fraction of the image's longer side), the median width
    and height ratios (predicted / GT), the mean box IoU and mask mIoU (%)."""
    rows = []
    for path in sorted(Path(run_dir, "results").glob("*/seed*.json")):
        preds = json.loads(path.read_text())["rows"].get(split, [])
        if not preds or preds[0].get("pred_box") is None or path.parent.name == "gt_box_oracle":
            continue
        dist, w_ratio, h_ratio = [], [], []
        for r in preds:
            (p0, p1, p2, p3), (g0, g1, g2, g3) = r["pred_box"], r["gt_box"]
            side = max(r["mask_rle"]["size"])  # the image's longer side, in pixels
            dist.append((((p0 + p2 - g0 - g2) / 2) ** 2 + ((p1 + p3 - g1 - g3) / 2) ** 2) ** 0.5 / side)
            w_ratio.append((p2 - p0) / max(g2 - g0, 1e-6))
            h_ratio.append((p3 - p1) / max(g3 - g1, 1e-6))
        rows.append({"variant": path.parent.name, "seed": int(path.stem.removeprefix("seed")), "n": len(preds),
                     "centre_in_gt": 100 * statistics.fmean(box_centre_in(r["pred_box"], r["gt_box"]) for r in preds),
                     "centre_dist": statistics.median(dist), "w_ratio": statistics.median(w_ratio),
                     "h_ratio": statistics.median(h_ratio),
                     "box_iou": 100 * statistics.fmean(r["box_iou"] for r in preds),
                     "miou": 100 * statistics.fmean(r["iou"] for r in preds)})
    return rows


def box_errors_table(rows: Sequence[dict[str, Any]]) -> str:
    """`box_error_rows` as the markdown table of notes/learning.md."""
    lines = ["| variant, seed | box centre in the GT box % | median centre distance | median w / h ratio | "
             "box IoU % | mIoU % |", "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['variant']}, {r['seed']} | {r['centre_in_gt']:.1f} | {r['centre_dist']:.3f} | "
              f"{r['w_ratio']:.2f} / {r['h_ratio']:.2f} | {r['box_iou']:.1f} | {r['miou']:.1f} |" for r in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# the models a probe reads
# --------------------------------------------------------------------------------------------------------------


def stage_checkpoint(run_dir: str | Path, seed: int, stage: str) -> Path:
    """The `model` folder of the finished stage `stage` (`glamm_init` or a variant) of `seed` in a run folder; of
    several cached copies, the one written last."""
    found = [s for s in stage_dirs(run_dir) if s.stage == stage and s.seed == seed and s.finished
             and (s.path / "model").is_dir()]
    if not found:
        have = sorted({f"seed{s.seed}/{s.stage}" for s in stage_dirs(run_dir) if s.finished})
        raise FileNotFoundError(f"no finished stage {stage!r} of seed {seed} under {Path(run_dir) / 'stages'} "
                                f"(finished: {', '.join(have) or 'none'})")
    return max(found, key=StageDir.modified).path / "model"


def probed_model(profile: Profile, run_dir: str | Path, source: str, variant: str, seed: int) -> PPCRModel:
    """The model a probe reads, in eval mode: `foundation` (`variant` built on the run's stages 0-1, nothing of
    stages 2-3), `start` (the model stage 3 of `variant` starts from, `ris_start_model` on the run's `glamm_init`)
    or `trained` (the finished stage named `variant`: a variant's stage 3, or `glamm_init`)."""
    run = Path(run_dir)
    if source == "trained":
        return PPCRModel.from_pretrained(stage_checkpoint(run, seed, variant)).eval()
    if source not in MODEL_SOURCES:
        raise ValueError(f"model source must be one of {MODEL_SOURCES}, not {source!r}")
    weights = base_weights(profile, run, seed, resume=True, progress=False)
    init = stage_checkpoint(run, seed, "glamm_init") if source == "start" else None
    return ris_start_model(profile, variant, seed, weights, init).eval()


# --------------------------------------------------------------------------------------------------------------
# state-probe: how much of the box a state holds
# --------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def probe_states(model: PPCRModel, data: Dataset, batch_size: int = 32, progress: bool = False,
                 desc: str = "states") -> dict[str, torch.Tensor]:
    """The internal states of every expression of `data` (evaluation mode, fixed templates):
    h_seg (n, d), p_seg_txt (n, C), for a variant with branch B also p_seg_box (n, d) and own_box (n, 4, its F_Map
    box, normalised xyxy), and box (n, 4), the ground-truth boxes normalised by the image size."""
    model.eval()
    out: dict[str, list[torch.Tensor]] = {"h_seg": [], "p_seg_txt": [], "box": []}
    spatial = model.config.spec.uses_spatial_step
    if spatial:
        out.update(p_seg_box=[], own_box=[])
    total = (len(data) + batch_size - 1) // batch_size
    for batch in tqdm(batches(data, batch_size), total=total, desc=desc, disable=not progress, dynamic_ncols=True):
        features, index = model.clip_features(batch)  # (N, N_img, d), (B,)
        h_seg, _, _ = model.semantic_hidden(features, index, batch["expression"])  # (B, d)
        p_seg_txt = model.text_hidden_fcs(h_seg.float())  # (B, C), as `semantic_step`
        out["h_seg"].append(h_seg.float().cpu())
        out["p_seg_txt"].append(p_seg_txt.float().cpu())
        out["box"].append(normalised_gt_boxes(batch))
        if spatial:
            p_seg_box, box_raw, _, _, _ = model.spatial_step(features, index, batch["expression"], p_seg_txt, None)
            out["p_seg_box"].append(p_seg_box.float().cpu())  # (B, d)
            out["own_box"].append(order_box(box_raw).float().cpu())  # (B, 4)
    return {k: torch.cat(v) for k, v in out.items()}


def state_spread(states: torch.Tensor) -> dict[str, float]:
    """(n, D) states -> their mean length, mean pairwise cosine similarity (the diagonal included) and the share
    of their mean square that lies off their mean (0: every expression gives the same state)."""
    x = states.float()
    unit = torch.nn.functional.normalize(x, dim=-1)
    return {"norm": float(x.norm(dim=-1).mean()), "pairwise_cos": float((unit @ unit.T).mean()),
            "off_mean_share": float(((x - x.mean(0)) ** 2).sum(-1).mean() / (x ** 2).sum(-1).mean().clamp_min(1e-12))}


def run_state_probe(model: PPCRModel, root: str | Path, datasets: Sequence[Any], states: Sequence[str] = STATES,
                    train_per_dataset: int = 800, max_expressions: int | None = 150, steps: int = 1000,
                    batch_size: int = 32, seed: int = 0, progress: bool = False,
                    meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Fit one probe per state in `states` on the first `train_per_dataset` train expressions of every dataset (a
    `DataSpec`) and score each on the first `max_expressions` of each val split, beside the model's own box.

    Returns {"splits": {"<dataset>/val": {state: box_figures, "own_box": box_figures}}, "spread": {"<dataset>/val":
    {state: state_spread}}, "meta": ...}. A state the model does not have (P_seg_box of `glamm`) is skipped."""
    unknown = set(states) - set(STATES)
    if unknown:
        raise ValueError(f"unknown states {sorted(unknown)}; choose from {STATES}")
    t0 = time.perf_counter()
    prep = model.image_prep()
    refers = {spec.name: Refer(root, spec.name, spec.split_by) for spec in datasets}
    train = ConcatDataset([first(ReferSegDataset(refers[spec.name], "train", prep), train_per_dataset)
                           for spec in datasets])
    x = probe_states(model, train, batch_size, progress, "states (train)")
    states = [s for s in states if s in x]
    probes = {s: fit_box_probe(x[s], x["box"], steps=steps, seed=seed) for s in states}
    splits: dict[str, Any] = {}
    spread: dict[str, Any] = {}
    for spec in datasets:
        if "val" not in spec.eval_splits:
            continue
        key = f"{spec.name}/val"
        v = probe_states(model, first(ReferSegDataset(refers[spec.name], "val", prep), max_expressions),
                         batch_size, progress, f"states ({key})")
        with torch.no_grad():
            splits[key] = {s: box_figures(probes[s](v[s]), v["box"]) for s in states}
        if "own_box" in v:
            splits[key]["own_box"] = box_figures(v["own_box"], v["box"])
        spread[key] = {s: state_spread(v[s]) for s in states}
    return {"splits": splits, "spread": spread, "meta": {
        "variant": model.config.variant, "states": states, "train_expressions": len(train), "steps": steps,
        "seed": seed, "wall_s": round(time.perf_counter() - t0, 2), **(meta or {})}}


# --------------------------------------------------------------------------------------------------------------
# answer-agreement: the readers against the LLaVA's own "where" answer
# --------------------------------------------------------------------------------------------------------------


def foundation_mllm(profile: Profile, weights: dict[str, str | None], seed: int = 0) -> MllmPretrainer:
    """The run's stage-1 LLaVA (`base_weights`) as stage 1 reads it, in eval mode."""
    config = profile.model_config("glamm", seed).replace(llava_path=weights["llava_path"])
    return MllmPretrainer(config, load_tokenizer(weights["tokenizer_path"])).eval()


def agreement(llava_right: np.ndarray, variant_right: np.ndarray) -> dict[str, float | int | None]:
    """(n,) bool each -> the share (%) of expressions the LLaVA and the variant get right, and the variant's share
    right where the LLaVA is right and where it is wrong (None where there is no such expression)."""
    a, b = np.asarray(llava_right, dtype=bool), np.asarray(variant_right, dtype=bool)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"need two (n,) arrays, got {a.shape} and {b.shape}")

    def share(x: np.ndarray) -> float | None:
        return 100.0 * float(x.mean()) if len(x) else None

    return {"n": int(len(a)), "llava_right": share(a), "variant_right": share(b),
            "right_where_llava_right": share(b[a]), "right_where_llava_wrong": share(b[~a])}


def run_answer_agreement(profile: Profile, run_dir: str | Path, variants: Sequence[str], foundation_seed: int = 0,
                         batch_size: int = 32, threshold: float = 0.5) -> dict[str, Any]:
    """For the val expressions of the results files (`RUN_DIR/results/<variant>/seed<k>.json`, every seed there):
    whether each variant's box is right (IoU >= `threshold`) where the run's foundation LLaVA
    (`base_weights` of `foundation_seed`) decodes a right "where" box itself, and where it does not.

    Returns {"llava": {"<dataset>/val": % right}, "variants": {variant: {"seed<k>": {"<dataset>/val":
    agreement}}}}."""
    run = Path(run_dir)
    files = {v: sorted((run / "results" / v).glob("seed*.json")) for v in variants}
    if missing := [v for v, f in files.items() if not f]:
        raise FileNotFoundError(f"no results files for {missing} under {run / 'results'}")
    results = {(v, p.stem): json.loads(p.read_text())["rows"] for v, f in files.items() for p in f}
    mllm = foundation_mllm(profile, base_weights(profile, run, foundation_seed, resume=True, progress=False),
                           foundation_seed)
    prep = image_prep_for(mllm.config)
    out: dict[str, Any] = {"llava": {}, "variants": {v: {} for v in variants}}
    root = data_root(profile, run)
    for spec in profile.datasets:
        key = f"{spec.name}/val"
        rows = {k: r[key] for k, r in results.items() if r.get(key)}
        if not rows:
            continue
        ds = ReferSegDataset(Refer(root, spec.name, spec.split_by), "val", prep)
        n = max(len(r) for r in rows.values())
        sent_ids = [ds.meta(i)["sent_id"] for i in range(min(n, len(ds)))]
        llava = where_answer_ious(mllm, first(WithTargetAttributes(ds), n), batch_size) >= threshold
        out["llava"][key] = 100.0 * float(llava.mean())
        for (variant, seed), r in rows.items():
            if [row["sent_id"] for row in r] != sent_ids[:len(r)]:
                raise ValueError(f"{variant}/{seed} {key}: its rows are not the split's first {len(r)} expressions")
            if r[0].get("box_iou") is None:
                continue  # a variant without a box (glamm)
            right = np.array([row["box_iou"] for row in r]) >= threshold
            out["variants"][variant].setdefault(seed, {})[key] = agreement(llava[:len(r)], right)
    return out


# --------------------------------------------------------------------------------------------------------------
# where-breakdown: which expressions the foundation LLaVA's own "where" answer gets right
# --------------------------------------------------------------------------------------------------------------


def run_where_breakdown(profile: Profile, run_dir: str | Path, foundation_seed: int = 0, batch_size: int = 32,
                        threshold: float = 0.5) -> dict[str, Any]:
    """The run's foundation LLaVA (`base_weights` of `foundation_seed`) decodes its own "where" box for the first
    `profile.eval_max_expressions` val expressions of each suite (every one with None: the expressions of the
    results files and of `foundation_eval`'s `where_answer`); returns {"<dataset>/val": `group_shares`} with an
    answer right at IoU >= `threshold`."""
    run = Path(run_dir)
    mllm = foundation_mllm(profile, base_weights(profile, run, foundation_seed, resume=True, progress=False),
                           foundation_seed)
    prep = image_prep_for(mllm.config)
    grid = mllm.config.vision.patch_grid
    out: dict[str, Any] = {}
    for spec in profile.datasets:
        ds = ReferSegDataset(Refer(data_root(profile, run), spec.name, spec.split_by), "val", prep)
        n = min(profile.eval_max_expressions or len(ds), len(ds))
        right = where_answer_ious(mllm, first(WithTargetAttributes(ds), n), batch_size) >= threshold
        out[f"{spec.name}/val"] = group_shares(right, [where_groups(ds, i, grid) for i in range(n)])
    return out


# --------------------------------------------------------------------------------------------------------------
# soft-token-scale: how long the [P_SEG] soft token is beside what else the LLM reads
# --------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def soft_token_scale(model: PPCRModel, data: Dataset, batch_size: int = 32) -> dict[str, float]:
    """Mean lengths over the expressions of `data`: P_seg_txt (C), the soft token seg_to_llm(P_seg_txt) (d per
    `[P_SEG]` slot), the projected image features (d per image token) and the LLM's input-embedding rows (d, the
    words), with the soft token's mean pairwise cosine similarity across expressions (its K slots side by side)."""
    model.eval()
    p_norm, soft_norm, image_norm, softs = [], [], [], []
    for batch in batches(data, batch_size):
        features, index = model.clip_features(batch)  # (N, N_img, d), (B,)
        p_seg_txt, _, _ = model.semantic_step(features, index, batch["expression"], None)  # (B, C)
        soft = model.seg_to_llm(p_seg_txt).float()  # (B, K, d)
        p_norm.append(p_seg_txt.float().norm(dim=-1).cpu())
        soft_norm.append(soft.norm(dim=-1).flatten().cpu())
        image_norm.append(features.float().norm(dim=-1).flatten().cpu())
        softs.append(soft.flatten(1).cpu())  # (B, K*d)
    embeddings = model.mllm.llava.get_input_embeddings().weight.float()  # (V, d)
    return {"n": int(sum(len(p) for p in p_norm)), "p_seg_txt_norm": float(torch.cat(p_norm).mean()),
            "soft_token_norm": float(torch.cat(soft_norm).mean()),
            "soft_token_pairwise_cos": state_spread(torch.cat(softs))["pairwise_cos"],
            "image_feature_norm": float(torch.cat(image_norm).mean()),
            "embedding_row_norm": float(embeddings.norm(dim=-1).mean())}


# --------------------------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------------------------


def _model_args(p: argparse.ArgumentParser, default_source: str) -> None:
    p.add_argument("--model", choices=MODEL_SOURCES, default=default_source,
                   help="foundation: stages 0-1 only; start: where stage 3 begins; trained: a finished stage")
    p.add_argument("--variant", default="ppcr", help="the variant (with --model trained also glamm_init)")
    p.add_argument("--seed", type=int, default=0, help="the training seed whose stages are read")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ppcr.evaluation.probes", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="probe", required=True)

    def probe(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("run_dir", type=Path, help="a study's run folder (e.g. runs/demo)")
        p.add_argument("--profile", default="demo", help="the profile the run was made with (name or YAML)")
        p.add_argument("--json", type=Path, help="also write the figures to this JSON file")
        p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
        return p

    p = probe("box-errors", "where the results files' predicted boxes go wrong: the object or the extent")
    p.add_argument("--split", default="synref/val", help="<dataset>/<split> of the results rows")

    p = probe("state-probe", "an F_Map-shaped probe of the box on h[SEG], P_seg_txt and P_seg_box")
    _model_args(p, "trained")
    p.add_argument("--states", nargs="+", choices=STATES, default=list(STATES))
    p.add_argument("--train-per-dataset", type=int, default=800, help="train expressions per suite (default 800)")
    p.add_argument("--val", type=int, default=150, help="first val expressions per suite (default 150)")
    p.add_argument("--steps", type=int, default=1000, help="the probe's Adam steps of 64 (default 1000)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--no-progress", action="store_true")

    p = probe("answer-agreement", "each variant's box against the foundation LLaVA's own decoded 'where' box")
    p.add_argument("--variants", nargs="+", default=["ppcr", "spatial_re"])
    p.add_argument("--foundation-seed", type=int, default=0, help="the seed whose stages 0-1 are read")
    p.add_argument("--batch-size", type=int, default=32)

    p = probe("where-breakdown", "which expressions the foundation LLaVA's own decoded 'where' box gets right")
    p.add_argument("--foundation-seed", type=int, default=0, help="the seed whose stages 0-1 are read")
    p.add_argument("--batch-size", type=int, default=32)

    p = probe("soft-token-scale", "the [P_SEG] soft token's length against the word embeddings and image features")
    _model_args(p, "trained")
    p.add_argument("--dataset", help="the suite whose val expressions are read (default the profile's first)")
    p.add_argument("--expressions", type=int, default=32, help="first val expressions (default 32)")
    return parser


def _print_state_probe(result: dict[str, Any]) -> None:
    print("| split | read from | box IoU % | acc@0.5 % | centre in GT % | norm | pairwise cos | off-mean share |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for key, figures in result["splits"].items():
        for state, f in figures.items():
            s = result["spread"][key].get(state)
            spread = "– | – | –" if s is None else \
                f"{s['norm']:.3g} | {s['pairwise_cos']:.3f} | {s['off_mean_share']:.3f}"
            print(f"| {key} | {state} | {f['box_iou']:.1f} | {f['box_acc50']:.1f} | {f['box_centre_in_gt']:.1f} | "
                  f"{spread} |")


def _print_agreement(result: dict[str, Any]) -> None:
    print("LLaVA's decoded box right (IoU >= 0.5): " +
          ", ".join(f"{k} {v:.1f} %" for k, v in result["llava"].items()))
    print("| variant, seed | split | right % | right where the LLaVA is right % | where it is wrong % |")
    print("| --- | --- | --- | --- | --- |")

    def pct(v: float | None) -> str:
        return "–" if v is None else f"{v:.1f}"

    for variant, seeds in result["variants"].items():
        for seed, splits in seeds.items():
            for key, a in splits.items():
                print(f"| {variant}, {seed} | {key} | {pct(a['variant_right'])} | "
                      f"{pct(a['right_where_llava_right'])} | {pct(a['right_where_llava_wrong'])} |")


def _print_where_breakdown(result: dict[str, Any]) -> None:
    print("The LLaVA's decoded box right (IoU >= 0.5), % (n)")
    print("| split | all | " + " | ".join(label for labels in WHERE_GROUPS.values() for label in labels) + " |")
    print("| --- " * (2 + sum(map(len, WHERE_GROUPS.values()))) + "|")
    for key, shares in result.items():
        cells = [shares.get(by, {}).get(label) for by, labels in WHERE_GROUPS.items() for label in labels]
        print(f"| {key} | " + " | ".join("–" if c is None else f"{c['right']:.1f} ({c['n']})"
                                         for c in [shares.get("all"), *cells]) + " |")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    profile = load_profile(args.profile)
    result: Any
    if args.probe == "box-errors":
        result = box_error_rows(args.run_dir, args.split)
        print(box_errors_table(result))
    elif args.probe == "state-probe":
        model = probed_model(profile, args.run_dir, args.model, args.variant, args.seed)
        result = run_state_probe(model, data_root(profile, args.run_dir), profile.datasets, args.states,
                                 args.train_per_dataset, args.val, args.steps, args.batch_size,
                                 progress=not args.no_progress,
                                 meta={"run": str(args.run_dir), "model": args.model, "stage": args.variant,
                                       "training_seed": args.seed})
        _print_state_probe(result)
    elif args.probe == "answer-agreement":
        result = run_answer_agreement(profile, args.run_dir, args.variants, args.foundation_seed, args.batch_size)
        _print_agreement(result)
    elif args.probe == "where-breakdown":
        result = run_where_breakdown(profile, args.run_dir, args.foundation_seed, args.batch_size)
        _print_where_breakdown(result)
    else:  # soft-token-scale
        model = probed_model(profile, args.run_dir, args.model, args.variant, args.seed)
        spec = next((s for s in profile.datasets if s.name == (args.dataset or profile.datasets[0].name)), None)
        if spec is None:
            raise SystemExit(f"profile {profile.name!r} has no dataset {args.dataset!r}")
        ds = ReferSegDataset(Refer(data_root(profile, args.run_dir), spec.name, spec.split_by), "val",
                             model.image_prep())
        result = soft_token_scale(model, first(ds, args.expressions))
        print(" ".join(f"{k} {v:.4g}" for k, v in result.items()))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
