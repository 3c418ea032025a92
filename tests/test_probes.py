"""The probes of notes/learning.md (`ppcr.evaluation.probes`) at the smoke profile: each runs on a small run folder
and gives figures of the right shape and range, the pure parts give hand-computed values, and the CLI runs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ppcr.data.dataset import ReferSegDataset  # noqa: E402
from ppcr.data.refer import Refer  # noqa: E402
from ppcr.evaluation.evaluate import evaluate_model  # noqa: E402
from ppcr.evaluation.foundation_eval import WHERE_GROUPS, colour_group, group_shares, where_answer_figures  # noqa: E402
from ppcr.evaluation.probes import (  # noqa: E402
    STATES, agreement, box_error_rows, box_errors_table, first, foundation_mllm, main, probe_states, probed_model,
    run_answer_agreement, run_state_probe, run_where_breakdown, soft_token_scale, stage_checkpoint, state_spread,
)
from ppcr.training.mllm_pretrain import WithTargetAttributes  # noqa: E402
from ppcr.model.modeling_ppcr import image_prep_for  # noqa: E402
from ppcr.recipe.profile import load_profile  # noqa: E402
from ppcr.training.data import prepare_data  # noqa: E402
from ppcr.training.diagnostics import batches  # noqa: E402
from ppcr.training.ris import base_weights, ris_start_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
VAL_ROWS = 6  # val expressions per suite in the run's results files


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple:
    """A smoke-sized run folder: the smoke profile with two steps per stage and no diagnostics (as a YAML, which
    the CLI reads too), its data, stages 0-1, a `glamm_init` and a `ppcr` stage folder (the models their stages
    start from, saved as finished stages: the probes read weights, not how well they are trained) and ppcr's
    results file on the val splits."""
    out = tmp_path_factory.mktemp("probe_run")
    raw = yaml.safe_load((REPO / "ppcr/recipe/profiles/smoke.yaml").read_text())
    raw["diag_expressions"] = 0
    raw["stages"] = {k: {"steps": 2, "batch_size": 2, "lr": 1.0e-3, "warmup_steps": 1} for k in raw["stages"]}
    profile_path = out / "probe_smoke.yaml"
    profile_path.write_text(yaml.safe_dump(raw))
    profile = load_profile(str(profile_path))
    prepare_data(profile, out, progress=False)
    weights = base_weights(profile, out, 0, resume=False, progress=False)
    glamm_dir = out / "stages/seed0/glamm_init-test/model"
    ris_start_model(profile, "glamm", 0, weights, None).save_pretrained(glamm_dir)
    (glamm_dir.parent / "DONE.json").write_text(json.dumps({"variant": "glamm"}))
    ppcr = ris_start_model(profile, "ppcr", 0, weights, glamm_dir)
    ppcr.save_pretrained(out / "stages/seed0/ppcr-test/model")
    (out / "stages/seed0/ppcr-test/DONE.json").write_text(json.dumps({"variant": "ppcr"}))
    evaluate_model(ppcr.eval(), out / "data", profile.datasets, out / "results/ppcr/seed0.json", batch_size=8,
                   max_expressions=VAL_ROWS, splits=["val"], progress=False)
    return profile, profile_path, out


# --------------------------------------------------------------------------------------------------------------
# box-errors
# --------------------------------------------------------------------------------------------------------------


def _row(pred, gt, box_iou, iou, size=(100, 200)):
    return {"pred_box": pred, "gt_box": gt, "box_iou": box_iou, "iou": iou, "sent_id": 0,
            "mask_rle": {"size": list(size), "counts": ""}}


def test_box_error_rows_by_hand(tmp_path):
    rows = [_row([0, 0, 20, 10], [0, 0, 20, 10], 1.0, 0.8),          # exact: centre in, distance 0, ratios 1
            _row([100, 50, 140, 70], [0, 0, 20, 10], 0.0, 0.2),     # moved by (110, 55), twice the size
            _row([10, 0, 20, 10], [0, 0, 20, 10], 0.5, 0.5)]        # half as wide, centre (15, 5) inside
    for variant, data in (("ppcr", rows), ("gt_box_oracle", rows),
                          ("glamm", [{**r, "pred_box": None, "box_iou": None} for r in rows])):
        (tmp_path / "results" / variant).mkdir(parents=True)
        (tmp_path / "results" / variant / "seed1.json").write_text(json.dumps({"rows": {"synref/val": data}}))
    [r] = box_error_rows(tmp_path, "synref/val")  # the oracle (ppcr's box) and glamm (no box) are left out
    assert (r["variant"], r["seed"], r["n"]) == ("ppcr", 1, 3)
    assert r["centre_in_gt"] == pytest.approx(200 / 3)
    assert r["centre_dist"] == pytest.approx(5 / 200)  # median of 0, 5 and 55 * sqrt(5) pixels, over 200
    assert (r["w_ratio"], r["h_ratio"]) == (pytest.approx(1.0), pytest.approx(1.0))
    assert r["box_iou"] == pytest.approx(50.0) and r["miou"] == pytest.approx(50.0)
    table = box_errors_table([r]).splitlines()
    assert len(table) == 3 and table[2] == "| ppcr, 1 | 66.7 | 0.025 | 1.00 / 1.00 | 50.0 | 50.0 |"
    assert box_error_rows(tmp_path, "synref/testA") == []


def test_box_errors_on_a_run_and_its_cli(run, capsys):
    profile, profile_path, out = run
    [r] = box_error_rows(out, "synref/val")
    assert r["variant"] == "ppcr" and r["n"] == VAL_ROWS
    assert 0 <= r["centre_in_gt"] <= 100 and 0 <= r["box_iou"] <= 100 and 0 <= r["miou"] <= 100
    assert r["centre_dist"] >= 0 and r["w_ratio"] >= 0 and r["h_ratio"] >= 0  # an untrained box may be flat
    target = out / "probes/box_errors.json"
    assert main(["box-errors", str(out), "--profile", str(profile_path), "--json", str(target)]) == 0
    assert "| ppcr, 0 |" in capsys.readouterr().out
    assert json.loads(target.read_text()) == [r]


# --------------------------------------------------------------------------------------------------------------
# state-probe
# --------------------------------------------------------------------------------------------------------------


def test_state_spread_by_hand():
    same = state_spread(torch.tensor([[3.0, 4.0]] * 5))
    assert same["norm"] == pytest.approx(5.0) and same["pairwise_cos"] == pytest.approx(1.0)
    assert same["off_mean_share"] == pytest.approx(0.0, abs=1e-6)
    basis = state_spread(torch.eye(4))  # the cosine's mean counts the diagonal: 4 ones in 16
    assert basis["norm"] == pytest.approx(1.0) and basis["pairwise_cos"] == pytest.approx(0.25)
    assert basis["off_mean_share"] == pytest.approx(0.75)


def test_stage_checkpoint_finds_finished_stages_only(run, tmp_path):
    _, _, out = run
    assert stage_checkpoint(out, 0, "ppcr") == out / "stages/seed0/ppcr-test/model"
    with pytest.raises(FileNotFoundError, match=r"finished: seed0/glamm_init, .*seed0/ppcr"):
        stage_checkpoint(out, 0, "spatial_re")
    with pytest.raises(FileNotFoundError):
        stage_checkpoint(out, 1, "ppcr")


def test_probe_states_are_the_models_own(run):
    """P_seg_txt and the F_Map box the probe reads are what the model's forward pass computes."""
    profile, _, out = run
    model = probed_model(profile, out, "trained", "ppcr", 0)
    ds = first(ReferSegDataset(Refer(out / "data", "synref", "unc"), "val", model.image_prep()), 5)
    x = probe_states(model, ds, batch_size=3)
    d, c = model.mllm.hidden_size, model.config.sam_prompt_dim
    assert x["h_seg"].shape == (5, d) and x["p_seg_box"].shape == (5, d) and x["p_seg_txt"].shape == (5, c)
    assert x["own_box"].shape == x["box"].shape == (5, 4)
    assert float(x["box"].min()) >= 0 and float(x["box"].max()) <= 1
    with torch.no_grad():
        stages = [model(b, compute_loss=False).steps for b in batches(ds, 5)][0]
    torch.testing.assert_close(x["p_seg_txt"], stages.p_seg_txt.float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x["own_box"], stages.boxes_norm.float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x["p_seg_box"], stages.p_seg_box.float(), rtol=1e-4, atol=1e-5)


def test_state_probe_on_a_trained_stage(run):
    profile, _, out = run
    model = probed_model(profile, out, "trained", "ppcr", 0)
    result = run_state_probe(model, out / "data", profile.datasets, train_per_dataset=4, max_expressions=3,
                             steps=5, batch_size=4)
    assert set(result["splits"]) == {"synref/val", "synref+/val", "synrefg/val"}
    assert result["meta"]["states"] == list(STATES) and result["meta"]["train_expressions"] == 12
    for key, figures in result["splits"].items():
        assert set(figures) == {*STATES, "own_box"}
        for f in figures.values():
            assert f["n"] == 3 and all(0 <= f[k] <= 100 for k in ("box_iou", "box_acc50", "box_centre_in_gt"))
        assert set(result["spread"][key]) == set(STATES)
        assert all(-1 <= s["pairwise_cos"] <= 1 + 1e-6 and 0 <= s["off_mean_share"] <= 1 + 1e-6
                   for s in result["spread"][key].values())
    with pytest.raises(ValueError, match="unknown states"):
        run_state_probe(model, out / "data", profile.datasets, states=["h_box"])


def test_start_and_foundation_models(run):
    """`start` is stage 3's start (stage 2's [SEG] head, a fresh soft-token projection); `foundation` has no stage
    2, and `glamm` no branch B, so its probe reads the semantic states only."""
    profile, _, out = run
    glamm_init = probed_model(profile, out, "trained", "glamm_init", 0)
    start = probed_model(profile, out, "start", "ppcr", 0)
    foundation = probed_model(profile, out, "foundation", "ppcr", 0)
    torch.testing.assert_close(start.text_hidden_fcs.state_dict(), glamm_init.text_hidden_fcs.state_dict())
    torch.testing.assert_close(start.seg_to_llm.state_dict(), foundation.seg_to_llm.state_dict())
    bare = probed_model(profile, out, "foundation", "glamm", 0)
    result = run_state_probe(bare, out / "data", profile.datasets[:1], train_per_dataset=4, max_expressions=2,
                             steps=3, batch_size=4)
    assert result["meta"]["states"] == ["h_seg", "p_seg_txt"]
    assert set(result["splits"]["synref/val"]) == {"h_seg", "p_seg_txt"}
    with pytest.raises(ValueError, match="model source"):
        probed_model(profile, out, "halfway", "ppcr", 0)


def test_state_probe_cli(run, tmp_path, capsys):
    _, profile_path, out = run
    target = tmp_path / "state.json"
    rc = main(["state-probe", str(out), "--profile", str(profile_path), "--model", "trained", "--variant", "ppcr",
               "--states", "p_seg_txt", "p_seg_box", "--train-per-dataset", "4", "--val", "2", "--steps", "3",
               "--batch-size", "4", "--no-progress", "--threads", "1", "--json", str(target)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| synrefg/val | p_seg_box |" in printed and "| synref/val | own_box |" in printed
    result = json.loads(target.read_text())
    assert result["meta"]["model"] == "trained" and set(result["splits"]["synref+/val"]) == {
        "p_seg_txt", "p_seg_box", "own_box"}


# --------------------------------------------------------------------------------------------------------------
# answer-agreement
# --------------------------------------------------------------------------------------------------------------


def test_agreement_by_hand():
    llava = np.array([True, True, True, False, False])
    variant = np.array([True, False, False, True, False])
    a = agreement(llava, variant)
    assert a == {"n": 5, "llava_right": 60.0, "variant_right": 40.0,
                 "right_where_llava_right": pytest.approx(100 / 3), "right_where_llava_wrong": 50.0}
    assert agreement(np.ones(3, bool), np.zeros(3, bool))["right_where_llava_wrong"] is None
    with pytest.raises(ValueError):
        agreement(np.ones(3, bool), np.ones(4, bool))


def test_answer_agreement_on_a_run(run, tmp_path):
    profile, _, out = run
    result = run_answer_agreement(profile, out, ["ppcr"], batch_size=4)
    keys = {"synref/val", "synref+/val", "synrefg/val"}
    assert set(result["llava"]) == keys and all(0 <= v <= 100 for v in result["llava"].values())
    rows = json.loads((out / "results/ppcr/seed0.json").read_text())["rows"]
    for key in keys:
        a = result["variants"]["ppcr"]["seed0"][key]
        assert a["n"] == len(rows[key]) == VAL_ROWS and a["llava_right"] == pytest.approx(result["llava"][key])
        assert a["variant_right"] == pytest.approx(100 * np.mean([r["box_iou"] >= 0.5 for r in rows[key]]))
    # rows that are not the split's first expressions, in order, are refused
    shuffled = {k: v[::-1] for k, v in rows.items()}
    (tmp_path / "results/ppcr").mkdir(parents=True)
    (tmp_path / "results/ppcr/seed0.json").write_text(json.dumps({"rows": shuffled}))
    (tmp_path / "data").symlink_to(out / "data")
    (tmp_path / "stages").symlink_to(out / "stages")
    with pytest.raises(ValueError, match="first 6 expressions"):
        run_answer_agreement(profile, tmp_path, ["ppcr"], batch_size=4)
    with pytest.raises(FileNotFoundError, match="spatial_re"):
        run_answer_agreement(profile, out, ["spatial_re"])


# --------------------------------------------------------------------------------------------------------------
# where-breakdown
# --------------------------------------------------------------------------------------------------------------


def test_colour_group_and_group_shares_by_hand():
    assert colour_group("the big red, striped circle", {"color": "red"}) == "names the colour"
    assert colour_group("the reddish circle left of the blue square", {"color": "red"}) == "no colour word"
    assert colour_group("the circle", {}) is None
    groups = [{"size": "1-2 tokens", "colour": "names the colour", "occlusion": None},
              {"size": "1-2 tokens", "colour": "no colour word", "occlusion": None},
              {"size": "3+ tokens", "colour": "no colour word", "occlusion": None}]
    shares = group_shares(np.array([True, False, True]), groups)
    assert shares["all"] == {"n": 3, "right": pytest.approx(200 / 3)}
    assert shares["size"] == {"1-2 tokens": {"n": 2, "right": 50.0}, "3+ tokens": {"n": 1, "right": 100.0}}
    assert shares["colour"] == {"names the colour": {"n": 1, "right": 100.0}, "no colour word": {"n": 2, "right": 50.0}}
    assert "occlusion" not in shares  # no expression records it
    with pytest.raises(ValueError, match="3 answers for 2 expressions"):
        group_shares(np.ones(3, bool), groups[:2])


def test_where_breakdown_on_a_run_and_its_cli(run, capsys):
    profile, profile_path, out = run
    result = run_where_breakdown(profile, out, batch_size=4)
    assert set(result) == {"synref/val", "synref+/val", "synrefg/val"}
    mllm = foundation_mllm(profile, base_weights(profile, out, 0, resume=True, progress=False))
    for spec in profile.datasets:
        shares = result[f"{spec.name}/val"]
        ds = ReferSegDataset(Refer(out / "data", spec.name, spec.split_by), "val", image_prep_for(mllm.config))
        n = min(profile.eval_max_expressions, len(ds))
        # the same answers as the foundation evaluation's `where_answer` on the same expressions
        figures = where_answer_figures(mllm, first(WithTargetAttributes(ds), n), batch_size=3)
        assert shares["all"] == {"n": n, "right": pytest.approx(figures["box_acc50"])}
        for by, labels in WHERE_GROUPS.items():  # each grouping partitions the expressions
            assert set(shares[by]) <= set(labels) and sum(c["n"] for c in shares[by].values()) == n
            right = sum(c["n"] * c["right"] for c in shares[by].values()) / n
            assert right == pytest.approx(shares["all"]["right"])
    capsys.readouterr()
    assert main(["where-breakdown", str(out), "--profile", str(profile_path), "--batch-size", "4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("| split | all | < 1 token |") and len(lines) == 3 + len(profile.datasets)


# --------------------------------------------------------------------------------------------------------------
# soft-token-scale
# --------------------------------------------------------------------------------------------------------------


def test_soft_token_scale(run, capsys):
    profile, profile_path, out = run
    model = probed_model(profile, out, "trained", "ppcr", 0)
    ds = first(ReferSegDataset(Refer(out / "data", "synref", "unc"), "val", model.image_prep()), 4)
    scale = soft_token_scale(model, ds, batch_size=3)
    embeddings = model.mllm.llava.get_input_embeddings().weight.detach().float()
    assert scale["n"] == 4
    assert scale["embedding_row_norm"] == pytest.approx(float(embeddings.norm(dim=-1).mean()), rel=1e-5)
    batch = next(batches(ds, 4))
    with torch.no_grad():
        features, index = model.clip_features(batch)
        p_seg_txt = model.semantic_step(features, index, batch["expression"], None)[0]
        soft = model.seg_to_llm(p_seg_txt)  # (B, K, d)
    assert soft.shape == (4, model.config.soft_prompt_tokens, model.mllm.hidden_size)
    assert scale["p_seg_txt_norm"] == pytest.approx(float(p_seg_txt.norm(dim=-1).mean()), rel=1e-4)
    assert scale["soft_token_norm"] == pytest.approx(float(soft.norm(dim=-1).mean()), rel=1e-4)
    assert -1 <= scale["soft_token_pairwise_cos"] <= 1 + 1e-6 and scale["image_feature_norm"] > 0
    assert main(["soft-token-scale", str(out), "--profile", str(profile_path), "--model", "start",
                 "--expressions", "3"]) == 0
    assert capsys.readouterr().out.startswith("n 3 p_seg_txt_norm ")
