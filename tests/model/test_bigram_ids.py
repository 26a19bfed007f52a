import numpy as np
import pytest
import torch

from model.bigram import bigram_hash_ids, bigram_sign_ids

HEAD_TABLE_ROWS = 50304 * 15 // 2  # 377,280
HEAD_SIGN_ROWS = 8192


def int32(value):
    """A Python int as the signed 32-bit integer it wraps around to."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


def expected_hashes(tokens, table_rows):
    """HEAD's hash, one position at a time: position 0 becomes M, then each later position hashes
    its token with the previous entry of that (already overwritten) list."""
    m = table_rows - 1
    stream = [int32(t) for t in tokens]
    stream[0] = m
    out = [m]
    for t in range(1, len(tokens)):
        mixed = int32(36313 * stream[t]) ^ int32(27191 * stream[t - 1])  # Python's ^ on signed ints is two's complement
        out.append(mixed % m)  # Python's % takes the divisor's sign, as torch's int % does
    return out


def expected_signs(tokens, sign_rows):
    values = [int32(t) for t in tokens]
    return [0] + [(values[t - 1] ^ values[t]) % sign_rows for t in range(1, len(values))]


def test_gpt2_row_matches_the_loop():
    tokens = [50256, 464, 2068, 7586, 21831, 50256, 50256, 0, 1, 50303, 13, 198]
    assert bigram_hash_ids(torch.tensor(tokens), HEAD_TABLE_ROWS).tolist() == expected_hashes(tokens, HEAD_TABLE_ROWS)
    assert bigram_sign_ids(torch.tensor(tokens), HEAD_SIGN_ROWS).tolist() == expected_signs(tokens, HEAD_SIGN_ROWS)


def test_position_zero_is_reserved_and_position_one_pairs_with_it():
    m = HEAD_TABLE_ROWS - 1
    for first in (50256, 7, 0):
        hashes = bigram_hash_ids(torch.tensor([first, 464, 464]), HEAD_TABLE_ROWS).tolist()
        assert hashes[0] == m
        # 27191 * M = 10,258,593,289 overflows int32: it wraps to 10,258,593,289 - 2 * 2^32
        assert hashes[1] == ((36313 * 464) ^ (10_258_593_289 - 2 * 2**32)) % m  # the same whatever x[0] is
        assert hashes[2] == ((36313 * 464) ^ (27191 * 464)) % m
    signs = bigram_sign_ids(torch.tensor([50256, 464]), HEAD_SIGN_ROWS).tolist()
    assert signs == [0, (50256 ^ 464) % 8192]  # the sign index pairs position 1 with the real x[0]


def test_large_ids_wrap_around_as_int32():
    # 36313 * 65535 and 27191 * 2^20 overflow int32; some products wrap negative, and their XOR too.
    tokens = [1, 65535, 65535, 2**20, 2**31 - 1, 123_456_789, 3, 2**30 + 12345, 59_139, 2**24]
    hashes = bigram_hash_ids(torch.tensor(tokens), HEAD_TABLE_ROWS).tolist()
    assert hashes == expected_hashes(tokens, HEAD_TABLE_ROWS)
    assert any(int32(36313 * t) < 0 for t in tokens)  # the case the test is about
    assert all(0 <= h < HEAD_TABLE_ROWS - 1 for h in hashes[1:])
    assert bigram_sign_ids(torch.tensor(tokens), HEAD_SIGN_ROWS).tolist() == expected_signs(tokens, HEAD_SIGN_ROWS)


def test_random_rows_small_table():
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 2**31 - 1, (200,), generator=generator)
    assert bigram_hash_ids(tokens, 1001).tolist() == expected_hashes(tokens.tolist(), 1001)
    assert bigram_sign_ids(tokens, 64).tolist() == expected_signs(tokens.tolist(), 64)


def test_each_row_of_a_batch_starts_again():
    rows = torch.tensor([[50256, 11, 12, 13], [5, 50256, 11, 12]])
    hashes = bigram_hash_ids(rows, HEAD_TABLE_ROWS)
    signs = bigram_sign_ids(rows, HEAD_SIGN_ROWS)
    for i, row in enumerate(rows.tolist()):
        assert hashes[i].tolist() == expected_hashes(row, HEAD_TABLE_ROWS)
        assert signs[i].tolist() == expected_signs(row, HEAD_SIGN_ROWS)


def test_bos_is_not_masked():
    # a document start hashes with the last token of the document before it
    tokens = [50256, 40, 41, 50256, 42]
    hashes = bigram_hash_ids(torch.tensor(tokens), HEAD_TABLE_ROWS).tolist()
    assert hashes[3] == ((36313 * 50256) ^ (27191 * 41)) % (HEAD_TABLE_ROWS - 1)


def test_inputs_or_the_whole_row_give_the_same_ids():
    row = [50256, 9, 8, 7, 6, 5]
    whole, inputs = bigram_hash_ids(torch.tensor(row), 97), bigram_hash_ids(torch.tensor(row[:-1]), 97)
    assert torch.equal(whole[:-1], inputs)


@pytest.mark.parametrize("tokens", [[50256], []])
def test_short_rows(tokens):
    assert bigram_hash_ids(torch.tensor(tokens, dtype=torch.int64), HEAD_TABLE_ROWS).tolist() == \
        ([HEAD_TABLE_ROWS - 1] if tokens else [])
    assert bigram_sign_ids(torch.tensor(tokens, dtype=torch.int64), HEAD_SIGN_ROWS).tolist() == [0] * len(tokens)


def test_numpy_uint16_rows_and_int64_ids():
    tokens = np.array([50256, 65535, 1, 2], dtype=np.uint16)  # a shard's dtype
    hashes = bigram_hash_ids(tokens, HEAD_TABLE_ROWS)
    assert hashes.dtype == torch.int64
    assert hashes.tolist() == expected_hashes(tokens.tolist(), HEAD_TABLE_ROWS)
