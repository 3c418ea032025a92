"""Training the shipped foundation: stage 0 (promptable SAM), stage 1a (the CLIP tower alone) and stage 1 (the small
LLaVA) at the `small` preset, from scratch, with one recipe (the `foundation` profile). The shipped files are looked
up and checked by `ppcr.model.shipped`.

The paper starts from pretrained SAM ViT-H and LLaVA-1.5-7B; its own training only adds the prompts, the heads and
LoRA. At small scale nothing pretrained exists, so stages 0-1 make the equivalents. They need a much larger budget
than the CPU demo can spend, so they are trained once (their own SynRef data, a different generator seed from every
other profile, so no demo/val image is ever seen) and shipped in `ppcr/resources/foundation/`:

    python -m ppcr.foundation train            # stages 0, 1a, 1 in order (cached and resumable in runs/foundation),
                                               # then the weights, curves.json and manifest.json into the package
    python -m ppcr.foundation train --device cuda  # the same on a GPU (notes/gpu/ has the device tool's call)
    python -m ppcr.foundation train --stage sam_pretrain    # one stage alone (stages 0 and 1 can run at once)
    python -m ppcr.foundation verify           # hashes, configs and SynRef version against the manifest

Profiles with `foundation: shipped` (the demo) start from these files; the others train stages 0-1 themselves.
`manifest.json` records the command, recipe, commit, SynRef generator version, config signature, hardware, each
stage's steps, wall time and final held-out figures, and the sha256 of every file; the held-out curves are in
`curves.json` beside it. `verify_foundation` refuses weights that no longer match the code.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ppcr.data.synref import GENERATOR_VERSION
from ppcr.model.config import preset_config
from ppcr.model.shipped import (CURVES, FOUNDATION_PROFILE, MANIFEST, REGENERATE, STAGES, FoundationMismatch,
                                config_signature, foundation_dir, sha256, verify_foundation)
from ppcr.provenance import device_name, git_commit, resolve_device
from ppcr.recipe.profile import Profile, load_profile
from ppcr.training.data import prepare_data
from ppcr.training.mllm_pretrain import run_mllm_pretrain
from ppcr.training.sam_pretrain import run_sam_pretrain

# what the manifest keeps of each stage's DONE.json (the curves go to curves.json)
STAGE_FIELDS = ("steps", "resumed_from", "wall_s", "total_wall_s", "device", "git_commit", "samples_per_s",
                "final_losses", "final_eval")


def stage_seconds(record: dict[str, Any]) -> float | None:
    """A stage's training seconds over all its segments: recorded by its checkpoints, or its one segment's when it
    never resumed; None when it resumed from a checkpoint that did not record its time."""
    if record.get("total_wall_s") is not None:
        return float(record["total_wall_s"])
    return float(record["wall_s"]) if not record.get("resumed_from") and record.get("wall_s") is not None else None


def foundation_profile(profile_name: str = FOUNDATION_PROFILE, device: str | None = None) -> Profile:
    """The foundation's profile, on `device` when given (the device is not part of any stage fingerprint: a stage
    trained on a GPU is found by a later run on the CPU, and the other way round)."""
    profile = load_profile(profile_name)
    return profile if device is None else dataclasses.replace(profile, device=device)


def train_foundation(out: Path, dest: Path | None = None, profile_name: str = FOUNDATION_PROFILE,
                     progress: bool = True, device: str | None = None) -> dict[str, Any]:
    """Stages 0, 1a and 1 of `profile_name` from scratch (cached and resumable under `out`), copied to `dest` (default:
    the package's foundation folder) with `curves.json` and `manifest.json`; returns the manifest."""
    dest = dest or foundation_dir()
    profile = foundation_profile(profile_name, device)
    config = profile.model_config("glamm", 0)
    commit = git_commit()  # before the shipped files are replaced (which makes the tree differ from the commit)
    t0 = time.perf_counter()
    prepare_data(profile, out, progress)
    sam = run_sam_pretrain(profile, out, 0, resume=True, progress=progress)
    llava = run_mllm_pretrain(profile, out, 0, resume=True, progress=progress)
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    shutil.copy2(sam, dest / "sam.safetensors")
    shutil.copytree(llava, dest / "llava")
    stages: dict[str, Any] = {}
    curves: dict[str, list[dict[str, float]]] = {}
    for name, produced in (("sam_pretrain", sam), ("mllm_pretrain", llava)):
        done = json.loads((produced.parent / "DONE.json").read_text())
        for stage, record in ((name, done), ("vision_pretrain", done.get("vision_pretrain"))):
            if record:  # stage 1a: recorded by stage 1, which ran it first
                stages[stage] = {k: record.get(k) for k in STAGE_FIELDS}
                curves[stage] = record.get("eval_history") or []
    (dest / CURVES).write_text(json.dumps(curves, indent=1))
    seconds = [stage_seconds(st) for st in stages.values()]
    files = {str(p.relative_to(dest)): sha256(p) for p in sorted(dest.rglob("*")) if p.is_file()}
    manifest = {
        "what": "stage 0 (SAM), stage 1a (CLIP tower) and stage 1 (LLaVA) of the small preset, trained from scratch "
                "on SynRef with one recipe",
        "command": REGENERATE if profile_name == FOUNDATION_PROFILE else f"{REGENERATE} --profile {profile_name}",
        "git_commit": commit,  # the code that assembled the files; each stage's own: the code that trained it
        "profile": profile_name, "recipe": profile.to_dict(),
        "data": {"datasets": [asdict(d) for d in profile.datasets], "data_seed": profile.data_seed,
                 "image_size": profile.image_size},
        "synref_generator_version": GENERATOR_VERSION, "config_signature": config_signature(config),
        "stages": stages, "curves": CURVES,
        # the machine that assembled the files; each stage's own `device` says what trained it (empty: not recorded)
        "device": device_name(torch.device(resolve_device(profile.device))), "cpu_count": os.cpu_count(),
        "platform": platform.platform(), "torch": torch.__version__, "python": platform.python_version(),
        "wall_s": None if None in seconds else round(sum(seconds), 1),  # type: ignore[arg-type]
        "wall_note": ("the sum of every stage's training seconds over all its segments (a stage's wall_s is its last "
                      "segment's, total_wall_s all of them; null where a stage resumed from a checkpoint that did not "
                      "record its time); stages 0 and 1 may have run at the same time (`--stage`)"),
        "copy_wall_s": round(time.perf_counter() - t0, 1), "files": files,
    }
    (dest / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
    return manifest


def train_stage(out: Path, stage: str, profile_name: str = FOUNDATION_PROFILE, progress: bool = True,
                device: str | None = None) -> Path:
    """One of the foundation's stages alone (cached and resumable under `out`): its weights' path."""
    profile = foundation_profile(profile_name, device)
    prepare_data(profile, out, progress)
    run = run_sam_pretrain if stage == "sam_pretrain" else run_mllm_pretrain
    return run(profile, out, 0, resume=True, progress=progress)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ppcr.foundation", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("train", "verify"))
    parser.add_argument("--out", default="runs/foundation", help="where stages 0-1 train (cached, resumable)")
    parser.add_argument("--dest", help="where the weights go (default: the package's resources/foundation)")
    parser.add_argument("--profile", default=FOUNDATION_PROFILE)
    parser.add_argument("--stage", choices=STAGES,
                        help="train only this stage (cached in --out; a later `train` without --stage finds it): "
                             "stages 0 and 1 are independent, so on a CPU they can run at once, a thread each")
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"),
                        help="where to train (default: the profile's, cpu); stages are cached across devices")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    dest = Path(args.dest) if args.dest else None
    if args.what == "train" and args.stage:
        print(train_stage(Path(args.out), args.stage, args.profile, progress=not args.no_progress, device=args.device))
        return 0
    if args.what == "train":
        manifest = train_foundation(Path(args.out), dest, args.profile, progress=not args.no_progress,
                                    device=args.device)
        print(json.dumps({k: manifest[k] for k in ("wall_s", "files")}, indent=2))
        return 0
    try:
        manifest = verify_foundation(load_profile(args.profile).model_config("glamm", 0), dest)
    except FoundationMismatch as err:
        print(f"ppcr.foundation: {err}", file=sys.stderr)
        return 2
    print(f"shipped foundation OK: {len(manifest['files'])} files, assembled at commit {manifest['git_commit']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
