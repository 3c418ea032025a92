"""Tests of the image preparation (CLIP and SAM sides) and the ReferSegDataset."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from ppcr.data.dataset import ReferSegDataset, build_refer_dataset, collate_refer
from ppcr.data.refer import Refer
from ppcr.data.transforms import (
    SAM_PIXEL_MEAN,
    SAM_PIXEL_STD,
    ImagePrep,
    boxes_from_sam_frame,
    boxes_to_sam_frame,
    mask_from_sam_frame,
)

SMALL = ImagePrep(clip_size=28, sam_size=64)


def test_sam_side_resize_and_padding():
    image = np.full((200, 100, 3), 200, dtype=np.uint8)  # H=200, W=100
    x, (h, w) = ImagePrep().sam(image)
    assert x.shape == (3, 1024, 1024) and x.dtype == torch.float32
    assert (h, w) == (1024, 512)
    expected = (200 - torch.tensor(SAM_PIXEL_MEAN)) / torch.tensor(SAM_PIXEL_STD)
    torch.testing.assert_close(x[:, 500, 200], expected)
    assert (x[:, :, 512:] == 0).all()  # zero padding on the right
    # wide image: padding at the bottom
    x, (h, w) = SMALL.sam(np.zeros((10, 40, 3), dtype=np.uint8))
    assert (h, w) == (16, 64)
    assert (x[:, 16:, :] == 0).all() and (x[:, :16, :] != 0).all()


def test_clip_side_pads_to_square_with_mean_colour():
    prep = ImagePrep(clip_size=30)
    image = np.zeros((10, 30, 3), dtype=np.uint8)  # wide black image -> grey bands top and bottom
    x = prep.clip(image)
    assert x.shape == (3, 30, 30) and x.dtype == torch.float32
    mean = torch.tensor(prep.clip_mean)
    std = torch.tensor(prep.clip_std)
    fill = torch.tensor([int(m * 255) for m in prep.clip_mean]) / 255.0
    torch.testing.assert_close(x[:, 0, 15], (fill - mean) / std, atol=1e-5, rtol=0)  # top band
    torch.testing.assert_close(x[:, 15, 15], (0 - mean) / std, atol=1e-5, rtol=0)  # image centre


@pytest.mark.parametrize(
    "bad", [np.zeros((4, 4), np.uint8), np.zeros((4, 4, 3), np.float32), np.zeros((0, 4, 3), np.uint8)]
)
def test_prep_rejects_bad_images(bad):
    with pytest.raises(ValueError):
        SMALL.sam(bad)
    with pytest.raises(ValueError):
        SMALL.clip(bad)


def test_boxes_round_trip():
    boxes = torch.tensor([[0.0, 10.0, 15.0, 20.0], [3.5, 7.25, 99.0, 180.0]])
    to = boxes_to_sam_frame(boxes, (200, 100), 1024)
    torch.testing.assert_close(to[1], torch.tensor([3.5, 7.25, 99.0, 180.0]) * 5.12)
    torch.testing.assert_close(boxes_from_sam_frame(to, (200, 100), 1024), boxes)
    odd = boxes_to_sam_frame(boxes, (333, 517), 1024)
    torch.testing.assert_close(boxes_from_sam_frame(odd, (333, 517), 1024), boxes)


def test_mask_from_sam_frame():
    logits = torch.full((1, 64, 64), -5.0)
    logits[:, :32, :16] = 5.0  # left half of the (32, 64) un-padded region
    out = mask_from_sam_frame(logits, (32, 64), (20, 40))
    assert out.shape == (1, 20, 40)
    assert (out[0, :, :10] > 0).all() and (out[0, :, 11:] < 0).all()


def test_items(tiny_refer):
    refer = Refer(tiny_refer.root, "refcoco", "unc")
    ds = ReferSegDataset(refer, "train", SMALL)
    assert len(ds) == 3  # ref 1 has two sentences, ref 2 one
    item = ds[0]
    assert item["clip_pixel_values"].shape == (3, 28, 28) and item["clip_pixel_values"].dtype == torch.float32
    assert item["sam_pixel_values"].shape == (3, 64, 64) and item["sam_pixel_values"].dtype == torch.float32
    assert item["original_size"] == (20, 30)
    assert item["sam_input_size"] == (43, 64)
    assert item["expression"] == "dog on top"
    assert item["mask"].dtype == torch.uint8 and item["mask"].shape == (20, 30)
    assert int(item["mask"].sum()) == 50
    assert item["box"].dtype == torch.float32
    torch.testing.assert_close(item["box"], torch.tensor([2.0, 3.0, 12.0, 8.0]))
    assert item["image_id"] == 1
    assert item["image_key"] == hashlib.sha1(refer.image_path(1).read_bytes()).hexdigest()
    assert "image" not in item
    meta = item["meta"]
    assert meta["ref_id"] == 1 and meta["sent_id"] == 10 and meta["ann_id"] == 101
    assert meta["category_id"] == 1 and meta["split"] == "train" and meta["file_name"] == "img1.png"
    assert meta["expr_type"] == "spatial" and meta["visible_fraction"] == 0.8 and meta["blurred"] is False
    assert ds[1]["meta"]["expr_type"] == "attribute" and ds[1]["expression"] == "upper dog"
    assert "expr_type" not in ds[2]["meta"]
    assert [ds.meta(i)["sent_id"] for i in range(len(ds))] == [10, 11, 20]


def test_grayscale_image_return_image_and_max_refs(tiny_refer):
    ds = build_refer_dataset(tiny_refer.root, "refcoco", "unc", "testB", SMALL, return_image=True, max_refs=1)
    assert len(ds) == 2
    item = ds[1]
    assert item["image"].shape == (200, 100, 3) and item["image"].dtype == np.uint8
    assert item["sam_input_size"] == (64, 32)
    val = build_refer_dataset(tiny_refer.root, "refcoco", "unc", "val", SMALL)
    assert val[0]["original_size"] == (16, 16) and int(val[0]["mask"].sum()) == 6
    with pytest.raises(ValueError, match="existing splits"):
        build_refer_dataset(tiny_refer.root, "refcoco", "unc", "test", SMALL)


def test_collate(tiny_refer):
    ds = build_refer_dataset(tiny_refer.root, "refcoco", "unc", "train", SMALL)
    loader = torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=collate_refer)
    batch = next(iter(loader))
    assert batch["clip_pixel_values"].shape == (3, 3, 28, 28)
    assert batch["sam_pixel_values"].shape == (3, 3, 64, 64)
    assert batch["expression"] == ["dog on top", "upper dog", "lower dog"]
    assert isinstance(batch["mask"], list) and batch["mask"][2].shape == (20, 30)
    assert len(batch["meta"]) == 3 and batch["image_id"] == [1, 1, 1]
