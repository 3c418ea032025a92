"""Stand-ins in the real file layouts, shared by the tests of the paper route: GLaMM's released checkpoints (`.bin`
shards, original LLaVA key names, its own token ids), a llava-hf folder as transformers 4.x wrote it, and `torchrun`
with two CPU processes (gloo)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ppcr.model import prompts
from ppcr.model.config import tiny_config
from ppcr.training.loop import CRASH_ENV

REPO = Path(__file__).resolve().parents[1]


def glamm_release(folder, base_state, rank: int, seed: int, sam_state, tokenizer) -> dict[str, torch.Tensor]:
    """A GLaMM-layout state dict: the base LLM plus a rank-`rank` delta on q_proj/v_proj, text_hidden_fcs, a SAM
    under grounding_encoder, embeddings of GLaMM's own vocabulary; written as two .bin shards with the tokenizer."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in base_state.items():
        if not key.startswith("model.language_model.") and key != "lm_head.weight":
            continue
        name = key.replace("model.language_model.", "model.", 1)
        if key.endswith(("q_proj.weight", "v_proj.weight")):
            out, inp = value.shape
            value = value + 0.05 * torch.randn(out, rank, generator=g) @ torch.randn(rank, inp, generator=g)
        state[name] = value.clone()
    d = base_state["model.language_model.embed_tokens.weight"].shape[1]
    state["model.embed_tokens.weight"] = torch.randn(len(tokenizer), d, generator=g)
    state["lm_head.weight"] = torch.randn(len(tokenizer), d, generator=g)
    c = tiny_config().sam.prompt_embed_dim
    state.update({"model.text_hidden_fcs.0.0.weight": torch.randn(d, d, generator=g),
                  "model.text_hidden_fcs.0.0.bias": torch.randn(d, generator=g),
                  "model.text_hidden_fcs.0.2.weight": torch.randn(c, d, generator=g),
                  "model.text_hidden_fcs.0.2.bias": torch.randn(c, generator=g)})
    state.update({f"model.grounding_encoder.{k}": v for k, v in sam_state.items()})
    folder.mkdir(parents=True)
    keys = sorted(state)
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:]), 1):
        torch.save({k: state[k] for k in part}, folder / f"pytorch_model-0000{i}-of-00002.bin")
    tokenizer.save_pretrained(folder)
    return state


def glamm_tokenizer():
    """A tokenizer with GLaMM's own ids: its vocabulary first, the added tokens ([SEG] among them) after it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", "the", "dog", "cat", "zebra", "car", "tree", "<image>", "<im_start>", "<im_end>",
             "<bbox>", "<p>", "</p>", prompts.SEG_TOKEN]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun() -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(free_port())]


def subprocess_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", CRASH_ENV)}
    return {**env, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **extra}


def run_in_repo(cmd: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(**env), cwd=REPO, timeout=900)


# transformers 5's in-memory LLaVA names -> the llava-hf checkpoints' names (written by transformers 4.x)
_TRANSFORMERS4_NAMES = (("model.language_model.", "language_model.model."), ("model.vision_tower.", "vision_tower."),
                        ("model.multi_modal_projector.", "multi_modal_projector."),
                        ("lm_head.", "language_model.lm_head."))


def as_transformers4_folder(folder: Path, shards: int = 2) -> None:
    """Rewrite a saved llava-hf folder as llava-hf/llava-1.5-7b-hf ships it (transformers 4.x): keys under
    `language_model.model.*`, float16, `shards` safetensors files with their index."""
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("model*.safetensors")):
        tensors.update(load_file(str(f)))
        f.unlink()
    (folder / "model.safetensors.index.json").unlink(missing_ok=True)
    renamed = {}
    for key, value in tensors.items():
        for new, old in _TRANSFORMERS4_NAMES:
            if key.startswith(new):
                key = old + key[len(new):]
                break
        renamed[key] = value.to(torch.float16) if value.is_floating_point() else value
    keys = sorted(renamed)
    weight_map = {}
    for k in range(shards):
        name = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[k * len(keys) // shards:(k + 1) * len(keys) // shards]
        save_file({key: renamed[key].contiguous() for key in part}, str(folder / name), metadata={"format": "pt"})
        weight_map.update({key: name for key in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = json.loads((folder / "config.json").read_text())
    config["torch_dtype"] = "float16"
    (folder / "config.json").write_text(json.dumps(config, indent=2))
