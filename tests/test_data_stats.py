"""What a benchmark asks of a model (`ppcr.data.stats`), on the tiny REFER fixture by hand and on a SynRef suite."""

from __future__ import annotations

import numpy as np
import pytest

from ppcr.data.stats import dataset_stats, main, padded_box, snapped_iou


def test_padding_and_snapping_by_hand():
    # a 100 x 200 (H x W) image pads to 200 x 200 with 50 rows above: box (0, 0, 100, 50) -> y from 50 to 100
    np.testing.assert_allclose(padded_box(np.array([0, 0, 100, 50]), 100, 200), [0, 0.25, 0.5, 0.5])
    assert snapped_iou(np.array([0.0, 0.0, 0.5, 0.5]), 8) == pytest.approx(1.0)  # on the grid lines
    # a box of half a token: snapped to one whole token, IoU 0.5
    assert snapped_iou(np.array([0.0, 0.0, 1 / 16, 1 / 8]), 8) == pytest.approx(0.5)


def test_stats_of_the_tiny_refer_fixture(tiny_refer):
    stats = dataset_stats(tiny_refer.root, "refcoco", "unc", grid=8)
    assert stats["refs"] == 5 and stats["images"] == 3 and stats["sentences"] == 7
    assert stats["objects_per_image"] == pytest.approx((2 + 2 + 2 + 2 + 1) / 5)
    # ann 101 and 102 are both category 1 on image 1; 103 and 104 category 2 on image 2; 105 alone
    assert stats["distractors_mean"] == pytest.approx(4 / 5)
    assert stats["occluded_percent"] == 100.0  # only ref 1 records its visibility: 80 % visible
    assert stats["expr_types"] == {"attribute": 50.0, "spatial": 50.0}


def test_the_command_prints_the_figures_and_refuses_a_missing_dataset(tiny_refer, tmp_path, capsys):
    assert main(["--root", str(tiny_refer.root), "--dataset", "refcoco", "--split-by", "unc", "--split", "val"]) == 0
    assert '"refs": 1' in capsys.readouterr().out
    assert main(["--root", str(tmp_path), "--dataset", "refcoco", "--split-by", "unc"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("python -m ppcr.data.stats: error:") and "\n" not in err
