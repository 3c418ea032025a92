"""The distillation term on branch B (`PPCRConfig.train_spatial_distill`, a small-scale recipe choice, not in Eq. 7).

The LLM without LoRA reads the spatial template with the expression where the student reads the `[P_SEG]` soft
token; branch B's last hidden states at the query position and on the image tokens must match it. The term exists
only while training, only for the variants with a soft token, joins the total with its weight, and reaches the soft
token's projection, branch B and (through P_seg_txt) branch A; evaluation is unchanged.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from ppcr.model.losses import relative_mse
from ppcr.model.config import TrainingRecipe, tiny_config
from ppcr.model.modeling_ppcr import PPCRModel
from ppcr.model.prompts import BOX_TOKEN, SPATIAL_ANSWER, conversation
from ppcr.model.tokenizer import encode_pass


def test_relative_mse_scale_free():
    teacher = torch.randn(4, 8) * 7.0
    assert float(relative_mse(torch.zeros_like(teacher), teacher)) == pytest.approx(1.0)
    assert float(relative_mse(teacher.clone(), teacher)) == 0.0
    assert float(relative_mse(2 * teacher, teacher)) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="shape"):
        relative_mse(teacher, teacher[:, :4])


@pytest.mark.parametrize("variant", ["ppcr", "spatial_re_seg", "attn_box"])
def test_distill_term_joins_the_total_and_trains_both_branches(variant):
    from test_model import WORDS, make_batch

    torch.manual_seed(0)
    model = PPCRModel.build(tiny_config(variant=variant), extra_words=WORDS,
                            recipe=TrainingRecipe(train_spatial_distill=0.7)).train()
    batch = make_batch(model)
    out = model(batch, rng=random.Random(0))
    distill = out.losses["distill"]
    assert distill.ndim == 0 and float(distill) > 0
    eq7 = sum(getattr(model.recipe.loss, k) * out.losses[k] for k in ("bce", "dice", "l1", "ce"))
    torch.testing.assert_close(out.losses["total"], eq7 + 0.7 * distill)

    model.zero_grad()
    distill.backward()
    named = dict(model.named_parameters())
    assert named["seg_to_llm.weight"].grad.abs().sum() > 0
    for branch in ("spatial", "semantic"):  # the teacher pass must not freeze the branch that ran before it
        lora = [p for n, p in named.items() if "lora_B" in n and f".{branch}." in n]
        assert lora and all(p.requires_grad for p in lora)
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in lora), branch
    assert all(p.grad is None or p.grad.abs().sum() == 0 for n, p in named.items() if n.startswith("box_head."))


@pytest.mark.parametrize("variant", ["glamm", "spatial_re"])
def test_no_distill_without_a_soft_token(variant):
    from test_model import WORDS, make_batch

    torch.manual_seed(0)
    model = PPCRModel.build(tiny_config(variant=variant), extra_words=WORDS,
                            recipe=TrainingRecipe(train_spatial_distill=1.0)).train()
    out = model(make_batch(model), rng=random.Random(0))
    assert "distill" not in out.losses and out.steps.distill is None


def test_teacher_is_the_llm_without_lora():
    """`run_base` ignores both adapters: with branch B's LoRA set to non-zero weights it gives the states of the
    same model with every LoRA weight at zero."""
    from test_model import WORDS, make_batch

    torch.manual_seed(0)
    model = PPCRModel.build(tiny_config(variant="ppcr"), extra_words=WORDS).eval()
    batch = make_batch(model)
    features, index = model.clip_features(batch)
    ctx, ans = zip(*[conversation(f"Where is the {e}?", SPATIAL_ANSWER, model.config.system_prompt)
                     for e in batch["expression"]])
    enc = encode_pass(model.tokenizer, ctx, ans, BOX_TOKEN, features.shape[1])
    lora = model.mllm.lora_parameters()
    with torch.no_grad():
        for p in lora.values():
            p.normal_(0, 0.5)
    query, image = model.mllm.run_base(enc, features, index)
    lora_query, _, _ = model.mllm.run_branch("spatial", enc, features, index, compute_ce=False)
    assert not torch.allclose(query, lora_query)  # the LoRA weights do change the states
    with torch.no_grad():
        for p in lora.values():
            p.zero_()
    zero_query, _, zero_image = model.mllm.run_branch("spatial", enc, features, index, compute_ce=False,
                                                      image_hidden=True)
    torch.testing.assert_close(query, zero_query)
    torch.testing.assert_close(image, zero_image)


def test_distill_off_by_default_and_evaluation_unchanged():
    from test_model import WORDS, make_batch

    torch.manual_seed(0)
    off = PPCRModel.build(tiny_config(variant="ppcr"), extra_words=WORDS)
    batch = make_batch(off)
    assert "distill" not in off.train()(batch, rng=random.Random(0)).losses
    on = PPCRModel.build(tiny_config(variant="ppcr"), tokenizer=off.tokenizer,
                         recipe=TrainingRecipe(train_spatial_distill=1.0)).eval()
    on.load_state_dict(off.state_dict())
    expressions = [["left red circle", "green star"], ["green star"]]
    for a, b in zip(off.eval().predict(batch["images"], expressions), on.predict(batch["images"], expressions)):
        np.testing.assert_array_equal(a["mask"], b["mask"])
        np.testing.assert_array_equal(a["box_norm"], b["box_norm"])
