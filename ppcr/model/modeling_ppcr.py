"""PPCR: Semantic Understanding -> Spatial Grounding -> Instance Segmentation (§3 of the paper).

    image, expression
      |  step 1 (branch A, "semantic"):  LLaVA(image, semantic prompt) -> h[SEG] -> text_hidden_fcs -> P_seg_txt
      |  step 2 (branch B, "spatial"):   LLaVA(image, spatial prompt with P_seg_txt as a soft token) -> h[BOX]
      |                                   = P_seg_box -> F_Map -> normalised box b~ -> pixels b^ (Eq. 4-5)
      |  step 3 (SAM):                    prompt encoder(b^) + [P_seg_txt] -> mask decoder -> mask (Eq. 6)

Every variant of Tables 2-3 is a switch of `PPCRConfig.variant` (see `config.VARIANTS`). The three inference "steps"
here are what the paper calls its stages; in this package "stages" are the training stages 0-3 (`ppcr.training`).
"""

from __future__ import annotations

import random
from pathlib import Path
from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from ppcr.data.transforms import ImagePrep, target_patches
from ppcr.model.losses import image_grounding_ce, spatial_distillation, total_loss
from ppcr.model import prompts
from ppcr.model.config import PPCRConfig, PromptChoice, TrainingRecipe
from ppcr.model.heads import AttentionBoxHead, MLPBoxHead, SegPromptHead, SoftTokenProjector, order_box
from ppcr.model.mllm import MultimodalLLM, build_llava, check_llava_path
from ppcr.model.persistence import load_weights_into, read_checkpoint, save_model
from ppcr.model.segmentation import SamSegmenter, build_sam
from ppcr.model.tokenizer import build_word_tokenizer, encode_pass, load_tokenizer

MIN_IMAGE_SIDE = 8
MAX_IMAGE_SIDE = 10_000


@dataclass
class StepOutputs:
    """Everything the three steps produce for a batch of B expressions."""

    p_seg_txt: torch.Tensor  # (B, C) Semantic Segmentation Prompt
    p_seg_box: torch.Tensor | None  # (B, d) Spatial Segmentation Prompt (None for `glamm`)
    boxes_norm: torch.Tensor | None  # (B, 4) predicted, normalised to the original image, corner-ordered
    boxes_raw: torch.Tensor | None  # (B, 4) the head's raw output (what L1 supervises)
    sam_boxes: torch.Tensor | None  # (B, 4) the box SAM received, in original pixels
    low_res_masks: torch.Tensor  # (B, 1, 4s, 4s) mask logits
    iou_pred: torch.Tensor  # (B, 1) SAM's predicted IoU
    ce_terms: list[torch.Tensor] = field(default_factory=list)
    grounding_logits: list[torch.Tensor] = field(default_factory=list)  # per LLM pass (B, N_img), training only
    semantic_boxes: torch.Tensor | None = None  # (B, 4) the box read from P_seg_txt (`train_semantic_box`)
    distill: torch.Tensor | None = None  # () branch B against the teacher (`train_spatial_distill`), training only


@dataclass
class PPCROutput:
    loss: torch.Tensor | None
    losses: dict[str, torch.Tensor]
    mask_logits: list[torch.Tensor]  # per expression, (H, W) at the original resolution
    steps: StepOutputs


def image_prep_for(config: PPCRConfig) -> ImagePrep:
    """The CLIP- and SAM-side image preparation a config's model expects."""
    return ImagePrep(clip_size=config.vision.image_size, sam_size=config.sam.img_size)


def validate_image(image: Any) -> np.ndarray:
    """A uint8 (H, W, 3) RGB array, or a clear error naming what is wrong."""
    if hasattr(image, "convert") and hasattr(image, "mode"):  # a PIL image
        if image.mode not in ("RGB", "L", "RGBA", "P"):
            raise ValueError(f"unsupported image mode {image.mode!r}; give an RGB image")
        image = np.asarray(image.convert("RGB"))
    if not isinstance(image, np.ndarray):
        raise TypeError(f"an image must be a numpy array or a PIL image, got {type(image).__name__}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"an image must be (H, W, 3) RGB, got shape {tuple(image.shape)}")
    if image.dtype != np.uint8:
        raise ValueError(f"an image must be uint8, got {image.dtype}")
    h, w = image.shape[:2]
    if min(h, w) < MIN_IMAGE_SIDE or max(h, w) > MAX_IMAGE_SIDE:
        raise ValueError(f"unsupported image size {w}x{h}: sides must lie in [{MIN_IMAGE_SIDE}, {MAX_IMAGE_SIDE}]")
    return image


class PPCRModel(nn.Module):
    def __init__(self, config: PPCRConfig, tokenizer: PreTrainedTokenizerBase, mllm: MultimodalLLM,
                 segmenter: SamSegmenter, recipe: TrainingRecipe | None = None):
        super().__init__()
        self.config = config
        self.recipe = recipe or TrainingRecipe()  # how stages 2-3 train it (losses, box prompting, additions)
        self.prompt_choice = PromptChoice()  # the templates read outside training
        self.tokenizer = tokenizer
        self.mllm = mllm
        self.segmenter = segmenter
        d, c = mllm.hidden_size, config.sam_prompt_dim
        self.text_hidden_fcs = SegPromptHead(d, c)
        # variants without a soft token (glamm, spatial_re) never use the projection: one slot keeps their
        # initialisation (and so stage 2's, which every variant starts from) independent of `soft_prompt_tokens`
        slots = config.soft_prompt_tokens if config.spec.spatial_source in ("seg", "re_seg") else 1
        self.seg_to_llm = SoftTokenProjector(c, d, slots)
        if config.spec.box_head == "attn":
            self.box_head: nn.Module = AttentionBoxHead(d, config.attn_box_dim, config.attn_box_layers,
                                                        config.attn_box_heads, config.attn_box_queries,
                                                        config.vision.num_image_tokens)
        else:
            self.box_head = MLPBoxHead(d, config.box_head_hidden)
        # the small presets' image-token grounding loss (`train_image_grounding`; not in the paper), one head for
        # both branches: image-token hidden state (d) -> grounding logit
        self.grounding_head: nn.Linear | None = None
        if self.recipe.train_image_grounding > 0:
            if not config.image_after_prompt:
                raise ValueError("train_image_grounding needs image_after_prompt: with the image before the prompt "
                                 "the image tokens cannot see what is asked")
            self.grounding_head = nn.Linear(d, 1)
        # the small presets' box term on P_seg_txt (`train_semantic_box`; not in the paper): P_seg_txt (C) -> box
        self.semantic_box_head: MLPBoxHead | None = None
        if self.recipe.train_semantic_box > 0:
            self.semantic_box_head = MLPBoxHead(c, config.box_head_hidden)

    # ---------------------------------------------------------------------------------------------------------
    # construction
    # ---------------------------------------------------------------------------------------------------------
    @classmethod
    def build(cls, config: PPCRConfig, tokenizer: PreTrainedTokenizerBase | None = None,
              extra_words: Sequence[str] = (), recipe: TrainingRecipe | None = None) -> "PPCRModel":
        """Build every module; weights from the config's local paths, or random (seeded) where none is given.
        `recipe` (default: the paper's) adds the training-only heads of the reproduction's additions it turns on."""
        if config.llava_path is not None:
            check_llava_path(config.llava_path)  # before the tokenizer, so the message names the weights
        if config.sam_checkpoint is not None and not Path(config.sam_checkpoint).is_file():  # before the (7B) LLaVA
            raise FileNotFoundError(f"SAM checkpoint not found: {config.sam_checkpoint}")
        if tokenizer is None:
            tok_path = config.tokenizer_path or config.llava_path
            tokenizer = load_tokenizer(tok_path) if tok_path else build_word_tokenizer(extra_words)
        torch.manual_seed(config.seed)
        llava = build_llava(config, tokenizer)
        sam = build_sam(config.sam, config.sam_checkpoint)
        model = cls(config, tokenizer, MultimodalLLM(llava, config, tokenizer), SamSegmenter(sam), recipe)
        model.set_default_trainable()
        return model

    def set_default_trainable(self) -> None:
        """Trainable: both LoRA branches, new-token rows, the heads, SAM's prompt encoder and mask decoder."""
        self.requires_grad_(False)
        for p in self.mllm.lora_parameters().values():
            p.requires_grad_(True)
        llava = self.mllm.llava
        llava.get_input_embeddings().weight.requires_grad_(True)  # row-masked: only the new tokens move
        llava.get_output_embeddings().weight.requires_grad_(True)
        self.mllm.train_all_token_rows(False)
        for module in (self.text_hidden_fcs, self.seg_to_llm, self.box_head, self.segmenter.sam.prompt_encoder,
                       self.segmenter.sam.mask_decoder, self.grounding_head, self.semantic_box_head):
            if module is not None:
                module.requires_grad_(True)

    def image_prep(self) -> ImagePrep:
        return image_prep_for(self.config)

    @property
    def prefix_cache(self) -> bool:
        """Evaluation and `predict` run each image's shared prompt prefix once per LoRA branch and reuse its
        keys/values for every expression of the image (default on; training never does). Set False to run every
        expression's full sequences, e.g. to check the cached path against them."""
        return self.mllm.prefix_cache

    @prefix_cache.setter
    def prefix_cache(self, on: bool) -> None:
        self.mllm.prefix_cache = bool(on)

    @property
    def device(self) -> torch.device:
        return self.text_hidden_fcs[0].weight.device

    # ---------------------------------------------------------------------------------------------------------
    # the three steps (the paper calls them stages; here "stages" are the training stages)
    # ---------------------------------------------------------------------------------------------------------
    def _grounding(self) -> bool:
        """Whether this pass computes the image-token grounding logits (training with the loss on)."""
        return self.training and self.grounding_head is not None

    def _grounding_logits(self, image_hidden: torch.Tensor | None) -> torch.Tensor | None:
        """(B, N_img, d) image-token hidden states -> (B, N_img) grounding logits, or None."""
        if image_hidden is None or self.grounding_head is None:
            return None
        return self.grounding_head(image_hidden.float()).squeeze(-1)

    def semantic_hidden(self, image_features: torch.Tensor, image_index: torch.Tensor, expressions: Sequence[str],
                        rng: random.Random | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Branch A's LLM pass: (N, N_img, d) features per image, (B,) image of each expression -> the LLM's last
        hidden state at `[SEG]`, h[SEG] (B, d), CE (training) and the image tokens' hidden states (B, N_img, d)
        (training with `train_image_grounding`). `semantic_step` turns h[SEG] into P_seg_txt; the probes of
        `ppcr.evaluation.probes` read it as it is."""
        cfg = self.config
        ctx, ans = zip(*[
            prompts.conversation(
                prompts.fill(prompts.pick_template(prompts.SEMANTIC_TEMPLATES, rng, self.prompt_choice.semantic_template), e),
                prompts.SEMANTIC_ANSWER, cfg.system_prompt, cfg.image_after_prompt)
            for e in expressions
        ])
        enc = encode_pass(self.tokenizer, ctx, ans, prompts.SEG_TOKEN, image_features.shape[1]).to(self.device)
        return self.mllm.run_branch("semantic", enc, image_features, image_index,
                                    compute_ce=self.training, image_hidden=self._grounding())

    def semantic_step(self, image_features: torch.Tensor, image_index: torch.Tensor, expressions: Sequence[str],
                       rng: random.Random | None
                       ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Branch A: (N, N_img, d) features per image, (B,) image of each expression -> P_seg_txt (B, C), CE and
        (training with `train_image_grounding`) the image tokens' grounding logits (B, N_img)."""
        h_seg, ce, image_hidden = self.semantic_hidden(image_features, image_index, expressions, rng)
        return self.text_hidden_fcs(h_seg.float()), ce, self._grounding_logits(image_hidden)

    def _distilling(self) -> bool:
        """Whether this pass distils branch B from the teacher (training, `train_spatial_distill`, a soft token)."""
        return (self.training and self.recipe.train_spatial_distill > 0
                and self.config.spec.spatial_source != "re")

    def spatial_step(self, image_features: torch.Tensor, image_index: torch.Tensor, expressions: Sequence[str],
                      p_seg_txt: torch.Tensor, rng: random.Random | None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None,
                                 torch.Tensor | None]:
        """Branch B: spatial prompt (with P_seg_txt as soft token) -> P_seg_box (B, d), raw box (B, 4), CE, the
        grounding logits (B, N_img) as in `semantic_step` and (training with `train_spatial_distill`) the
        distillation term against the LoRA-free LLM reading the same template with the expression."""
        cfg = self.config
        source = cfg.spec.spatial_source
        templates = prompts.spatial_templates(source)
        chosen = [prompts.pick_template(templates, rng, self.prompt_choice.spatial_template) for _ in expressions]

        def encode(questions: Sequence[str]):
            ctx, ans = zip(*[prompts.conversation(q, prompts.SPATIAL_ANSWER, cfg.system_prompt,
                                                  cfg.image_after_prompt) for q in questions])
            return encode_pass(self.tokenizer, ctx, ans, prompts.BOX_TOKEN, image_features.shape[1]).to(self.device)

        # as many [P_SEG] slots as the projection fills (1 for a model built without a soft token, e.g. spatial_re
        # switched to the oracle for its diagnostics)
        enc = encode([prompts.fill(t, e, self.seg_to_llm.tokens) for t, e in zip(chosen, expressions)])
        soft = None if source == "re" else self.seg_to_llm(p_seg_txt)
        distilling = self._distilling()
        p_seg_box, ce, image_hidden = self.mllm.run_branch("spatial", enc, image_features, image_index,
                                                           soft_tokens=soft, compute_ce=self.training,
                                                           image_hidden=self._grounding() or distilling)
        box_raw = self.box_head(p_seg_box.float(), image_features[image_index].float())
        distill = None
        if distilling:  # the teacher reads the expression where the student reads the soft token
            teacher = encode([prompts.fill(prompts.soft_token_as_expression(t), e)
                              for t, e in zip(chosen, expressions)])
            t_query, t_image = self.mllm.run_base(teacher, image_features, image_index)
            distill = spatial_distillation(p_seg_box, image_hidden, t_query, t_image)
        grounding = self._grounding_logits(image_hidden) if self._grounding() else None
        return p_seg_box, box_raw, ce, grounding, distill

    def _jitter_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        """(B, 4) ground-truth pixel boxes moved by up to `train_gt_box_jitter` of their size per coordinate (as
        stage 0 trains SAM), so SAM learns to follow a box that is only roughly right, like a predicted one."""
        if self.recipe.train_gt_box_jitter <= 0:
            return boxes
        wh = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)
        noise = (torch.rand_like(boxes) * 2 - 1) * self.recipe.train_gt_box_jitter
        return boxes + noise * wh

    def box_prompt_mode(self, box: str | None = None) -> str:
        """The box SAM gets: "none", "pred", "gt" or "mixed". Training follows `train_box_prompt`; evaluation the
        variant's `eval_box`, or `box` when given ("pred" or "gt": the same weights with their own box or the
        ground-truth one, as `gt_box_oracle` evaluates `ppcr`'s checkpoint)."""
        if not self.config.spec.uses_spatial_step:
            return "none"
        if self.training:
            return self.recipe.train_box_prompt
        if box is not None and box not in ("pred", "gt"):
            raise ValueError(f"box must be 'pred' or 'gt', not {box!r}")
        return box or self.config.spec.eval_box

    def run_steps(
        self,
        image_features: torch.Tensor,
        sam_embeddings: torch.Tensor,
        image_index: torch.Tensor,
        expressions: Sequence[str],
        original_sizes: Sequence[tuple[int, int]],
        gt_boxes: torch.Tensor | None = None,
        rng: random.Random | None = None,
        box: str | None = None,
    ) -> StepOutputs:
        """All three steps for B expressions on N distinct images.

        image_features: (N, N_img, d) CLIP features per image; sam_embeddings: (N, C, s, s) SAM encoder output per
        image; image_index: (B,) the image of each expression; gt_boxes: (B, 4) pixels (needed by the oracle and
        by `train_box_prompt="gt"`); box: at evaluation, the box SAM gets instead of the variant's own
        (`box_prompt_mode`).
        """
        if len(expressions) != image_index.shape[0]:
            raise ValueError(f"{len(expressions)} expressions for {image_index.shape[0]} image indices")
        expressions = [prompts.check_expression(e) for e in expressions]
        p_seg_txt, ce_sem, ground_sem = self.semantic_step(image_features, image_index, expressions, rng)
        ce_terms = [ce_sem] if ce_sem is not None else []
        grounding = [ground_sem] if ground_sem is not None else []
        p_seg_box = boxes_raw = boxes_norm = distill = None
        if self.config.spec.uses_spatial_step:
            p_seg_box, boxes_raw, ce_spa, ground_spa, distill = self.spatial_step(image_features, image_index,
                                                                                   expressions, p_seg_txt, rng)
            boxes_norm = order_box(boxes_raw)
            if ce_spa is not None:
                ce_terms.append(ce_spa)
            if ground_spa is not None:
                grounding.append(ground_spa)

        wh = torch.tensor([[w, h, w, h] for h, w in original_sizes], dtype=torch.float32, device=self.device)
        mode = self.box_prompt_mode(box)
        sam_boxes = None
        if mode in ("pred", "mixed"):
            sam_boxes = boxes_norm * wh  # Eq. 5
            if self.recipe.detach_box_for_sam:
                sam_boxes = sam_boxes.detach()
        if mode in ("gt", "mixed"):
            if gt_boxes is None:
                raise ValueError(f"variant {self.config.variant!r} needs ground-truth boxes here")
            gt = gt_boxes.to(self.device, torch.float32)
            if self.training:
                gt = self._jitter_boxes(gt)
            if mode == "gt":
                sam_boxes = gt
            else:  # teacher forcing for a share of the expressions, the predicted box for the others
                use_gt = torch.rand(gt.shape[0], 1, device=self.device) < self.recipe.train_gt_box_prob
                sam_boxes = torch.where(use_gt, gt, sam_boxes)
        boxes_in = None if sam_boxes is None else self.segmenter.boxes_to_input_frame(sam_boxes, list(original_sizes))
        low_res, iou = self.segmenter.decode(sam_embeddings, image_index, boxes_in, p_seg_txt)
        semantic_boxes = None
        if self.semantic_box_head is not None:
            semantic_boxes = self.semantic_box_head(p_seg_txt.float())
        # SAM's IoU score is no term of Eq. 7 (its head gets no gradient): detached, so that under DDP every output
        # tensor leads to the loss and the head counts as unused, not as a gradient still to come
        return StepOutputs(p_seg_txt, p_seg_box, boxes_norm, boxes_raw, sam_boxes, low_res, iou.detach(), ce_terms,
                            grounding, semantic_boxes, distill)

    # ---------------------------------------------------------------------------------------------------------
    # batches from ppcr.data (training / evaluation)
    # ---------------------------------------------------------------------------------------------------------
    def encode_batch_images(
        self, batch: dict[str, Any], sam_cache: MutableMapping[str, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """CLIP features and SAM embeddings once per *distinct* image of the batch (keyed by `image_key`).

        Returns image_features (N, N_img, d), sam_embeddings (N, C, s, s), image_index (B,).
        """
        image_features, image_index = self.clip_features(batch)
        unique = _distinct_images(batch)
        first = list(unique.values())
        sam_emb: list[torch.Tensor | None] = [sam_cache.get(k) if sam_cache is not None else None for k in unique]
        todo = [i for i, e in enumerate(sam_emb) if e is None]
        if todo:
            pixels = batch["sam_pixel_values"][[first[i] for i in todo]].to(self.device)
            fresh = self.segmenter.encode_images(pixels)
            for j, i in enumerate(todo):
                sam_emb[i] = fresh[j]
                if sam_cache is not None:
                    sam_cache[list(unique)[i]] = fresh[j].detach()
        sam_embeddings = torch.stack([e.to(self.device) for e in sam_emb])  # type: ignore[union-attr]
        return image_features, sam_embeddings, image_index

    def clip_features(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """CLIP features once per distinct image of the batch: (N, N_img, d) and the image of each row, (B,)."""
        unique = _distinct_images(batch)
        position = {k: i for i, k in enumerate(unique)}
        image_index = torch.tensor([position[k] for k in batch["image_key"]], dtype=torch.long, device=self.device)
        clip = batch["clip_pixel_values"][list(unique.values())].to(self.device)
        return self.mllm.image_features(clip), image_index

    def forward(self, batch: dict[str, Any], rng: random.Random | None = None,
                sam_cache: MutableMapping[str, torch.Tensor] | None = None,
                compute_loss: bool = True, box: str | None = None) -> PPCROutput:
        """A collated batch of `ppcr.data.dataset.ReferSegDataset` items -> masks, boxes and the Eq. 7 losses.
        `box` ("pred" or "gt", evaluation only): the box SAM gets instead of the variant's (`box_prompt_mode`)."""
        image_features, sam_embeddings, image_index = self.encode_batch_images(batch, sam_cache)
        original_sizes = [tuple(s) for s in batch["original_size"]]
        gt_boxes = _stack_boxes(batch["box"]).to(self.device) if "box" in batch else None
        steps = self.run_steps(image_features, sam_embeddings, image_index, batch["expression"], original_sizes,
                                 gt_boxes=gt_boxes, rng=rng, box=box)
        masks = self.segmenter.postprocess(steps.low_res_masks, batch["sam_input_size"], original_sizes)
        losses: dict[str, torch.Tensor] = {}
        loss = None
        if compute_loss and "mask" in batch:
            targets = [m.to(self.device) for m in batch["mask"]]
            target_norm = None
            if steps.boxes_raw is not None or steps.semantic_boxes is not None:
                wh = torch.tensor([[w, h, w, h] for h, w in original_sizes], dtype=torch.float32, device=self.device)
                target_norm = gt_boxes / wh
            grounding = []
            if steps.grounding_logits:  # the image-token grounding loss per LLM pass, against the target's patches
                grid = self.config.vision.patch_grid
                patches = torch.stack([target_patches(m.cpu().numpy(), grid) for m in batch["mask"]])
                grounding = [image_grounding_ce(g, patches) for g in steps.grounding_logits]
            recipe = self.recipe
            losses = total_loss(recipe.loss, masks, targets, steps.boxes_raw, target_norm, steps.ce_terms,
                                grounding, recipe.train_image_grounding,
                                steps.semantic_boxes, recipe.train_semantic_box,
                                steps.distill, recipe.train_spatial_distill)
            loss = losses["total"]
        return PPCROutput(loss, losses, masks, steps)

    # ---------------------------------------------------------------------------------------------------------
    # inference on raw images
    # ---------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(
        self,
        images: Any,
        expressions: str | Sequence[str] | Sequence[Sequence[str]],
        boxes: Sequence[Sequence[float]] | None = None,
        batch_size: int = 16,
    ) -> list[dict[str, Any]]:
        """Segment the object each expression names.

        images: one image or a list (uint8 (H, W, 3) arrays or PIL images). expressions: one str per image, or a
        list of strings per image (an image's SAM and CLIP encodings are computed once and reused by all of its
        expressions). boxes: ground-truth pixel boxes per expression, only for `gt_box_oracle`.
        Returns one dict per expression, in order: mask (bool H x W), box (pixel xyxy or None), score (SAM's
        predicted IoU), p_seg_txt, p_seg_box, box_norm, image_index, expression.
        """
        single = not isinstance(images, (list, tuple))
        images = [images] if single else list(images)
        if isinstance(expressions, str):
            expressions = [expressions]
        if single and all(isinstance(e, str) for e in expressions):
            groups = [list(expressions)]
        elif len(expressions) == len(images):
            groups = [[e] if isinstance(e, str) else list(e) for e in expressions]
        else:
            raise ValueError(f"{len(expressions)} expression groups for {len(images)} images")
        arrays = [validate_image(im) for im in images]
        flat = [(i, prompts.check_expression(e)) for i, g in enumerate(groups) for e in g]
        if not flat:
            raise ValueError("no expressions given")
        if boxes is not None and len(boxes) != len(flat):
            raise ValueError(f"{len(boxes)} boxes for {len(flat)} expressions")

        was_training = self.training
        self.eval()
        prep = self.image_prep()
        clip = torch.stack([prep.clip(a) for a in arrays]).to(self.device)
        sam_in = [prep.sam(a) for a in arrays]
        image_features = self.mllm.image_features(clip)
        sam_embeddings = self.segmenter.encode_images(torch.stack([s[0] for s in sam_in]).to(self.device))
        original = [a.shape[:2] for a in arrays]

        results: list[dict[str, Any]] = []
        for start in range(0, len(flat), batch_size):
            chunk = flat[start:start + batch_size]
            index = torch.tensor([i for i, _ in chunk], device=self.device)
            sizes = [original[i] for i, _ in chunk]
            gt = None if boxes is None else torch.tensor(boxes[start:start + batch_size], dtype=torch.float32)
            st = self.run_steps(image_features, sam_embeddings, index, [e for _, e in chunk], sizes, gt_boxes=gt)
            masks = self.segmenter.postprocess(st.low_res_masks, [sam_in[i][1] for i, _ in chunk], sizes)
            for j, (i, expr) in enumerate(chunk):
                results.append({
                    "image_index": i,
                    "expression": expr,
                    "mask": (masks[j] > 0).cpu().numpy(),
                    "box": None if st.sam_boxes is None else st.sam_boxes[j].cpu().numpy(),
                    "box_norm": None if st.boxes_norm is None else st.boxes_norm[j].cpu().numpy(),
                    "score": float(st.iou_pred[j, 0]),
                    "p_seg_txt": st.p_seg_txt[j].float().cpu().numpy(),
                    "p_seg_box": None if st.p_seg_box is None else st.p_seg_box[j].float().cpu().numpy(),
                })
        self.train(was_training)
        return results

    # ---------------------------------------------------------------------------------------------------------
    # persistence (see ppcr.model.persistence)
    # ---------------------------------------------------------------------------------------------------------
    def save_pretrained(self, directory) -> None:
        save_model(self, directory)

    @classmethod
    def from_pretrained(cls, directory, **config_overrides: Any) -> "PPCRModel":
        """The model a checkpoint folder holds (`config_overrides`: e.g. `variant="gt_box_oracle"` to load `ppcr`'s
        weights as the oracle)."""
        config, recipe, tokenizer = read_checkpoint(directory, **config_overrides)
        model = cls.build(config, tokenizer=tokenizer, recipe=recipe)
        load_weights_into(model, directory)
        return model


def _distinct_images(batch: dict[str, Any]) -> dict[str, int]:
    """image key -> the first row of the batch showing that image, in order of first appearance."""
    first: dict[str, int] = {}
    for row, key in enumerate(batch["image_key"]):
        first.setdefault(key, row)
    return first


def _stack_boxes(boxes: Any) -> torch.Tensor:
    if isinstance(boxes, torch.Tensor):
        return boxes.float().reshape(-1, 4)
    return torch.stack([torch.as_tensor(b, dtype=torch.float32) for b in boxes])
