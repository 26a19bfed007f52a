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
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2" if not nproc else "1"))
    env.update(extra_env or {})
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "train_gpt.py"]
    else:
        cmd = [sys.executable, "train_gpt.py"]
    cmd += list(args) + ["--records-dir", str(records_dir)]
    return subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def record_logs(records_dir):
    return sorted(os.path.join(records_dir, f) for f in os.listdir(records_dir) if f.endswith(".txt"))


def val_losses(log_text):
    return [(int(step), float(loss)) for step, loss in re.findall(r"^step:(\d+)/\d+ val_loss:([\d.naif]+)", log_text, re.M)]


def train_losses(log_text):
    return [(int(step), float(loss)) for step, loss in re.findall(r"^step:(\d+)/\d+ train_loss:([\d.naif]+)", log_text, re.M)]
