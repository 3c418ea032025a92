"""Stage 1a: dense per-patch pretraining of the small LLaVA's CLIP tower on SynRef scenes.

The real LLaVA starts from a CLIP that already knows what each patch shows, and its own alignment stage keeps that
CLIP frozen. At small scale nothing pretrained exists. Trained end to end with the LLM (as stage 1 did first), the
tower's tokens neither say plainly what and where each patch is nor stay put while the LLM learns to read them,
and the LLM never grounds (notes/learning.md: probe box IoU 0.1 % after 600 steps on easy scenes; 11-13 % after
500 steps with this stage first and the tower frozen afterwards).

This stage gives the tower that knowledge first. Every patch token of the layer the LLM reads
(`vision_feature_layer`, CLS dropped) classifies the colour, shape, pattern and size of the object covering most of
the patch (index 0: background, or an object covering less than `MIN_COVER` of it) and regresses that object's box
(normalised xyxy of the square CLIP view), through linear heads that are dropped afterwards. Stage 1 then loads the
tower and, with `freeze_vision`, keeps it frozen.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import ConcatDataset, Dataset

from ppcr.data.refer import Refer, load_image
from ppcr.data.synref_language import COLORS, PATTERNS, SHAPES, SIZES
from ppcr.data.transforms import MIN_COVER, ImagePrep, square_coverage, square_view
from ppcr.model.config import PPCRConfig
from ppcr.model.mllm import build_llava
from ppcr.model.modeling_ppcr import image_prep_for
from ppcr.model.tokenizer import synref_tokenizer
from ppcr.recipe.profile import Profile, StageSpec
from ppcr.training.data import data_root, data_version
from ppcr.training.diagnostics import batches
from ppcr.training.loop import TrainResult, train_loop
from ppcr.training.stage import loop_config, run_cached, save_safetensors

VISION_PRETRAIN_VERSION = 1  # bump when the objective changes, so cached towers are not reused
ATTRIBUTE_VALUES: dict[str, tuple[str, ...]] = {"color": COLORS, "shape": SHAPES, "pattern": PATTERNS, "size": SIZES}
BOX_WEIGHT = 5.0  # the box L1 weight beside the four cross-entropies (BOXW=5, notes/experiments/localisation at cad0ccd)


def patch_targets(masks: list[np.ndarray], attributes: list[dict[str, Any]], grid: int
                  ) -> dict[str, torch.Tensor]:
    """Per-patch labels of one image for a `grid` x `grid` patch layout.

    masks: K x (H, W) binary masks of the image's objects; attributes: their SynRef metadata (shape, color, pattern,
    size). Returns, flattened row-major over the grid (as CLIP orders its patch tokens): one (grid*grid,) long
    tensor per attribute (value index + 1; 0 = background) and "box" (grid*grid, 4), the covering object's box in
    the square view normalised to [0, 1] (zeros on background patches).
    """
    n = grid * grid
    labels = {k: np.zeros(n, dtype=np.int64) for k in ATTRIBUTE_VALUES}
    box = np.zeros((n, 4), dtype=np.float32)
    cover = np.zeros(n, dtype=np.float32)
    for mask, attrs in zip(masks, attributes):
        square = square_view(mask.astype(np.float32))
        side = square.shape[0]
        ys, xs = np.nonzero(square)
        if not len(xs):
            continue
        frac = square_coverage(square, grid)
        better = (frac >= MIN_COVER) & (frac > cover)
        for key, values in ATTRIBUTE_VALUES.items():
            labels[key][better] = values.index(attrs[key]) + 1
        box[better] = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float32) / side
        cover = np.where(better, frac, cover)
    out = {k: torch.from_numpy(v) for k, v in labels.items()}
    out["box"] = torch.from_numpy(box)
    return out


class PatchTargetsDataset(Dataset):
    """One item per image of a SynRef split: the CLIP input and the per-patch labels of `patch_targets`."""

    def __init__(self, refer: Refer, split: str, prep: ImagePrep, grid: int, max_images: int | None = None):
        self.refer = refer
        self.prep = prep
        self.grid = grid
        ids = list(dict.fromkeys(int(refer.ref(r)["image_id"]) for r in refer.ref_ids(split)))
        self.image_ids = ids[:max_images] if max_images else ids

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image_id = self.image_ids[index]
        anns = [self.refer.ann(a) for a in self.refer.image_ann_ids(image_id)]
        missing = [a["id"] for a in anns if not a.get("synref")]
        if missing:
            raise ValueError(f"annotations {missing} of image {image_id} have no SynRef attributes: dense vision "
                             "pretraining needs SynRef data")
        targets = patch_targets([self.refer.mask(a) for a in anns], [a["synref"] for a in anns], self.grid)
        return {"clip_pixel_values": self.prep.clip(load_image(self.refer.image_path(image_id))), **targets}


def collate_patch_targets(batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([item[k] for item in batch]) for k in batch[0]}


def patch_targets_data(root: Path, datasets: list[Any], split: str, prep: ImagePrep, grid: int,
                       max_images: int | None = None) -> Dataset:
    """The union over a profile's datasets (`DataSpec`s) of their `split` images."""
    return ConcatDataset([PatchTargetsDataset(Refer(root, d.name, d.split_by), split, prep, grid, max_images)
                          for d in datasets])


def build_vision_tower(config: PPCRConfig, tokenizer) -> nn.Module:
    """The small LLaVA's CLIP tower, initialised as `build_llava` initialises it (same seed, same module)."""
    return build_llava(config, tokenizer).model.vision_tower


class DenseVisionPretrainer(nn.Module):
    """The CLIP tower plus one linear head per attribute and a box head on each patch token of the LLM's layer."""

    def __init__(self, vision_tower: nn.Module, feature_layer: int):
        super().__init__()
        self.vision_tower = vision_tower
        self.vision_tower.requires_grad_(True)
        self.feature_layer = feature_layer
        hidden = vision_tower.config.hidden_size
        self.heads = nn.ModuleDict({k: nn.Linear(hidden, len(v) + 1) for k, v in ATTRIBUTE_VALUES.items()})
        self.box_head = nn.Linear(hidden, 4)

    def patch_outputs(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, 3, S, S) -> per attribute (B, N, classes) logits and "box" (B, N, 4) in [0, 1]."""
        tower = self.vision_tower
        hidden = tower(pixels.to(tower.dtype), output_hidden_states=True).hidden_states[self.feature_layer]
        tokens = hidden[:, 1:].float()  # (B, N, d): the patch tokens LLaVA's "default" feature selection keeps
        out = {k: head(tokens) for k, head in self.heads.items()}
        out["box"] = self.box_head(tokens).sigmoid()
        return out

    def forward(self, batch: dict[str, torch.Tensor], rng: Any = None) -> dict[str, torch.Tensor]:
        device = self.box_head.weight.device
        out = self.patch_outputs(batch["clip_pixel_values"].to(device))
        losses = {k: nn.functional.cross_entropy(out[k].flatten(0, 1), batch[k].to(device).flatten())
                  for k in ATTRIBUTE_VALUES}
        fg = batch["color"].to(device) > 0
        box = batch["box"].to(device)
        losses["box_l1"] = (nn.functional.l1_loss(out["box"][fg], box[fg]) if bool(fg.any())
                            else out["box"].sum() * 0.0)
        losses["total"] = sum(losses[k] for k in ATTRIBUTE_VALUES) + BOX_WEIGHT * losses["box_l1"]
        return losses

    @torch.no_grad()
    def val_metrics(self, data: Dataset, batch_size: int = 32) -> dict[str, float]:
        """Accuracy (%) of each attribute on foreground patches, background accuracy (%), box L1 on foreground."""
        hits = {k: 0 for k in ATTRIBUTE_VALUES}
        n_fg = n_bg = bg_hits = 0
        l1 = 0.0
        device = self.box_head.weight.device
        for batch in batches(data, batch_size, collate_patch_targets):
            out = self.patch_outputs(batch["clip_pixel_values"].to(device))
            fg = batch["color"].to(device) > 0
            for k in ATTRIBUTE_VALUES:
                hits[k] += int((out[k].argmax(-1) == batch[k].to(device))[fg].sum())
            bg_hits += int((out["color"].argmax(-1) == 0)[~fg].sum())
            n_fg += int(fg.sum())
            n_bg += int((~fg).sum())
            l1 += float((out["box"][fg] - batch["box"].to(device)[fg]).abs().mean(-1).sum())
        metrics = {f"{k}_acc": 100.0 * hits[k] / max(1, n_fg) for k in ATTRIBUTE_VALUES}
        metrics["background_acc"] = 100.0 * bg_hits / max(1, n_bg)
        metrics["box_l1"] = l1 / max(1, n_fg)
        return metrics


__all__ = ["ATTRIBUTE_VALUES", "DenseVisionPretrainer", "PatchTargetsDataset", "VISION_PRETRAIN_VERSION",
           "build_vision_tower", "collate_patch_targets", "patch_targets", "patch_targets_data"]


# --------------------------------------------------------------------------------------------------------------
# the stage
# --------------------------------------------------------------------------------------------------------------


def vision_stage(profile: Profile) -> StageSpec | None:
    """The profile's `vision_pretrain` stage (stage 1a), or None when it has none or it has no steps."""
    spec = profile.stages.get("vision_pretrain")
    return spec if spec is not None and spec.total_steps(1) > 0 else None


def run_vision_pretrain(profile: Profile, out: Path, seed: int, resume: bool = False, progress: bool = True) -> Path:
    """Stage 1a (cached): the dense-pretrained CLIP tower's safetensors file."""
    config = profile.model_config("glamm", seed)
    if profile.data_kind != "synref":
        raise ValueError(f"profile {profile.name}: vision_pretrain needs SynRef's per-object attributes "
                         f"(data_kind synref), not {profile.data_kind!r}")
    fp = profile.fingerprint("vision_pretrain", VISION_PRETRAIN_VERSION, asdict(config.vision),
                             config.vision_feature_layer, profile.stage("vision_pretrain"), profile.datasets,
                             profile.data_seed, profile.image_size, data_version(profile), seed)

    def train(stage: Path, weights: Path) -> tuple[TrainResult, dict[str, Any]]:
        root = data_root(profile, out)
        torch.manual_seed(seed)
        module = DenseVisionPretrainer(build_vision_tower(config, synref_tokenizer()), config.vision_feature_layer)
        prep = image_prep_for(config)
        grid = config.vision.patch_grid
        data = patch_targets_data(root, profile.datasets, "train", prep, grid)
        cfg = loop_config(profile, "vision_pretrain", seed, len(data))
        evaluate = None
        if profile.diag_expressions:
            val = patch_targets_data(root, profile.datasets, "val", prep, grid, profile.diag_expressions)
            evaluate = lambda m: m.val_metrics(val, profile.eval_batch_size)  # noqa: E731
        result = train_loop(module, lambda m, b, r: m(b, r), data, collate_patch_targets, cfg, stage,
                            resume=resume, desc=f"stage 1a dense vision pretraining (seed {seed})",
                            progress=progress, evaluate=evaluate, eval_every=profile.diag_every)
        save_safetensors(module.vision_tower, weights)
        return result, {}

    return run_cached(out, seed, "vision_pretrain", fp, "vision_tower.safetensors", resume, train)
