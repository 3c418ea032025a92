"""Step 3, Instance Segmentation: segment-anything's SAM prompted by the box and the Semantic SP.

The image encoder is frozen (its embeddings can be cached per image); the prompt encoder embeds the box, the
Semantic Segmentation Prompt P_seg_txt is appended as one more sparse prompt embedding (as LISA/GLaMM feed their
`[SEG]` embedding), and the mask decoder predicts one mask per expression.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import load_file
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from segment_anything.utils.transforms import ResizeLongestSide
from torch import nn

from ppcr.model.config import SamSettings


def build_sam(settings: SamSettings, checkpoint: str | Path | None = None) -> Sam:
    """SAM from segment-anything's modules at the given size; official ViT-H weights load without unpickling code."""
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=settings.encoder_depth,
            embed_dim=settings.encoder_embed_dim,
            img_size=settings.img_size,
            mlp_ratio=4,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            num_heads=settings.encoder_num_heads,
            patch_size=settings.patch_size,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=tuple(settings.encoder_global_attn_indexes),
            window_size=settings.window_size,
            out_chans=settings.prompt_embed_dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=settings.prompt_embed_dim,
            image_embedding_size=(settings.embedding_size, settings.embedding_size),
            input_image_size=(settings.img_size, settings.img_size),
            mask_in_chans=settings.mask_in_chans,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=settings.decoder_depth,
                embedding_dim=settings.prompt_embed_dim,
                mlp_dim=settings.decoder_mlp_dim,
                num_heads=settings.decoder_num_heads,
            ),
            transformer_dim=settings.prompt_embed_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=settings.iou_head_hidden_dim,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    if checkpoint is not None:
        state = load_sam_state_dict(checkpoint)
        own = sam.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        shaped = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
        if missing or unexpected or shaped:
            raise ValueError(f"SAM weights at {checkpoint} do not fit this SAM ({settings.encoder_embed_dim}-dim "
                             f"encoder, depth {settings.encoder_depth}): {len(missing)} missing, e.g. {missing[:3]}; "
                             f"{len(unexpected)} unexpected, e.g. {unexpected[:3]}; {len(shaped)} of another shape, "
                             f"e.g. {shaped[:3]}")
        sam.load_state_dict(state, strict=True)
    return sam


def load_sam_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read SAM weights: `.safetensors`, or the official `.pth` with `weights_only=True` (no code runs)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"SAM checkpoint not found: {path}. Give the official sam_vit_h_4b8939.pth (or a .safetensors "
            f"state dict); nothing can be downloaded here."
        )
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # a pickle that would run code: refused by weights_only, said in one line
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise pickle.UnpicklingError(f"SAM checkpoint {path} holds objects that would run code when loaded; refused "
                                     f"(torch.load weights_only=True: {first})") from None
    except Exception as err:  # noqa: BLE001 - a truncated or foreign file: one line naming it
        raise ValueError(f"SAM checkpoint {path} cannot be read ({type(err).__name__}: {err})") from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"SAM checkpoint {path} is not a state dict of tensors")
    return state


class SamSegmenter(nn.Module):
    """SAM with PPCR's prompts. `encode_images` is frozen; `decode` is batched over expressions."""

    def __init__(self, sam: Sam):
        super().__init__()
        self.sam = sam
        self.sam.image_encoder.requires_grad_(False)

    @property
    def img_size(self) -> int:
        return self.sam.image_encoder.img_size

    @torch.no_grad()
    def encode_images(self, sam_pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) normalised, padded images -> (N, C, s, s) embeddings of the frozen encoder."""
        encoder = self.sam.image_encoder
        was_training = encoder.training
        encoder.eval()
        out = encoder(sam_pixel_values)
        encoder.train(was_training)
        return out

    def _frame_factors(self, original_sizes: Sequence[tuple[int, int]], like: torch.Tensor) -> torch.Tensor:
        """(B, 2) per-image (x, y) scale from original pixels to SAM's resized input frame, exactly as
        ResizeLongestSide.apply_coords computes it (new/old per axis, with its rounding of the new size)."""
        factors = []
        for h, w in original_sizes:
            nh, nw = ResizeLongestSide.get_preprocess_shape(h, w, self.img_size)
            factors.append([nw / w, nh / h])
        return torch.tensor(factors, dtype=like.dtype, device=like.device)

    def coords_to_input_frame(self, coords: torch.Tensor, original_sizes: Sequence[tuple[int, int]]) -> torch.Tensor:
        """(B, k, 2) pixel points (x, y) of the original images -> SAM's input frame (differentiable)."""
        return coords * self._frame_factors(original_sizes, coords).unsqueeze(1)

    def boxes_to_input_frame(self, boxes_xyxy: torch.Tensor, original_sizes: Sequence[tuple[int, int]]) -> torch.Tensor:
        """(B, 4) pixel boxes of the original images -> SAM's resized input frame (differentiable)."""
        return boxes_xyxy * self._frame_factors(original_sizes, boxes_xyxy).repeat(1, 2)

    def prompt_embeddings(
        self, boxes_input_frame: torch.Tensor | None, p_seg_txt: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sparse (B, n, C) = [box corners (2)] + [P_seg_txt (1)]; dense (B, C, s, s) = SAM's no-mask embedding."""
        pe = self.sam.prompt_encoder
        sparse = p_seg_txt.unsqueeze(1)  # (B, 1, C)
        if boxes_input_frame is not None:
            sparse = torch.cat([pe._embed_boxes(boxes_input_frame), sparse], dim=1)  # (B, 3, C)
        b = p_seg_txt.shape[0]
        dense = pe.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(b, -1, *pe.image_embedding_size)
        return sparse, dense

    def decode(
        self,
        image_embeddings: torch.Tensor,
        image_index: torch.Tensor,
        boxes_input_frame: torch.Tensor | None,
        p_seg_txt: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """PPCR's prompts -> low-resolution mask logits (B, 1, 4s, 4s) and predicted IoU (B, 1).

        image_embeddings: (N, C, s, s) one per distinct image; image_index: (B,) which image each expression is on.
        """
        sparse, dense = self.prompt_embeddings(boxes_input_frame, p_seg_txt)
        return self.decode_prompts(image_embeddings, image_index, sparse, dense)

    def decode_prompts(
        self,
        image_embeddings: torch.Tensor,
        image_index: torch.Tensor,
        sparse: torch.Tensor,
        dense: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """SAM's mask decoder on any sparse (B, n, C) / dense (B, C, s, s) prompts, single-mask output.

        Equivalent to calling `MaskDecoder.forward(..., multimask_output=False)` image by image (a test checks
        it), but batched over all expressions of all images at once.
        """
        decoder = self.sam.mask_decoder
        image_pe = self.sam.prompt_encoder.get_dense_pe()  # (1, C, s, s)
        tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
        tokens = torch.cat([tokens.unsqueeze(0).expand(sparse.shape[0], -1, -1), sparse], dim=1)
        src = image_embeddings[image_index] + dense  # (B, C, s, s)
        pos = image_pe.expand(src.shape[0], -1, -1, -1)
        b, c, h, w = src.shape
        hs, src = decoder.transformer(src, pos, tokens)
        mask_tokens_out = hs[:, 1 : 1 + decoder.num_mask_tokens, :]
        upscaled = decoder.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))  # (B, C/8, 4s, 4s)
        hyper = torch.stack(
            [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)], dim=1
        )
        _, c8, uh, uw = upscaled.shape
        masks = (hyper @ upscaled.reshape(b, c8, uh * uw)).reshape(b, -1, uh, uw)
        iou = decoder.iou_prediction_head(hs[:, 0, :])
        return masks[:, :1], iou[:, :1]  # the single-mask output (multimask_output=False)

    def postprocess(self, low_res: torch.Tensor, input_sizes: Sequence[tuple[int, int]],
                    original_sizes: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
        """(B, 1, 4s, 4s) -> per expression (H, W) logits at its original size, via `Sam.postprocess_masks`
        once per group of equal sizes (not once per expression)."""
        out: list[torch.Tensor | None] = [None] * low_res.shape[0]
        groups: dict[tuple, list[int]] = {}
        for i, key in enumerate(zip(map(tuple, input_sizes), map(tuple, original_sizes))):
            groups.setdefault(key, []).append(i)
        for (inp, orig), idx in groups.items():
            up = self.sam.postprocess_masks(low_res[idx], inp, orig)[:, 0]  # (n, H, W)
            for j, i in enumerate(idx):
                out[i] = up[j]
        return out  # type: ignore[return-value]
