"""Tokenizers and the batched encoding of the two passes' conversations.

- `paper` preset: the LLaVA-1.5 tokenizer from the local llava-hf folder, with `[SEG]`, `[BOX]`, `[P_SEG]` added.
- small presets: a word-level tokenizer built offline with the `tokenizers` library over the prompt templates and
  the SynRef vocabulary, wrapped as a transformers `PreTrainedTokenizerFast` (saved and loaded like any other).
  Words outside its vocabulary become `<unk>`; `unknown_words` names them, so that `ppcr predict` and the
  explorer can say that a mask ignored them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from ppcr.data.synref import vocabulary
from ppcr.model import prompts
from ppcr.model.config import LLAVA_SYSTEM_PROMPT

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
_WORD = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")
BOX_BINS = 32  # the small LLaVA (stage 1) answers boxes as integers 0..31 of the image width/height
# the words of stage 1's answers ("Sure, it is a ...", "Sure, the bounding box is b1 b2 b3 b4.")
PRETRAIN_WORDS = ["sure", "it", "is", "a", "the", "bounding", "box", ",", "."] + [str(i) for i in range(BOX_BINS)]


def template_words() -> list[str]:
    """Every word and punctuation mark the templates, answers and system prompt use."""
    text = " ".join(
        prompts.SEMANTIC_TEMPLATES + prompts.SPATIAL_TEMPLATES + prompts.SPATIAL_RE_TEMPLATES
        + prompts.SPATIAL_RE_SEG_TEMPLATES
        + (prompts.SEMANTIC_ANSWER, prompts.SPATIAL_ANSWER, "USER: ASSISTANT:", LLAVA_SYSTEM_PROMPT)
    )
    for tok in prompts.NEW_TOKENS + ("{T}", "{P}"):
        text = text.replace(tok, " ")
    return sorted(set(_WORD.findall(text.lower())))


def build_word_tokenizer(extra_words: Iterable[str] = ()) -> PreTrainedTokenizerFast:
    """A closed-vocabulary word-level tokenizer (lower-cased; punctuation split off; unknown words -> <unk>)."""
    words = set(template_words())
    for w in extra_words:
        words.update(_WORD.findall(str(w).lower()))
    specials = [PAD, UNK, BOS, EOS, prompts.IMAGE_TOKEN, *prompts.NEW_TOKENS]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for w in sorted(words):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=PAD,
        extra_special_tokens={"image_token": prompts.IMAGE_TOKEN},
    )
    wrapped.add_special_tokens({"additional_special_tokens": list(prompts.NEW_TOKENS)})
    return wrapped


def synref_tokenizer() -> PreTrainedTokenizerFast:
    """The small presets' word tokenizer: the templates, SynRef's vocabulary and stage 1's answers."""
    return build_word_tokenizer(list(vocabulary()) + PRETRAIN_WORDS)


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """A tokenizer from a local folder (LLaVA's or a saved PPCR one), with the PPCR tokens added if missing."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer folder not found: {path} (a llava-hf/llava-1.5-7b-hf style folder)")
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    missing = [t for t in prompts.NEW_TOKENS if t not in tok.get_vocab()]
    if missing:
        tok.add_special_tokens({"additional_special_tokens": missing})
    if prompts.IMAGE_TOKEN not in tok.get_vocab():
        tok.add_special_tokens({"additional_special_tokens": [prompts.IMAGE_TOKEN]})
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token or tok.eos_token
    return tok


def unknown_words(tokenizer: PreTrainedTokenizerBase, expression: str) -> list[str]:
    """The words of `expression` that `tokenizer` does not know, in order, each once (ignoring case): the text of
    every token it maps to its unk token (the small presets' word tokenizer does so for words outside its closed
    vocabulary, and the model then reads `<unk>` instead of them). [] for a tokenizer without an unk token, or
    one that never produces it, such as the paper preset's LLaMA BPE tokenizer (it falls back to bytes, so every
    word is representable)."""
    unk = tokenizer.unk_token_id
    if unk is None or not expression.strip():
        return []
    if tokenizer.is_fast:  # the unk tokens' spans of the original text (its case kept)
        enc = tokenizer(expression, add_special_tokens=False, return_offsets_mapping=True)
        found = [expression[a:b] for i, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]) if i == unk]
    else:  # a slow tokenizer: whitespace-separated words one at a time
        found = [w for w in expression.split() if unk in tokenizer(w, add_special_tokens=False)["input_ids"]]
    once: dict[str, str] = {}
    for word in found:
        if word:
            once.setdefault(word.casefold(), word)
    return list(once.values())


def unknown_words_warning(words: Sequence[str]) -> str:
    """One line naming the words a model did not understand ("" for none)."""
    if not words:
        return ""
    quoted = ", ".join(f"\u201c{w}\u201d" for w in words)
    return (f"{len(words)} word{'s' if len(words) > 1 else ''} not in the model's vocabulary ({quoted}): it reads "
            "them as <unk>, so the mask does not follow them")


@dataclass
class EncodedPass:
    """One pass's batch, right-padded. L = padded length including the expanded image tokens."""

    input_ids: torch.Tensor  # (B, L) long
    attention_mask: torch.Tensor  # (B, L) long
    labels: torch.Tensor  # (B, L) long, -100 outside the answer
    query_index: torch.Tensor  # (B,) position whose hidden state predicts [SEG] / [BOX]

    def to(self, device: torch.device | str) -> "EncodedPass":
        return EncodedPass(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.labels,
                                                     self.query_index)))


def encode_pass(
    tokenizer: PreTrainedTokenizerBase,
    contexts: Sequence[str],
    answers: Sequence[str],
    query_token: str | None,
    num_image_tokens: int,
) -> EncodedPass:
    """Tokenise `context + answer + </s>` per sample, expand `<image>` to `num_image_tokens` copies, pad right.

    The query position is the one *before* `query_token` in the answer (its hidden state predicts the token),
    as LISA/GLaMM take the `[SEG]` hidden state.
    """
    image_id = tokenizer.convert_tokens_to_ids(prompts.IMAGE_TOKEN)
    query_id = tokenizer.convert_tokens_to_ids(query_token) if query_token else None
    rows: list[list[int]] = []
    label_rows: list[list[int]] = []
    queries: list[int] = []
    for context, answer in zip(contexts, answers, strict=True):
        ctx = tokenizer(context, add_special_tokens=True)["input_ids"]
        ans = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if ctx.count(image_id) != 1:
            raise ValueError(f"expected exactly one {prompts.IMAGE_TOKEN} in the prompt, got {ctx.count(image_id)}")
        at = ctx.index(image_id)
        ctx = ctx[:at] + [image_id] * num_image_tokens + ctx[at + 1:]
        ids = ctx + ans
        if query_id is None:  # no query token (plain captioning): the last context position
            queries.append(len(ctx) - 1)
        elif ans.count(query_id) != 1:
            raise ValueError(f"the answer must contain exactly one {query_token}: {answer!r}")
        else:
            queries.append(len(ctx) + ans.index(query_id) - 1)
        rows.append(ids)
        label_rows.append([-100] * len(ctx) + ans)
    length = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    input_ids = torch.full((len(rows), length), pad, dtype=torch.long)
    labels = torch.full((len(rows), length), -100, dtype=torch.long)
    attention = torch.zeros((len(rows), length), dtype=torch.long)
    for i, (ids, lab) in enumerate(zip(rows, label_rows)):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        attention[i, : len(ids)] = 1
    return EncodedPass(input_ids, attention, labels, torch.tensor(queries, dtype=torch.long))
