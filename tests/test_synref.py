"""Tests of the SynRef generator (ppcr.data.synref): layout, determinism, uniqueness, language."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from ppcr.data.refer import restricted_load_pickle
from ppcr.data.synref import IMAGE_DIR, SPLIT_BYS, SPLITS, SUITES, generate_suite
from ppcr.data.synref_language import FAMILY_OF, resolve, vocabulary

N_REFS = 600
LOCATION_RELATION_WORDS = {
    "left", "right", "top", "bottom", "middle", "center", "centre", "above", "below", "under", "near",
    "nearest", "next", "between", "closest", "first", "second", "third", "upper", "lower", "leftmost",
    "rightmost", "topmost", "bottommost", "corner", "from", "of", "to",
}


def _load(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """All three suites, generated once into the same output root."""
    out = tmp_path_factory.mktemp("synref")
    for suite in SUITES:
        generate_suite(suite, out, N_REFS, seed=0, workers=2, progress=False)
    return out


def _refs(out: Path, suite: str) -> list[dict[str, Any]]:
    return _load(out / suite / f"refs({SPLIT_BYS[suite][0]}).json")


def _anns_by_image(out: Path, suite: str) -> dict[int, list[dict[str, Any]]]:
    by_image: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for ann in _load(out / suite / "instances.json")["annotations"]:
        by_image[ann["image_id"]].append(ann)
    return by_image


# --------------------------------------------------------------------------- resolver unit tests


def _obj(shape: str, color: str, cx: float, cy: float, r: float = 10, size: str = "medium",
         pattern: str = "solid") -> dict[str, Any]:
    return {"shape": shape, "color": color, "size": size, "pattern": pattern, "center": [cx, cy],
            "box": [cx - r, cy - r, cx + r, cy + r]}


def test_resolve_semantics() -> None:
    objs = [_obj("circle", "red", 30, 100), _obj("circle", "blue", 100, 100), _obj("circle", "red", 170, 100),
            _obj("square", "green", 100, 30, size="large"), _obj("star", "red", 100, 200, pattern="striped")]
    assert resolve("left circle", objs) == [0]
    assert resolve("the rightmost circle", objs) == [2]
    assert resolve("second circle from the left", objs) == [1]
    assert resolve("blue circle", objs) == [1]
    assert resolve("red circle", objs) == [0, 2]
    assert resolve("circle on the right", objs) == [2]
    assert resolve("the circle between the two red circles", objs) == [1]
    assert resolve("the circle that is below the big square", objs) == [0, 1, 2]
    assert resolve("the circle closest to the green square", objs) == [1]
    assert resolve("the red circle to the left of the blue circle", objs) == [0]
    assert resolve("stripy star", objs) == [4]
    assert resolve("top square", objs) == [3]  # a single candidate is trivially the topmost
    assert resolve("purple circle", objs) == []
    assert resolve("circle circle", objs) == []  # ungrammatical
    assert resolve("the red blue circle", objs) == []


def test_vocabulary_is_closed(out_dir: Path) -> None:
    vocab = set(vocabulary())
    assert {"left", "circle", "circles", "big", "large", "between", "the"} <= vocab
    for suite in SUITES:
        for ref in _refs(out_dir, suite):
            for s in ref["sentences"]:
                assert set(s["tokens"]) <= vocab, s["sent"]


# --------------------------------------------------------------------------- generated data


def test_every_sentence_refers_to_exactly_its_target(out_dir: Path) -> None:
    checked = 0
    for suite in SUITES:
        by_image = _anns_by_image(out_dir, suite)
        for ref in _refs(out_dir, suite):
            anns = by_image[ref["image_id"]]
            target = [i for i, a in enumerate(anns) if a["id"] == ref["ann_id"]]
            assert len(target) == 1
            for s in ref["sentences"]:
                assert resolve(s["sent"], anns) == target, (suite, s["sent"])
                assert resolve(s["raw"], anns) == target
                checked += 1
    assert checked >= 1500


def test_synref_plus_has_no_location_or_relation_words(out_dir: Path) -> None:
    for ref in _refs(out_dir, "synref+"):
        assert set(ref["expr_types"]) == {"attribute"}
        for s in ref["sentences"]:
            assert not set(s["tokens"]) & LOCATION_RELATION_WORDS, s["sent"]


def test_sentence_lengths_and_types(out_dir: Path) -> None:
    stats = {suite: _load(out_dir / suite / "stats.json") for suite in SUITES}
    assert 2.5 <= stats["synref"]["mean_words"] <= 5
    assert stats["synrefg"]["mean_words"] >= 8
    assert stats["synref"]["expr_types"]["location"] > 0 and stats["synref"]["expr_types"]["attribute"] > 0
    assert stats["synrefg"]["expr_types"]["relation"] == stats["synrefg"]["sentences"]
    for suite in SUITES:
        refs = _refs(out_dir, suite)
        words = [len(s["tokens"]) for r in refs for s in r["sentences"]]
        assert stats[suite]["refs"] == len(refs) == N_REFS
        assert stats[suite]["mean_words"] == pytest.approx(np.mean(words), abs=1e-3)


def test_refer_layout(out_dir: Path) -> None:
    image_dir = out_dir / IMAGE_DIR
    names = [p.name for p in image_dir.iterdir()]
    assert len(names) == len(set(names))
    for suite in SUITES:
        inst = _load(out_dir / suite / "instances.json")
        assert {c["supercategory"] for c in inst["categories"]} == {"round", "angular"}
        assert len(inst["categories"]) >= 8
        images = {im["id"]: im for im in inst["images"]}
        for im in images.values():
            assert im["file_name"].startswith(f"SYNREF_{suite}_")
            with Image.open(image_dir / im["file_name"]) as pil:
                assert pil.size == (im["width"], im["height"]) and pil.format == "JPEG"
        for ann in inst["annotations"][:300]:
            m = mask_utils.decode(ann["segmentation"])
            im = images[ann["image_id"]]
            assert m.shape == (im["height"], im["width"]) and m.any()
            ys, xs = np.nonzero(m)
            assert ann["bbox"] == [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1),
                                   float(ys.max() - ys.min() + 1)]
            assert ann["area"] == float(m.sum()) and ann["iscrowd"] == 0
            meta = ann["synref"]
            assert {"shape", "color", "size", "pattern", "center", "depth", "visible_fraction"} <= set(meta)
            assert 0.5 <= meta["visible_fraction"] <= 1
        anns = {a["id"]: a for a in inst["annotations"]}
        for split_by in SPLIT_BYS[suite]:
            refs = _load(out_dir / suite / f"refs({split_by}).json")
            assert {r["split"] for r in refs} == {name for name, _ in SPLITS[split_by]}
            split_of_image: dict[int, str] = {}
            for ref in refs:
                assert split_of_image.setdefault(ref["image_id"], ref["split"]) == ref["split"]
                ann = anns[ref["ann_id"]]
                assert ref["category_id"] == ann["category_id"] and ref["image_id"] == ann["image_id"]
                assert ref["file_name"] == images[ref["image_id"]]["file_name"]
                assert ref["sent_ids"] == [s["sent_id"] for s in ref["sentences"]]
                assert len(ref["expr_types"]) == len(ref["sentences"]) >= 1
                assert ref["distractors_same_category"] == sum(
                    a["synref"]["shape"] == ann["synref"]["shape"] for a in anns.values()
                    if a["image_id"] == ref["image_id"]) - 1
                assert ref["visible_fraction"] == ann["synref"]["visible_fraction"]
                assert isinstance(ref["blurred"], bool) and isinstance(ref["low_contrast"], bool)
                for s in ref["sentences"]:
                    assert s["sent"] == s["raw"].lower() and s["tokens"] == s["sent"].split()
                family = {"testA": "round", "testB": "angular"}.get(ref["split"])
                if family:
                    assert FAMILY_OF[ann["synref"]["shape"]] == family
    umd, google = (_load(out_dir / "synrefg" / f"refs({sb}).json") for sb in ("umd", "google"))
    assert [r["ann_id"] for r in umd] == [r["ann_id"] for r in google]
    assert [r["split"] for r in umd] != [r["split"] for r in google]


def _snapshot(out: Path, suite: str) -> dict[str, bytes]:
    files = {name: (out / suite / name).read_bytes() for name in ("instances.json", "refs(unc).json", "stats.json")}
    for im in _load(out / suite / "instances.json")["images"]:
        files[im["file_name"]] = (out / IMAGE_DIR / im["file_name"]).read_bytes()
    return files


def test_determinism_and_workers(tmp_path: Path) -> None:
    kwargs = {"n_refs": 60, "progress": False}
    generate_suite("synref", tmp_path / "a", seed=3, workers=1, **kwargs)
    generate_suite("synref", tmp_path / "b", seed=3, workers=2, **kwargs)
    generate_suite("synref", tmp_path / "c", seed=4, workers=2, **kwargs)
    a, b, c = (_snapshot(tmp_path / d, "synref") for d in "abc")
    assert a == b
    assert a["refs(unc).json"] != c["refs(unc).json"] and a["instances.json"] != c["instances.json"]
    name = next(n for n in a if n.endswith(".jpg"))
    pixels = [np.asarray(Image.open(tmp_path / d / IMAGE_DIR / name)) for d in "ac"]
    assert not np.array_equal(*pixels)


def test_cache_skips_identical_parameters(tmp_path: Path) -> None:
    generate_suite("synref+", tmp_path, 30, seed=1, progress=False)
    instances = tmp_path / "synref+" / "instances.json"
    stamp = instances.stat().st_mtime_ns
    generate_suite("synref+", tmp_path, 30, seed=1, progress=False)
    assert instances.stat().st_mtime_ns == stamp
    generate_suite("synref+", tmp_path, 30, seed=2, progress=False)
    assert instances.stat().st_mtime_ns != stamp
    config = _load(tmp_path / "synref+" / "generator_config.json")
    assert config["seed"] == 2 and "generator_version" in config
    names = {im["file_name"] for im in _load(instances)["images"]}
    assert {p.name for p in (tmp_path / IMAGE_DIR).iterdir()} == names  # stale images removed


def test_a_suite_without_the_pickle_gets_it_without_being_regenerated(tmp_path: Path) -> None:
    """A suite generated before SynRef wrote `refs(<splitBy>).p` is completed in place: a training process reading
    its images meanwhile never sees them deleted."""
    generate_suite("synrefg", tmp_path, 20, seed=1, progress=False)
    for name in ("refs(umd).p", "refs(google).p"):
        (tmp_path / "synrefg" / name).unlink()
    images = sorted((tmp_path / IMAGE_DIR).iterdir())
    stamps = {p.name: p.stat().st_mtime_ns for p in images}
    generate_suite("synrefg", tmp_path, 20, seed=1, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in sorted((tmp_path / IMAGE_DIR).iterdir())} == stamps
    for split_by in ("umd", "google"):
        assert restricted_load_pickle(tmp_path / "synrefg" / f"refs({split_by}).p") == _load(
            tmp_path / "synrefg" / f"refs({split_by}).json")


def test_cli_synth(tmp_path: Path) -> None:
    from ppcr.cli import main

    assert main(["synth", "--suite", "synref", "--out", str(tmp_path), "--refs", "50", "--seed", "1"]) == 0
    stats = _load(tmp_path / "synref" / "stats.json")
    assert stats["refs"] == 50 and (tmp_path / "synref" / "refs(unc).json").exists()


def test_data_of_another_generator_version_is_refused(tmp_path: Path) -> None:
    from ppcr.data.synref import GENERATOR_VERSION, OldSynRefError

    generate_suite("synref", tmp_path, 20, seed=1, workers=1, progress=False)
    cfg = tmp_path / "synref" / "generator_config.json"
    old = {**_load(cfg), "generator_version": "synref-1.1"}
    cfg.write_text(json.dumps(old))
    with pytest.raises(OldSynRefError, match=f"holds SynRef synref-1.1.*generates {GENERATOR_VERSION}"):
        generate_suite("synref", tmp_path, 20, seed=1, workers=1, progress=False)
    assert _load(cfg) == old  # nothing overwritten


def test_a_suite_reads_as_refcoco_through_refers_own_files(out_dir: Path, tmp_path: Path) -> None:
    """REFER's refer.py (the copy LISA and GLaMM ship) knows only the folder names refcoco / refcoco+ / refcocog, reads
    `refs(<splitBy>).p` (a plain pickle of built-in types) and `instances.json`, and indexes them as below; a SynRef
    suite placed under such a name reads that way, with the images under images/mscoco/images/train2014."""
    from ppcr.data.refer import Refer

    root = tmp_path / "refer"
    root.mkdir()
    (root / "refcocog").symlink_to(out_dir / "synrefg", target_is_directory=True)
    (root / "images").symlink_to(out_dir / "images", target_is_directory=True)
    for split_by in ("umd", "google"):
        # built-in types only: the restricted unpickler (which refuses anything else) reads what refer.py reads
        refs = restricted_load_pickle(root / "refcocog" / f"refs({split_by}).p")
        assert refs == _load(out_dir / "synrefg" / f"refs({split_by}).json")
        instances = _load(root / "refcocog" / "instances.json")
        anns = {a["id"]: a for a in instances["annotations"]}
        images = {im["id"]: im for im in instances["images"]}
        cats = {c["id"]: c["name"] for c in instances["categories"]}
        sents = {}
        for ref in refs:  # the fields refer.py's createIndex and getters read
            ann = anns[ref["ann_id"]]
            assert ann["image_id"] == ref["image_id"] and ref["category_id"] in cats
            assert len(ann["bbox"]) == 4 and ann["segmentation"]
            assert (root / "images/mscoco/images/train2014" / images[ref["image_id"]]["file_name"]).is_file()
            assert ref["split"] in {name for name, _ in SPLITS[split_by]}
            for sent in ref["sentences"]:
                assert {"sent_id", "tokens", "raw", "sent"} <= set(sent)
                sents[sent["sent_id"]] = sent
            assert ref["sent_ids"] == [s["sent_id"] for s in ref["sentences"]]
        assert len(sents) == sum(len(r["sentences"]) for r in refs)
    # the project's own reader on the pickle alone (no JSON beside it)
    alone = tmp_path / "alone" / "refcoco"
    alone.mkdir(parents=True)
    for name in ("instances.json", "refs(unc).p"):
        (alone / name).write_bytes((out_dir / "synref" / name).read_bytes())
    refer = Refer(alone.parent, "refcoco", "unc")
    assert refer.refs_file.suffix == ".p" and refer.refs == _refs(out_dir, "synref")


def test_two_commands_generating_one_folder_at_once_take_turns(tmp_path: Path) -> None:
    """Stages 0 and 1 of the foundation may start at once on one run folder: generation holds the folder's lock, so
    the second command waits for the first and finds the suite made, instead of deleting the images the first is
    writing (or a training process is reading)."""
    import fcntl
    import multiprocessing
    import time

    ctx = multiprocessing.get_context("spawn")
    with open(tmp_path / ".synref.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another command is generating
        proc = ctx.Process(target=generate_suite, args=("synref", tmp_path, 30),
                           kwargs={"seed": 2, "workers": 1, "progress": False})
        proc.start()
        time.sleep(8)
        assert proc.is_alive() and not (tmp_path / "synref").exists()  # it waits
        fcntl.flock(lock, fcntl.LOCK_UN)
    proc.join(timeout=300)
    assert proc.exitcode == 0 and len(_load(tmp_path / "synref" / "refs(unc).json")) == 30
