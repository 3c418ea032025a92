"""SynRef: a procedurally generated referring-segmentation benchmark in the REFER layout.

Three suites mirror RefCOCO (``synref``: short attribute + absolute-location expressions),
RefCOCO+ (``synref+``: attributes only, many same-shape distractors) and RefCOCOg
(``synrefg``: long relational expressions). Output, exactly like REFER/RefCOCO::

    <out>/images/mscoco/images/train2014/SYNREF_<suite>_<image_id:012d>.jpg
    <out>/<suite>/instances.json        COCO images / annotations (visible-mask RLE) / categories
    <out>/<suite>/refs(unc).json        synref, synref+: train / val / testA / testB
    <out>/<suite>/refs(umd).json        synrefg: train / val / test
    <out>/<suite>/refs(google).json     synrefg: the same refs, train / val
    <out>/<suite>/refs(<splitBy>).p     the same refs as a pickle (protocol 2), the file REFER's own refer.py (as
                                        LISA and GLaMM ship it) reads, e.g. with the suite's folder named refcoco
    <out>/<suite>/stats.json            counts and mean sentence length per split
    <out>/<suite>/generator_config.json parameters + generator version (the cache key)

Every image is generated from its own RNG seeded by (seed, suite, image index), so the output
is byte-identical for a seed whatever the number of worker processes. Every kept sentence is
parsed back by :func:`ppcr.data.synref_language.resolve` and refers to exactly its target.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import math
import multiprocessing
import pickle
import sys
import time
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Sequence

import numpy as np
from pycocotools import mask as mask_utils
from tqdm import tqdm

from ppcr.data.synref_language import (
    FAMILY_OF,
    SHAPES,
    Expression,
    MatchCache,
    SceneObject,
    attribute_expressions,
    location_expressions,
    relation_expressions,
    render,
    resolve,
    resolve_objects,
    scene_objects,
    vocabulary,
)
from ppcr.data.synref_scene import SceneObjectSpec, encode_jpeg, place_objects, render_image, sample_attributes

__all__ = ["generate_suite", "resolve", "vocabulary", "add_arguments", "run", "SUITES", "GENERATOR_VERSION"]

GENERATOR_VERSION = "synref-2.0"  # 2.0: objects twice the size (synref_scene.RADIUS)
SUITES: tuple[str, ...] = ("synref", "synref+", "synrefg")
SUITE_NUMBER: dict[str, int] = {s: i + 1 for i, s in enumerate(SUITES)}
IMAGE_ID_STRIDE = 10_000_000  # image_id = suite number * stride + image index
IMAGE_DIR = Path("images", "mscoco", "images", "train2014")
SPLITS: dict[str, tuple[tuple[str, float], ...]] = {
    "unc": (("train", 0.7), ("val", 0.1), ("testA", 0.1), ("testB", 0.1)),
    "umd": (("train", 0.8), ("val", 0.1), ("test", 0.1)),
    "google": (("train", 0.85), ("val", 0.15)),
}
SPLIT_BYS: dict[str, tuple[str, ...]] = {"synref": ("unc",), "synref+": ("unc",), "synrefg": ("umd", "google")}
TEST_FAMILY: dict[str, str] = {"testA": "round", "testB": "angular"}
CATEGORY_ID: dict[str, int] = {s: i + 1 for i, s in enumerate(SHAPES)}
MIN_WORDS_G = 8  # synrefg prefers sentences at least this long


class ImageTask(NamedTuple):
    """Everything a worker needs to generate image ``index`` of a suite."""

    suite: str
    seed: int
    index: int
    image_size: int
    blur_fraction: float
    low_contrast_fraction: float


# --------------------------------------------------------------------------- one image


def _draw_split(rng: np.random.Generator, split_by: str, index: int) -> str:
    """The split of image `index`: the first images cover every split (rarest first), so even a small suite has
    all of them; the rest are drawn with the split proportions."""
    names, probs = zip(*SPLITS[split_by])
    drawn = names[int(rng.choice(len(names), p=np.asarray(probs)))]
    return names[len(names) - 1 - index] if index < len(names) else drawn


def _sentences(target: int, objs: Sequence[SceneObject], suite: str, rng: np.random.Generator,
               n: int, cache: MatchCache) -> list[tuple[str, str]]:
    """Up to ``n`` distinct (sentence, expression type) pairs that resolve to exactly ``target``."""
    pools: dict[str, list[Expression]]
    if suite == "synrefg":
        pools, article = {"relation": relation_expressions(target, objs, rng, cache=cache)}, 1.0
    elif suite == "synref+":
        pools, article = {"attribute": attribute_expressions(target, objs, extra=1, cache=cache)}, 0.25
    else:
        pools = {"attribute": attribute_expressions(target, objs, extra=1, cache=cache),
                 "location": location_expressions(target, objs, cache=cache)}
        article = 0.3
    kinds = [k for k, pool in pools.items() if pool]
    out: list[tuple[str, str]] = []
    for _ in range(6 * n):
        if len(out) >= n or not kinds:
            break
        kind = "location" if "location" in kinds and rng.random() < 0.55 else kinds[0]
        expr = pools[kind][int(rng.integers(len(pools[kind])))]
        text = render(expr, rng, article_prob=article)
        if suite == "synrefg" and len(text.split()) < MIN_WORDS_G and rng.random() < 0.8:
            continue
        if all(text != t for t, _ in out) and resolve_objects(text, objs) == [target]:
            out.append((text, kind))
    return out


def _annotation(obj: SceneObjectSpec, depth: int, image_id: int) -> dict[str, Any]:
    """COCO annotation of the visible mask, with the ``synref`` metadata."""
    assert obj.visible is not None
    rle = mask_utils.encode(np.asfortranarray(obj.visible.astype(np.uint8)))
    area = float(mask_utils.area(rle))
    bbox = [float(v) for v in mask_utils.toBbox(rle)]
    rle["counts"] = rle["counts"].decode("utf-8")
    visible_fraction = round(float(obj.visible.sum()) / float(obj.full.sum()), 4)
    return {
        "id": image_id * 100 + depth, "image_id": image_id, "category_id": CATEGORY_ID[obj.shape],
        "segmentation": rle, "area": area, "bbox": bbox, "iscrowd": 0,
        "synref": {"shape": obj.shape, "color": obj.color, "size": obj.size, "pattern": obj.pattern,
                   "center": [obj.cx, obj.cy], "box": obj.box, "depth": depth,
                   "visible_fraction": visible_fraction},
    }


def _make_image(task: ImageTask) -> dict[str, Any]:
    """Generate one image: JPEG bytes, COCO records and its refs (without global ids)."""
    rng = np.random.default_rng(np.random.SeedSequence([task.seed, SUITE_NUMBER[task.suite], task.index]))
    splits = {sb: _draw_split(rng, sb, task.index) for sb in SPLIT_BYS[task.suite]}
    family = TEST_FAMILY.get(splits.get("unc", ""))
    blurred = bool(rng.random() < task.blur_fraction)
    low_contrast = bool(rng.random() < task.low_contrast_fraction)
    objects = place_objects(rng, sample_attributes(rng, task.suite, family), task.image_size)
    pixels = render_image(rng, objects, task.image_size, blurred, low_contrast)
    image_id = SUITE_NUMBER[task.suite] * IMAGE_ID_STRIDE + task.index
    file_name = f"SYNREF_{task.suite}_{image_id:012d}.jpg"
    anns = [_annotation(o, depth, image_id) for depth, o in enumerate(objects)]
    objs = scene_objects(anns)
    eligible = [i for i, o in enumerate(objs) if family is None or FAMILY_OF[o.shape] == family]
    n_targets = int(rng.integers(2, 5))
    refs, cache = [], {}
    for i in rng.permutation(eligible):
        if len(refs) >= n_targets:
            break
        sentences = _sentences(int(i), objs, task.suite, rng, n=int(rng.integers(2, 4)), cache=cache)
        if not sentences:
            continue
        refs.append({
            "ann_id": anns[i]["id"], "category_id": anns[i]["category_id"], "sentences": sentences,
            "distractors_same_category": sum(o.shape == objs[i].shape for o in objs) - 1,
            "visible_fraction": anns[i]["synref"]["visible_fraction"],
            "blurred": blurred, "low_contrast": low_contrast,
        })
    image = {"id": image_id, "file_name": file_name, "height": task.image_size, "width": task.image_size}
    return {"image": image, "annotations": anns, "refs": refs, "splits": splits,
            "jpeg": encode_jpeg(pixels)}


# --------------------------------------------------------------------------- a suite


def _collect(suite: str, n_refs: int, task_args: dict[str, Any], workers: int, image_dir: Path,
             progress: bool) -> list[dict[str, Any]]:
    """Generate images in index order until ``n_refs`` refs exist; write their JPEGs.

    Each batch's stream is read to its end (images past ``n_refs`` are dropped) and the pool is closed, not
    terminated: terminating a pool whose task feeder is still blocked on a full queue can hang for good (it did,
    once, in the test suite)."""
    results: list[dict[str, Any]] = []
    total, start = 0, 0
    pool = multiprocessing.get_context().Pool(workers) if workers > 1 else None
    try:
        with tqdm(total=n_refs, desc=suite, unit="ref", disable=not progress) as bar:
            while total < n_refs:
                batch = min(2048, math.ceil((n_refs - total) / 2.5) + 2 * workers)
                tasks = [ImageTask(suite=suite, index=i, **task_args) for i in range(start, start + batch)]
                start += batch
                stream = pool.imap(_make_image, tasks, chunksize=4) if pool else map(_make_image, tasks)
                for res in stream:
                    res["refs"] = res["refs"][: n_refs - total]
                    if not res["refs"]:  # an image without refs, or one past n_refs
                        continue
                    (image_dir / res["image"]["file_name"]).write_bytes(res.pop("jpeg"))
                    results.append(res)
                    total += len(res["refs"])
                    bar.update(len(res["refs"]))
    except BaseException:
        if pool is not None:
            pool.terminate()
            pool.join()
        raise
    if pool is not None:
        pool.close()
        pool.join()
    return results


def _sentence_record(text: str, sent_id: int, capitalise: bool) -> dict[str, Any]:
    raw = text[0].upper() + text[1:] if capitalise else text
    return {"tokens": text.split(), "raw": raw, "sent_id": sent_id, "sent": text}


def _build_refs(results: list[dict[str, Any]], split_by: str) -> list[dict[str, Any]]:
    """REFER refs for one splitBy; ids are sequential in generation order."""
    refs, ref_id, sent_id = [], 0, 0
    for res in results:
        for r in res["refs"]:
            sentences = []
            for text, _ in r["sentences"]:
                sentences.append(_sentence_record(text, sent_id, capitalise=(sent_id % 3 == 0)))
                sent_id += 1
            refs.append({
                "sent_ids": [s["sent_id"] for s in sentences], "file_name": res["image"]["file_name"],
                "ann_id": r["ann_id"], "ref_id": ref_id, "image_id": res["image"]["id"],
                "split": res["splits"][split_by], "sentences": sentences, "category_id": r["category_id"],
                "expr_types": [kind for _, kind in r["sentences"]],
                "distractors_same_category": r["distractors_same_category"],
                "visible_fraction": r["visible_fraction"], "blurred": r["blurred"], "low_contrast": r["low_contrast"],
            })
            ref_id += 1
    return refs


def _summary(refs: list[dict[str, Any]]) -> dict[str, Any]:
    sents = [s for r in refs for s in r["sentences"]]
    words = sum(len(s["tokens"]) for s in sents)
    return {"images": len({r["image_id"] for r in refs}), "refs": len(refs), "sentences": len(sents),
            "mean_words": round(words / max(len(sents), 1), 3)}


def compute_stats(suite: str, refs_by_split_by: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Counts and mean words per sentence, overall and per split, plus expression-type counts."""
    refs = next(iter(refs_by_split_by.values()))
    types: dict[str, int] = {"attribute": 0, "location": 0, "relation": 0}
    for r in refs:
        for kind in r["expr_types"]:
            types[kind] += 1
    splits = {sb: {name: _summary([r for r in rs if r["split"] == name]) for name, _ in SPLITS[sb]}
              for sb, rs in refs_by_split_by.items()}
    return {"suite": suite, "generator_version": GENERATOR_VERSION, **_summary(refs), "expr_types": types,
            "blurred_refs": sum(r["blurred"] for r in refs), "low_contrast_refs": sum(r["low_contrast"] for r in refs),
            "splits": splits}


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj), encoding="utf-8")
    tmp.replace(path)


def _write_pickle(path: Path, obj: Any) -> None:
    """As REFER's files are written: protocol 2, plain lists, dicts, strings and numbers only."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as f:
        pickle.dump(obj, f, protocol=2)
    tmp.replace(path)


def _is_cached(suite_dir: Path, image_dir: Path, config: dict[str, Any]) -> bool:
    """True when the suite was generated with ``config`` and all its files are present."""
    cfg = suite_dir / "generator_config.json"
    if not cfg.exists() or json.loads(cfg.read_text(encoding="utf-8")) != config:
        return False
    needed = ["instances.json", "stats.json"] + [f"refs({sb}).json" for sb in SPLIT_BYS[config["suite"]]]
    if not all((suite_dir / name).exists() for name in needed):
        return False
    images = json.loads((suite_dir / "instances.json").read_text(encoding="utf-8"))["images"]
    if not all((image_dir / im["file_name"]).exists() for im in images):
        return False
    for split_by in SPLIT_BYS[config["suite"]]:  # a suite from before the pickles: written from its JSON, in place
        pickled = suite_dir / f"refs({split_by}).p"
        if not pickled.exists():
            _write_pickle(pickled, json.loads((suite_dir / f"refs({split_by}).json").read_text(encoding="utf-8")))
    return True


class OldSynRefError(ValueError):
    """A folder holds SynRef made by another generator version: never overwritten or mixed with new data."""


def _refuse_other_version(suite_dir: Path) -> None:
    cfg = suite_dir / "generator_config.json"
    if not cfg.exists():
        return
    version = json.loads(cfg.read_text(encoding="utf-8")).get("generator_version")
    if version != GENERATOR_VERSION:
        raise OldSynRefError(
            f"{suite_dir} holds SynRef {version or 'from before versioning'}, made by older code (this code "
            f"generates {GENERATOR_VERSION}) and never mixed with it: give another output folder, or delete "
            f"{suite_dir.parent} (in a run folder delete the whole run folder: its stages and results were made on "
            "the old data), and run the same command again")


def generate_suite(suite: str, out: str | Path, n_refs: int, seed: int = 0, image_size: int = 256,
                   blur_fraction: float = 0.1, low_contrast_fraction: float = 0.1, workers: int = 2,
                   progress: bool = True) -> dict[str, Any]:
    """Generate one suite (or ``"all"``) under ``out`` in the REFER layout; return its stats.

    If ``<out>/<suite>/generator_config.json`` records the same parameters and version and all
    files exist, nothing is regenerated. For ``"all"`` returns ``{suite: stats}``.
    """
    if suite == "all":
        return {s: generate_suite(s, out, n_refs, seed, image_size, blur_fraction, low_contrast_fraction,
                                  workers, progress) for s in SUITES}
    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}; expected one of {SUITES} or 'all'")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with _locked(out / ".synref.lock"):  # two commands on one folder (e.g. stages 0 and 1 at once): one generates
        return _generate_suite(suite, out, n_refs, seed, image_size, blur_fraction, low_contrast_fraction, workers,
                               progress)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` (POSIX advisory lock) for as long as the block runs."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _generate_suite(suite: str, out: Path, n_refs: int, seed: int, image_size: int, blur_fraction: float,
                    low_contrast_fraction: float, workers: int, progress: bool) -> dict[str, Any]:
    suite_dir, image_dir = out / suite, out / IMAGE_DIR
    config = {"suite": suite, "n_refs": n_refs, "seed": seed, "image_size": image_size,
              "blur_fraction": blur_fraction, "low_contrast_fraction": low_contrast_fraction,
              "generator_version": GENERATOR_VERSION}
    if _is_cached(suite_dir, image_dir, config):
        return json.loads((suite_dir / "stats.json").read_text(encoding="utf-8"))
    _refuse_other_version(suite_dir)
    suite_dir.mkdir(parents=True, exist_ok=True)
    image_dir.mkdir(parents=True, exist_ok=True)
    (suite_dir / "generator_config.json").unlink(missing_ok=True)
    for stale in image_dir.glob(f"SYNREF_{suite}_*.jpg"):
        stale.unlink()
    task_args = {"seed": seed, "image_size": image_size, "blur_fraction": blur_fraction,
                 "low_contrast_fraction": low_contrast_fraction}
    results = _collect(suite, n_refs, task_args, max(1, workers), image_dir, progress)
    instances = {
        "images": [r["image"] for r in results],
        "annotations": [a for r in results for a in r["annotations"]],
        "categories": [{"id": CATEGORY_ID[s], "name": s, "supercategory": FAMILY_OF[s]} for s in SHAPES],
    }
    _write_json(suite_dir / "instances.json", instances)
    refs_by = {sb: _build_refs(results, sb) for sb in SPLIT_BYS[suite]}
    for sb, refs in refs_by.items():
        _write_json(suite_dir / f"refs({sb}).json", refs)
        _write_pickle(suite_dir / f"refs({sb}).p", refs)
    stats = compute_stats(suite, refs_by)
    _write_json(suite_dir / "stats.json", stats)
    _write_json(suite_dir / "generator_config.json", config)
    return stats


# --------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``ppcr synth``."""
    parser.add_argument("--suite", required=True, choices=[*SUITES, "all"], help="which suite to generate")
    parser.add_argument("--out", required=True, help="output root (REFER layout)")
    parser.add_argument("--refs", type=int, default=2000, help="number of refs per suite")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--blur-fraction", type=float, default=0.1, help="fraction of Gaussian-blurred images")
    parser.add_argument("--low-contrast-fraction", type=float, default=0.1, help="fraction of low-contrast images")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (output does not depend on it)")


def run(args: argparse.Namespace) -> int:
    """Entry point of ``ppcr synth``: generate the requested suite(s) and print a summary."""
    suites = SUITES if args.suite == "all" else (args.suite,)
    for suite in suites:
        t0 = time.perf_counter()
        stats = generate_suite(suite, args.out, args.refs, seed=args.seed, image_size=args.image_size,
                               blur_fraction=args.blur_fraction, low_contrast_fraction=args.low_contrast_fraction,
                               workers=args.workers, progress=sys.stderr.isatty())
        print(f"{suite}: {stats['images']} images, {stats['refs']} refs, {stats['sentences']} sentences, "
              f"{stats['mean_words']:.2f} words/sentence ({time.perf_counter() - t0:.1f}s) -> "
              f"{Path(args.out) / suite}")
    return 0
