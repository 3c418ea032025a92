"""Reader for REFER-format referring-expression datasets (RefCOCO, RefCOCO+, RefCOCOg, SynRef suites).

Layout (the one used by the REFER API, https://github.com/lichengunc/refer)::

    <root>/<dataset>/refs(<splitBy>).p      # Python-2 pickle of a list of ref dicts (original release)
    <root>/<dataset>/refs(<splitBy>).json   # the same list as JSON (written by `ppcr convert-refs`,
                                            # or directly by `ppcr synth`); preferred when present
    <root>/<dataset>/instances.json         # COCO-style {images, annotations, categories}
    <root>/images/mscoco/images/train2014/<file_name>

The `.p` files are never given to `pickle.load`: `restricted_load_pickle` uses an unpickler that
refuses every global, so a tampered file cannot execute code.
"""

from __future__ import annotations

import argparse
import io
import json
import pickle
import sys
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

# dataset -> allowed splitBy -> the splits of that partition (informational: the splits actually
# present are read from the refs). Datasets not listed here are accepted with any splitBy.
KNOWN_DATASETS: dict[str, dict[str, tuple[str, ...]]] = {
    "refcoco": {"unc": ("train", "val", "testA", "testB"), "google": ("train", "val", "test")},
    "refcoco+": {"unc": ("train", "val", "testA", "testB")},
    "refcocog": {"umd": ("train", "val", "test"), "google": ("train", "val")},
    "synref": {"unc": ("train", "val", "testA", "testB")},
    "synref+": {"unc": ("train", "val", "testA", "testB")},
    "synrefg": {"umd": ("train", "val", "test"), "google": ("train", "val")},
}

IMAGE_SUBDIR = Path("images/mscoco/images/train2014")

_DATA_HINT = (
    "Download the real datasets with data_scripts/fetch_refcoco.sh (see data_scripts/README.md), "
    "or generate a synthetic suite with `ppcr synth`."
)


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle asked for a global (class or function) that the restricted unpickler does not admit."""


class ImageLoadError(ValueError):
    """An image file is missing, corrupt or truncated."""


# --------------------------------------------------------------------------------------------------
# Safe pickle loading
# --------------------------------------------------------------------------------------------------


_TEXT_ENCODINGS = {"latin1", "latin-1", "utf-8", "utf8", "ascii"}


def _codecs_encode_str(text: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """The only callable admitted: `_codecs.encode` restricted to str -> bytes with a text encoding.

    Python 3 pickles `bytes` at protocol 2 as `_codecs.encode(<str>, "latin1")`, so a REFER-style
    pickle re-written by Python 3 needs it. It cannot do anything but build a bytes object.
    """
    if not isinstance(text, str) or encoding.lower().replace("_", "-") not in _TEXT_ENCODINGS:
        raise UnsafePickleError(
            f"_codecs.encode called with unexpected arguments ({type(text).__name__}, {encoding!r})"
        )
    return text.encode(encoding, errors)


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler for plain data (dict, list, tuple, str, bytes, int, float, bool, None).

    Those types have their own opcodes and never go through `find_class`; the only global admitted
    is `_codecs.encode` (see `_codecs_encode_str`), replaced by a restricted version.
    """

    def __init__(self, file: io.BufferedIOBase, source: Path) -> None:
        # encoding="bytes": Python 2 `str` arrive as bytes and are decoded by `_decode_bytes`
        # (UTF-8 first, Latin-1 as the fallback), so non-ASCII sentences survive intact.
        super().__init__(file, encoding="bytes")
        self._source = source

    def find_class(self, module: str, name: str) -> Any:  # noqa: D102 - documented on the class
        if module == "_codecs" and name == "encode":
            return _codecs_encode_str
        raise UnsafePickleError(
            f"refused global '{module}.{name}' while reading {self._source}: REFER pickles hold only "
            "plain containers and scalars, so this file is not a genuine REFER refs file"
        )


def _decode_bytes(obj: Any) -> Any:
    """Recursively turn bytes (Python 2 `str`) into str, and tuples into lists, in a loaded pickle."""
    if isinstance(obj, bytes):
        try:
            return obj.decode("utf-8")
        except UnicodeDecodeError:
            return obj.decode("latin-1")
    if isinstance(obj, dict):
        return {_decode_bytes(k): _decode_bytes(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_decode_bytes(v) for v in obj]
    return obj


def restricted_load_pickle(path: str | Path) -> Any:
    """Load a REFER pickle without executing anything; bytes are decoded to str.

    Raises `UnsafePickleError` naming the refused global and the file if the pickle references
    any class or function (e.g. `builtins.eval`, `os.system`, `numpy.core.multiarray._reconstruct`).
    """
    path = Path(path)
    with path.open("rb") as f:
        data = _RestrictedUnpickler(f, path).load()
    return _decode_bytes(data)


# --------------------------------------------------------------------------------------------------
# Paths and conversion
# --------------------------------------------------------------------------------------------------


def check_split_by(dataset: str, split_by: str) -> None:
    """Raise ValueError if `split_by` is not a partition of a known `dataset` (unknown datasets pass)."""
    allowed = KNOWN_DATASETS.get(dataset)
    if allowed is not None and split_by not in allowed:
        raise ValueError(f"dataset {dataset!r} has no splitBy {split_by!r}; choose one of {sorted(allowed)}")


def refs_paths(root: str | Path, dataset: str, split_by: str) -> tuple[Path, Path]:
    """Return the (json, pickle) paths of a dataset's refs file."""
    folder = Path(root) / dataset
    return folder / f"refs({split_by}).json", folder / f"refs({split_by}).p"


def convert_refs_to_json(root: str | Path, dataset: str, split_by: str) -> Path:
    """Convert `refs(<splitBy>).p` to `refs(<splitBy>).json` beside it (safely); return the json path."""
    json_path, pickle_path = refs_paths(root, dataset, split_by)
    if not pickle_path.is_file():
        raise FileNotFoundError(f"no refs pickle at {pickle_path}. {_DATA_HINT}")
    refs = restricted_load_pickle(pickle_path)
    if not isinstance(refs, list) or not all(isinstance(r, dict) for r in refs):
        raise ValueError(f"{pickle_path} does not hold a list of ref dicts")
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(refs), encoding="utf-8")
    tmp.replace(json_path)
    return json_path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `ppcr convert-refs`."""
    parser.add_argument("--root", required=True, help="data root holding <dataset>/refs(<splitBy>).p")
    parser.add_argument("--dataset", required=True, help="e.g. refcoco, refcoco+, refcocog")
    parser.add_argument(
        "--split-by",
        default=None,
        help="e.g. unc, umd, google; default: every known splitBy of the dataset that has a pickle",
    )


def run(args: argparse.Namespace) -> int:
    """Entry point of `ppcr convert-refs`: convert one or all pickles of a dataset to JSON.

    Returns 0 on success, 1 (with the reason on stderr) on a missing file, bad splitBy or unsafe pickle.
    """
    try:
        if args.split_by is not None:
            check_split_by(args.dataset, args.split_by)
            split_bys = [args.split_by]
        else:
            known = KNOWN_DATASETS.get(args.dataset, {})
            split_bys = [s for s in known if refs_paths(args.root, args.dataset, s)[1].is_file()]
            if not split_bys:
                raise FileNotFoundError(
                    f"no refs(<splitBy>).p of a known splitBy under {Path(args.root) / args.dataset}; "
                    f"pass --split-by. {_DATA_HINT}"
                )
        for split_by in split_bys:
            out = convert_refs_to_json(args.root, args.dataset, split_by)
            print(f"wrote {out}")
    except (FileNotFoundError, ValueError, pickle.UnpicklingError) as err:
        print(f"ppcr convert-refs: error: {err}", file=sys.stderr)
        return 1
    return 0


# --------------------------------------------------------------------------------------------------
# Images and masks
# --------------------------------------------------------------------------------------------------


def load_image(path: str | Path) -> np.ndarray:
    """Read an image as uint8 RGB (H, W, 3); grayscale, RGBA and palette images are converted.

    No EXIF rotation is applied: REFER/COCO annotations are in the stored pixel frame.
    Raises `ImageLoadError` naming the file if it is missing, corrupt or truncated.
    """
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode == "P" and "transparency" in img.info:
                img = img.convert("RGBA")
            rgb = img.convert("RGB") if img.mode != "RGB" else img
            array = np.asarray(rgb, dtype=np.uint8).copy()
    except FileNotFoundError as err:
        raise ImageLoadError(f"image not found: {path}") from err
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ImageLoadError(f"cannot read image {path}: {err}") from err
    return array  # (H, W, 3) uint8


def decode_segmentation(segmentation: Any, height: int, width: int) -> np.ndarray:
    """Decode a COCO segmentation (polygons, uncompressed or compressed RLE) to uint8 (H, W) in {0,1}."""
    if isinstance(segmentation, list):
        if len(segmentation) == 0:
            return np.zeros((height, width), dtype=np.uint8)
        rles = mask_utils.frPyObjects(segmentation, height, width)  # polygons -> list of RLEs
        m = mask_utils.decode(rles)  # (H, W, n_polygons)
    elif isinstance(segmentation, dict):
        counts = segmentation["counts"]
        if isinstance(counts, list):  # uncompressed RLE
            rle = mask_utils.frPyObjects(segmentation, height, width)
        else:  # compressed RLE, counts as str or bytes
            rle = {"size": list(segmentation["size"]), "counts": counts.encode() if isinstance(counts, str) else counts}
        m = mask_utils.decode(rle)  # (H, W)
    else:
        raise ValueError(f"unsupported segmentation type {type(segmentation).__name__}")
    if m.ndim == 3:
        m = np.sum(m, axis=2)  # merge the polygons of one object
    return np.clip(m, 0, 1).astype(np.uint8)


# --------------------------------------------------------------------------------------------------
# The reader
# --------------------------------------------------------------------------------------------------


class Refer:
    """A REFER-format dataset: refs of one splitBy, plus the COCO instances they point to."""

    def __init__(self, root: str | Path, dataset: str, split_by: str) -> None:
        self.root = Path(root)
        self.dataset = dataset
        self.split_by = split_by
        check_split_by(dataset, split_by)
        folder = self.root / dataset
        if not folder.is_dir():
            raise FileNotFoundError(f"dataset folder not found: {folder}. {_DATA_HINT}")
        json_path, pickle_path = refs_paths(self.root, dataset, split_by)
        if json_path.is_file():
            self.refs_file = json_path
            refs = json.loads(json_path.read_text(encoding="utf-8"))
        elif pickle_path.is_file():
            self.refs_file = pickle_path
            refs = restricted_load_pickle(pickle_path)
        else:
            raise FileNotFoundError(
                f"refs file not found: expected {json_path} or {pickle_path}. {_DATA_HINT}"
            )
        instances_path = folder / "instances.json"
        if not instances_path.is_file():
            raise FileNotFoundError(f"instances file not found: {instances_path}. {_DATA_HINT}")
        instances = json.loads(instances_path.read_text(encoding="utf-8"))

        self.refs: list[dict[str, Any]] = list(refs)
        self._refs_by_id: dict[int, dict[str, Any]] = {int(r["ref_id"]): r for r in self.refs}
        self._anns: dict[int, dict[str, Any]] = {int(a["id"]): a for a in instances["annotations"]}
        self._images: dict[int, dict[str, Any]] = {int(i["id"]): i for i in instances["images"]}
        self.categories: dict[int, dict[str, Any]] = {int(c["id"]): c for c in instances.get("categories", [])}

    def __repr__(self) -> str:
        return (
            f"Refer(root={str(self.root)!r}, dataset={self.dataset!r}, "
            f"split_by={self.split_by!r}, refs={len(self.refs)})"
        )

    @property
    def splits(self) -> list[str]:
        """The splits present in the refs, in the canonical order of the table, others sorted after."""
        present = {r["split"] for r in self.refs}
        canonical = KNOWN_DATASETS.get(self.dataset, {}).get(self.split_by, ())
        ordered = [s for s in canonical if s in present]
        return ordered + sorted(present - set(ordered))

    def ref_ids(self, split: str | None = None) -> list[int]:
        """Ids of the refs of `split` (all refs if None), in file order."""
        if split is None:
            return [int(r["ref_id"]) for r in self.refs]
        if split not in self.splits:
            raise ValueError(
                f"split {split!r} does not exist in {self.dataset} ({self.split_by}); existing splits: {self.splits}"
            )
        return [int(r["ref_id"]) for r in self.refs if r["split"] == split]

    def ref(self, ref_id: int) -> dict[str, Any]:
        """The ref dict with this id (all keys of the file kept)."""
        return self._refs_by_id[int(ref_id)]

    def ann(self, ann_id: int) -> dict[str, Any]:
        """The COCO annotation with this id."""
        return self._anns[int(ann_id)]

    def image_ann_ids(self, image_id: int) -> list[int]:
        """Ids of every annotation (referred to or not) on an image, in file order."""
        if not hasattr(self, "_anns_by_image"):
            self._anns_by_image: dict[int, list[int]] = {}
            for ann_id, ann in self._anns.items():
                self._anns_by_image.setdefault(int(ann["image_id"]), []).append(ann_id)
        return self._anns_by_image.get(int(image_id), [])

    def image_info(self, image_id: int) -> dict[str, Any]:
        """The COCO image entry (file_name, height, width, ...)."""
        return self._images[int(image_id)]

    def image_path(self, image_id: int) -> Path:
        """Path of the image file: <root>/images/mscoco/images/train2014/<file_name>."""
        return self.root / IMAGE_SUBDIR / self.image_info(image_id)["file_name"]

    def _as_ann(self, ref_or_ann: dict[str, Any] | int) -> dict[str, Any]:
        if isinstance(ref_or_ann, dict) and "segmentation" in ref_or_ann:
            return ref_or_ann
        ref = ref_or_ann if isinstance(ref_or_ann, dict) else self.ref(ref_or_ann)
        return self.ann(ref["ann_id"])

    def mask(self, ref_or_ann: dict[str, Any] | int) -> np.ndarray:
        """Target mask, uint8 (H, W) in {0,1}, of a ref (dict or ref_id) or an annotation dict."""
        ann = self._as_ann(ref_or_ann)
        info = self.image_info(ann["image_id"])
        return decode_segmentation(ann["segmentation"], int(info["height"]), int(info["width"]))

    def box_xyxy(self, ref_or_ann: dict[str, Any] | int) -> np.ndarray:
        """Box of a ref/annotation as float32 [x1, y1, x2, y2] in pixels (from COCO's xywh bbox)."""
        x, y, w, h = (float(v) for v in self._as_ann(ref_or_ann)["bbox"])
        return np.array([x, y, x + w, y + h], dtype=np.float32)
