import contextlib
import glob
import io
import os
import re
import socket
import subprocess
import sys

import numpy as np

from config import PRESETS

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_trainer(args, records_dir, nproc=None, extra_env=None, timeout=900):
    """Runs train_gpt.py (under torchrun when nproc is given); returns the CompletedProcess."""
    # One thread per rank under torchrun, whatever the caller's environment: runs compared to the
    # last digit must reduce in the same order.
    env = dict(os.environ, OMP_NUM_THREADS="1" if nproc else os.environ.get("OMP_NUM_THREADS", "2"))
    env.update(extra_env or {})
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "train_gpt.py"]
    else:
        cmd = [sys.executable, "train_gpt.py"]
    return subprocess.run(cmd + trainer_args(args, records_dir), cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def trainer_args(args, records_dir):
    """args plus the suite's defaults: CPU, records, checkpoints and compiled kernels under records_dir, no
    final checkpoint."""
    args = list(args) + ["--records-dir", str(records_dir)]
    if "--device" not in args:  # the suite's expectations are CPU runs, on a CUDA machine too
        args += ["--device", "cpu"]
    if "--checkpoint-dir" not in args:
        args += ["--checkpoint-dir", f"{records_dir}_checkpoints"]
    if "--compile-cache" not in args:
        args += ["--compile-cache", f"{records_dir}_compile_cache"]
    if "--save-final" not in args:  # checkpoints take time and disk; tests that need one ask
        args += ["--save-final", "false"]
    return args


def config_error(args, tmp_path):
    """The one stderr line of train_gpt.main(args), which must end with exit status 2 before any work.

    In this process, not a new one: a refusal comes before any state is set up, and each
    interpreter would spend seconds importing torch to say one line."""
    import train_gpt

    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        status = train_gpt.main(trainer_args(args, tmp_path / "records"))
    assert status == 2, stderr.getvalue()
    lines = stderr.getvalue().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr.getvalue()
    assert not (tmp_path / "records").exists()  # failed before any work, no record log
    return lines[0]


def record_logs(records_dir):
    return sorted(os.path.join(records_dir, f) for f in os.listdir(records_dir) if f.endswith(".txt"))


def _losses(kind, log_text):
    found = [(int(step), float(loss))
             for step, loss in re.findall(rf"^step:(\d+)/\d+ {kind}:([\d.naif]+) ", log_text, re.M)]
    # Every run logs both kinds at its last step: none found means the log format drifted, and two
    # empty lists must never compare equal in a test.
    assert found, f"no '{kind}' step lines in the log: has the log format changed?"
    return found


def val_losses(log_text):
    return _losses("val_loss", log_text)


def train_losses(log_text):
    return _losses("train_loss", log_text)


# Record #11's recipe at cpu-tiny's old size (before cpu-tiny followed record #46): tests of the
# machinery every recipe shares, with one batch size, full attention and DDP.
RECORD11_TINY = ["--preset", "record11", "--val-tokens", "16384", "--batch-tokens", "2048", "--seq-len", "256",
                 "--num-layers", "4", "--num-heads", "4", "--model-dim", "128", "--steps", "60",
                 "--cooldown-frac", "0.4", "--embed-lr", "0.3", "--head-lr", "0.01", "--adamw-matrix-lr", "0.006",
                 "--muon-momentum-warmup-steps", "20", "--val-every", "20", "--train-log-every", "10",
                 "--untimed-warmup-steps", "0"]

# cpu-tiny (record #46's recipe) small enough for about a second a step on two CPU cores: 2 rows
# of 128 tokens a step (then 256 and 384), which 1 rank accumulates as 2 micro-batches and 2 ranks
# split. 12 scheduled steps in 3 stages of 4, then 4 extension steps; 2 validation rows of 1024
# (one per rank on 2 ranks).
# float32 throughout, on any CPU: with native bf16 (AVX512-BF16, AMX) auto would take bf16 autocast and a
# bf16 orthogonalisation, and the suite's expectations (and one rank against two) were measured in float32.
SMALL = ["--preset", "cpu-tiny", "--device", "cpu", "--dtype", "float32", "--muon-ns-dtype", "float32",
         "--numerics", "float32",
         "--seq-len", "128", "--batch-tokens", "256", "--micro-batch-tokens", "128",
         "--val-tokens", "2048", "--val-seq-len", "1024", "--steps", "16", "--val-every", "8", "--train-log-every", "4",
         "--save-final", "false"]


def completed_log(result, records_dir):
    """The text of the one record log a successful run wrote."""
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    logs = record_logs(records_dir)
    assert len(logs) == 1
    text = open(logs[0]).read()
    assert text.rstrip().endswith("status: completed")
    return text


# record #46's recipe at cpu-tiny's size, as cpu-tiny was before it followed HEAD: 8 layers with #46's
# layout in proportion, 2 rows a step of 512 tokens, windows in blocks of 32 tokens
RECORD46_TINY = dict(
    PRESETS["record46"], num_layers=8, num_heads=2, model_dim=128, attention_free_layers="0,4", long_window_layers="2,7",
    value_embed_layers="1:1,2:2,5:0,6:1,7:2", unet_skips="2:4", backout_layer="5", batch_tokens=1024, seq_len=512,
    max_doc_len=512, val_tokens=16_384, val_seq_len=2048, steps=64, extension_steps=4, window_block=32,
    muon_momentum_warmup_steps=20, muon_momentum_cooldown_steps=4, val_every=20, train_log_every=10,
    untimed_warmup_steps=0, fp8_head=False)

# SMALL's sizes with record #11's recipe: what cpu-tiny's tests ran before cpu-tiny followed #46.
SMALL_RECORD11 = RECORD11_TINY + SMALL[2:]


# The end-to-end tests train on pydocs in a vocabulary of 8,192 ids instead of GPT-2's: their runs
# spend most of their time in the head, the loss over its logits and the embedding tables, all as
# wide as the vocabulary. A forward and backward pass of RECORD11_TINY's model on one step's 2,048
# tokens measured 0.67 s at 8,192 ids against 2.52 s at 50,304 (SMALL's: 0.10 against 0.22 s).
COMPACT_VOCAB_SIZE = 8192
COMPACT_BOS = 0


def compact_vocabulary_args(directory, name="pydocs"):
    """The trainer's flags for a corpus written by write_compact_corpus."""
    return ["--train-files", os.path.join(directory, f"{name}_train_*.bin"),
            "--val-files", os.path.join(directory, f"{name}_val_*.bin"),
            "--vocab-size", str(COMPACT_VOCAB_SIZE), "--bos-token", str(COMPACT_BOS),
            "--prefix-table", os.path.join(directory, "prefix_table.npy")]


def write_compact_corpus(gpt2_dir, out_dir, name="pydocs"):
    """Rewrites a GPT-2 tokenized corpus's shards in COMPACT_VOCAB_SIZE ids, shard for shard.

    <|endoftext|> becomes COMPACT_BOS (0), so documents keep their starts; the train split's other
    tokens take 1, 2, ... in order of falling frequency; those past the vocabulary share its last id.
    On pydocs, 98.2% of train and 98.8% of val tokens keep an id of their own.
    """
    from data.shards import EOT_TOKEN, GPT2_VOCAB_SIZE, read_tokens, write_shard

    paths = sorted(glob.glob(os.path.join(gpt2_dir, f"{name}_*.bin")))
    counts = sum(np.bincount(read_tokens(p), minlength=GPT2_VOCAB_SIZE) for p in paths if "_train_" in p)
    counts[EOT_TOKEN] = -1
    by_frequency = np.argsort(-counts, kind="stable")[:-1]  # every id but <|endoftext|>, the most frequent first
    new_id = np.full(GPT2_VOCAB_SIZE, COMPACT_VOCAB_SIZE - 1, dtype=np.uint16)
    new_id[by_frequency[:COMPACT_VOCAB_SIZE - 2]] = np.arange(1, COMPACT_VOCAB_SIZE - 1)
    new_id[EOT_TOKEN] = COMPACT_BOS
    os.makedirs(out_dir, exist_ok=True)
    for path in paths:
        write_shard(os.path.join(out_dir, os.path.basename(path)), new_id[read_tokens(path)])
    np.save(os.path.join(out_dir, "prefix_table.npy"), compact_prefix_table(new_id))
    return out_dir


def compact_prefix_table(new_id):
    """GPT-2's prefix table (data/prefix_tokens.py) in the compact ids: an id with a GPT-2 token of its
    own keeps that token's prefix where the prefix has an id of its own too; the rest have none (-1)."""
    from data.prefix_tokens import NO_PREFIX, gpt2_prefix_table

    gpt2 = gpt2_prefix_table(len(new_id)).numpy()
    shared = COMPACT_VOCAB_SIZE - 1
    own = (new_id != shared) & (new_id != COMPACT_BOS)
    table = np.full(COMPACT_VOCAB_SIZE, NO_PREFIX, dtype=np.int64)
    for token in np.flatnonzero(own & (gpt2 != NO_PREFIX)):
        prefix = gpt2[token]
        if own[prefix]:
            table[new_id[token]] = new_id[prefix]
    return table
