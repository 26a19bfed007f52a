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


def shard_paths(folder, name):
    """A shard set's files in the order the script wrote them: the val shard, then the train shards."""
    return sorted(glob.glob(os.path.join(folder, f"{name}_*.bin")), key=lambda p: p.rsplit("_", 1)[1])


def decode_documents(paths):
    """The texts of the documents in shards, each of which must start with <|endoftext|>."""
    import tiktoken

    stream = np.concatenate([read_tokens(p) for p in paths])
    starts = list(np.flatnonzero(stream == EOT_TOKEN)) + [len(stream)]
    assert starts[0] == 0
    enc = tiktoken.get_encoding("gpt2")
    return [enc.decode(stream[a + 1 : b].tolist()) for a, b in zip(starts, starts[1:])]


def pydocs_texts():
    with open(PYDOCS, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts), encoding="utf-8")


def test_tokenized_shards_decode_back_to_the_documents_in_order(pydocs_dir):
    paths = shard_paths(pydocs_dir, "pydocs")
    assert os.path.basename(paths[0]) == "pydocs_val_000000.bin"  # the first shard is the val shard
    assert [read_header(p) for p in paths[:-1]] == [PYDOCS_SHARD_SIZE] * (len(paths) - 1)
    decoded = decode_documents(paths)
    originals = pydocs_texts()
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
    paths = shard_paths(tmp_path / "out", "part")
    assert len(paths) > 2 and "part_val_000000.bin" in paths[0] and "part_train_000001.bin" in paths[1]
    assert decode_documents(paths) == texts


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


BAD_JSONL = {  # name -> (file contents, what the error says about its line 2)
    "no text field": (b'{"text": "fine"}\n{"id": 2, "body": "x"}\n', 'no "text" field (it has: id, body)'),
    "text not a string": (b'{"text": "fine"}\n{"text": 5}\n', '"text" is a number, not a string'),
    "text null": (b'{"text": "fine"}\n{"text": null}\n', '"text" is null, not a string'),
    "not an object": (b'{"text": "fine"}\n["text"]\n', 'an array, not a JSON object with a "text" field'),
    "not UTF-8": (b'{"text": "fine"}\n{"text": "caf\xe9"}\n', "not UTF-8 text (byte 0xe9 at column 14)"),
    "truncated": (b'{"text": "fine"}\n{"text": "cut sh', "not valid JSON (Unterminated string"),
}


def error_lines(stderr):
    """The lines that start with `error:`; a message glued to a progress bar line does not count."""
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize("case", BAD_JSONL)
def test_bad_jsonl_line_is_one_line_naming_file_and_line(tmp_path, capsys, case):
    contents, problem = BAD_JSONL[case]
    path = tmp_path / "docs.jsonl"
    path.write_bytes(contents)
    assert fineweb.main(["--local-files", str(path), "--out-dir", str(tmp_path / "out"), "--workers", "1"]) == 2
    err = capsys.readouterr().err
    [line] = error_lines(err)
    assert line.startswith(f"error: {path} line 2: {problem}")
    assert "Traceback" not in err


def test_empty_jsonl_file_is_an_error_naming_it(tmp_path, capsys):
    good, empty = tmp_path / "good.jsonl", tmp_path / "empty.jsonl"
    write_jsonl(good, ["one document"])
    empty.write_bytes(b"")
    assert fineweb.main(["--local-files", str(good), str(empty), "--out-dir", str(tmp_path / "out"),
                         "--workers", "1"]) == 2
    assert error_lines(capsys.readouterr().err) == [
        f"error: {empty}: no documents: the file is empty or holds only blank lines"]


def test_bad_line_met_while_workers_tokenize_is_the_same_one_line_error(tmp_path):
    # Enough documents that the bad one is read after the worker processes have tokenized a batch.
    paragraphs = [p for text in pydocs_texts()[:40] for p in text.split("\n\n") if p.strip()]
    assert len(paragraphs) > 1300 > 2 * fineweb.DOCUMENTS_PER_BATCH
    lines = [json.dumps({"text": p}) for p in paragraphs[:1300]] + ['{"id": 1301}']
    path = tmp_path / "paragraphs.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = subprocess.run([sys.executable, "data/fineweb.py", "--local-files", str(path), "--out-dir",
                             str(tmp_path / "out"), "--shard-size", "100000", "--workers", "2"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert error_lines(result.stderr) == [f'error: {path} line 1301: no "text" field (it has: id)']
    assert "Traceback" not in result.stderr


def test_bad_parquet_text_names_the_file_and_row(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    cases = {  # file name -> (columns, the error after the file's path)
        "no_text.parquet": ({"body": ["a", "b"]}, ': no "text" column (it has: body)'),
        "numbers.parquet": ({"text": [1, 2]}, ': column "text" holds int64, not strings'),
        "null.parquet": ({"text": ["a", None]}, ' row 2: "text" is null, not a string'),
    }
    for name, (columns, problem) in cases.items():
        pq.write_table(pa.table(columns), tmp_path / name)
        assert fineweb.main(["--local-files", str(tmp_path / name), "--out-dir", str(tmp_path / "out"),
                             "--workers", "1"]) == 2
        assert error_lines(capsys.readouterr().err) == [f"error: {tmp_path / name}{problem}"]


def test_gzipped_jsonl_is_read_like_plain_jsonl(tmp_path):
    import gzip

    texts = ["First document.", "Second one, with a café."]
    write_jsonl(tmp_path / "docs.jsonl", texts)
    (tmp_path / "docs.jsonl.gz").write_bytes(gzip.compress((tmp_path / "docs.jsonl").read_bytes()))
    assert fineweb.main(["--local-files", str(tmp_path / "docs.jsonl.gz"), "--out-dir", str(tmp_path / "out"),
                         "--name", "docs", "--workers", "1"]) == 0
    assert decode_documents(shard_paths(tmp_path / "out", "docs")) == texts


def test_tokenizing_again_into_a_set_is_refused_unless_overwrite_which_replaces_only_that_set(tmp_path, capsys):
    texts = pydocs_texts()[:3]
    write_jsonl(tmp_path / "notes.jsonl", texts)
    out = tmp_path / "out"
    args = ["--local-files", str(tmp_path / "notes.jsonl"), "--out-dir", str(out), "--workers", "1"]
    assert fineweb.main(args + ["--shard-size", "100"]) == 0
    first_run = shard_paths(out, "notes")
    other_sets = [out / "notes2_train_000099.bin", out / "other_train_000099.bin", out / "notes_train_000099.bin.bak"]
    for path in other_sets:
        write_shard(str(path), np.arange(10))
    capsys.readouterr()

    # The shards there may be a download: nothing is written or deleted without --overwrite.
    before = {path: open(path, "rb").read() for path in first_run}
    assert fineweb.main(args + ["--shard-size", "500"]) == 2
    first, last = os.path.basename(first_run[0]), os.path.basename(first_run[-1])
    assert capsys.readouterr().err == (
        f"error: {out} already holds {len(first_run)} shard(s) of the set 'notes' ({first} ... {last}): a new set "
        "would mix with them; pass --overwrite to replace them, or choose another --out-dir or --name\n")
    assert {path: open(path, "rb").read() for path in shard_paths(out, "notes")} == before

    assert fineweb.main(args + ["--shard-size", "500", "--overwrite"]) == 0
    second_run = shard_paths(out, "notes")
    assert 2 < len(second_run) < len(first_run) - 3
    assert decode_documents(second_run) == texts  # the set's glob finds this run's data and nothing else
    assert all(path.exists() for path in other_sets)
    assert f"removed the {len(first_run)} shard(s) of the set 'notes' that were in {out} (--overwrite)" \
        in capsys.readouterr().out


def test_max_tokens_must_be_positive(tmp_path, capsys):
    write_jsonl(tmp_path / "docs.jsonl", ["a document"])
    with pytest.raises(SystemExit) as exit_:
        fineweb.main(["--local-files", str(tmp_path / "docs.jsonl"), "--out-dir", str(tmp_path), "--max-tokens", "0"])
    assert exit_.value.code == 2 and "--max-tokens must be positive" in capsys.readouterr().err


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


def test_batch_larger_than_a_shard_is_refused_in_one_line(capsys):
    # No whole step fits in a shard: before, a division by zero (or a negative shard count for empty shards).
    with pytest.raises(ValueError, match="does not fit in one 1,000-token shard"):
        cached_fineweb10B.train_shards_needed(10, 1000, tokens_per_shard=1000)
    with pytest.raises(ValueError, match="does not fit in one 0-token shard"):
        cached_fineweb10B.train_shards_needed(10, 1000, tokens_per_shard=0)
    assert cached_fineweb10B.main(["--run-args", "--batch-tokens", str(10**8)]) == 2  # x 3 in the last stage
    assert capsys.readouterr().err == ("error: the last stage's batch, 3 x --batch-tokens = 300,000,000, does not "
                                       "fit in one 100,000,000-token shard, and a batch cannot cross shards: lower "
                                       "--batch-tokens\n")


def test_shard_count_follows_the_preset(fake_hub, tmp_path, capsys):
    # 3000 steps x 524,288 tokens; each 100M-token shard yields 190 whole steps.
    assert cached_fineweb10B.train_shards_needed(3000, 524288) == 16
    assert cached_fineweb10B.shards_for_run(["--preset", "record11", "--steps", "190"]) == ("fineweb10B", 1)
    # record #46: 571,342,848 tokens in growing batches of BOS-aligned rows, with a margin for the
    # documents' skipped ends: 571.3M x 1.25 = 714.2M, 8 shards, plus one
    assert cached_fineweb10B.shards_for_run(["--preset", "record46"]) == ("fineweb10B", 9)
    # HEAD (speedrun): 338,821,120 tokens x 1.25 = 423.5M, 5 shards, plus one
    assert cached_fineweb10B.shards_for_run(["--preset", "speedrun"]) == ("fineweb10B", 6)
    assert cached_fineweb10B.shards_for_run(["--preset", "cpu-tiny", "--train-files", "x/*.bin"]) is None
    assert cached_fineweb10B.main(["--out-dir", str(tmp_path)]) == 0
    assert "needs the val shard and 6 train shards" in capsys.readouterr().out
    assert len(fake_hub) == 7
