"""`ppcr convert glamm`: GLaMM's released weights -> the PPCR checkpoint that stage 3 starts from (§4.2: branch A
from GLaMM's referring-segmentation weights, branch B from its GranD-pretrained weights).

GLaMM releases (MBZUAI/GLaMM-RefSeg, MBZUAI/GLaMM-GranD-Pretrained) are merged models in the original LLaVA layout,
as `pytorch_model-*.bin` shards (read with `torch.load(weights_only=True)`):

    model.embed_tokens.weight, model.layers.<i>.*, model.norm.weight, lm_head.weight     the LLM, LoRA merged in
    model.mm_projector.{0,2}.*                                                          the projector
    model.text_hidden_fcs.0.{0,2}.*                                                     h[SEG] -> SAM's prompt width
    model.grounding_encoder.{image_encoder,prompt_encoder,mask_decoder}.*                 SAM

CLIP is not in them: the base model is llava-hf's LLaVA-1.5 (`--llava`) and SAM ViT-H (`--sam`). The LLM's change
from the base on LoRA's target modules (q_proj, v_proj) becomes a branch's LoRA factors, the best rank-r
approximation of the merged delta (SVD; `lora.r`): a delta of rank <= r round-trips exactly, and the relative error
of each layer is printed. Changes on other LLM modules (GLaMM's training touches none) are measured and reported.
`text_hidden_fcs`, SAM's prompt encoder and mask decoder come from the RefSeg model; the `[SEG]` rows of the input
embeddings and the LM head are mapped by token string (GLaMM's ids differ from this project's).

    ppcr convert glamm --refseg GLaMM-RefSeg/ [--grand GLaMM-GranD-Pretrained/] --llava llava-1.5-7b-hf/ \
                       --sam sam_vit_h_4b8939.pth --out runs/paper/glamm_init [--preset paper]

The output is a PPCR checkpoint folder; a profile's `init_from: <that folder>` makes stage 3 start from it in place
of stage 2.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from ppcr.model import prompts
from ppcr.model.config import PPCRConfig, preset_config
from ppcr.model.modeling_ppcr import PPCRModel
from ppcr.model.tokenizer import load_tokenizer

GLAMM_PREFIXES = ("model.layers.", "model.embed_tokens.", "model.text_hidden_fcs.0.", "model.grounding_encoder.")
HEAD_MAP = {"model.text_hidden_fcs.0.0.": "text_hidden_fcs.0.", "model.text_hidden_fcs.0.2.": "text_hidden_fcs.2."}
SAM_PARTS = ("prompt_encoder", "mask_decoder")


class GlammLayoutError(ValueError):
    """A folder that is not a GLaMM release in the layout above."""


def read_bin_shards(folder: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a folder's `pytorch_model*.bin` shards (or safetensors), without running any pickled code."""
    folder = Path(folder)
    shards = sorted(folder.glob("pytorch_model*.bin"))
    if not shards:  # (a copy converted to safetensors: the same names)
        shards = sorted(folder.glob("*.safetensors"))
        if not shards:
            raise GlammLayoutError(f"{folder}: no pytorch_model*.bin or *.safetensors shards")
        return {k: v for s in shards for k, v in load_file(str(s)).items()}
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        state.update(torch.load(shard, map_location="cpu", weights_only=True))
    return state


def check_layout(state: dict[str, torch.Tensor], folder: str | Path, need_heads: bool) -> None:
    """One clear error when `state` is not GLaMM's layout (e.g. a llava-hf folder given by mistake)."""
    wanted = GLAMM_PREFIXES if need_heads else GLAMM_PREFIXES[:2]
    missing = [p for p in wanted if not any(k.startswith(p) for k in state)]
    if missing:
        sample = sorted(state)[:3]
        raise GlammLayoutError(f"{folder} is not in GLaMM's released layout: no tensors under {missing} (its keys "
                               f"begin {sample}); give the GLaMM-RefSeg / GLaMM-GranD-Pretrained folders")


def glamm_key(llava_key: str) -> str:
    """This project's in-memory LLaVA name of an LLM tensor -> GLaMM's (original LLaVA) name."""
    return llava_key.replace("model.language_model.", "model.", 1)


def low_rank_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(out, in) delta -> B (out, r), A (r, in) with B @ A its best rank-r approximation, and the relative error
    ||delta - B A|| / ||delta|| (0 for a zero delta)."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    root = s[:rank].sqrt()
    b = u[:, :rank] * root  # (out, r)
    a = root[:, None] * vh[:rank]  # (r, in)
    norm = float(delta.double().norm())
    error = float((delta.double() - b @ a).norm()) / norm if norm > 0 else 0.0
    return b, a, error


def lora_from_merged(model: PPCRModel, merged: dict[str, torch.Tensor], branch: str) -> dict[str, Any]:
    """Set `branch`'s LoRA factors so that base + scaling * B A approximates the merged model on every target module;
    returns per-layer relative errors and the largest change on the LLM's other tensors (not representable)."""
    peft = model.mllm.peft
    lora_cfg = peft.peft_config[branch]
    scaling = lora_cfg.lora_alpha / lora_cfg.r
    target = re.compile(lora_cfg.target_modules) if isinstance(lora_cfg.target_modules, str) else None
    errors: dict[str, float] = {}
    other = 0.0
    base = model.mllm.llava.state_dict()
    with torch.no_grad():
        for name, module in peft.base_model.model.named_modules():
            if not hasattr(module, "lora_A") or branch not in module.lora_A:
                continue
            weight = module.base_layer.weight
            source = glamm_key(f"{name}.weight")
            if source not in merged:
                raise GlammLayoutError(f"GLaMM weights lack {source} (LoRA target {name})")
            delta = (merged[source].to(torch.float64) - weight.double()) / scaling
            b, a, err = low_rank_factors(delta, lora_cfg.r)
            module.lora_A[branch].weight.copy_(a.to(module.lora_A[branch].weight.dtype))
            module.lora_B[branch].weight.copy_(b.to(module.lora_B[branch].weight.dtype))
            errors[name] = err
        for key, value in base.items():
            if not key.startswith("model.language_model.") or "lora_" in key or "embed_tokens" in key:
                continue
            plain = key.replace(".base_layer.", ".")
            if target is not None and target.match(plain.removesuffix(".weight")):
                continue
            source = glamm_key(plain)
            if source in merged and merged[source].shape == value.shape:
                change = float((merged[source].double() - value.double()).norm() / value.double().norm().clamp(min=1e-12))
                other = max(other, change)
    return {"relative_error": errors, "max_relative_change_outside_lora": other}


def convert_glamm(refseg: str | Path, llava: str | Path, sam: str | Path, out: str | Path,
                  grand: str | Path | None = None, config: PPCRConfig | None = None) -> dict[str, Any]:
    """Write the PPCR checkpoint of GLaMM's weights to `out` (see the module docstring); returns the report, also
    written as `out/convert_report.json`."""
    config = (config or preset_config("paper")).replace(variant="ppcr", llava_path=str(llava), sam_checkpoint=str(sam))
    refseg_state = read_bin_shards(refseg)
    check_layout(refseg_state, refseg, need_heads=True)
    model = PPCRModel.build(config)  # the base LLaVA and SAM, strictly loaded, before anything is changed
    report: dict[str, Any] = {"refseg": str(refseg), "grand": None if grand is None else str(grand),
                              "lora_rank": config.lora.r}
    report["semantic"] = lora_from_merged(model, refseg_state, "semantic")
    if grand is not None:
        grand_state = read_bin_shards(grand)
        check_layout(grand_state, grand, need_heads=False)
        report["spatial"] = lora_from_merged(model, grand_state, "spatial")
    with torch.no_grad():
        own = dict(model.named_parameters())
        for prefix, ours in HEAD_MAP.items():
            for leaf in ("weight", "bias"):
                own[f"{ours}{leaf}"].copy_(refseg_state[f"{prefix}{leaf}"])
        for part in SAM_PARTS:
            module = getattr(model.segmenter.sam, part)
            src = {k.removeprefix(f"model.grounding_encoder.{part}."): v for k, v in refseg_state.items()
                   if k.startswith(f"model.grounding_encoder.{part}.")}
            result = module.load_state_dict(src, strict=False)
            if result.missing_keys or result.unexpected_keys:
                raise GlammLayoutError(f"GLaMM's SAM {part} does not fit this SAM: {len(result.missing_keys)} "
                                       f"missing, {len(result.unexpected_keys)} unexpected")
        report["seg_row"] = _map_seg_rows(model, refseg_state, refseg)
    model.save_pretrained(out)
    (Path(out) / "convert_report.json").write_text(json.dumps(report, indent=2))
    return report


def _map_seg_rows(model: PPCRModel, state: dict[str, torch.Tensor], folder: str | Path) -> dict[str, int]:
    """Copy GLaMM's `[SEG]` rows of the input embeddings and the LM head to this tokenizer's `[SEG]` id."""
    glamm_id = load_tokenizer(folder).convert_tokens_to_ids(prompts.SEG_TOKEN)
    if glamm_id is None or glamm_id < 0 or glamm_id >= state["model.embed_tokens.weight"].shape[0]:
        raise GlammLayoutError(f"{folder}: GLaMM's tokenizer has no {prompts.SEG_TOKEN} token")
    ours = model.tokenizer.convert_tokens_to_ids(prompts.SEG_TOKEN)
    llava = model.mllm.llava
    llava.get_input_embeddings().weight[ours] = state["model.embed_tokens.weight"][glamm_id]
    llava.get_output_embeddings().weight[ours] = state["lm_head.weight"][glamm_id]
    return {"glamm_id": int(glamm_id), "ppcr_id": int(ours)}


# --------------------------------------------------------------------------------------------------------------
# command line: `ppcr convert glamm ...`
# --------------------------------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", choices=("glamm",), help="whose weights to convert")
    p.add_argument("--refseg", required=True, help="GLaMM-RefSeg folder (branch A, text_hidden_fcs, SAM decoder)")
    p.add_argument("--grand", help="GLaMM-GranD-Pretrained folder (branch B; without it branch B starts at zero)")
    p.add_argument("--llava", required=True, help="llava-hf/llava-1.5-7b-hf folder (the base model, with CLIP)")
    p.add_argument("--sam", required=True, help="sam_vit_h_4b8939.pth (SAM's image encoder)")
    p.add_argument("--out", required=True, help="the PPCR checkpoint folder to write")
    p.add_argument("--preset", default="paper", help="model preset (default paper; tiny for tests)")


def run(args: argparse.Namespace) -> int:
    report = convert_glamm(args.refseg, args.llava, args.sam, args.out, args.grand, preset_config(args.preset))
    for branch in ("semantic", "spatial"):
        if branch in report:
            errors = report[branch]["relative_error"]
            worst = max(errors.values()) if errors else 0.0
            print(f"branch {branch}: {len(errors)} LoRA modules, rank {report['lora_rank']}, relative error of the "
                  f"rank-r approximation: max {worst:.3g}, mean {sum(errors.values()) / max(1, len(errors)):.3g}; "
                  f"largest change outside LoRA's modules (dropped): "
                  f"{report[branch]['max_relative_change_outside_lora']:.3g}")
            for name, err in errors.items():
                print(f"  {name}: {err:.3g}")
    print(f"[SEG] row: GLaMM id {report['seg_row']['glamm_id']} -> {report['seg_row']['ppcr_id']}; wrote {args.out}")
    return 0
