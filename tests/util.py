import os
import re
import socket
import subprocess
import sys

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
    """args plus the suite's defaults: CPU, records and checkpoints under records_dir, no final checkpoint."""
    args = list(args) + ["--records-dir", str(records_dir)]
    if "--device" not in args:  # the suite's expectations are CPU runs, on a CUDA machine too
        args += ["--device", "cpu"]
    if "--checkpoint-dir" not in args:
        args += ["--checkpoint-dir", f"{records_dir}_checkpoints"]
    if "--save-final" not in args:  # checkpoints take time and disk; tests that need one ask
        args += ["--save-final", "false"]
    return args


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
                 "--cooldown-frac", "0.4", "--embed-lr", "0.3", "--head-lr", "0.01", "--adamw-matrix-lr", "0.003",
                 "--muon-momentum-warmup-steps", "20", "--val-every", "20", "--train-log-every", "10",
                 "--untimed-warmup-steps", "0"]

# cpu-tiny (record #46's recipe) small enough for about a second a step on two CPU cores: 2 rows
# of 128 tokens a step (then 256 and 384), which 1 rank accumulates as 2 micro-batches and 2 ranks
# split. 12 scheduled steps in 3 stages of 4, then 4 extension steps; 2 validation rows of 1024
# (one per rank on 2 ranks): validation through the 50,304-wide head is what a small run spends
# most on after training.
SMALL = ["--preset", "cpu-tiny", "--device", "cpu", "--seq-len", "128", "--batch-tokens", "256", "--micro-batch-tokens", "128",
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


# SMALL's sizes with record #11's recipe: what cpu-tiny's tests ran before cpu-tiny followed #46.
SMALL_RECORD11 = RECORD11_TINY + SMALL[2:]
