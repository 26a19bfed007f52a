"""A float32 master weight kept as a bf16 tensor plus a uint16 "mantissa" of its lower 16 bits.

bf16 is the upper half of a float32: same sign bit, same 8 exponent bits, the first 7 of the 23
mantissa bits. So a float32 splits, with integer views and no arithmetic, into a bf16 (its upper 16
bits) and a uint16 (its lower 16), and the two join back into exactly the same float32, bit for bit,
whatever the value (negative numbers, signed zeros, subnormals, infinities and NaNs included).

Why (the leaderboard's current record, docs/RECORD-HEAD.md section 5.1): the model's weights are
stored bf16, so the forward and backward read half the bytes and no kernel casts them, while the
optimizer keeps the lower halves in its state and updates the exact float32 master: 2 bytes extra
per weight instead of the 4 of a separate float32 copy. The bf16 weight the forward sees is the
master TRUNCATED to bf16 (rounded toward zero, the plain upper half), not rounded to nearest as a
cast would round it: at most one bf16 unit in the last place smaller in magnitude.
"""
import torch


def split(master):
    """(bf16 tensor: master's upper 16 bits, uint16 tensor: its lower 16 bits) of a float32 tensor."""
    if master.dtype != torch.float32:
        raise TypeError(f"split takes a float32 tensor, got {master.dtype}")
    bits = master.view(torch.int32)
    # An arithmetic shift leaves the upper half as a value in int16's range: the conversion is exact.
    upper = (bits >> 16).to(torch.int16).view(torch.bfloat16)
    lower = (bits & 0xFFFF).to(torch.uint16)  # in [0, 65535]: exact
    return upper, lower


def join(upper, lower):
    """The float32 tensor whose upper 16 bits are bf16 `upper`'s and lower 16 bits uint16 `lower`'s."""
    if upper.dtype != torch.bfloat16 or lower.dtype != torch.uint16:
        raise TypeError(f"join takes a bf16 and a uint16 tensor, got {upper.dtype} and {lower.dtype}")
    high = upper.view(torch.int16).to(torch.int32) << 16  # the sign-extended bits shift out
    return (high | lower.to(torch.int32)).view(torch.float32)
