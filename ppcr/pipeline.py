"""The whole study at a profile: data -> every variant's stages -> evaluations -> (the book).

    python -m ppcr.pipeline data  --profile demo --out runs/demo
    python -m ppcr.pipeline study --profile demo --out runs/demo
    python -m ppcr.pipeline book  --profile demo --out runs/demo      (what `make book` runs)

`study` writes `<out>/results/<variant>/seed<k>.json` (one `ppcr evaluate` results file each) and
`<out>/study.json`, an index of them with the wall time of every step, so every number in the book traces back to
a file and the command that made it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch

from ppcr.book import add_repository_arguments, build
from ppcr.evaluation.evaluate import evaluate_model, load_for_evaluation
from ppcr.evaluation.foundation_eval import evaluate_foundation, foundation_eval_dir
from ppcr.evaluation.prompt_probe import PROBE_VERSION, run_prompt_probe
from ppcr.provenance import git_commit
from ppcr.recipe.profile import Profile, load_profile, model_variant
from ppcr.training.data import data_root, prepare_data
from ppcr.training.ris import base_weights, sam_cache_for, train_variant
from ppcr.training.stage import stage_summaries


def results_path(out: Path, variant: str, seed: int) -> Path:
    return out / "results" / variant / f"seed{seed}.json"


def run_study(profile: Profile, out: str | Path, resume: bool = True, progress: bool = True) -> dict[str, Any]:
    """Train (cached) and evaluate every variant of the profile for every seed; the oracle from `ppcr`.

    With `profile.seed_workers` > 1 the seeds run in that many processes at once (`_study_seed` in each)."""
    out = Path(out)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    tic = time.perf_counter()
    prepare_data(profile, out, progress)
    timings["data"] = time.perf_counter() - tic
    evaluated = _evaluated(profile)
    workers = min(profile.seed_workers, len(profile.seeds))
    if workers > 1:
        threads = max(1, (os.cpu_count() or 1) // workers)
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_set_threads,
                                 initargs=(threads,)) as pool:
            jobs = [pool.submit(_study_seed, profile, out, seed, resume, progress) for seed in profile.seeds]
            parts = [job.result() for job in jobs]
    else:
        parts = [_study_seed(profile, out, seed, resume, progress) for seed in profile.seeds]
    index: dict[str, dict[str, str]] = {}
    probes: dict[str, str] = {}
    foundation: dict[str, str] = {}
    for seed, part in zip(profile.seeds, parts):
        for variant, rel in part["results"].items():
            index.setdefault(variant, {})[str(seed)] = rel
        if part["prompt_probe"] is not None:
            probes[str(seed)] = part["prompt_probe"]
        if part["foundation_eval"] is not None:
            foundation[str(seed)] = part["foundation_eval"]
        timings.update(part["timings_s"])
    study = {
        "profile": profile.name, "profile_source": profile.source, "preset": profile.preset,
        "profile_config": profile.to_dict(), "git_commit": git_commit(), "seeds": profile.seeds,
        "variants": evaluated, "results": index, "prompt_probe": probes, "foundation_eval": foundation,
        "seed_workers": workers,
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
        "wall_s": round(time.perf_counter() - t0, 2), "stages": stage_summaries(out),
        "command": " ".join(sys.argv),
    }
    (out / "study.json").write_text(json.dumps(study, indent=2, default=str))
    write_benchmarks(out, study)
    return study


def _evaluated(profile: Profile) -> list[str]:
    """The variants a study evaluates: the profile's, the GT-box oracle (ppcr's checkpoint) with ppcr, and the
    variants of the profile's other recipes (`<variant>@<recipe>`)."""
    return (list(profile.variants) + (["gt_box_oracle"] if "ppcr" in profile.variants else [])
            + profile.recipe_variants())


def _set_threads(threads: int) -> None:
    torch.set_num_threads(threads)


def _study_seed(profile: Profile, out: Path, seed: int, resume: bool, progress: bool) -> dict[str, Any]:
    """One seed of the study: every variant trained (cached) and evaluated, then the P_seg_txt probe. Returns the
    results files (relative to `out`), the probe's file and the wall time of each step."""
    results: dict[str, str] = {}
    timings: dict[str, float] = {}
    checkpoints: dict[str, Path] = {}
    foundation = None  # the DONE.json of the stage 0-1 evaluation (relative to `out`)
    if profile.data_kind == "synref" and profile.diag_expressions:  # stages 0-1 on this run's val splits
        tic = time.perf_counter()
        prepare_data(profile, out, progress)
        weights = base_weights(profile, out, seed, resume, progress)
        evaluate_foundation(profile, out, seed, weights)
        foundation = str((foundation_eval_dir(profile, out, seed, weights) / "DONE.json").relative_to(out))
        timings[f"foundation_eval/seed{seed}"] = time.perf_counter() - tic
    for variant in _evaluated(profile):
        tic = time.perf_counter()
        ckpt = checkpoints[variant] = train_variant(profile, out, variant, seed, resume=resume, progress=progress)
        timings[f"train/{variant}/seed{seed}"] = time.perf_counter() - tic
        target = results_path(out, variant, seed)
        tic = time.perf_counter()
        if not _is_current(target, ckpt):
            model = load_for_evaluation(ckpt, model_variant(variant), profile.device)
            evaluate_model(model, data_root(profile, out), profile.datasets, target,
                           batch_size=profile.eval_batch_size, max_expressions=profile.eval_max_expressions,
                           sam_cache=sam_cache_for(model, out, profile), progress=progress,
                           meta={"profile": profile.name, "checkpoint": str(ckpt)})
        timings[f"evaluate/{variant}/seed{seed}"] = time.perf_counter() - tic
        results[variant] = str(target.relative_to(out))
    probe = None
    if "ppcr" in profile.variants and profile.data_kind == "synref":
        tic = time.perf_counter()
        probe = str(run_probe(profile, out, seed, checkpoints["ppcr"], progress).relative_to(out))
        timings[f"prompt_probe/seed{seed}"] = time.perf_counter() - tic
    return {"results": results, "prompt_probe": probe, "foundation_eval": foundation, "timings_s": timings}


def run_probe(profile: Profile, out: Path, seed: int, checkpoint: Path, progress: bool = True) -> Path:
    """`results/prompt_probe/seed<k>.json`: how much of the box ppcr's P_seg_txt holds (ppcr.evaluation.prompt_probe),
    on the expressions of its results files; reused while the checkpoint is unchanged."""
    target = out / "results" / "prompt_probe" / f"seed{seed}.json"
    current = _is_current(target, checkpoint) and \
        json.loads(target.read_text())["meta"].get("version") == PROBE_VERSION
    if not current:
        model = load_for_evaluation(checkpoint, "ppcr", profile.device)
        run_prompt_probe(model, data_root(profile, out), profile.datasets, target,
                         max_expressions=profile.eval_max_expressions, batch_size=profile.eval_batch_size,
                         seed=seed, meta={"checkpoint": str(checkpoint)}, progress=progress)
    return target


def write_benchmarks(out: Path, study: dict[str, Any]) -> Path:
    """`results/benchmarks.json`: train and evaluation throughput and peak memory per stage / variant / seed."""
    rows = []
    for stage in study["stages"]:
        rows.append({"kind": "train", "stage": stage["stage"], "seed": stage["seed"], "steps": stage["steps"],
                     "samples_per_s": round(stage["samples_per_s"], 3), "wall_s": round(stage["wall_s"], 1),
                     "peak_memory_mb": round(stage["peak_memory_mb"], 1)})
    for variant, by_seed in study["results"].items():
        for seed, rel in by_seed.items():
            meta = json.loads((out / rel).read_text())["meta"]
            rows.append({"kind": "evaluate", "variant": variant, "seed": int(seed),
                         "expressions": meta["expressions"], "expressions_per_s": meta["expressions_per_s"],
                         "wall_s": meta["wall_s"], "peak_memory_mb": meta.get("peak_memory_mb"),
                         "device": meta["device"]})
    path = out / "results" / "benchmarks.json"
    path.write_text(json.dumps({"profile": study["profile"], "git_commit": study["git_commit"],
                                "note": "CPU peak memory is the process's peak RSS (ru_maxrss), GPU peak memory is "
                                        "torch.cuda.max_memory_allocated", "rows": rows}, indent=2))
    return path


def _is_current(results: Path, checkpoint: Path) -> bool:
    """A results file is reused when it was made from this checkpoint and is newer than it."""
    if not results.is_file():
        return False
    meta = json.loads(results.read_text()).get("meta", {})
    return meta.get("checkpoint") == str(checkpoint) and results.stat().st_mtime >= \
        (checkpoint / "trainable.safetensors").stat().st_mtime


def build_book(profile: Profile, out: Path, progress: bool = True, repo_url: str | None = None,
               repo_branch: str | None = None) -> int:
    """The notebooks -> Jupyter Book step of `make book`, on the study in `out`."""
    return build(profile, out, progress=progress, repo_url=repo_url, repo_branch=repo_branch)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ppcr.pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("data", "study", "book"))
    parser.add_argument("--profile", default="demo")
    parser.add_argument("--out", help="run folder (default runs/<profile>)")
    parser.add_argument("--data-root", help="root of the REFER layout (the paper profile)")
    parser.add_argument("--llava-path", help="local llava-hf/llava-1.5-7b-hf folder (the paper profile)")
    parser.add_argument("--sam-checkpoint", help="local sam_vit_h_4b8939.pth (the paper profile)")
    parser.add_argument("--foundation", choices=("train", "shipped"),
                        help="stages 0-1: train them in this run, or start from the shipped weights (profile default)")
    parser.add_argument("--no-progress", action="store_true")
    add_repository_arguments(parser)  # book: the repository its buttons link to
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except (ValueError, FileNotFoundError) as err:  # bad input or an unusable checkpoint: one line, no traceback
        if os.environ.get("PPCR_DEBUG"):
            raise
        print(f"python -m ppcr.pipeline {args.what}: error: {err}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    profile = load_profile(args.profile, {"data_root": args.data_root, "foundation": args.foundation})
    for key, value in (("llava_path", args.llava_path), ("sam_checkpoint", args.sam_checkpoint)):
        if value:
            profile.model[key] = str(Path(value).resolve())
    if args.what != "data":
        profile.check_weight_paths()  # before any data or training: the paper profile needs its weights
    out = Path(args.out or f"runs/{profile.name}")
    progress = not args.no_progress
    if args.what == "data":
        print(prepare_data(profile, out, progress))
        return 0
    study = run_study(profile, out, progress=progress)
    print(f"study at profile {profile.name}: {len(study['variants'])} variants x {len(profile.seeds)} seeds in "
          f"{study['wall_s']:.0f} s -> {out}/study.json")
    if args.what == "book":
        return build_book(profile, out, progress, args.repo_url, args.repo_branch)
    return 0


if __name__ == "__main__":
    sys.exit(main())
