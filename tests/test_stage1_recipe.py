"""Stage 1a: dense per-patch pretraining of the CLIP tower, and stage 1 starting from it with the tower frozen."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ppcr.data.synref_language import COLORS, PATTERNS, SHAPES, SIZES  # noqa: E402
from ppcr.model.config import preset_config  # noqa: E402
from ppcr.training.vision_pretrain import (DenseVisionPretrainer, build_vision_tower,  # noqa: E402
                                           patch_targets)

RED_CIRCLE = {"color": "red", "shape": "circle", "pattern": "solid", "size": "small"}
BLUE_STAR = {"color": "blue", "shape": "star", "pattern": "dotted", "size": "large"}


def test_patch_targets_label_each_patch_with_the_object_covering_most_of_it():
    """4 x 4 grid on a 64 x 64 image (16-px patches). The circle fills patch (0, 0) and 25 % of patch (0, 1); the
    star covers 75 % of patches (0, 1) and (1, 1), so it wins patch (0, 1). A sliver under MIN_COVER (9 % of
    patch (3, 0)) leaves its patch background."""
    circle = np.zeros((64, 64), np.uint8)
    circle[0:16, 0:20] = 1
    star = np.zeros((64, 64), np.uint8)
    star[0:32, 20:32] = 1
    sliver = np.zeros((64, 64), np.uint8)
    sliver[60:64, 0:6] = 1
    t = patch_targets([circle, star, sliver], [RED_CIRCLE, BLUE_STAR, RED_CIRCLE], grid=4)
    assert set(t) == {"color", "shape", "pattern", "size", "box"}
    assert t["color"].shape == (16,) and t["box"].shape == (16, 4)
    red, blue = COLORS.index("red") + 1, COLORS.index("blue") + 1
    assert t["color"][0] == red and t["shape"][0] == SHAPES.index("circle") + 1
    assert t["color"][1] == blue and t["pattern"][1] == PATTERNS.index("dotted") + 1
    assert t["color"][5] == blue and t["size"][5] == SIZES.index("large") + 1
    assert t["color"][12] == 0 and t["box"][12].abs().sum() == 0
    torch.testing.assert_close(t["box"][0], torch.tensor([0.0, 0.0, 20.0, 16.0]) / 64)
    torch.testing.assert_close(t["box"][5], torch.tensor([20.0, 0.0, 32.0, 32.0]) / 64)
    assert int((t["color"] > 0).sum()) == 3


def test_patch_targets_follow_clips_square_padding():
    """A 32 x 64 (H x W) image is padded to 64 x 64 with the image centred (rows 16-48), as CLIP's preparation does:
    an object at the image's top-left rows lands in the square's second patch row."""
    obj = np.zeros((32, 64), np.uint8)
    obj[0:16, 0:16] = 1
    t = patch_targets([obj], [RED_CIRCLE], grid=4)
    assert t["color"][4] > 0 and int((t["color"] > 0).sum()) == 1
    torch.testing.assert_close(t["box"][4], torch.tensor([0.0, 16.0, 16.0, 32.0]) / 64)


def test_dense_pretrainer_learns_a_fixed_batch_and_reads_the_llms_layer():
    """The heads read the patch tokens of `vision_feature_layer` (CLS dropped); a few steps on one batch of random
    images with fixed labels drive every loss down (the objective is learnable and reaches the tower)."""
    from ppcr.model.tokenizer import synref_tokenizer

    tiny = preset_config("tiny")
    torch.manual_seed(0)
    module = DenseVisionPretrainer(build_vision_tower(tiny, synref_tokenizer()), tiny.vision_feature_layer)
    grid = tiny.vision.image_size // tiny.vision.patch_size
    n = grid * grid
    g = torch.Generator().manual_seed(0)
    batch = {"clip_pixel_values": torch.randn(4, 3, tiny.vision.image_size, tiny.vision.image_size, generator=g),
             "color": torch.randint(0, len(COLORS) + 1, (4, n), generator=g),
             "shape": torch.randint(0, len(SHAPES) + 1, (4, n), generator=g),
             "pattern": torch.randint(0, len(PATTERNS) + 1, (4, n), generator=g),
             "size": torch.randint(0, len(SIZES) + 1, (4, n), generator=g),
             "box": torch.rand(4, n, 4, generator=g)}
    out = module.patch_outputs(batch["clip_pixel_values"])
    assert out["color"].shape == (4, n, len(COLORS) + 1) and out["box"].shape == (4, n, 4)
    first = module(batch)
    first["total"].backward()
    first = {k: v.detach() for k, v in first.items()}
    assert module.vision_tower.embeddings.patch_embedding.weight.grad.abs().sum() > 0
    opt = torch.optim.Adam(module.parameters(), lr=3e-3)
    for _ in range(30):
        opt.zero_grad()
        loss = module(batch)
        loss["total"].backward()
        opt.step()
    with torch.no_grad():
        last = module(batch)
    for key in ("color", "shape", "pattern", "size", "box_l1"):
        assert float(last[key]) < 0.8 * float(first[key]), key


def test_stage1_starts_from_the_dense_pretrained_tower_and_keeps_it_frozen(tmp_path):
    """The smoke profile with a `vision_pretrain` stage and `freeze_vision`: stage 1a runs first, its tower is the
    one stage 1 saves (unchanged, since frozen), and stage 1's DONE.json records stage 1a's curve."""
    import yaml
    from safetensors.torch import load_file

    from ppcr.model.shipped import foundation_dir
    from ppcr.recipe.profile import load_profile
    from ppcr.training.data import prepare_data
    from ppcr.training.mllm_pretrain import run_mllm_pretrain
    from ppcr.model.tokenizer import synref_tokenizer

    raw = yaml.safe_load((foundation_dir().parents[1] / "recipe" / "profiles" / "smoke.yaml").read_text())
    raw["stages"]["vision_pretrain"] = {"steps": 4, "batch_size": 4, "lr": 1.0e-3, "warmup_steps": 1}
    raw["stages"]["mllm_pretrain"]["freeze_vision"] = True
    raw["diag_expressions"] = 4
    path = tmp_path / "smoke_dense.yaml"
    path.write_text(yaml.safe_dump(raw))
    profile = load_profile(str(path))
    out = tmp_path / "run"
    prepare_data(profile, out, progress=False)
    llava_dir = run_mllm_pretrain(profile, out, 0, progress=False)
    done = json.loads((llava_dir.parent / "DONE.json").read_text())
    vision = done["vision_pretrain"]
    assert vision["steps"] == 4 and {"color_acc", "shape_acc", "box_l1"} <= set(vision["final_eval"])
    tower_file = next(Path(out).glob("stages/seed0/vision_pretrain-*/vision_tower.safetensors"))
    tower = load_file(str(tower_file))
    saved = load_file(str(llava_dir / "model.safetensors"))
    in_llava = {k.split("vision_tower.", 1)[1]: v for k, v in saved.items() if "vision_tower." in k}
    assert in_llava.keys() == tower.keys()
    assert all(torch.equal(in_llava[k], tower[k]) for k in tower)
    fresh = build_vision_tower(profile.model_config("glamm", 0), synref_tokenizer()).state_dict()
    assert any(not torch.equal(fresh[k], tower[k]) for k in tower)  # stage 1a did train the tower


def test_object_grounding_questions_name_every_object_unique_by_colour_and_shape(tmp_path):
    """Every item names one object as "the <colour> <shape>", a combination no other object of its image has, with
    that object's box; each image contributes all such objects; items mix with the referring items in a batch."""
    from ppcr.data.dataset import ReferSegDataset, collate_refer
    from ppcr.data.refer import Refer
    from ppcr.data.synref import generate_suite
    from ppcr.model.modeling_ppcr import image_prep_for
    from ppcr.training.mllm_pretrain import STAGE1_KEYS, ObjectGroundingQuestions, WithTargetAttributes

    generate_suite("synref", tmp_path, n_refs=30, seed=5, image_size=64, progress=False)
    refer = Refer(tmp_path, "synref", "unc")
    prep = image_prep_for(preset_config("tiny"))
    data = ObjectGroundingQuestions(refer, "train", prep)
    images = {int(refer.ref(r)["image_id"]) for r in refer.ref_ids("train")}
    expected = 0
    for image_id in images:
        names = [(refer.ann(a)["synref"]["color"], refer.ann(a)["synref"]["shape"])
                 for a in refer.image_ann_ids(image_id)]
        expected += sum(names.count(n) == 1 for n in names)
    assert len(data) == expected > len(images)
    for index in range(len(data)):
        item = data[index]
        image_id, ann_id = data.items[index]
        ann = refer.ann(ann_id)
        assert set(item) == set(STAGE1_KEYS)
        assert item["expression"] == f"the {ann['synref']['color']} {ann['synref']['shape']}"
        others = [refer.ann(a)["synref"] for a in refer.image_ann_ids(image_id) if a != ann_id]
        assert all((o["color"], o["shape"]) != (ann["synref"]["color"], ann["synref"]["shape"]) for o in others)
        np.testing.assert_allclose(item["box"].numpy(), refer.box_xyxy(ann))
    refs = WithTargetAttributes(ReferSegDataset(refer, "train", prep))
    batch = collate_refer([refs[0], data[0]])
    assert batch["clip_pixel_values"].shape[0] == 2 and batch["expression"][1].startswith("the ")


def test_stage_fingerprints_count_only_options_that_differ_from_their_defaults():
    """A new StageSpec option (at its default) leaves every cached stage's fingerprint as it was; setting it
    changes it."""
    import dataclasses

    from ppcr.recipe.profile import StageSpec, load_profile

    profile = load_profile("smoke")
    spec = profile.stage("mllm_pretrain")
    explicit = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)
                if getattr(spec, f.name) != getattr(StageSpec(), f.name)}
    assert profile.fingerprint("x", spec) == profile.fingerprint("x", StageSpec(**explicit))
    assert profile.fingerprint("x", spec) != profile.fingerprint("x", dataclasses.replace(spec, freeze_vision=True))
