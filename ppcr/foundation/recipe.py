"""Training the shipped foundation: stage 0 (promptable SAM) and stage 1 (the small LLaVA) at the `small` preset
(where the shipped files are looked up and checked: `ppcr.model.shipped`).

The paper starts from pretrained SAM ViT-H and LLaVA-1.5-7B; its own training only adds the prompts, the heads and
LoRA. At small scale nothing pretrained exists, so stages 0-1 make the equivalents. They need a much larger budget
than the CPU demo can spend, so they are trained once with the `foundation` profile (its own SynRef data, a
different generator seed from every other profile, so no demo/val image is ever seen) and shipped in
`ppcr/resources/foundation/` with a manifest:

    python -m ppcr.foundation train            # trains stages 0-1 (cached in runs/foundation), copies, manifests
    python -m ppcr.foundation train --profile foundation_continue   # continues the shipped files' training
    python -m ppcr.foundation verify           # hashes and config match of the shipped files

Profiles with `foundation: shipped` (the demo) start from these files; the others train stages 0-1 themselves.
The manifest records the command, commit, SynRef generator version, configs, steps, wall time, device, validation
figures and the sha256 of every file; `verify_foundation` refuses weights whose configs no longer match the code.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ppcr.data.synref import GENERATOR_VERSION
from ppcr.model.config import preset_config
from ppcr.model.shipped import (FOUNDATION_PROFILE, MANIFEST, REGENERATE, STAGES, FoundationMismatch, config_signature,
                                foundation_dir, sha256, verify_foundation)
from ppcr.provenance import device_name, git_commit, resolve_device
from ppcr.recipe.profile import load_profile
from ppcr.training.data import prepare_data
from ppcr.training.mllm_pretrain import run_mllm_pretrain
from ppcr.training.sam_pretrain import run_sam_pretrain


def train_foundation(out: Path, dest: Path | None = None, profile_name: str = FOUNDATION_PROFILE,
                     progress: bool = True, regenerate: str | None = None) -> dict[str, Any]:
    """Stages 0-1 of `profile_name` (cached under `out`), copied to `dest` with their manifest (`regenerate`: the
    command a reader runs to regenerate this segment, where it is not the command that ran; see `regenerate_hint`).

    A stage whose spec says `init: shipped` starts from the shipped foundation instead of random weights and trains
    its steps on top (`foundation_continue`); with no steps, the shipped file is kept as it is. The new manifest
    records the foundation it continued (`continued_from`), so the lineage of the files stays readable."""
    dest = dest or foundation_dir()
    profile = load_profile(profile_name)
    config = profile.model_config("glamm", 0)
    # a stage with `init: shipped` and no steps keeps the shipped file as it is
    kept = [n for n in STAGES if profile.stage(n).init == "shipped" and profile.stage(n).total_steps(1) == 0]
    continued = [n for n in STAGES if profile.stage(n).init == "shipped" and n not in kept]
    # what those stages start from
    previous = verify_foundation(config, stages=tuple(kept + continued)) if kept or continued else None
    t0 = time.perf_counter()
    prepare_data(profile, out, progress)
    if "sam_pretrain" in kept:
        sam = Path(out) / "shipped" / "sam.safetensors"
        sam.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(foundation_dir() / "sam.safetensors", sam)
    else:
        sam = run_sam_pretrain(profile, out, 0, resume=True, progress=progress)
    if "mllm_pretrain" in kept:
        llava = Path(out) / "shipped" / "llava"
        shutil.rmtree(llava, ignore_errors=True)
        shutil.copytree(foundation_dir() / "llava", llava)
    else:
        llava = run_mllm_pretrain(profile, out, 0, resume=True, progress=progress)
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    shutil.copy2(sam, dest / "sam.safetensors")
    shutil.copytree(llava, dest / "llava")
    stages = {}
    for name, produced in (("sam_pretrain", sam), ("mllm_pretrain", llava)):
        if name in kept:
            stages[name] = {**previous["stages"][name], "kept_from_previous": True}
            continue
        done = json.loads((produced.parent / "DONE.json").read_text())
        stages[name] = {k: done.get(k) for k in ("steps", "resumed_from", "wall_s", "samples_per_s", "final_losses",
                                                 "final_eval", "eval_history")}
        if done.get("vision_pretrain"):  # stage 1a, which stage 1 ran first and recorded
            stages[name]["vision_pretrain"] = done["vision_pretrain"]
        stages[name]["loop_config"] = json.loads((produced.parent / "loop_config.json").read_text())
        if name in continued:
            weights = "sam.safetensors" if name == "sam_pretrain" else "llava/model.safetensors"
            stages[name]["continued_from"] = {
                "sha256": previous["files"][weights],
                "steps": previous["stages"][name]["steps"] + previous["stages"][name].get("steps_before", 0),
                "git_commit": previous["git_commit"], "command": previous["command"]}
            stages[name]["steps_before"] = stages[name]["continued_from"]["steps"]
            if "vision_pretrain" not in stages[name] and previous["stages"][name].get("vision_pretrain"):
                # the continued LLaVA's CLIP tower is still the one that segment's stage 1a trained
                stages[name]["vision_pretrain"] = {**previous["stages"][name]["vision_pretrain"],
                                                   "from_previous_segment": True}
            # the whole curve, earlier segments first, in steps counted from the first segment's start
            earlier = previous["stages"][name].get("eval_history_all") or previous["stages"][name].get("eval_history")
            stages[name]["eval_history_all"] = list(earlier or []) + [
                {**r, "step": r["step"] + stages[name]["steps_before"]} for r in stages[name]["eval_history"] or []]
    files = {str(p.relative_to(dest)): sha256(p) for p in sorted(dest.rglob("*")) if p.is_file()}
    manifest = {
        "what": "stage 0 (SAM) and stage 1 (LLaVA) weights of the small preset, trained on SynRef",
        "command": f"{REGENERATE} --profile {profile_name} --out {out}" if profile_name != FOUNDATION_PROFILE
        else f"{REGENERATE} --out {out}",
        "git_commit": git_commit(), "profile": profile_name,
        "profile_config": profile.to_dict(), "synref_generator_version": GENERATOR_VERSION,
        "config_signature": config_signature(config), "stages": stages,
        "device": device_name(torch.device(resolve_device(profile.device))),
        "torch": torch.__version__, "python": platform.python_version(),
        "wall_s": round(sum((st["wall_s"] or 0.0) + _own_vision_wall(st)
                            for n, st in stages.items() if not st.get("kept_from_previous")), 1),
        "wall_note": ("training seconds of each stage's last uninterrupted segment; a stage with resumed_from > 0 "
                      "was resumed from that step's checkpoint and its earlier segments are not counted; a stage "
                      "kept from or continued from the previous foundation does not count that one's time"),
        "copy_wall_s": round(time.perf_counter() - t0, 1), "files": files,
    }
    if regenerate:
        manifest["regenerate"] = regenerate
    if previous is not None:
        manifest["continued_from"] = {k: previous.get(k) for k in ("command", "regenerate", "git_commit", "profile",
                                                                    "profile_config", "files", "wall_s",
                                                                    "stages", "continued_from")}
    (dest / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
    return manifest


def train_stage(out: Path, stage: str, profile_name: str = FOUNDATION_PROFILE, progress: bool = True) -> Path:
    """One of the foundation's stages alone (cached and resumable under `out`): its weights' path."""
    profile = load_profile(profile_name)
    prepare_data(profile, out, progress)
    run = run_sam_pretrain if stage == "sam_pretrain" else run_mllm_pretrain
    return run(profile, out, 0, resume=True, progress=progress)


def _own_vision_wall(stage: dict[str, Any]) -> float:
    """Stage 1a's seconds when this segment ran it (not when its record was carried from an earlier segment)."""
    vision = stage.get("vision_pretrain") or {}
    return 0.0 if vision.get("from_previous_segment") else float(vision.get("wall_s") or 0.0)


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
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    dest = Path(args.dest) if args.dest else None
    if args.what == "train" and args.stage:
        print(train_stage(Path(args.out), args.stage, args.profile, progress=not args.no_progress))
        return 0
    if args.what == "train":
        manifest = train_foundation(Path(args.out), dest, args.profile, progress=not args.no_progress)
        print(json.dumps({k: manifest[k] for k in ("wall_s", "files")}, indent=2))
        return 0
    try:
        manifest = verify_foundation(preset_config("small"), dest)
    except FoundationMismatch as err:
        print(f"ppcr.foundation: {err}", file=sys.stderr)
        return 2
    print(f"shipped foundation OK: {len(manifest['files'])} files, trained at commit {manifest['git_commit']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
