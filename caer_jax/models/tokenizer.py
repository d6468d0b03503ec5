"""CLIP tokenizers: the real one from a Hugging Face folder, or an offline one built here.

The offline tokenizer (embedded default, `config.model.clip.source = "random"`) is a genuine CLIP
byte-level BPE -- vocab.json and merges.txt in the layout of OpenAI's vocabulary, loaded by
transformers' `CLIPTokenizer` so that the real tokenizer code runs -- but its merges are learned
here: first from the class texts of every text type in `caer_jax.prompts` plus the context
placeholder "X" (each of their words becomes one token), then from the texts its caller gives
(pretraining gives the caption vocabulary of its synthetic pairs, caer_jax.data.captions) until the
vocabulary holds VOCAB_BUDGET entries (the more frequent of those words become one token, the
others a few). Any other word falls back to smaller pieces, down to single bytes. Ids: 256 byte symbols, their 256 "</w>"
(end of word) variants, one id per learned merge, then `<|startoftext|>` and `<|endoftext|>` as
the two last (largest) ids, so that the argmax of a prompt's ids is its end token, as in CLIP.
"""

from __future__ import annotations

import collections
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import regex

from caer_jax import errors, prompts
from caer_jax.models import hub

START_TOKEN = "<|startoftext|>"
END_TOKEN = "<|endoftext|>"
CONTEXT_PLACEHOLDER = "X"
# The embedded default's config.model.clip.vocab_size (configs/synthetic_tiny.py).
VOCAB_BUDGET = 1024
# CLIP's pre-tokenizer pattern (applied after lower-casing).
_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP map from bytes to printable unicode symbols (the 256 base symbols)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def corpus_texts() -> list[str]:
    """Every class text of every text type, and the context placeholder."""
    texts = [t for texts in prompts.TEXT_TYPES.values() for t in texts]
    return texts + [CONTEXT_PLACEHOLDER]


def _words(texts: list[str]) -> collections.Counter:
    byte_encoder = bytes_to_unicode()
    counts: collections.Counter = collections.Counter()
    for text in texts:
        text = " ".join(text.split()).lower()
        for word in _PATTERN.findall(text):
            symbols = [byte_encoder[b] for b in word.encode("utf-8")]
            symbols[-1] += "</w>"
            counts[tuple(symbols)] += 1
    return counts


def _apply(words: collections.Counter, pair: tuple[str, str]) -> collections.Counter:
    merged: collections.Counter = collections.Counter()
    for word, count in words.items():
        out, i = [], 0
        while i < len(word):
            if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
                out.append(word[i] + word[i + 1])
                i += 2
            else:
                out.append(word[i])
                i += 1
        merged[tuple(out)] += count
    return merged


def _learn_merges(
    words: collections.Counter, merges: list[tuple[str, str]], limit: float
) -> collections.Counter:
    """Classic BPE training: repeatedly merge the most frequent adjacent pair (ties broken by the
    pair itself, so the result is deterministic) until every word is one symbol or `merges`
    holds `limit` merges; returns the words as merged."""
    for pair in merges:
        words = _apply(words, pair)
    while len(merges) < limit:
        pairs: collections.Counter = collections.Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:], strict=False):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        words = _apply(words, best)
    return words


def learn_bpe(
    texts: list[str], more_texts: list[str] = (), max_size: int | None = None
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Merges until every word of `texts` is one symbol, then merges over `texts` and
    `more_texts` together until the vocabulary has `max_size` entries (or every word is one
    symbol); returns (vocab, merges).

    The merges of `texts` come first, so that its words are single tokens whatever `more_texts`
    holds: a merge of the second phase never applies to them (BPE applies merges by rank, and
    the first phase's merges make each of those words one symbol).
    """
    special = 2 * 256 + 2  # byte symbols, their end-of-word variants, start and end tokens
    if max_size is not None and max_size < special:
        raise ValueError(f"max_size must be at least {special}, got {max_size}")
    merges: list[tuple[str, str]] = []
    _learn_merges(_words(texts), merges, math.inf)
    if more_texts:
        limit = math.inf if max_size is None else max(len(merges), max_size - special)
        _learn_merges(_words(list(texts) + list(more_texts)), merges, limit)
    base = list(bytes_to_unicode().values())
    symbols = base + [s + "</w>" for s in base] + ["".join(m) for m in merges]
    symbols += [START_TOKEN, END_TOKEN]
    return {s: i for i, s in enumerate(symbols)}, merges


def offline_vocab(more_texts: Sequence[str] = ()) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) of the offline tokenizer: every corpus_texts() word one token, then merges
    over `more_texts` too up to VOCAB_BUDGET entries."""
    return learn_bpe(corpus_texts(), more_texts, VOCAB_BUDGET)


def write_offline_vocab(folder: str | os.PathLike, more_texts: Sequence[str]) -> int:
    """Writes vocab.json and merges.txt of `offline_vocab(more_texts)` into `folder` (the files of
    a Hugging Face CLIP folder); returns the vocabulary's size."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = offline_vocab(more_texts)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return len(vocab)


def offline_tokenizer(more_texts: Sequence[str] = ()) -> Any:
    """The offline CLIP tokenizer of `offline_vocab(more_texts)` (see the module docstring), as
    transformers' CLIPTokenizer."""
    from transformers import CLIPTokenizer

    vocab, merges = offline_vocab(more_texts)
    return CLIPTokenizer(vocab=vocab, merges=merges)


def load_tokenizer(clip_cfg: Any) -> Any:
    """The tokenizer of config.model.clip: offline for source "random" (of the class texts: a
    random CLIP reads nothing else), else the source's own.

    A Hugging Face folder or hub id holds its tokenizer files (a hub id without a network: the
    local cache, see hub.py). A weights file (OpenAI .pt/.pth, flax_model.msgpack) is used with
    vocab.json/merges.txt from its own folder.
    """
    source = clip_cfg.source
    if source == "random":
        tok = offline_tokenizer()
        if len(tok) > clip_cfg.vocab_size:
            raise errors.BadInputError(
                f"the offline tokenizer has {len(tok)} tokens but config.model.clip.vocab_size is "
                f"{clip_cfg.vocab_size}; raise config.model.clip.vocab_size to at least {len(tok)}"
            )
        return tok
    from transformers import CLIPTokenizer

    path = Path(source)
    if path.is_file():
        folder = path.parent
        if not ((folder / "vocab.json").exists() and (folder / "merges.txt").exists()):
            raise errors.MissingInputError(
                f"config.model.clip.source={source!r} is a weights file; its tokenizer is read from "
                f"vocab.json and merges.txt in {folder}, which are missing (copy them from "
                "a Hugging Face CLIP folder, e.g. openai/clip-vit-base-patch32)"
            )
        tok = CLIPTokenizer.from_pretrained(str(folder))
    elif path.is_dir():
        tok = CLIPTokenizer.from_pretrained(source)
    elif hub.is_hub_id(source):
        tok = hub.fetch(
            source,
            "vocab.json",
            "config.model.clip.source",
            lambda local: CLIPTokenizer.from_pretrained(source, local_files_only=local),
        )
    else:
        raise errors.MissingInputError(
            f"config.model.clip.source={errors.named_path(source)}: no such file or folder (give "
            'a Hugging Face CLIP folder, a hub id such as "openai/clip-vit-base-patch32", or '
            '"random")'
        )
    # transformers builds a tokenizer of the special tokens alone when it finds no vocabulary (an
    # empty folder, or a hub id without network); it would turn every prompt into unknown bytes.
    if len(tok) <= len(tok.all_special_tokens):
        raise errors.MissingInputError(
            f"config.model.clip.source={source!r}: no CLIP vocabulary found (vocab.json and "
            "merges.txt); a hub id needs the network, or download its folder and give that path"
        )
    return tok


def tokenize(tokenizer: Any, texts: list[str] | tuple[str, ...], context_length: int) -> np.ndarray:
    """Token ids [len(texts), context_length] int32: start, text, end, then zeros (as clip.tokenize)."""
    out = np.zeros((len(texts), context_length), np.int32)
    # One call for all texts: the tokenizer's per-call cost is most of a short text's.
    encoded = tokenizer(list(texts))["input_ids"] if len(texts) else []
    for i, (text, ids) in enumerate(zip(texts, encoded, strict=True)):
        if ids[0] != tokenizer.bos_token_id or ids[-1] != tokenizer.eos_token_id:
            ids = [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]
        if len(ids) > context_length:
            raise errors.BadInputError(
                f"text {text!r} is {len(ids)} tokens long, more than the context length "
                f"{context_length} (config.model.clip.context_length)"
            )
        out[i, : len(ids)] = ids
    return out
