"""`ppcr train --profile P --variant V [--seed S] [--out DIR] [--resume]`: train one variant (and the stages it
needs, each cached) at a profile; prints the checkpoint folder."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ppcr.model.config import VARIANTS
from ppcr.recipe.profile import load_profile
from ppcr.training.ris import train_variant


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", required=True, help="smoke | demo | synthetic | paper, or a profile YAML")
    p.add_argument("--variant", required=True,
                   help=f"one of {sorted(VARIANTS)}, or <variant>@<recipe> for a recipe of the profile's `recipes:`")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="run folder holding data, stages and checkpoints (default runs/<profile>)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted stage from its checkpoint")
    p.add_argument("--data-root", help="root of the REFER layout (paper profile)")
    p.add_argument("--llava-path", help="local llava-hf/llava-1.5-7b-hf folder (paper profile)")
    p.add_argument("--sam-checkpoint", help="local sam_vit_h_4b8939.pth (paper profile)")
    p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    overrides = {"data_root": args.data_root}
    profile = load_profile(args.profile, overrides)
    if args.variant not in VARIANTS and args.variant not in profile.recipe_variants():
        raise SystemExit(f"ppcr train: unknown variant {args.variant!r}; choose one of {sorted(VARIANTS)} "
                         f"or {profile.recipe_variants()}")
    for key, value in (("llava_path", args.llava_path), ("sam_checkpoint", args.sam_checkpoint)):
        if value:
            profile.model[key] = str(Path(value).resolve())  # (recorded in the checkpoint: absolute, so it
            # loads from any folder; `ppcr predict/evaluate --llava-path/--sam-checkpoint` where it moved)
    out = Path(args.out or f"runs/{profile.name}")
    ckpt = train_variant(profile, out, args.variant, args.seed, resume=args.resume, progress=not args.no_progress)
    done = json.loads((ckpt.parent / "DONE.json").read_text())
    print(json.dumps({"checkpoint": str(ckpt), "steps": done["steps"], "final_losses": done["final_losses"],
                      "samples_per_s": round(done["samples_per_s"], 2)}, indent=2))
    return 0
