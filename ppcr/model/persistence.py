"""Save and load a PPCR model without executing any pickle.

A checkpoint folder holds:
    config.json              PPCRConfig (the architecture)
    recipe.json              TrainingRecipe (how it was trained; its training-only heads are among the tensors)
    tokenizer/               the tokenizer (transformers' format)
    adapters/                both LoRA branches in peft's format (adapters/semantic, adapters/spatial)
    trainable.safetensors    every other trainable tensor: the heads, SAM's prompt encoder and mask decoder,
                             and the new-token rows of the input embeddings and the LM head
    base.safetensors         only when the config names no local weights (random-init or self-pretrained small
                             presets): the frozen LLaVA and SAM weights, so the folder is self-contained
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from peft import set_peft_model_state_dict
from peft.utils import load_peft_weights
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedTokenizerBase

from ppcr.model.config import PPCRConfig, TrainingRecipe
from ppcr.model.tokenizer import load_tokenizer

# `model` below is a `ppcr.model.modeling_ppcr.PPCRModel` (this module sits below it: PPCRModel.save_pretrained
# and from_pretrained call it), read through its attributes config, tokenizer, mllm and state_dict.

TRAINABLE_MODULES = ("text_hidden_fcs.", "seg_to_llm.", "box_head.", "grounding_head.", "semantic_box_head.",
                     "segmenter.sam.prompt_encoder.", "segmenter.sam.mask_decoder.")
EMBED_ROWS = "token_rows.input_embeddings"
HEAD_ROWS = "token_rows.lm_head"


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}


def save_model(model: nn.Module, directory: str | Path) -> Path:
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    model.config.save_json(out / "config.json")
    (out / "recipe.json").write_text(json.dumps(model.recipe.to_dict(), indent=2, sort_keys=True))
    model.tokenizer.save_pretrained(str(out / "tokenizer"))
    model.mllm.peft.save_pretrained(str(out / "adapters"), selected_adapters=["semantic", "spatial"])

    state = model.state_dict()
    trainable = {k: v for k, v in state.items() if k.startswith(TRAINABLE_MODULES)}
    llava = model.mllm.llava
    rows = torch.tensor(model.mllm.new_token_ids)
    trainable[EMBED_ROWS] = llava.get_input_embeddings().weight[rows]
    trainable[HEAD_ROWS] = llava.get_output_embeddings().weight[rows]
    save_file(_contiguous(trainable), str(out / "trainable.safetensors"))

    base: dict[str, torch.Tensor] = {}
    if model.config.llava_path is None:
        base.update({k: v for k, v in state.items() if k.startswith("mllm.") and "lora_" not in k})
    if model.config.sam_checkpoint is None:
        base.update({k: v for k, v in state.items() if k.startswith("segmenter.sam.image_encoder.")})
    if base:
        save_file(_contiguous(base), str(out / "base.safetensors"))
    (out / "MANIFEST.json").write_text(json.dumps({
        "format": "ppcr-checkpoint/1", "variant": model.config.variant, "preset": model.config.preset,
        "has_base": bool(base),
    }, indent=2))
    return out


def read_checkpoint(directory: str | Path, **config_overrides: Any
                    ) -> tuple[PPCRConfig, TrainingRecipe, PreTrainedTokenizerBase]:
    """A checkpoint folder's config (with `config_overrides`), training recipe and tokenizer, to build the model its
    weights fit."""
    src = Path(directory)
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"not a PPCR checkpoint (no config.json): {src}")
    config = PPCRConfig.load_json(src / "config.json")
    if config_overrides:
        config = config.replace(**config_overrides)
    recipe_file = src / "recipe.json"
    if not recipe_file.is_file():
        raise FileNotFoundError(f"checkpoint {src} has no recipe.json: it was written before the training recipe "
                                "was split from the config; train it again")
    recipe = TrainingRecipe.from_dict(json.loads(recipe_file.read_text()))
    return config, recipe, load_tokenizer(src / "tokenizer")


def load_weights_into(
    model: nn.Module,
    src: str | Path,
    prefixes: tuple[str, ...] | None = None,
    branches: tuple[str, ...] = ("semantic", "spatial"),
) -> None:
    """Load a checkpoint folder's tensors into an already built model of the same architecture.

    prefixes: only tensors whose names start with one of these (plus the new-token rows); None = all.
    branches: which LoRA adapters to load (the others keep their current weights).
    """
    src = Path(src)
    own = model.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    if prefixes is None and (src / "base.safetensors").is_file():
        tensors.update(load_file(str(src / "base.safetensors")))
    trainable = load_file(str(src / "trainable.safetensors"))
    embed_rows, head_rows = trainable.pop(EMBED_ROWS), trainable.pop(HEAD_ROWS)
    tensors.update(trainable)
    if prefixes is not None:
        tensors = {k: v for k, v in tensors.items() if k.startswith(prefixes)}
    unexpected = [k for k in tensors if k not in own]
    if unexpected:
        raise ValueError(f"checkpoint {src} does not match this model; unexpected tensors: {unexpected[:5]}")
    model.load_state_dict(tensors, strict=False)
    llava = model.mllm.llava
    rows = torch.tensor(model.mllm.new_token_ids)
    with torch.no_grad():
        llava.get_input_embeddings().weight[rows] = embed_rows.to(llava.get_input_embeddings().weight)
        llava.get_output_embeddings().weight[rows] = head_rows.to(llava.get_output_embeddings().weight)
    for branch in branches:
        weights = load_peft_weights(str(src / "adapters" / branch), device="cpu")
        result = set_peft_model_state_dict(model.mllm.peft, weights, adapter_name=branch)
        bad = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
        if bad:
            raise ValueError(f"adapter {branch!r} of {src} does not fit this model: {bad[:5]}")
