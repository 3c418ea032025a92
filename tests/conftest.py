"""Shared fixtures: a tiny REFER dataset in the real on-disk format (pickle refs, COCO instances), and one smoke study
that the report, book, headline and live-explorer tests read (run once per session)."""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils


@dataclass
class TinyRefer:
    """Where the tiny dataset lives and what its masks must decode to (hand-counted)."""

    root: Path
    dataset: str = "refcoco"
    split_by: str = "unc"
    # ann_id -> number of foreground pixels
    mask_pixels: dict[int, int] = field(default_factory=dict)
    # image_id -> (H, W)
    image_sizes: dict[int, tuple[int, int]] = field(default_factory=dict)


def pytest_configure(config: pytest.Config) -> None:
    """Silence one known NumPy-2 deprecation notice raised inside pycocotools' decode."""
    config.addinivalue_line(
        "filterwarnings", "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
    )


def _sent(sent_id: int, text: str) -> dict:
    return {"sent": text, "raw": text.capitalize(), "tokens": text.split(), "sent_id": sent_id}


@pytest.fixture
def tiny_refer(tmp_path: Path) -> TinyRefer:
    """refcoco/refs(unc).p (protocol 2) + refcoco/instances.json + three images.

    Masks (pycocotools fills polygon [x0,y0,x1,y0,x1,y1,x0,y1] as columns x0..x1-1, rows y0..y1-1):
        ann 101, image 1: rectangle 10 x 5                           -> 50 px
        ann 102, image 1: TWO polygons, 10x10 and 10x5 overlapping 5x5 -> 100 + 50 - 25 = 125 px
        ann 103, image 2: uncompressed RLE, column 2 rows 2..7          -> 6 px
        ann 104, image 2: compressed RLE (str counts), rows 10..13 x cols 8..11 -> 16 px
        ann 105, image 3: right triangle with legs 4                    -> 3 + 2 + 1 = 6 px
    """
    root = tmp_path / "refer"
    img_dir = root / "images/mscoco/images/train2014"
    img_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(img_dir / "img1.png")
    Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8), mode="L").save(img_dir / "img2.png")
    Image.fromarray(rng.integers(0, 255, (200, 100, 3), dtype=np.uint8)).save(img_dir / "img3.jpg", quality=90)

    box_mask = np.zeros((16, 16), dtype=np.uint8)
    box_mask[10:14, 8:12] = 1
    compressed = mask_utils.encode(np.asfortranarray(box_mask))
    compressed["counts"] = compressed["counts"].decode("ascii")  # as stored in COCO json

    instances = {
        "images": [
            {"id": 1, "file_name": "img1.png", "height": 20, "width": 30},
            {"id": 2, "file_name": "img2.png", "height": 16, "width": 16},
            {"id": 3, "file_name": "img3.jpg", "height": 200, "width": 100},
        ],
        "annotations": [
            {"id": 101, "image_id": 1, "category_id": 1, "bbox": [2, 3, 10, 5],
             "segmentation": [[2, 3, 12, 3, 12, 8, 2, 8]]},
            {"id": 102, "image_id": 1, "category_id": 1, "bbox": [0, 10, 15, 10],
             "segmentation": [[0, 10, 10, 10, 10, 20, 0, 20], [5, 15, 15, 15, 15, 20, 5, 20]]},
            {"id": 103, "image_id": 2, "category_id": 2, "bbox": [2, 2, 1, 6],
             "segmentation": {"size": [16, 16], "counts": [34, 6, 216]}},
            {"id": 104, "image_id": 2, "category_id": 2, "bbox": [8, 10, 4, 4], "segmentation": compressed},
            {"id": 105, "image_id": 3, "category_id": 3, "bbox": [0, 0, 4, 4],
             "segmentation": [[0, 0, 4, 0, 0, 4]]},
        ],
        "categories": [{"id": 1, "name": "dog"}, {"id": 2, "name": "cat"}, {"id": 3, "name": "bird"}],
    }
    refs = [
        {"ref_id": 1, "ann_id": 101, "image_id": 1, "split": "train", "category_id": 1,
         "sentences": [_sent(10, "dog on top"), _sent(11, "upper dog")], "sent_ids": [10, 11],
         "expr_types": ["spatial", "attribute"], "visible_fraction": 0.8, "blurred": False},
        {"ref_id": 2, "ann_id": 102, "image_id": 1, "split": "train", "category_id": 1,
         "sentences": [_sent(20, "lower dog")], "sent_ids": [20]},
        {"ref_id": 3, "ann_id": 103, "image_id": 2, "split": "val", "category_id": 2,
         "sentences": [_sent(30, "thin cat")], "sent_ids": [30]},
        {"ref_id": 4, "ann_id": 104, "image_id": 2, "split": "testA", "category_id": 2,
         "sentences": [_sent(40, "square cat")], "sent_ids": [40]},
        {"ref_id": 5, "ann_id": 105, "image_id": 3, "split": "testB", "category_id": 3,
         "sentences": [_sent(50, "bird in the corner"), _sent(51, "top left bird")], "sent_ids": [50, 51]},
    ]
    (root / "refcoco").mkdir()
    (root / "refcoco/instances.json").write_text(json.dumps(instances))
    with open(root / "refcoco/refs(unc).p", "wb") as f:
        pickle.dump(refs, f, protocol=2)
    return TinyRefer(
        root=root,
        mask_pixels={101: 50, 102: 125, 103: 6, 104: 16, 105: 6},
        image_sizes={1: (20, 30), 2: (16, 16), 3: (200, 100)},
    )


@pytest.fixture(scope="session")
def smoke_study_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A whole study at the smoke profile (`python -m ppcr.pipeline study --profile smoke`); tests only read it."""
    from ppcr.pipeline import run_study  # (imported here: the REFER-only tests need no model code)
    from ppcr.recipe.profile import load_profile

    out = tmp_path_factory.mktemp("smoke_study")
    run_study(load_profile("smoke"), out, progress=False)
    return out


@pytest.fixture(scope="session")
def study(smoke_study_run: Path):
    """The smoke study as `ppcr.report.load_study` reads it."""
    from ppcr import report

    return report.load_study(smoke_study_run)
