"""The paper route's traps, each a one-line error with exit code 2 before anything large loads: a profile on real
data without its weights, `evaluate` with nothing trained (it never trains), a SAM file that would run code."""

from __future__ import annotations

import os
import pickle

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ppcr.cli import main as cli_main  # noqa: E402


def test_the_paper_profile_refuses_to_start_without_its_weights(tmp_path, capsys):
    refer = tmp_path / "refer"
    (refer / "refcoco").mkdir(parents=True)
    code = cli_main(["train", "--profile", "paper", "--variant", "ppcr", "--out", str(tmp_path / "run"),
                     "--data-root", str(refer), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--llava-path" in err and "--sam-checkpoint" in err and "\n" not in err
    assert not (tmp_path / "run").exists()  # nothing was trained or written
    code = cli_main(["train", "--profile", "paper", "--variant", "ppcr", "--out", str(tmp_path / "run"),
                     "--data-root", str(refer), "--llava-path", str(tmp_path / "no-llava"),
                     "--sam-checkpoint", str(tmp_path / "sam.pth"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "LLaVA weights not found" in err and "\n" not in err


def test_the_pipeline_takes_the_paper_weights_and_refuses_to_start_without_them(tmp_path, capsys):
    from ppcr.pipeline import main

    assert main(["study", "--profile", "paper", "--out", str(tmp_path / "run"), "--data-root", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("python -m ppcr.pipeline study: error: profile 'paper' starts from pretrained weights")
    assert main(["study", "--profile", "paper", "--out", str(tmp_path / "run"), "--data-root", str(tmp_path),
                 "--llava-path", str(tmp_path / "llava"), "--sam-checkpoint", str(tmp_path / "sam.pth")]) == 2
    assert "LLaVA weights not found" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_evaluate_never_trains(tmp_path, capsys):
    run = tmp_path / "run"
    code = cli_main(["evaluate", "--profile", "smoke", "--variant", "gt_box_oracle", "--run-dir", str(run),
                     "--out", str(tmp_path / "r.json"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "no trained ppcr checkpoint for seed 0" in err and "ppcr train" in err
    assert not (run / "stages").exists() and not (tmp_path / "r.json").exists()


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_a_sam_file_that_would_run_code_is_one_line(tmp_path, capsys):
    """A checkpoint naming a SAM file that is a code-running pickle: `ppcr evaluate` refuses it in one line (exit
    2), the code never runs."""
    from ppcr.model.config import tiny_config
    from ppcr.model.modeling_ppcr import PPCRModel

    evil = tmp_path / "sam_vit_h_4b8939.pth"
    with open(evil, "wb") as f:
        pickle.dump({"x": _Evil()}, f)
    model = PPCRModel.build(tiny_config(), extra_words=["cat"])
    model.config = model.config.replace(sam_checkpoint=str(evil))
    model.save_pretrained(tmp_path / "ckpt")
    code = cli_main(["evaluate", "--profile", "smoke", "--variant", "ppcr", "--checkpoint", str(tmp_path / "ckpt"),
                     "--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "r.json"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("ppcr evaluate: error:") and "\n" not in err
    assert not (tmp_path / "r.json").exists()


def test_a_checkpoint_whose_base_weights_moved_loads_with_their_new_paths(tmp_path, capsys):
    """A paper-profile checkpoint records where its LLaVA and SAM lay; moved (another machine, another folder),
    `predict` and `evaluate` take the new places instead of failing."""
    import shutil

    from ppcr.evaluation.evaluate import load_for_evaluation
    from ppcr.model.config import tiny_config
    from ppcr.model.mllm import build_llava
    from ppcr.model.modeling_ppcr import PPCRModel
    from ppcr.model.segmentation import build_sam
    from ppcr.model.tokenizer import build_word_tokenizer

    import torch

    tokenizer = build_word_tokenizer(["cat"])
    llava = tmp_path / "weights" / "llava"
    build_llava(tiny_config(), tokenizer).save_pretrained(llava)
    tokenizer.save_pretrained(llava)
    sam = tmp_path / "weights" / "sam.pth"
    torch.save(build_sam(tiny_config().sam).state_dict(), sam)
    model = PPCRModel.build(tiny_config(llava_path=str(llava), sam_checkpoint=str(sam)))
    model.save_pretrained(tmp_path / "ckpt")
    shutil.move(tmp_path / "weights", tmp_path / "moved")
    try:
        load_for_evaluation(tmp_path / "ckpt", "ppcr")
        raise AssertionError("loaded from paths that are gone")
    except FileNotFoundError as err:
        assert "LLaVA weights not found" in str(err)
    moved = {"llava_path": str(tmp_path / "moved" / "llava"), "sam_checkpoint": str(tmp_path / "moved" / "sam.pth")}
    again = load_for_evaluation(tmp_path / "ckpt", "ppcr", weights=moved)
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.slow
def test_the_whole_paper_route_at_the_tiny_preset(tiny_refer, tmp_path):
    """The route a user with the real weights follows, in one go, on files in the real layouts: a REFER folder, a
    llava-hf folder as transformers 4.x wrote it (fp16, two shards), SAM's `.pth`, GLaMM's `.bin` shards ->
    `ppcr convert glamm` -> `ppcr train` in 2 processes from the converted start -> `ppcr evaluate` -> the study
    -> notebook 01 with papermill."""
    import json
    import shutil
    import sys

    import torch
    import yaml
    from safetensors.torch import load_file
    from stand_ins import REPO, as_transformers4_folder, glamm_release, glamm_tokenizer, run_in_repo, torchrun

    from ppcr.book import execute_notebooks
    from ppcr.model.config import tiny_config
    from ppcr.model.mllm import build_llava
    from ppcr.model.segmentation import build_sam
    from ppcr.model.tokenizer import build_word_tokenizer

    weights = tmp_path / "weights"
    words = sorted(set("dog on top upper lower thin cat square bird in the corner left".split()))
    tokenizer = build_word_tokenizer(words)
    llava = weights / "llava-1.5-7b-hf"
    torch.manual_seed(0)
    build_llava(tiny_config(), tokenizer).save_pretrained(llava)
    tokenizer.save_pretrained(llava)
    as_transformers4_folder(llava)
    assert any(k.startswith("language_model.model.") for k in
               json.loads((llava / "model.safetensors.index.json").read_text())["weight_map"])
    sam = weights / "sam_vit_h_4b8939.pth"
    torch.save(build_sam(tiny_config().sam).state_dict(), sam)
    base = build_llava(tiny_config(llava_path=str(llava)), tokenizer).state_dict()
    torch.manual_seed(1)
    glamm_sam = build_sam(tiny_config().sam).state_dict()
    for name, rank, seed in (("GLaMM-RefSeg", 8, 2), ("GLaMM-GranD-Pretrained", 8, 3)):
        glamm_release(weights / name, base, rank, seed, glamm_sam, glamm_tokenizer())

    converted = tmp_path / "glamm_init"
    convert = run_in_repo([sys.executable, "-m", "ppcr.cli", "convert", "glamm", "--refseg",
                           str(weights / "GLaMM-RefSeg"), "--grand", str(weights / "GLaMM-GranD-Pretrained"),
                           "--llava", str(llava), "--sam", str(sam), "--out", str(converted), "--preset", "tiny"])
    assert convert.returncode == 0, convert.stderr[-3000:]
    report = json.loads((converted / "convert_report.json").read_text())
    assert max(report["semantic"]["relative_error"].values()) < 1e-5  # rank 8 = r

    profile = tmp_path / "paper_tiny.yaml"
    profile.write_text(yaml.safe_dump({
        "name": "paper_tiny", "preset": "tiny", "data_kind": "refer", "data_root": str(tiny_refer.root),
        "model": {"llava_path": str(llava), "sam_checkpoint": str(sam)},
        "datasets": [{"name": "refcoco", "split_by": "unc", "eval_splits": ["val", "testA", "testB"]}],
        "seeds": [0], "variants": ["glamm", "ppcr"], "init_from": str(converted),
        "stages": {"variants": {"steps": 2, "batch_size": 2, "lr": 1e-3, "warmup_steps": 0}},
        "sam_cache_dtype": "float16", "checkpoint_every": 1, "eval_batch_size": 2, "diag_expressions": 0,
        "device": "cpu"}))
    run = tmp_path / "run"
    for variant in ("glamm", "ppcr"):
        trained = run_in_repo(torchrun() + ["-m", "ppcr.cli", "train", "--profile", str(profile), "--variant", variant,
                                            "--out", str(run), "--no-progress"])
        assert trained.returncode == 0, trained.stderr[-3000:]
    (ppcr_model,) = run.glob("stages/seed0/ppcr-*/model")
    start, end = (load_file(str(folder / "adapters/semantic/adapter_model.safetensors"))
                  for folder in (converted, ppcr_model))
    assert start.keys() == end.keys()
    assert any(not torch.equal(start[k], end[k]) for k in start)  # branch A trained on from GLaMM's factors

    evaluated = run / "results" / "ppcr" / "seed0.json"
    code = cli_main(["evaluate", "--profile", str(profile), "--variant", "ppcr", "--run-dir", str(run),
                     "--out", str(evaluated), "--no-progress"])
    assert code == 0
    metrics = json.loads(evaluated.read_text())["metrics"]
    assert set(metrics) == {"refcoco/val", "refcoco/testA", "refcoco/testB"}

    study = run_in_repo([sys.executable, "-m", "ppcr.pipeline", "study", "--profile", str(profile), "--out",
                         str(run), "--no-progress"])
    assert study.returncode == 0, study.stderr[-3000:]
    index = json.loads((run / "study.json").read_text())
    assert set(index["results"]) == {"glamm", "ppcr", "gt_box_oracle"}
    assert len(list(run.glob("stages/seed0/ppcr-*"))) == 1  # the study reused the 2-process training

    notebooks, book = tmp_path / "notebooks", tmp_path / "book"
    notebooks.mkdir()
    book.mkdir()
    shutil.copy2(REPO / "notebooks" / "01_table1_main_results.ipynb", notebooks)
    (executed,) = execute_notebooks(str(profile), run, book, notebooks, progress=False,
                                    parameters={"data_root": str(tiny_refer.root), "llava_path": str(llava),
                                                "sam_checkpoint": str(sam)})
    outputs = json.dumps(json.loads(executed.read_text())["cells"])
    assert "refcoco" in outputs and "Traceback" not in outputs
