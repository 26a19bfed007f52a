"""Batches for training and validation, each rank taking its own deterministic slice.

A global batch is `batch_tokens / seq_len` rows of `seq_len + 1` tokens (inputs plus the
shifted targets). Every rank builds the same list of rows and takes the r-th contiguous
block, split into micro-batches, so the rows of one optimizer step do not depend on the
world size: only who computes which gradient changes. Where the rows do not split evenly
(8 rows on 3 GPUs) the first ranks take one row more (3, 3, 2), and training/loop.py weighs
each micro-batch by the rows it holds, so the update is the same on any number of ranks.

A row too long for one forward pass on a small card is split at document starts into pieces
of at most `piece_tokens` tokens, each a micro-batch of its own (BOS-aligned rows only). With
document masking no attention crosses a document, so a piece computes what its part of the
row computed, except where a technique reads across a document's start: the one-token
look-back gate, the key offset and the bigram hash see no token before a piece, and the
multi-token loss scores no target past a piece's end. Every piece of a stage is padded to one
length, min(piece_tokens, the stage's row length), with <|endoftext|> inputs after its end
(causal attention: no real position sees them) and IGNORED_TARGET targets (no loss term):
compiled, a stage is one graph, not one per piece length, and float8 matmuls get the multiples
of 16 rows they need.

Rows come from the token stream in one of two ways:
- contiguous: consecutive slices of the stream, as the early speedrun records read it;
- BOS-aligned: every row starts at a document's <|endoftext|>, documents are packed one
  after another (each cut to `max_doc_len` tokens, the stage's where the run's stages give one
  (HEAD: 896 in its first stage, 2048 after), the rest of a cut document dropped), and the
  row's last document is cut to fit; the next row starts at the next document. When a shard
  has no document left for a row, the row goes on at the next shard's first document
  (`restart_at_shard_end=False`), or, as record #46 and the leaderboard's HEAD read it, the
  step's rows made so far are dropped with the rest of the shard and the step starts again at
  the next shard's first document.
"""
import bisect
import hashlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from config import stage_at
from data.shards import EOT_TOKEN, ShardError, read_header, read_tokens


class _ShardEnd(Exception):
    """A step ran out of documents in its shard (with restart_at_shard_end)."""


def _to_device(array, device):
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.int64))
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


# A target that adds no loss term (F.cross_entropy's ignore_index; outside the vocabulary for HEAD's loss).
IGNORED_TARGET = -100


def rank_rows(num_rows, rank, world_size):
    """(first, end) of the rows that `rank` computes out of num_rows: whole rows, contiguous, the first
    num_rows % world_size ranks one more than the rest."""
    if num_rows < world_size:
        raise ValueError(f"{num_rows} row(s) cannot give each of {world_size} ranks a whole row")
    base, extra = divmod(num_rows, world_size)
    first = rank * base + min(rank, extra)
    return first, first + base + (rank < extra)


class MicroBatches(list):
    """One step's micro-batches of one rank, (inputs, targets) each, and the share of the step each holds.

    rows: how many of the step's rows each micro-batch holds (a piece of a row: its fraction of the
    row's tokens); rows_per_rank: the step's rows over the world size, what a rank's losses are
    averaged against (training/loop.py), the same on every rank however the rows fall."""

    def __init__(self, micro_batches, rows, rows_per_rank):
        super().__init__(micro_batches)
        self.rows, self.rows_per_rank = list(rows), rows_per_rank


def micro_batch_shares(micro_batches):
    """(rows of each micro-batch, rows per rank): MicroBatches' own, or for a plain list of micro-batches
    of whole rows (the tools' synthetic batches) the rows they hold, this rank's as every rank's."""
    if isinstance(micro_batches, MicroBatches):
        return micro_batches.rows, micro_batches.rows_per_rank
    rows = [inputs.size(0) for inputs, _ in micro_batches]
    return rows, sum(rows)


def split_at_documents(row, piece_tokens, bos_token):
    """[(first, end)] input positions of the pieces of a BOS-aligned row (seq_len + 1 tokens): each the
    longest run of whole documents of at most piece_tokens inputs; a document longer than that is refused."""
    seq_len = len(row) - 1
    starts = [int(i) for i in np.flatnonzero(row[:seq_len] == bos_token)]
    if not starts or starts[0] != 0:
        raise ValueError("a row split at documents must start at a document's first token")
    ends = starts[1:] + [seq_len]
    pieces, first = [], 0
    for start, end in zip(starts, ends):
        if end - start > piece_tokens:
            raise ValueError(f"a document of {end - start} tokens does not fit a piece of {piece_tokens} tokens: "
                             "lower the stage's document length (--max-doc-len-stages) or raise the piece size")
        if end - first > piece_tokens:
            pieces.append((first, start))
            first = start
    pieces.append((first, seq_len))
    return pieces


def padded_piece(row, first, end, length, bos_token):
    """(inputs, targets) int64 arrays of one row's piece (inputs [first, end), targets [first + 1, end + 1)),
    padded to `length` positions: <|endoftext|> inputs and IGNORED_TARGET targets after the piece."""
    inputs = np.full((1, length), bos_token, dtype=np.int64)
    targets = np.full((1, length), IGNORED_TARGET, dtype=np.int64)
    inputs[0, : end - first] = row[first:end]
    targets[0, : end - first] = row[first + 1 : end + 1]
    return inputs, targets


def read_checked_tokens(path, vocab_size):
    """A shard's tokens, after checking that every id is inside the vocabulary."""
    tokens = read_tokens(path)
    if tokens.size and tokens.max() >= vocab_size:
        bad = int(np.argmax(tokens >= vocab_size))
        raise ShardError(f"shard {path} holds token id {tokens[bad]} at position {bad}, outside the vocabulary "
                         f"of {vocab_size}: ids of a larger vocabulary (check --vocab-size), or corrupt")
    return tokens


class TrainLoader:
    def __init__(self, paths, batch_tokens, seq_len, micro_batch_tokens, rank, world_size, device,
                 bos_align=False, bos_token=EOT_TOKEN, max_doc_len=None, wrap=False, vocab_size=50257, prefetch=True,
                 stages=None, restart_at_shard_end=False, piece_tokens=None):
        if batch_tokens % seq_len or micro_batch_tokens % seq_len:
            raise ValueError("batch_tokens and micro_batch_tokens must be whole rows of seq_len tokens")
        if piece_tokens and not bos_align:
            raise ValueError("rows are split at documents only when they start at one (bos_align)")
        self.paths = list(paths)
        self.batch_tokens = batch_tokens
        self.seq_len = seq_len
        self.num_rows = batch_tokens // seq_len
        self.first_row, self.end_row = rank_rows(self.num_rows, rank, world_size)
        self.rows_per_rank = self.num_rows / world_size  # what each row's loss is averaged against
        self.rows_per_micro = micro_batch_tokens // seq_len
        self.piece_tokens = piece_tokens  # None: whole rows in each micro-batch
        self.rank = rank
        self.device = device
        self.bos_align = bos_align
        self.restart_at_shard_end = restart_at_shard_end
        self.bos_token = bos_token
        self.max_doc_len = max_doc_len or seq_len + 1
        self.wrap = wrap
        self.vocab_size = vocab_size
        # The run's stages (config.Stage records): a batch-size schedule (record #46) makes a stage's
        # rows m times longer, so a step has m times the tokens with the same number of rows (and
        # micro-batches) per rank. Without stages, every step is one batch of batch_tokens.
        self.stages = stages
        # The next shard is read and checked on a background thread while this one is consumed.
        self._executor = ThreadPoolExecutor(max_workers=1) if prefetch else None
        self._pending = {}
        self._moves_without_data = 0
        self.shard_index, self.position, self.epoch, self.steps_served = 0, 0, 0, 0
        self._shard = None
        self._kept = {}  # the last shards read, by index: a rewind (after warm-up) re-reads nothing
        self._prepared = None  # (state before it, micro-batches): the next step's batch, made early

    def _row_length(self, step):
        if not self.stages:
            return self.seq_len
        return stage_at(self.stages, step).seq_len

    def _doc_limit(self, step, seq_len):
        """The most tokens a BOS-aligned row takes of one document at `step`: the step's stage's
        max_doc_len where it gives one (0: no limit, the row's own length), else the loader's."""
        stage = stage_at(self.stages, step) if self.stages else None
        if stage is None or stage.max_doc_len is None:
            return self.max_doc_len
        return stage.max_doc_len or seq_len + 1

    def serve_as_step(self, step):
        """The next batch has the shape of `step`'s stage (a warm-up visits each stage's shapes)."""
        self.steps_served = step
        self._prepared = None

    @property
    def accumulation_steps(self):
        """Forward passes a step on this rank (with pieces: at least, one per row)."""
        return -(-(self.end_row - self.first_row) // (1 if self.piece_tokens else self.rows_per_micro))

    def state_dict(self):
        """The position of the next batch that next_batch() returns (a prepared one is not consumed)."""
        if self._prepared:
            return dict(self._prepared[0])
        return {"shard_index": self.shard_index, "position": self.position, "epoch": self.epoch,
                "steps_served": self.steps_served}

    def load_state_dict(self, state):
        self.shard_index, self.position = state["shard_index"], state["position"]
        self.epoch, self.steps_served = state["epoch"], state["steps_served"]
        self._shard = self._kept.get(self.shard_index)
        self._prepared = None

    # -- shards

    def _next_index(self, index):
        return (index + 1) % len(self.paths) if self.wrap else index + 1

    def _read_shard(self, index):
        """(tokens, positions of document starts); the starts only when rows are aligned to them."""
        tokens = read_checked_tokens(self.paths[index], self.vocab_size)
        return tokens, np.flatnonzero(tokens == self.bos_token) if self.bos_align else None

    def _request(self, index):
        if self._executor and index < len(self.paths) and index not in self._pending:
            self._pending[index] = self._executor.submit(self._read_shard, index)

    def _load(self, index):
        if index in self._kept:
            return self._kept[index]
        future = self._pending.pop(index, None)
        shard = future.result() if future else self._read_shard(index)
        self._pending.clear()
        self._request(self._next_index(index))
        self._kept = {i: s for i, s in self._kept.items() if i == self.shard_index - 1}
        self._kept[index] = shard
        return shard

    def _tokens(self):
        if self._shard is None:
            self._shard = self._load(self.shard_index)
        return self._shard

    def _move_to_next_shard(self):
        self._moves_without_data += 1
        if self.wrap and self._moves_without_data > len(self.paths):
            start = f" starting at id {self.bos_token}" if self.bos_align else ""
            raise ShardError(f"none of the {len(self.paths)} train file(s) holds enough data for one row of "
                             f"{self.seq_len + 1} tokens{start}")
        self.shard_index = self._next_index(self.shard_index)
        if self.shard_index == 0:
            self.epoch += 1
        self.position = 0
        self._shard = None
        if self.shard_index >= len(self.paths):
            total = sum(read_header(p) for p in self.paths)
            needed = ""
            if self.stages:
                needed_tokens = sum(s.steps * s.tokens_per_step for s in self.stages)
                needed = f"the run needs {needed_tokens:,} tokens ({self.stages[-1].end_step} steps) and "
            raise ShardError(
                f"training data exhausted after {self.steps_served} steps of {self.batch_tokens:,} tokens: {needed}"
                f"the {len(self.paths)} train file(s) hold {total:,} tokens; add shards, lower --steps, "
                "or set --data-wrap true to repeat the data")

    # -- rows

    def _contiguous_rows(self, batch_tokens, seq_len):
        # A batch reads batch_tokens + 1 tokens from the position; a shard's tail shorter than that is
        # skipped rather than stitched to the next shard, and an empty shard serves none (from position
        # 0 this serves whole_steps_in_shard batches). Checked from the position itself, because a
        # resume may continue with another --batch-tokens from a position that is not a multiple of it.
        while self.position + batch_tokens + 1 > len(self._tokens()[0]):
            self._move_to_next_shard()
        tokens = self._tokens()[0]
        chunk = tokens[self.position : self.position + batch_tokens + 1]
        self.position += batch_tokens
        rows = np.lib.stride_tricks.sliding_window_view(chunk, seq_len + 1)[::seq_len]
        return [[row] for row in rows]

    def _aligned_row(self, seq_len, max_doc_len):
        """The pieces (token array views) of one BOS-aligned row of seq_len + 1 tokens, each document cut to
        max_doc_len tokens."""
        needed, pieces = seq_len + 1, []
        while needed:
            tokens, starts = self._tokens()
            i = bisect.bisect_left(starts, self.position)
            if i == len(starts):  # no document starts in the rest of this shard
                if self.restart_at_shard_end:
                    raise _ShardEnd
                self._move_to_next_shard()
                continue
            doc_start = int(starts[i])
            doc_end = int(starts[i + 1]) if i + 1 < len(starts) else len(tokens)
            take = min(doc_end - doc_start, max_doc_len, needed)
            pieces.append(tokens[doc_start : doc_start + take])
            needed -= take
            self._moves_without_data = 0
            self.position = doc_end  # the rest of a cut or truncated document is skipped
        return pieces

    def _aligned_rows(self, num_rows, seq_len, max_doc_len):
        restarts = 0
        while True:
            try:
                return [self._aligned_row(seq_len, max_doc_len) for _ in range(num_rows)]
            except _ShardEnd:  # the rows made so far and the rest of the shard are dropped
                restarts += 1
                if self.wrap and restarts > len(self.paths):
                    raise ShardError(f"none of the {len(self.paths)} train file(s) holds the documents of one step "
                                     f"of {num_rows} rows of {seq_len + 1} tokens") from None
                self._move_to_next_shard()

    def next_batch(self):
        """The micro-batches (inputs, targets) of this rank for the next optimizer step."""
        if self._prepared:
            batch, self._prepared = self._prepared[1], None
            if isinstance(batch, ShardError):
                raise batch
            return batch
        return self._make_batch()

    def prefetch(self):
        """Makes the next step's batch now: slicing, pinned host copy and an asynchronous copy to
        the GPU overlap with the step the GPU is still computing. A data error is raised when the
        batch is asked for, so the step in flight still finishes and is logged."""
        if not self._prepared:
            state = self.state_dict()
            try:
                self._prepared = (state, self._make_batch())
            except ShardError as e:
                self._prepared = (state, e)

    def _make_batch(self):
        num_rows = self.batch_tokens // self.seq_len
        seq_len = self._row_length(self.steps_served)
        self._moves_without_data = 0
        rows = (self._aligned_rows(num_rows, seq_len, self._doc_limit(self.steps_served, seq_len)) if self.bos_align
                else self._contiguous_rows(num_rows * seq_len, seq_len))
        mine = [np.concatenate(pieces) for pieces in rows[self.first_row : self.end_row]]
        micro_batches, shares = [], []
        if self.piece_tokens:
            length = min(self.piece_tokens, seq_len)  # one shape a stage
            for row in mine:
                for first, end in split_at_documents(row, self.piece_tokens, self.bos_token):
                    inputs, targets = padded_piece(row, first, end, length, self.bos_token)
                    micro_batches.append((_to_device(inputs, self.device), _to_device(targets, self.device)))
                    shares.append((end - first) / seq_len)
        else:
            for start in range(0, len(mine), self.rows_per_micro):
                block = np.stack(mine[start : start + self.rows_per_micro])
                micro_batches.append(self._on_device(block))
                shares.append(len(block))
        self.steps_served += 1
        return MicroBatches(micro_batches, shares, self.rows_per_rank)

    def _on_device(self, block):
        """(inputs, targets) of rows of seq_len + 1 tokens."""
        return _to_device(block[:, :-1], self.device), _to_device(block[:, 1:], self.device)

    def close(self):
        if self._executor:
            self._executor.shutdown(wait=True, cancel_futures=True)


def count_tokens(paths):
    return sum(read_header(p) for p in paths)


def load_validation_tokens(paths, val_tokens, rank, world_size, vocab_size=50257, row_len=None):
    """(this rank's share of the first `val_tokens` tokens of the val files plus one token for targets,
    the sha256 of all val_tokens + 1 tokens read).

    The val set is the contiguous stream, as the leaderboard defines it. Each rank gets whole rows
    of row_len consecutive tokens (default: val_tokens / world_size, one row a rank), the first ranks
    one more where they do not split evenly; the caller sums per-token losses over ranks, so the
    mean is the same whatever the world size. The hash is of the tokens as the shards store them
    (little-endian uint16), so two runs validated on the same tokens have the same one whatever the
    files are called. Read once per run, not per validation.
    """
    row_len = row_len or val_tokens // world_size
    if val_tokens % row_len:
        raise ValueError(f"{val_tokens} validation tokens are not whole rows of {row_len}")
    first, end = rank_rows(val_tokens // row_len, rank, world_size)
    needed = val_tokens + 1  # the last target is one token past the last input
    stream, have = [], 0
    for path in paths:
        if have >= needed:
            break
        stream.append(read_checked_tokens(path, vocab_size)[: needed - have])
        have += len(stream[-1])
    if have < needed:
        raise ShardError(f"val files hold {have} tokens, fewer than --val-tokens {val_tokens} + 1")
    stream = np.concatenate(stream)
    sha256 = hashlib.sha256(stream.astype("<u2").tobytes()).hexdigest()
    return stream[first * row_len : end * row_len + 1], sha256


def validation_batches(tokens, seq_len, micro_batch_tokens, device):
    """(inputs, targets) micro-batches over a rank's validation tokens."""
    per_rank = len(tokens) - 1
    rows_per_micro = max(1, micro_batch_tokens // seq_len)
    for start in range(0, per_rank, rows_per_micro * seq_len):
        end = min(per_rank, start + rows_per_micro * seq_len)
        inputs = tokens[start:end].reshape(-1, seq_len)
        targets = tokens[start + 1 : end + 1].reshape(-1, seq_len)
        yield _to_device(inputs, device), _to_device(targets, device)
