"""Tests of the REFER reader: refs, splits, masks, boxes, safe pickle loading, errors."""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from ppcr.data.refer import (
    ImageLoadError,
    Refer,
    UnsafePickleError,
    add_arguments,
    convert_refs_to_json,
    load_image,
    restricted_load_pickle,
    run,
)


def test_refs_and_splits(tiny_refer):
    refer = Refer(tiny_refer.root, "refcoco", "unc")
    assert refer.refs_file.suffix == ".p"
    assert len(refer.refs) == 5
    assert refer.splits == ["train", "val", "testA", "testB"]
    assert refer.ref_ids() == [1, 2, 3, 4, 5]
    assert refer.ref_ids("train") == [1, 2]
    assert refer.ref_ids("testB") == [5]
    ref = refer.ref(1)
    assert ref["sentences"][1]["sent"] == "upper dog"
    assert ref["expr_types"] == ["spatial", "attribute"]  # extra keys kept
    assert refer.ann(101)["image_id"] == 1
    assert refer.image_info(3)["height"] == 200
    assert refer.image_path(1) == tiny_refer.root / "images/mscoco/images/train2014/img1.png"


def test_masks_and_boxes(tiny_refer):
    refer = Refer(tiny_refer.root, "refcoco", "unc")
    for ref in refer.refs:
        m = refer.mask(ref)
        assert m.dtype == np.uint8
        assert m.shape == tiny_refer.image_sizes[ref["image_id"]]
        assert set(np.unique(m)) <= {0, 1}
        assert int(m.sum()) == tiny_refer.mask_pixels[ref["ann_id"]], ref["ann_id"]
    # rectangle polygon: columns 2..11, rows 3..7
    m = refer.mask(refer.ann(101))
    assert m[3:8, 2:12].all() and m.sum() == 50
    # two overlapping polygons merged and clipped to {0,1}
    m = refer.mask(2)
    assert m.max() == 1 and m[15:20, 5:10].all()
    # uncompressed RLE is column-major: column 2, rows 2..7
    assert np.argwhere(refer.mask(3)).tolist() == [[r, 2] for r in range(2, 8)]
    box = refer.box_xyxy(refer.ref(2))
    assert box.dtype == np.float32
    np.testing.assert_array_equal(box, [0, 10, 15, 20])


def test_convert_to_json_and_prefer_it(tiny_refer):
    out = convert_refs_to_json(tiny_refer.root, "refcoco", "unc")
    assert out == tiny_refer.root / "refcoco" / "refs(unc).json"
    refs = json.loads(out.read_text())
    assert refs == Refer(tiny_refer.root, "refcoco", "unc").refs
    # the reader prefers the json: edit it and see the change
    refs[0]["sentences"][0]["sent"] = "edited"
    out.write_text(json.dumps(refs))
    refer = Refer(tiny_refer.root, "refcoco", "unc")
    assert refer.refs_file == out
    assert refer.ref(1)["sentences"][0]["sent"] == "edited"


def test_cli_run(tiny_refer, capsys):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert run(parser.parse_args(["--root", str(tiny_refer.root), "--dataset", "refcoco"])) == 0
    assert (tiny_refer.root / "refcoco" / "refs(unc).json").is_file()
    assert "refs(unc).json" in capsys.readouterr().out
    # errors are reported, not raised
    assert run(parser.parse_args(["--root", str(tiny_refer.root), "--dataset", "refcoco", "--split-by", "umd"])) == 1
    assert "splitBy 'umd'" in capsys.readouterr().err
    assert run(parser.parse_args(["--root", str(tiny_refer.root), "--dataset", "refcocog"])) == 1


def test_python2_style_strings_are_decoded(tmp_path):
    # PROTO 2, EMPTY_DICT, SHORT_BINSTRING 'sent', SHORT_BINSTRING 'caf\xc3\xa9' (utf-8), SETITEM, STOP
    path = tmp_path / "py2.p"
    path.write_bytes(b"\x80\x02}U\x04sentU\x05caf\xc3\xa9s.")
    assert restricted_load_pickle(path) == {"sent": "café"}
    # Python 3 writes bytes at protocol 2 through _codecs.encode: admitted, restricted to text
    with open(path, "wb") as f:
        pickle.dump([{"sent": b"dog", "ids": (1, 2)}], f, protocol=2)
    assert restricted_load_pickle(path) == [{"sent": "dog", "ids": [1, 2]}]


class _SystemCall:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"echo pwned > {self.marker}",))


class _EvalCall:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (eval, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


@pytest.mark.parametrize(
    "payload_cls, protocol, refused",
    [
        (_SystemCall, 2, ".system'"),  # posix.system / os.system
        (_EvalCall, 2, "'__builtin__.eval'"),  # protocol 2 spells builtins the Python 2 way
        (_EvalCall, 4, "'builtins.eval'"),
    ],
)
def test_malicious_pickle_is_refused(tiny_refer, payload_cls, protocol, refused):
    marker = tiny_refer.root / "pwned.txt"
    path = tiny_refer.root / "refcoco" / "refs(unc).p"
    with open(path, "wb") as f:
        pickle.dump([{"ref_id": 1, "evil": payload_cls(marker)}], f, protocol=protocol)
    with pytest.raises(UnsafePickleError) as err:
        restricted_load_pickle(path)
    assert refused in str(err.value) and str(path) in str(err.value)
    with pytest.raises(UnsafePickleError):
        Refer(tiny_refer.root, "refcoco", "unc")
    with pytest.raises(UnsafePickleError):
        convert_refs_to_json(tiny_refer.root, "refcoco", "unc")
    assert not marker.exists()


def test_codecs_encode_cannot_be_abused(tmp_path):
    # _codecs.encode is admitted only for str -> bytes with a text encoding
    path = tmp_path / "codec.p"
    # PROTO 2, GLOBAL _codecs encode, SHORT_BINUNICODE 'x', SHORT_BINUNICODE 'rot13', TUPLE2, REDUCE, STOP
    path.write_bytes(b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00xX\x05\x00\x00\x00rot13\x86R.")
    with pytest.raises(UnsafePickleError):
        restricted_load_pickle(path)


def test_missing_paths_give_clear_errors(tiny_refer, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"refcoco\+.*ppcr synth"):
        Refer(tiny_refer.root, "refcoco+", "unc")
    # dataset folder present, refs file of this splitBy missing
    shutil.copytree(tiny_refer.root / "refcoco", tiny_refer.root / "refcocog")
    with pytest.raises(FileNotFoundError, match=r"refs\(umd\)\.json.*refs\(umd\)\.p"):
        Refer(tiny_refer.root, "refcocog", "umd")
    (tiny_refer.root / "refcoco" / "instances.json").unlink()
    with pytest.raises(FileNotFoundError, match="instances.json"):
        Refer(tiny_refer.root, "refcoco", "unc")
    with pytest.raises(ValueError, match="splitBy"):
        Refer(tiny_refer.root, "refcoco+", "umd")


def test_bad_split(tiny_refer):
    refer = Refer(tiny_refer.root, "refcoco", "unc")
    with pytest.raises(ValueError, match=r"'test'.*testA"):
        refer.ref_ids("test")


def test_load_image(tiny_refer, tmp_path):
    img_dir = tiny_refer.root / "images/mscoco/images/train2014"
    gray = load_image(img_dir / "img2.png")
    assert gray.shape == (16, 16, 3) and gray.dtype == np.uint8
    assert (gray[..., 0] == gray[..., 1]).all()
    # truncated: half the bytes of a valid JPEG
    data = (img_dir / "img3.jpg").read_bytes()
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError, match="truncated.jpg"):
        load_image(truncated)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"not an image at all")
    with pytest.raises(ImageLoadError, match="corrupt.png"):
        load_image(corrupt)
    with pytest.raises(ImageLoadError, match="missing.png"):
        load_image(tmp_path / "missing.png")
