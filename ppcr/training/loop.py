"""One training loop for every stage, on HF accelerate (CPU, one GPU, DDP, DeepSpeed ZeRO-2).

- Several processes (`torchrun`, `accelerate launch`): `batch_size` is the global batch of a step, split evenly
  between the processes (each takes its slice of the same step's batch), so the schedule, the checkpoints and the
  result are those of one process with that batch; only the main process writes.

- AdamW with a linear warm-up then linear decay to zero (DeepSpeed's WarmupDecayLR), gradient clipping.
- Deterministic: the data order is a function of (seed, epoch) and the RNGs are re-seeded at every step from
  (seed, step), so a run resumed from a checkpoint ends with the same weights as an uninterrupted one.
- Checkpoints every `checkpoint_every` steps and at the end, written atomically (a new folder swapped in by
  rename); `resume=True` continues from the last one. The tensors a checkpoint holds are the stage's trained set,
  decided once when the stage starts (what requires grad then), whatever a pass or an evaluation toggles later; a
  checkpoint whose tensors are not exactly that set is refused, never half-loaded.
- Logs every loss term and the learning rate to `log.csv` and TensorBoard; tqdm shows progress.
- Optionally evaluates on held-out data every `eval_every` steps and at the end (`evaluate`), logging the figures
  to `eval.csv` and TensorBoard (`<desc>/val_<name>`), so every stage shows whether and how fast it learns.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import random
import resource
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DeepSpeedPlugin, DistributedDataParallelKwargs, send_to_device
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from ppcr.provenance import device_name, resolve_device
from ppcr.training import distributed

# A hook for the resume tests: stop the process hard right after this optimisation step (as a kill would), in any
# stage ("4") or only in the stage whose folder is named <stage>-<fingerprint> ("ppcr:4", "sam_pretrain:6").
CRASH_ENV = "PPCR_CRASH_AFTER_STEP"


def crash_step(out: Path) -> int:
    """The step after which `CRASH_ENV` asks the stage in `out` to die (0: never)."""
    value = os.environ.get(CRASH_ENV, "")
    stage, _, step = value.rpartition(":")
    if not step or (stage and not out.name.startswith(f"{stage}-")):
        return 0
    return int(step)


@dataclass
class LoopConfig:
    steps: int
    batch_size: int
    lr: float
    warmup_steps: int = 100
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    grad_accum: int = 1
    mixed_precision: str = "no"
    checkpoint_every: int = 200
    seed: int = 0
    device: str = "auto"
    num_workers: int = 0
    deepspeed_config: str | None = None
    # parameter-name prefix -> its own peak learning rate (the same warm-up and decay); the others get `lr`
    lr_by_prefix: dict[str, float] = field(default_factory=dict)


@dataclass
class TrainResult:
    out_dir: Path
    steps: int
    final_losses: dict[str, float]
    first_losses: dict[str, float]
    samples_per_s: float
    peak_memory_mb: float
    wall_s: float  # this process's seconds (the last segment of a resumed stage)
    resumed_from: int = 0
    # training seconds over every segment of the stage (the checkpoints carry them); None when the stage resumed from
    # a checkpoint that did not record its time
    total_wall_s: float | None = None
    device: str = ""  # what trained this segment (`ppcr.provenance.device_name`)
    history: list[dict[str, float]] = field(default_factory=list)
    eval_history: list[dict[str, float]] = field(default_factory=list)  # {"step": s, "<metric>": v, ...}

    @property
    def final_eval(self) -> dict[str, float]:
        return {k: v for k, v in self.eval_history[-1].items() if k != "step"} if self.eval_history else {}


def warmup_decay(step: int, warmup: int, total: int) -> float:
    """LR multiplier: linear 0 -> 1 over `warmup` steps, then linear 1 -> 0 at `total` (WarmupDecayLR)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


class StepBatchSampler(Sampler[list[int]]):
    """Batches for optimisation steps [start, total): epoch e is a permutation seeded by (seed, e)."""

    def __init__(self, n: int, batch_size: int, total_batches: int, seed: int, start_batch: int = 0):
        if n == 0:
            raise ValueError("the training set is empty")
        self.n, self.batch_size, self.total, self.seed, self.start = n, batch_size, total_batches, seed, start_batch

    def _order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def batch(self, index: int) -> list[int]:
        out: list[int] = []
        pos = index * self.batch_size
        while len(out) < self.batch_size:
            epoch, offset = divmod(pos, self.n)
            order = self._order(epoch)
            take = min(self.batch_size - len(out), self.n - offset)
            out.extend(order[offset:offset + take])
            pos += take
        return out

    def __iter__(self) -> Iterator[list[int]]:
        for b in range(self.start, self.total):
            yield self.batch(b)

    def __len__(self) -> int:
        return self.total - self.start


def step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step * 7919) % (2**31 - 1)


def trained_names(module: nn.Module) -> list[str]:
    """The names of the parameters a stage trains: those that require grad when it starts."""
    return [n for n, p in module.named_parameters() if p.requires_grad]


def trainable_state(module: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """CPU copies of the parameters `names` (a stage's trained set)."""
    wanted = set(names)
    return {n: p.detach().cpu().contiguous().clone() for n, p in module.named_parameters() if n in wanted}


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _make_accelerator(cfg: LoopConfig) -> Accelerator:
    kwargs: dict[str, Any] = {"gradient_accumulation_steps": cfg.grad_accum, "mixed_precision": cfg.mixed_precision,
                              "cpu": resolve_device(cfg.device) == "cpu"}
    if distributed.world_size() > 1:
        # the variants leave parts of the shared model idle in a step (glamm: branch B, the soft-token projection and
        # F_Map; the oracle's box head ...): DDP must not wait for their gradients
        kwargs["kwargs_handlers"] = [DistributedDataParallelKwargs(find_unused_parameters=True)]
    if cfg.deepspeed_config and torch.cuda.is_available() and distributed.world_size() > 1:
        if importlib.util.find_spec("deepspeed") is None:
            raise ImportError(f"the profile trains with DeepSpeed ({cfg.deepspeed_config}) on several GPUs: install it "
                              "with `pip install .[gpu]` (or drop deepspeed_config for plain DDP)")
        kwargs["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=cfg.deepspeed_config,
                                                     gradient_clipping=cfg.grad_clip)
    return Accelerator(**kwargs)  # (one GPU: no DeepSpeed, ZeRO has nothing to shard)


class RankSlice(Sampler[list[int]]):
    """This process's part of every global batch: rows [rank * b, (rank + 1) * b) with b = batch / world size."""

    def __init__(self, batches: StepBatchSampler, rank: int, world: int):
        if batches.batch_size % world:
            raise ValueError(f"batch size {batches.batch_size} does not split evenly over {world} processes")
        self.batches, self.rank, self.per = batches, rank, batches.batch_size // world

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batches:
            yield batch[self.rank * self.per:(self.rank + 1) * self.per]

    def __len__(self) -> int:
        return len(self.batches)


class CheckpointError(ValueError):
    """A checkpoint that cannot continue this stage (another stage's, incomplete or corrupt)."""


class Checkpointer:
    """`<out>/checkpoint/`: the trained weights (safetensors), optimizer/scheduler state, trainer_state.json.

    `names` is the stage's trained set (`trained_names` at its start): every checkpoint holds exactly these tensors,
    and `load` refuses one that does not, so a resumed stage never continues with part of its state reset."""

    def __init__(self, out_dir: Path, names: list[str]):
        self.dir = out_dir / "checkpoint"
        self.names = list(names)
        self.wall_s: float | None = 0.0  # training seconds before the loaded checkpoint (None: not recorded)

    def save(self, module: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, step: int,
             wall_s: float | None = None) -> None:
        tmp = self.dir.with_name(f"checkpoint.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(trainable_state(module, self.names), str(tmp / "trainable.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optim.pt")
        state = {"step": step, "tensors": len(self.names), "wall_s": wall_s}
        (tmp / "trainer_state.json").write_text(json.dumps(state))
        old = self.dir.with_name("checkpoint.old")
        shutil.rmtree(old, ignore_errors=True)
        if self.dir.exists():
            os.replace(self.dir, old)
        os.replace(tmp, self.dir)  # the swap: a crash leaves either the old or the new folder complete
        shutil.rmtree(old, ignore_errors=True)

    def latest(self) -> Path | None:
        for d in (self.dir, self.dir.with_name("checkpoint.old")):
            if (d / "trainer_state.json").is_file():
                return d
        return None

    def load(self, module: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> int:
        """Restore the latest checkpoint into `module`, `optimizer` and `scheduler`; its step (0: none)."""
        src = self.latest()
        if src is None:
            return 0
        stage = self.dir.parent
        remedy = f"delete {stage} to train this stage from its start"
        try:
            weights = load_file(str(src / "trainable.safetensors"))
            state = torch.load(src / "optim.pt", map_location="cpu", weights_only=True)
            trainer_state = json.loads((src / "trainer_state.json").read_text())
            step = int(trainer_state["step"])
        except Exception as err:  # noqa: BLE001 - any unreadable part makes the whole checkpoint unusable
            raise CheckpointError(f"checkpoint {src} cannot be read ({type(err).__name__}: {err}); {remedy}") from err
        missing = [n for n in self.names if n not in weights]
        unexpected = [n for n in weights if n not in set(self.names)]
        if missing or unexpected:
            raise CheckpointError(
                f"checkpoint {src} does not hold this stage's trained tensors ({len(missing)} missing, e.g. "
                f"{missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]}): another stage's or an "
                f"incomplete one; {remedy}")
        params = dict(module.named_parameters())
        with torch.no_grad():
            for name, value in weights.items():
                if params[name].shape != value.shape:
                    raise CheckpointError(f"checkpoint {src}: {name} has shape {tuple(value.shape)}, the model "
                                          f"{tuple(params[name].shape)}; {remedy}")
                params[name].copy_(value)
        try:
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
        except (KeyError, ValueError) as err:
            raise CheckpointError(f"checkpoint {src}: its optimizer state does not fit this stage ({err}); "
                                  f"{remedy}") from err
        wall = trainer_state.get("wall_s")
        self.wall_s = None if wall is None else float(wall)
        return step


StepFn = Callable[[nn.Module, dict[str, Any], random.Random], dict[str, torch.Tensor]]
EvalFn = Callable[[nn.Module], dict[str, float]]  # the unwrapped module (in eval mode, no grad) -> figures


def param_groups(module: nn.Module, lr: float, lr_by_prefix: dict[str, float]) -> list[dict[str, Any]]:
    """The trainable parameters as optimizer groups, one per learning rate: a parameter whose name starts with a
    prefix of `lr_by_prefix` gets that prefix's rate (the first that matches), every other one `lr`."""
    chosen: dict[float, list[nn.Parameter]] = {}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        rate = next((r for prefix, r in lr_by_prefix.items() if name.startswith(prefix)), lr)
        chosen.setdefault(rate, []).append(p)
    return [{"params": ps, "lr": rate} for rate, ps in chosen.items()]


def train_loop(
    module: nn.Module,
    step_fn: StepFn,
    dataset: Dataset,
    collate: Callable[[list[Any]], Any],
    cfg: LoopConfig,
    out_dir: str | Path,
    resume: bool = False,
    desc: str = "train",
    progress: bool = True,
    evaluate: EvalFn | None = None,
    eval_every: int = 0,
) -> TrainResult:
    """Train `module`'s trainable parameters for `cfg.steps` optimisation steps of `step_fn`'s "total" loss.

    `evaluate`, when given, runs every `eval_every` steps (0: only at the end) and after the last step.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    accelerator = _make_accelerator(cfg)
    device = accelerator.device
    module.to(device)
    groups = param_groups(module, cfg.lr, cfg.lr_by_prefix)
    if not groups:
        raise ValueError("nothing to train: no parameter requires grad")
    params = [p for g in groups for p in g["params"]]
    trained = trained_names(module)  # decided once: every checkpoint of this stage holds exactly these
    logged_group = next((i for i, g in enumerate(groups) if g["lr"] == cfg.lr), 0)  # the log's "lr": cfg.lr's
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_decay(s, cfg.warmup_steps, cfg.steps))
    checkpointer = Checkpointer(out, trained)
    start = checkpointer.load(module, optimizer, scheduler) if resume else 0
    if start > cfg.steps:
        raise CheckpointError(f"checkpoint of {out} is at step {start}, past this stage's {cfg.steps} steps: "
                              f"another recipe's; delete {out} to train this stage from its start")
    # start == cfg.steps: stopped after the last checkpoint, before the stage's outputs were written; the loop
    # below runs no step and the result is read back from the logs

    sampler: Sampler[list[int]] = StepBatchSampler(len(dataset), cfg.batch_size, cfg.steps * cfg.grad_accum,
                                                   cfg.seed, start_batch=start * cfg.grad_accum)
    if distributed.world_size() > 1:
        sampler = RankSlice(sampler, distributed.rank(), distributed.world_size())
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=cfg.num_workers)
    model, optimizer = accelerator.prepare(module, optimizer)
    main = accelerator.is_main_process
    if main:
        (out / "loop_config.json").write_text(json.dumps(asdict(cfg), indent=2))

    log_path = out / "log.csv"
    history = _read_log(log_path, upto=start) if resume else []
    eval_path = out / "eval.csv"
    eval_history = _read_log(eval_path, upto=start) if resume else []
    writer = SummaryWriter(str(out / "tb"), purge_step=start if start else None) if main else None
    crash_at = crash_step(out)
    model.train()
    t0 = time.perf_counter()
    samples = 0
    step = start
    bar = tqdm(total=cfg.steps, initial=start, desc=desc, disable=not (progress and main), dynamic_ncols=True)
    micro = 0
    for batch in loader:
        batch = send_to_device(batch, device)
        seed = step_seed(cfg.seed, step * cfg.grad_accum + micro)
        torch.manual_seed(seed)
        rng = random.Random(seed)
        with accelerator.accumulate(model):
            losses = step_fn(model, batch, rng)
            accelerator.backward(losses["total"])
            if accelerator.sync_gradients and cfg.grad_clip > 0:
                accelerator.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            if accelerator.sync_gradients:
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        samples += cfg.batch_size
        micro += 1
        if micro < cfg.grad_accum:
            continue
        micro = 0
        step += 1
        # (several processes: the losses logged are the main process's share of the global batch)
        row = {"step": step, "lr": scheduler.get_last_lr()[logged_group],
               **{k: float(v.detach()) for k, v in losses.items()},
               "samples_per_s": samples / max(1e-9, time.perf_counter() - t0)}
        history.append(row)
        for k, v in row.items():
            if k != "step" and writer is not None:
                writer.add_scalar(f"{desc}/{k}", v, step)
        bar.set_postfix(loss=f"{row['total']:.4f}", lr=f"{row['lr']:.2e}")
        bar.update(1)
        if evaluate is not None and ((eval_every and step % eval_every == 0) or step == cfg.steps):
            figures = run_evaluation(evaluate, accelerator.unwrap_model(model))
            eval_history.append({"step": step, **figures})
            for k, v in figures.items():
                if writer is not None:
                    writer.add_scalar(f"{desc}/val_{k}", v, step)
            if main:
                _write_log(eval_path, eval_history)
                bar.write(f"{desc} step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in figures.items()))
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            if main:
                _write_log(log_path, history)
                before = checkpointer.wall_s
                total = None if before is None else before + time.perf_counter() - t0
                checkpointer.save(accelerator.unwrap_model(model), optimizer, scheduler, step, total)
            accelerator.wait_for_everyone()
        if crash_at and step == crash_at:
            if main:
                _write_log(log_path, history)
            os._exit(17)  # simulated crash (tests only)
    bar.close()
    wall = time.perf_counter() - t0
    if writer is not None:
        writer.close()
        _write_log(log_path, history)
    result = TrainResult(
        out_dir=out, steps=step, history=history, resumed_from=start, eval_history=eval_history,
        first_losses={k: v for k, v in history[0].items() if k not in ("step",)} if history else {},
        final_losses={k: v for k, v in history[-1].items() if k not in ("step",)} if history else {},
        samples_per_s=samples / max(wall, 1e-9), peak_memory_mb=peak_memory_mb(device), wall_s=wall,
        total_wall_s=None if checkpointer.wall_s is None else checkpointer.wall_s + wall,
        device=device_name(device),
    )
    summary = {k: v for k, v in asdict(result).items() if k not in ("history", "eval_history", "out_dir")}
    summary["final_eval"] = result.final_eval
    summary["device"] = str(device)
    summary["processes"] = distributed.world_size()
    if main:
        (out / "train_summary.json").write_text(json.dumps(summary, indent=2))
    return result


def run_evaluation(evaluate: EvalFn, module: nn.Module) -> dict[str, float]:
    """Held-out figures of `module` in eval mode without gradients. The module is left as it was found: its
    training mode, the RNG and every parameter's `requires_grad` (an evaluation that switches peft adapters turns
    the other adapter's flags off)."""
    was_training = module.training
    rng_state = torch.get_rng_state()
    flags = {n: p.requires_grad for n, p in module.named_parameters()}
    module.eval()
    try:
        with torch.no_grad():
            figures = {k: float(v) for k, v in evaluate(module).items()}
    finally:
        module.train(was_training)
        torch.set_rng_state(rng_state)
        for n, p in module.named_parameters():
            p.requires_grad_(flags[n])
    return figures


def _write_log(path: Path, rows: list[dict[str, float]]) -> None:
    if not rows:
        return
    keys = list(dict.fromkeys(k for r in rows for k in r))
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def _read_log(path: Path, upto: int) -> list[dict[str, float]]:
    """The rows of a log CSV up to step `upto` (resume); `step` stays an int as in rows written this run."""
    if not path.is_file():
        return []
    with open(path) as f:
        rows = [{k: float(v) for k, v in r.items() if v != ""} for r in csv.DictReader(f) if float(r["step"]) <= upto]
    for r in rows:
        r["step"] = int(r["step"])
    return rows
