"""The multimodal LLM shared by stages 1 and 2: transformers' LLaVA with two peft LoRA branches.

Branch A (adapter "semantic") produces the Semantic Segmentation Prompt, branch B (adapter "spatial") the Spatial
Segmentation Prompt. Both adapters live on the *language model's* q_proj/v_proj only; the CLIP tower and the
projector are frozen, so the image features are computed once per batch and reused by both passes.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
from transformers import PreTrainedTokenizerBase

from ppcr.model import prompts
from ppcr.model.config import PPCRConfig
from ppcr.model.tokenizer import EncodedPass

BRANCHES = ("semantic", "spatial")

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


def check_llava_path(llava_path: str | Path) -> Path:
    path = Path(llava_path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"LLaVA weights not found at {path} (expected a llava-hf/llava-1.5-7b-hf style folder with "
            f"config.json and *.safetensors); nothing can be downloaded here."
        )
    return path


def build_llava(config: PPCRConfig, tokenizer: PreTrainedTokenizerBase) -> LlavaForConditionalGeneration:
    """LLaVA from a local llava-hf folder (`config.llava_path`) or, without one, from the config (random weights)."""
    dtype = torch_dtype(config.dtype)
    if config.llava_path is not None:
        path = check_llava_path(config.llava_path)
        llava = LlavaForConditionalGeneration.from_pretrained(
            str(path), dtype=dtype, local_files_only=True, attn_implementation=config.attn_implementation,
            use_safetensors=True,
        )
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
    image_features: torch.Tensor,
    image_token_id: int,
    soft_tokens: torch.Tensor | None = None,
    soft_token_id: int | None = None,
) -> torch.Tensor:
    """Input embeddings (B, L, d) with image features (B, N_img, d) in the `<image>` slots and, when given, one
    soft token (B, d) per row in the `soft_token_id` slot."""
    embeds = llava.get_input_embeddings()(input_ids)  # (B, L, d)
    image_slots = (input_ids == image_token_id).unsqueeze(-1)
    embeds = embeds.masked_scatter(image_slots, image_features.to(embeds.dtype))
    if soft_tokens is not None:
        soft_slots = input_ids == soft_token_id
        if not bool((soft_slots.sum(dim=1) == 1).all()):
            raise ValueError(f"every spatial prompt needs exactly one {prompts.PSEG_TOKEN} token")
        embeds = embeds.masked_scatter(soft_slots.unsqueeze(-1), soft_tokens.to(embeds.dtype))
    return embeds


def answer_cross_entropy(llava: LlavaForConditionalGeneration, hidden: torch.Tensor,
                         labels: torch.Tensor) -> torch.Tensor:
    """Next-token CE on the labelled (answer) tokens only; the LM head runs on those positions alone."""
    targets = labels[:, 1:]
    answer = targets != -100
    logits = llava.get_output_embeddings()(hidden[:, :-1][answer])  # (n_answer_tokens, V)
    return F.cross_entropy(logits.float(), targets[answer])


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
        soft_tokens: torch.Tensor | None = None,
        compute_ce: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One LLM pass with LoRA `branch` active.

        encoded: the tokenised conversation; image_features: (B, N_img, d) scattered into the `<image>` slots;
        soft_tokens: (B, d) written into the `[P_SEG]` slot (one per row) when given.
        Returns the last-layer hidden state at the query position (B, d) and the answer's next-token CE.
        """
        self.use_branch(branch)
        embeds = multimodal_embeddings(self.llava, encoded.input_ids, image_features, self.image_token_id,
                                       soft_tokens, self.pseg_token_id)
        hidden = self.llava.model.language_model(
            inputs_embeds=embeds, attention_mask=encoded.attention_mask
        ).last_hidden_state  # (B, L, d)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        query = hidden[rows, encoded.query_index]  # (B, d)
        ce = answer_cross_entropy(self.llava, hidden, encoded.labels) if compute_ce else None
        return query, ce
