"""Checkpoints, exact resume, interruption, divergence, a dying rank, and using a checkpoint."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.util import (REPO_ROOT, SMALL, completed_log, record_logs, run_trainer, train_losses, val_losses)

pytestmark = pytest.mark.slow


def losses_from(text, first_step):
    return ([x for x in val_losses(text) if x[0] >= first_step], [x for x in train_losses(text) if x[0] > first_step])


def test_resumed_two_process_run_equals_uninterrupted(pydocs_files, two_process_run, two_process_checkpoint, tmp_path):
    result = run_trainer(SMALL + pydocs_files + ["--resume", two_process_checkpoint], tmp_path, nproc=2)
    text = completed_log(result, tmp_path)
    assert f"resumed from {two_process_checkpoint} at step 8" in text
    assert losses_from(text, 8) == losses_from(two_process_run, 8)
    # train_time continues from the checkpoint instead of starting over
    first_train_time = int(re.search(r"^step:12/16 train_loss:\S+ train_time:(\d+)ms", text, re.M).group(1))
    saved_time = int(re.search(r"^step:8/16 val_loss:\S+ train_time:(\d+)ms", two_process_run, re.M).group(1))
    assert first_train_time > saved_time


def test_resume_on_one_process_from_a_two_process_checkpoint(pydocs_files, two_process_run, two_process_checkpoint,
                                                             tmp_path):
    # The Muon momentum is re-sharded and the loader position is global: only reduction order differs.
    text = completed_log(run_trainer(SMALL + pydocs_files + ["--resume", two_process_checkpoint], tmp_path), tmp_path)
    assert "saved by 2 process(es)" in text
    for (_, a), (_, b) in zip(val_losses(text), val_losses(two_process_run)[1:]):
        assert abs(a - b) < 2e-3


def test_sigterm_saves_and_resume_equals_uninterrupted(pydocs_files, one_process_run, tmp_path):
    checkpoints = tmp_path / "checkpoints"
    cmd = [sys.executable, "train_gpt.py", *SMALL, *pydocs_files, "--records-dir", str(tmp_path / "first"),
           "--checkpoint-dir", str(checkpoints)]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="2"))
    for line in proc.stdout:
        if line.startswith("step:4/16 train_loss"):
            proc.send_signal(signal.SIGTERM)
            break
    output = proc.stdout.read()
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM, output
    last = open(record_logs(tmp_path / "first")[0]).read().rstrip().splitlines()[-1]
    match = re.fullmatch(r"status: interrupted: received SIGTERM after step (\d+); checkpoint (\S+); resume with: "
                         r"python train_gpt.py .* --resume \2", last)
    assert match, last
    stopped_at = int(match.group(1))
    assert 4 <= stopped_at < 16 and os.path.exists(match.group(2))

    args = SMALL + pydocs_files + ["--resume", "latest", "--checkpoint-dir", str(checkpoints)]
    text = completed_log(run_trainer(args, tmp_path / "second"), tmp_path / "second")
    assert losses_from(text, stopped_at) == losses_from(one_process_run, stopped_at)


def test_resume_refuses_other_model_and_other_code(pydocs_files, one_process_checkpoint, tmp_path):
    result = run_trainer(SMALL + pydocs_files + ["--resume", one_process_checkpoint, "--steps", "20",
                                                 "--model-dim", "64", "--num-heads", "2"], tmp_path / "a")
    assert result.returncode == 2 and "different model configuration (num_heads 4 -> 2, model_dim 128 -> 64)" \
        in result.stderr
    state = torch.load(one_process_checkpoint, weights_only=False)
    state["code_hash"] = "0" * 16
    other = tmp_path / "other_code.pt"
    torch.save(state, other)
    result = run_trainer(SMALL + pydocs_files + ["--resume", str(other), "--steps", "18"], tmp_path / "b")
    assert result.returncode == 2 and "written by different code" in result.stderr and "--allow-code-change" \
        in result.stderr
    args = SMALL + pydocs_files + ["--resume", str(other), "--steps", "18", "--allow-code-change", "true"]
    text = completed_log(run_trainer(args, tmp_path / "c"), tmp_path / "c")
    assert "changed settings: steps 16 -> 18" in text and val_losses(text)[-1][0] == 18
    result = run_trainer(SMALL + pydocs_files + ["--resume", one_process_checkpoint], tmp_path / "d")
    assert result.returncode == 2 and "is at step 16, not before --steps 16" in result.stderr
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    result = run_trainer(SMALL + pydocs_files + ["--resume", str(tmp_path / "junk.pt")], tmp_path / "e")
    assert result.returncode == 2 and "cannot read checkpoint" in result.stderr


def test_checkpoints_are_pruned_and_never_half_written(pydocs_files, tmp_path):
    args = SMALL + pydocs_files + ["--steps", "6", "--val-every", "0", "--save-every", "2", "--keep-last", "2",
                                   "--save-final", "true", "--checkpoint-dir", str(tmp_path / "ckpt")]
    completed_log(run_trainer(args, tmp_path / "records"), tmp_path / "records")
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["step_000004.pt", "step_000006.pt"]
    # A write killed half way leaves a .tmp file, which is never taken for a checkpoint.
    (tmp_path / "ckpt" / "step_000008.pt.tmp").write_bytes(b"partial")
    from checkpoint import resolve
    assert resolve("latest", str(tmp_path / "ckpt")).endswith("step_000006.pt")


def test_non_finite_loss_stops_at_once_naming_the_step(pydocs_files, tmp_path):
    args = SMALL + pydocs_files + ["--val-every", "0", "--scalar-lr", "1e20", "--save-every", "2",
                                   "--checkpoint-dir", str(tmp_path / "ckpt")]
    result = run_trainer(args, tmp_path / "records")
    assert result.returncode == 1
    last = open(record_logs(tmp_path / "records")[0]).read().rstrip().splitlines()[-1]
    expected = f"status: failed: non-finite train loss at step 3; last good checkpoint: {tmp_path / 'ckpt'}/step_000002.pt"
    assert last == expected
    assert result.stderr.strip().endswith(expected[len("status: failed: "):])


def test_a_dying_rank_ends_the_job_naming_it(pydocs_files, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train_gpt.py", *SMALL,
           *pydocs_files, "--steps", "60", "--records-dir", str(tmp_path), "--checkpoint-dir", str(tmp_path / "c")]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    output = []
    for line in proc.stdout:
        output.append(line)
        if line.startswith("step:4/60 train_loss"):
            break
    victim = next(pid for pid in map(int, filter(str.isdigit, os.listdir("/proc"))) if _is_rank(pid, 1, proc.pid))
    os.kill(victim, signal.SIGKILL)
    started = time.monotonic()
    output.append(proc.stdout.read())
    assert proc.wait(timeout=180) != 0
    assert time.monotonic() - started < 120
    text = "".join(output)
    assert re.search(r"rank\s*: 1 \(local_rank: 1\)", text), text[-3000:]
    assert open(record_logs(tmp_path)[0]).read().rstrip().splitlines()[-1].startswith("status: failed")


def _is_rank(pid, rank, launcher_pid):
    try:
        environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        cmdline = open(f"/proc/{pid}/cmdline", "rb").read()
    except OSError:
        return False
    return pid != launcher_pid and b"train_gpt.py" in cmdline and f"RANK={rank}".encode() in environ


def test_sample_generates_reproducibly(one_process_checkpoint):
    cmd = [sys.executable, "scripts/sample.py", "--checkpoint", one_process_checkpoint, "--prompt", "The function",
           "--max-new-tokens", "12", "--seed", "3"]
    first, second = (subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300) for _ in range(2))
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout and first.stdout.startswith("The function")
    assert len(first.stdout) > len("The function\n")

    sys.path.insert(0, os.path.join(REPO_ROOT, "scripts"))
    from checkpoint import model_from_checkpoint
    from sample import generate

    model, config = model_from_checkpoint(one_process_checkpoint, torch.device("cpu"))
    prompt = [50256, 464, 2163]
    greedy = generate(model, prompt, 5, 0.0, 0, config["seq_len"], torch.Generator(), stop_at_eot=False)
    tokens = list(prompt)
    for _ in range(5):  # greedy decoding spelled out
        with torch.no_grad():
            tokens.append(int(model(torch.tensor([tokens]))[0, -1, :50257].argmax()))
    assert greedy == tokens[3:]


HELLASWAG = [
    {"ctx": "A man is sitting on a roof. He", "endings": ["is using wrap to wrap a pair of skis.",
     "is ripping level tiles off.", "is holding a rubik's cube.", "starts pulling up roofing on a roof."], "label": 3},
    {"ctx": "A woman opens the python interpreter and", "endings": ["types import this.", "eats the keyboard.",
     "flies to the moon.", "the the the the."], "label": 0},
    {"ctx": "The function returns", "endings": ["a list of values.", "purple elephants.", "nothing at all ever.",
     "a sandwich."], "label": 0},
    {"ctx": "To install the package, run", "endings": ["pip install package.", "around the house.",
     "a marathon.", "out of time."], "label": 0},
    {"ctx": "The documentation describes", "endings": ["the module in detail.", "a cat.", "the weather.", "zzz."],
     "label": 0},
]


def test_hellaswag_scores_endings_and_splits_across_ranks(one_process_checkpoint, tmp_path):
    data = tmp_path / "hellaswag.jsonl"
    data.write_text("".join(json.dumps(dict(e, ind=i, activity_label="x", split="val")) + "\n"
                            for i, e in enumerate(HELLASWAG)))
    args = ["evals/hellaswag.py", "--checkpoint", one_process_checkpoint, "--data-files", str(data)]
    one = subprocess.run([sys.executable, *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    line = re.search(r"hellaswag accuracy: (\d+)/5 = \S+", one.stdout)
    assert line and line.group(0) in two.stdout

    # The same answer computed independently: mean loss over each ending's tokens.
    sys.path.insert(0, os.path.join(REPO_ROOT, "evals"))
    import tiktoken

    from checkpoint import model_from_checkpoint
    model, _ = model_from_checkpoint(one_process_checkpoint, torch.device("cpu"))
    enc = tiktoken.get_encoding("gpt2")
    correct = 0
    for example in HELLASWAG:
        scores = []
        for ending in example["endings"]:
            ctx, end = [50256] + enc.encode_ordinary(example["ctx"]), enc.encode_ordinary(" " + ending)
            with torch.no_grad():
                logits = model(torch.tensor([ctx + end][:1])[:, :-1])[0]
            logprobs = torch.log_softmax(logits.float(), -1)
            targets = (ctx + end)[1:]
            scores.append(-sum(logprobs[i, targets[i]].item() for i in range(len(ctx) - 1, len(targets))) / len(end))
        correct += int(scores.index(min(scores)) == example["label"])
    assert int(line.group(1)) == correct
