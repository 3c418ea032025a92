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
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import ConcatDataset, Dataset

from ppcr.data.dataset import ReferSegDataset, collate_refer
from ppcr.data.refer import Refer
from ppcr.data.transforms import ImagePrep
from ppcr.losses import mask_bce, mask_dice
from ppcr.model import prompts
from ppcr.model.config import PPCRConfig
from ppcr.model.mllm import answer_cross_entropy, build_llava, llava_image_features, multimodal_embeddings
from ppcr.model.modeling_ppcr import PPCRModel, image_prep_for
from ppcr.model.persistence import load_weights_into
from ppcr.model.segmentation import SamSegmenter, build_sam
from ppcr.model.tokenizer import build_word_tokenizer, encode_pass, load_tokenizer
from ppcr.training.cache import SamEmbeddingCache, module_fingerprint
from ppcr.training.loop import LoopConfig, TrainResult, train_loop
from ppcr.training.profile import Profile

SAM_PRETRAIN_VERSION = 2  # bump when stage 0's objective changes, so cached stage-0 weights are not reused
BOX_BINS = 32  # stage 1 answers boxes as integers 0..31 of the image width/height
PRETRAIN_WORDS = ["describe", "where", "it", "is", "a", "at", "."] + [str(i) for i in range(BOX_BINS)]


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


def prepare_data(profile: Profile, out: str | Path, progress: bool = True) -> Path:
    """Generate the profile's SynRef suites (cached by their generator config) or check the REFER root."""
    root = data_root(profile, out)
    if profile.data_kind == "synref":
        from ppcr.data.synref import generate_suite

        for spec in profile.datasets:
            generate_suite(spec.name, root, n_refs=spec.refs, seed=profile.data_seed, image_size=profile.image_size,
                           progress=progress)
    else:
        for spec in profile.datasets:
            Refer(root, spec.name, spec.split_by)  # raises a clear error for a missing file
    return root


def split_datasets(profile: Profile, root: Path, prep: ImagePrep, split: str = "train") -> list[ReferSegDataset]:
    return [ReferSegDataset(Refer(root, spec.name, spec.split_by), split, prep) for spec in profile.datasets]


def train_dataset(profile: Profile, root: Path, prep: ImagePrep) -> Dataset:
    """The union of every dataset's train split (one model for all three, as LISA/GLaMM/PPCR train)."""
    return ConcatDataset(split_datasets(profile, root, prep))


class WithTargetAttributes(Dataset):
    """Adds the target's SynRef attributes (shape, colour, size, pattern) to each item, for stage 1's captions."""

    def __init__(self, base: ReferSegDataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.base[index]
        ann = self.base.refer.ann(item["meta"]["ann_id"])
        item["attributes"] = ann.get("synref", {})
        return item


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
            "final_losses": result.final_losses, "resumed_from": result.resumed_from, **extra}
    (stage / "DONE.json").write_text(json.dumps(info, indent=2, default=str))
    return info


def _fresh(stage: Path, resume: bool) -> None:
    """Without --resume a half-finished stage starts over."""
    if not resume and stage.exists() and _done(stage) is None:
        shutil.rmtree(stage)
    stage.mkdir(parents=True, exist_ok=True)


def loop_config(profile: Profile, stage_name: str, seed: int, n_samples: int) -> LoopConfig:
    spec = profile.stage(stage_name)
    return LoopConfig(
        steps=spec.total_steps(n_samples), batch_size=spec.batch_size, lr=spec.lr, warmup_steps=spec.warmup_steps,
        betas=profile.betas, weight_decay=profile.weight_decay, grad_clip=profile.grad_clip,
        grad_accum=spec.grad_accum, mixed_precision=profile.mixed_precision,
        checkpoint_every=profile.checkpoint_every, seed=seed, device=profile.device,
        num_workers=profile.num_workers, deepspeed_config=_deepspeed_path(profile),
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
    """The whole SAM (encoder included) trained to segment an object from a box or from points inside it."""

    def __init__(self, config: PPCRConfig):
        super().__init__()
        self.segmenter = SamSegmenter(build_sam(config.sam))
        self.segmenter.sam.requires_grad_(True)  # stage 0 trains the encoder too; it is frozen afterwards

    def forward(self, batch: dict[str, Any], rng: random.Random) -> dict[str, torch.Tensor]:
        seg = self.segmenter
        device = seg.sam.pixel_mean.device
        pixels = batch["sam_pixel_values"].to(device)
        embeddings = seg.sam.image_encoder(pixels)  # (B, C, s, s), with gradient
        sizes = [tuple(s) for s in batch["original_size"]]
        boxes = torch.stack([torch.as_tensor(b, dtype=torch.float32) for b in batch["box"]]).to(device)
        pe = seg.sam.prompt_encoder
        if rng.random() < 0.5:  # box prompts, jittered by up to 10% of the box size
            wh = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)
            noise = torch.tensor([[rng.uniform(-0.1, 0.1) for _ in range(4)] for _ in sizes], device=device)
            sparse = pe._embed_boxes(seg.boxes_to_input_frame(boxes + noise * wh, sizes))
        else:  # 1-3 positive points inside the target mask
            k = rng.randint(1, 3)
            points = []
            for mask in batch["mask"]:
                ys, xs = torch.nonzero(mask, as_tuple=True)
                pick = [rng.randrange(len(xs)) for _ in range(k)] if len(xs) else [0] * k
                points.append([[float(xs[i]) if len(xs) else 0.0, float(ys[i]) if len(xs) else 0.0] for i in pick])
            coords = seg.coords_to_input_frame(torch.tensor(points, device=device), sizes)  # (B, k, 2)
            labels = torch.ones(coords.shape[:2], dtype=torch.long, device=device)
            sparse = pe._embed_points(coords, labels, pad=True)
        dense = pe.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(len(sizes), -1, *pe.image_embedding_size)
        index = torch.arange(len(sizes), device=device)
        low_res, iou_pred = seg.decode_prompts(embeddings, index, sparse, dense)
        masks = seg.postprocess(low_res, batch["sam_input_size"], sizes)
        targets = [m.to(device) for m in batch["mask"]]
        bce = torch.stack([mask_bce(p, t) for p, t in zip(masks, targets)]).mean()
        dice = torch.stack([mask_dice(p, t) for p, t in zip(masks, targets)]).mean()
        with torch.no_grad():
            true_iou = torch.stack([((p > 0) & (t > 0)).sum() / ((p > 0) | (t > 0)).sum().clamp(min=1)
                                    for p, t in zip(masks, targets)])
        iou_mse = torch.nn.functional.mse_loss(iou_pred[:, 0], true_iou.float())
        # Dice weighs as much as BCE here: SynRef objects are small, and BCE alone settles on "all background".
        return {"total": bce + dice + iou_mse, "bce": bce, "dice": dice, "iou_mse": iou_mse}


def run_sam_pretrain(profile: Profile, out: Path, seed: int, resume: bool = False, progress: bool = True) -> Path:
    config = profile.model_config("glamm", seed)
    root = data_root(profile, out)
    fp = profile.fingerprint("sam_pretrain", SAM_PRETRAIN_VERSION, asdict(config.sam), profile.stage("sam_pretrain"),
                             profile.datasets, profile.data_seed, profile.image_size, data_version(profile), seed)
    stage = _stage_dir(out, seed, "sam_pretrain", fp)
    weights = stage / "sam.safetensors"
    if _done(stage):
        return weights
    _fresh(stage, resume)
    torch.manual_seed(seed)
    module = SamPretrainer(config)
    data = train_dataset(profile, root, image_prep_for(config))
    cfg = loop_config(profile, "sam_pretrain", seed, len(data))
    result = train_loop(module, lambda m, b, r: m(b, r), data, collate_refer, cfg, stage, resume=resume,
                        desc=f"stage 0 SAM pretraining (seed {seed})", progress=progress)
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in module.segmenter.sam.state_dict().items()}
    save_file(state, str(weights))
    _mark_done(stage, result, output=str(weights))
    return weights


# --------------------------------------------------------------------------------------------------------------
# stage 1: MLLM pretraining (image-text alignment on SynRef scenes)
# --------------------------------------------------------------------------------------------------------------


def pretrain_turn(expression: str, attributes: dict[str, Any], box: torch.Tensor, size: tuple[int, int],
                  task: str) -> tuple[str, str]:
    """One stage-1 question/answer: describe the object an expression names, or give its box (32 bins)."""
    if task == "describe":
        words = [attributes.get(k) for k in ("size", "pattern", "color", "shape")]
        return f"Describe the {expression}.", "It is a " + " ".join(w for w in words if w) + "."
    h, w = size
    bins = [min(BOX_BINS - 1, int(float(v) / s * BOX_BINS)) for v, s in zip(box.tolist(), (w, h, w, h))]
    return f"Where is the {expression}?", "It is at " + " ".join(map(str, bins)) + "."


class MllmPretrainer(nn.Module):
    """The small LLaVA (vision tower, projector and LLM all trained) on next-token prediction of the answers."""

    def __init__(self, config: PPCRConfig, tokenizer):
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        self.llava = build_llava(config, tokenizer)
        self.llava.requires_grad_(True)

    def forward(self, batch: dict[str, Any], rng: random.Random) -> dict[str, torch.Tensor]:
        device = self.llava.device
        feats = llava_image_features(self.llava, batch["clip_pixel_values"].to(device),
                                     self.config.vision_feature_layer)  # (B, N_img, d), with gradient
        turns = [pretrain_turn(e, a, torch.as_tensor(b), tuple(s), rng.choice(("describe", "where")))
                 for e, a, b, s in zip(batch["expression"], batch["attributes"], batch["box"],
                                       batch["original_size"])]
        ctx, ans = zip(*[prompts.conversation(q, a, self.config.system_prompt) for q, a in turns])
        enc = encode_pass(self.tokenizer, ctx, ans, None, feats.shape[1]).to(device)
        image_id = self.tokenizer.convert_tokens_to_ids(prompts.IMAGE_TOKEN)
        embeds = multimodal_embeddings(self.llava, enc.input_ids, feats, image_id)
        hidden = self.llava.model.language_model(inputs_embeds=embeds,
                                                 attention_mask=enc.attention_mask).last_hidden_state
        ce = answer_cross_entropy(self.llava, hidden, enc.labels)
        return {"total": ce, "ce": ce}


def synref_tokenizer():
    from ppcr.data.synref import vocabulary

    return build_word_tokenizer(list(vocabulary()) + PRETRAIN_WORDS)


def run_mllm_pretrain(profile: Profile, out: Path, seed: int, resume: bool = False, progress: bool = True) -> Path:
    """Returns a folder in the llava-hf layout (config.json, safetensors, tokenizer) for the later stages."""
    config = profile.model_config("glamm", seed)
    root = data_root(profile, out)
    fp = profile.fingerprint("mllm_pretrain", asdict(config.vision), asdict(config.text), config.system_prompt,
                             profile.stage("mllm_pretrain"), profile.datasets, profile.data_seed, profile.image_size,
                             data_version(profile), seed)
    stage = _stage_dir(out, seed, "mllm_pretrain", fp)
    llava_dir = stage / "llava"
    if _done(stage):
        return llava_dir
    _fresh(stage, resume)
    torch.manual_seed(seed)
    tokenizer = synref_tokenizer()
    module = MllmPretrainer(config, tokenizer)
    prep = image_prep_for(config)
    data = ConcatDataset([WithTargetAttributes(d) for d in split_datasets(profile, root, prep)])
    cfg = loop_config(profile, "mllm_pretrain", seed, len(data))
    result = train_loop(module, lambda m, b, r: m(b, r), data, collate_refer, cfg, stage, resume=resume,
                        desc=f"stage 1 MLLM pretraining (seed {seed})", progress=progress)
    module.llava.save_pretrained(str(llava_dir))
    tokenizer.save_pretrained(str(llava_dir))
    _mark_done(stage, result, output=str(llava_dir))
    return llava_dir


# --------------------------------------------------------------------------------------------------------------
# stages 2-3: referring segmentation (the PPCR model, one variant)
# --------------------------------------------------------------------------------------------------------------


def base_weights(profile: Profile, out: Path, seed: int, resume: bool, progress: bool) -> dict[str, str | None]:
    """Local weight paths for the PPCR model: stage 0/1 outputs (synthetic) or the profile's paths (paper)."""
    if profile.data_kind == "synref":
        sam = run_sam_pretrain(profile, out, seed, resume, progress)
        llava = run_mllm_pretrain(profile, out, seed, resume, progress)
        return {"sam_checkpoint": str(sam), "llava_path": str(llava), "tokenizer_path": str(llava)}
    return {k: profile.model.get(k) for k in ("sam_checkpoint", "llava_path", "tokenizer_path")}


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
        # branch A, the [SEG] head and SAM's prompt encoder / decoder from stage 2; branch B, the soft-token
        # projection and the box head start fresh (branch B = the pretrained LLM, LoRA B initialised to zero).
        load_weights_into(model, init_from, prefixes=("text_hidden_fcs.", "segmenter.sam."), branches=("semantic",))
        if variant == "glamm":
            load_weights_into(model, init_from)
    cache = sam_cache_for(model, out)
    data = train_dataset(profile, data_root(profile, out), model.image_prep())
    cfg = loop_config(profile, stage_name, seed, len(data))

    def step(m: nn.Module, batch: dict[str, Any], rng: random.Random) -> dict[str, torch.Tensor]:
        return m(batch, rng=rng, sam_cache=cache).losses

    result = train_loop(model, step, data, collate_refer, cfg, stage, resume=resume,
                        desc=f"{label} (seed {seed})", progress=progress)
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
    # fingerprints name upstream stages relative to the run folder, so a copied or moved run keeps its cache
    local = {k: _relative(v, out) for k, v in weights.items()}
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
    """Every finished stage's DONE.json (throughput, memory, losses) for the book's cost tables."""
    rows = []
    for marker in sorted(Path(out).glob("stages/seed*/*/DONE.json")):
        info = json.loads(marker.read_text())
        info["stage"] = marker.parent.name.rsplit("-", 1)[0]
        info["seed"] = int(marker.parent.parent.name.removeprefix("seed"))
        rows.append(info)
    return rows
