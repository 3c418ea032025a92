"""Training in several processes: `torchrun --nproc_per_node 2` with gloo on the CPU. The loop splits each step's
global batch between the processes (one process with that batch is the reference), every write happens once, and a
2-process stage killed after a checkpoint resumes to the weights of an uninterrupted 2-process run."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from stand_ins import REPO, run_in_repo, torchrun

from ppcr.training.loop import CRASH_ENV


@pytest.mark.slow
def test_two_processes_train_as_one_with_the_same_global_batch(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    worker = str(REPO / "tests" / "ddp_loop_worker.py")
    single = run_in_repo([sys.executable, worker, str(one)])
    assert single.returncode == 0, single.stderr[-2000:]
    double = run_in_repo(torchrun() + [worker, str(two)])
    assert double.returncode == 0, double.stderr[-3000:]
    ref = load_file(str(one / "weights_rank0.safetensors"))
    ranks = [load_file(str(two / f"weights_rank{r}.safetensors")) for r in (0, 1)]
    for name, value in ref.items():
        assert torch.equal(ranks[0][name], ranks[1][name]), name  # the processes stay in step
        torch.testing.assert_close(ranks[0][name], value, rtol=1e-5, atol=1e-6, msg=name)  # = one process
    assert (two / "losses.txt").read_text().count("\n") == 7  # 8 global steps, logged once
    assert sorted(p.name for p in two.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint"]


def _smoke_profile(tmp_path: Path) -> Path:
    raw = yaml.safe_load((REPO / "ppcr/recipe/profiles/smoke.yaml").read_text())
    raw.update(name="smoke_ddp", checkpoint_every=3)
    path = tmp_path / "smoke_ddp.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.slow
def test_ppcr_trains_in_two_processes_and_resumes_after_a_kill(tmp_path):
    """`ppcr train` under torchrun: stages 0-3 run (stage 2 trains `glamm`, which leaves branch B idle), and a run
    killed in stage 3 after its step-3 checkpoint resumes to the uninterrupted run's tensors."""
    profile = _smoke_profile(tmp_path)
    train = ["-m", "ppcr.cli", "train", "--profile", str(profile), "--variant", "ppcr", "--no-progress", "--resume",
             "--out"]
    full = run_in_repo(torchrun() + train + [str(tmp_path / "full")])
    assert full.returncode == 0, full.stderr[-3000:]
    stopped = tmp_path / "stopped"
    shutil.copytree(tmp_path / "full", stopped, ignore=shutil.ignore_patterns("ppcr-*"))  # stages 0-2 done
    killed = run_in_repo(torchrun() + train + [str(stopped)], **{CRASH_ENV: "ppcr:4"})
    assert killed.returncode != 0
    resumed = run_in_repo(torchrun() + train + [str(stopped)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    (a,), (b,) = (list(root.glob("stages/seed0/ppcr-*/model")) for root in (tmp_path / "full", stopped))
    for name in ("trainable.safetensors", "adapters/semantic/adapter_model.safetensors",
                 "adapters/spatial/adapter_model.safetensors"):
        ta, tb = load_file(str(a / name)), load_file(str(b / name))
        assert ta.keys() == tb.keys()
        for k in ta:
            assert torch.equal(ta[k], tb[k]), (name, k)
    assert '"resumed_from": 3' in (b.parent / "DONE.json").read_text()
