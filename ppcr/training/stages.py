"""The staged recipe: how the small scale builds the starting points the paper loads.

The paper starts from pretrained SAM, initialises branch A from GLaMM's referring-segmentation weights and branch B
from GranD-pretrained weights. Nothing pretrained is reachable here, so the synthetic profiles make them:

    stage 0  sam_pretrain    promptable SAM on SynRef images, box and point prompts (then its encoder is frozen)
    stage 1  mllm_pretrain   the small LLaVA on SynRef scenes: describing objects (attributes) and their boxes
    stage 2  glamm_init      GLaMM-style RIS training (the `glamm` variant), the initialisation of branch A
    stage 3  <variant>       every variant (glamm included) trained from stage 2's weights, same number of steps

At `paper` scale stages 0-1 are replaced by SAM ViT-H and LLaVA-1.5-7B from local paths. Each stage's output is
cached under a hash of everything that determines it, so variants and re-runs share stages 0-2.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torchvision.ops import generalized_box_iou_loss
from torch.utils.data import ConcatDataset, Dataset, Subset

from ppcr.data.dataset import ImageObjectsDataset, ReferSegDataset, collate_refer
from ppcr.data.refer import Refer, load_image
from ppcr.data.transforms import ImagePrep, target_patches
from ppcr.losses import image_grounding_ce, mask_bce, mask_dice
from ppcr.model import prompts
from ppcr.model.config import PPCRConfig
from ppcr.model.heads import MLPBoxHead
from ppcr.model.mllm import build_llava, image_token_states, llava_image_features, multimodal_embeddings
from ppcr.model.modeling_ppcr import PPCRModel, image_prep_for
from ppcr.model.persistence import load_weights_into
from ppcr.model.segmentation import SamSegmenter, build_sam
from ppcr.model.tokenizer import build_word_tokenizer, encode_pass, load_tokenizer
from ppcr.training.cache import SamEmbeddingCache, module_fingerprint
from ppcr.metrics import box_iou
from ppcr.training.diagnostics import batches, ris_val_metrics, sam_prompt_metrics, val_subset
from ppcr.training.loop import LoopConfig, TrainResult, train_loop
from ppcr.training.profile import Profile, StageSpec
from ppcr.training.prompt_probe import box_figures
from ppcr.training.vision_pretrain import (VISION_PRETRAIN_VERSION, DenseVisionPretrainer, build_vision_tower,
                                           collate_patch_targets, patch_targets_data)

SAM_PRETRAIN_VERSION = 3  # bump when stage 0's objective changes, so cached stage-0 weights are not reused
MLLM_PRETRAIN_VERSION = 2  # the same for stage 1
BOX_BINS = 32  # stage 1 answers boxes as integers 0..31 of the image width/height
PRETRAIN_WORDS = ["sure", "it", "is", "a", "the", "bounding", "box", ",", "."] + [str(i) for i in range(BOX_BINS)]


# --------------------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------------------


def data_version(profile: Profile) -> str:
    """Part of every stage fingerprint: a new generator version invalidates the stages trained on old data."""
    if profile.data_kind == "synref":
        from ppcr.data.synref import GENERATOR_VERSION

        return GENERATOR_VERSION
    return str(profile.data_root)


def data_root(profile: Profile, out: str | Path) -> Path:
    if profile.data_root:
        return Path(profile.data_root)
    if profile.data_kind == "refer":
        raise ValueError(f"profile {profile.name!r} reads RefCOCO/+/g: give data_root (see data_scripts/README.md)")
    return Path(out) / "data"


def prepare_data(profile: Profile, out: str | Path, progress: bool = True, workers: int = 2) -> Path:
    """Generate the profile's SynRef suites (cached by their generator config; `workers` generator processes, which
    do not change the files) or check the REFER root."""
    root = data_root(profile, out)
    if profile.data_kind == "synref":
        from ppcr.data.synref import generate_suite

        for spec in profile.datasets:
            generate_suite(spec.name, root, n_refs=spec.refs, seed=profile.data_seed, image_size=profile.image_size,
                           workers=workers, progress=progress)
    else:
        for spec in profile.datasets:
            Refer(root, spec.name, spec.split_by)  # raises a clear error for a missing file
    return root


def split_datasets(profile: Profile, root: Path, prep: ImagePrep, split: str = "train") -> list[ReferSegDataset]:
    return [ReferSegDataset(Refer(root, spec.name, spec.split_by), split, prep) for spec in profile.datasets]


def train_dataset(profile: Profile, root: Path, prep: ImagePrep) -> Dataset:
    """The union of every dataset's train split (one model for all three, as LISA/GLaMM/PPCR train)."""
    return ConcatDataset(split_datasets(profile, root, prep))


STAGE1_KEYS = ("clip_pixel_values", "expression", "attributes", "box", "original_size")  # what stage 1 reads


class WithTargetAttributes(Dataset):
    """Stage 1's view of a referring dataset: the keys of `STAGE1_KEYS`, with the target's SynRef attributes
    (shape, colour, size, pattern) for the "describe" answers. With `grid` (the CLIP patch grid's side) items also
    carry "target_patches" ((grid*grid,) {0, 1}, `ppcr.data.transforms.target_patches`) for the image-token
    grounding."""

    def __init__(self, base: ReferSegDataset, grid: int | None = None):
        self.base = base
        self.grid = grid

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.base[index]
        ann = self.base.refer.ann(item["meta"]["ann_id"])
        item["attributes"] = ann.get("synref", {})
        out = {k: item[k] for k in STAGE1_KEYS}
        if self.grid:
            out["target_patches"] = target_patches(item["mask"].numpy(), self.grid)
        return out


class ObjectGroundingQuestions(Dataset):
    """Object-level grounding data for stage 1 (GLaMM's GranD pretraining in miniature): every annotated object of
    every image of a split whose colour and shape together are unique on its image, named "the <colour> <shape>".

    Referring expressions name one object per image; these name all of them, in the simplest form, so the LLM sees
    about as many grounding questions again, and easy ones first among them. Items have `STAGE1_KEYS` (and
    "target_patches" with `grid`, as `WithTargetAttributes`)."""

    def __init__(self, refer: Refer, split: str, prep: ImagePrep, grid: int | None = None):
        self.refer = refer
        self.prep = prep
        self.grid = grid
        self.items: list[tuple[int, int]] = []  # (image id, annotation id)
        for image_id in dict.fromkeys(int(refer.ref(r)["image_id"]) for r in refer.ref_ids(split)):
            anns = [refer.ann(a) for a in refer.image_ann_ids(image_id)]
            if not all(a.get("synref") for a in anns):
                raise ValueError(f"image {image_id} has annotations without SynRef attributes: object grounding "
                                 "questions need SynRef data")
            names = [(a["synref"]["color"], a["synref"]["shape"]) for a in anns]
            self.items += [(image_id, a["id"]) for a, n in zip(anns, names) if names.count(n) == 1]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image_id, ann_id = self.items[index]
        ann = self.refer.ann(ann_id)
        image = load_image(self.refer.image_path(image_id))
        attrs = ann["synref"]
        out = {"clip_pixel_values": self.prep.clip(image), "expression": f"the {attrs['color']} {attrs['shape']}",
               "attributes": attrs, "box": torch.from_numpy(self.refer.box_xyxy(ann)),
               "original_size": (int(image.shape[0]), int(image.shape[1]))}
        if self.grid:
            out["target_patches"] = target_patches(self.refer.mask(ann), self.grid)
        return out


# --------------------------------------------------------------------------------------------------------------
# stage bookkeeping
# --------------------------------------------------------------------------------------------------------------


def _stage_dir(out: Path, seed: int, name: str, fingerprint: str) -> Path:
    return out / "stages" / f"seed{seed}" / f"{name}-{fingerprint}"


def _done(stage: Path) -> dict[str, Any] | None:
    marker = stage / "DONE.json"
    return json.loads(marker.read_text()) if marker.is_file() else None


def _mark_done(stage: Path, result: TrainResult, **extra: Any) -> dict[str, Any]:
    info = {"steps": result.steps, "wall_s": result.wall_s, "samples_per_s": result.samples_per_s,
            "peak_memory_mb": result.peak_memory_mb, "first_losses": result.first_losses,
            "final_losses": result.final_losses, "resumed_from": result.resumed_from,
            "final_eval": result.final_eval, "eval_history": result.eval_history, **extra}
    (stage / "DONE.json").write_text(json.dumps(info, indent=2, default=str))
    return info


def _fresh(stage: Path, resume: bool) -> None:
    """Without --resume a half-finished stage starts over."""
    if not resume and stage.exists() and _done(stage) is None:
        shutil.rmtree(stage)
    stage.mkdir(parents=True, exist_ok=True)


def diagnostics_data(profile: Profile, root: Path, prep: ImagePrep) -> Dataset | None:
    """The fixed val subset every stage's held-out diagnostics run on (None when the profile turns them off)."""
    if not profile.diag_expressions:
        return None
    return val_subset(split_datasets(profile, root, prep, "val"), profile.diag_expressions)


def loop_config(profile: Profile, stage_name: str, seed: int, n_samples: int) -> LoopConfig:
    spec = profile.stage(stage_name)
    return LoopConfig(
        steps=spec.total_steps(n_samples), batch_size=spec.batch_size, lr=spec.lr, warmup_steps=spec.warmup_steps,
        betas=profile.betas, weight_decay=profile.weight_decay, grad_clip=profile.grad_clip,
        grad_accum=spec.grad_accum, mixed_precision=profile.mixed_precision,
        checkpoint_every=profile.checkpoint_every, seed=seed, device=profile.device,
        num_workers=profile.num_workers, deepspeed_config=_deepspeed_path(profile),
        lr_by_prefix={} if spec.sam_lr is None else {"segmenter.sam.": spec.sam_lr},
    )


def _deepspeed_path(profile: Profile) -> str | None:
    if not profile.deepspeed_config:
        return None
    path = Path(profile.deepspeed_config)
    if not path.is_file():
        path = Path(__file__).with_name(profile.deepspeed_config)
    return str(path)


# --------------------------------------------------------------------------------------------------------------
# stage 0: promptable SAM pretraining
# --------------------------------------------------------------------------------------------------------------


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
    config = profile.model_config("glamm", seed)
    root = data_root(profile, out)
    fp = profile.fingerprint("sam_pretrain", SAM_PRETRAIN_VERSION, asdict(config.sam), profile.stage("sam_pretrain"),
                             profile.datasets, profile.data_seed, profile.image_size, data_version(profile), seed,
                             _shipped_stamp(profile, "sam_pretrain"))
    stage = _stage_dir(out, seed, "sam_pretrain", fp)
    weights = stage / "sam.safetensors"
    if _done(stage):
        return weights
    _fresh(stage, resume)
    torch.manual_seed(seed)
    spec = profile.stage("sam_pretrain")
    module = SamPretrainer(config, spec.objects_per_image, spec.box_prob, spec.freeze_sam_encoder)
    if spec.init == "shipped":  # continue the shipped foundation's SAM
        from ppcr.foundation import shipped_weights

        shipped = build_sam(config.sam, shipped_weights(config)["sam_checkpoint"])
        module.segmenter.sam.load_state_dict(shipped.state_dict(), strict=True)
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
    _save_safetensors(module.segmenter.sam, weights)
    _mark_done(stage, result, output=str(weights))
    return weights


def _save_safetensors(module: nn.Module, path: Path) -> None:
    """A module's whole state dict (CPU, contiguous) as one safetensors file: no pickle to load it back."""
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}, str(path))


# --------------------------------------------------------------------------------------------------------------
# stage 1: MLLM pretraining (image-text alignment on SynRef scenes)
# --------------------------------------------------------------------------------------------------------------


def pretrain_turn(expression: str, attributes: dict[str, Any], box: torch.Tensor, size: tuple[int, int],
                  task: str, rng: random.Random | None = None) -> tuple[str, str]:
    """One stage-1 question/answer about the object an expression names: describe it, or give its box (32 bins).

    The questions are the RIS prompts' own templates (the semantic ones for "describe", the spatial ones with the
    expression in place of the soft token for "where") and the answers begin like the RIS answers ("Sure, ..."), so
    every word the later stages use has a trained embedding, as it has in the real LLaVA. `rng` None: the first
    template (evaluation)."""
    if task == "describe":
        words = [attributes.get(k) for k in ("size", "pattern", "color", "shape")]
        question = prompts.fill(prompts.pick_template(prompts.SEMANTIC_TEMPLATES, rng, 0), expression)
        return question, "Sure, it is a " + " ".join(w for w in words if w) + "."
    templates = prompts.SPATIAL_RE_TEMPLATES + tuple(prompts.soft_token_as_expression(t) for t in
                                                     prompts.SPATIAL_TEMPLATES + prompts.SPATIAL_RE_SEG_TEMPLATES)
    question = prompts.fill(prompts.pick_template(templates, rng, 0), expression)
    h, w = size
    bins = [min(BOX_BINS - 1, int(float(v) / s * BOX_BINS)) for v, s in zip(box.tolist(), (w, h, w, h))]
    return question, "Sure, the bounding box is " + " ".join(map(str, bins)) + "."


def bin_centres(bins: Sequence[int], size: tuple[int, int]) -> list[float]:
    """Four box bins (of `BOX_BINS` per side) -> the pixel box through their centres; `pretrain_turn` maps it back
    to the same bins."""
    h, w = size
    return [(b + 0.5) / BOX_BINS * s for b, s in zip(bins, (w, h, w, h))]


class MllmPretrainer(nn.Module):
    """The small LLaVA (vision tower, projector and LLM all trained) on next-token prediction of the answers, plus
    a grounding probe: an F_Map-shaped MLP regresses the target's box (L1 + GIoU) from the hidden state that
    predicts the first box bin of a "where" answer.

    The probe is why the LLM learns where things are: with next-token cross-entropy on 32-way bins alone, 500 steps
    gave a box IoU of 0 (every bin the most frequent one), while the dense regression gradient reaches the image
    tokens from the first steps. Only the LLaVA is kept; stage 3's F_Map starts fresh, as in the paper. The
    probe's box is the stage-1 analogue of P_seg_box -> F_Map: a hidden state at the answer's box position.
    `probe_describe` (with `probe_positions="all"`) puts the probe on the "describe" answers' positions too, the
    stage-1 analogue of the [SEG] slot, so that P_seg_txt can start with the object's place.

    `image_grounding` > 0 adds a second dense signal (needs `config.image_after_prompt`, so the image tokens see
    the question): a linear head on every image token's last hidden state, softmaxed over the image's tokens, must
    put its mass on the patches the target covers (cross-entropy, that weight; items carry "target_patches").
    Each image token then learns whether the expression names it, and the answer only has to read the marked
    tokens; on oracle tokens this is what took 4-object scenes off the constant-box plateau (notes/learning.md).
    """

    def __init__(self, config: PPCRConfig, tokenizer, probe_weight: float = 1.0, probe_positions: str = "first",
                 probe_giou: bool = True, image_grounding: float = 0.0, probe_describe: bool = False):
        super().__init__()
        if probe_positions not in ("first", "all"):
            raise ValueError(f"probe_positions must be 'first' or 'all', not {probe_positions!r}")
        if probe_describe and probe_positions != "all":
            raise ValueError("probe_describe reads every answer position: it needs probe_positions='all'")
        self.probe_describe = probe_describe
        if image_grounding > 0 and not config.image_after_prompt:
            raise ValueError("image_grounding needs image_after_prompt: with the image before the question, the "
                             "image tokens cannot see the expression they are to match")
        self.image_grounding = image_grounding
        self.grounding_head = nn.Linear(config.text.hidden_size, 1) if image_grounding > 0 else None
        self.probe_positions = probe_positions
        self.probe_giou = probe_giou
        self.config = config
        self.tokenizer = tokenizer
        self.llava = build_llava(config, tokenizer)
        self.llava.requires_grad_(True)
        self.box_probe = MLPBoxHead(config.text.hidden_size, config.box_head_hidden)
        self.probe_weight = probe_weight
        self.register_buffer("bin_ids", torch.tensor(tokenizer.convert_tokens_to_ids(
            [str(i) for i in range(BOX_BINS)])), persistent=False)

    def answer_logits(self, batch: dict[str, Any], tasks: list[str], rng: random.Random | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced next-token logits of each row's answer: (B, A, V) and targets (B, A), -100 = padding.

        tasks: "describe" or "where" per row of the batch; rng picks the question templates (None: the first)."""
        hidden, tgt = self.answer_hidden(batch, tasks, rng)
        return self.llava.get_output_embeddings()(hidden), tgt

    def probe_boxes(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """(B, 4) normalised xyxy boxes from the hidden state predicting each row's first bin token."""
        first = torch.isin(targets, self.bin_ids).float().argmax(1)  # (B,)
        h = hidden[torch.arange(len(first), device=hidden.device), first]  # (B, d)
        return self.box_probe(h.float())

    def sequence_hidden(self, batch: dict[str, Any], tasks: list[str], rng: random.Random | None = None,
                        boxes: Sequence[torch.Tensor] | None = None) -> tuple[torch.Tensor, Any]:
        """Last-layer hidden states of the whole conversation (B, L, d) and its `EncodedPass`. `boxes`: the
        pixel boxes the "where" answers state (default the targets'; `decode_where_bins` passes its own)."""
        device = self.llava.device
        feats = llava_image_features(self.llava, batch["clip_pixel_values"].to(device),
                                     self.config.vision_feature_layer)  # (B, N_img, d), with gradient
        stated = batch["box"] if boxes is None else boxes
        turns = [pretrain_turn(e, a, torch.as_tensor(b), tuple(s), t, rng)
                 for e, a, b, s, t in zip(batch["expression"], batch["attributes"], stated,
                                          batch["original_size"], tasks)]
        ctx, ans = zip(*[prompts.conversation(q, a, self.config.system_prompt, self.config.image_after_prompt)
                         for q, a in turns])
        enc = encode_pass(self.tokenizer, ctx, ans, None, feats.shape[1]).to(device)
        embeds = multimodal_embeddings(self.llava, enc.input_ids, feats, self.image_token_id)
        hidden = self.llava.model.language_model(inputs_embeds=embeds,
                                                 attention_mask=enc.attention_mask).last_hidden_state
        return hidden, enc

    def where_bin_logits(self, batch: dict[str, Any], bins: torch.Tensor) -> torch.Tensor:
        """(B, 4) bins stated in the "where" answers -> (B, 4, 32) logits over the bin tokens at the positions that
        predict them (the first question template; teacher-forced on `bins`)."""
        boxes = [torch.tensor(bin_centres(b.tolist(), tuple(size))) for b, size in zip(bins, batch["original_size"])]
        hidden, targets = self.answer_positions(*self.sequence_hidden(batch, ["where"] * len(bins), None, boxes))
        # the four bin positions of each row, in order: a stable descending sort puts the bin targets first
        at = torch.sort(torch.isin(targets, self.bin_ids).float(), dim=1, descending=True, stable=True).indices[:, :4]
        picked = hidden[torch.arange(len(bins), device=hidden.device)[:, None], at]  # (B, 4, d)
        return self.llava.get_output_embeddings()(picked)[..., self.bin_ids]

    @torch.no_grad()
    def decode_where_bins(self, batch: dict[str, Any]) -> torch.Tensor:
        """The LLaVA's own box for each row's "where" question, (B, 4) bins: the answer's fixed words ("Sure, the
        bounding box is") given, each bin the argmax over the 32 bin tokens after the bins it chose before (greedy
        decoding in four passes; the causal mask hides the placeholder bins after the one being chosen)."""
        bins = torch.zeros(len(batch["expression"]), 4, dtype=torch.long)
        for k in range(4):
            bins[:, k] = self.where_bin_logits(batch, bins)[:, k].argmax(-1).cpu()
        return bins

    def where_answer_boxes(self, batch: dict[str, Any]) -> torch.Tensor:
        """(B, 4) the boxes of `decode_where_bins` (bin centres), normalised by each image's width/height. Taken as
        answered: corners in the wrong order are not swapped (such a box scores IoU 0)."""
        return (self.decode_where_bins(batch).float() + 0.5) / BOX_BINS  # the bins' centres, as `bin_centres`

    @property
    def image_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(prompts.IMAGE_TOKEN)

    def image_token_logits(self, hidden: torch.Tensor, enc: Any) -> torch.Tensor:
        """(B, N_img) grounding logits of the image tokens (row-major patches), from `sequence_hidden`'s output."""
        image_hidden = image_token_states(hidden, enc.input_ids, self.image_token_id)  # (B, N_img, d)
        return self.grounding_head(image_hidden.float()).squeeze(-1)

    def image_grounding_loss(self, hidden: torch.Tensor, enc: Any, batch: dict[str, Any]
                             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-entropy of the image-token softmax against the target's patches (their mass shared equally), and
        the share of rows whose top token lies on the target."""
        logits = self.image_token_logits(hidden, enc)  # (B, N_img)
        tp = torch.stack([torch.as_tensor(t) for t in batch["target_patches"]]).to(logits.device)  # (B, N_img)
        hit = (tp.gather(1, logits.argmax(-1, keepdim=True)) > 0).float().mean()
        return image_grounding_ce(logits, tp), hit

    def answer_hidden(self, batch: dict[str, Any], tasks: list[str], rng: random.Random | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """Last-layer hidden states at the positions predicting each answer token: (B, A, d), targets (B, A)."""
        return self.answer_positions(*self.sequence_hidden(batch, tasks, rng))

    @staticmethod
    def answer_positions(hidden: torch.Tensor, enc: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L, d) hidden states -> those predicting each answer token (B, A, d) and the targets (B, A)."""
        device = hidden.device
        targets = enc.labels[:, 1:]  # (B, L-1): position t predicts token t+1
        answer = targets != -100
        width = int(answer.sum(1).max())
        start = answer.float().argmax(1)  # first answer position of each row
        cols = (start[:, None] + torch.arange(width, device=device)[None]).clamp(max=targets.shape[1] - 1)
        rows = torch.arange(hidden.shape[0], device=device)[:, None]
        tgt = torch.where(answer[rows, cols], targets[rows, cols], torch.full_like(cols, -100))
        return hidden[:, :-1][rows, cols], tgt  # (B, A, d), (B, A)

    def forward(self, batch: dict[str, Any], rng: random.Random) -> dict[str, torch.Tensor]:
        tasks = [rng.choice(("describe", "where")) for _ in batch["expression"]]
        sequence, enc = self.sequence_hidden(batch, tasks, rng)
        hidden, targets = self.answer_positions(sequence, enc)
        logits = self.llava.get_output_embeddings()(hidden)
        ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
        grounding = {}
        if self.grounding_head is not None:  # every row (describe and where) names its target in the question
            loss, hit = self.image_grounding_loss(sequence, enc, batch)
            grounding = {"grounding_ce": loss, "grounding_hit": hit.detach()}
            ce_total = ce + self.image_grounding * loss
        else:
            ce_total = ce
        where = torch.tensor([t == "where" for t in tasks], device=hidden.device)
        if not bool(where.any()):
            zero = ce.new_zeros(())
            return {"total": ce_total, "ce": ce, "probe_l1": zero, "probe_giou": zero, **grounding}
        pred = self.probe_boxes(hidden[where], targets[where])
        boxes = normalised_boxes(batch, [True] * len(tasks)).to(pred.device)  # (B, 4)
        gt = boxes[where]
        l1 = torch.nn.functional.l1_loss(pred, gt)
        giou = generalized_box_iou_loss(_ordered(pred), gt, reduction="mean")
        if self.probe_positions == "all":  # the box from every answer position of the "where" rows: (n, A, 4)
            rows = torch.ones_like(where) if self.probe_describe else where  # and of the "describe" rows
            valid = targets[rows] != -100
            every = (self.box_probe(hidden[rows].float()) - boxes[rows][:, None]).abs().mean(-1)  # (n, A)
            probe = every[valid].mean()
        else:
            probe = l1
        total = ce_total + self.probe_weight * (probe + giou if self.probe_giou else probe)
        return {"total": total, "ce": ce, "probe_l1": l1, "probe_giou": giou, **grounding}

    @torch.no_grad()
    def val_metrics(self, data: Dataset, batch_size: int = 16) -> dict[str, float]:
        """Answer-token accuracy (%) of "describe" and "where" questions, and the box read off the "where"
        answer's four bins (teacher-forced, bin centres): mean IoU and accuracy@0.5 against the target's box; the
        same of the box the LLaVA decodes itself (`decode_where_bins`, "where_free_*"; the teacher-forced read gives
        each bin the true bins before it, so it is the more optimistic of the two). Also the probe's box read at the
        "describe" answer's position that predicts "a" in "Sure, it is a ...", the place of [SEG] in stage 2's
        semantic answer "Sure, it is [SEG]." (how much of the box stage 2 starts with)."""
        correct = {"describe": [0, 0], "where": [0, 0]}
        box_ious: list[float] = []
        free_ious: list[float] = []
        probe_ious: list[float] = []
        seg_ious: list[float] = []
        article = self.tokenizer.convert_tokens_to_ids("a")
        hits: list[float] = []
        for batch in batches(data, batch_size):
            for task in ("describe", "where"):
                sequence, enc = self.sequence_hidden(batch, [task] * len(batch["expression"]))
                hidden, targets = self.answer_positions(sequence, enc)
                if self.grounding_head is not None and task == "where":
                    hits.append(float(self.image_grounding_loss(sequence, enc, batch)[1]) * len(targets))
                logits = self.llava.get_output_embeddings()(hidden)
                gt = normalised_boxes(batch, [True] * len(targets))
                if task == "where":
                    probe = _ordered(self.probe_boxes(hidden, targets)).cpu()
                    probe_ious += [box_iou(p.tolist(), g.tolist()) for p, g in zip(probe, gt)]
                    free_ious += [box_iou(p.tolist(), g.tolist()) for p, g in zip(self.where_answer_boxes(batch), gt)]
                else:  # the position predicting the answer's first "a" (the [SEG] slot of stage 2)
                    at = (targets == article).float().argmax(1)
                    seg = _ordered(self.box_probe(hidden[torch.arange(len(at)), at].float())).cpu()
                    seg_ious += [box_iou(p.tolist(), g.tolist()) for p, g in zip(seg, gt)]
                pred = logits.argmax(-1)
                valid = targets != -100
                correct[task][0] += int(((pred == targets) & valid).sum())
                correct[task][1] += int(valid.sum())
                if task == "where":  # the four bin tokens of the answer "sure , the bounding box is b1 b2 b3 b4 ."
                    for row, (box, (h, w)) in enumerate(zip(batch["box"], batch["original_size"])):
                        words = self.tokenizer.convert_ids_to_tokens(targets[row].clamp(min=0).tolist())
                        at = [i for i, t in enumerate(words) if t.isdigit() and targets[row, i] != -100][:4]
                        bins = self.tokenizer.convert_ids_to_tokens(pred[row, at].tolist())
                        values = [int(b) if b.isdigit() else BOX_BINS // 2 for b in bins]
                        decoded = [(v + 0.5) / BOX_BINS * s for v, s in zip(values, (w, h, w, h))]
                        box_ious.append(box_iou(decoded, torch.as_tensor(box).tolist()))
        return {"describe_token_acc": 100.0 * correct["describe"][0] / max(1, correct["describe"][1]),
                "where_token_acc": 100.0 * correct["where"][0] / max(1, correct["where"][1]),
                "where_box_iou": 100.0 * float(np.mean(box_ious)),
                "where_box_acc50": 100.0 * float(np.mean(np.asarray(box_ious) >= 0.5)),
                "where_free_box_iou": 100.0 * float(np.mean(free_ious)),
                "where_free_box_acc50": 100.0 * float(np.mean(np.asarray(free_ious) >= 0.5)),
                "probe_box_iou": 100.0 * float(np.mean(probe_ious)),
                "probe_box_acc50": 100.0 * float(np.mean(np.asarray(probe_ious) >= 0.5)),
                "seg_slot_probe_box_iou": 100.0 * float(np.mean(seg_ious)),
                **({"grounding_hit": 100.0 * sum(hits) / len(probe_ious)} if hits else {})}


def normalised_boxes(batch: dict[str, Any], rows: list[bool]) -> torch.Tensor:
    """(n, 4) xyxy target boxes of the selected rows, divided by their image's width/height."""
    out = []
    for keep, box, (h, w) in zip(rows, batch["box"], batch["original_size"]):
        if keep:
            box = torch.as_tensor(box, dtype=torch.float32).cpu()  # the loop may have moved it to the device
            out.append(box / torch.tensor([float(w), float(h), float(w), float(h)]))
    return torch.stack(out)


def _ordered(boxes: torch.Tensor) -> torch.Tensor:
    """xyxy with x1 >= x0 and y1 >= y0 (the probe's sigmoid outputs are not ordered), for the GIoU loss."""
    return torch.cat([torch.minimum(boxes[:, :2], boxes[:, 2:]), torch.maximum(boxes[:, :2], boxes[:, 2:])], dim=1)


def synref_tokenizer():
    from ppcr.data.synref import vocabulary

    return build_word_tokenizer(list(vocabulary()) + PRETRAIN_WORDS)


def load_shipped_llava(module: MllmPretrainer, config: PPCRConfig) -> None:
    """Load the shipped foundation's LLaVA (verified against its manifest; transformers maps the saved layout's
    names) into `module.llava`."""
    from ppcr.foundation import shipped_weights

    shipped = build_llava(config.replace(llava_path=shipped_weights(config)["llava_path"]), module.tokenizer)
    module.llava.load_state_dict(shipped.state_dict(), strict=True)


def _shipped_stamp(profile: Profile, stage_name: str) -> str | None:
    """The sha256 of the shipped weights a stage continues (`init: shipped`; part of its fingerprint), else None."""
    if profile.stage(stage_name).init != "shipped":
        return None
    from ppcr.foundation import load_manifest

    return load_manifest()["files"]["sam.safetensors" if stage_name == "sam_pretrain" else "llava/model.safetensors"]


def _vision_stage(profile: Profile) -> StageSpec | None:
    """The profile's `vision_pretrain` stage (stage 1a), or None when it has none or it has no steps."""
    spec = profile.stages.get("vision_pretrain")
    return spec if spec is not None and spec.total_steps(1) > 0 else None


def run_vision_pretrain(profile: Profile, out: Path, seed: int, resume: bool = False, progress: bool = True) -> Path:
    """Stage 1a (`ppcr.training.vision_pretrain`): returns the dense-pretrained CLIP tower's safetensors file."""
    config = profile.model_config("glamm", seed)
    if profile.data_kind != "synref":
        raise ValueError(f"profile {profile.name}: vision_pretrain needs SynRef's per-object attributes "
                         f"(data_kind synref), not {profile.data_kind!r}")
    root = data_root(profile, out)
    fp = profile.fingerprint("vision_pretrain", VISION_PRETRAIN_VERSION, asdict(config.vision),
                             config.vision_feature_layer, profile.stage("vision_pretrain"), profile.datasets,
                             profile.data_seed, profile.image_size, data_version(profile), seed)
    stage = _stage_dir(out, seed, "vision_pretrain", fp)
    weights = stage / "vision_tower.safetensors"
    if _done(stage):
        return weights
    _fresh(stage, resume)
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
    result = train_loop(module, lambda m, b, r: m(b, r), data, collate_patch_targets, cfg, stage, resume=resume,
                        desc=f"stage 1a dense vision pretraining (seed {seed})", progress=progress,
                        evaluate=evaluate, eval_every=profile.diag_every)
    _save_safetensors(module.vision_tower, weights)
    _mark_done(stage, result, output=str(weights))
    return weights


def run_mllm_pretrain(profile: Profile, out: Path, seed: int, resume: bool = False, progress: bool = True) -> Path:
    """Returns a folder in the llava-hf layout (config.json, safetensors, tokenizer) for the later stages.

    With a `vision_pretrain` stage in the profile, its dense-pretrained CLIP tower (stage 1a) replaces the random
    one first; `freeze_vision` keeps the tower frozen here."""
    config = profile.model_config("glamm", seed)
    root = data_root(profile, out)
    spec = profile.stage("mllm_pretrain")
    vision = _vision_stage(profile)
    if vision is not None and spec.init == "shipped":
        raise ValueError(f"profile {profile.name}: mllm_pretrain continues the shipped LLaVA (init: shipped), so it "
                         "cannot also start from a new vision_pretrain tower")
    extra = [] if vision is None else ["vision_pretrain", VISION_PRETRAIN_VERSION, vision]
    if config.image_after_prompt:  # (only when set: the caches of LLaVA-ordered stages stay valid)
        extra += ["image_after_prompt"]
    fp = profile.fingerprint("mllm_pretrain", MLLM_PRETRAIN_VERSION, asdict(config.vision), asdict(config.text), config.system_prompt,
                             spec, profile.datasets, profile.data_seed, profile.image_size,
                             data_version(profile), seed, _shipped_stamp(profile, "mllm_pretrain"), *extra)
    stage = _stage_dir(out, seed, "mllm_pretrain", fp)
    llava_dir = stage / "llava"
    if _done(stage):
        return llava_dir
    tower = None if vision is None else run_vision_pretrain(profile, out, seed, resume=resume, progress=progress)
    _fresh(stage, resume)
    torch.manual_seed(seed)
    tokenizer = synref_tokenizer()
    module = MllmPretrainer(config, tokenizer, spec.probe_weight, spec.probe_positions, spec.probe_giou,
                            spec.image_grounding, spec.probe_describe)
    if spec.init == "shipped":  # continue the shipped foundation's LLaVA (the probe starts fresh)
        load_shipped_llava(module, config)
    if tower is not None:
        from safetensors.torch import load_file

        module.llava.model.vision_tower.load_state_dict(load_file(str(tower)), strict=True)
    if spec.freeze_vision:
        module.llava.model.vision_tower.requires_grad_(False)
    prep = image_prep_for(config)
    grid = config.vision.patch_grid if spec.image_grounding > 0 else None
    parts: list[Dataset] = [WithTargetAttributes(d, grid) for d in split_datasets(profile, root, prep)]
    if spec.object_grounding:
        parts += [ObjectGroundingQuestions(Refer(root, d.name, d.split_by), "train", prep, grid)
                  for d in profile.datasets]
    data = ConcatDataset(parts)
    cfg = loop_config(profile, "mllm_pretrain", seed, len(data))
    val = None
    if profile.diag_expressions:
        val = val_subset([WithTargetAttributes(d, grid) for d in split_datasets(profile, root, prep, "val")],
                         profile.diag_expressions)
    evaluate = None if val is None else (lambda m: m.val_metrics(val, profile.eval_batch_size))
    result = train_loop(module, lambda m, b, r: m(b, r), data, collate_refer, cfg, stage, resume=resume,
                        desc=f"stage 1 MLLM pretraining (seed {seed})", progress=progress, evaluate=evaluate,
                        eval_every=profile.diag_every)
    module.llava.save_pretrained(str(llava_dir))
    tokenizer.save_pretrained(str(llava_dir))
    extra_done = {} if tower is None else {"vision_pretrain": _vision_summary(tower.parent)}
    _mark_done(stage, result, output=str(llava_dir), **extra_done)
    return llava_dir


def _vision_summary(stage: Path) -> dict[str, Any]:
    """What stage 1a's DONE.json says (steps, wall time, losses, its held-out curve), for stage 1's record."""
    done = _done(stage) or {}
    keys = ("steps", "wall_s", "samples_per_s", "final_losses", "eval_history", "final_eval")
    return {"stage_dir": stage.name, **{k: done.get(k) for k in keys}}


# --------------------------------------------------------------------------------------------------------------
# stages 2-3: referring segmentation (the PPCR model, one variant)
# --------------------------------------------------------------------------------------------------------------


def base_weights(profile: Profile, out: Path, seed: int, resume: bool, progress: bool) -> dict[str, str | None]:
    """Local weight paths for the PPCR model: the shipped foundation (`foundation: shipped`), stage 0/1 outputs
    (synthetic) or the profile's paths (paper)."""
    if profile.foundation == "shipped":
        from ppcr.foundation import shipped_weights

        return shipped_weights(profile.model_config("glamm", seed))
    if profile.data_kind == "synref":
        sam = run_sam_pretrain(profile, out, seed, resume, progress)
        llava = run_mllm_pretrain(profile, out, seed, resume, progress)
        return {"sam_checkpoint": str(sam), "llava_path": str(llava), "tokenizer_path": str(llava)}
    return {k: profile.model.get(k) for k in ("sam_checkpoint", "llava_path", "tokenizer_path")}


FOUNDATION_EVAL_VERSION = 2  # 2: the decoded "where" answers (`where_answer`); bump when the evaluation changes


@torch.no_grad()
def where_answer_figures(mllm: MllmPretrainer, data: Dataset, batch_size: int = 16) -> dict[str, float]:
    """Box IoU, accuracy@0.5 and centre-in-GT (%) of the box the LLaVA decodes for each "where" question."""
    pred, gt = [], []
    for batch in batches(data, batch_size):
        pred.append(mllm.where_answer_boxes(batch))
        gt.append(normalised_boxes(batch, [True] * len(batch["box"])))
    return box_figures(torch.cat(pred), torch.cat(gt))


def foundation_eval_dir(profile: Profile, out: Path, seed: int, weights: dict[str, str | None]) -> Path:
    """The `<out>/stages/seed<k>/foundation_eval-<fingerprint>` folder of these stage 0-1 weights."""
    local = {k: _relative(v, out) for k, v in weights.items()}
    stamps = {k: _file_stamp(v) for k, v in weights.items()}
    fp = profile.fingerprint("foundation_eval", local, stamps, profile.datasets, profile.eval_max_expressions,
                             data_version(profile), FOUNDATION_EVAL_VERSION)
    return _stage_dir(out, seed, "foundation_eval", fp)


def evaluate_foundation(profile: Profile, out: Path, seed: int, weights: dict[str, str | None]) -> dict[str, Any]:
    """Stages 0-1 (trained here or shipped) on this run's val splits: SAM with the ground-truth box and one point
    per suite (next to filling the box), the MLLM's answers, and the box the LLaVA decodes for each "where"
    question of the results files' val expressions. Cached in `foundation_eval_dir`."""
    config = profile.model_config("glamm", seed)
    local = {k: _relative(v, out) for k, v in weights.items()}
    stage = foundation_eval_dir(profile, out, seed, weights)
    if (info := _done(stage)) is not None:
        return info
    stage.mkdir(parents=True, exist_ok=True)
    root = data_root(profile, out)
    model = build_ris_model(profile, "glamm", seed, weights)
    model.eval()
    prep = model.image_prep()
    per = profile.eval_max_expressions or 10**9
    figures: dict[str, Any] = {}
    for spec, ds in zip(profile.datasets, split_datasets(profile, root, prep, "val")):
        sam = sam_prompt_metrics(model.segmenter, val_subset([ds], per), profile.eval_batch_size)
        figures.update({f"{spec.name}/{k}": v for k, v in sam.items()})
    del model
    mllm = MllmPretrainer(config.replace(llava_path=weights["llava_path"]), load_tokenizer(weights["tokenizer_path"]))
    val = val_subset([WithTargetAttributes(d) for d in split_datasets(profile, root, prep, "val")],
                     profile.diag_expressions or 48)
    answers = mllm.eval().val_metrics(val, profile.eval_batch_size)
    figures.update({f"mllm/{k}": v for k, v in answers.items() if "probe" not in k})  # probe not shipped
    # the LLaVA's own decoded "where" box on the expressions of the results files (the first of each val split):
    # the box a reader of this LLaVA gets before stages 2-3 (`report.prompt_probe_table`)
    where = {f"{spec.name}/val": where_answer_figures(mllm, Subset(WithTargetAttributes(ds), range(min(per, len(ds)))),
                                                      profile.eval_batch_size)
             for spec, ds in zip(profile.datasets, split_datasets(profile, root, prep, "val"))}
    info = {"final_eval": figures, "where_answer": where, "weights": local, "foundation": profile.foundation}
    (stage / "DONE.json").write_text(json.dumps(info, indent=2))
    return info


def _file_stamp(path: str | None) -> str | None:
    """A cheap identity of a weights file or folder (sizes and mtimes), so re-trained weights are re-evaluated."""
    if not path:
        return None
    p = Path(path)
    files = sorted(p.rglob("*")) if p.is_dir() else [p]
    return json.dumps([(f.name, f.stat().st_size, int(f.stat().st_mtime)) for f in files if f.is_file()])


def build_ris_model(profile: Profile, variant: str, seed: int, weights: dict[str, str | None]) -> PPCRModel:
    config = profile.model_config(variant, seed).replace(**{k: v for k, v in weights.items() if v is not None})
    tokenizer = load_tokenizer(weights["tokenizer_path"]) if weights.get("tokenizer_path") else None
    return PPCRModel.build(config, tokenizer=tokenizer)


def sam_cache_for(model: PPCRModel, out: Path) -> SamEmbeddingCache:
    return SamEmbeddingCache(out / "cache" / "sam_embeddings", module_fingerprint(model.segmenter.sam.image_encoder))


def _save_checkpoint(model: PPCRModel, profile: Profile, directory: Path) -> None:
    """Synthetic checkpoints are self-contained (base weights inside), so they outlive the stage folders."""
    if profile.data_kind == "synref":
        model.config = model.config.replace(llava_path=None, sam_checkpoint=None, tokenizer_path=None)
    model.save_pretrained(directory)


# What stage 3 takes from stage 2 besides branch A's LoRA: the [SEG] head, SAM's prompt encoder / decoder and (with
# `train_image_grounding` and `train_semantic_box`) the grounding head and the box head on P_seg_txt. Branch B, the
# soft-token projection and F_Map start fresh (branch B = the pretrained LLM, LoRA B initialised to zero).
STAGE2_CARRIED = ("text_hidden_fcs.", "segmenter.sam.", "grounding_head.", "semantic_box_head.")


def run_ris_stage(profile: Profile, out: Path, variant: str, seed: int, stage_name: str, init_from: Path | None,
                  weights: dict[str, str | None], upstream: str, resume: bool, progress: bool) -> Path:
    config = profile.model_config(variant, seed)
    fp = profile.fingerprint(stage_name, variant, asdict(config), profile.stage(stage_name), upstream, seed)
    label = "glamm_init" if stage_name == "glamm" else variant
    stage = _stage_dir(out, seed, label, fp)
    ckpt = stage / "model"
    if _done(stage):
        return ckpt
    _fresh(stage, resume)
    model = build_ris_model(profile, variant, seed, weights)
    if init_from is not None:
        load_weights_into(model, init_from, prefixes=STAGE2_CARRIED, branches=("semantic",))
        if variant == "glamm":
            load_weights_into(model, init_from)
    cache = sam_cache_for(model, out)
    root = data_root(profile, out)
    data = train_dataset(profile, root, model.image_prep())
    cfg = loop_config(profile, stage_name, seed, len(data))
    val = diagnostics_data(profile, root, model.image_prep())

    def step(m: nn.Module, batch: dict[str, Any], rng: random.Random) -> dict[str, torch.Tensor]:
        return m(batch, rng=rng, sam_cache=cache).losses

    def evaluate(m: nn.Module) -> dict[str, float]:
        figures = ris_val_metrics(m, val, profile.eval_batch_size, cache)
        if m.config.spec.eval_box == "pred":  # the same weights with ground-truth boxes: is SAM still box-led?
            m.config = m.config.replace(variant="gt_box_oracle")
            try:
                figures["oracle_miou"] = ris_val_metrics(m, val, profile.eval_batch_size, cache)["miou"]
            finally:
                m.config = m.config.replace(variant=variant)
        return figures

    result = train_loop(model, step, data, collate_refer, cfg, stage, resume=resume,
                        desc=f"{label} (seed {seed})", progress=progress,
                        evaluate=None if val is None else evaluate, eval_every=profile.diag_every)
    _save_checkpoint(model, profile, ckpt)
    _mark_done(stage, result, output=str(ckpt), variant=variant, fingerprint=fp)
    return ckpt


def train_variant(profile: Profile, out: str | Path, variant: str, seed: int, resume: bool = False,
                  progress: bool = True) -> Path:
    """Everything a variant needs (stages 0-3, cached) -> its PPCR checkpoint folder.

    `gt_box_oracle` is not trained: it is the `ppcr` checkpoint evaluated with ground-truth boxes.
    """
    out = Path(out)
    if variant == "gt_box_oracle":
        variant = "ppcr"
    prepare_data(profile, out, progress)
    weights = base_weights(profile, out, seed, resume, progress)
    if profile.data_kind == "synref" and profile.diag_expressions:
        evaluate_foundation(profile, out, seed, weights)
    # fingerprints name upstream stages relative to the run folder, so a copied or moved run keeps its cache
    local = {k: _relative(v, out) for k, v in weights.items()}
    if profile.foundation == "shipped":  # the shipped files' hashes, not their (install-dependent) paths
        from ppcr.foundation import load_manifest

        local = {"shipped_foundation": load_manifest()["files"]}
    upstream = json.dumps([local, data_version(profile), profile.datasets], sort_keys=True, default=str)
    glamm = run_ris_stage(profile, out, "glamm", seed, "glamm", None, weights, upstream, resume, progress)
    return run_ris_stage(profile, out, variant, seed, "variants", glamm, weights, _relative(glamm, out), resume,
                         progress)


def _relative(path: str | Path | None, out: Path) -> str | None:
    if path is None:
        return None
    p = Path(path)
    return str(p.relative_to(out)) if p.is_relative_to(out) else str(p)


def stage_summaries(out: str | Path) -> list[dict[str, Any]]:
    """Every finished training stage's DONE.json (throughput, memory, losses) for the book's cost tables.

    The `foundation_eval-*` directories hold evaluations of the shipped foundation, not training, and are skipped."""
    rows = []
    for marker in sorted(Path(out).glob("stages/seed*/*/DONE.json")):
        if marker.parent.name.startswith("foundation_eval-"):
            continue
        info = json.loads(marker.read_text())
        info["stage"] = marker.parent.name.rsplit("-", 1)[0]
        info["seed"] = int(marker.parent.parent.name.removeprefix("seed"))
        rows.append(info)
    return rows
