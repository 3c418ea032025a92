"""Training and evaluation at the `smoke` profile: every variant learns, resume is exact, known metrics, the CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import Subset

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ppcr.cli import main as cli_main  # noqa: E402
from ppcr.data.dataset import collate_refer  # noqa: E402
from ppcr.data.refer import Refer  # noqa: E402
from ppcr.data.transforms import ImagePrep  # noqa: E402
from ppcr.model.modeling_ppcr import PPCROutput, StepOutputs  # noqa: E402
from ppcr.training.cache import SamEmbeddingCache  # noqa: E402
from ppcr.evaluation.evaluate import evaluate_model  # noqa: E402
from ppcr.training.loop import CRASH_ENV, LoopConfig, StepBatchSampler, train_loop, warmup_decay  # noqa: E402
from ppcr.recipe.profile import DataSpec, load_profile  # noqa: E402
from ppcr.training.ris import base_weights, build_ris_model  # noqa: E402
from ppcr.training.data import prepare_data, train_dataset

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> tuple:
    """The smoke profile's data and stages 0-1 (cached), shared by the tests of this module."""
    out = tmp_path_factory.mktemp("smoke_run")
    profile = load_profile("smoke")
    prepare_data(profile, out, progress=False)
    weights = base_weights(profile, out, seed=0, resume=False, progress=False)
    return profile, out, weights


@pytest.mark.parametrize("variant", ["glamm", "spatial_re", "spatial_re_seg", "ppcr", "attn_box"])
def test_smoke_training_lowers_the_loss(smoke_run, tmp_path, variant):
    """Each trainable variant fits a fixed batch: its Eq. 7 loss falls."""
    profile, out, weights = smoke_run
    model = build_ris_model(profile, variant, 0, weights)
    data = Subset(train_dataset(profile, out / "data", model.image_prep()), range(4))
    cfg = LoopConfig(steps=8, batch_size=4, lr=2e-3, warmup_steps=0, checkpoint_every=100, device="cpu")
    result = train_loop(model, lambda m, b, r: m(b, rng=r).losses, data, collate_refer, cfg, tmp_path,
                        progress=False)
    losses = [row["total"] for row in result.history]
    assert len(losses) == 8
    assert min(losses[-2:]) < losses[0], losses
    assert (tmp_path / "log.csv").is_file() and (tmp_path / "checkpoint" / "trainable.safetensors").is_file()
    header = (tmp_path / "log.csv").read_text().splitlines()[0].split(",")
    assert {"step", "lr", "total", "bce", "dice", "l1", "ce"} <= set(header)


def _train_cli(out: Path, env_extra: dict[str, str] | None = None, resume: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    cmd = [sys.executable, "-m", "ppcr.cli", "train", "--profile", "smoke", "--variant", "ppcr", "--out", str(out),
           "--no-progress"] + (["--resume"] if resume else [])
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)


def test_interrupted_and_resumed_run_ends_with_the_same_weights(smoke_run, tmp_path):
    """A run killed mid-way and resumed equals an uninterrupted one, tensor for tensor (CPU, same seed)."""
    _, out, _ = smoke_run
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(out, a)  # stages 0-1 done; stage 2 and 3 still to run
    shutil.copytree(out, b)
    full = _train_cli(a)
    assert full.returncode == 0, full.stderr[-2000:]
    # b: the first RIS stage (GLaMM-style init) dies after step 4 (checkpoint at step 3), then resumes
    first = _train_cli(b, {CRASH_ENV: "4"})
    assert first.returncode == 17, first.stderr[-2000:]
    resumed = _train_cli(b, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    ckpt_a = json.loads(full.stdout[full.stdout.index("{"):])["checkpoint"]
    ckpt_b = json.loads(resumed.stdout[resumed.stdout.index("{"):])["checkpoint"]
    assert Path(ckpt_b).relative_to(b) == Path(ckpt_a).relative_to(a)
    resumed_from = [json.loads(p.read_text())["resumed_from"] for p in b.glob("stages/seed0/*/DONE.json")
                    if not p.parent.name.startswith("foundation_eval")]  # an evaluation, not a training stage
    assert sorted(resumed_from) == [0, 0, 0, 3]
    for name in ("trainable.safetensors", "base.safetensors", "adapters/semantic/adapter_model.safetensors",
                 "adapters/spatial/adapter_model.safetensors"):
        ta, tb = load_file(str(Path(ckpt_a) / name)), load_file(str(Path(ckpt_b) / name))
        assert ta.keys() == tb.keys()
        for k in ta:
            assert torch.equal(ta[k], tb[k]), f"{name}:{k}"


class KnownMasks(torch.nn.Module):
    """A stand-in model whose mask for each expression is a fixed, hand-chosen region."""

    def __init__(self, masks: dict[str, np.ndarray], boxes: dict[str, list[float]]):
        super().__init__()
        self.masks, self.boxes = masks, boxes
        self.config = SimpleNamespace(variant="known", preset="none", seed=0)
        self.device = torch.device("cpu")

    def image_prep(self) -> ImagePrep:
        return ImagePrep(clip_size=16, sam_size=32)

    def forward(self, batch, sam_cache=None, compute_loss=False) -> PPCROutput:
        logits = [torch.from_numpy(np.where(self.masks[e], 5.0, -5.0)) for e in batch["expression"]]
        wh = torch.tensor([[w, h, w, h] for h, w in batch["original_size"]], dtype=torch.float32)
        boxes = torch.tensor([self.boxes[e] for e in batch["expression"]]) / wh
        n = len(logits)
        st = StepOutputs(torch.zeros(n, 2), None, boxes, boxes, None, torch.zeros(n, 1, 4, 4), torch.zeros(n, 1))
        return PPCROutput(None, {}, logits, st)


def test_evaluation_on_known_masks_gives_known_metrics(tiny_refer, tmp_path):
    refer = Refer(tiny_refer.root, "refcoco", "unc")
    gt = {s["sent"]: refer.mask(r).astype(bool) for r in refer.refs for s in r["sentences"]}
    # "thin cat" (val, 6 px): exact. testB "bird in the corner" (6 px): exact; "top left bird": 3 of 6 px + 3
    # false pixels -> IoU 3/9.
    bird = gt["bird in the corner"]
    half = bird.copy()
    ys, xs = np.nonzero(bird)
    half[ys[:3], xs[:3]] = False
    half[100, 50:53] = True
    masks = {"thin cat": gt["thin cat"], "bird in the corner": bird, "top left bird": half,
             "square cat": np.zeros_like(gt["square cat"])}
    boxes = {"thin cat": [2, 2, 3, 8], "bird in the corner": [0, 0, 4, 4], "top left bird": [0, 0, 2, 2],
             "square cat": [0, 0, 1, 1]}
    spec = DataSpec(name="refcoco", split_by="unc", eval_splits=["val", "testA", "testB"])
    res = evaluate_model(KnownMasks(masks, boxes), tiny_refer.root, [spec], tmp_path / "r.json", batch_size=2,
                         progress=False)
    m = res["metrics"]
    assert m["refcoco/val"]["mIoU"] == pytest.approx(100.0) and m["refcoco/val"]["oIoU"] == pytest.approx(100.0)
    assert m["refcoco/testA"]["mIoU"] == pytest.approx(0.0) and m["refcoco/testA"]["P@0.5"] == 0.0
    assert m["refcoco/testB"]["mIoU"] == pytest.approx(100 * (1 + 3 / 9) / 2)
    assert m["refcoco/testB"]["oIoU"] == pytest.approx(100 * (6 + 3) / (6 + 9))
    assert m["refcoco/testB"]["P@0.5"] == pytest.approx(50.0)
    # box IoU: [0,0,4,4] vs the GT bbox [0,0,4,4] = 1; [0,0,2,2] vs it = 4/16
    assert m["refcoco/testB"]["box_acc@0.5"] == pytest.approx(50.0)
    rows = res["rows"]["refcoco/testB"]
    assert [r["sent_id"] for r in rows] == [50, 51]
    assert rows[1]["iou"] == pytest.approx(3 / 9) and rows[1]["box_iou"] == pytest.approx(0.25)
    assert {"ref_id", "pred_box", "intersection", "union", "mask_rle"} <= set(rows[0])
    meta = json.loads((tmp_path / "r.json").read_text())["meta"]
    assert {"git_commit", "variant", "device", "wall_s", "expressions_per_s"} <= set(meta)
    assert meta["expressions"] == 4


def test_schedule_sampler_and_cache(tmp_path):
    # WarmupDecayLR: linear up over the warm-up, linear down to zero at the end
    assert [round(warmup_decay(s, 4, 12), 3) for s in (0, 3, 4, 8, 12)] == [0.25, 1.0, 1.0, 0.5, 0.0]
    # the data order is a function of (seed, step): a sampler started at step k yields the same batches
    full = list(StepBatchSampler(10, 4, 7, seed=3))
    assert list(StepBatchSampler(10, 4, 7, seed=3, start_batch=4)) == full[4:]
    assert sorted(full[0] + full[1] + full[2][:2]) == list(range(10))  # an epoch visits every sample once
    assert list(StepBatchSampler(10, 4, 7, seed=4)) != full
    cache = SamEmbeddingCache(tmp_path, "enc123", max_memory_bytes=4 * 2 * 2 * 4)  # one float32 (4, 2, 2) in memory
    x, y = torch.randn(4, 2, 2), torch.randn(4, 2, 2)
    cache["aa11"], cache["bb22"] = x, y
    assert list(cache.memory) == ["bb22"] and cache.memory_bytes == 64
    assert torch.equal(cache["aa11"], x)  # evicted from memory, read back from disk
    assert sorted(cache) == ["aa11", "bb22"] and cache.get("zz") is None
    assert torch.equal(SamEmbeddingCache(tmp_path, "enc123")["bb22"], y)
    half = SamEmbeddingCache(tmp_path, "enc123", dtype=torch.float16)  # stored in half precision, read as float32
    half["aa11"] = x
    assert half.dir != cache.dir and half.memory["aa11"].dtype == torch.float16
    assert half["aa11"].dtype == torch.float32 and torch.equal(half["aa11"], x.half().float())
    assert SamEmbeddingCache.bytes_per_image(256, 64, torch.float16) == 256 * 64 * 64 * 2  # SAM ViT-H: 2 MiB
    assert "2.00 GiB on disk" in half.describe(1024, 2 * 2**20)


def test_sam_gets_its_own_learning_rate(tmp_path):
    """`StageSpec.sam_lr`: SAM's prompt encoder and mask decoder in their own optimizer group, at that peak rate,
    under the same warm-up and decay; every other trainable parameter at `lr`."""
    from ppcr.model.config import tiny_config
    from ppcr.model.modeling_ppcr import PPCRModel
    from ppcr.training.loop import param_groups
    from ppcr.recipe.profile import StageSpec
    from ppcr.training.stage import loop_config

    model = PPCRModel.build(tiny_config(), extra_words=["red"])
    groups = param_groups(model, 1e-3, {"segmenter.sam.": 3e-4})
    sam = {id(p) for n, p in model.named_parameters() if n.startswith("segmenter.sam.") and p.requires_grad}
    by_rate = {g["lr"]: {id(p) for p in g["params"]} for g in groups}
    assert set(by_rate) == {1e-3, 3e-4} and by_rate[3e-4] == sam and not by_rate[1e-3] & sam
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in model.parameters())
    assert len(param_groups(model, 1e-3, {})) == 1 and len(param_groups(model, 1e-3, {"nothing.": 1.0})) == 1
    profile = load_profile("smoke")
    profile.stages["variants"] = StageSpec(steps=4, lr=1e-3, sam_lr=2e-4)
    assert loop_config(profile, "variants", 0, 10).lr_by_prefix == {"segmenter.sam.": 2e-4}
    assert loop_config(profile, "glamm_init", 0, 10).lr_by_prefix == {}


def test_profiles_load_and_validate():
    for name in ("smoke", "demo", "synthetic", "paper"):
        p = load_profile(name)
        assert p.name == name and p.datasets and p.variants
    paper = load_profile("paper")
    assert paper.stage("variants").lr == 3e-4 and paper.betas == (0.9, 0.95) and paper.mixed_precision == "bf16"
    assert paper.stage("variants").batch_size == 8 and paper.stage("variants").epochs == 5
    with pytest.raises(ValueError, match="unknown profile"):
        load_profile("nope")


def test_cli_help_and_bad_arguments(capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert all(cmd in out for cmd in ("synth", "train", "evaluate", "predict"))
    with pytest.raises(SystemExit) as e:
        cli_main(["train", "--profile", "smoke", "--variant", "nope"])
    assert "unknown variant 'nope'" in str(e.value.code)
    with pytest.raises(SystemExit) as e:
        cli_main(["evaluate", "--profile", "smoke", "--variant", "ppcr"])  # no --out
    assert e.value.code == 2
    assert "--out" in capsys.readouterr().err
    assert cli_main(["train", "--profile", "nope", "--variant", "ppcr"]) == 2
    assert "unknown profile 'nope'" in capsys.readouterr().err


def test_seeds_in_parallel_processes_give_the_sequential_results(tmp_path):
    """`seed_workers: 2` runs each seed of the study in its own process (one thread each on this 2-core machine);
    the results files are those of the same study run seed after seed with one thread."""
    from ppcr.pipeline import run_study
    from ppcr.recipe.profile import load_profile

    small = {"seeds": [0, 1], "variants": ["glamm", "ppcr"]}
    parallel = run_study(load_profile("smoke", {**small, "seed_workers": 2}), tmp_path / "parallel", progress=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        sequential = run_study(load_profile("smoke", small), tmp_path / "sequential", progress=False)
    finally:
        torch.set_num_threads(threads)
    assert parallel["seed_workers"] == 2 and sequential["seed_workers"] == 1
    assert parallel["results"] == sequential["results"] and set(parallel["prompt_probe"]) == {"0", "1"}
    for variant, by_seed in parallel["results"].items():
        for rel in by_seed.values():
            a = json.loads((tmp_path / "parallel" / rel).read_text())
            b = json.loads((tmp_path / "sequential" / rel).read_text())
            assert a["metrics"] == b["metrics"], (variant, rel)
            assert [r["iou"] for rows in a["rows"].values() for r in rows] == \
                [r["iou"] for rows in b["rows"].values() for r in rows]


@pytest.mark.parametrize("freeze", [True, False])
def test_sam_pretrainer_can_keep_its_image_encoder_frozen(freeze):
    """`StageSpec.freeze_sam_encoder`: a training step moves SAM's prompt encoder and mask decoder and, only when the
    encoder is not frozen, the image encoder."""
    import random

    from ppcr.model.config import tiny_config
    from ppcr.training.sam_pretrain import SamPretrainer, collate_objects

    torch.manual_seed(0)
    module = SamPretrainer(tiny_config(), objects_per_image=2, box_prob=1.0, freeze_encoder=freeze)
    mask = torch.zeros(64, 64, dtype=torch.uint8)
    mask[10:30, 20:40] = 1
    item = {"sam_pixel_values": torch.randn(3, 64, 64), "sam_input_size": (64, 64), "original_size": (64, 64),
            "masks": [mask, 1 - mask], "boxes": torch.tensor([[20.0, 10.0, 40.0, 30.0], [0.0, 0.0, 64.0, 64.0]])}
    sam = module.segmenter.sam
    before = {n: p.detach().clone() for n, p in sam.named_parameters()}
    trainable = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.SGD(trainable, lr=0.1)
    module(collate_objects([item, item]), random.Random(0))["total"].backward()
    opt.step()
    moved = {n.split(".")[0] for n, p in sam.named_parameters() if not torch.equal(p, before[n])}
    assert {"prompt_encoder", "mask_decoder"} <= moved
    assert ("image_encoder" in moved) is not freeze
    assert all(p.grad is None for p in sam.image_encoder.parameters()) is freeze
