"""Torch Dataset over a REFER-format split: one item per referring expression (sentence)."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ppcr.data.refer import Refer, load_image
from ppcr.data.transforms import ImagePrep

# Per-ref metadata copied into an item's "meta" when present (the SynRef suites add them).
_EXTRA_META_KEYS = ("distractors_same_category", "visible_fraction", "blurred", "low_contrast")
_PIXEL_KEYS = ("clip_pixel_values", "sam_pixel_values")


class ReferSegDataset(Dataset):
    """Every sentence of every ref of `split`, in file order (refs) then sentence order.

    Items are dicts; see `__getitem__`. Decoded images are kept in a small LRU (many sentences
    share an image), and the sha1 of each image file is computed once per image.
    """

    def __init__(
        self,
        refer: Refer,
        split: str,
        prep: ImagePrep,
        max_refs: int | None = None,
        return_image: bool = False,
        image_cache_size: int = 4,
    ) -> None:
        self.refer = refer
        self.split = split
        self.prep = prep
        self.return_image = return_image
        ref_ids = refer.ref_ids(split)  # raises ValueError for an unknown split
        if max_refs is not None:
            ref_ids = ref_ids[:max_refs]
        self.ref_ids = ref_ids
        # (ref_id, sentence index) per item
        self.items: list[tuple[int, int]] = [
            (ref_id, i) for ref_id in ref_ids for i in range(len(refer.ref(ref_id)["sentences"]))
        ]
        self._cache_size = max(1, image_cache_size)
        self._images: OrderedDict[int, np.ndarray] = OrderedDict()
        self._keys: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self.items)

    def image(self, image_id: int) -> np.ndarray:
        """Decoded uint8 RGB image (H, W, 3), through the LRU cache."""
        if image_id in self._images:
            self._images.move_to_end(image_id)
            return self._images[image_id]
        image = load_image(self.refer.image_path(image_id))
        self._images[image_id] = image
        if len(self._images) > self._cache_size:
            self._images.popitem(last=False)
        return image

    def image_key(self, image_id: int) -> str:
        """sha1 hex digest of the image file's bytes (a content key for caching SAM embeddings)."""
        if image_id not in self._keys:
            self._keys[image_id] = hashlib.sha1(Path(self.refer.image_path(image_id)).read_bytes()).hexdigest()
        return self._keys[image_id]

    def meta(self, index: int) -> dict[str, Any]:
        """Metadata of item `index` without decoding the image."""
        ref_id, sent_idx = self.items[index]
        ref = self.refer.ref(ref_id)
        sentence = ref["sentences"][sent_idx]
        image_id = int(ref["image_id"])
        meta: dict[str, Any] = {
            "ref_id": ref_id,
            "sent_id": sentence.get("sent_id"),
            "ann_id": int(ref["ann_id"]),
            "image_id": image_id,
            "category_id": ref.get("category_id"),
            "split": ref["split"],
            "file_name": self.refer.image_info(image_id)["file_name"],
        }
        expr_types = ref.get("expr_types")
        if expr_types is not None and sent_idx < len(expr_types):
            meta["expr_type"] = expr_types[sent_idx]
        for key in _EXTRA_META_KEYS:
            if key in ref:
                meta[key] = ref[key]
        return meta

    def __getitem__(self, index: int) -> dict[str, Any]:
        """One expression: pixel tensors for both sides, the target mask and box, and metadata."""
        ref_id, sent_idx = self.items[index]
        ref = self.refer.ref(ref_id)
        image_id = int(ref["image_id"])
        image = self.image(image_id)  # (H, W, 3) uint8
        H, W = int(image.shape[0]), int(image.shape[1])
        mask = self.refer.mask(ref)  # (H, W) uint8
        if mask.shape != (H, W):
            raise ValueError(
                f"ref {ref_id}: mask shape {mask.shape} does not match image "
                f"{self.refer.image_path(image_id)} of shape ({H}, {W})"
            )
        sam_pixels, sam_input_size = self.prep.sam(image)
        item: dict[str, Any] = {
            "clip_pixel_values": self.prep.clip(image),  # (3, clip_size, clip_size)
            "sam_pixel_values": sam_pixels,  # (3, sam_size, sam_size)
            "sam_input_size": sam_input_size,
            "original_size": (H, W),
            "expression": ref["sentences"][sent_idx]["sent"],
            "mask": torch.from_numpy(mask),  # (H, W) uint8 {0,1}
            "box": torch.from_numpy(self.refer.box_xyxy(ref)),  # (4,) float32 xyxy
            "image_id": image_id,
            "image_key": self.image_key(image_id),
            "meta": self.meta(index),
        }
        if self.return_image:
            item["image"] = image
        return item


class ImageObjectsDataset(Dataset):
    """One item per image of a split with *every* annotated object on it (masks and boxes), for class-agnostic
    promptable segmentation (SAM's own training signal: many prompts per image encoding)."""

    def __init__(self, refer: Refer, split: str, prep: ImagePrep) -> None:
        self.refer = refer
        self.prep = prep
        self.image_ids = list(dict.fromkeys(int(refer.ref(r)["image_id"]) for r in refer.ref_ids(split)))

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image_id = self.image_ids[index]
        image = load_image(self.refer.image_path(image_id))
        anns = [self.refer.ann(a) for a in self.refer.image_ann_ids(image_id)]
        sam_pixels, sam_input_size = self.prep.sam(image)
        return {
            "sam_pixel_values": sam_pixels,  # (3, sam_size, sam_size)
            "sam_input_size": sam_input_size,
            "original_size": (int(image.shape[0]), int(image.shape[1])),
            "masks": [torch.from_numpy(self.refer.mask(a)) for a in anns],  # K x (H, W) uint8
            "boxes": torch.stack([torch.from_numpy(self.refer.box_xyxy(a)) for a in anns]),  # (K, 4) xyxy pixels
            "image_id": image_id,
        }


def collate_refer(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack the pixel tensors ((B, 3, S, S)); every other key becomes a list of length B."""
    if not batch:
        raise ValueError("collate_refer got an empty batch")
    out: dict[str, Any] = {}
    for key in batch[0]:
        values = [item[key] for item in batch]
        out[key] = torch.stack(values) if key in _PIXEL_KEYS else values
    return out


def build_refer_dataset(
    root: str | Path, dataset: str, split_by: str, split: str, prep: ImagePrep | None = None, **kw: Any
) -> ReferSegDataset:
    """Open `Refer(root, dataset, split_by)` and wrap `split` (kw go to `ReferSegDataset`)."""
    return ReferSegDataset(Refer(root, dataset, split_by), split, prep or ImagePrep(), **kw)
