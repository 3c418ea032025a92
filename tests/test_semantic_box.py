"""The box term on P_seg_txt (`PPCRConfig.train_semantic_box`, a small-scale recipe choice, not in Eq. 7).

An F_Map-shaped head regresses the target's normalised box from P_seg_txt; its L1 joins the total with its weight,
reaches branch A through the [SEG] head, and leaves evaluation unchanged (the head is a training signal: the masks
and boxes of the same weights are those of a model without it). Stage 3 carries the head over from stage 2.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from ppcr.model.losses import box_l1
from ppcr.model.config import TrainingRecipe, tiny_config
from ppcr.model.modeling_ppcr import PPCRModel
from ppcr.model.persistence import load_weights_into
from ppcr.training.ris import STAGE2_CARRIED


@pytest.mark.parametrize("variant", ["glamm", "ppcr"])
def test_semantic_box_term_joins_the_total_and_trains_branch_a(variant):
    from test_model import WORDS, make_batch

    torch.manual_seed(0)
    model = PPCRModel.build(tiny_config(variant=variant), extra_words=WORDS, recipe=TrainingRecipe(train_semantic_box=1.5)).train()
    batch = make_batch(model)
    out = model(batch, rng=random.Random(0))
    sem = out.steps.semantic_boxes
    assert sem is not None and sem.shape == (3, 4) and bool(((sem >= 0) & (sem <= 1)).all())
    wh = torch.tensor([[w, h, w, h] for h, w in batch["original_size"]], dtype=torch.float32)
    target = torch.stack(batch["box"]) / wh
    torch.testing.assert_close(out.losses["semantic_box"], box_l1(sem, target))
    eq7 = sum(getattr(model.recipe.loss, k) * out.losses[k] for k in ("bce", "dice", "l1", "ce"))
    torch.testing.assert_close(out.losses["total"], eq7 + 1.5 * out.losses["semantic_box"])

    model.zero_grad()
    out.losses["semantic_box"].backward()
    named = dict(model.named_parameters())
    assert named["semantic_box_head.mlp.0.weight"].grad.abs().sum() > 0
    assert model.text_hidden_fcs[0].weight.grad.abs().sum() > 0  # P_seg_txt itself learns the place
    lora_a = [p for n, p in named.items() if "lora_" in n and ".semantic." in n]
    assert lora_a and any(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_a)
    assert all(p.grad is None or p.grad.abs().sum() == 0 for n, p in named.items() if n.startswith("box_head."))


def test_semantic_box_off_by_default_and_evaluation_unchanged():
    from test_model import WORDS, make_batch

    torch.manual_seed(0)
    off = PPCRModel.build(tiny_config(variant="ppcr"), extra_words=WORDS)
    assert off.semantic_box_head is None
    batch = make_batch(off)
    out = off.train()(batch, rng=random.Random(0))
    assert out.steps.semantic_boxes is None and "semantic_box" not in out.losses

    on = PPCRModel.build(tiny_config(variant="ppcr"), tokenizer=off.tokenizer,
                         recipe=TrainingRecipe(train_semantic_box=2.0)).eval()
    on.load_state_dict({**off.state_dict(), **{k: v for k, v in on.state_dict().items()
                                               if k.startswith("semantic_box_head.")}})
    expressions = [["left red circle", "green star"], ["green star"]]
    for a, b in zip(off.eval().predict(batch["images"], expressions), on.predict(batch["images"], expressions)):
        np.testing.assert_array_equal(a["mask"], b["mask"])
        np.testing.assert_array_equal(a["box_norm"], b["box_norm"])


def test_stage3_carries_the_training_heads(tmp_path):
    """The checkpoint keeps the semantic box head and the image-grounding head (both were once left out of
    `trainable.safetensors`, so stage 3 restarted them from random), and stage 3 loads them from stage 2."""
    from test_model import WORDS

    torch.manual_seed(0)
    recipe = TrainingRecipe(train_semantic_box=2.0, train_image_grounding=1.0)
    stage2 = PPCRModel.build(tiny_config(variant="glamm", image_after_prompt=True), extra_words=WORDS, recipe=recipe)
    with torch.no_grad():
        for head in (stage2.semantic_box_head, stage2.grounding_head):
            for p in head.parameters():
                p.add_(1.0)
    stage2.save_pretrained(tmp_path / "glamm_init")
    stage3 = PPCRModel.build(tiny_config(variant="ppcr", image_after_prompt=True), tokenizer=stage2.tokenizer,
                             recipe=recipe)
    load_weights_into(stage3, tmp_path / "glamm_init", prefixes=STAGE2_CARRIED, branches=("semantic",))
    for before, after in ((stage2.semantic_box_head, stage3.semantic_box_head),
                          (stage2.grounding_head, stage3.grounding_head)):
        for (name, a), b in zip(before.state_dict().items(), after.state_dict().values()):
            torch.testing.assert_close(a, b, msg=name)
    reloaded = PPCRModel.from_pretrained(tmp_path / "glamm_init")
    torch.testing.assert_close(reloaded.semantic_box_head.mlp[0].weight, stage2.semantic_box_head.mlp[0].weight)
