"""Training in several processes (`torchrun --nproc_per_node N -m ppcr.cli train ...`, or `accelerate launch`):
which process writes, and waiting for it. In one process every call here is a no-op and `is_main()` is True.

The loop (`ppcr.training.loop`) splits each step's global batch between the processes and wraps the module in
DDP through accelerate; everything that writes a file (data generation, stage folders, checkpoints, logs, the
outputs, DONE.json) runs on the main process, and the others wait for it where they read what it wrote.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch.distributed as dist
from accelerate import PartialState


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def init(device: str) -> None:
    """Start the process group once (several processes only), on the profile's device: gloo on the CPU."""
    if world_size() > 1 and not (dist.is_available() and dist.is_initialized()):
        PartialState(cpu=device == "cpu")


def wait() -> None:
    """Every process waits here until all arrive (several processes only)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


@contextmanager
def main_first() -> Iterator[None]:
    """The main process runs the block first (e.g. generates data), then the others (which then find it done)."""
    if not is_main():
        wait()
    yield
    if is_main():
        wait()
