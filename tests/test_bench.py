"""`ppcr bench` at the tiny preset, the analytic FLOP accounting (`ppcr.perf.flops`), and the output equality of the
batched evaluation path (one batch == one by one, grouped images == each alone, SDPA == eager, bench == predict)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ppcr.perf import flops  # noqa: E402
from ppcr.perf.bench import WORDS, Workload, evaluate_workload, make_expressions  # noqa: E402
from ppcr.cli import main  # noqa: E402
from ppcr.model.config import paper_config, tiny_config  # noqa: E402
from ppcr.model.modeling_ppcr import PPCRModel  # noqa: E402


@pytest.fixture(scope="module")
def model() -> PPCRModel:
    return PPCRModel.build(tiny_config(), extra_words=WORDS).eval()


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    rs = np.random.RandomState(0)
    return [rs.randint(0, 256, (40, 60, 3), dtype=np.uint8), rs.randint(0, 256, (50, 50, 3), dtype=np.uint8),
            rs.randint(0, 256, (64, 32, 3), dtype=np.uint8)]


def assert_same(a: dict, b: dict, box_tol: float = 1e-5) -> None:
    assert a["expression"] == b["expression"]
    np.testing.assert_array_equal(a["mask"], b["mask"])
    np.testing.assert_allclose(a["box"], b["box"], rtol=box_tol, atol=box_tol)
    assert a["score"] == pytest.approx(b["score"], rel=box_tol, abs=box_tol)


# ---------------------------------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------------------------------
def test_bench_command_tiny(tmp_path):
    out = tmp_path / "tmp.json"
    rc = main(["bench", "--preset", "tiny", "--device", "cpu", "--batch-sizes", "1", "4", "--images", "2",
               "--repeats", "1", "--train-batch", "2", "--out", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["label"] == "CPU" and report["device"]["name"]
    for package in ("torch", "transformers", "peft"):
        assert report["versions"][package]
    assert "commit" in report["git"]
    assert report["command"].startswith("ppcr bench --preset tiny")
    assert report["settings"]["batch_sizes"] == [1, 4] and report["settings"]["images"] == 2
    assert report["matmul"]["float32"]["flops_per_s"] > 0
    assert set(report["variants"]) == {"glamm", "ppcr"}
    for variant, e in report["variants"].items():
        for path in ("prefix_cache", "no_prefix_cache"):  # both evaluation paths, timed in the same run
            rows = e[path]["eval"]["by_batch_size"]
            assert [r["batch_size"] for r in rows] == [1, 4]
            assert all(r["expressions_per_s"] > 0 and r["expressions"] == 10 for r in rows)
            assert e[path]["eval"]["best"]["expressions_per_s"] == max(r["expressions_per_s"] for r in rows)
            assert e[path]["bound"]["expressions_per_s"] > 0 and e[path]["bound"]["achieved_ratio"] > 0
            assert e[path]["flops"]["total_per_expression"] > 0
        assert set(e["prefix_cache_speedup"]["by_batch_size"]) == {"1", "4"}
        assert e["prefix_cache_speedup"]["flops_ratio"] > 1  # 5 expressions per image share each prefix
        assert 0 < e["prefix_tokens"]["pass1"] < e["prefix_cache"]["flops"]["pass1_tokens"]
        assert e["latency_batch1"]["median_ms"] > 0
        assert e["train"]["median_s"] > 0 and e["train"]["peak_mib"] > 0 and e["train"]["micro_batch"] == 2
        assert all(np.isfinite(e["train"]["losses"]))
    for path in ("prefix_cache", "no_prefix_cache"):
        assert report["variants"]["glamm"][path]["flops"]["per_expression"]["llm_pass2"] == 0
        assert report["variants"]["ppcr"][path]["flops"]["per_expression"]["llm_pass2"] > 0
    assert report["variants"]["glamm"]["prefix_tokens"]["pass2"] == 0


# ---------------------------------------------------------------------------------------------------------------
# FLOP accounting
# ---------------------------------------------------------------------------------------------------------------
def linear_weights(module: nn.Module) -> int:
    """Weights of the dense layers (biases and LoRA factors excluded)."""
    return sum(m.weight.numel() for n, m in module.named_modules() if isinstance(m, nn.Linear) and "lora_" not in n)


def check_linear_counts(cfg, llava, sam) -> None:
    """FLOPs per token of the dense layers == 2 x their weights, for CLIP, LLaMA and SAM's encoder."""
    clip_layers = llava.model.vision_tower.encoder.layers
    clip_per_token = flops.clip_linear_flops_per_token(cfg.vision)
    assert cfg.vision.num_hidden_layers * clip_per_token == 2 * linear_weights(clip_layers)
    llm_layers = llava.model.language_model.layers
    assert cfg.text.num_hidden_layers * flops.llama_linear_flops_per_token(cfg.text) == 2 * linear_weights(llm_layers)
    blocks = sam.image_encoder.blocks
    assert cfg.sam.encoder_depth * flops.sam_encoder_linear_flops_per_token(cfg.sam) == 2 * linear_weights(blocks)


def test_linear_flops_match_parameter_counts_tiny(model):
    check_linear_counts(model.config, model.mllm.llava, model.segmenter.sam)
    # LoRA: 2 x (A + B) weights of q_proj and v_proj per token and layer
    lora = sum(p.numel() for p in model.mllm.lora_parameters("semantic").values())
    assert model.config.text.num_hidden_layers * flops.lora_flops_per_token(model.config.text, 8) == 2 * lora


def count(fn):
    """FLOPs torch's counter sees. Fused kernels it cannot see into (CPU flash attention, nn.MultiheadAttention's
    fast path) are switched off, so attention decomposes into counted matmuls."""
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            out = fn()
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return counter.get_total_flops(), out


def test_stage_flops_match_torch_flop_counter(model, images):
    """Every stage's analytic count == torch.utils.flop_counter on the tiny model (matmuls, convolutions, SDPA)."""
    cfg = model.config
    prep = model.image_prep()
    sam_in, _ = prep.sam(images[0])
    model.prefix_cache = False  # the full passes (the cached ones: test_cached_pass_flops_match_counter)
    with torch.no_grad():
        n, feats = count(lambda: model.mllm.image_features(prep.clip(images[0])[None]))
        assert n == flops.clip_tower_flops(cfg.vision, cfg.text.hidden_size)
        n, emb = count(lambda: model.segmenter.encode_images(sam_in[None]))
        assert n == flops.sam_encoder_flops(cfg.sam)
        expr = make_expressions(1, 3)
        n, (p_seg, _, _) = count(lambda: model.semantic_step(feats, torch.tensor([0]), expr, None))
        (length,), _ = flops.pass_lengths(cfg, model.tokenizer, expr)
        assert n == flops.llama_pass_flops(cfg.text, length, cfg.lora.r) + flops.prompt_heads_flops(cfg, False)
        n, _ = count(lambda: model.spatial_step(feats, torch.tensor([0]), expr, p_seg, None))
        _, (length2,) = flops.pass_lengths(cfg, model.tokenizer, expr)
        expected = flops.llama_pass_flops(cfg.text, length2, cfg.lora.r) + flops.box_head_flops(cfg) \
            + flops.linear(1, cfg.sam_prompt_dim, cfg.text.hidden_size)  # the soft-token projector
        assert n == expected
        box = torch.tensor([[1.0, 2, 30, 20]])
        n, _ = count(lambda: model.segmenter.decode(emb, torch.tensor([0]), box, p_seg))
        assert n == flops.sam_decoder_flops(cfg.sam, 3)
        n, _ = count(lambda: model.segmenter.decode(emb, torch.tensor([0]), None, p_seg))
        assert n == flops.sam_decoder_flops(cfg.sam, 1)
    model.prefix_cache = True


def test_cached_pass_flops_match_counter(model, images):
    """With the prefix cache, 3 expressions of one image cost one prefix plus 3 suffixes, as `ppcr.perf.flops` counts
    (expressions of equal token length, so no padding is computed)."""
    cfg = model.config
    expr = ["red man left", "blue dog top", "green cup near"]
    len1, len2 = flops.pass_lengths(cfg, model.tokenizer, expr)
    assert len(set(len1)) == 1 and len(set(len2)) == 1
    p1, p2 = flops.pass_prefix_lengths(cfg, model.tokenizer, expr)
    assert cfg.vision.num_image_tokens < p1 < len1[0] and cfg.vision.num_image_tokens < p2 < len2[0]
    index = torch.zeros(3, dtype=torch.long)
    with torch.no_grad():
        feats = model.mllm.image_features(model.image_prep().clip(images[0])[None])
        n, (p_seg, _, _) = count(lambda: model.semantic_step(feats, index, expr, None))
        expected = 3 * flops.llama_cached_pass_flops(cfg.text, p1, len1[0], cfg.lora.r, 3)
        assert n == pytest.approx(expected + 3 * flops.prompt_heads_flops(cfg, False), rel=1e-12)
        n, _ = count(lambda: model.spatial_step(feats, index, expr, p_seg, None))
        expected = 3 * (flops.llama_cached_pass_flops(cfg.text, p2, len2[0], cfg.lora.r, 3)
                        + flops.box_head_flops(cfg) + flops.linear(1, cfg.sam_prompt_dim, cfg.text.hidden_size))
        assert n == pytest.approx(expected, rel=1e-12)


def test_attention_box_head_flops_match_counter():
    cfg = tiny_config(variant="attn_box")
    torch.manual_seed(0)
    from ppcr.model.heads import AttentionBoxHead

    head = AttentionBoxHead(cfg.text.hidden_size, cfg.attn_box_dim, cfg.attn_box_layers, cfg.attn_box_heads,
                            cfg.attn_box_queries, cfg.vision.num_image_tokens).eval()
    feats = torch.randn(1, cfg.vision.num_image_tokens, cfg.text.hidden_size)
    with torch.no_grad():
        n, _ = count(lambda: head(torch.randn(1, cfg.text.hidden_size), feats))
    assert n == flops.box_head_flops(cfg)


def test_paper_preset_flops_in_range():
    """Paper preset (LLaVA-1.5-7B + SAM ViT-H) built on the meta device: dense layers == 2 x parameters, and the
    totals where the literature puts them."""
    from ppcr.model.mllm import llava_config
    from ppcr.model.segmentation import build_sam
    from ppcr.model.tokenizer import build_word_tokenizer
    from transformers import LlavaForConditionalGeneration

    cfg = paper_config()
    tok = build_word_tokenizer(WORDS)
    with torch.device("meta"):
        llava = LlavaForConditionalGeneration(llava_config(cfg, tok))
        sam = build_sam(cfg.sam)
    check_linear_counts(cfg, llava, sam)
    llm_params = linear_weights(llava.model.language_model.layers)
    assert 6.3e9 < llm_params < 6.6e9  # LLaMA-7B without embeddings and LM head

    expressions = make_expressions(100, 0)
    len1, len2 = flops.pass_lengths(cfg, tok, expressions)
    assert all(600 < n < 700 for n in len1 + len2)  # 576 image tokens + system prompt + template + expression
    ev = flops.evaluation_flops(cfg, len1, len2, 5)
    per_image = ev.per_image
    assert per_image["clip_tower"] == pytest.approx(2 * 0.303e9 * 577, rel=0.25)  # ViT-L/14-336: ~0.35-0.4 TFLOP
    assert per_image["sam_image_encoder"] == pytest.approx(2 * 2.97e12, rel=0.05)  # ViT-H: 2.97 TMAC
    dense = 2 * llm_params * ev.pass1_tokens
    assert dense < ev.per_expression["llm_pass1"] < 1.1 * dense  # attention adds a few %
    assert 15e12 < ev.total < 22e12  # PPCR: two 7B passes of ~640 tokens + a fifth of SAM-H + CLIP
    glamm = flops.evaluation_flops(cfg.replace(variant="glamm"), len1, [], 5)
    assert glamm.per_expression["llm_pass2"] == 0 and 8e12 < glamm.total < 12e12


# ---------------------------------------------------------------------------------------------------------------
# the batched paths give the same outputs
# ---------------------------------------------------------------------------------------------------------------
def test_one_batch_equals_one_by_one(model, images):
    expressions = make_expressions(5, 1)
    batched = model.predict(images[0], expressions, batch_size=16)
    for expr, b in zip(expressions, batched, strict=True):
        assert_same(model.predict(images[0], expr)[0], b)


def test_grouped_images_equal_each_image_alone(model, images):
    expressions = make_expressions(7, 2)
    groups = [expressions[:3], expressions[3:5], expressions[5:]]
    together = model.predict(images, groups, batch_size=16)
    assert [r["image_index"] for r in together] == [0, 0, 0, 1, 1, 2, 2]
    alone = [r for im, g in zip(images, groups) for r in model.predict(im, g)]
    for a, b in zip(alone, together, strict=True):
        assert_same(a, b)


def test_bench_path_equals_predict(model, images):
    """bench.evaluate_workload (streamed encodings, inference_mode, batches across images) == predict."""
    prep = model.image_prep()
    expressions = make_expressions(6, 4)
    groups = [expressions[:2], expressions[2:3], expressions[3:]]
    sam = [prep.sam(im) for im in images]
    work = Workload(torch.stack([prep.clip(im) for im in images]), torch.stack([s[0] for s in sam]),
                    [s[1] for s in sam], [im.shape[:2] for im in images],
                    [(i, e) for i, g in enumerate(groups) for e in g])
    reference = model.predict(images, groups, batch_size=16)
    for batch_size in (1, 4):
        for a, b in zip(reference, evaluate_workload(model, work, batch_size, keep=True), strict=True):
            assert a["image_index"] == b["image_index"]
            assert_same(a, b)


def test_sdpa_equals_eager(images):
    eager = PPCRModel.build(tiny_config(attn_implementation="eager"), extra_words=WORDS).eval()
    sdpa = PPCRModel.build(tiny_config(attn_implementation="sdpa"), extra_words=WORDS).eval()
    for (name, a), (_, b) in zip(eager.state_dict().items(), sdpa.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)  # same seed, same weights
    groups = [make_expressions(3, 5), make_expressions(2, 6)]
    for a, b in zip(eager.predict(images[:2], groups), sdpa.predict(images[:2], groups), strict=True):
        np.testing.assert_allclose(a["p_seg_txt"], b["p_seg_txt"], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(a["p_seg_box"], b["p_seg_box"], rtol=1e-4, atol=1e-4)
        assert_same(a, b, box_tol=1e-4)


def test_cached_flops_accounting(model):
    cfg = model.config
    (length,), _ = flops.pass_lengths(cfg, model.tokenizer, make_expressions(1, 0))
    # no prefix, or one expression per image: exactly the plain pass
    assert flops.llama_cached_pass_flops(cfg.text, 0, length, 8, 1) == flops.llama_pass_flops(cfg.text, length, 8)
    with pytest.raises(ValueError):
        flops.llama_cached_pass_flops(cfg.text, length + 1, length, 8, 1)
    # sharing a prefix across 5 expressions saves most of its work
    assert flops.llama_cached_pass_flops(cfg.text, length - 10, length, 8, 5) < flops.llama_pass_flops(cfg.text,
                                                                                                        length, 8)


def test_paper_preset_prefix_cache_flops():
    """Paper preset, 5 expressions per image: the cached LLM work per expression is about a quarter of the full."""
    from ppcr.model.tokenizer import build_word_tokenizer

    cfg = paper_config()
    tok = build_word_tokenizer(WORDS)
    expressions = make_expressions(100, 0)
    len1, len2 = flops.pass_lengths(cfg, tok, expressions)
    p1, p2 = flops.pass_prefix_lengths(cfg, tok, expressions)
    assert 576 < p1 < min(len1) and 576 < p2 < min(len2)
    full = flops.evaluation_flops(cfg, len1, len2, 5)
    cached = flops.evaluation_flops(cfg, len1, len2, 5, (p1, p2))
    llm = [e.per_expression["llm_pass1"] + e.per_expression["llm_pass2"] for e in (full, cached)]
    assert 15e12 < llm[0] < 19e12 and 3e12 < llm[1] < 5e12
    assert cached.per_image == full.per_image and cached.total < full.total / 3
