"""Stage 0: promptable SAM pretraining on SynRef images (box and point prompts); its image encoder is frozen
afterwards. At the paper scale SAM ViT-H's released weights take its place."""

from __future__ import annotations

import random
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import ConcatDataset

from ppcr.data.dataset import ImageObjectsDataset
from ppcr.data.refer import Refer
from ppcr.model.config import PPCRConfig
from ppcr.model.losses import mask_bce, mask_dice
from ppcr.model.modeling_ppcr import image_prep_for
from ppcr.model.segmentation import SamSegmenter, build_sam
from ppcr.recipe.profile import Profile
from ppcr.training.data import data_root, data_version, diagnostics_data
from ppcr.training.diagnostics import sam_prompt_metrics
from ppcr.training.loop import TrainResult, train_loop
from ppcr.training.stage import loop_config, run_cached, save_safetensors

SAM_PRETRAIN_VERSION = 3  # bump when stage 0's objective changes, so cached stage-0 weights are not reused


class SamPretrainer(nn.Module):
    """The whole SAM (encoder included) trained to segment objects from a box or from points inside them.

    Like SAM's own training, one image encoding serves several prompts: each step samples up to
    `objects_per_image` of the annotated objects of every image (referred to or not; SAM is class-agnostic),
    prompts each with its jittered box (probability `box_prob`) or 1-3 points inside it, and decodes them all.
    `freeze_encoder` trains the prompt encoder and mask decoder only (the image encoder runs without gradient).
    """

    def __init__(self, config: PPCRConfig, objects_per_image: int = 1, box_prob: float = 0.5,
                 freeze_encoder: bool = False):
        super().__init__()
        self.segmenter = SamSegmenter(build_sam(config.sam))
        self.segmenter.sam.requires_grad_(True)  # stage 0 trains the encoder too; it is frozen afterwards
        self.freeze_encoder = freeze_encoder
        if freeze_encoder:
            self.segmenter.sam.image_encoder.requires_grad_(False)
        self.objects_per_image = objects_per_image
        self.box_prob = box_prob

    def _prompt(self, box: torch.Tensor, mask: torch.Tensor, size: tuple[int, int], rng: random.Random,
                use_box: bool) -> torch.Tensor:
        """Sparse prompt embedding (n, C) of one object: its box jittered by up to 10% of its size, or k points."""
        seg = self.segmenter
        pe = seg.sam.prompt_encoder
        if use_box:
            wh = (box[2:] - box[:2]).repeat(2)
            jitter = torch.tensor([rng.uniform(-0.1, 0.1) for _ in range(4)], device=box.device) * wh
            return pe._embed_boxes(seg.boxes_to_input_frame((box + jitter)[None], [size]))[0]  # (2, C)
        ys, xs = torch.nonzero(mask, as_tuple=True)
        k = rng.randint(1, 3)
        pick = [rng.randrange(len(xs)) for _ in range(k)] if len(xs) else []
        pts = [[float(xs[i]) + 0.5, float(ys[i]) + 0.5] for i in pick] or [[size[1] / 2, size[0] / 2]] * k
        coords = seg.coords_to_input_frame(torch.tensor([pts], device=box.device), [size])  # (1, k, 2)
        labels = torch.ones(1, k, dtype=torch.long, device=box.device)
        return pe._embed_points(coords, labels, pad=True)[0]  # (k + 1, C): SAM pads point-only prompts

    def forward(self, batch: dict[str, Any], rng: random.Random) -> dict[str, torch.Tensor]:
        seg = self.segmenter
        device = seg.sam.pixel_mean.device
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_encoder):
            embeddings = seg.sam.image_encoder(batch["sam_pixel_values"].to(device))  # (N, C, s, s)
        pe = seg.sam.prompt_encoder
        index, sparse, targets, input_sizes, sizes = [], [], [], [], []
        use_box = rng.random() < self.box_prob  # one prompt kind per step: equal sparse lengths, one decoder call
        for i, (masks, boxes) in enumerate(zip(batch["masks"], batch["boxes"])):
            size = tuple(batch["original_size"][i])
            order = list(range(len(masks)))
            rng.shuffle(order)
            for k in order[: self.objects_per_image]:
                mask = masks[k].to(device)
                sparse.append(self._prompt(boxes[k].to(device), mask, size, rng, use_box))
                index.append(i)
                targets.append(mask)
                input_sizes.append(batch["sam_input_size"][i])
                sizes.append(size)
        width = max(p.shape[0] for p in sparse)  # pad point prompts with SAM's "not a point" embedding
        sparse = torch.stack([torch.cat([p, pe.not_a_point_embed.weight.expand(width - p.shape[0], -1)])
                              for p in sparse])  # (M, n, C)
        dense = pe.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(len(targets), -1, *pe.image_embedding_size)
        low_res, iou_pred = seg.decode_prompts(embeddings, torch.tensor(index, device=device), sparse, dense)
        masks = seg.postprocess(low_res, input_sizes, sizes)
        bce = torch.stack([mask_bce(p, t) for p, t in zip(masks, targets)]).mean()
        dice = torch.stack([mask_dice(p, t) for p, t in zip(masks, targets)]).mean()
        with torch.no_grad():
            true_iou = torch.stack([((p > 0) & (t > 0)).sum() / ((p > 0) | (t > 0)).sum().clamp(min=1)
                                    for p, t in zip(masks, targets)])
        iou_mse = torch.nn.functional.mse_loss(iou_pred[:, 0], true_iou.float())
        # Dice weighs as much as BCE here: SynRef objects are small, and BCE alone settles on "all background".
        return {"total": bce + dice + iou_mse, "bce": bce, "dice": dice, "iou_mse": iou_mse}


def collate_objects(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """`ImageObjectsDataset` items: SAM pixels stacked (N, 3, S, S), the rest as lists."""
    out = {k: [item[k] for item in batch] for k in batch[0]}
    out["sam_pixel_values"] = torch.stack(out["sam_pixel_values"])
    return out



def run_sam_pretrain(profile: Profile, out: Path, seed: int, resume: bool = False, progress: bool = True) -> Path:
    """Stage 0 (cached): the trained SAM's safetensors file."""
    config = profile.model_config("glamm", seed)
    fp = profile.fingerprint("sam_pretrain", SAM_PRETRAIN_VERSION, asdict(config.sam), profile.stage("sam_pretrain"),
                             profile.datasets, profile.data_seed, profile.image_size, data_version(profile), seed,
                             None)  # (the hash of a continued foundation once stood here: kept, so caches hold)

    def train(stage: Path, weights: Path) -> tuple[TrainResult, dict[str, Any]]:
        root = data_root(profile, out)
        torch.manual_seed(seed)
        spec = profile.stage("sam_pretrain")
        module = SamPretrainer(config, spec.objects_per_image, spec.box_prob, spec.freeze_sam_encoder)
        prep = image_prep_for(config)
        data = ConcatDataset([ImageObjectsDataset(Refer(root, d.name, d.split_by), "train", prep)
                              for d in profile.datasets])
        cfg = loop_config(profile, "sam_pretrain", seed, len(data))
        val = diagnostics_data(profile, root, image_prep_for(config))
        evaluate = None if val is None else (
            lambda m: sam_prompt_metrics(m.segmenter, val, profile.eval_batch_size))
        result = train_loop(module, lambda m, b, r: m(b, r), data, collate_objects, cfg, stage, resume=resume,
                            desc=f"stage 0 SAM pretraining (seed {seed})", progress=progress, evaluate=evaluate,
                            eval_every=profile.diag_every)
        save_safetensors(module.segmenter.sam, weights)
        return result, {}

    return run_cached(out, seed, "sam_pretrain", fp, "sam.safetensors", resume, train)
