"""The one cached-stage mechanism every training stage runs through, and the stage-folder format.

A stage's output is cached under a hash of everything that determines it:

    <out>/stages/seed<k>/<stage>-<fingerprint>/
        checkpoint/        the loop's last checkpoint (`ppcr.training.loop`), what a stopped stage resumes from
        log.csv, eval.csv  losses per step, held-out figures per diagnostics step
        <output>           what the stage makes (a safetensors file, a llava-hf folder, a PPCR checkpoint)
        DONE.json          written last: the stage is finished and <output> complete

`run_cached` is the skeleton (folder, done?, fresh or resumed, train, mark done); `StageDir` reads such a folder
back (the report's learning curves, the study's cost tables). Stage names: `sam_pretrain` (stage 0),
`vision_pretrain` (stage 1a), `mllm_pretrain` (stage 1), `glamm_init` (stage 2), one folder per variant (stage 3),
and `foundation_eval` (an evaluation, not a training stage).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import nn

from ppcr.provenance import git_commit
from ppcr.recipe.profile import Profile
from ppcr.training import distributed
from ppcr.training.loop import LoopConfig, TrainResult

DONE = "DONE.json"
EVALUATION_STAGES = ("foundation_eval",)  # folders that evaluate without training


def stage_dir(out: Path, seed: int, name: str, fingerprint: str) -> Path:
    return Path(out) / "stages" / f"seed{seed}" / f"{name}-{fingerprint}"


def done_info(stage: Path) -> dict[str, Any] | None:
    """A finished stage's DONE.json, or None."""
    marker = stage / DONE
    return json.loads(marker.read_text()) if marker.is_file() else None


def mark_done(stage: Path, result: TrainResult, **extra: Any) -> dict[str, Any]:
    info = {"steps": result.steps, "wall_s": result.wall_s, "total_wall_s": result.total_wall_s,
            "device": result.device,
            "git_commit": git_commit(),  # the code of the stage's last segment
            "samples_per_s": result.samples_per_s,
            "peak_memory_mb": result.peak_memory_mb, "first_losses": result.first_losses,
            "final_losses": result.final_losses, "resumed_from": result.resumed_from,
            "final_eval": result.final_eval, "eval_history": result.eval_history, **extra}
    (stage / DONE).write_text(json.dumps(info, indent=2, default=str))
    return info


def fresh(stage: Path, resume: bool) -> None:
    """Without `resume` a half-finished stage starts over; with it, the loop continues from its checkpoint."""
    if not resume and stage.exists() and done_info(stage) is None:
        shutil.rmtree(stage)
    stage.mkdir(parents=True, exist_ok=True)


# A stage's training: (its folder, the output path to write) -> the loop's result and extra DONE.json fields.
TrainStage = Callable[[Path, Path], tuple[TrainResult, dict[str, Any]]]


def run_cached(out: Path, seed: int, name: str, fingerprint: str, output: str, resume: bool,
               train: TrainStage) -> Path:
    """The stage `name` of `seed` under `fingerprint`: its output when a finished copy exists, else `train` runs
    (resumed from the folder's checkpoint with `resume`), writes the output, and the stage is marked done."""
    stage = stage_dir(out, seed, name, fingerprint)
    target = stage / output
    if done_info(stage) is not None:
        return target
    if distributed.is_main():
        fresh(stage, resume)
    distributed.wait()
    result, extra = train(stage, target)  # (writes its output on the main process only)
    if distributed.is_main():
        mark_done(stage, result, output=str(target), **extra)
    distributed.wait()
    return target


def loop_config(profile: Profile, stage_name: str, seed: int, n_samples: int) -> LoopConfig:
    spec = profile.stage(stage_name)
    return LoopConfig(
        steps=spec.total_steps(n_samples), batch_size=spec.batch_size, lr=spec.lr, warmup_steps=spec.warmup_steps,
        betas=profile.betas, weight_decay=profile.weight_decay, grad_clip=profile.grad_clip,
        grad_accum=spec.grad_accum, mixed_precision=profile.mixed_precision,
        checkpoint_every=profile.checkpoint_every, seed=seed, device=profile.device,
        num_workers=profile.num_workers, deepspeed_config=profile.deepspeed_path(),
        lr_by_prefix={} if spec.sam_lr is None else {"segmenter.sam.": spec.sam_lr},
    )


def save_safetensors(module: nn.Module, path: Path) -> None:
    """A module's whole state dict (CPU, contiguous) as one safetensors file: no pickle to load it back (written by
    the main process)."""
    if distributed.is_main():
        save_file({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}, str(path))


def relative(path: str | Path | None, out: Path) -> str | None:
    """`path` relative to the run folder `out` when inside it (fingerprints survive a moved run), else as given."""
    if path is None:
        return None
    p = Path(path)
    return str(p.relative_to(out)) if p.is_relative_to(out) else str(p)


# --------------------------------------------------------------------------------------------------------------
# reading stage folders back
# --------------------------------------------------------------------------------------------------------------


def stage_kind(stage: str) -> str:
    """"sam" (stage 0), "vision" (stage 1a), "mllm" (stage 1) or "ris" (stage 2 `glamm_init`, every stage-3
    variant)."""
    return {"sam_pretrain": "sam", "vision_pretrain": "vision", "mllm_pretrain": "mllm"}.get(stage, "ris")


@dataclass(frozen=True)
class StageDir:
    """One stage folder `<run>/stages/seed<seed>/<stage>-<fingerprint>/`."""

    path: Path
    stage: str  # sam_pretrain | vision_pretrain | mllm_pretrain | glamm_init | <variant> | foundation_eval
    seed: int
    fingerprint: str

    @classmethod
    def parse(cls, path: Path) -> "StageDir | None":
        """The folder's parts, or None when `path` is no stage folder."""
        seed_text = path.parent.name.removeprefix("seed")
        if not path.is_dir() or "-" not in path.name or not seed_text.isdigit():
            return None
        stage, fingerprint = path.name.rsplit("-", 1)
        return cls(path, stage, int(seed_text), fingerprint)

    @property
    def kind(self) -> str:
        return stage_kind(self.stage)

    @property
    def finished(self) -> bool:
        return (self.path / DONE).is_file()

    def done(self) -> dict[str, Any]:
        """DONE.json ({} while the stage is unfinished or the file is unreadable)."""
        try:
            return json.loads((self.path / DONE).read_text())
        except (OSError, ValueError):
            return {}

    @property
    def variant(self) -> str | None:
        """The model variant a referring-segmentation stage trains (None for stages 0-1)."""
        if self.kind != "ris":
            return None
        return "glamm" if self.stage == "glamm_init" else str(self.done().get("variant", self.stage))

    def modified(self) -> float:
        """Last write time of its logs (for choosing among cached copies of the same stage)."""
        files = [self.path / n for n in (DONE, "eval.csv", "log.csv")] + [self.path]
        return max(f.stat().st_mtime for f in files if f.exists())


def stage_dirs(out: str | Path) -> list[StageDir]:
    """Every stage folder of a run folder, sorted by path."""
    return [s for p in sorted(Path(out).glob("stages/seed*/*")) if (s := StageDir.parse(p)) is not None]


def stage_summaries(out: str | Path) -> list[dict[str, Any]]:
    """Every finished training stage's DONE.json (throughput, memory, losses) for the book's cost tables, with its
    "stage" name and "seed". Evaluation folders (`foundation_eval`) are skipped."""
    rows = []
    for s in stage_dirs(out):
        if s.stage in EVALUATION_STAGES or not s.finished:
            continue
        rows.append({**s.done(), "stage": s.stage, "seed": s.seed})
    return rows
