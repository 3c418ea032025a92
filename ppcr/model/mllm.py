"""The multimodal LLM shared by stages 1 and 2: transformers' LLaVA with two peft LoRA branches.

Branch A (adapter "semantic") produces the Semantic Segmentation Prompt, branch B (adapter "spatial") the Spatial
Segmentation Prompt. Both adapters live on the *language model's* q_proj/v_proj only; the CLIP tower and the
projector are frozen, so the image features are computed once per batch and reused by both passes.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import (CLIPVisionConfig, DynamicCache, LlamaConfig, LlamaModel, LlavaConfig,
                          LlavaForConditionalGeneration)
from transformers import PreTrainedTokenizerBase

from ppcr.model import prompts
from ppcr.model.config import PPCRConfig
from ppcr.model.tokenizer import EncodedPass

BRANCHES = ("semantic", "spatial")
# transformers 5.x renamed the decoder's `past_key_values` argument to `cache` (the old name warns, then goes)
_CACHE_ARG = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def llava_config(config: PPCRConfig, tokenizer: PreTrainedTokenizerBase) -> LlavaConfig:
    """The LLaVA-1.5 architecture at the preset's size (CLIP vision tower + LLaMA + 2-layer GELU projector)."""
    v, t = config.vision, config.text
    vision = CLIPVisionConfig(
        image_size=v.image_size, patch_size=v.patch_size, hidden_size=v.hidden_size,
        num_hidden_layers=v.num_hidden_layers, num_attention_heads=v.num_attention_heads,
        intermediate_size=v.intermediate_size, projection_dim=v.projection_dim, hidden_act="quick_gelu",
    )
    vocab = max(len(tokenizer), t.vocab_size)
    text = LlamaConfig(
        vocab_size=vocab, hidden_size=t.hidden_size, num_hidden_layers=t.num_hidden_layers,
        num_attention_heads=t.num_attention_heads, num_key_value_heads=t.num_key_value_heads,
        intermediate_size=t.intermediate_size, max_position_embeddings=t.max_position_embeddings,
        rms_norm_eps=t.rms_norm_eps, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=vision, text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids(prompts.IMAGE_TOKEN),
        vision_feature_layer=config.vision_feature_layer, vision_feature_select_strategy="default",
        projector_hidden_act=config.projector_hidden_act, image_seq_length=v.num_image_tokens,
    )


class WeightsError(ValueError):
    """Pretrained weights that do not fit the model they are loaded into (nothing is initialised in their place)."""


def check_llava_path(llava_path: str | Path) -> Path:
    """The folder of a llava-hf style LLaVA: config.json and its weights (`*.safetensors`, or `pytorch_model*.bin`
    shards read with `weights_only=True`), else a one-line error."""
    path = Path(llava_path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"LLaVA weights not found at {path} (expected a llava-hf/llava-1.5-7b-hf style folder with "
            f"config.json and *.safetensors or pytorch_model*.bin); nothing can be downloaded here."
        )
    if not any(path.glob("*.safetensors")) and not any(path.glob("pytorch_model*.bin")):
        raise FileNotFoundError(f"LLaVA folder {path} has a config.json but no weights (*.safetensors or "
                                "pytorch_model*.bin)")
    return path


def check_loading_info(info: dict[str, Any], source: str | Path, what: str = "LLaVA") -> None:
    """Refuse a load that left tensors to random initialisation or ignored some of the file's (transformers'
    `from_pretrained` only reports them): the counts and the first few names of each."""
    problems = []
    for key, label in (("missing_keys", "missing (would be random)"), ("unexpected_keys", "unexpected"),
                       ("mismatched_keys", "of another shape")):
        names = sorted(str(k) for k in info.get(key) or ())
        if names:
            problems.append(f"{len(names)} {label}, e.g. {names[:3]}")
    if problems:
        raise WeightsError(f"{what} weights at {source} do not fit this model: {'; '.join(problems)}. Is it a "
                           "llava-hf layout (convert GLaMM's or the original LLaVA's release first)?")


def build_llava(config: PPCRConfig, tokenizer: PreTrainedTokenizerBase) -> LlavaForConditionalGeneration:
    """LLaVA from a local llava-hf folder (`config.llava_path`) or, without one, from the config (random weights)."""
    dtype = torch_dtype(config.dtype)
    if config.llava_path is not None:
        path = check_llava_path(config.llava_path)
        # safetensors, or .bin shards (transformers reads them with torch.load(weights_only=True): no code runs)
        llava, info = LlavaForConditionalGeneration.from_pretrained(
            str(path), dtype=dtype, local_files_only=True, attn_implementation=config.attn_implementation,
            output_loading_info=True,
        )
        check_loading_info(info, path)
        if llava.get_input_embeddings().num_embeddings < len(tokenizer):
            llava.resize_token_embeddings(len(tokenizer))
    else:
        cfg = llava_config(config, tokenizer)
        cfg._attn_implementation = config.attn_implementation
        llava = LlavaForConditionalGeneration(cfg).to(dtype)
    if config.gradient_checkpointing:
        llava.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return llava


def llava_image_features(llava: LlavaForConditionalGeneration, clip_pixel_values: torch.Tensor,
                         vision_feature_layer: int) -> torch.Tensor:
    """(B, 3, S, S) -> (B, N_img, d): CLIP layer `vision_feature_layer` without CLS, through the projector."""
    out = llava.model.get_image_features(
        pixel_values=clip_pixel_values.to(llava.model.vision_tower.dtype), vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy="default", return_dict=True,
    )
    return torch.stack(list(out.pooler_output), dim=0)


def multimodal_embeddings(
    llava: LlavaForConditionalGeneration,
    input_ids: torch.Tensor,
    image_features: torch.Tensor | None,
    image_token_id: int,
    soft_tokens: torch.Tensor | None = None,
    soft_token_id: int | None = None,
) -> torch.Tensor:
    """Input embeddings (B, L, d) with image features (B, N_img, d) in the `<image>` slots and, when given, the soft
    tokens (B, K, d) (or (B, d): K = 1) in each row's K `soft_token_id` slots, in order. `image_features` None: the
    ids hold no image slots (the suffix of a cached prefix)."""
    embeds = llava.get_input_embeddings()(input_ids)  # (B, L, d)
    image_slots = (input_ids == image_token_id).unsqueeze(-1)
    if image_features is None:
        if bool(image_slots.any()):
            raise ValueError("image slots in the input but no image features given")
    else:
        embeds = embeds.masked_scatter(image_slots, image_features.to(embeds.dtype))
    if soft_tokens is not None:
        soft_tokens = soft_tokens[:, None] if soft_tokens.dim() == 2 else soft_tokens  # (B, K, d)
        soft_slots = input_ids == soft_token_id
        if not bool((soft_slots.sum(dim=1) == soft_tokens.shape[1]).all()):
            raise ValueError(f"every spatial prompt needs exactly {soft_tokens.shape[1]} {prompts.PSEG_TOKEN} "
                             "token(s), one per soft token")
        embeds = embeds.masked_scatter(soft_slots.unsqueeze(-1), soft_tokens.contiguous().to(embeds.dtype))
    return embeds


def answer_cross_entropy(llava: LlavaForConditionalGeneration, hidden: torch.Tensor,
                         labels: torch.Tensor) -> torch.Tensor:
    """Next-token CE on the labelled (answer) tokens only; the LM head runs on those positions alone."""
    targets = labels[:, 1:]
    answer = targets != -100
    logits = llava.get_output_embeddings()(hidden[:, :-1][answer])  # (n_answer_tokens, V)
    return F.cross_entropy(logits.float(), targets[answer])


def image_token_states(hidden: torch.Tensor, input_ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """(B, L, d) hidden states -> those of the `<image>` slots, (B, N_img, d) in patch order (N_img per row)."""
    slots = input_ids == image_token_id  # (B, L)
    return hidden[slots].reshape(hidden.shape[0], -1, hidden.shape[-1])


def query_states(hidden: torch.Tensor, encoded: EncodedPass) -> torch.Tensor:
    """(B, L, d) hidden states -> those at each row's query position, (B, d)."""
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return hidden[rows, encoded.query_index]


def shared_prefix_length(encoded: EncodedPass, soft_token_id: int | None = None,
                         image_token_id: int | None = None) -> int:
    """How many leading positions every row of a pass shares and can take from one image's cached prefix.

    The prefix is the longest run of token ids equal in all rows (BOS, system prompt, `USER:`, the image slots and
    the template's words before the expression), stopped before the `[P_SEG]` soft token (its embedding differs
    per row although its id does not) and before the earliest query position (whose hidden state is read).
    Rows on different images share the ids of the image slots, not their content: the prefix is computed once per
    *image*, so the cache stays exact. A prefix that ends before the last image slot (the question before the
    image, `image_after_prompt`, with different expressions) gives 0: the suffix would need the image features.
    """
    ids = encoded.input_ids  # (B, L)
    differ = (ids != ids[:1]).any(dim=0).nonzero()
    length = int(differ[0]) if len(differ) else ids.shape[1]
    length = min(length, int(encoded.query_index.min()))
    if soft_token_id is not None:
        slots = (ids == soft_token_id).nonzero()
        if len(slots):
            length = min(length, int(slots[:, 1].min()))
    if image_token_id is not None:
        image_slots = (ids[0] == image_token_id).nonzero()
        if len(image_slots) and length <= int(image_slots.max()):
            return 0
    return length


class MultimodalLLM(nn.Module):
    """LLaVA + LoRA branches "semantic" (A) and "spatial" (B); one forward pass per branch."""

    def __init__(self, llava: LlavaForConditionalGeneration, config: PPCRConfig, tokenizer: PreTrainedTokenizerBase):
        super().__init__()
        lora = LoraConfig(
            r=config.lora.r, lora_alpha=config.lora.alpha, lora_dropout=config.lora.dropout,
            target_modules=config.lora.target_modules, bias="none",
        )
        self.peft = get_peft_model(llava, lora, adapter_name=BRANCHES[0])
        self.peft.add_adapter(BRANCHES[1], lora)
        self.image_token_id = tokenizer.convert_tokens_to_ids(prompts.IMAGE_TOKEN)
        self.pseg_token_id = tokenizer.convert_tokens_to_ids(prompts.PSEG_TOKEN)
        self.new_token_ids = [tokenizer.convert_tokens_to_ids(t) for t in prompts.NEW_TOKENS]
        self.vision_feature_layer = config.vision_feature_layer
        self.prefix_cache = True  # evaluation/predict: encode each image's shared prompt prefix once per branch
        self._train_all_token_rows = False
        self._enable_new_token_rows()

    # -- modules -------------------------------------------------------------------------------------------
    @property
    def llava(self) -> LlavaForConditionalGeneration:
        return self.peft.base_model.model

    @property
    def hidden_size(self) -> int:
        return self.llava.config.text_config.hidden_size

    def lora_parameters(self, branch: str | None = None) -> dict[str, nn.Parameter]:
        names = BRANCHES if branch is None else (branch,)
        return {n: p for n, p in self.peft.named_parameters() if "lora_" in n and any(f".{b}." in n for b in names)}

    # -- trainable token rows ------------------------------------------------------------------------------
    def _enable_new_token_rows(self) -> None:
        """New-token rows of the input embeddings and the LM head train; other rows get zero gradient."""
        for weight in (self.llava.get_input_embeddings().weight, self.llava.get_output_embeddings().weight):
            weight.requires_grad_(True)
            weight.register_hook(self._mask_token_rows)

    def _mask_token_rows(self, grad: torch.Tensor) -> torch.Tensor:
        if self._train_all_token_rows:
            return grad
        keep = torch.zeros(grad.shape[0], 1, dtype=grad.dtype, device=grad.device)
        keep[self.new_token_ids] = 1
        return grad * keep

    def train_all_token_rows(self, flag: bool) -> None:
        """Let every embedding/LM-head row learn (the small presets' MLLM pretraining stage)."""
        self._train_all_token_rows = flag

    # -- passes --------------------------------------------------------------------------------------------
    def use_branch(self, branch: str) -> None:
        """Activate a LoRA branch. peft's `set_adapter` freezes the other adapter: re-enable both while training,
        so the spatial pass's losses still reach branch A through P_seg_txt."""
        if branch not in BRANCHES:
            raise ValueError(f"unknown branch {branch!r}")
        self.peft.base_model.set_adapter(branch)
        if self.training:
            for p in self.lora_parameters().values():
                p.requires_grad_(True)

    @torch.no_grad()
    def image_features(self, clip_pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, N_img, d) projected CLIP features (frozen tower and projector)."""
        return llava_image_features(self.llava, clip_pixel_values, self.vision_feature_layer)

    def run_branch(
        self,
        branch: str,
        encoded: EncodedPass,
        image_features: torch.Tensor,
        image_index: torch.Tensor,
        soft_tokens: torch.Tensor | None = None,
        compute_ce: bool = True,
        image_hidden: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """One LLM pass with LoRA `branch` active.

        encoded: the tokenised conversation (B rows); image_features: (N, N_img, d) per image, scattered into the
        `<image>` slots of the rows on that image (`image_index`: (B,) values in [0, N)); soft_tokens: (B, K, d)
        written into the K `[P_SEG]` slots of each row when given.
        Returns the last-layer hidden state at the query position (B, d), the answer's next-token CE and, with
        `image_hidden`, the last-layer hidden states of the image tokens (B, N_img, d); None for what was not asked.

        Without gradients and CE (evaluation, predict), with `prefix_cache` on and some image of the batch holding
        several rows, the prompt prefix that all rows share (`shared_prefix_length`) runs once per image and each
        row's suffix attends to its image's cached keys/values; training always runs the full sequences.
        """
        self.use_branch(branch)
        shared = len(torch.unique(image_index)) < len(image_index)  # some image has several rows to share with
        if self.prefix_cache and shared and not compute_ce and not image_hidden and not torch.is_grad_enabled():
            prefix = shared_prefix_length(encoded, self.pseg_token_id if soft_tokens is not None else None,
                                          self.image_token_id)
            if prefix > 0:
                return self._run_cached(encoded, image_features, image_index, soft_tokens, prefix), None, None
        hidden = self._full_pass(encoded, image_features, image_index, soft_tokens)
        ce = answer_cross_entropy(self.llava, hidden, encoded.labels) if compute_ce else None
        image = image_token_states(hidden, encoded.input_ids, self.image_token_id) if image_hidden else None
        return query_states(hidden, encoded), ce, image

    @torch.no_grad()
    def run_base(self, encoded: EncodedPass, image_features: torch.Tensor, image_index: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass of the LLM without any LoRA (the pretrained LLaVA, as the teacher of
        `PPCRConfig.train_spatial_distill`), no gradient: the last-layer hidden states at the query position (B, d)
        and on the image tokens (B, N_img, d)."""
        lora = self.lora_parameters()
        wanted = {n: p.requires_grad for n, p in lora.items()}
        with self.peft.disable_adapter():
            hidden = self._full_pass(encoded, image_features, image_index)
        for n, p in lora.items():  # leaving the context re-activates one adapter and freezes the other: undo that,
            p.requires_grad_(wanted[n])  # or the branch that ran before this pass gets no gradient this step
        return query_states(hidden, encoded), image_token_states(hidden, encoded.input_ids, self.image_token_id)

    def _full_pass(self, encoded: EncodedPass, image_features: torch.Tensor, image_index: torch.Tensor,
                   soft_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """The whole sequences through the LLM with whatever adapter is active: last hidden states (B, L, d)."""
        embeds = multimodal_embeddings(self.llava, encoded.input_ids, image_features[image_index],
                                       self.image_token_id, soft_tokens, self.pseg_token_id)
        return self.llava.model.language_model(
            inputs_embeds=embeds, attention_mask=encoded.attention_mask
        ).last_hidden_state

    def _run_cached(self, encoded: EncodedPass, image_features: torch.Tensor, image_index: torch.Tensor,
                    soft_tokens: torch.Tensor | None, prefix: int) -> torch.Tensor:
        """The query hidden states (B, d) of `run_branch`, with the first `prefix` positions computed once per
        distinct image of the batch (transformers' DynamicCache, expanded to the rows by index)."""
        lm = self.llava.model.language_model
        images, row_image = torch.unique(image_index, return_inverse=True)  # (U,), (B,)
        prefix_ids = encoded.input_ids[:1, :prefix].expand(len(images), prefix)  # (U, P): the same ids in every row
        prefix_embeds = multimodal_embeddings(self.llava, prefix_ids, image_features[images], self.image_token_id)
        cache = DynamicCache()
        lm(inputs_embeds=prefix_embeds, use_cache=True, **{_CACHE_ARG: cache})  # fills `cache` in place
        cache.reorder_cache(row_image)  # (U, ...) -> (B, ...): each row gets its image's keys/values
        suffix_embeds = multimodal_embeddings(self.llava, encoded.input_ids[:, prefix:], None, self.image_token_id,
                                              soft_tokens, self.pseg_token_id)  # (B, L - P, d)
        hidden = lm(inputs_embeds=suffix_embeds, attention_mask=encoded.attention_mask, use_cache=True,
                    **{_CACHE_ARG: cache}).last_hidden_state  # (B, L - P, d)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return hidden[rows, encoded.query_index - prefix]

