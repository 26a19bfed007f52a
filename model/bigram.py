"""The leaderboard HEAD's bigram hash embedding (records #62, #83, #85).

Each position looks up one row of a large table by the hash of its bigram (previous token,
token), and multiplies it element-wise by a fixed row of +-1 signs picked by another function of
the bigram (`bigram_hash_ids`, `bigram_sign_ids`). Many bigrams share a table row; with different
signs, their gradients into the shared row partly cancel instead of adding up, so the shared row
serves each bigram better (the "sign trick", record #83). The result is added, gated, to the
residual stream's first `dim` channels.

The indices are computed from the token ids by the model, on its device: HEAD computes the hash
on the CPU in its loader and the sign index in the model; the numbers are the same. The row is
what one rank feeds the model in one forward pass: all its documents packed one after another.
Nothing is reset at a document start: a BOS token hashes with the last token of the document
before it (HEAD found masking it slower and no better). Position 0 has no previous token and
takes the table's last row, which no bigram hashes to. The arithmetic is HEAD's int32
arithmetic: products wrap around at 2^32 (GPT-2's ids fit, but the reserved id multiplied at
position 1 does not), XOR of the signed values, then a modulus whose result has the divisor's
sign; it is written out in int64 with an explicit wrap, which gives the same numbers without
relying on how a backend overflows int32.

HEAD's sizes (config.HEAD): 50304 * 15 // 2 = 377,280 rows of 768, and 8192 sign rows. HEAD
stores both tables in bfloat16; here the learned table is float32 but under --numerics record
(bf16, as HEAD's), and the signs are bfloat16, exact for +-1.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

HASH_MULTIPLIER_TOKEN = 36313  # large odd numbers that spread the ids over the int32 range
HASH_MULTIPLIER_PREVIOUS = 27191


def _wrap_int32(values):
    """int64 values reduced to the int32 they wrap around to (two's complement)."""
    return (values + 2**31) % 2**32 - 2**31


def _as_int64(tokens):
    return torch.as_tensor(tokens).to(torch.int64)


def bigram_hash_ids(tokens, table_rows):
    """The bigram table row of each position of a packed row of token ids (last dim: positions).

    With M = table_rows - 1: h[0] = M, and for t >= 1
        h[t] = (wrap32(36313 * x[t]) XOR wrap32(27191 * p[t-1])) mod M,
    where p is the row with p[0] replaced by M (HEAD writes the reserved id into position 0 before
    hashing the rest, so position 1 pairs its token with M, not with x[0]) and p[t] = x[t] after.
    The result lies in 0..M-1 except at position 0. The token ids are first cast to int32 as HEAD
    does. Returns int64 ids of the input's shape; a row of the model's inputs or the whole row
    with its extra target token gives the same ids, as h[t] looks only at t and t - 1.
    """
    modulus = table_rows - 1
    x = _wrap_int32(_as_int64(tokens))
    hashes = torch.full_like(x, modulus)
    if x.size(-1) > 1:
        previous = x[..., :-1].clone()
        previous[..., 0] = modulus
        token_part = _wrap_int32(HASH_MULTIPLIER_TOKEN * x[..., 1:])
        previous_part = _wrap_int32(HASH_MULTIPLIER_PREVIOUS * previous)
        hashes[..., 1:] = torch.remainder(token_part ^ previous_part, modulus)
    return hashes


def bigram_sign_ids(tokens, sign_rows):
    """The sign table row of each position: s[0] = 0, s[t] = (x[t-1] XOR x[t]) mod sign_rows.

    Unlike the hash, position 1 pairs with the real x[0]; position 0 takes row 0, an ordinary row
    of signs (HEAD, L1535-1536). Token ids are cast to int32 as HEAD's int32 inputs are; the
    modulus has the divisor's sign. Returns int64 ids of the input's shape.
    """
    x = _wrap_int32(_as_int64(tokens))
    signs = torch.zeros_like(x)
    signs[..., 1:] = torch.remainder(x[..., :-1] ^ x[..., 1:], sign_rows)
    return signs


HEAD_TABLE_ROWS = 50304 * 15 // 2  # the last row is the position-0 row no bigram hashes to
HEAD_SIGN_ROWS = 8192  # HEAD: a power of 2 is preferred; sizes of about 500 to 15,000 did as well
HEAD_DIM = 768


def sign_table(rows, dim, generator=None):
    """HEAD's fixed sign table: the signs of a (rows, dim) float32 standard normal draw, in bfloat16.

    The same generator state gives the same table (the global generator when `generator` is None,
    as HEAD draws it, on the CPU while the model is built). A draw of exactly 0.0 would give a 0
    entry, as in HEAD; for float32 normals that practically never happens.
    """
    return torch.randn(rows, dim, generator=generator).sign().to(torch.bfloat16)


class BigramEmbedding(nn.Module):
    """forward(hash_ids, sign_ids) = table[hash_ids] * signs[sign_ids], of shape ids.shape + (dim,).

    `table` is the learned (rows, dim) parameter, zero at init so the bigram path starts silent.
    `signs` is a persistent buffer, as in HEAD: it is in the state dict (it cannot be redrawn
    without the generator's state) but not among the parameters, so no optimizer touches it; every
    rank must hold the same table (HEAD broadcasts rank 0's).
    """

    def __init__(self, rows=HEAD_TABLE_ROWS, dim=HEAD_DIM, sign_rows=HEAD_SIGN_ROWS, generator=None):
        super().__init__()
        # Zeros made directly: HEAD's nn.Embedding draws a normal init first and zeroes it, which
        # only consumes 290 million draws of the global generator before the sign table's.
        self.table = nn.Parameter(torch.zeros(rows, dim))
        self.register_buffer("signs", sign_table(sign_rows, dim, generator))

    def forward(self, hash_ids, sign_ids):
        rows = F.embedding(hash_ids, self.table)
        return rows * self.signs[sign_ids].to(rows.dtype)
