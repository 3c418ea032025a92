"""Analytic FLOP accounting of the PPCR model, stage by stage, from a `PPCRConfig` alone.

Convention: a matrix product of an (m x k) by a (k x n) matrix costs 2*m*n*k FLOPs. Every linear layer, convolution
and attention product (Q K^T and A V, over the *full* score matrix, as the dense kernels compute it; a causal kernel
that skips the masked half would do less) is counted; normalisations, activations, softmax, bias additions,
interpolation and thresholding are not (they are memory-bound and small in FLOPs).

Stages (the order of `STAGES`):
    clip_tower        CLIP ViT (image tokens + CLS, every layer runs) + LLaVA's 2-layer projector, once per image
    sam_image_encoder SAM ViT (windowed + global attention, decomposed relative positions, neck), once per image
    llm_pass1         LLaMA over the semantic prompt (image tokens + prompt tokens), LoRA branch A
    llm_pass2         LLaMA over the spatial prompt, LoRA branch B (not run by `glamm`)
    prompt_heads      text_hidden_fcs (-> P_seg_txt) and the soft-token projector (-> [P_SEG])
    box_head          F_Map (MLP) or the attention box head
    sam_mask_decoder  SAM's two-way transformer, upscaling, hypernetwork MLPs, IoU head, dense PE, once per expression

A linear layer of `p` weights costs 2*p FLOPs per token, so the dense part of each transformer is checked against
the built model's parameter count (`*_linear_flops_per_token`, tested at the tiny and paper presets).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from ppcr.model import prompts
from ppcr.model.config import PPCRConfig, PromptChoice, SamSettings, TextConfig, VisionConfig
from ppcr.model.mllm import shared_prefix_length
from ppcr.model.tokenizer import encode_pass

STAGES = ("clip_tower", "sam_image_encoder", "llm_pass1", "llm_pass2", "prompt_heads", "box_head",
          "sam_mask_decoder")
IMAGE_STAGES = ("clip_tower", "sam_image_encoder")  # run once per image, shared by its expressions
LLM_STAGES = ("clip_tower", "llm_pass1", "llm_pass2")  # run in the MLLM's dtype; the rest in float32


def linear(tokens: int, d_in: int, d_out: int) -> int:
    """FLOPs of a linear layer over `tokens` rows."""
    return 2 * tokens * d_in * d_out


def attention(q_tokens: int, k_tokens: int, width: int) -> int:
    """Q K^T plus A V over all heads (`width` = heads * head_dim)."""
    return 2 * (2 * q_tokens * k_tokens * width)


# ---------------------------------------------------------------------------------------------------------------
# CLIP vision tower + projector
# ---------------------------------------------------------------------------------------------------------------
def clip_linear_flops_per_token(v: VisionConfig) -> int:
    """Per token and layer: q, k, v, out (4 d^2) and the MLP (2 d I)."""
    return 2 * (4 * v.hidden_size**2 + 2 * v.hidden_size * v.intermediate_size)


def clip_tower_flops(v: VisionConfig, llm_hidden: int) -> int:
    """One image: patch embedding, every encoder layer on N_img + 1 tokens (transformers runs them all, although
    LLaVA reads layer -2), and the projector on the N_img tokens (CLS dropped)."""
    n = v.num_image_tokens
    t = n + 1
    patch = linear(n, 3 * v.patch_size**2, v.hidden_size)
    per_layer = t * clip_linear_flops_per_token(v) + attention(t, t, v.hidden_size)
    projector = linear(n, v.hidden_size, llm_hidden) + linear(n, llm_hidden, llm_hidden)
    return patch + v.num_hidden_layers * per_layer + projector


# ---------------------------------------------------------------------------------------------------------------
# LLaMA
# ---------------------------------------------------------------------------------------------------------------
def llama_linear_flops_per_token(t: TextConfig) -> int:
    """Per token and layer: q, o (d x d), k, v (d x kv), gate, up, down (d x I)."""
    d = t.hidden_size
    kv = t.num_key_value_heads * (d // t.num_attention_heads)
    return 2 * (2 * d * d + 2 * d * kv + 3 * d * t.intermediate_size)


def lora_flops_per_token(t: TextConfig, r: int) -> int:
    """LoRA on q_proj and v_proj of each layer: x A (d x r) then B (r x out)."""
    d = t.hidden_size
    kv = t.num_key_value_heads * (d // t.num_attention_heads)
    return 2 * (d * r + r * d) + 2 * (d * r + r * kv)


def llama_pass_flops(t: TextConfig, seq_len: int, lora_r: int = 0) -> int:
    """One forward of the decoder stack (no LM head: the passes read a hidden state) over `seq_len` tokens."""
    per_layer = seq_len * (llama_linear_flops_per_token(t) + lora_flops_per_token(t, lora_r)) \
        + attention(seq_len, seq_len, t.hidden_size)
    return t.num_hidden_layers * per_layer


# ---------------------------------------------------------------------------------------------------------------
# SAM
# ---------------------------------------------------------------------------------------------------------------
def sam_encoder_linear_flops_per_token(s: SamSettings) -> int:
    """Per token and block: qkv (3 D^2), proj (D^2), MLP (2 * 4 D^2)."""
    return 2 * 12 * s.encoder_embed_dim**2


def sam_encoder_flops(s: SamSettings) -> int:
    """One image through ImageEncoderViT. Windowed blocks pad the grid to a multiple of the window; their qkv and
    proj run on the padded tokens, their MLP on the real ones."""
    side = s.embedding_size
    tokens = side * side
    dim = s.encoder_embed_dim
    padded_side = math.ceil(side / s.window_size) * s.window_size
    windows = (padded_side // s.window_size) ** 2
    win_tokens = s.window_size**2
    total = linear(tokens, 3 * s.patch_size**2, dim)  # patch embedding
    for i in range(s.encoder_depth):
        mlp = linear(tokens, dim, 4 * dim) + linear(tokens, 4 * dim, dim)
        if i in s.encoder_global_attn_indexes:
            attn_tokens = tokens
            scores = attention(tokens, tokens, dim)
            rel_pos = 2 * tokens * (side + side) * dim  # einsums with Rh (side x hd) and Rw, over all heads
        else:
            attn_tokens = windows * win_tokens
            scores = windows * attention(win_tokens, win_tokens, dim)
            rel_pos = windows * 2 * win_tokens * (2 * s.window_size) * dim
        total += linear(attn_tokens, dim, 3 * dim) + linear(attn_tokens, dim, dim) + scores + rel_pos + mlp
    c = s.prompt_embed_dim
    total += linear(tokens, dim, c) + linear(tokens, 9 * c, c)  # neck: 1x1 conv, 3x3 conv
    return total


def sam_decoder_flops(s: SamSettings, num_sparse: int) -> int:
    """One expression through MaskDecoder (single-mask output still computes all four masks) with `num_sparse`
    prompt tokens (box corners + P_seg_txt), plus the prompt encoder's dense positional encoding."""
    c = s.prompt_embed_dim
    img = s.embedding_size**2
    tok = 1 + 4 + num_sparse  # IoU token, 4 mask tokens, prompts
    half = c // 2  # cross-attention downsample rate 2

    def attn_block(nq: int, nk: int, inner: int) -> int:
        return linear(nq, c, inner) + 2 * linear(nk, c, inner) + linear(nq, inner, c) + attention(nq, nk, inner)

    per_layer = (attn_block(tok, tok, c)  # self-attention of the tokens
                 + attn_block(tok, img, half)  # tokens -> image
                 + linear(tok, c, s.decoder_mlp_dim) + linear(tok, s.decoder_mlp_dim, c)
                 + attn_block(img, tok, half))  # image -> tokens
    total = s.decoder_depth * per_layer + attn_block(tok, img, half)  # final token -> image attention
    total += 4 * linear(img, c, c // 4) + 4 * linear(4 * img, c // 4, c // 8)  # two 2x2 transposed convolutions
    total += 4 * (2 * linear(1, c, c) + linear(1, c, c // 8))  # hypernetwork MLPs of the 4 mask tokens
    total += linear(4, c // 8, 16 * img)  # masks = hyper @ upscaled
    h = s.iou_head_hidden_dim
    total += linear(1, c, h) + linear(1, h, h) + linear(1, h, 4)  # IoU head
    total += linear(img, 2, c // 2)  # get_dense_pe: random Fourier features of the grid
    if num_sparse > 1:
        total += linear(num_sparse - 1, 2, c // 2)  # the box corners' Fourier features
    return total


# ---------------------------------------------------------------------------------------------------------------
# heads
# ---------------------------------------------------------------------------------------------------------------
def prompt_heads_flops(cfg: PPCRConfig, spatial: bool) -> int:
    """text_hidden_fcs (d -> d -> C) and, when branch B runs with a soft token, seg_to_llm (C -> d)."""
    d, c = cfg.text.hidden_size, cfg.sam_prompt_dim
    total = linear(1, d, d) + linear(1, d, c)
    if spatial and cfg.spec.spatial_source != "re":
        total += linear(1, c, d)
    return total


def box_head_flops(cfg: PPCRConfig) -> int:
    """F_Map (d -> h -> h -> 4) or the attention head (nn.TransformerDecoder over the image tokens)."""
    d = cfg.text.hidden_size
    if cfg.spec.box_head == "mlp":
        h = cfg.box_head_hidden
        return linear(1, d, h) + linear(1, h, h) + linear(1, h, 4)
    dim, n_img = cfg.attn_box_dim, cfg.vision.num_image_tokens
    q = 1 + cfg.attn_box_queries
    per_layer = (linear(q, dim, 3 * dim) + attention(q, q, dim) + linear(q, dim, dim)  # self-attention
                 + linear(q, dim, dim) + linear(n_img, dim, 2 * dim) + attention(q, n_img, dim)
                 + linear(q, dim, dim)  # cross-attention
                 + linear(q, dim, 4 * dim) + linear(q, 4 * dim, dim))
    return (linear(1, d, dim) + linear(n_img, d, dim) + cfg.attn_box_layers * per_layer
            + linear(1, dim, dim) + linear(1, dim, 4))


# ---------------------------------------------------------------------------------------------------------------
# sequence lengths and the totals
# ---------------------------------------------------------------------------------------------------------------
def encoded_passes(cfg: PPCRConfig, tokenizer, expressions: Sequence[str], choice: PromptChoice = PromptChoice()):
    """The evaluation encodings (`EncodedPass`) of pass 1 and pass 2 (None for `glamm`) for `expressions`: the real
    templates at the evaluation's index (`choice`), through `tokenizer`, image tokens expanded."""

    def encode(templates: tuple[str, ...], index: int, answer: str, query: str):
        template = prompts.pick_template(templates, None, index)
        ctx, ans = zip(*[prompts.conversation(prompts.fill(template, e), answer, cfg.system_prompt,
                                              cfg.image_after_prompt)
                         for e in expressions])
        return encode_pass(tokenizer, ctx, ans, query, cfg.vision.num_image_tokens)

    first = encode(prompts.SEMANTIC_TEMPLATES, choice.semantic_template, prompts.SEMANTIC_ANSWER, prompts.SEG_TOKEN)
    second = None
    if cfg.spec.uses_spatial_step:
        second = encode(prompts.spatial_templates(cfg.spec.spatial_source), choice.spatial_template,
                        prompts.SPATIAL_ANSWER, prompts.BOX_TOKEN)
    return first, second


def pass_lengths(cfg: PPCRConfig, tokenizer, expressions: Sequence[str]) -> tuple[list[int], list[int]]:
    """Unpadded token counts of pass 1 and pass 2 per expression (evaluation templates; image tokens expanded).
    Pass 2 is [] for `glamm`."""
    first, second = encoded_passes(cfg, tokenizer, expressions)
    return ([int(x) for x in first.attention_mask.sum(dim=1)],
            [] if second is None else [int(x) for x in second.attention_mask.sum(dim=1)])


def pass_prefix_lengths(cfg: PPCRConfig, tokenizer, expressions: Sequence[str]) -> tuple[int, int]:
    """The prefix each pass computes once per image with the prefix cache (`mllm.shared_prefix_length` over
    `expressions`, which should not all begin with the same word): pass 1, pass 2 (0 for `glamm`)."""

    first, second = encoded_passes(cfg, tokenizer, expressions)
    soft = tokenizer.convert_tokens_to_ids(prompts.PSEG_TOKEN) if cfg.spec.spatial_source != "re" else None
    image = tokenizer.convert_tokens_to_ids(prompts.IMAGE_TOKEN)
    return (shared_prefix_length(first, None, image),
            0 if second is None else shared_prefix_length(second, soft, image))


def llama_cached_pass_flops(t: TextConfig, prefix: int, seq_len: int, lora_r: int,
                            rows_per_prefix: float) -> float:
    """One pass over `seq_len` tokens whose first `prefix` were computed once for `rows_per_prefix` rows (an image's
    expressions) and kept as keys/values: the prefix's share, plus the suffix's layers, each of its tokens
    attending to the prefix and the suffix (the dense kernel's full score matrix)."""
    if not 0 <= prefix <= seq_len:
        raise ValueError(f"prefix {prefix} outside a pass of {seq_len} tokens")
    suffix = seq_len - prefix
    own = t.num_hidden_layers * (suffix * (llama_linear_flops_per_token(t) + lora_flops_per_token(t, lora_r))
                                 + attention(suffix, seq_len, t.hidden_size))
    return llama_pass_flops(t, prefix, lora_r) / rows_per_prefix + own


@dataclass
class EvalFlops:
    """FLOPs of evaluation, per expression, by stage (image stages divided by expressions per image)."""

    per_expression: dict[str, float]
    per_image: dict[str, int]  # the image stages for one image
    pass1_tokens: float  # mean unpadded length
    pass2_tokens: float
    expressions_per_image: float

    @property
    def total(self) -> float:
        return sum(self.per_expression.values())

    def stage_dtype(self, stage: str, mllm_dtype: str) -> str:
        return mllm_dtype if stage in LLM_STAGES else "float32"

    def bound_seconds(self, rates: dict[str, float], mllm_dtype: str) -> float:
        """Compute-bound time per expression: each stage's FLOPs over the matmul rate of the dtype it runs in."""
        return sum(f / rates[self.stage_dtype(s, mllm_dtype)] for s, f in self.per_expression.items())

    def to_dict(self) -> dict:
        return {"per_expression": self.per_expression, "total_per_expression": self.total,
                "per_image": self.per_image, "pass1_tokens": self.pass1_tokens, "pass2_tokens": self.pass2_tokens,
                "expressions_per_image": self.expressions_per_image}


def evaluation_flops(cfg: PPCRConfig, pass1_tokens: Sequence[int], pass2_tokens: Sequence[int],
                     expressions_per_image: float, prefix_lengths: tuple[int, int] | None = None) -> EvalFlops:
    """Mean FLOPs per expression of `cfg.variant` at evaluation, for the given per-expression pass lengths;
    with `prefix_lengths` (pass 1, pass 2), the prefix-cached LLM passes (each image's prefix once)."""
    spatial = cfg.spec.uses_spatial_step
    t1 = sum(pass1_tokens) / len(pass1_tokens)
    t2 = sum(pass2_tokens) / len(pass2_tokens) if spatial else 0.0
    r = cfg.lora.r
    per_image = {"clip_tower": clip_tower_flops(cfg.vision, cfg.text.hidden_size),
                 "sam_image_encoder": sam_encoder_flops(cfg.sam)}

    def pass_flops(n: int, which: int) -> float:
        if prefix_lengths is None:
            return float(llama_pass_flops(cfg.text, n, r))
        return llama_cached_pass_flops(cfg.text, prefix_lengths[which - 1], n, r, expressions_per_image)

    mean_pass = {1: sum(pass_flops(n, 1) for n in pass1_tokens) / len(pass1_tokens),
                 2: sum(pass_flops(n, 2) for n in pass2_tokens) / len(pass2_tokens) if spatial else 0}
    uses_box = spatial and cfg.spec.eval_box != "none"
    per_expr = {
        "clip_tower": per_image["clip_tower"] / expressions_per_image,
        "sam_image_encoder": per_image["sam_image_encoder"] / expressions_per_image,
        "llm_pass1": float(mean_pass[1]),
        "llm_pass2": float(mean_pass[2]),
        "prompt_heads": float(prompt_heads_flops(cfg, spatial)),
        "box_head": float(box_head_flops(cfg)) if spatial else 0.0,
        "sam_mask_decoder": float(sam_decoder_flops(cfg.sam, 3 if uses_box else 1)),
    }
    return EvalFlops(per_expr, per_image, t1, t2, float(expressions_per_image))


def training_step_flops(ev: EvalFlops, cfg: PPCRConfig, answer_tokens: float, vocab: int) -> dict[str, float]:
    """Rough FLOPs per expression of one training step (forward + backward), SAM embeddings cached.

    Frozen linear layers need only the activation gradient in backward (1x forward), attention products two
    (2x), trainable layers (heads, decoder) weight and activation gradients (2x); gradient checkpointing recomputes
    the LLM's forward once more. The LM head runs on the answer tokens (CE), forward and backward (2x).
    """
    llm_fwd = ev.per_expression["llm_pass1"] + ev.per_expression["llm_pass2"]
    llm = llm_fwd * (3 if cfg.gradient_checkpointing else 2)  # approximately: attention's 2x backward ignored
    passes = 2 if cfg.spec.uses_spatial_step else 1
    lm_head = 3 * passes * linear(int(answer_tokens), cfg.text.hidden_size, vocab)
    trained = 3 * (ev.per_expression["prompt_heads"] + ev.per_expression["box_head"]
                   + ev.per_expression["sam_mask_decoder"])
    clip = ev.per_expression["clip_tower"]
    return {"clip_tower": clip, "llm": llm, "lm_head": float(lm_head), "heads_and_decoder": trained,
            "total": clip + llm + lm_head + trained}
