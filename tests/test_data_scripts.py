"""The tokenize and download scripts, on local data and with only the hub call replaced."""
import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from data import cached_fineweb10B, fineweb
from data.shards import EOT_TOKEN, read_header, read_tokens, write_shard
from tests.conftest import PYDOCS, PYDOCS_SHARD_SIZE
from tests.util import REPO_ROOT


def test_tokenized_shards_decode_back_to_the_documents_in_order(pydocs_dir):
    import tiktoken

    paths = sorted(glob.glob(os.path.join(pydocs_dir, "pydocs_*.bin")), key=lambda p: p.rsplit("_", 1)[1])
    assert os.path.basename(paths[0]) == "pydocs_val_000000.bin"  # the first shard is the val shard
    assert [read_header(p) for p in paths[:-1]] == [PYDOCS_SHARD_SIZE] * (len(paths) - 1)
    stream = np.concatenate([read_tokens(p) for p in paths])
    starts = list(np.flatnonzero(stream == EOT_TOKEN)) + [len(stream)]
    assert starts[0] == 0
    enc = tiktoken.get_encoding("gpt2")
    decoded = [enc.decode(stream[a + 1 : b].tolist()) for a, b in zip(starts, starts[1:])]
    with open(PYDOCS, encoding="utf-8") as f:
        originals = [json.loads(line)["text"] for line in f]
    assert len(decoded) == len(originals)
    assert decoded == originals


def test_script_reads_parquet_through_the_same_path(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = ["Hello world.", "A second document, longer than the first one.", "Third."]
    pq.write_table(pa.table({"text": texts, "id": [1, 2, 3]}), tmp_path / "part.parquet")
    result = subprocess.run([sys.executable, "data/fineweb.py", "--local-files", str(tmp_path / "part.parquet"),
                             "--out-dir", str(tmp_path / "out"), "--shard-size", "8", "--workers", "1"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    paths = sorted(glob.glob(str(tmp_path / "out" / "part_*.bin")), key=lambda p: p.rsplit("_", 1)[1])
    stream = np.concatenate([read_tokens(p) for p in paths])
    assert list(stream).count(EOT_TOKEN) == 3 and len(paths) > 2
    assert "part_val_000000.bin" in paths[0] and "part_train_000001.bin" in paths[1]


def test_missing_local_file_is_a_clear_error(tmp_path):
    result = subprocess.run([sys.executable, "data/fineweb.py", "--local-files", str(tmp_path / "nope.jsonl"),
                             "--out-dir", str(tmp_path)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: --local-files: no such file {tmp_path / 'nope.jsonl'}"
    for name in ("a.jsonl", "b.parquet"):
        (tmp_path / name).write_text("")
    result = subprocess.run([sys.executable, "data/fineweb.py", "--local-files", str(tmp_path / "a.jsonl"),
                             str(tmp_path / "b.parquet"), "--out-dir", str(tmp_path)], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "not a mix" in result.stderr


def test_hub_streaming_asks_for_the_right_dataset(monkeypatch, tmp_path):
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, split=None, streaming=False):
        calls.append((path, name, split, streaming))
        return iter([{"text": "one"}, {"text": "two"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert fineweb.main(["--edu", "--out-dir", str(tmp_path), "--workers", "1"]) == 0
    assert fineweb.main(["--version", "100B", "--out-dir", str(tmp_path), "--workers", "1"]) == 0
    assert calls == [("HuggingFaceFW/fineweb-edu", "sample-10BT", "train", True),
                     ("HuggingFaceFW/fineweb", "sample-100BT", "train", True)]
    assert os.path.exists(tmp_path / "finewebedu_val_000000.bin") and os.path.exists(tmp_path / "fineweb_val_000000.bin")


# ---------------------------------------------------------------- download

@pytest.fixture
def fake_hub(monkeypatch):
    """Replaces the one network call; records what was asked for and writes small valid shards."""
    requests = []

    def fetch(repo_id, filename, local_dir):
        requests.append((repo_id, filename))
        write_shard(os.path.join(local_dir, filename), np.arange(1000) % 50257)

    monkeypatch.setattr(cached_fineweb10B, "fetch_from_hub", fetch)
    return requests


def test_download_asks_for_val_and_first_train_shards(fake_hub, tmp_path):
    paths = cached_fineweb10B.download("fineweb10B", 3, str(tmp_path), log=lambda *_: None)
    assert fake_hub == [("kjj0/fineweb10B-gpt2", "fineweb_val_000000.bin")] + [
        ("kjj0/fineweb10B-gpt2", f"fineweb_train_00000{i}.bin") for i in (1, 2, 3)]
    assert all(read_header(p) == 1000 for p in paths)
    fake_hub.clear()
    cached_fineweb10B.download("finewebedu10B", 1, str(tmp_path / "edu"), log=lambda *_: None)
    assert fake_hub == [("kjj0/finewebedu10B-gpt2", "finewebedu_val_000000.bin"),
                        ("kjj0/finewebedu10B-gpt2", "finewebedu_train_000001.bin")]


def test_complete_shards_are_skipped_and_truncated_ones_fetched_again(fake_hub, tmp_path):
    cached_fineweb10B.download("fineweb10B", 2, str(tmp_path), log=lambda *_: None)
    fake_hub.clear()
    cached_fineweb10B.download("fineweb10B", 2, str(tmp_path), log=lambda *_: None)
    assert fake_hub == []
    truncated = tmp_path / "fineweb_train_000002.bin"
    truncated.write_bytes(truncated.read_bytes()[:-100])
    cached_fineweb10B.download("fineweb10B", 3, str(tmp_path), log=lambda *_: None)
    assert fake_hub == [("kjj0/fineweb10B-gpt2", "fineweb_train_000002.bin"),
                        ("kjj0/fineweb10B-gpt2", "fineweb_train_000003.bin")]
    assert read_header(str(truncated)) == 1000


def test_a_download_that_stays_incomplete_is_an_error(monkeypatch, tmp_path):
    def broken(repo_id, filename, local_dir):
        write_shard(os.path.join(local_dir, filename), np.arange(100))
        path = os.path.join(local_dir, filename)
        open(path, "ab").write(b"\0")

    monkeypatch.setattr(cached_fineweb10B, "fetch_from_hub", broken)
    with pytest.raises(cached_fineweb10B.DownloadError, match="incomplete after download"):
        cached_fineweb10B.download("fineweb10B", 0, str(tmp_path), log=lambda *_: None)


def test_unreachable_hub_gives_a_short_message(monkeypatch, tmp_path, capsys):
    def unreachable(repo_id, filename, local_dir):
        raise ConnectionError("Failed to resolve 'huggingface.co'")

    monkeypatch.setattr(cached_fineweb10B, "fetch_from_hub", unreachable)
    assert cached_fineweb10B.main(["2", "--out-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "could not download fineweb_val_000000.bin from kjj0/fineweb10B-gpt2 (ConnectionError" in err
    assert "run the same command again" in err and "Traceback" not in err


def test_real_hub_client_offline_fails_cleanly(tmp_path):
    # The real client with the hub disabled: the command must explain, not dump a traceback.
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "data/cached_fineweb10B.py", "1", "--out-dir", str(tmp_path)],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert result.stderr.startswith("error: could not download fineweb_val_000000.bin") and "Traceback" not in result.stderr


def test_shard_count_follows_the_preset(fake_hub, tmp_path, capsys):
    # 3000 steps x 524,288 tokens; each 100M-token shard yields 190 whole steps.
    assert cached_fineweb10B.train_shards_needed(3000, 524288) == 16
    assert cached_fineweb10B.shards_for_run(["--steps", "190"]) == ("fineweb10B", 1)
    assert cached_fineweb10B.shards_for_run(["--preset", "cpu-tiny", "--train-files", "x/*.bin"]) is None
    assert cached_fineweb10B.main(["--out-dir", str(tmp_path)]) == 0
    assert "needs the val shard and 16 train shards" in capsys.readouterr().out
    assert len(fake_hub) == 17
