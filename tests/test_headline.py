"""The README's headline table (`python -m ppcr.report.headline`) on a smoke study: its rows, the paper's figures
beside the reproduced ones, the README block it replaces, and the exit status without the markers."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from ppcr import report
from ppcr.data.synref import GENERATOR_VERSION
from ppcr.report.headline import END, START, headline_markdown, headline_table, main, replace_block
from ppcr.report.tables import MeanStd

REPO = Path(__file__).resolve().parents[1]


def test_one_row_per_suite_val_split_with_the_papers_figures(study: report.Study) -> None:
    table = headline_table(study)
    assert [r["key"] for r in table.rows] == ["synref/val", "synref+/val", "synrefg/val"]
    assert [r["split"] for r in table.rows] == ["synref val (~ RefCOCO Val)", "synref+ val (~ RefCOCO+ Val)",
                                                "synrefg val (~ RefCOCOg Val(U))"]
    # the paper's Table 1 mIoU, as printed (PPCR, then GLaMM)
    assert [(r["paper_ppcr"], r["paper_glamm"]) for r in table.rows] == [(81.1, 80.76), (74.34, 73.76),
                                                                         (75.94, 75.11)]
    assert table.column_keys() == ["split", "paper_ppcr", "paper_glamm", "ppcr", "glamm", "gt_box_oracle"]


def test_reproduced_cells_are_the_results_files_mean_over_seeds(study: report.Study) -> None:
    for row in headline_table(study).rows:
        for variant in ("ppcr", "glamm", "gt_box_oracle"):
            value = row[variant]
            assert isinstance(value, MeanStd) and value.n == len(study.seeds) == 1
            expected = study.results[variant][0]["metrics"][row["key"]]["mIoU"]
            assert math.isclose(value.mean, expected)
        assert row["evaluated"] == [8]  # the smoke profile's eval_max_expressions


def test_caption_states_the_scale_and_leaks_no_machine_path(study: report.Study) -> None:
    text = headline_markdown(study)
    caption = text.splitlines()[-1]
    for needed in ("profile `smoke`", "preset `tiny`", "one seed (0)", "8 evaluated expressions per split",
                   "not RefCOCO numbers", "paper's Table 1",
                   "python -m ppcr.report.headline .../smoke_study", f"generator {GENERATOR_VERSION}"):
        assert needed in caption, needed
    assert str(study.run_dir) not in text and str(Path.home()) not in text
    assert study.commit not in text  # a commit is lab-note history, not what a README reader needs
    header = text.splitlines()[0]
    assert header == ("| val split | paper PPCR | paper GLaMM | reproduced ppcr | reproduced glamm | "
                      "reproduced gt_box_oracle |")
    assert "| 81.10 | 80.76 |" in text.splitlines()[2]


def test_readme_block_is_replaced_and_the_rest_kept(smoke_study_run: Path, study: report.Study, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    readme = tmp_path / "README.md"
    before, after = "# Title\n\nintro\n\n", "\n\n## Next\n\ntext\n"
    readme.write_text(f"{before}{START}\nstale table\n{END}{after}")
    assert main([str(smoke_study_run), "--readme", str(readme)]) == 0
    text = readme.read_text()
    block = headline_markdown(study)
    assert text == f"{before}{START}\n{block}\n{END}{after}"
    assert "stale table" not in text
    assert capsys.readouterr().out.strip() == block.strip()
    # idempotent: a second run leaves the file as it is
    assert main([str(smoke_study_run), "--readme", str(readme)]) == 0
    assert readme.read_text() == text


@pytest.mark.parametrize("body", ["no markers at all\n", f"only the start {START}\n", f"{END} before {START}\n"])
def test_missing_markers_exit_2_with_one_line(smoke_study_run: Path, tmp_path: Path, body: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(body)
    assert main([str(smoke_study_run), "--readme", str(readme)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "headline" in err
    assert readme.read_text() == body  # untouched


def test_replace_block_alone() -> None:
    assert replace_block(f"a{START}old{END}b", "new") == f"a{START}\nnew\n{END}b"
    with pytest.raises(ValueError):
        replace_block("a", "new")


def test_the_repository_readme_has_the_markers() -> None:
    text = (REPO / "README.md").read_text()
    assert text.count(START) == 1 and text.count(END) == 1 and text.index(START) < text.index(END)
