"""The shipped foundation (stages 0-1 at the `small` preset): hashes, configs, and that its SAM follows box prompts.

The last two tests are the end-to-end check of the box path that the first CPU demo lacked: a trained SAM handed the
ground-truth box must beat filling that box, and our frames (original -> SAM input -> prompt encoder -> mask at the
original size) must give what segment-anything's own `SamPredictor` gives.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ppcr.data.synref import GENERATOR_VERSION, generate_suite  # noqa: E402
from ppcr.data.dataset import ReferSegDataset  # noqa: E402
from ppcr.data.refer import Refer  # noqa: E402
from ppcr.foundation.recipe import train_foundation, train_stage  # noqa: E402
from ppcr.model.shipped import (REGENERATE, FoundationMismatch, config_signature, foundation_dir,  # noqa: E402
                                load_manifest, sha256, shipped_weights, verify_foundation)
from ppcr.metrics import mask_iou  # noqa: E402
from ppcr.model.config import preset_config  # noqa: E402
from ppcr.model.modeling_ppcr import image_prep_for  # noqa: E402
from ppcr.model.segmentation import SamSegmenter, build_sam  # noqa: E402
from ppcr.training.diagnostics import sam_prompt_metrics  # noqa: E402

MAX_MB = 60


def test_shipped_files_match_their_manifest_and_the_small_preset():
    """Fails when a file changed or when the small preset no longer matches; the message names the command."""
    manifest = verify_foundation(preset_config("small"))
    sizes = sum((foundation_dir() / rel).stat().st_size for rel in manifest["files"])
    assert sizes <= MAX_MB * 2**20, f"shipped foundation is {sizes / 2**20:.1f} MB (at most {MAX_MB})"
    for key in ("command", "git_commit", "synref_generator_version", "recipe", "stages", "device", "wall_note",
                "config_signature", "curves"):
        assert manifest.get(key), key
    # the training time over every segment; null only where a stage resumed from a checkpoint that did not record
    # its time (the first one-recipe run: its hours from the logs are in notes/history.md)
    assert manifest["wall_s"] is None or manifest["wall_s"] > 0
    assert manifest["wall_s"] is not None or any(st["resumed_from"] and st["total_wall_s"] is None
                                                 for st in manifest["stages"].values())
    assert manifest["command"] == REGENERATE  # one command regenerates every shipped file
    for stage in ("sam_pretrain", "vision_pretrain", "mllm_pretrain"):
        assert manifest["stages"][stage]["steps"] > 0 and manifest["stages"][stage]["final_eval"]
    assert (foundation_dir() / "manifest.json").stat().st_size < 20_000  # small: the curves are in curves.json


def _fake_foundation(tmp_path: Path) -> Path:
    dest = tmp_path / "foundation"
    (dest / "llava").mkdir(parents=True)
    (dest / "sam.safetensors").write_bytes(b"sam")
    (dest / "llava" / "model.safetensors").write_bytes(b"llava")
    files = {str(p.relative_to(dest)): sha256(p) for p in sorted(dest.rglob("*")) if p.is_file()}
    manifest = {"files": files, "config_signature": config_signature(preset_config("small")),
                "synref_generator_version": GENERATOR_VERSION}
    (dest / "manifest.json").write_text(json.dumps(manifest))
    return dest


def test_mismatches_are_refused_with_the_regenerate_command(tmp_path):
    dest = _fake_foundation(tmp_path)
    small = preset_config("small")
    verify_foundation(small, dest)
    paths = shipped_weights(small, dest)
    assert Path(paths["sam_checkpoint"]).is_file() and Path(paths["llava_path"]).is_dir()

    deeper = small.replace(sam=replace(small.sam, encoder_depth=small.sam.encoder_depth + 1))
    with pytest.raises(FoundationMismatch, match="sam") as err:
        verify_foundation(deeper, dest)
    assert REGENERATE in str(err.value)
    reordered = small.replace(image_after_prompt=not small.image_after_prompt)  # a stage-1 setting: LLaVA mismatch
    with pytest.raises(FoundationMismatch, match="image_after_prompt"):
        verify_foundation(reordered, dest)

    manifest = json.loads((dest / "manifest.json").read_text())
    (dest / "manifest.json").write_text(json.dumps({**manifest, "synref_generator_version": "synref-1.1"}))
    with pytest.raises(FoundationMismatch, match="trained on SynRef synref-1.1") as err:  # an old foundation
        verify_foundation(small, dest)
    assert REGENERATE in str(err.value)
    (dest / "manifest.json").write_text(json.dumps(manifest))

    (dest / "sam.safetensors").write_bytes(b"changed")
    with pytest.raises(FoundationMismatch, match="sha256") as err:
        verify_foundation(small, dest)
    assert REGENERATE in str(err.value)

    shutil.rmtree(dest / "llava")
    with pytest.raises(FoundationMismatch, match="missing"):
        verify_foundation(small, dest)
    (dest / "manifest.json").unlink()
    with pytest.raises(FoundationMismatch, match="no shipped foundation"):
        load_manifest(dest)


def test_train_foundation_writes_a_verifiable_manifest(tmp_path):
    """The regenerate command's code path at the smoke profile (tiny preset, seconds)."""
    from ppcr.recipe.profile import load_profile

    dest = tmp_path / "shipped"
    manifest = train_foundation(tmp_path / "run", dest, "smoke", progress=False)
    assert {"sam.safetensors", "llava/config.json", "curves.json"} <= set(manifest["files"])
    assert manifest["stages"]["sam_pretrain"]["steps"] == load_profile("smoke").stage("sam_pretrain").steps
    assert manifest["command"] == "python -m ppcr.foundation train --profile smoke"
    curves = json.loads((dest / "curves.json").read_text())
    assert curves["sam_pretrain"] and curves["mllm_pretrain"]  # held-out figures per evaluation step
    assert "eval_history" not in json.dumps(manifest)
    totals = [st["total_wall_s"] for st in manifest["stages"].values()]
    assert len(totals) >= 2 and manifest["wall_s"] == pytest.approx(sum(totals), abs=0.1) and min(totals) > 0
    # the device is no part of a stage's fingerprint: `--device` (a GPU run) finds the stages trained on the CPU
    assert manifest["device"].startswith("cpu")
    assert train_stage(tmp_path / "run", "sam_pretrain", "smoke", progress=False, device="auto").parent.name == \
        next((tmp_path / "run" / "stages" / "seed0").glob("sam_pretrain-*")).name
    tiny = load_profile("smoke").model_config("glamm", 0)
    verify_foundation(tiny, dest)
    with pytest.raises(FoundationMismatch):
        verify_foundation(preset_config("small"), dest)


# ----------------------------------------------------------------------------------------------------------------
# the shipped SAM and the box path
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shipped_sam() -> SamSegmenter:
    config = preset_config("small")
    sam = build_sam(config.sam, shipped_weights(config)["sam_checkpoint"])
    return SamSegmenter(sam).eval()


@pytest.fixture(scope="module")
def synref_val(tmp_path_factory) -> ReferSegDataset:
    """Fresh SynRef scenes (a seed no profile uses) at the demo's image size."""
    root = tmp_path_factory.mktemp("synref")
    generate_suite("synref", root, n_refs=60, seed=123, image_size=256, progress=False)
    return ReferSegDataset(Refer(root, "synref", "unc"), "val", image_prep_for(preset_config("small")))


def test_shipped_sam_with_the_ground_truth_box_beats_filling_the_box(shipped_sam, synref_val):
    figures = sam_prompt_metrics(shipped_sam, synref_val, batch_size=16)
    assert figures["miou_box"] > figures["miou_box_fill"] + 5.0, figures


def test_box_frames_match_segment_anythings_predictor(shipped_sam, synref_val):
    """Our path (ImagePrep.sam -> boxes_to_input_frame -> prompt encoder -> decoder -> postprocess) == SamPredictor
    with the same image and box, up to the image resize (PIL in segment-anything, ours may differ by a grey level)."""
    from segment_anything import SamPredictor

    seg = shipped_sam
    predictor = SamPredictor(seg.sam)
    pe = seg.sam.prompt_encoder
    agreements = []
    for i in range(0, min(len(synref_val), 24), 3):
        item = synref_val[i]
        image = synref_val.image(item["meta"]["image_id"])  # (H, W, 3) uint8
        size = tuple(item["original_size"])
        box = torch.as_tensor(item["box"], dtype=torch.float32)[None]
        # the frames: box in SAM's input frame equals segment-anything's ResizeLongestSide
        ours_box = seg.boxes_to_input_frame(box, [size])
        theirs_box = predictor.transform.apply_boxes_torch(box, size)
        torch.testing.assert_close(ours_box, theirs_box)
        assert tuple(item["sam_input_size"]) == predictor.transform.get_preprocess_shape(*size, seg.img_size)
        with torch.no_grad():
            emb = seg.encode_images(item["sam_pixel_values"][None])
            dense = pe.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(1, -1, *pe.image_embedding_size)
            low, _ = seg.decode_prompts(emb, torch.zeros(1, dtype=torch.long), pe._embed_boxes(ours_box), dense)
            ours = seg.postprocess(low, [item["sam_input_size"]], [size])[0] > 0
            predictor.set_image(image)
            theirs, _, _ = predictor.predict(box=box[0].numpy(), multimask_output=False)
        agreements.append(mask_iou(ours.numpy(), theirs[0]))
    assert float(np.mean(agreements)) > 0.95, agreements


def test_profile_refuses_unknown_stage1_recipes(tmp_path):
    import yaml

    from ppcr.recipe.profile import load_profile

    raw = yaml.safe_load((foundation_dir().parents[1] / "recipe" / "profiles" / "smoke.yaml").read_text())
    for key, value in (("probe_positions", "middle"), ("init", "shipped")):
        bad = json.loads(json.dumps(raw))
        bad["stages"]["mllm_pretrain"][key] = value
        path = tmp_path / f"bad_{key}.yaml"
        path.write_text(yaml.safe_dump(bad))
        with pytest.raises(ValueError, match=key) as err:  # one line; init: the continuation is gone
            load_profile(str(path))
        assert "\n" not in str(err.value)
        assert key != "init" or "python -m ppcr.foundation train" in str(err.value)


def test_stage1_dense_probe_regresses_the_box_from_every_where_answer_position():
    """probe_positions="all": the probe's L1 is averaged over every answer position of the "where" rows (the first
    bin's L1 is still logged), the GIoU term is dropped with probe_giou=False, and the gradient reaches the CLIP
    tower through the image tokens."""
    import random

    from ppcr.training.mllm_pretrain import MllmPretrainer, normalised_boxes
    from ppcr.model.tokenizer import synref_tokenizer

    tiny = preset_config("tiny")
    torch.manual_seed(0)
    module = MllmPretrainer(tiny, synref_tokenizer(), probe_weight=5.0, probe_positions="all", probe_giou=False)
    batch = {"clip_pixel_values": torch.randn(4, 3, tiny.vision.image_size, tiny.vision.image_size),
             "expression": ["the red circle", "the blue square", "the big star", "the green ring"],
             "attributes": [{"color": "red", "shape": "circle"}, {"color": "blue", "shape": "square"},
                            {"size": "large", "shape": "star"}, {"color": "green", "shape": "ring"}],
             "box": [torch.tensor([4.0, 8.0, 20.0, 30.0])] * 4, "original_size": [(64, 64)] * 4}

    class AllWhere(random.Random):
        def choice(self, seq):
            return "where" if "where" in seq else super().choice(seq)

    losses = module(batch, AllWhere(0))
    hidden, targets = module.answer_hidden(batch, ["where"] * 4, AllWhere(0))
    gt = normalised_boxes(batch, [True] * 4)
    every = (module.box_probe(hidden) - gt[:, None]).abs().mean(-1)[targets != -100].mean()
    torch.testing.assert_close(losses["total"], losses["ce"] + 5.0 * every)
    losses["total"].backward()
    patch = module.llava.model.vision_tower.embeddings.patch_embedding.weight.grad
    assert patch is not None and patch.abs().sum() > 0
    with pytest.raises(ValueError, match="probe_positions"):
        MllmPretrainer(tiny, synref_tokenizer(), probe_positions="middle")


def test_stage1_probe_describe_reads_the_describe_answers_too():
    """probe_describe: the dense probe's L1 covers every answer position of the "describe" rows as well, and the
    diagnostics read the probe at the describe answer's [SEG] slot (the position predicting "a")."""
    import random

    from ppcr.training.mllm_pretrain import MllmPretrainer, normalised_boxes
    from ppcr.model.tokenizer import synref_tokenizer

    tiny = preset_config("tiny")
    torch.manual_seed(0)
    module = MllmPretrainer(tiny, synref_tokenizer(), probe_weight=5.0, probe_positions="all", probe_giou=False,
                            probe_describe=True)
    batch = {"clip_pixel_values": torch.randn(4, 3, tiny.vision.image_size, tiny.vision.image_size),
             "expression": ["the red circle", "the blue square", "the big star", "the green ring"],
             "attributes": [{"color": "red", "shape": "circle"}, {"color": "blue", "shape": "square"},
                            {"size": "large", "shape": "star"}, {"color": "green", "shape": "ring"}],
             "box": [torch.tensor([4.0, 8.0, 20.0, 30.0]), torch.tensor([30.0, 2.0, 60.0, 20.0])] * 2,
             "original_size": [(64, 64)] * 4}
    tasks = ["where", "describe", "where", "describe"]

    class Fixed(random.Random):
        def __init__(self):
            super().__init__(0)
            self.left = list(tasks)

        def choice(self, seq):
            return self.left.pop(0) if "where" in seq and self.left else super().choice(seq)

    losses = module(batch, Fixed())
    sequence, enc = module.sequence_hidden(batch, tasks, Fixed())
    hidden, targets = module.answer_positions(sequence, enc)
    gt = normalised_boxes(batch, [True] * 4)
    every = (module.box_probe(hidden) - gt[:, None]).abs().mean(-1)[targets != -100].mean()
    torch.testing.assert_close(losses["total"], losses["ce"] + 5.0 * every)
    module.eval()
    data = [{k: v[i] for k, v in batch.items()} for i in range(4)]
    figures = module.val_metrics(data, batch_size=4)
    assert 0.0 <= figures["seg_slot_probe_box_iou"] <= 100.0
    with pytest.raises(ValueError, match="probe_describe"):
        MllmPretrainer(tiny, synref_tokenizer(), probe_positions="first", probe_describe=True)


def test_normalised_boxes_take_boxes_on_any_device_and_return_them_on_the_cpu():
    """The training loop moves a batch's tensors to the device; the image sizes stay Python ints. The first GPU run
    (notes/gpu) failed here on a CUDA box divided by a CPU tensor, so the boxes are brought to the CPU first."""
    from ppcr.training.mllm_pretrain import normalised_boxes

    batch = {"box": [torch.tensor([4.0, 8.0, 20.0, 30.0]), [0, 0, 32, 16], torch.tensor([1.0, 1.0, 2.0, 2.0])],
             "original_size": [(40, 80), (16, 32), (4, 4)]}
    out = normalised_boxes(batch, [True, True, False])
    torch.testing.assert_close(out, torch.tensor([[0.05, 0.2, 0.25, 0.75], [0.0, 0.0, 1.0, 1.0]]))
    assert out.device.type == "cpu"
    if torch.cuda.is_available():  # the failing case itself, on a machine with a GPU
        batch["box"] = [b.cuda() if torch.is_tensor(b) else b for b in batch["box"]]
        torch.testing.assert_close(normalised_boxes(batch, [True, True, False]), out)
