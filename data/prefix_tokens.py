"""Prefix tokens (HEAD, record #88): for each token id, the id of the longest proper prefix of the
token's bytes that is itself a token, or NO_PREFIX.

The prefix-token loss (model/loss.py) adds a cross-entropy term for the prefix of each next-token
target: an easier guess that is right whenever the full target is. The table comes from the
vocabulary alone, never from the training data. Special tokens (GPT-2's <|endoftext|>) and the
padding ids past the encoding's vocabulary have no prefix and are no one's prefix, as in HEAD,
which builds its table from the encoding's ordinary (mergeable) tokens only.

On GPT-2, 50,000 ids have a prefix: every ordinary token of two or more bytes (its first byte is a
token); the 256 single bytes, <|endoftext|> and the padding do not.
"""
import torch

from data.tokenizer import gpt2_encoding

NO_PREFIX = -1


def prefix_table_from_bytes(token_bytes):
    """The prefix table of a vocabulary given as each id's bytes (None for an id that is not an
    ordinary token): a list with, for each id, the id whose bytes are the longest proper prefix of
    its bytes, or NO_PREFIX. Byte strings must be distinct."""
    ids = {b: i for i, b in enumerate(token_bytes) if b is not None}
    if len(ids) != sum(b is not None for b in token_bytes):
        raise ValueError("two ids have the same bytes")
    return [NO_PREFIX if b is None else _longest_proper_prefix(b, ids) for b in token_bytes]


def _longest_proper_prefix(token, ids):
    # Tokens are short (GPT-2's longest is 128 bytes), so probing every length is cheap.
    for length in range(len(token) - 1, 0, -1):
        prefix = ids.get(token[:length])
        if prefix is not None:
            return prefix
    return NO_PREFIX


def ordinary_token_bytes(encoding):
    """Each id's bytes in a tiktoken Encoding, None for its special tokens and unused ids."""
    special = {encoding.encode_single_token(name) for name in encoding.special_tokens_set}
    return [None if i in special else _token_bytes(encoding, i) for i in range(encoding.n_vocab)]


def _token_bytes(encoding, i):
    try:
        return encoding.decode_single_token_bytes(i)
    except KeyError:  # an id inside n_vocab that no token has
        return None


def prefix_table(encoding, vocab_size):
    """The prefix table of a tiktoken Encoding as an int64 tensor of the model's vocab_size ids (the
    encoding's, padded; 50304 for GPT-2's 50257): NO_PREFIX for special tokens and padding ids."""
    table = prefix_table_from_bytes(ordinary_token_bytes(encoding))
    if vocab_size < len(table):
        raise ValueError(f"vocab size {vocab_size} is smaller than the encoding's {len(table)} ids")
    return torch.tensor(table + [NO_PREFIX] * (vocab_size - len(table)), dtype=torch.int64)


def gpt2_prefix_table(vocab_size):
    """GPT-2's prefix table for a model of vocab_size ids (see prefix_table)."""
    return prefix_table(gpt2_encoding(), vocab_size)
