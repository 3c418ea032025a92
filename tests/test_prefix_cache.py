"""The evaluation prefix cache (`MultimodalLLM.prefix_cache`): each image's shared prompt prefix runs once per LoRA
branch and every expression's suffix attends to its keys/values. The outputs must equal the full sequences'.

The two paths are not bit-identical on the CPU: the prefix runs with another batch shape and mask than the full
sequences, so the matmul kernels round differently (measured: P_seg_txt within 2e-7, boxes within 4e-6 pixels at
the tiny preset). Masks are compared exactly; the float outputs within 1e-5.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from ppcr.model import prompts
from ppcr.model.config import tiny_config
from ppcr.model.mllm import MultimodalLLM, shared_prefix_length
from ppcr.model.modeling_ppcr import PPCRModel
from ppcr.model.tokenizer import encode_pass

WORDS = ["red", "blue", "green", "circle", "square", "star", "left", "right", "big", "small", "one", "on", "the",
         "striped", "purple", "thing", "a"]
TOL = 1e-5


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    rs = np.random.RandomState(0)
    return [rs.randint(0, 256, (40 + 8 * i, 56, 3), dtype=np.uint8) for i in range(3)]


# one image with a single expression, one with several, expressions that share their first words
GROUPS = [["the red circle"], ["left blue square", "the big one on the right", "a", "the red star"],
          ["green thing", "the striped small purple star"]]


def build(variant: str) -> PPCRModel:
    torch.manual_seed(0)
    return PPCRModel.build(tiny_config(variant=variant), extra_words=WORDS).eval()


def both_paths(model: PPCRModel, *args, **kwargs) -> tuple[list[dict], list[dict]]:
    model.prefix_cache = False
    full = model.predict(*args, **kwargs)
    model.prefix_cache = True
    return full, model.predict(*args, **kwargs)


def assert_equal_outputs(full: list[dict], cached: list[dict]) -> None:
    assert len(full) == len(cached)
    for a, b in zip(full, cached, strict=True):
        assert (a["image_index"], a["expression"]) == (b["image_index"], b["expression"])
        np.testing.assert_array_equal(a["mask"], b["mask"])
        np.testing.assert_allclose(a["p_seg_txt"], b["p_seg_txt"], rtol=TOL, atol=TOL)
        assert a["score"] == pytest.approx(b["score"], rel=TOL, abs=TOL)
        for key in ("box", "box_norm", "p_seg_box"):
            if a[key] is None:
                assert b[key] is None
            else:
                np.testing.assert_allclose(a[key], b[key], rtol=TOL, atol=TOL)


@pytest.mark.parametrize("variant", ["ppcr", "glamm", "spatial_re", "spatial_re_seg", "attn_box", "gt_box_oracle"])
def test_cached_equals_full_sequences(variant, images, monkeypatch):
    """Masks, boxes and P_seg_txt equal with and without the cache, for every variant (the soft token [P_SEG] sits
    in the suffix of `ppcr`'s spatial prompt), on batches that mix images with 1 and with many expressions."""
    model = build(variant)
    calls = []
    run_cached = MultimodalLLM._run_cached
    monkeypatch.setattr(MultimodalLLM, "_run_cached", lambda self, *a: calls.append(a[-1]) or run_cached(self, *a))
    n = sum(map(len, GROUPS))
    boxes = [[2.0, 3.0, 30.0, 25.0]] * n if variant == "gt_box_oracle" else None
    for batch_size in (3, 16):  # batches cut across images, and one batch holding all of them
        full, cached = both_paths(model, images, GROUPS, boxes=boxes, batch_size=batch_size)
        assert_equal_outputs(full, cached)
    # batches of 3 over images with 1, 4 and 2 expressions: [0 1 1] [1 1 2] [2] (nothing to share: full path)
    passes = 2 if model.config.spec.uses_spatial_step else 1
    assert len(calls) == passes * (2 + 1)  # every pass of every batch with a shared image took the cached path
    assert all(p > model.config.vision.num_image_tokens for p in calls)


def test_nothing_to_share_runs_the_full_sequences(images, monkeypatch):
    """One expression per image in every batch: no prefix to share, so no cache is built (its extra call would
    only cost time, as `ppcr bench` measured at batch 1)."""
    model = build("ppcr")
    monkeypatch.setattr(MultimodalLLM, "_run_cached", lambda *a: pytest.fail("cache built with nothing to share"))
    model.predict(images[0], "the red circle")
    model.predict(images, [["a"], ["the red star"], ["green thing"]], batch_size=16)


def test_prefix_stops_before_the_soft_token_and_the_expression():
    model = build("ppcr")
    tok = model.tokenizer
    n_img = model.config.vision.num_image_tokens
    template = prompts.SPATIAL_TEMPLATES[0]  # "Given the token {P} for ..."
    ctx, ans = zip(*[prompts.conversation(prompts.fill(template), prompts.SPATIAL_ANSWER, "")] * 2)
    enc = encode_pass(tok, ctx, ans, prompts.BOX_TOKEN, n_img)
    soft = tok.convert_tokens_to_ids(prompts.PSEG_TOKEN)
    slot = int((enc.input_ids[0] == soft).nonzero()[0])
    # identical rows: the ids alone would share everything up to the query; the soft token's content differs
    assert shared_prefix_length(enc) == int(enc.query_index[0])
    assert shared_prefix_length(enc, soft) == slot
    sem = [prompts.conversation(prompts.fill(prompts.SEMANTIC_TEMPLATES[0], e), prompts.SEMANTIC_ANSWER, "")
           for e in ("red circle", "blue star")]
    enc = encode_pass(tok, [c for c, _ in sem], [a for _, a in sem], prompts.SEG_TOKEN, n_img)
    p = shared_prefix_length(enc)
    assert p > n_img and tok.convert_ids_to_tokens(int(enc.input_ids[0, p])) == "red"  # the expression's start


def test_training_and_gradients_use_the_full_sequences(images, monkeypatch):
    """Training (CE, gradients) never takes the cached path; the cache is an evaluation switch only."""
    model = build("ppcr")
    monkeypatch.setattr(MultimodalLLM, "_run_cached", lambda *a: pytest.fail("cached path used in training"))
    prep = model.image_prep()
    batch = {"clip_pixel_values": torch.stack([prep.clip(images[0])] * 2),
             "sam_pixel_values": torch.stack([prep.sam(images[0])[0]] * 2),
             "sam_input_size": [prep.sam(images[0])[1]] * 2, "original_size": [images[0].shape[:2]] * 2,
             "image_key": ["a", "a"], "expression": ["red circle", "blue star"],
             "mask": [torch.ones(images[0].shape[:2], dtype=torch.uint8)] * 2,
             "box": [torch.tensor([1.0, 2.0, 20.0, 30.0])] * 2}
    model.train()
    out = model(batch, rng=random.Random(0))
    out.loss.backward()
    assert any(p.grad is not None for p in model.mllm.lora_parameters("semantic").values())
