"""Batches for training and validation, each rank taking its own deterministic slice.

A global batch is `batch_tokens` consecutive tokens of the training stream cut into rows
of `seq_len` (plus one token for the shifted targets). Rank r takes the r-th contiguous
block of rows and splits it into micro-batches, so the rows that enter one optimizer
step are the same for any world size: only who computes which gradient changes.
"""
import numpy as np
import torch

from data.shards import ShardError, read_header, read_tokens


def _to_device(array, device):
    tensor = torch.from_numpy(array.astype(np.int64))
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


class TrainLoader:
    def __init__(self, paths, batch_tokens, seq_len, micro_batch_tokens, rank, world_size, device):
        if batch_tokens % (world_size * micro_batch_tokens) or micro_batch_tokens % seq_len:
            raise ValueError("batch_tokens must split into world_size x micro-batches of whole sequences")
        self.paths = list(paths)
        self.batch_tokens = batch_tokens
        self.seq_len = seq_len
        self.rows_per_rank = batch_tokens // seq_len // world_size
        self.rows_per_micro = micro_batch_tokens // seq_len
        self.rank = rank
        self.device = device
        self.shard_index = 0
        self.position = 0
        self._tokens = None

    @property
    def accumulation_steps(self):
        return self.rows_per_rank // self.rows_per_micro

    def state_dict(self):
        return {"shard_index": self.shard_index, "position": self.position}

    def load_state_dict(self, state):
        self.shard_index, self.position = state["shard_index"], state["position"]
        self._tokens = None

    def _current_tokens(self):
        if self._tokens is None:
            self._tokens = read_tokens(self.paths[self.shard_index])
        return self._tokens

    def _advance_to_shard_with_room(self):
        # A shard's tail shorter than one global batch is skipped rather than stitched to the next shard.
        while self.shard_index < len(self.paths):
            if self.position + self.batch_tokens + 1 <= len(self._current_tokens()):
                return
            self.shard_index += 1
            self.position = 0
            self._tokens = None
        total = sum(read_header(p) for p in self.paths)
        raise ShardError(
            f"training data exhausted: each step needs {self.batch_tokens} tokens and the "
            f"{len(self.paths)} train file(s) hold {total}; add shards or lower --steps"
        )

    def next_batch(self):
        """The micro-batches (inputs, targets) of this rank for the next optimizer step."""
        self._advance_to_shard_with_room()
        chunk = self._current_tokens()[self.position : self.position + self.batch_tokens + 1]
        self.position += self.batch_tokens
        all_rows = np.lib.stride_tricks.sliding_window_view(chunk, self.seq_len + 1)[:: self.seq_len]
        first_row = self.rank * self.rows_per_rank
        micro_batches = []
        for start in range(first_row, first_row + self.rows_per_rank, self.rows_per_micro):
            rows = all_rows[start : start + self.rows_per_micro]
            micro_batches.append((_to_device(rows[:, :-1], self.device), _to_device(rows[:, 1:], self.device)))
        return micro_batches


def count_tokens(paths):
    return sum(read_header(p) for p in paths)


def validation_batches(paths, val_tokens, seq_len, micro_batch_tokens, rank, world_size, device):
    """This rank's share of the first `val_tokens` tokens of the val files, as (inputs, targets).

    Every rank gets val_tokens / world_size consecutive tokens; the caller sums per-token
    losses over ranks, so the mean is the same whatever the world size.
    """
    per_rank = val_tokens // world_size
    needed = val_tokens + 1  # the last target is one token past the last input
    stream, have = [], 0
    for path in paths:
        if have >= needed:
            break
        tokens = read_tokens(path)
        stream.append(tokens[: needed - have])
        have += len(stream[-1])
    if have < needed:
        raise ShardError(f"val files hold {have} tokens, fewer than --val-tokens {val_tokens} + 1")
    tokens = np.concatenate(stream)[rank * per_rank : (rank + 1) * per_rank + 1]
    rows_per_micro = max(1, micro_batch_tokens // seq_len)
    for start in range(0, per_rank, rows_per_micro * seq_len):
        end = min(per_rank, start + rows_per_micro * seq_len)
        inputs = tokens[start:end].reshape(-1, seq_len)
        targets = tokens[start + 1 : end + 1].reshape(-1, seq_len)
        yield _to_device(inputs, device), _to_device(targets, device)
