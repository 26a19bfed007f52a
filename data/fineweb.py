"""Tokenize FineWeb (or local JSONL/parquet files with a `text` field) into GPT-2 token shards.

    python data/fineweb.py                                  # FineWeb sample-10BT -> data/fineweb10B/
    python data/fineweb.py --version 100B                   # sample-100BT -> data/fineweb100B/
    python data/fineweb.py --edu                            # FineWeb-Edu sample-10BT -> data/finewebedu10B/
    python data/fineweb.py --local-files docs.jsonl --out-dir /tmp/shards --name docs --shard-size 1000000

Documents are streamed (never the whole dataset in memory), tokenized in a process pool with
tiktoken's GPT-2 encoding, each prefixed with <|endoftext|>, and written as they fill:
the first shard is the validation shard, the rest are training shards.
"""
import argparse
import itertools
import multiprocessing
import os
import sys

import numpy as np

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.shards import EOT_TOKEN, write_shard  # noqa: E402
from data.tokenizer import TokenizerUnavailable, gpt2_encoding  # noqa: E402

DOCUMENTS_PER_BATCH = 512  # per worker: how far reading runs ahead of tokenizing

HUB_DATASETS = {  # (dataset, version) -> (hub repo, config name, output folder, shard name)
    ("fineweb", "10B"): ("HuggingFaceFW/fineweb", "sample-10BT", "fineweb10B", "fineweb"),
    ("fineweb", "100B"): ("HuggingFaceFW/fineweb", "sample-100BT", "fineweb100B", "fineweb"),
    ("edu", "10B"): ("HuggingFaceFW/fineweb-edu", "sample-10BT", "finewebedu10B", "finewebedu"),
    ("edu", "100B"): ("HuggingFaceFW/fineweb-edu", "sample-100BT", "finewebedu100B", "finewebedu"),
}

def tokenize(text):
    """<|endoftext|> followed by the document's GPT-2 tokens, as uint16."""
    return np.asarray([EOT_TOKEN] + gpt2_encoding().encode_ordinary(text), dtype=np.uint16)  # GPT-2 ids < 2**16


def _tokenize_document(document):
    return tokenize(document["text"])


def stream_documents(local_files=None, hub_repo=None, hub_config=None):
    """Yields documents (dicts with a `text` field) one at a time from local files or the hub."""
    import datasets

    if local_files:
        for path in local_files:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"--local-files: no such file {path}")
        parquet = [p.endswith(".parquet") for p in local_files]
        if any(parquet) and not all(parquet):
            raise ValueError("--local-files: give JSONL files or parquet files, not a mix (run the script once for each)")
        kind = "parquet" if all(parquet) else "json"
        dataset = datasets.load_dataset(kind, data_files=list(local_files), split="train", streaming=True)
    else:
        dataset = datasets.load_dataset(hub_repo, name=hub_config, split="train", streaming=True)
    return iter(dataset)


class ShardWriter:
    """Packs token arrays into fixed-size shards, writing each one as soon as it is full."""

    def __init__(self, out_dir, name, shard_size):
        os.makedirs(out_dir, exist_ok=True)
        self.out_dir, self.name, self.shard_size = out_dir, name, shard_size
        self.buffer = np.empty(shard_size, dtype=np.uint16)
        self.filled = 0
        self.index = 0
        self.paths = []

    def add(self, tokens):
        while len(tokens):
            take = min(len(tokens), self.shard_size - self.filled)
            self.buffer[self.filled : self.filled + take] = tokens[:take]
            self.filled += take
            tokens = tokens[take:]
            if self.filled == self.shard_size:
                self._flush()

    def _flush(self):
        split = "val" if self.index == 0 else "train"
        path = os.path.join(self.out_dir, f"{self.name}_{split}_{self.index:06d}.bin")
        write_shard(path, self.buffer[: self.filled])
        self.paths.append(path)
        self.index += 1
        self.filled = 0

    def close(self):
        if self.filled:
            self._flush()
        return self.paths


def _tokenize_in_batches(pool, documents, batch_size):
    """Token arrays in document order. Pool.imap alone would read the whole input ahead of the
    workers; feeding it a batch at a time keeps memory bounded."""
    documents = iter(documents)
    while batch := list(itertools.islice(documents, batch_size)):
        yield from pool.imap(_tokenize_document, batch, chunksize=16)


def tokenize_to_shards(documents, out_dir, name, shard_size, workers, max_tokens=None, progress=True):
    """Tokenizes an iterable of documents into shards; returns the paths written."""
    from tqdm import tqdm

    writer = ShardWriter(out_dir, name, shard_size)
    total = 0
    bar = tqdm(total=max_tokens, unit="tok", unit_scale=True, desc=f"tokenizing into {out_dir}", disable=not progress)
    with multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else _InlinePool() as pool:
        for tokens in _tokenize_in_batches(pool, documents, DOCUMENTS_PER_BATCH * workers):
            if max_tokens is not None and total + len(tokens) > max_tokens:
                tokens = tokens[: max_tokens - total]
            writer.add(tokens)
            total += len(tokens)
            bar.update(len(tokens))
            if max_tokens is not None and total >= max_tokens:
                break
    bar.close()
    return writer.close()


class _InlinePool:
    """The Pool interface, in this process: for one worker, and for tests."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def imap(self, fn, iterable, chunksize=1):
        return map(fn, iterable)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--version", choices=["10B", "100B"], default="10B", help="FineWeb sample size")
    parser.add_argument("--edu", action="store_true", help="FineWeb-Edu instead of FineWeb")
    parser.add_argument("--local-files", nargs="+", help="JSONL or parquet files with a `text` field, instead of the hub")
    parser.add_argument("--out-dir", help="where shards go (default data/<dataset folder>)")
    parser.add_argument("--name", help="shard file prefix (default fineweb / finewebedu; the first local file's stem)")
    parser.add_argument("--shard-size", type=int, default=10**8, help="tokens per shard (default 100M)")
    parser.add_argument("--max-tokens", type=int, help="stop after this many tokens")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1), help="tokenizer processes")
    args = parser.parse_args(argv)
    if args.shard_size <= 0:
        parser.error("--shard-size must be positive")

    hub_repo, hub_config, folder, name = HUB_DATASETS[("edu" if args.edu else "fineweb", args.version)]
    if args.local_files:
        name = os.path.splitext(os.path.basename(args.local_files[0]))[0]
    out_dir = args.out_dir or os.path.join(os.path.dirname(os.path.abspath(__file__)), folder)
    try:
        gpt2_encoding()  # fetched on first use: fail here, not in a worker
    except TokenizerUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    source = " ".join(args.local_files) if args.local_files else f"{hub_repo} ({hub_config})"
    try:
        documents = stream_documents(args.local_files, hub_repo, hub_config)
        paths = tokenize_to_shards(documents, out_dir, args.name or name, args.shard_size, args.workers,
                                   args.max_tokens)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (ConnectionError, OSError) as e:
        print(f"error: could not read {source} ({type(e).__name__}: {e}); check the network, or use --local-files",
              file=sys.stderr)
        return 1
    print(f"wrote {len(paths)} shard(s) to {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
