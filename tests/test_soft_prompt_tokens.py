"""`PPCRConfig.soft_prompt_tokens`: P_seg_txt in K input slots of the spatial prompt (K = 1: the paper's one)."""

from __future__ import annotations

import random

import pytest
import torch

from ppcr.model import prompts
from ppcr.model.config import tiny_config
from ppcr.model.heads import SoftTokenProjector
from ppcr.model.mllm import multimodal_embeddings
from ppcr.model.modeling_ppcr import PPCRModel


def test_fill_writes_k_slots():
    template = prompts.SPATIAL_TEMPLATES[0]
    assert prompts.fill(template).count(prompts.PSEG_TOKEN) == 1
    assert prompts.fill(template, None, 4).count(prompts.PSEG_TOKEN) == 4
    assert prompts.fill(prompts.SPATIAL_RE_TEMPLATES[0], "the red circle", 4).count(prompts.PSEG_TOKEN) == 0


def test_projector_shapes_and_the_single_slot_checkpoint_layout():
    one, four = SoftTokenProjector(8, 16), SoftTokenProjector(8, 16, 4)
    x = torch.randn(3, 8)
    assert one(x).shape == (3, 1, 16) and four(x).shape == (3, 4, 16)
    assert one.weight.shape == (16, 8)  # K = 1 keeps the layout of checkpoints saved before K existed
    with pytest.raises(ValueError, match="at least one"):
        SoftTokenProjector(8, 16, 0)


def test_soft_tokens_fill_their_slots_in_order():
    torch.manual_seed(0)
    model = PPCRModel.build(tiny_config(variant="ppcr", soft_prompt_tokens=3), extra_words=["red", "circle"])
    llava, pseg, image = model.mllm.llava, model.mllm.pseg_token_id, model.mllm.image_token_id
    w1, w2, w3 = [i for i in range(100) if i not in (pseg, image)][:3]  # three plain word ids
    ids = torch.tensor([[w1, pseg, w2, pseg, pseg, w3], [pseg, pseg, pseg, w1, w2, w3]])
    soft = torch.randn(2, 3, llava.get_input_embeddings().embedding_dim)
    embeds = multimodal_embeddings(llava, ids, None, image, soft, pseg)
    torch.testing.assert_close(embeds[0, [1, 3, 4]], soft[0])
    torch.testing.assert_close(embeds[1, :3], soft[1])
    torch.testing.assert_close(embeds[0, 0], llava.get_input_embeddings()(torch.tensor(w1)))
    with pytest.raises(ValueError, match="exactly 3"):
        multimodal_embeddings(llava, ids[:, 1:], None, image, soft, pseg)


@pytest.mark.parametrize("k", [1, 4])
def test_ppcr_trains_every_slot_and_evaluates_with_k_slots(k):
    """A training step reaches the whole projection (every slot's rows); evaluation reads the same K slots."""
    from test_model import WORDS, make_batch

    torch.manual_seed(0)
    model = PPCRModel.build(tiny_config(variant="ppcr", soft_prompt_tokens=k), extra_words=WORDS).train()
    batch = make_batch(model)
    out = model(batch, rng=random.Random(0))
    out.loss.backward()
    grad = model.seg_to_llm.weight.grad.view(k, -1, model.seg_to_llm.in_features)  # (K, d, C)
    assert bool((grad.abs().sum(dim=(1, 2)) > 0).all())
    model.eval()
    with torch.no_grad():
        assert model(batch, compute_loss=False).steps.boxes_norm.shape == (len(batch["expression"]), 4)


@pytest.mark.parametrize("variant", ["glamm", "spatial_re"])
def test_variants_without_a_soft_token_start_the_same_whatever_k(variant):
    """The projection is unused without a soft token: one slot there keeps every initial weight (and so stage 2,
    which every variant starts from) independent of `soft_prompt_tokens`."""
    from test_model import WORDS

    states = []
    for k in (1, 4):
        torch.manual_seed(0)
        states.append(PPCRModel.build(tiny_config(variant=variant, soft_prompt_tokens=k), extra_words=WORDS)
                      .state_dict())
    assert states[0].keys() == states[1].keys()
    for name, value in states[0].items():
        assert torch.equal(value, states[1][name]), name


def test_spatial_re_scored_with_the_ground_truth_box_keeps_its_own_spatial_prompt():
    """Stage 3's diagnostics score each variant's weights with the ground-truth box too (`box="gt"`): SAM gets the
    GT box, and branch B still reads the variant's own prompt (spatial_re: the expression, one slot's projection
    unused), so the weights are not run as another variant."""
    from test_model import WORDS, make_batch

    torch.manual_seed(0)
    model = PPCRModel.build(tiny_config(variant="spatial_re", soft_prompt_tokens=4), extra_words=WORDS).eval()
    batch = make_batch(model)
    with torch.no_grad():
        own = model(batch, compute_loss=False)
        oracle = model(batch, compute_loss=False, box="gt")
    torch.testing.assert_close(oracle.steps.sam_boxes, torch.stack(batch["box"]).float())
    torch.testing.assert_close(oracle.steps.boxes_norm, own.steps.boxes_norm)  # the same branch-B pass
    assert not torch.allclose(own.steps.sam_boxes, oracle.steps.sam_boxes)
    with pytest.raises(ValueError, match="box must be"):
        model(batch, compute_loss=False, box="oracle")
