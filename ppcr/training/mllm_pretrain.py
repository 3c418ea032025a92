"""Stage 1: the small LLaVA pretrained on SynRef scenes (describing objects, answering their boxes), with a
grounding probe; optionally after stage 1a (`ppcr.training.vision_pretrain`). At the paper scale LLaVA-1.5-7B's
released weights take its place."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import ConcatDataset, Dataset
from torchvision.ops import generalized_box_iou_loss

from ppcr.data.dataset import ReferSegDataset, collate_refer
from ppcr.data.refer import Refer, load_image
from ppcr.data.transforms import ImagePrep, target_patches
from ppcr.metrics import box_iou
from ppcr.model import prompts
from ppcr.model.config import PPCRConfig
from ppcr.model.heads import MLPBoxHead, order_box
from ppcr.model.losses import image_grounding_ce
from ppcr.model.mllm import build_llava, image_token_states, llava_image_features, multimodal_embeddings
from ppcr.model.modeling_ppcr import image_prep_for
from ppcr.model.tokenizer import BOX_BINS, encode_pass, synref_tokenizer
from ppcr.recipe.profile import Profile
from ppcr.training import distributed
from ppcr.training.data import data_root, data_version, split_datasets
from ppcr.training.diagnostics import batches, val_subset
from ppcr.training.loop import TrainResult, train_loop
from ppcr.training.stage import done_info, loop_config, run_cached
from ppcr.training.vision_pretrain import VISION_PRETRAIN_VERSION, run_vision_pretrain, vision_stage

MLLM_PRETRAIN_VERSION = 2  # bump when stage 1's objective changes, so cached stage-1 weights are not reused


# --------------------------------------------------------------------------------------------------------------
# stage 1's views of the data
# --------------------------------------------------------------------------------------------------------------


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
# the questions, the answers and the pretrainer
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
        giou = generalized_box_iou_loss(order_box(pred), gt, reduction="mean")
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
                    probe = order_box(self.probe_boxes(hidden, targets)).cpu()
                    probe_ious += [box_iou(p.tolist(), g.tolist()) for p, g in zip(probe, gt)]
                    free_ious += [box_iou(p.tolist(), g.tolist()) for p, g in zip(self.where_answer_boxes(batch), gt)]
                else:  # the position predicting the answer's first "a" (the [SEG] slot of stage 2)
                    at = (targets == article).float().argmax(1)
                    seg = order_box(self.box_probe(hidden[torch.arange(len(at)), at].float())).cpu()
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



def run_mllm_pretrain(profile: Profile, out: Path, seed: int, resume: bool = False, progress: bool = True) -> Path:
    """Stage 1 (cached): a folder in the llava-hf layout (config.json, safetensors, tokenizer) for the later stages.

    With a `vision_pretrain` stage in the profile, its dense-pretrained CLIP tower (stage 1a) replaces the random
    one first; `freeze_vision` keeps the tower frozen here."""
    config = profile.model_config("glamm", seed)
    spec = profile.stage("mllm_pretrain")
    vision = vision_stage(profile)
    extra = [] if vision is None else ["vision_pretrain", VISION_PRETRAIN_VERSION, vision]
    if config.image_after_prompt:  # (only when set: the caches of LLaVA-ordered stages stay valid)
        extra += ["image_after_prompt"]
    fp = profile.fingerprint("mllm_pretrain", MLLM_PRETRAIN_VERSION, asdict(config.vision), asdict(config.text),
                             config.system_prompt, spec, profile.datasets, profile.data_seed, profile.image_size,
                             data_version(profile), seed, None, *extra)  # None: where a continued foundation stood

    def train(stage: Path, llava_dir: Path) -> tuple[TrainResult, dict[str, Any]]:
        root = data_root(profile, out)
        tower = None if vision is None else run_vision_pretrain(profile, out, seed, resume=resume, progress=progress)
        torch.manual_seed(seed)
        tokenizer = synref_tokenizer()
        module = MllmPretrainer(config, tokenizer, spec.probe_weight, spec.probe_positions, spec.probe_giou,
                                spec.image_grounding, spec.probe_describe)
        if tower is not None:
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
        if distributed.is_main():
            module.llava.save_pretrained(str(llava_dir))
            tokenizer.save_pretrained(str(llava_dir))
        return result, ({} if tower is None else {"vision_pretrain": _vision_summary(tower.parent)})

    return run_cached(out, seed, "mllm_pretrain", fp, "llava", resume, train)


def _vision_summary(stage: Path) -> dict[str, Any]:
    """What stage 1a's DONE.json says (steps, wall time, losses, its held-out curve), for stage 1's record."""
    done = done_info(stage) or {}
    keys = ("steps", "resumed_from", "wall_s", "total_wall_s", "device", "git_commit", "samples_per_s", "final_losses",
            "eval_history", "final_eval")
    return {"stage_dir": stage.name, **{k: done.get(k) for k in keys}}
