"""Pretrained weights load strictly: a file whose tensors do not fit is one clear error, never a model with part of
its weights left random; `.bin` shards load without running code."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ppcr.model.config import tiny_config  # noqa: E402
from ppcr.model.mllm import WeightsError, build_llava  # noqa: E402
from ppcr.model.segmentation import build_sam  # noqa: E402
from ppcr.model.tokenizer import build_word_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def tiny_llava():
    tokenizer = build_word_tokenizer(["red", "circle"])
    torch.manual_seed(0)
    return build_llava(tiny_config(), tokenizer), tokenizer


def _folder(tmp_path, llava, tokenizer, name: str, **save):
    folder = tmp_path / name
    llava.save_pretrained(folder, **save)
    tokenizer.save_pretrained(folder)
    return folder


def _as_bin_shards(folder) -> None:
    """The release layout of GLaMM's and the original LLaVA's weights: pytorch_model-0000k-of-0000n.bin shards and
    their index, in place of the safetensors (transformers 5 writes only safetensors)."""
    shards = sorted(folder.glob("model*.safetensors"))
    weight_map = {}
    for k, shard in enumerate(shards, 1):
        name = f"pytorch_model-{k:05d}-of-{len(shards):05d}.bin"
        tensors = load_file(str(shard))
        torch.save(tensors, folder / name)
        weight_map.update({key: name for key in tensors})
        shard.unlink()
    (folder / "model.safetensors.index.json").unlink(missing_ok=True)
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_llava_bin_shards_load_bit_exactly(tiny_llava, tmp_path):
    llava, tokenizer = tiny_llava
    folder = _folder(tmp_path, llava, tokenizer, "bin", max_shard_size="200KB")
    _as_bin_shards(folder)
    assert not list(folder.glob("*.safetensors")) and len(list(folder.glob("pytorch_model*.bin"))) > 1
    loaded = build_llava(tiny_config(llava_path=str(folder)), tokenizer)
    for (name, a), b in zip(llava.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name


def test_llava_weights_under_other_names_are_refused(tiny_llava, tmp_path):
    """GLaMM's or the original LLaVA's key names under a llava-hf config.json: transformers would initialise the
    model randomly and go on; here it is an error naming how many tensors are missing and unexpected."""
    llava, tokenizer = tiny_llava
    folder = _folder(tmp_path, llava, tokenizer, "renamed")
    weights = folder / "model.safetensors"
    state = load_file(str(weights))
    save_file({f"base_model.{k}": v for k, v in state.items()}, str(weights), metadata={"format": "pt"})
    with pytest.raises(WeightsError, match=r"\d+ missing \(would be random\).*\d+ unexpected") as err:
        build_llava(tiny_config(llava_path=str(folder)), tokenizer)
    assert "\n" not in str(err.value)


def test_one_missing_llava_tensor_is_refused(tiny_llava, tmp_path):
    llava, tokenizer = tiny_llava
    folder = _folder(tmp_path, llava, tokenizer, "partial")
    weights = folder / "model.safetensors"
    state = load_file(str(weights))
    dropped = next(k for k in state if "multi_modal_projector" in k)
    save_file({k: v for k, v in state.items() if k != dropped}, str(weights), metadata={"format": "pt"})
    with pytest.raises(WeightsError, match=r"1 missing"):
        build_llava(tiny_config(llava_path=str(folder)), tokenizer)


def test_a_llava_folder_without_weights_is_refused(tmp_path, tiny_llava):
    llava, tokenizer = tiny_llava
    folder = _folder(tmp_path, llava, tokenizer, "empty")
    for f in folder.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(FileNotFoundError, match="no weights"):
        build_llava(tiny_config(llava_path=str(folder)), tokenizer)


def test_sam_weights_that_do_not_fit_are_refused(tmp_path):
    cfg = tiny_config()
    state = build_sam(cfg.sam).state_dict()
    short = tmp_path / "short.pth"
    torch.save({k: v for k, v in state.items() if not k.startswith("mask_decoder.iou_prediction_head")}, short)
    with pytest.raises(ValueError, match=r"\d+ missing"):
        build_sam(cfg.sam, short)
    other = tmp_path / "other.pth"  # another SAM size (the paper's ViT-H file into the tiny preset)
    torch.save({k: torch.zeros(1) if k == "image_encoder.pos_embed" else v for k, v in state.items()}, other)
    with pytest.raises(ValueError, match="1 of another shape"):
        build_sam(cfg.sam, other)
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"PK\x03\x04 not a checkpoint")
    with pytest.raises(ValueError, match="cannot be read"):
        build_sam(cfg.sam, broken)
