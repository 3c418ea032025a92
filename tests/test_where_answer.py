"""Stage 1's "where" answer decoded by the LLaVA itself (`MllmPretrainer.decode_where_bins`).

The teacher-forced read gives each bin the true bins before it; the decoded one gives it the LLaVA's own. These
tests check the decoding on a small random LLaVA: it reads the four bin positions and nothing else, it is causal,
and it is greedy (the model, teacher-forced on its own answer, picks that answer again).
"""

from __future__ import annotations

import torch

from ppcr.model.config import tiny_config
from ppcr.model.tokenizer import BOX_BINS, synref_tokenizer
from ppcr.training.mllm_pretrain import MllmPretrainer, bin_centres, pretrain_turn


def _batch(n: int = 3, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    cfg = tiny_config()
    return {"clip_pixel_values": torch.randn(n, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g),
            "expression": ["the red circle", "the blue square", "the big one"][:n],
            "attributes": [{"color": "red", "shape": "circle"}] * n,
            "box": [torch.tensor([4.0, 6.0, 20.0, 24.0]), torch.tensor([0.0, 0.0, 31.0, 31.0]),
                    torch.tensor([10.0, 2.0, 14.0, 9.0])][:n],
            "original_size": [(32, 32), (32, 48), (40, 32)][:n]}


def _module(seed: int = 0) -> MllmPretrainer:
    torch.manual_seed(seed)
    return MllmPretrainer(tiny_config(image_after_prompt=True), synref_tokenizer()).eval()


def test_bin_centres_state_the_same_bins():
    for bins in ([0, 0, 31, 31], [3, 17, 9, 28]):
        for size in ((32, 32), (48, 40)):
            _, answer = pretrain_turn("the red circle", {}, torch.tensor(bin_centres(bins, size)), size, "where")
            assert answer.endswith(" ".join(map(str, bins)) + ".")


def test_decoding_is_greedy_and_causal():
    module, batch = _module(), _batch()
    bins = module.decode_where_bins(batch)
    assert bins.shape == (3, 4) and bins.dtype == torch.long and int(bins.min()) >= 0 and int(bins.max()) < BOX_BINS
    with torch.no_grad():
        again = module.where_bin_logits(batch, bins).argmax(-1)  # teacher-forced on its own answer
        assert torch.equal(again.cpu(), bins)
        # the first bin cannot see the bins stated after it
        other = torch.full_like(bins, BOX_BINS - 1)
        torch.testing.assert_close(module.where_bin_logits(batch, bins)[:, 0],
                                   module.where_bin_logits(batch, other)[:, 0])
        # ...while a later bin does see the ones before it
        last = module.where_bin_logits(batch, bins)[:, 3], module.where_bin_logits(batch, other)[:, 3]
        assert not torch.allclose(*last)


def test_decoding_reads_bin_tokens_only(monkeypatch):
    """A LM head that prefers a word over every bin, and bin 7 over the other bins, decodes to bin 7 everywhere."""
    module, batch = _module(), _batch()
    vocab = module.llava.get_output_embeddings().weight.shape[0]
    sure, seven = module.tokenizer.convert_tokens_to_ids("sure"), int(module.bin_ids[7])

    def head(hidden: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(*hidden.shape[:-1], vocab)
        logits[..., sure], logits[..., seven] = 10.0, 5.0
        return logits

    monkeypatch.setattr(module.llava, "get_output_embeddings", lambda: head)
    assert torch.equal(module.decode_where_bins(batch), torch.full((3, 4), 7))
    torch.testing.assert_close(module.where_answer_boxes(batch), torch.full((3, 4), 7.5 / BOX_BINS))
