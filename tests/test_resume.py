"""A stopped training resumes exactly: every checkpoint holds the stage's whole trained set, whatever an evaluation
toggled, and a checkpoint that cannot continue the stage is refused in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import TensorDataset

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ppcr.training.loop import CRASH_ENV, CheckpointError, LoopConfig, run_evaluation, train_loop  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


class TwoBranches(nn.Module):
    """Two linear "branches"; evaluating through branch b freezes branch a, as peft's `set_adapter` does."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(3, 1), nn.Linear(3, 1)

    def use(self, branch: str) -> None:
        other = self.a if branch == "b" else self.b
        other.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(x)


def _data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(16, 3, generator=g), torch.randn(16, 1, generator=g))


def _step(m: nn.Module, batch, rng) -> dict[str, torch.Tensor]:
    x, y = batch
    return {"total": ((m(x) - y) ** 2).mean()}


def _evaluate(m: TwoBranches) -> dict[str, float]:
    m.use("b")  # an evaluation that switches branches and does not switch back
    return {"a_bias": float(m.a.bias)}


def _cfg(**kw) -> LoopConfig:
    return LoopConfig(**{"steps": 6, "batch_size": 4, "lr": 1e-2, "warmup_steps": 0, "checkpoint_every": 2,
                         "device": "cpu", **kw})


def test_evaluation_leaves_the_trainable_flags_as_it_found_them():
    m = TwoBranches()
    m.train()
    run_evaluation(_evaluate, m)
    assert all(p.requires_grad for p in m.parameters()) and m.training


def test_every_checkpoint_holds_the_stage_trained_set_though_an_evaluation_ran_on_its_step(tmp_path):
    """Diagnostics and checkpoints on the same steps (the demo's 100/100): the checkpoint still has branch a."""
    m = TwoBranches()
    train_loop(m, _step, _data(), _collate, _cfg(steps=4), tmp_path, progress=False, evaluate=_evaluate,
               eval_every=2)
    saved = load_file(str(tmp_path / "checkpoint" / "trainable.safetensors"))
    assert sorted(saved) == ["a.bias", "a.weight", "b.bias", "b.weight"]
    for name, p in m.named_parameters():
        assert torch.equal(saved[name], p.detach())


def _collate(items):
    return torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])


def test_a_resumed_loop_equals_an_uninterrupted_one_and_its_evaluations(tmp_path):
    full = TwoBranches()
    ref = train_loop(full, _step, _data(), _collate, _cfg(), tmp_path / "a", progress=False, evaluate=_evaluate,
                     eval_every=2)
    part = TwoBranches()  # stopped after step 4 (a checkpoint and an evaluation): 4 steps of a 6-step schedule
    stopped = tmp_path / "b"
    with pytest.raises(_Stop):
        train_loop(part, _stopping_step(4), _data(), _collate, _cfg(), stopped, progress=False,
                   evaluate=_evaluate, eval_every=2)
    first = json.loads((stopped / "checkpoint" / "trainer_state.json").read_text())["wall_s"]  # segment 1's
    resumed = TwoBranches()
    res = train_loop(resumed, _step, _data(), _collate, _cfg(), stopped, resume=True, progress=False,
                     evaluate=_evaluate, eval_every=2)
    assert res.resumed_from == 4 and res.eval_history == ref.eval_history
    # the stage's training time counts both segments: the checkpoint carried the first one's
    assert ref.total_wall_s == ref.wall_s and first > 0 and res.total_wall_s == pytest.approx(first + res.wall_s)
    for (name, p), q in zip(full.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name
    # stopped after the last checkpoint, before the stage's outputs were written: resuming runs no step
    again = TwoBranches()
    last = train_loop(again, _step, _data(), _collate, _cfg(), tmp_path / "a", resume=True, progress=False)
    assert last.resumed_from == 6 and last.steps == 6 and last.final_losses == ref.final_losses
    for p, q in zip(full.parameters(), again.parameters()):
        assert torch.equal(p, q)


class _Stop(Exception):
    pass


def _stopping_step(after: int):
    calls = {"n": 0}

    def step(m, batch, rng):
        if calls["n"] == after:
            raise _Stop  # as a kill after step `after` (its checkpoint and evaluation written)
        calls["n"] += 1
        return _step(m, batch, rng)

    return step


def test_a_checkpoint_of_another_stage_or_a_corrupt_one_is_refused_in_one_line(tmp_path):
    train_loop(TwoBranches(), _step, _data(), _collate, _cfg(steps=2), tmp_path, progress=False)
    ckpt = tmp_path / "checkpoint" / "trainable.safetensors"
    weights = load_file(str(ckpt))
    save_file({k: v for k, v in weights.items() if not k.startswith("a.")}, str(ckpt))  # another stage's set
    with pytest.raises(CheckpointError, match=r"2 missing.*delete .* to train this stage from its start") as err:
        train_loop(TwoBranches(), _step, _data(), _collate, _cfg(steps=4), tmp_path, resume=True, progress=False)
    assert "\n" not in str(err.value)
    ckpt.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot be read"):
        train_loop(TwoBranches(), _step, _data(), _collate, _cfg(steps=4), tmp_path, resume=True, progress=False)


def test_the_pipeline_reports_bad_input_in_one_line(tmp_path, capsys):
    from ppcr.pipeline import main

    assert main(["study", "--profile", str(tmp_path / "absent.yaml"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("python -m ppcr.pipeline study: error: unknown profile") and "\n" not in err


# --------------------------------------------------------------------------------------------------------------
# every stage of a variant, killed and resumed through the CLI (the smoke profile, diagnostics on checkpoint steps)
# --------------------------------------------------------------------------------------------------------------

KILLS = ("sam_pretrain:4", "vision_pretrain:5", "mllm_pretrain:3", "glamm_init:4", "ppcr:6")  # stage:step
# (the foundation's evaluation, `evaluation.foundation_eval`, belongs to the study, not to `ppcr train`)


def _profile(tmp_path: Path) -> Path:
    raw = yaml.safe_load((REPO / "ppcr/recipe/profiles/smoke.yaml").read_text())
    raw["stages"]["vision_pretrain"] = {"steps": 6, "batch_size": 4, "lr": 1.0e-3, "warmup_steps": 2}
    raw.update(checkpoint_every=3, diag_every=3, diag_expressions=6, name="smoke_resume")
    path = tmp_path / "smoke_resume.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _train(profile: Path, out: Path, crash: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", CRASH_ENV: crash or ""}
    cmd = [sys.executable, "-m", "ppcr.cli", "train", "--profile", str(profile), "--variant", "ppcr", "--out",
           str(out), "--no-progress", "--resume"]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=900)


@pytest.mark.slow
def test_every_stage_killed_after_a_checkpoint_resumes_to_the_same_tensors_and_figures(tmp_path):
    """Stages 0, 1a, 1, 2 and a stage-3 variant with both branches, each killed once (diagnostics on the
    checkpoint steps; `ppcr:6` dies after the last checkpoint, before the stage's outputs): the same command again
    ends with every tensor and every held-out figure of an uninterrupted run, bit for bit."""
    profile = _profile(tmp_path)
    a, b = tmp_path / "a", tmp_path / "b"
    full = _train(profile, a)
    assert full.returncode == 0, full.stderr[-2000:]
    for crash in KILLS:
        killed = _train(profile, b, crash)
        assert killed.returncode == 17, (crash, killed.stderr[-2000:])
    resumed = _train(profile, b)
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    # stage folders by name (the foundation evaluation's fingerprint stamps its weights' mtimes, so its hash differs)
    stages_a = {p.name.rsplit("-", 1)[0]: p for p in a.glob("stages/seed0/*")}
    stages_b = {p.name.rsplit("-", 1)[0]: p for p in b.glob("stages/seed0/*")}
    assert stages_a.keys() == stages_b.keys()
    resumed_from = {}
    for name, dir_a in stages_a.items():
        dir_b = stages_b[name]
        done_a, done_b = (json.loads((d / "DONE.json").read_text()) for d in (dir_a, dir_b))
        for key in ("final_eval", "eval_history", "where_answer"):
            assert done_a.get(key) == done_b.get(key), (name, key)
        losses_a, losses_b = ({k: v for k, v in (d.get("final_losses") or {}).items() if k != "samples_per_s"}
                              for d in (done_a, done_b))  # (a throughput, not a result)
        assert losses_a == losses_b, name
        resumed_from[name] = done_b.get("resumed_from")
        files = sorted(p.relative_to(dir_a) for p in dir_a.rglob("*.safetensors"))
        assert files or "steps" not in done_a, name  # every training stage wrote weights
        assert files == sorted(p.relative_to(dir_b) for p in dir_b.rglob("*.safetensors"))
        for f in files:
            ta, tb = load_file(str(dir_a / f)), load_file(str(dir_b / f))
            assert ta.keys() == tb.keys(), (name, f)
            for k in ta:
                assert torch.equal(ta[k], tb[k]), (name, f, k)
    assert resumed_from == {"sam_pretrain": 3, "vision_pretrain": 3, "mllm_pretrain": 3, "glamm_init": 3, "ppcr": 6}
    assert all(done["eval_history"] for done in (json.loads(p.read_text()) for p in b.glob("stages/seed0/*/DONE.json"))
               if "steps" in done)  # every training stage evaluated on its checkpoint steps
