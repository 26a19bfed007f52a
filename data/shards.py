"""The token shard format shared with llm.c and modded-nanogpt.

A shard is a 256-int32 header (magic, version, token count, then zeros) followed by
the token ids as little-endian uint16. Every document starts with <|endoftext|>.
"""
import glob
import os

import numpy as np

from config import EOT_TOKEN, GPT2_VOCAB_SIZE  # noqa: F401 - the shards' tokenizer facts, for data's users

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4


class ShardError(ValueError):
    """A shard file is missing, unreadable or not in the expected format."""


def read_header(path):
    """Validates the header and file size of one shard and returns its token count."""
    try:
        with open(path, "rb") as f:
            header = np.frombuffer(f.read(HEADER_BYTES), dtype="<i4")
    except OSError as e:
        raise ShardError(f"cannot read shard {path}: {e.strerror or e}") from None
    if header.size != HEADER_INTS:
        raise ShardError(f"shard {path} is too short to hold a header ({header.size * 4} of {HEADER_BYTES} bytes)")
    if header[0] != SHARD_MAGIC:
        raise ShardError(f"shard {path} has magic {header[0]}, expected {SHARD_MAGIC}: not a token shard")
    if header[1] != SHARD_VERSION:
        raise ShardError(f"shard {path} has version {header[1]}, expected {SHARD_VERSION}")
    num_tokens = int(header[2])
    expected = HEADER_BYTES + 2 * num_tokens
    actual = os.path.getsize(path)
    if actual != expected:
        raise ShardError(
            f"shard {path} is {actual} bytes but its header promises {num_tokens} tokens ({expected} bytes): "
            "truncated or corrupt, download or tokenize it again"
        )
    return num_tokens


def read_tokens(path):
    """Reads one shard's tokens into memory as a uint16 array, after checking its header."""
    num_tokens = read_header(path)
    try:
        with open(path, "rb") as f:
            f.seek(HEADER_BYTES)
            tokens = np.frombuffer(f.read(), dtype="<u2")
    except OSError as e:
        raise ShardError(f"cannot read shard {path}: {e.strerror or e}") from None
    if tokens.size != num_tokens:
        raise ShardError(f"shard {path} changed while being read ({tokens.size} of {num_tokens} tokens)")
    return tokens


def write_shard(path, tokens):
    """Writes tokens (ints below 2**16) as one shard, atomically: a crash leaves no partial file."""
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2**16):
        raise ValueError("token ids must fit in uint16")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (SHARD_MAGIC, SHARD_VERSION, tokens.size)
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype("<u2").tobytes())
    os.replace(tmp, path)


def whole_steps_in_shard(num_tokens, batch_tokens):
    """Optimizer steps of contiguous batches that one shard serves. A batch reads batch_tokens + 1
    tokens (the targets run one past the inputs), batches do not cross shards, and a shorter tail is
    skipped: so (num_tokens - 1) // batch_tokens, and none for an empty shard."""
    return max(num_tokens - 1, 0) // batch_tokens


def find_shards(pattern, flag):
    """Expands a glob into a sorted list of files, or fails naming the flag that set it."""
    paths = sorted(glob.glob(pattern))
    if not paths:
        raise ShardError(f"no files match {flag} '{pattern}': check the path, or download/tokenize the data first")
    return paths
