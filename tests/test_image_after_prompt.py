"""The question before the image (`PPCRConfig.image_after_prompt`) and stage 1's image-token grounding loss.

With LLaVA's order (image first) the causal mask hides the expression from every image token; with the question
first each image token can attend to it, which is what the grounding loss (`MllmPretrainer(image_grounding=...)`)
trains: the image tokens' softmax must pick the target's patches.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from ppcr.data.transforms import MIN_COVER, patch_coverage, target_patches
from ppcr.model import prompts
from ppcr.model.config import TrainingRecipe, tiny_config
from ppcr.model.mllm import MultimodalLLM, shared_prefix_length
from ppcr.model.modeling_ppcr import PPCRModel
from ppcr.model.tokenizer import encode_pass
from ppcr.training.mllm_pretrain import MllmPretrainer
from ppcr.model.tokenizer import synref_tokenizer


def test_conversation_order():
    ctx, ans = prompts.conversation("Where is the red circle?", "Sure.", "")
    assert ctx == f"USER: {prompts.IMAGE_TOKEN}\nWhere is the red circle? ASSISTANT:" and ans == " Sure."
    ctx, _ = prompts.conversation("Where is the red circle?", "Sure.", "", image_after_prompt=True)
    assert ctx == f"USER: Where is the red circle?\n{prompts.IMAGE_TOKEN} ASSISTANT:"


def test_target_patches_cover_the_object_and_never_come_back_empty():
    mask = np.zeros((64, 64), np.uint8)
    mask[0:16, 16:32] = 1  # exactly patch (row 0, col 1) of a 4 x 4 grid
    cover = patch_coverage(mask, 4)
    assert cover[1] == pytest.approx(1.0) and cover.sum() == pytest.approx(1.0)
    np.testing.assert_array_equal(target_patches(mask, 4).numpy(), (cover >= MIN_COVER).astype(np.float32))
    speck = np.zeros((64, 64), np.uint8)
    speck[40, 50] = 1  # far below MIN_COVER of any patch: its own patch is the target
    t = target_patches(speck, 4)
    assert t.sum() == 1 and t[2 * 4 + 3] == 1
    assert target_patches(np.zeros((64, 64), np.uint8), 4).sum() == 0


def _grounding_batch(expressions: list[str], seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    n, cfg = len(expressions), tiny_config()
    side = cfg.vision.image_size // cfg.vision.patch_size
    tp = torch.zeros(n, side * side)
    tp[torch.arange(n), torch.arange(n) % (side * side)] = 1
    return {"clip_pixel_values": torch.randn(n, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g),
            "expression": expressions, "attributes": [{"color": "red", "shape": "circle"}] * n,
            "box": [torch.tensor([4.0, 4.0, 20.0, 20.0])] * n, "original_size": [(32, 32)] * n,
            "target_patches": list(tp)}


def test_image_tokens_see_the_expression_only_after_the_question():
    """Changing the expression changes the image tokens' grounding logits with the question first, and cannot with
    the image first (causal mask): the grounding loss needs `image_after_prompt`, and refuses to run without it."""
    with pytest.raises(ValueError, match="image_after_prompt"):
        MllmPretrainer(tiny_config(), synref_tokenizer(), image_grounding=1.0)
    logits = {}
    for after in (False, True):
        torch.manual_seed(0)
        module = MllmPretrainer(tiny_config(image_after_prompt=after), synref_tokenizer()).eval()
        module.grounding_head = torch.nn.Linear(tiny_config().text.hidden_size, 1)  # read-out only, for the check
        for expr in ("the red circle", "the blue square"):
            batch = _grounding_batch([expr])
            with torch.no_grad():
                logits[after, expr] = module.image_token_logits(*module.sequence_hidden(batch, ["where"]))
    torch.testing.assert_close(logits[False, "the red circle"], logits[False, "the blue square"])
    assert (logits[True, "the red circle"] - logits[True, "the blue square"]).abs().max() > 1e-4


def test_grounding_loss_trains_and_is_reported():
    torch.manual_seed(0)
    module = MllmPretrainer(tiny_config(image_after_prompt=True), synref_tokenizer(), probe_weight=5.0,
                            probe_positions="all", probe_giou=False, image_grounding=1.0)
    batch = _grounding_batch(["the red circle", "the blue square", "the green star", "the big one"])
    opt = torch.optim.AdamW(module.parameters(), lr=3e-3)
    first = None
    for step in range(30):
        losses = module(batch, random.Random(step))
        assert {"grounding_ce", "grounding_hit"} <= set(losses)
        first = float(losses["grounding_ce"].detach()) if first is None else first
        opt.zero_grad()
        losses["total"].backward()
        opt.step()
    assert float(losses["grounding_ce"].detach()) < 0.5 * first  # a fixed batch is learnable through the image tokens
    module.eval()
    metrics = module.val_metrics([{k: v[i] for k, v in batch.items()}
                                  for i in range(4)], batch_size=4)
    assert 0.0 <= metrics["grounding_hit"] <= 100.0
    assert 0.0 <= metrics["where_free_box_acc50"] <= 100.0 and 0.0 <= metrics["where_free_box_iou"] <= 100.0


@pytest.fixture(scope="module")
def model_after() -> PPCRModel:
    torch.manual_seed(0)
    words = ["red", "blue", "circle", "square", "the", "left", "big", "one"]
    return PPCRModel.build(tiny_config(image_after_prompt=True), extra_words=words).eval()


def test_prefix_cache_steps_aside_when_the_image_follows_the_expression(model_after, monkeypatch):
    """The rows' shared prefix ends at the expression, before the image slots: nothing can be cached, and predict
    runs the full sequences (the same outputs as with the cache off)."""
    tok = model_after.tokenizer
    ctx, ans = zip(*[prompts.conversation(prompts.fill(prompts.SEMANTIC_TEMPLATES[0], e), prompts.SEMANTIC_ANSWER,
                                          "", image_after_prompt=True) for e in ("the red circle", "left blue square")])
    enc = encode_pass(tok, ctx, ans, prompts.SEG_TOKEN, 4)
    image_id = tok.convert_tokens_to_ids(prompts.IMAGE_TOKEN)
    assert shared_prefix_length(enc) > 0  # without the image id it would cut into the expression's prefix
    assert shared_prefix_length(enc, None, image_id) == 0
    monkeypatch.setattr(MultimodalLLM, "_run_cached", lambda *a: pytest.fail("cached a prefix without the image"))
    image = np.random.RandomState(0).randint(0, 256, (40, 48, 3), dtype=np.uint8)
    exprs = [["the red circle", "left blue square", "the big one"]]
    model_after.prefix_cache = True
    cached = model_after.predict([image], exprs, batch_size=8)
    model_after.prefix_cache = False
    full = model_after.predict([image], exprs, batch_size=8)
    for a, b in zip(full, cached, strict=True):
        np.testing.assert_array_equal(a["mask"], b["mask"])
        np.testing.assert_allclose(a["box"], b["box"])


@pytest.mark.parametrize("variant", ["ppcr", "spatial_re"])
def test_ris_training_step_with_the_question_first(variant):
    """Stages 2-3 run the same code with the image after the question: finite losses, gradients into both LoRA
    branches."""
    from test_model import WORDS, make_batch  # tests/ is on sys.path (pytest prepend import mode)

    torch.manual_seed(0)
    model = PPCRModel.build(tiny_config(variant=variant, image_after_prompt=True), extra_words=WORDS).train()
    out = model(make_batch(model), rng=random.Random(0))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    lora = {n: p.grad for n, p in model.named_parameters() if "lora_" in n and p.requires_grad}
    for branch in ("semantic", "spatial"):
        assert any(g is not None and g.abs().sum() > 0 for n, g in lora.items() if f".{branch}." in n), branch


def test_ris_grounding_loss_needs_the_question_first():
    with pytest.raises(ValueError, match="image_after_prompt"):
        PPCRModel.build(tiny_config(), extra_words=["red"], recipe=TrainingRecipe(train_image_grounding=1.0))


@pytest.mark.parametrize("variant,passes", [("glamm", 1), ("ppcr", 2)])
def test_ris_grounding_loss_per_llm_pass(variant, passes):
    """Stages 2-3 with `train_image_grounding`: one grounding term per LLM pass (branch A; branch B where the
    variant has it), added to the total with its weight; through branch B's image tokens it reaches the soft-token
    projection of P_seg_txt. In evaluation nothing changes: the same weights give the same masks and boxes."""
    from test_model import WORDS, make_batch

    torch.manual_seed(0)
    model = PPCRModel.build(tiny_config(variant=variant, image_after_prompt=True), extra_words=WORDS,
                            recipe=TrainingRecipe(train_image_grounding=2.0)).train()
    batch = make_batch(model)
    out = model(batch, rng=random.Random(0))
    assert len(out.steps.grounding_logits) == passes
    assert out.steps.grounding_logits[0].shape == (3, tiny_config().vision.num_image_tokens)
    eq7 = sum(getattr(model.recipe.loss, k) * out.losses[k] for k in ("bce", "dice", "l1", "ce"))
    torch.testing.assert_close(out.losses["total"], eq7 + 2.0 * out.losses["grounding"])
    assert float(out.losses["grounding"].detach()) > 0
    model.zero_grad()
    out.losses["grounding"].backward()
    assert model.grounding_head.weight.grad.abs().sum() > 0
    soft_grad = model.seg_to_llm.weight.grad
    assert (soft_grad is not None and soft_grad.abs().sum() > 0) == (variant == "ppcr")

    model.eval()
    with torch.no_grad():
        assert not model(batch).steps.grounding_logits and "grounding" not in model(batch).losses
        plain = PPCRModel.build(model.config, tokenizer=model.tokenizer).eval()  # the paper's recipe: no head
        plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("grounding_head.")})
        for a, b in zip(model.predict(batch["images"], [["left red circle", "green star"], ["green star"]]),
                        plain.predict(batch["images"], [["left red circle", "green star"], ["green star"]])):
            np.testing.assert_array_equal(a["mask"], b["mask"])
