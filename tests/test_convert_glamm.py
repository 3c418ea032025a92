"""`ppcr convert glamm` on tiny stand-ins in GLaMM's released layout (.bin shards, original LLaVA key names, its own
[SEG] id): a merged delta of rank <= r round-trips exactly into a LoRA branch, the heads and SAM's decoder are
carried, and a folder in another layout is one clear error."""

from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ppcr.cli import main as cli_main  # noqa: E402
from ppcr.model import prompts  # noqa: E402
from ppcr.model.config import tiny_config  # noqa: E402
from ppcr.model.convert_glamm import GlammLayoutError, convert_glamm, low_rank_factors  # noqa: E402
from ppcr.model.mllm import build_llava  # noqa: E402
from ppcr.model.modeling_ppcr import PPCRModel  # noqa: E402
from ppcr.model.segmentation import build_sam  # noqa: E402
from ppcr.model.tokenizer import build_word_tokenizer  # noqa: E402
from stand_ins import glamm_release, glamm_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp("glamm")
    ours = build_word_tokenizer(["cat"])
    llava = root / "llava-1.5-7b-hf"
    torch.manual_seed(0)
    build_llava(tiny_config(), ours).save_pretrained(llava)
    ours.save_pretrained(llava)
    sam = root / "sam_vit_h_4b8939.pth"
    torch.save(build_sam(tiny_config().sam).state_dict(), sam)
    base = {k: v for k, v in build_llava(tiny_config(llava_path=str(llava)), ours).state_dict().items()}
    glamm_tok = glamm_tokenizer()
    torch.manual_seed(1)
    glamm_sam = build_sam(tiny_config().sam).state_dict()
    refseg = glamm_release(root / "GLaMM-RefSeg", base, 8, 2, glamm_sam, glamm_tok)
    grand = glamm_release(root / "GLaMM-GranD-Pretrained", base, 12, 3, glamm_sam, glamm_tok)  # rank 12 > r
    return root, llava, sam, refseg, grand, glamm_tok


def test_a_rank_r_delta_round_trips_and_the_heads_are_carried(release, tmp_path, capsys):
    root, llava, sam, refseg, grand, glamm_tok = release
    out = tmp_path / "glamm_init"
    code = cli_main(["convert", "glamm", "--refseg", str(root / "GLaMM-RefSeg"), "--grand",
                     str(root / "GLaMM-GranD-Pretrained"), "--llava", str(llava), "--sam", str(sam), "--out", str(out),
                     "--preset", "tiny"])
    printed = capsys.readouterr().out
    assert code == 0 and "branch semantic" in printed and "branch spatial" in printed
    report = json.loads((out / "convert_report.json").read_text())
    assert max(report["semantic"]["relative_error"].values()) < 1e-6  # rank 8 = r: exact
    assert min(report["spatial"]["relative_error"].values()) > 1e-3  # rank 12 > r: measured, not hidden
    assert report["semantic"]["max_relative_change_outside_lora"] < 1e-6

    model = PPCRModel.from_pretrained(out)
    scaling = model.mllm.peft.peft_config["semantic"].lora_alpha / model.mllm.peft.peft_config["semantic"].r
    checked = 0
    for name, module in model.mllm.peft.base_model.model.named_modules():
        if hasattr(module, "lora_A") and "semantic" in module.lora_A:
            merged = module.base_layer.weight + scaling * module.lora_B["semantic"].weight @ \
                module.lora_A["semantic"].weight
            source = f"{name}.weight".replace("model.language_model.", "model.", 1)
            torch.testing.assert_close(merged, refseg[source], rtol=1e-5, atol=1e-5)
            checked += 1
    assert checked == 2 * tiny_config().text.num_hidden_layers  # q_proj and v_proj of every layer
    torch.testing.assert_close(model.text_hidden_fcs[2].weight, refseg["model.text_hidden_fcs.0.2.weight"])
    torch.testing.assert_close(model.segmenter.sam.mask_decoder.iou_token.weight,
                               refseg["model.grounding_encoder.mask_decoder.iou_token.weight"])
    seg_g, seg_p = glamm_tok.convert_tokens_to_ids(prompts.SEG_TOKEN), model.tokenizer.convert_tokens_to_ids(
        prompts.SEG_TOKEN)
    assert seg_g != seg_p and report["seg_row"] == {"glamm_id": seg_g, "ppcr_id": seg_p}
    torch.testing.assert_close(model.mllm.llava.get_input_embeddings().weight[seg_p],
                               refseg["model.embed_tokens.weight"][seg_g])


def test_a_folder_in_another_layout_is_one_clear_error(release, tmp_path):
    root, llava, sam, *_ = release
    with pytest.raises(GlammLayoutError, match="not in GLaMM's released layout") as err:
        convert_glamm(llava, llava, sam, tmp_path / "out", config=tiny_config())  # a llava-hf folder by mistake
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()


def test_low_rank_factors():
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(6, 3, generator=g) @ torch.randn(3, 5, generator=g)
    b, a, err = low_rank_factors(delta, 3)
    assert err < 1e-6 and b.shape == (6, 3) and a.shape == (3, 5)
    assert low_rank_factors(delta, 2)[2] > 0.01 and low_rank_factors(torch.zeros(4, 4), 2)[2] == 0.0
