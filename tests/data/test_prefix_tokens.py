import random

import pytest

from data.prefix_tokens import NO_PREFIX, gpt2_prefix_table, ordinary_token_bytes, prefix_table_from_bytes
from data.tokenizer import gpt2_encoding

GPT2_EOT = 50256
MODEL_VOCAB = 50304


def brute_force_prefix(token_bytes, token_id):
    """Over every other id: the one whose bytes are the longest proper prefix of token_id's, or -1."""
    target = token_bytes[token_id]
    best, best_len = NO_PREFIX, 0
    for i, b in enumerate(token_bytes):
        if b is not None and len(b) < len(target) and target.startswith(b) and len(b) > best_len:
            best, best_len = i, len(b)
    return best


def test_toy_vocabulary():
    vocab = [b"a", b"b", b"ab", b"abc", b"abcd", None, b"abd", b"bcd", b"abcde", b"x"]
    # "abcde": "abcd" (4) beats "abc" and "ab"; "abd": "ab" ("abd"[:2]), not "a"; "bcd": only "b"
    # ("bc" is no token); single bytes and the None id (a special token) have none.
    expected = [-1, -1, 0, 2, 3, -1, 2, 1, 4, -1]
    assert prefix_table_from_bytes(vocab) == expected
    assert expected == [NO_PREFIX if b is None else brute_force_prefix(vocab, i) for i, b in enumerate(vocab)]


def test_special_bytes_are_no_ones_prefix():
    # An id without bytes (a special token) must not serve as a prefix even where its name would match.
    assert prefix_table_from_bytes([b"<", None, b"<|e"]) == [-1, -1, 0]


def test_duplicate_bytes_are_refused():
    with pytest.raises(ValueError):
        prefix_table_from_bytes([b"a", b"a"])


@pytest.fixture(scope="module")
def gpt2_bytes():
    return ordinary_token_bytes(gpt2_encoding())


@pytest.fixture(scope="module")
def gpt2_table():
    return gpt2_prefix_table(MODEL_VOCAB)


def test_gpt2_table_counts(gpt2_bytes, gpt2_table):
    assert gpt2_table.shape == (MODEL_VOCAB,)
    has_prefix = gpt2_table >= 0
    # All 50,256 ordinary tokens but the 256 single bytes: each longer token starts with a byte token.
    assert int(has_prefix.sum()) == 50_000
    assert sum(b is not None and len(b) > 1 for b in gpt2_bytes) == 50_000
    assert gpt2_bytes[GPT2_EOT] is None and int(gpt2_table[GPT2_EOT]) == NO_PREFIX
    assert (gpt2_table[GPT2_EOT:] == NO_PREFIX).all()  # <|endoftext|> and the padding ids


def test_gpt2_ids_against_brute_force(gpt2_bytes, gpt2_table):
    encoding = gpt2_encoding()
    named = [encoding.encode_single_token(t) for t in (" the", "ing", " Hello", "a", " international")]
    longest = max(range(GPT2_EOT), key=lambda i: len(gpt2_bytes[i]))
    ids = named + [longest] + random.Random(0).sample(range(GPT2_EOT), 6)
    for i in ids:
        expected = brute_force_prefix(gpt2_bytes, i)
        assert int(gpt2_table[i]) == expected, (i, gpt2_bytes[i])
    assert int(gpt2_table[encoding.encode_single_token("a")]) == NO_PREFIX
    the = int(gpt2_table[encoding.encode_single_token(" the")])
    assert gpt2_bytes[the] == b" th"


def test_smaller_model_vocabulary_is_refused():
    with pytest.raises(ValueError):
        gpt2_prefix_table(8192)
