"""The shipped foundation of the `small` preset: stage 0 (promptable SAM) and stage 1 (the small LLaVA), in
`ppcr/resources/foundation/` with a manifest (made by `python -m ppcr.foundation train`).

    shipped_weights(config)      # verified local paths, for PPCRModel.build (profiles with `foundation: shipped`)
    verify_foundation(config)    # hashes and the config signature against manifest.json, else FoundationMismatch

Weights whose configs no longer match the code are refused with the command that regenerates them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ppcr.data.synref import GENERATOR_VERSION
from ppcr.model.config import PPCRConfig
from ppcr.model.tokenizer import synref_tokenizer

FOUNDATION_PROFILE = "foundation"
REGENERATE = "python -m ppcr.foundation train"


MANIFEST = "manifest.json"
CURVES = "curves.json"  # the held-out curves of each stage, beside the manifest
STAGES = ("sam_pretrain", "mllm_pretrain")


class FoundationMismatch(ValueError):
    """The shipped foundation does not match the code (changed configs, missing or altered files): bad input, which
    the command lines report in one line."""


def foundation_dir() -> Path:
    return Path(__file__).resolve().parents[1] / "resources" / "foundation"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def config_signature(config: PPCRConfig) -> dict[str, Any]:
    """Everything of a model config that the stage 0-1 weights depend on, plus the stage-1 vocabulary."""
    vocab = sorted(synref_tokenizer().get_vocab().items())
    signature = {
        "preset": config.preset, "sam": asdict(config.sam), "vision": asdict(config.vision),
        "text": {k: v for k, v in asdict(config.text).items() if k != "vocab_size"},
        "system_prompt": config.system_prompt, "vision_feature_layer": config.vision_feature_layer,
        "projector_hidden_act": config.projector_hidden_act,
        "vocabulary_sha256": hashlib.sha256(json.dumps(vocab).encode()).hexdigest(),
    }
    if config.image_after_prompt:  # the LLM learned its prompts in this order (absent: LLaVA's, image first)
        signature["image_after_prompt"] = True
    return signature


def _normalise(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def load_manifest(directory: Path | None = None) -> dict[str, Any]:
    directory = directory or foundation_dir()
    path = directory / MANIFEST
    if not path.is_file():
        raise FoundationMismatch(f"no shipped foundation at {directory} (no {MANIFEST}); make it with: {REGENERATE}")
    return json.loads(path.read_text())




def verify_foundation(config: PPCRConfig, directory: Path | None = None) -> dict[str, Any]:
    """Check the shipped files' sha256 and that `config` is the one they were trained with; returns the manifest."""
    directory = directory or foundation_dir()
    manifest = load_manifest(directory)
    hint = REGENERATE
    for rel, digest in manifest["files"].items():
        path = directory / rel
        if not path.is_file():
            raise FoundationMismatch(f"shipped foundation file missing: {path}; regenerate with: {hint}")
        if sha256(path) != digest:
            raise FoundationMismatch(f"shipped foundation file {path} does not match its sha256 in the manifest; "
                                     f"regenerate with: {hint}")
    if manifest.get("synref_generator_version") != GENERATOR_VERSION:
        raise FoundationMismatch(
            f"the shipped foundation was trained on SynRef {manifest.get('synref_generator_version')}, this code "
            f"generates {GENERATOR_VERSION}; regenerate the weights with: {REGENERATE}")
    want, have = _normalise(manifest["config_signature"]), _normalise(config_signature(config))
    if want != have:
        diff = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
        raise FoundationMismatch(
            f"the shipped foundation was trained with other {', '.join(diff)} settings than the current "
            f"{config.preset!r} preset; regenerate the weights with: {hint}")
    return manifest


def shipped_weights(config: PPCRConfig, directory: Path | None = None) -> dict[str, str]:
    """Local weight paths of the shipped foundation (verified) for `PPCRModel.build`."""
    directory = directory or foundation_dir()
    verify_foundation(config, directory)
    llava = directory / "llava"
    return {"sam_checkpoint": str(directory / "sam.safetensors"), "llava_path": str(llava),
            "tokenizer_path": str(llava)}
