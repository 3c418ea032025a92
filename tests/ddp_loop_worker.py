"""Run by tests/test_distributed.py, in one process or under `torchrun --nproc_per_node 2`: the training loop on a
small deterministic model (no dropout, no per-row randomness), writing each process's final weights."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import TensorDataset

from ppcr.training import distributed
from ppcr.training.loop import LoopConfig, train_loop


def main(out: Path) -> None:
    distributed.init("cpu")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 2), nn.Linear(2, 2))
    model[3].requires_grad_(True)
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(40, 6, generator=g), torch.randn(40, 2, generator=g))

    def step(m, batch, rng):
        x, y = batch
        return {"total": ((m(x) - y) ** 2).mean()}

    cfg = LoopConfig(steps=8, batch_size=8, lr=1e-2, warmup_steps=2, checkpoint_every=4, device="cpu")
    result = train_loop(model, step, data, lambda items: tuple(torch.stack(t) for t in zip(*items)), cfg, out,
                        progress=False)
    weights = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(weights, str(out / f"weights_rank{distributed.rank()}.safetensors"))
    if distributed.is_main():
        (out / "losses.txt").write_text("\n".join(str(r["total"]) for r in result.history))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
