"""Stages 2-3: referring segmentation, the paper's own training. Stage 2 (`glamm_init`) trains the `glamm`
variant, the initialisation of branch A (the paper starts branch A from GLaMM's weights); stage 3 trains every
variant (glamm included) from stage 2's weights for the same number of steps.

    train_variant(profile, out, "ppcr", seed)   # stages 0-3 as needed, each cached -> ppcr's checkpoint folder
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ppcr.data.dataset import collate_refer
from ppcr.model.modeling_ppcr import PPCRModel
from ppcr.model.persistence import load_weights_into
from ppcr.model.shipped import load_manifest, shipped_weights
from ppcr.model.tokenizer import load_tokenizer
from ppcr.recipe.profile import Profile
from ppcr.provenance import resolve_device
from ppcr.training import distributed
from ppcr.training.cache import SamEmbeddingCache, module_fingerprint
from ppcr.training.data import data_root, data_version, diagnostics_data, prepare_data, train_dataset
from ppcr.training.diagnostics import ris_val_metrics
from ppcr.training.loop import TrainResult, train_loop
from ppcr.training.mllm_pretrain import run_mllm_pretrain
from ppcr.training.sam_pretrain import run_sam_pretrain
from ppcr.training.stage import loop_config, relative, run_cached, stage_dirs


def base_weights(profile: Profile, out: Path, seed: int, resume: bool, progress: bool) -> dict[str, str | None]:
    """Local weight paths for the PPCR model: the shipped foundation (`foundation: shipped`), stage 0/1 outputs
    (synthetic) or the profile's paths (paper)."""
    if profile.foundation == "shipped":
        return shipped_weights(profile.model_config("glamm", seed))
    if profile.data_kind == "synref":
        sam = run_sam_pretrain(profile, out, seed, resume, progress)
        llava = run_mllm_pretrain(profile, out, seed, resume, progress)
        return {"sam_checkpoint": str(sam), "llava_path": str(llava), "tokenizer_path": str(llava)}
    return {k: profile.model.get(k) for k in ("sam_checkpoint", "llava_path", "tokenizer_path")}


def build_ris_model(profile: Profile, variant: str, seed: int, weights: dict[str, str | None]) -> PPCRModel:
    config = profile.model_config(variant, seed).replace(**{k: v for k, v in weights.items() if v is not None})
    tokenizer = load_tokenizer(weights["tokenizer_path"]) if weights.get("tokenizer_path") else None
    return PPCRModel.build(config, tokenizer=tokenizer, recipe=profile.training_recipe())


def sam_cache_for(model: PPCRModel, out: Path, profile: Profile) -> SamEmbeddingCache:
    """The run's cache of SAM's image embeddings, keyed by the frozen encoder (settings: the profile's)."""
    return SamEmbeddingCache(out / "cache" / "sam_embeddings", module_fingerprint(model.segmenter.sam.image_encoder),
                             max_memory_bytes=int(profile.sam_cache_memory_gb * 2**30),
                             dtype=getattr(torch, profile.sam_cache_dtype))


def describe_sam_cache(cache: SamEmbeddingCache, model: PPCRModel, data: Dataset) -> str:
    """`SamEmbeddingCache.describe` for the distinct images of a training set (a ConcatDataset of ReferSegDatasets)."""
    parts = getattr(data, "datasets", [data])
    images = sum(len({p.refer.ref(r)["image_id"] for r in p.ref_ids}) for p in parts)
    sam = model.config.sam
    return cache.describe(images, SamEmbeddingCache.bytes_per_image(sam.prompt_embed_dim, sam.embedding_size,
                                                                    cache.dtype))


def _save_checkpoint(model: PPCRModel, profile: Profile, directory: Path) -> None:
    """Synthetic checkpoints are self-contained (base weights inside), so they outlive the stage folders."""
    if profile.data_kind == "synref":
        model.config = model.config.replace(llava_path=None, sam_checkpoint=None, tokenizer_path=None)
    if distributed.is_main():
        model.save_pretrained(directory)


# What stage 3 takes from stage 2 besides branch A's LoRA: the [SEG] head, SAM's prompt encoder / decoder and (with
# `train_image_grounding` and `train_semantic_box`) the grounding head and the box head on P_seg_txt. Branch B, the
# soft-token projection and F_Map start fresh (branch B = the pretrained LLM, LoRA B initialised to zero).
STAGE2_CARRIED = ("text_hidden_fcs.", "segmenter.sam.", "grounding_head.", "semantic_box_head.")


def ris_start_model(profile: Profile, variant: str, seed: int, weights: dict[str, str | None],
                    init_from: Path | None) -> PPCRModel:
    """The model a RIS stage starts from: the variant on the base `weights`, and with `init_from` (stage 2's
    checkpoint, for stage 3) `STAGE2_CARRIED` and branch A's LoRA from it (`glamm` takes all of it). Branch B, the
    soft-token projection and F_Map stay fresh."""
    model = build_ris_model(profile, variant, seed, weights)
    if init_from is not None:
        load_weights_into(model, init_from, prefixes=STAGE2_CARRIED, branches=("semantic",))
        if variant == "glamm":
            load_weights_into(model, init_from)
    return model


def run_ris_stage(profile: Profile, out: Path, variant: str, seed: int, stage_name: str, init_from: Path | None,
                  weights: dict[str, str | None], upstream: str, resume: bool, progress: bool,
                  suffix: str = "") -> Path:
    """Stage 2 (`stage_name` "glamm_init", the `glamm` variant) or stage 3 ("variants", folder `<variant>`), cached:
    the variant's PPCR checkpoint folder. `init_from`: stage 2's checkpoint, what stage 3 starts from. `suffix`:
    `@<recipe>` for another recipe of the profile (its folders are `glamm_init@<recipe>`, `<variant>@<recipe>`)."""
    config = profile.model_config(variant, seed)
    fp = profile.fingerprint(stage_name, variant, asdict(config), asdict(profile.training_recipe()),
                             profile.stage(stage_name), upstream, seed)
    label = (stage_name if stage_name == "glamm_init" else variant) + suffix

    def train(stage: Path, ckpt: Path) -> tuple[TrainResult, dict[str, Any]]:
        model = ris_start_model(profile, variant, seed, weights, init_from)
        cache = sam_cache_for(model, out, profile)
        root = data_root(profile, out)
        data = train_dataset(profile, root, model.image_prep())
        if progress:
            tqdm.write(describe_sam_cache(cache, model, data))
        cfg = loop_config(profile, stage_name, seed, len(data))
        val = diagnostics_data(profile, root, model.image_prep())

        def step(m: nn.Module, batch: dict[str, Any], rng: random.Random) -> dict[str, torch.Tensor]:
            return m(batch, rng=rng, sam_cache=cache).losses

        def evaluate(m: nn.Module) -> dict[str, float]:
            figures = ris_val_metrics(m, val, profile.eval_batch_size, cache)
            if m.config.spec.eval_box == "pred":  # the same weights with ground-truth boxes: is SAM still box-led?
                figures["oracle_miou"] = ris_val_metrics(m, val, profile.eval_batch_size, cache, box="gt")["miou"]
            return figures

        result = train_loop(model, step, data, collate_refer, cfg, stage, resume=resume,
                            desc=f"{label} (seed {seed})", progress=progress,
                            evaluate=None if val is None else evaluate, eval_every=profile.diag_every)
        _save_checkpoint(model, profile, ckpt)
        return result, {"variant": variant, "fingerprint": fp}

    return run_cached(out, seed, label, fp, "model", resume, train)


def train_variant(profile: Profile, out: str | Path, variant: str, seed: int, resume: bool = False,
                  progress: bool = True) -> Path:
    """Everything a variant needs (stages 0-3, cached) -> its PPCR checkpoint folder.

    `gt_box_oracle` is not trained: it is the `ppcr` checkpoint evaluated with ground-truth boxes. `<variant>@<recipe>`
    trains with the profile's other recipe of that name (`Profile.recipes`): its own stage 2, then the variant.
    """
    out = Path(out)
    if variant == "gt_box_oracle":
        variant = "ppcr"
    profile, variant, suffix = profile.for_variant(variant)
    profile.check_weight_paths()
    distributed.init(resolve_device(profile.device))
    prepare_data(profile, out, progress)
    weights = base_weights(profile, out, seed, resume, progress)
    # fingerprints name upstream stages relative to the run folder, so a copied or moved run keeps its cache
    local = {k: relative(v, out) for k, v in weights.items()}
    if profile.foundation == "shipped":  # the shipped files' hashes, not their (install-dependent) paths
        local = {"shipped_foundation": load_manifest()["files"]}
    upstream = json.dumps([local, data_version(profile), profile.datasets], sort_keys=True, default=str)
    if profile.init_from:  # a converted GLaMM (or any PPCR checkpoint) in place of stage 2
        glamm = Path(profile.init_from)
        if not (glamm / "config.json").is_file():
            raise FileNotFoundError(f"init_from {glamm} is not a PPCR checkpoint (no config.json); make one with "
                                    "`ppcr convert glamm ...`")
    else:
        glamm = run_ris_stage(profile, out, "glamm", seed, "glamm_init", None, weights, upstream, resume, progress,
                              suffix)
    return run_ris_stage(profile, out, variant, seed, "variants", glamm, weights, relative(glamm, out), resume,
                         progress, suffix)


def trained_checkpoint(out: str | Path, variant: str, seed: int) -> Path:
    """The finished stage-3 checkpoint of `variant` (the oracle: ppcr's) and `seed` in the run folder `out`, without
    training anything: the newest finished copy, or a one-line error naming the command that trains it."""
    name = "ppcr" if variant == "gt_box_oracle" else variant
    found = sorted((s for s in stage_dirs(out) if s.stage == name and s.seed == seed and s.finished
                    and (s.path / "model").is_dir()), key=lambda s: s.modified())
    if not found:
        raise FileNotFoundError(f"no trained {name} checkpoint for seed {seed} in {out}: train it first "
                                f"(`ppcr train --variant {name} --seed {seed} --out {out} ...`) or pass --checkpoint")
    return found[-1].path / "model"
