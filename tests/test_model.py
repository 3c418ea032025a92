"""The PPCR model at the `tiny` preset: every variant, gradients through both branches, persistence, bad input."""

from __future__ import annotations

import dataclasses
import os
import pickle
import random

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ppcr.model.config import VARIANTS, PPCRConfig, TrainingRecipe, tiny_config  # noqa: E402
from ppcr.model.modeling_ppcr import PPCRModel  # noqa: E402
from ppcr.model.segmentation import build_sam, load_sam_state_dict  # noqa: E402

WORDS = ["left", "red", "circle", "blue", "square", "big", "green", "star"]


def make_batch(model: PPCRModel, seed: int = 0) -> dict:
    """Three expressions on two images (two on the first), with known targets."""
    prep = model.image_prep()
    rs = np.random.RandomState(seed)
    images = [rs.randint(0, 255, (40, 60, 3), dtype=np.uint8), rs.randint(0, 255, (50, 50, 3), dtype=np.uint8)]
    which = [0, 0, 1]
    masks = [torch.zeros(40, 60, dtype=torch.uint8), torch.zeros(40, 60, dtype=torch.uint8),
             torch.zeros(50, 50, dtype=torch.uint8)]
    masks[0][2:20, 1:30] = 1
    masks[1][10:39, 30:59] = 1
    masks[2][5:10, 5:10] = 1
    boxes = [torch.tensor([1.0, 2, 30, 20]), torch.tensor([30.0, 10, 59, 39]), torch.tensor([5.0, 5, 10, 10])]
    sam = [prep.sam(im) for im in images]
    return {
        "clip_pixel_values": torch.stack([prep.clip(images[i]) for i in which]),
        "sam_pixel_values": torch.stack([sam[i][0] for i in which]),
        "sam_input_size": [sam[i][1] for i in which],
        "original_size": [images[i].shape[:2] for i in which],
        "image_key": [f"img{i}" for i in which],
        "expression": ["left red circle", "big blue square", "green star"],
        "mask": masks,
        "box": boxes,
        "images": images,
    }


@pytest.fixture(scope="module")
def models() -> dict[str, PPCRModel]:
    return {v: PPCRModel.build(tiny_config(variant=v), extra_words=WORDS) for v in VARIANTS}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_variant_forward_backward(models, variant):
    model = models[variant]
    model.train()
    model.zero_grad(set_to_none=True)
    batch = make_batch(model)
    out = model(batch, rng=random.Random(0))
    assert [tuple(m.shape) for m in out.mask_logits] == [(40, 60), (40, 60), (50, 50)]
    st = out.steps
    c, d = model.config.sam_prompt_dim, model.mllm.hidden_size
    assert st.p_seg_txt.shape == (3, c)
    assert st.low_res_masks.shape[:2] == (3, 1)
    if variant == "glamm":
        assert st.p_seg_box is None and st.boxes_norm is None and st.sam_boxes is None
        assert float(out.losses["l1"]) == 0.0
    else:
        assert st.p_seg_box.shape == (3, d)
        assert st.boxes_norm.shape == (3, 4)
        assert bool(((st.boxes_norm >= 0) & (st.boxes_norm <= 1)).all())
        assert bool((st.boxes_norm[:, :2] <= st.boxes_norm[:, 2:]).all())
    assert torch.isfinite(out.loss)
    out.loss.backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
    # SAM's prompt encoder / mask decoder learn; the frozen image encoder does not
    assert model.segmenter.sam.mask_decoder.iou_token.weight.grad is not None
    assert all(p.grad is None for p in model.segmenter.sam.image_encoder.parameters())


def test_box_loss_reaches_both_adapters(models):
    """peft's set_adapter freezes the inactive adapter; the box loss must still reach branch A via P_seg_txt."""
    model = models["ppcr"]
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(make_batch(model), rng=random.Random(0))
    out.losses["l1"].backward()
    for branch in ("semantic", "spatial"):
        grads = [p.grad for p in model.mllm.lora_parameters(branch).values()]
        assert grads and all(g is not None for g in grads), branch
        assert sum(float(g.abs().sum()) for g in grads) > 0, branch


def test_lora_only_in_language_model(models):
    model = models["ppcr"]
    lora_names = [n for n, _ in model.named_parameters() if "lora_" in n]
    assert lora_names and all(".language_model." in n for n in lora_names)
    assert all(("q_proj" in n) or ("v_proj" in n) for n in lora_names)
    llava = model.mllm.llava
    assert not any(p.requires_grad for p in llava.model.vision_tower.parameters())
    assert not any(p.requires_grad for p in llava.model.multi_modal_projector.parameters())
    # both branches exist with r=8 on every q/v projection of every layer
    n_layers = model.config.text.num_hidden_layers
    assert len(model.mllm.lora_parameters("semantic")) == len(model.mllm.lora_parameters("spatial")) == 4 * n_layers


def test_new_token_rows_only(models):
    """Only the rows of [SEG], [BOX], [P_SEG] of the embeddings / LM head receive gradient."""
    model = models["ppcr"]
    model.train()
    model.zero_grad(set_to_none=True)
    model(make_batch(model), rng=random.Random(0)).loss.backward()
    for weight in (model.mllm.llava.get_input_embeddings().weight, model.mllm.llava.get_output_embeddings().weight):
        rows = weight.grad.abs().sum(dim=1) > 0
        allowed = torch.zeros_like(rows)
        allowed[model.mllm.new_token_ids] = True
        assert rows.any() and not bool((rows & ~allowed).any())


def test_batched_decoder_equals_segment_anything(models):
    """SamSegmenter.decode (batched over images) == MaskDecoder.forward image by image."""
    model = models["ppcr"]
    model.eval()
    seg = model.segmenter
    torch.manual_seed(0)
    emb = torch.randn(2, model.config.sam_prompt_dim, 8, 8)
    index = torch.tensor([0, 1, 0])
    boxes = torch.tensor([[1.0, 2, 30, 40], [5, 5, 60, 60], [0, 0, 10, 10]])
    p = torch.randn(3, model.config.sam_prompt_dim)
    with torch.no_grad():
        ours, iou = seg.decode(emb, index, boxes, p)
        for i in range(3):
            sparse, dense = seg.prompt_embeddings(boxes[i:i + 1], p[i:i + 1])
            ref, ref_iou = seg.sam.mask_decoder(emb[index[i]][None], seg.sam.prompt_encoder.get_dense_pe(), sparse,
                                                dense, multimask_output=False)
            torch.testing.assert_close(ours[i:i + 1], ref, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(iou[i:i + 1], ref_iou, rtol=1e-5, atol=1e-5)


def test_training_box_prompt_modes(models):
    """What SAM is prompted with in training: the predicted box (the paper), the jittered ground-truth box, or a
    mix; evaluation always uses the variant's own box. Training SAM only on an untrained box head's boxes taught
    it to ignore its box prompt in the first CPU demo."""
    model = models["ppcr"]
    batch = make_batch(model)
    gt = torch.stack(batch["box"])
    wh = (gt[:, 2:] - gt[:, :2]).repeat(1, 2)
    saved = model.recipe
    try:
        model.train()
        for mode, prob in (("pred", 0.5), ("gt", 0.5), ("mixed", 1.0), ("mixed", 0.0)):
            model.recipe = saved.replace(train_box_prompt=mode, train_gt_box_prob=prob, train_gt_box_jitter=0.1)
            torch.manual_seed(0)
            st = model(batch, rng=random.Random(0)).steps
            predicted = st.boxes_norm.detach() * torch.tensor([[60, 40, 60, 40], [60, 40, 60, 40], [50, 50, 50, 50]])
            near_gt = bool(((st.sam_boxes - gt).abs() <= 0.1 * wh + 1e-4).all())
            if mode == "gt" or (mode == "mixed" and prob == 1.0):
                assert near_gt and not torch.equal(st.sam_boxes, gt)  # jittered, within 10% of the box size
            else:
                torch.testing.assert_close(st.sam_boxes.detach(), predicted)
        model.recipe = saved.replace(train_box_prompt="gt", train_gt_box_jitter=0.0)
        torch.testing.assert_close(model(batch, rng=random.Random(0)).steps.sam_boxes, gt)
        model.eval()  # evaluation: the variant's own (predicted) box whatever the training mode
        with torch.no_grad():
            st = model(batch, compute_loss=False).steps
        assert not torch.allclose(st.sam_boxes, gt)
    finally:
        model.recipe = saved
        model.eval()


def test_gt_box_oracle_uses_the_given_box(models):
    model = models["gt_box_oracle"]
    model.eval()
    batch = make_batch(model)
    with torch.no_grad():
        out = model(batch, compute_loss=False)
    gt = torch.stack(batch["box"])
    torch.testing.assert_close(out.steps.sam_boxes, gt)
    # and the predicted box is still reported
    assert out.steps.boxes_norm is not None
    # `ppcr` at evaluation feeds its own prediction instead
    with torch.no_grad():
        own = models["ppcr"].eval()(batch, compute_loss=False)
    assert not torch.allclose(own.steps.sam_boxes, gt)
    # the oracle without a box is a clear error
    with pytest.raises(ValueError, match="ground-truth boxes"):
        images = batch["images"]
        model.predict(images[0], "red circle")


def test_predict_groups_expressions_per_image(models):
    model = models["ppcr"]
    batch = make_batch(model)
    images = batch["images"]
    res = model.predict(images, [["left red circle", "big blue square"], ["green star"]], batch_size=2)
    assert [r["image_index"] for r in res] == [0, 0, 1]
    assert res[0]["mask"].shape == (40, 60) and res[0]["mask"].dtype == bool
    assert res[2]["mask"].shape == (50, 50)
    assert res[0]["box"].shape == (4,) and res[0]["p_seg_txt"].shape == (model.config.sam_prompt_dim,)
    # the same expression alone gives the same result as inside a batch
    alone = model.predict(images[0], "big blue square")[0]
    np.testing.assert_allclose(alone["box"], res[1]["box"], rtol=1e-4, atol=1e-3)
    assert (alone["mask"] == res[1]["mask"]).mean() > 0.99


def test_save_load_round_trip(models, tmp_path):
    for variant in ("ppcr", "attn_box"):
        model = models[variant]
        images = make_batch(model)["images"]
        # move the trainable weights away from their init so the round trip is meaningful
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.requires_grad:
                    p.add_(0.01 * torch.randn_like(p))
        before = model.predict(images, ["left red circle", "green star"])
        model.save_pretrained(tmp_path / variant)
        assert (tmp_path / variant / "adapters" / "semantic" / "adapter_model.safetensors").is_file()
        assert (tmp_path / variant / "adapters" / "spatial" / "adapter_config.json").is_file()
        assert not list((tmp_path / variant).rglob("*.bin")) and not list((tmp_path / variant).rglob("*.pt*"))
        loaded = PPCRModel.from_pretrained(tmp_path / variant)
        after = loaded.predict(images, ["left red circle", "green star"])
        for a, b in zip(before, after):
            np.testing.assert_array_equal(a["mask"], b["mask"])
            np.testing.assert_array_equal(a["box"], b["box"])
            np.testing.assert_array_equal(a["p_seg_txt"], b["p_seg_txt"])


def test_bad_inputs_give_clear_errors(models, tmp_path):
    model = models["ppcr"]
    image = make_batch(model)["images"][0]
    with pytest.raises(ValueError, match="empty referring expression"):
        model.predict(image, "   ")
    with pytest.raises(ValueError, match="RGB"):
        model.predict(image[..., 0], "red circle")
    with pytest.raises(ValueError, match="uint8"):
        model.predict(image.astype(np.float32), "red circle")
    with pytest.raises(ValueError, match="unsupported image size"):
        model.predict(np.zeros((4, 4, 3), np.uint8), "red circle")
    from PIL import Image

    with pytest.raises(ValueError, match="unsupported image mode"):
        model.predict(Image.new("CMYK", (20, 20)), "red circle")
    with pytest.raises(FileNotFoundError, match="LLaVA weights not found"):
        PPCRModel.build(tiny_config(llava_path=str(tmp_path / "nowhere")), extra_words=WORDS)
    with pytest.raises(FileNotFoundError, match="SAM checkpoint not found"):
        PPCRModel.build(tiny_config(sam_checkpoint=str(tmp_path / "sam.pth")), extra_words=WORDS)
    with pytest.raises(ValueError, match="unknown variant"):
        tiny_config(variant="nope").spec


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_sam_checkpoint_loads_without_running_code(tmp_path):
    cfg = tiny_config()
    sam = build_sam(cfg.sam)
    good = tmp_path / "sam_tiny.pth"
    torch.save(sam.state_dict(), good)
    loaded = build_sam(cfg.sam, good)
    for (k, a), (_, b) in zip(sam.state_dict().items(), loaded.state_dict().items()):
        torch.testing.assert_close(a, b, msg=k)
    evil = tmp_path / "evil.pth"
    with open(evil, "wb") as f:
        pickle.dump({"x": _Evil()}, f)
    with pytest.raises(pickle.UnpicklingError):
        load_sam_state_dict(evil)


def test_config_json_round_trip(tmp_path):
    cfg = tiny_config(variant="attn_box")
    cfg.save_json(tmp_path / "c.json")
    assert PPCRConfig.load_json(tmp_path / "c.json") == cfg


def test_nested_overrides_change_only_the_named_fields():
    """A profile's `model:` block can set part of a sub-config (`lora: {r: 32}`): the rest keeps the preset's."""
    base = tiny_config()
    cfg = tiny_config(lora={"r": 32, "alpha": 64}, vision={"num_hidden_layers": 3})
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.target_modules) == (32, 64, base.lora.target_modules)
    assert cfg.vision.num_hidden_layers == 3 and cfg.vision.hidden_size == base.vision.hidden_size
    assert cfg.replace(lora={"dropout": 0.0}).lora == dataclasses.replace(cfg.lora, dropout=0.0)
    with pytest.raises(TypeError):
        tiny_config(lora={"rank": 4})


def test_loads_llava_and_tokenizer_from_a_local_llava_hf_folder(models, tmp_path):
    """The `paper` path: a llava-hf style folder (config.json + safetensors + tokenizer) read with no network."""
    tiny = models["ppcr"]
    from ppcr.model.mllm import build_llava

    folder = tmp_path / "llava-local"
    plain = build_llava(tiny.config, tiny.tokenizer)  # same architecture, fresh weights
    plain.save_pretrained(folder)
    tiny.tokenizer.save_pretrained(folder)
    assert (folder / "config.json").is_file() and list(folder.glob("*.safetensors"))
    model = PPCRModel.build(tiny_config(variant="ppcr", llava_path=str(folder)))
    loaded = model.mllm.llava.get_input_embeddings().weight
    torch.testing.assert_close(loaded, plain.get_input_embeddings().weight)
    assert len(model.tokenizer) == len(tiny.tokenizer)


def test_paper_preset_is_llava_1_5_7b_and_sam_vit_h():
    """The paper preset's architecture (checked on the config, without allocating 7B parameters)."""
    from ppcr.model.config import paper_config
    from ppcr.model.mllm import llava_config
    from ppcr.model.tokenizer import build_word_tokenizer

    cfg = paper_config()
    assert cfg.vision.num_image_tokens == 576 and cfg.dtype == "bfloat16" and cfg.gradient_checkpointing
    llava = llava_config(cfg, build_word_tokenizer())
    assert llava.text_config.hidden_size == 4096 and llava.text_config.num_hidden_layers == 32
    assert llava.vision_config.image_size == 336 and llava.vision_config.patch_size == 14
    assert llava.text_config.vocab_size >= 32064
    assert cfg.sam.encoder_embed_dim == 1280 and cfg.sam.encoder_depth == 32 and cfg.sam.prompt_embed_dim == 256
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (8, 16, 0.05)
    loss = TrainingRecipe().loss  # the paper's lambda_1..4 (Eq. 7)
    assert (loss.bce, loss.dice, loss.l1, loss.ce) == (2.0, 0.5, 2.0, 0.5)
