"""Image preparation for the two model sides: LLaVA-1.5's CLIP encoder and SAM's image encoder.

CLIP side: LLaVA-1.5 `image_aspect_ratio="pad"` (pad to a square with the mean colour, centred, then
resize), so the whole image stays visible and boxes normalised to the original image keep their meaning
after the square padding is undone.

SAM side: exactly `ResizeLongestSide.apply_image` + `Sam.preprocess` (normalise, zero-pad bottom-right).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from segment_anything.utils.transforms import ResizeLongestSide

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)


def check_image(image: np.ndarray) -> None:
    """Raise ValueError unless `image` is a non-empty uint8 array of shape (H, W, 3)."""
    if not isinstance(image, np.ndarray):
        raise ValueError(f"image must be a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got {image.dtype}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must have shape (H, W, 3), got {tuple(image.shape)}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"image is empty: shape {tuple(image.shape)}")


def expand2square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """LLaVA's expand2square: paste the image centred on a square canvas of colour `fill`."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


@dataclass(frozen=True)
class ImagePrep:
    """Turns a uint8 RGB image into the CLIP input and the SAM input."""

    clip_size: int = 336  # LLaVA-1.5's CLIP ViT-L/14-336
    sam_size: int = 1024  # SAM's input size
    clip_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    clip_std: tuple[float, float, float] = OPENAI_CLIP_STD
    sam_mean: tuple[float, float, float] = SAM_PIXEL_MEAN
    sam_std: tuple[float, float, float] = SAM_PIXEL_STD

    def clip(self, image: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 -> (3, clip_size, clip_size) float32: pad to square, bicubic resize, normalise."""
        check_image(image)
        fill = tuple(int(m * 255) for m in self.clip_mean)
        square = expand2square(Image.fromarray(image), fill)  # type: ignore[arg-type]
        resized = square.resize((self.clip_size, self.clip_size), Image.Resampling.BICUBIC)
        x = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (3, S, S)
        mean = torch.tensor(self.clip_mean, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(self.clip_std, dtype=torch.float32).view(3, 1, 1)
        return ((x - mean) / std).contiguous()

    def sam(self, image: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
        """(H, W, 3) uint8 -> ((3, sam_size, sam_size) float32, (h, w) after the longest-side resize).

        Longest side -> sam_size, normalise with SAM's pixel mean/std, zero-pad bottom-right
        (what `Sam.preprocess` does), so padded pixels are exactly 0.
        """
        check_image(image)
        resized = ResizeLongestSide(self.sam_size).apply_image(image)  # (h, w, 3) uint8
        h, w = int(resized.shape[0]), int(resized.shape[1])
        x = torch.from_numpy(resized).permute(2, 0, 1).float()  # (3, h, w)
        mean = torch.tensor(self.sam_mean, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(self.sam_std, dtype=torch.float32).view(3, 1, 1)
        x = (x - mean) / std
        x = F.pad(x, (0, self.sam_size - w, 0, self.sam_size - h))  # (3, sam_size, sam_size)
        return x.contiguous(), (h, w)


def sam_input_size(original_hw: tuple[int, int], sam_size: int) -> tuple[int, int]:
    """(h, w) of an image of size `original_hw` after SAM's longest-side resize."""
    return ResizeLongestSide.get_preprocess_shape(original_hw[0], original_hw[1], sam_size)


def boxes_to_sam_frame(boxes_xyxy: torch.Tensor, original_hw: tuple[int, int], sam_size: int) -> torch.Tensor:
    """(N, 4) xyxy boxes in original pixels -> (N, 4) xyxy in SAM's resized (un-padded) input frame."""
    return ResizeLongestSide(sam_size).apply_boxes_torch(boxes_xyxy, tuple(original_hw))


def boxes_from_sam_frame(boxes_xyxy: torch.Tensor, original_hw: tuple[int, int], sam_size: int) -> torch.Tensor:
    """Inverse of `boxes_to_sam_frame`: (N, 4) xyxy in SAM's input frame -> original pixels."""
    old_h, old_w = original_hw
    new_h, new_w = sam_input_size(original_hw, sam_size)
    boxes = boxes_xyxy.reshape(-1, 2, 2).to(torch.float).clone()
    boxes[..., 0] = boxes[..., 0] * (old_w / new_w)
    boxes[..., 1] = boxes[..., 1] * (old_h / new_h)
    return boxes.reshape(-1, 4)


def mask_from_sam_frame(
    masks: torch.Tensor, input_size: tuple[int, int], original_size: tuple[int, int]
) -> torch.Tensor:
    """(..., S, S) mask logits in SAM's padded frame -> (..., H, W) in original pixels.

    Same as `Sam.postprocess_masks` after its first upscaling: crop the un-padded (h, w) region,
    then bilinearly resize to the original size. Threshold the result yourself (logits > 0).
    """
    lead = masks.shape[:-2]
    x = masks.reshape(-1, 1, *masks.shape[-2:]).float()  # (B, 1, S, S)
    x = x[..., : input_size[0], : input_size[1]]
    x = F.interpolate(x, size=tuple(original_size), mode="bilinear", align_corners=False)
    return x.reshape(*lead, *original_size)


# -- masks on CLIP's patch grid (stage 1a's patch labels, the image-token grounding targets) ---------------
MIN_COVER = 0.2  # a patch is labelled with an object that covers at least this share of it


def square_view(mask: np.ndarray) -> np.ndarray:
    """(H, W) -> (S, S), S = max(H, W), the mask centred as `expand2square` centres the image for CLIP."""
    h, w = mask.shape
    side = max(h, w)
    out = np.zeros((side, side), dtype=np.float32)
    top, left = (side - h) // 2, (side - w) // 2
    out[top:top + h, left:left + w] = mask
    return out


def patch_coverage(mask: np.ndarray, grid: int) -> np.ndarray:
    """(grid*grid,) float32: the share of each patch of CLIP's square view (row-major) that the (H, W) mask covers."""
    return square_coverage(square_view(mask.astype(np.float32)), grid)


def square_coverage(square: np.ndarray, grid: int) -> np.ndarray:
    """`patch_coverage` of a mask already in the square view (`square_view`)."""
    side = square.shape[0]
    # pixel sums over the grid's cells / the cells' areas
    edges = np.linspace(0, side, grid + 1).round().astype(int)
    sums = np.add.reduceat(np.add.reduceat(square, edges[:-1], axis=0), edges[:-1], axis=1)  # (grid, grid)
    return (sums / np.outer(np.diff(edges), np.diff(edges))).reshape(grid * grid).astype(np.float32)


def target_patches(mask: np.ndarray, grid: int) -> torch.Tensor:
    """(grid*grid,) float {0, 1}: the patches the object covers by at least MIN_COVER (its best-covered patch
    when it covers none that much; all zeros for an empty mask). Stage 1's image-token grounding target."""
    cover = patch_coverage(mask, grid)
    out = (cover >= MIN_COVER).astype(np.float32)
    if not out.any() and cover.max() > 0:
        out[int(cover.argmax())] = 1.0
    return torch.from_numpy(out)
