"""The README's headline table: the paper's val mIoU beside this build's, regenerated from a study's results.

    study = load_study("runs/demo")
    headline_table(study)             # one row per benchmark suite's val split (synref / synref+ / synrefg)
    headline_markdown(study)          # the table and its caption, as the README shows them

    python -m ppcr.report.headline runs/demo                      # print the markdown
    python -m ppcr.report.headline runs/demo --readme README.md   # replace the README's generated block

The block of the README lies between `<!-- headline:start -->` and `<!-- headline:end -->`; everything between
the markers is replaced, the rest of the file is kept byte for byte. Without the markers the command exits with
status 2 and a one-line message, leaving the file untouched.

The paper's numbers are its Table 1 (RefCOCO / RefCOCO+ / RefCOCOg, from `ppcr/resources/ppcr_paper_tables.csv`)
and are always labelled as the paper's; the reproduced ones are mean ± std over the study's seeds. At the small
profiles a row's reproduced cells are SynRef results of a small model, never RefCOCO numbers, and the caption
says so.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

from ppcr.report.paths import display_path
from ppcr.report.status import study_date
from ppcr.report.study import Study, load_study
from ppcr.report.tables import (PAPER_DATASET_LABELS, PAPER_DATASETS, SPLIT_LABELS, SYNREF_OF, Column, Table, cell,
                                paper_tables, study_key, to_markdown)

START = "<!-- headline:start -->"
END = "<!-- headline:end -->"

# the reproduced columns, in the order shown; the paper's Table 1 has PPCR and GLaMM (no oracle)
REPRODUCED = ("ppcr", "glamm", "gt_box_oracle")
PAPER_METHODS = {"ppcr": "PPCR", "glamm": "GLaMM"}
# each benchmark's val split as the paper names it (RefCOCOg: the umd split's val, "Val(U)")
VAL_SPLIT = {"refcoco": "val", "refcoco+": "val", "refcocog": "val(U)"}


def paper_miou(method: str, dataset: str, split: str) -> float | None:
    """The paper's Table 1 mIoU of `method` ("PPCR" / "GLaMM") on one RefCOCO-family split, as printed."""
    for r in paper_tables():
        if (r["table"], r["variant"], r["dataset"], r["metric"], r["split"]) == ("table1", method, dataset, "mIoU",
                                                                                 split):
            return r["value"]
    return None


def _evaluated(study: Study, key: str) -> set[int]:
    """The numbers of expressions the headline variants were evaluated on for one "dataset/split" (one per file)."""
    return {int(res["metrics"][key]["n"]) for v in REPRODUCED for res in study.results.get(v, {}).values()
            if "n" in res.get("metrics", {}).get(key, {})}


def _split_label(study: Study, dataset: str, key: str) -> str:
    paper = f"{PAPER_DATASET_LABELS[dataset]} {SPLIT_LABELS[VAL_SPLIT[dataset]]}"
    return f"{key.replace('/', ' ')} (~ {paper})" if study.is_synthetic else paper


def headline_rows(study: Study) -> list[dict[str, Any]]:
    """One row per benchmark the study evaluated (its val split): the paper's PPCR and GLaMM mIoU and this
    study's ppcr, glamm and gt_box_oracle mIoU (MeanStd over seeds; None where a variant is missing)."""
    rows = []
    for dataset in PAPER_DATASETS:
        key = study_key(study, dataset, VAL_SPLIT[dataset])
        if key not in study.keys:
            continue
        row: dict[str, Any] = {"split": _split_label(study, dataset, key), "key": key,
                               "evaluated": sorted(_evaluated(study, key))}
        for variant, method in PAPER_METHODS.items():
            row[f"paper_{variant}"] = paper_miou(method, dataset, VAL_SPLIT[dataset])
        for variant in REPRODUCED:
            row[variant] = cell(study, variant, key, "mIoU")
        rows.append(row)
    return rows


def _evaluated_text(rows: list[dict[str, Any]]) -> str:
    counts = {n for r in rows for n in r["evaluated"]}
    if len(counts) == 1:
        return f"{counts.pop():,} evaluated expressions per split"
    return "evaluated expressions: " + ", ".join(
        f"{r['key']} {'/'.join(f'{n:,}' for n in r['evaluated']) or '?'}" for r in rows)


def headline_caption(study: Study, rows: list[dict[str, Any]]) -> str:
    """What the reproduced cells are: profile, preset, seeds, evaluated expressions, study date, and their scale (the
    commit that made them is lab-note history: `notes/history.md` records it beside the README's timings)."""
    seeds = study.seeds
    spread = f"mean \u00b1 std over seeds {seeds}" if len(seeds) > 1 else f"one seed ({seeds[0] if seeds else '?'})"
    text = (f"mIoU in %. Paper: the paper's Table 1 (LLaVA-7B, RefCOCO / RefCOCO+ / RefCOCOg val), as printed. "
            f"Reproduced: profile `{study.profile}`, preset `{study.preset}`, {spread}, {_evaluated_text(rows)}, "
            f"study of {study_date(study)}; `gt_box_oracle` is the ppcr checkpoint given "
            "the ground-truth box (the paper's Table 3 oracle). ")
    if study.is_synthetic:
        version = f", generator {study.synref_version}" if study.synref_version else ""
        text += (f"The reproduced rows are SynRef results (the project's synthetic benchmark{version}; synref, "
                 "synref+ and synrefg stand in for RefCOCO, RefCOCO+ and RefCOCOg) of a small model: SynRef numbers "
                 "are not RefCOCO numbers, compare the order of the variants, not the values. ")
    else:
        text += "Both sides are RefCOCO-family numbers. "
    text += f"Made by `python -m ppcr.report.headline {display_path(study.run_dir)}`."
    return text


def headline_table(study: Study) -> Table:
    """The headline `Table`: per benchmark's val split, the paper's mIoU beside this study's."""
    rows = headline_rows(study)
    columns = [Column("split", "val split"), Column("paper_ppcr", "paper PPCR"), Column("paper_glamm", "paper GLaMM")]
    columns += [Column(v, f"reproduced {v}") for v in REPRODUCED]
    return Table(title="", columns=columns, rows=rows, caption=headline_caption(study, rows), digits=2)


def headline_markdown(study: Study) -> str:
    """The table and its caption in GitHub markdown (no absolute path of the machine that made it)."""
    return to_markdown(headline_table(study))


def replace_block(text: str, block: str) -> str:
    """`text` with everything between the headline markers replaced by `block`; ValueError without the markers."""
    start, end = text.find(START), text.find(END)
    if start < 0 or end < 0 or end < start:
        raise ValueError(f"no '{START}' ... '{END}' block")
    return text[: start + len(START)] + "\n" + block.strip("\n") + "\n" + text[end:]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ppcr.report.headline", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a study's folder (the one holding study.json)")
    parser.add_argument("--readme", type=Path, help="replace the headline block of this markdown file")
    args = parser.parse_args(argv)
    block = headline_markdown(load_study(args.run_dir))
    print(block)
    if args.readme is not None:
        try:
            text = args.readme.read_text(encoding="utf-8")
            updated = replace_block(text, block)
        except (OSError, ValueError) as err:
            print(f"headline: {args.readme}: {err}", file=sys.stderr)
            return 2
        if updated != text:
            args.readme.write_text(updated, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
