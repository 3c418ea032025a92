"""`ppcr predict`: segment the objects that one or more expressions name in one image, and save an overlay.

    ppcr predict --checkpoint runs/ppcr --image photo.jpg --expression "dog on the left" \
                 --expression "the red car" --out overlay.png [--device cpu] [--box x1 y1 x2 y2]

Writes `overlay.png` (one panel per expression) and `overlay.json` (the same path with a .json suffix: the
expressions, boxes, scores and the masks as COCO RLE), and prints one line per expression. An expression with
words the model's tokenizer does not know (the small presets' closed word vocabulary reads them as `<unk>`) gets
a one-line warning on stderr naming them, and its JSON entry lists them under "unknown_words". Bad input (a
missing checkpoint, an unreadable image, an empty expression) ends with exit code 2 and a one-line message.
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils

from ppcr import viz
from ppcr.data.refer import ImageLoadError, load_image
from ppcr.model.modeling_ppcr import PPCRModel
from ppcr.model.prompts import check_expression
from ppcr.model.tokenizer import unknown_words, unknown_words_warning

EXIT_BAD_INPUT = 2


class PredictError(Exception):
    """Bad input to `ppcr predict`: reported as one line on stderr with exit code 2."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `ppcr predict`."""
    parser.add_argument("--checkpoint", required=True, type=Path, help="a checkpoint folder (save_pretrained)")
    parser.add_argument("--image", required=True, type=Path, help="the image to segment")
    parser.add_argument("--expression", required=True, action="append", metavar="TEXT",
                        help="a referring expression; repeat to segment several objects of the image")
    parser.add_argument("--out", required=True, type=Path, help="overlay PNG to write (a .json is written beside)")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--llava-path", help="where the checkpoint's base LLaVA lies now (a checkpoint of the paper "
                        "profile records the path it was trained with)")
    parser.add_argument("--sam-checkpoint", help="where the checkpoint's SAM lies now")
    parser.add_argument("--box", type=float, nargs=4, default=None, metavar=("X1", "Y1", "X2", "Y2"),
                        help="ground-truth pixel box given to SAM, for the gt_box_oracle variant")
    parser.add_argument("--no-prefix-cache", action="store_true",
                        help="run each expression's full LLM sequences (default: the image's prompt prefix once)")


def json_path_for(out: Path) -> Path:
    """Where the JSON beside the overlay goes: the overlay path with a .json suffix."""
    return Path(out).with_suffix(".json")


def encode_mask_rle(mask: np.ndarray) -> dict[str, Any]:
    """A boolean (H, W) mask as a JSON-ready COCO compressed RLE ({"size": [H, W], "counts": str})."""
    rle = mask_utils.encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _check_inputs(args: argparse.Namespace) -> tuple[np.ndarray, list[str]]:
    """Validate everything cheap before loading the model; returns the image and the normalised expressions."""
    if not args.checkpoint.is_dir():
        raise PredictError(f"checkpoint folder not found: {args.checkpoint}")
    if not (args.checkpoint / "config.json").is_file():
        raise PredictError(f"not a PPCR checkpoint (no config.json): {args.checkpoint}")
    expressions = []
    for text in args.expression:
        try:
            expressions.append(check_expression(text))
        except ValueError as err:
            raise PredictError(str(err)) from None
    try:
        image = load_image(args.image)
    except ImageLoadError as err:
        raise PredictError(str(err)) from None
    return image, expressions


def predict_image(args: argparse.Namespace) -> dict[str, Any]:
    """Load the model, predict every expression, write the PNG and the JSON; returns the JSON record."""
    image, expressions = _check_inputs(args)
    try:
        overrides = {k: v for k, v in (("llava_path", args.llava_path), ("sam_checkpoint", args.sam_checkpoint)) if v}
        model = PPCRModel.from_pretrained(args.checkpoint, **overrides)
    except (FileNotFoundError, ValueError, OSError, pickle.UnpicklingError) as err:
        raise PredictError(f"cannot load checkpoint {args.checkpoint}: {err}") from None
    try:
        model = model.to(torch.device(args.device))
    except (RuntimeError, AssertionError) as err:
        raise PredictError(f"device {args.device!r} is not usable: {err}") from None
    model.prefix_cache = not args.no_prefix_cache
    variant = model.config.variant
    uses_gt_box = model.config.spec.eval_box == "gt"
    if uses_gt_box and args.box is None:
        raise PredictError(f"variant {variant!r} segments from a given box: pass --box X1 Y1 X2 Y2")
    if args.box is not None and not uses_gt_box:
        print(f"ppcr predict: note: --box is ignored by variant {variant!r}", file=sys.stderr)
    boxes = None if args.box is None else [list(args.box)] * len(expressions)
    try:
        predictions = model.predict(image, expressions, boxes=boxes)
    except (ValueError, TypeError) as err:
        raise PredictError(str(err)) from None

    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig = viz.prediction_grid(image, predictions, gt_box=args.box)
    fig.savefig(args.out, dpi=120)
    record = {
        "checkpoint": str(args.checkpoint),
        "variant": variant,
        "image": str(args.image),
        "image_size": [int(image.shape[0]), int(image.shape[1])],
        "predictions": [
            {
                "expression": p["expression"],
                "box": None if p["box"] is None else [round(float(v), 2) for v in p["box"]],
                "box_norm": None if p["box_norm"] is None else [round(float(v), 5) for v in p["box_norm"]],
                "score": float(p["score"]),
                "mask_area": int(np.count_nonzero(p["mask"])),
                "mask_rle": encode_mask_rle(p["mask"]),
                "unknown_words": unknown_words(model.tokenizer, p["expression"]),
            }
            for p in predictions
        ],
    }
    json_path_for(args.out).write_text(json.dumps(record, indent=2))
    return record


def run(args: argparse.Namespace) -> int:
    """Entry point of `ppcr predict`: 0 on success, 2 (one line on stderr) on bad input."""
    try:
        record = predict_image(args)
    except PredictError as err:
        print(f"ppcr predict: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    for p in record["predictions"]:
        if p["unknown_words"]:
            print(f"ppcr predict: warning: {p['expression']!r}: {unknown_words_warning(p['unknown_words'])}",
                  file=sys.stderr)
        box = "none" if p["box"] is None else "[" + ", ".join(f"{v:.1f}" for v in p["box"]) + "]"
        print(f"{p['expression']!r}: box {box} score {p['score']:.3f}")
    print(f"wrote {args.out} and {json_path_for(args.out)}")
    return 0
