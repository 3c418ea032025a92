"""Everything the book's notebooks show, computed from a study's results files (the notebooks stay thin).

    study = load_study("runs/demo")           # study.json + every results/<variant>/seed<k>.json
    table1(study)                               # the paper's Table 1 beside the rows this run reproduces
    table2(study), table3(study), box_head_costs(study)
    seed_summary(study), bootstrap_gains(study), box_conditional_gains(study), prompt_probe_table(study),
    breakdown(study, "expr_type"), mechanism_table(study, "size"), completeness_table(study),
    failure_cases(study)
    provenance(study)                           # one markdown line: profile, preset, commit, device, command

Tables are `Table` objects (no pandas): rows are plain dicts, `to_html` / `to_markdown` render them and a notebook
shows one through its `_repr_html_`. Paper numbers come from `ppcr/resources/ppcr_paper_tables.csv` and are always
labelled "paper"; reproduced numbers come from the results files and are labelled with the run's profile.

Small profiles run on SynRef: `synref` stands in for RefCOCO (val/testA/testB), `synref+` for RefCOCO+ and
`synrefg` (umd val/test) for RefCOCOg Val(U)/Test(U). Those rows are results of a small model on a synthetic
benchmark, never RefCOCO numbers; every caption says so.

The code lies in one module per part, lowest first (a module imports only those above it); this package
re-exports their names, so `from ppcr import report; report.table1(study)` reads as before:

    study            Study, load_study (study.json and the results files, cached)
    tables           Table, Column, MeanStd, to_html / to_markdown; the paper's Tables 1-3 and the reproduced rows
    costs            box-head cost (Table 3's efficiency claim), training stages
    stats            seeds, paired bootstrap intervals, the paper's claims
    breakdowns       breakdowns by group, failure cases
    mechanism        the paper's mechanism: by target size, occlusion, ppcr's box right / wrong; mask completeness
    benchmark        what each evaluated dataset asks of the model, beside RefCOCO/+/g's published figures
    examples         figures' inputs (images, masks) for ppcr.viz
    provenance_line  provenance (named so that `report.provenance` stays the function)
    status           the front page's status block: what this build reproduced and what it did not
    notebook         small helpers for the notebooks' charts and sentences, the explorer glue
"""

from __future__ import annotations

from ppcr.report.study import _CACHE, METRICS, SMALL_PROFILES, Study, load_study
from ppcr.report.tables import (PAPER_DATASET_LABELS, PAPER_DATASETS, PAPER_SPLITS, SANITY_FIELDS, SPLIT_LABELS,
                                SYNREF_OF, TABLE1_VARIANTS, TABLE2_VARIANTS, TABLE3_VARIANTS, TABLE_STYLE,
                                VARIANT_LABELS, Column, MeanStd, Table, box_fill_inter_union, cell, column_key,
                                fill_gt_cell, fill_pred_cell, format_cell, foundation_text, mean_std, paper_columns,
                                paper_tables, pixels_in_box, reproduced_caption, rle_area, sanity_caption, sanity_rows,
                                scale_text, study_key, table1, table2, table3, to_html, to_markdown)
from ppcr.report.costs import attention_head_flops, box_head_costs, mlp_head_flops, stage_costs, time_modules
from ppcr.report.stats import (BOOTSTRAP_PAIRS, BOX_VARIANTS, CLAIMS, GROUNDED_BOX_ACC, bootstrap_gains,
                               box_conditional_gains, claim_verdict, claims_table, FOUNDATION_READER, paired_rows,
                               paper_delta, PROBE_READERS, prompt_probe_table, seed_summary)
from ppcr.report.breakdowns import (AMBIGUITY_FROM, OCCLUSION_BELOW, breakdown, breakdown_table, failure_cases,
                                    failure_reason, failure_table)
from ppcr.report.mechanism import (completeness_rows, completeness_table, mechanism_breakdown, mechanism_table,
                                   target_tokens, where_answer_bars, where_answer_rows,
                                   where_answer_table)
from ppcr.report.benchmark import benchmark_rows, benchmark_table, box_token_values, published_table
from ppcr.report.examples import entity_example, failure_figure_rows, qualitative_examples
from ppcr.report.provenance_line import provenance
from ppcr.report.status import (BOX_USE_DROP, box_use_note, foundation_sam_box_miou, not_reproduced, status_markdown,
                               status_table, study_date)
from ppcr.report.notebook import (SHOWN_VARIANTS, explorer_start, make_explorer, metric_rows, static_examples,
                                  static_view, summary_line)

# the public names; the private one imported above (_CACHE: the one cache dict of load_study) is there for code that
# reached it as report._CACHE
__all__ = [
    "SMALL_PROFILES", "METRICS", "Study", "load_study", "MeanStd", "Column", "Table", "format_cell", "TABLE_STYLE",
    "to_html", "to_markdown", "PAPER_DATASETS", "PAPER_DATASET_LABELS", "PAPER_SPLITS", "SPLIT_LABELS", "SYNREF_OF",
    "TABLE2_VARIANTS", "TABLE3_VARIANTS", "TABLE1_VARIANTS", "VARIANT_LABELS", "paper_tables", "paper_columns",
    "column_key", "study_key", "cell", "mean_std", "scale_text", "reproduced_caption", "foundation_text",
    "SANITY_FIELDS",
    "pixels_in_box", "rle_area", "box_fill_inter_union", "fill_gt_cell", "fill_pred_cell", "sanity_rows",
    "sanity_caption", "table1", "table2", "table3", "mlp_head_flops", "attention_head_flops", "time_modules",
    "box_head_costs", "stage_costs", "seed_summary", "BOOTSTRAP_PAIRS", "CLAIMS", "paired_rows", "bootstrap_gains",
    "BOX_VARIANTS", "box_conditional_gains", "prompt_probe_table", "PROBE_READERS", "FOUNDATION_READER",
    "GROUNDED_BOX_ACC",
    "claim_verdict", "claims_table", "paper_delta", "breakdown", "breakdown_table", "OCCLUSION_BELOW",
    "AMBIGUITY_FROM", "failure_reason", "failure_cases", "failure_table", "failure_figure_rows", "qualitative_examples",
    "entity_example", "provenance", "metric_rows", "summary_line", "SHOWN_VARIANTS", "make_explorer", "explorer_start",
    "static_examples", "static_view", "mechanism_breakdown", "mechanism_table", "completeness_rows",
    "completeness_table", "target_tokens", "where_answer_bars", "where_answer_rows",
    "where_answer_table", "benchmark_rows", "benchmark_table", "published_table",
    "box_token_values",
    "status_table", "status_markdown", "not_reproduced", "study_date", "box_use_note", "foundation_sam_box_miou",
    "BOX_USE_DROP",
]
