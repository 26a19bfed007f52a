import json
import os
import sys

import numpy as np
import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(REPO_ROOT), "shared")
PYDOCS = os.path.join(SHARED, "corpus", "pydocs", "docs.jsonl")
os.environ.setdefault("TIKTOKEN_CACHE_DIR", os.path.join(SHARED, "tiktoken_cache"))
sys.path.insert(0, REPO_ROOT)

from data.shards import EOT_TOKEN, write_shard  # noqa: E402


def tokenize_pydocs(out_dir, train_shards=2):
    """The pydocs corpus as shards: its val documents in one val shard, the rest split into train shards."""
    import tiktoken

    enc = tiktoken.get_encoding("gpt2")
    splits = {"train": [], "val": []}
    with open(PYDOCS, encoding="utf-8") as f:
        for line in f:
            doc = json.loads(line)
            splits[doc["split"]].append(EOT_TOKEN)
            splits[doc["split"]].extend(enc.encode_ordinary(doc["text"]))
    os.makedirs(out_dir, exist_ok=True)
    write_shard(os.path.join(out_dir, "pydocs_val_000000.bin"), np.array(splits["val"], dtype=np.uint16))
    train = np.array(splits["train"], dtype=np.uint16)
    for i, part in enumerate(np.array_split(train, train_shards)):
        write_shard(os.path.join(out_dir, f"pydocs_train_{i + 1:06d}.bin"), part)
    return out_dir


@pytest.fixture(scope="session")
def pydocs_dir(tmp_path_factory):
    return tokenize_pydocs(str(tmp_path_factory.mktemp("pydocs")))


@pytest.fixture(scope="session")
def pydocs_files(pydocs_dir):
    return ["--train-files", os.path.join(pydocs_dir, "pydocs_train_*.bin"),
            "--val-files", os.path.join(pydocs_dir, "pydocs_val_*.bin")]
