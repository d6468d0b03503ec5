"""The offline CLIP tokenizer: built from the class texts, loaded by transformers' CLIPTokenizer."""

import json

import ml_collections
import numpy as np
import pytest

from caer_jax import prompts
from caer_jax.data import captions
from caer_jax.models import tokenizer as tokenizer_lib


@pytest.fixture(scope="module")
def tok():
    return tokenizer_lib.offline_tokenizer()


def test_layout_matches_clip(tmp_path):
    size = tokenizer_lib.write_offline_vocab(tmp_path, captions.vocabulary_texts())
    assert size == tokenizer_lib.VOCAB_BUDGET
    vocab = json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == size
    by_id = sorted(vocab, key=vocab.get)
    base = list(tokenizer_lib.bytes_to_unicode().values())
    assert by_id[:256] == base
    assert by_id[256:512] == [b + "</w>" for b in base]
    assert by_id[-2:] == ["<|startoftext|>", "<|endoftext|>"]
    merges = (tmp_path / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0].startswith("#version")
    assert len(merges) - 1 == size - 512 - 2


def test_the_texts_given_are_learned_and_the_files_read_back_the_same(tmp_path):
    given = ["zebras graze", "a zebra grazes", "zebras"]
    learned = tokenizer_lib.offline_tokenizer(given)
    assert len(learned("zebras", add_special_tokens=False)["input_ids"]) == 1
    unlearned = tokenizer_lib.offline_tokenizer()
    assert len(unlearned("zebras", add_special_tokens=False)["input_ids"]) > 1
    # The files that pretraining exports: read by a Hugging Face folder's loader, the same ids.
    tokenizer_lib.write_offline_vocab(tmp_path, given)
    folder = ml_collections.ConfigDict({"source": str(tmp_path), "vocab_size": 1024})
    texts = [*given, "zebra quux", *tokenizer_lib.corpus_texts()]
    np.testing.assert_array_equal(
        tokenizer_lib.tokenize(tokenizer_lib.load_tokenizer(folder), texts, 32),
        tokenizer_lib.tokenize(learned, texts, 32),
    )


def test_every_corpus_word_is_one_token(tok):
    for text in tokenizer_lib.corpus_texts():
        for word in tokenizer_lib._PATTERN.findall(text.lower()):
            ids = tok(word, add_special_tokens=False)["input_ids"]
            assert len(ids) == 1, (word, tok.convert_ids_to_tokens(ids))


def test_unknown_words_fall_back_to_pieces(tok):
    ids = tok("zebra quux", add_special_tokens=False)["input_ids"]
    assert len(ids) > 2
    assert tok.decode(ids) == "zebra quux"


def test_tokenize_pads_with_zeros_and_eot_is_argmax(tok):
    texts = ["X X " + t for t in prompts.TEXT_TYPES["class_names"]]
    ids = tokenizer_lib.tokenize(tok, texts, 20)
    assert ids.shape == (5, 20) and ids.dtype == np.int32
    assert (ids[:, 0] == tok.bos_token_id).all()
    eot = ids.argmax(-1)
    assert (ids[np.arange(5), eot] == tok.eos_token_id).all()
    assert tok.eos_token_id == len(tok) - 1
    for row, e in zip(ids, eot, strict=True):
        assert (row[e + 1 :] == 0).all()
    # "x x neutrality in learning state ." -> start + 6 + end
    assert eot[0] == 1 + 2 + 4 + 1


def test_too_long_text_is_refused(tok):
    with pytest.raises(ValueError, match="context length"):
        tokenizer_lib.tokenize(tok, ["X " * 30], 16)


def test_vocab_size_check_names_the_key():
    cfg = ml_collections.ConfigDict({"source": "random", "vocab_size": 100})
    with pytest.raises(ValueError, match="config.model.clip.vocab_size"):
        tokenizer_lib.load_tokenizer(cfg)
    cfg.vocab_size = 1024
    assert len(tokenizer_lib.load_tokenizer(cfg)) <= 1024


def test_weights_file_without_tokenizer_files(tmp_path):
    f = tmp_path / "ViT-B-32.pt"
    f.write_bytes(b"")
    cfg = ml_collections.ConfigDict({"source": str(f), "vocab_size": 49408})
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        tokenizer_lib.load_tokenizer(cfg)
    tokenizer_lib.write_offline_vocab(tmp_path, ())
    assert len(tokenizer_lib.load_tokenizer(cfg)) <= 1024


def test_folder_without_a_vocabulary_is_refused(tmp_path):
    cfg = ml_collections.ConfigDict({"source": str(tmp_path), "vocab_size": 49408})
    with pytest.raises(FileNotFoundError, match="no CLIP vocabulary found"):
        tokenizer_lib.load_tokenizer(cfg)
    tokenizer_lib.write_offline_vocab(tmp_path, ())
    assert len(tokenizer_lib.load_tokenizer(cfg)) <= 1024
