"""The paper route's traps, each a one-line error with exit code 2 before anything large loads: a profile on real
data without its weights, `evaluate` with nothing trained (it never trains), a SAM file that would run code."""

from __future__ import annotations

import os
import pickle

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
