"""Tokenize FineWeb (or local JSONL/parquet files with a `text` field) into GPT-2 token shards.

    python data/fineweb.py                                  # FineWeb sample-10BT -> data/fineweb10B/
    python data/fineweb.py --version 100B                   # sample-100BT -> data/fineweb100B/
    python data/fineweb.py --edu                            # FineWeb-Edu sample-10BT -> data/finewebedu10B/
    python data/fineweb.py --local-files docs.jsonl --out-dir /tmp/shards --name docs --shard-size 1000000

Documents are streamed (never the whole dataset in memory), tokenized in a process pool with
tiktoken's GPT-2 encoding, each prefixed with <|endoftext|>, and written as they fill:
the first shard is the validation shard, the rest are training shards. Local JSONL files may be
gzip-compressed (.jsonl.gz). A folder that already holds shards of the same name is refused
(they could be a download, or a longer set the new one would mix with) unless --overwrite,
which removes that set's shards first.
"""
import argparse
import gzip
import itertools
import json
import multiprocessing
import os
import re
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


class InputError(ValueError):
    """A local file that does not hold documents with a string `text`; the message says where."""


_JSON_TYPE_NAMES = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number",
                    bool: "a boolean", type(None): "null"}


def _jsonl_texts(path):
    """The `text` of each line of a JSON Lines file, checked here in the reading process so that a
    bad line is reported by file and line number, whichever process would have tokenized it."""
    opener = gzip.open if path.endswith(".gz") else open
    line_number, documents = 0, 0
    try:
        with opener(path, "rb") as f:  # bytes: a line that is not UTF-8 is reported, not replaced
            for line_number, raw_line in enumerate(f, 1):
                where = f"{path} line {line_number}"
                try:
                    line = raw_line.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise InputError(f"{where}: not UTF-8 text (byte 0x{raw_line[e.start]:02x} at column "
                                     f"{e.start + 1})") from None
                if not line.strip():
                    continue  # a blank line, such as a trailing one, holds no document
                try:
                    document = json.loads(line)
                except json.JSONDecodeError as e:
                    raise InputError(f"{where}: not valid JSON ({e.msg}, column {e.colno}); expected one JSON "
                                     "object per line: is the file truncated, or not JSON Lines?") from None
                if not isinstance(document, dict):
                    raise InputError(f"{where}: {_JSON_TYPE_NAMES[type(document)]}, not a JSON object with a "
                                     "\"text\" field")
                if "text" not in document:
                    raise InputError(f"{where}: no \"text\" field (it has: {', '.join(document) or 'nothing'})")
                if not isinstance(document["text"], str):
                    raise InputError(f"{where}: \"text\" is {_JSON_TYPE_NAMES[type(document['text'])]}, not a string")
                documents += 1
                yield document["text"]
    except (OSError, EOFError) as e:  # unreadable, or a damaged or truncated .gz
        raise InputError(f"{path} line {line_number + 1}: cannot read it ({e})") from None
    if not documents:
        raise InputError(f"{path}: no documents: the file is empty or holds only blank lines")


def _parquet_texts(path):
    """The `text` column of a parquet file, read a row group at a time; rows are counted from 1."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise InputError(f"{path}: not a readable parquet file ({e})") from None
    schema = parquet.schema_arrow
    if "text" not in schema.names:
        raise InputError(f"{path}: no \"text\" column (it has: {', '.join(schema.names) or 'nothing'})")
    text_type = schema.field("text").type
    if not (pa.types.is_string(text_type) or pa.types.is_large_string(text_type)):
        raise InputError(f"{path}: column \"text\" holds {text_type}, not strings")
    row = 0
    for batch in parquet.iter_batches(columns=["text"]):
        for text in batch.column(0).to_pylist():
            row += 1
            if text is None:
                raise InputError(f"{path} row {row}: \"text\" is null, not a string")
            yield text
    if not row:
        raise InputError(f"{path}: no documents (0 rows)")


def stream_texts(local_files=None, hub_repo=None, hub_config=None):
    """Yields the documents' texts one at a time, from local files or the hub."""
    if local_files:
        for path in local_files:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"--local-files: no such file {path}")
        parquet = [p.endswith(".parquet") for p in local_files]
        if any(parquet) and not all(parquet):
            raise ValueError("--local-files: give JSONL files or parquet files, not a mix (run the script once for each)")
        read = _parquet_texts if all(parquet) else _jsonl_texts
        return itertools.chain.from_iterable(read(path) for path in local_files)
    import datasets

    dataset = datasets.load_dataset(hub_repo, name=hub_config, split="train", streaming=True)
    return (document["text"] for document in dataset)


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


def _tokenize_in_batches(pool, texts, batch_size):
    """Token arrays in document order. Pool.imap alone would read the whole input ahead of the
    workers; feeding it a batch at a time keeps memory bounded."""
    texts = iter(texts)
    while batch := list(itertools.islice(texts, batch_size)):
        yield from pool.imap(tokenize, batch, chunksize=16)


def tokenize_to_shards(texts, out_dir, name, shard_size, workers, max_tokens=None, progress=True):
    """Tokenizes an iterable of document texts into shards; returns the paths written."""
    from tqdm import tqdm

    writer = ShardWriter(out_dir, name, shard_size)
    total = 0
    # The context closes the bar on an error too, so that the error message starts a line of its own.
    with (tqdm(total=max_tokens, unit="tok", unit_scale=True, desc=f"tokenizing into {out_dir}",
               disable=not progress) as bar,
          multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else _InlinePool() as pool):
        for tokens in _tokenize_in_batches(pool, texts, DOCUMENTS_PER_BATCH * workers):
            if max_tokens is not None and total + len(tokens) > max_tokens:
                tokens = tokens[: max_tokens - total]
            writer.add(tokens)
            total += len(tokens)
            bar.update(len(tokens))
            if max_tokens is not None and total >= max_tokens:
                break
    return writer.close()


def existing_shards(out_dir, name):
    """The shard files of the set `name` already in out_dir (`<name>_val_NNNNNN.bin`, `<name>_train_NNNNNN.bin`):
    a new set written beside them would mix with any the new one does not overwrite."""
    own_shard = re.compile(re.escape(name) + r"_(val|train)_\d{6,}\.bin")
    if not os.path.isdir(out_dir):
        return []
    found = [(match.group(1) != "val", f) for f in os.listdir(out_dir) if (match := own_shard.fullmatch(f))]
    return [os.path.join(out_dir, f) for _, f in sorted(found)]  # the val shard first, as written


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
    parser.add_argument("--overwrite", action="store_true", help="remove the set's shards already in --out-dir first")
    args = parser.parse_args(argv)
    if args.shard_size <= 0:
        parser.error("--shard-size must be positive")
    if args.max_tokens is not None and args.max_tokens <= 0:
        parser.error("--max-tokens must be positive")

    hub_repo, hub_config, folder, name = HUB_DATASETS[("edu" if args.edu else "fineweb", args.version)]
    if args.local_files:
        name = os.path.splitext(os.path.basename(args.local_files[0]))[0]
    name = args.name or name
    out_dir = args.out_dir or os.path.join(os.path.dirname(os.path.abspath(__file__)), folder)
    try:
        gpt2_encoding()  # fetched on first use: fail here, not in a worker
    except TokenizerUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    existing = existing_shards(out_dir, name)
    if existing and not args.overwrite:
        print(f"error: {out_dir} already holds {len(existing)} shard(s) of the set '{name}' ({os.path.basename(existing[0])}"
              f"{' ... ' + os.path.basename(existing[-1]) if len(existing) > 1 else ''}): a new set would mix with them; "
              "pass --overwrite to replace them, or choose another --out-dir or --name", file=sys.stderr)
        return 2
    for path in existing:
        os.remove(path)
    if existing:
        print(f"removed the {len(existing)} shard(s) of the set '{name}' that were in {out_dir} (--overwrite)")
    source = " ".join(args.local_files) if args.local_files else f"{hub_repo} ({hub_config})"
    try:
        texts = stream_texts(args.local_files, hub_repo, hub_config)
        paths = tokenize_to_shards(texts, out_dir, name, args.shard_size, args.workers, args.max_tokens)
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
