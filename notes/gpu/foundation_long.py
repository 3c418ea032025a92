"""Continue the shipped foundation's stage 1 for as many steps as fit a time budget (one device call).

    python notes/gpu/foundation_long.py --budget-s 420 --out /tmp/fl --ret $OUT

1. A short timing segment (`--probe-steps`, default 60) of `foundation_gpu.yaml` measures samples per second on
   this machine (its stage folder is separate and not shipped).
2. A copy of the profile with `steps` = what fits `--budget-s` at that speed (minus the held-out diagnostics) is
   written next to the run and trained with `ppcr.foundation.train_foundation` into `<out>/dest`: the new
   foundation folder with its manifest (command, commit, device, curves, sha256 of every file).
3. For the device tool, which returns at most 8 files of 16 MiB: the folder, the long profile and `summary.json`
   go into `--ret` as one tar in 15-MiB parts. `python notes/gpu/foundation_long.py --join RET --dest DIR`
   rebuilds the folder here (the profile and summary beside it) and checks every sha256 against the manifest.

Nothing here is GPU-specific: `--device cpu --budget-s 60` runs the same path on a CPU (the test of this script).
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
import tarfile
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
PART = 15 * 2**20


def _profile_copy(base: Path, dest: Path, steps: int, device: str | None, name: str, curve: bool) -> Path:
    """`base` with `steps` stage-1 steps; with `curve`, diagnostics and checkpoints 6 times, else at the end only."""
    raw = yaml.safe_load(base.read_text())
    raw["name"] = name
    raw["stages"]["mllm_pretrain"]["steps"] = steps
    raw["diag_every"] = max(steps // 6, 1) if curve else 0
    raw["checkpoint_every"] = max(steps // 6, 1) if curve else steps
    if device:
        raw["device"] = device
    dest.write_text(yaml.safe_dump(raw, sort_keys=False))
    return dest


def _pregenerate(out: Path, profile: Path) -> None:
    """The profile's SynRef suites with one generator process per core but two (`prepare_data`'s default is 2),
    so the device's time goes to training."""
    import os

    from ppcr.recipe.profile import load_profile
    from ppcr.training.data import prepare_data

    prepare_data(load_profile(str(profile)), out, progress=False, workers=max(2, (os.cpu_count() or 2) - 2))


def _speed(out: Path, profile: Path) -> float:
    """samples/s of the timing segment, from its stage's DONE.json."""
    from ppcr.recipe.profile import load_profile
    from ppcr.training.data import prepare_data
    from ppcr.training.mllm_pretrain import run_mllm_pretrain

    prof = load_profile(str(profile))
    prepare_data(prof, out, progress=False)
    llava = run_mllm_pretrain(prof, out, 0, resume=True, progress=False)
    done = json.loads((llava.parent / "DONE.json").read_text())
    return float(done["samples_per_s"])


def split_for_return(folder: Path, ret: Path, extra: list[Path] = ()) -> list[str]:
    """`folder` (and `extra` files) as one tar in parts of at most 15 MiB in `ret`: the device tool returns at most
    8 files of 16 MiB. Returns the part names."""
    ret.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(folder, arcname="dest")
        for path in extra:
            tar.add(path, arcname=path.name)
    data = buf.getvalue()
    names = [f"foundation.tar.part{i}" for i in range((len(data) + PART - 1) // PART)]
    for i, name in enumerate(names):
        (ret / name).write_bytes(data[i * PART:(i + 1) * PART])
    return names


def join_returned(ret: Path, dest: Path) -> dict:
    """The inverse of `split_for_return` (the folder into `dest`, the extra files beside it), then every sha256
    checked against the rebuilt folder's manifest."""
    from ppcr.model.shipped import MANIFEST, sha256

    parts = sorted(ret.glob("foundation.tar.part*"), key=lambda p: int(p.name.rsplit("part", 1)[1]))
    data = b"".join(p.read_bytes() for p in parts)
    unpacked = dest.parent / f"{dest.name}.unpacked"
    with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
        tar.extractall(unpacked, filter="data")
    if dest.exists():
        shutil.rmtree(dest)
    shutil.move(str(unpacked / "dest"), dest)
    for path in unpacked.iterdir():
        shutil.move(str(path), dest.parent / path.name)
    unpacked.rmdir()
    manifest = json.loads((dest / MANIFEST).read_text())
    bad = [rel for rel, digest in manifest["files"].items() if sha256(dest / rel) != digest]
    if bad:
        raise SystemExit(f"sha256 mismatch after joining: {bad}")
    return manifest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget-s", type=float, default=420.0, help="seconds for the long segment's training")
    ap.add_argument("--probe-steps", type=int, default=60)
    ap.add_argument("--out", type=Path, default=Path("runs/foundation_gpu"))
    ap.add_argument("--ret", type=Path, help="folder for the device tool to return (files split under 16 MiB)")
    ap.add_argument("--device", help="override the profile's device (auto)")
    ap.add_argument("--profile", type=Path, default=HERE / "foundation_gpu.yaml")
    ap.add_argument("--name", default="foundation_gpu_long", help="the long profile's name (one per segment)")
    ap.add_argument("--diag-share", type=float, default=0.15, help="budget share kept for diagnostics and saving")
    ap.add_argument("--join", type=Path, help="rebuild a returned folder (with --dest) instead of training")
    ap.add_argument("--dest", type=Path)
    args = ap.parse_args(argv)
    if args.join:
        manifest = join_returned(args.join, args.dest)
        print(f"joined into {args.dest}: {len(manifest['files'])} files, sha256 OK, device {manifest['device']}")
        return 0

    from ppcr.foundation.recipe import train_foundation

    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    probe = _profile_copy(args.profile, args.out / "timing.yaml", args.probe_steps, args.device,
                          "foundation_gpu_timing", curve=False)
    _pregenerate(args.out, probe)
    print(f"data ready ({time.perf_counter() - t0:.0f} s)", flush=True)
    rate = _speed(args.out, probe)
    batch = yaml.safe_load(args.profile.read_text())["stages"]["mllm_pretrain"]["batch_size"]
    steps = max(int(args.budget_s * (1 - args.diag_share) * rate / batch), 1)
    steps = steps // 50 * 50 if steps > 100 else steps
    print(f"timing: {rate:.1f} samples/s -> {steps} steps of {batch} in {args.budget_s:.0f} s "
          f"(setup {time.perf_counter() - t0:.0f} s)", flush=True)
    long = _profile_copy(args.profile, args.out / f"{args.name}.yaml", steps, args.device, args.name, curve=True)
    dest = args.out / "dest"
    # the segment's profile is a temporary copy; a reader regenerates it from the one committed beside this script
    regenerate = f"python -m ppcr.foundation train --profile notes/gpu/{args.name}.yaml --out runs/foundation_gpu"
    manifest = train_foundation(args.out, dest, str(long), progress=False, regenerate=regenerate)
    final = manifest["stages"]["mllm_pretrain"]["final_eval"]
    summary = {"steps": steps, "timing_samples_per_s": rate, "wall_s": manifest["wall_s"],
               "device": manifest["device"], "final_eval": final,
               "total_s": round(time.perf_counter() - t0, 1)}
    print(json.dumps(summary, indent=1), flush=True)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    if args.ret:
        split_for_return(dest, args.ret, [long, args.out / "summary.json"])
        shutil.copy2(args.out / "summary.json", args.ret / "summary.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
