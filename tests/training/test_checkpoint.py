"""Checkpoints, exact resume, interruption, divergence, a dying rank, and using a checkpoint."""
import contextlib
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from config import PRESETS, Config, make_plan
from data.loader import TrainLoader
from data.shards import write_shard
from model.gpt import GPT
from optim.optimizer import Optimizer
from tests.util import (REPO_ROOT, SMALL, completed_log, config_error, record_logs, run_trainer, train_losses,
                        val_losses)
from training import checkpoint
from training.checkpoint import CheckpointError
from training.loop import train_step


def losses_from(text, first_step):
    return ([x for x in val_losses(text) if x[0] >= first_step], [x for x in train_losses(text) if x[0] > first_step])


@pytest.mark.slow
def test_resumed_two_process_run_equals_uninterrupted(compact_files, two_process_run, two_process_checkpoint, tmp_path):
    result = run_trainer(SMALL + compact_files + ["--resume", two_process_checkpoint], tmp_path, nproc=2)
    text = completed_log(result, tmp_path)
    assert f"resumed from {two_process_checkpoint} at step 8" in text
    assert losses_from(text, 8) == losses_from(two_process_run, 8)
    # train_time continues from the checkpoint instead of starting over
    first_train_time = int(re.search(r"^step:12/16 train_loss:\S+ train_time:(\d+)ms", text, re.M).group(1))
    saved_time = int(re.search(r"^step:8/16 val_loss:\S+ train_time:(\d+)ms", two_process_run, re.M).group(1))
    assert first_train_time > saved_time


@pytest.mark.slow
def test_resume_on_one_process_from_a_two_process_checkpoint(compact_files, two_process_run, two_process_checkpoint,
                                                             tmp_path):
    # The Muon momentum is re-sharded and the loader position is global: only reduction order differs.
    text = completed_log(run_trainer(SMALL + compact_files + ["--resume", two_process_checkpoint], tmp_path), tmp_path)
    assert "saved by 2 process(es)" in text
    for (_, a), (_, b) in zip(val_losses(text), val_losses(two_process_run)[1:]):
        assert abs(a - b) < 2e-3


@pytest.mark.slow
def test_sigterm_saves_and_resume_equals_uninterrupted(compact_files, one_process_run, tmp_path):
    checkpoints = tmp_path / "checkpoints"
    cmd = [sys.executable, "train_gpt.py", *SMALL, *compact_files, "--records-dir", str(tmp_path / "first"),
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

    args = SMALL + compact_files + ["--resume", "latest", "--checkpoint-dir", str(checkpoints)]
    text = completed_log(run_trainer(args, tmp_path / "second"), tmp_path / "second")
    assert losses_from(text, stopped_at) == losses_from(one_process_run, stopped_at)


@pytest.mark.slow
def test_resume_refuses_other_model_and_other_code(compact_files, one_process_checkpoint, tmp_path):
    message = config_error(SMALL + compact_files + ["--resume", one_process_checkpoint, "--steps", "20",
                                                    "--model-dim", "64", "--num-heads", "4"], tmp_path / "a")
    # The settings that differ, then the weights whose shapes differ (the new --steps 20 is no model setting).
    assert "different model configuration (num_heads 2 -> 4, model_dim 128 -> 64; weights: " in message
    state = torch.load(one_process_checkpoint, weights_only=False)
    state["code_hash"] = "0" * 16
    other = tmp_path / "other_code.pt"
    torch.save(state, other)
    message = config_error(SMALL + compact_files + ["--resume", str(other), "--steps", "18"], tmp_path / "b")
    assert "written by different code" in message and "--allow-code-change" in message
    args = SMALL + compact_files + ["--resume", str(other), "--steps", "18", "--allow-code-change", "true"]
    text = completed_log(run_trainer(args, tmp_path / "c"), tmp_path / "c")
    assert "changed settings: steps 16 -> 18" in text and val_losses(text)[-1][0] == 18
    # In this process the run's sources include the tests' own modules, so its code differs: allowed here.
    message = config_error(SMALL + compact_files + ["--resume", one_process_checkpoint, "--allow-code-change", "true"],
                           tmp_path / "d")
    assert "is at step 16, not before --steps 16" in message
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert "cannot read checkpoint" in config_error(SMALL + compact_files + ["--resume", str(tmp_path / "junk.pt")],
                                                    tmp_path / "e")


@pytest.mark.slow
def test_checkpoints_are_pruned_and_never_half_written(compact_files, tmp_path):
    args = SMALL + compact_files + ["--steps", "6", "--extension-steps", "0", "--val-every", "0", "--save-every", "2", "--keep-last", "2",
                                    "--save-final", "true", "--checkpoint-dir", str(tmp_path / "ckpt")]
    completed_log(run_trainer(args, tmp_path / "records"), tmp_path / "records")
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["step_000004.pt", "step_000006.pt"]
    # A write killed half way leaves a .tmp file, which is never taken for a checkpoint.
    (tmp_path / "ckpt" / "step_000008.pt.tmp").write_bytes(b"partial")
    from training.checkpoint import resolve
    assert resolve("latest", str(tmp_path / "ckpt")).endswith("step_000006.pt")
    # The resumed run is the same run: it prunes its predecessor's checkpoints as its own.
    resumed = [a if a != "6" else "10" for a in args] + ["--resume", "latest"]
    completed_log(run_trainer(resumed, tmp_path / "resumed"), tmp_path / "resumed")
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["step_000008.pt", "step_000010.pt"]


@pytest.mark.slow
def test_non_finite_loss_stops_at_once_naming_the_step(compact_files, tmp_path):
    args = SMALL + compact_files + ["--val-every", "0", "--adam-lr", "1e15", "--save-every", "2",
                                    "--checkpoint-dir", str(tmp_path / "ckpt")]
    result = run_trainer(args, tmp_path / "records")
    assert result.returncode == 1
    last = open(record_logs(tmp_path / "records")[0]).read().rstrip().splitlines()[-1]
    # Adam's first step (at step 1, stepping every second step) takes its parameters, the head's among
    # them (random, so it passes gradients from the start), to 1e15-sized values: the third step's
    # loss is not finite. Step 2's checkpoint is the last whose losses were all finite.
    expected = f"status: failed: non-finite train loss at step 3; last good checkpoint: {tmp_path / 'ckpt'}/step_000002.pt"
    assert last == expected
    assert result.stderr.strip().endswith(expected[len("status: failed: "):])


@pytest.mark.slow
def test_a_dying_rank_ends_the_job_naming_it(compact_files, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train_gpt.py", *SMALL,
           *compact_files, "--steps", "60", "--records-dir", str(tmp_path), "--checkpoint-dir", str(tmp_path / "c")]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    output = []
    for line in proc.stdout:
        output.append(line)
        if line.startswith("step:4/60 train_loss"):
            break
    victim = next(pid for pid in _pids() if _is_rank(pid, 1, proc.pid))
    os.kill(victim, signal.SIGKILL)
    started = time.monotonic()
    output.append(proc.stdout.read())
    assert proc.wait(timeout=180) != 0
    assert time.monotonic() - started < 120
    text = "".join(output)
    assert re.search(r"rank\s*: 1 \(local_rank: 1\)", text), text[-3000:]
    assert open(record_logs(tmp_path)[0]).read().rstrip().splitlines()[-1].startswith("status: failed")


def _is_rank(pid, rank, launcher_pid):
    """Whether pid is the launcher's train_gpt.py worker of that rank: never another run's on this machine."""
    try:
        environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        cmdline = open(f"/proc/{pid}/cmdline", "rb").read()
        return (b"train_gpt.py" in cmdline and f"RANK={rank}".encode() in environ
                and _is_descendant(pid, launcher_pid))
    except OSError:  # the process ended while we looked
        return False


def _is_descendant(pid, ancestor):
    while pid > 1:  # init (1) and the kernel (0) end every chain of parents
        with open(f"/proc/{pid}/stat") as f:
            pid = int(f.read().rsplit(")", 1)[1].split()[1])  # the parent's pid follows "(name) state"
        if pid == ancestor:
            return True
    return False


def _pids():
    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]


@pytest.mark.slow
def test_sample_generates_reproducibly(gpt2_checkpoint, capsys):
    args = ["--checkpoint", gpt2_checkpoint, "--prompt", "The function", "--max-new-tokens", "12", "--seed", "3"]
    first = subprocess.run([sys.executable, "scripts/sample.py", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                           timeout=300)
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("The function") and len(first.stdout) > len("The function\n")
    sys.path.insert(0, os.path.join(REPO_ROOT, "scripts"))
    import sample
    from training.checkpoint import model_from_checkpoint
    from sample import generate

    assert sample.main(args) == 0  # again, in this process: the same seed gives the same text
    assert capsys.readouterr().out == first.stdout

    model, config = model_from_checkpoint(gpt2_checkpoint, torch.device("cpu"))
    prompt = [50256, 464, 2163]
    greedy = generate(model, prompt, 5, 0.0, 0, config["seq_len"], torch.Generator(), stop_at_eot=False)
    tokens = list(prompt)
    for _ in range(5):  # greedy decoding spelled out
        with torch.no_grad():
            tokens.append(int(model(torch.tensor([tokens]))[0, -1, :50257].argmax()))
    assert greedy == tokens[3:]


@pytest.mark.slow
def test_scripts_that_read_gpt2_text_refuse_a_model_of_other_token_ids(one_process_checkpoint, capsys):
    """The suite's runs train on a compact vocabulary: GPT-2's tokenizer would feed them other words."""
    for folder in ("scripts", "evals"):
        sys.path.insert(0, os.path.join(REPO_ROOT, folder))
    import hellaswag
    import sample

    for script in (sample, hellaswag):  # in this process: a refusal needs no new interpreter
        assert script.main(["--checkpoint", one_process_checkpoint, "--device", "cpu"]) == 2
        assert capsys.readouterr().err == (
            f"error: {one_process_checkpoint} holds a model of 8192 token ids whose documents start at id 0, not "
            "GPT-2's: this script reads text with GPT-2's tokenizer\n")


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


@pytest.mark.slow
def test_hellaswag_scores_endings_and_splits_across_ranks(gpt2_checkpoint, tmp_path, capsys):
    data = tmp_path / "hellaswag.jsonl"
    data.write_text("".join(json.dumps(dict(e, ind=i, activity_label="x", split="val")) + "\n"
                            for i, e in enumerate(HELLASWAG)))
    args = ["evals/hellaswag.py", "--checkpoint", gpt2_checkpoint, "--data-files", str(data), "--device", "cpu"]
    one = subprocess.run([sys.executable, *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    line = re.search(r"hellaswag accuracy: (\d+)/5 = \S+", one.stdout)
    assert line and line.group(0) in two.stdout
    # The same answer computed independently: mean loss over each ending's tokens.
    sys.path.insert(0, os.path.join(REPO_ROOT, "evals"))
    import hellaswag
    import tiktoken

    if not torch.cuda.is_available():  # asking for a GPU that is not there is one clear line, not a CUDA error
        assert hellaswag.main([*args[1:-1], "cuda"]) == 2
        assert capsys.readouterr().err == "error: --device cuda but CUDA is not available here: pass --device cpu\n"

    from training.checkpoint import model_from_checkpoint
    model, _ = model_from_checkpoint(gpt2_checkpoint, torch.device("cpu"))
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


# ----------------------------------------------------------------------------- training/checkpoint.py on a tiny model

# A plan checks that the vocabulary holds --bos-token (GPT-2's 50256 by default): id 0 begins documents here.
TINY = dict(vocab_size=512, bos_token=0, num_layers=2, num_heads=2, model_dim=32, seq_len=16, batch_tokens=64)
# Record #46's recipe at that size: NorMuon's momentum and second moments, DistAdam's moments and
# the gradients it sums over two steps, the stages' batch sizes.
TINY46 = dict(PRESETS["record46"], **TINY, attention_free_layers="", mlp_free_layers="", long_window_layers="1",
              value_embed_layers="0:0,1:1", unet_skips="0:1", backout_layer="0", gate_dims=8, max_doc_len=0,
              steps=12, extension_steps=2, window_block=4, fp8_head=False, untimed_warmup_steps=0)
# HEAD's recipe at a size that keeps its layout (8 layers, cpu-tiny's): the tied head and its untie at
# step 9 (the third stage's first odd step), MUDD, the gates and the bigram table among the state.
TINY_HEAD = dict(PRESETS["cpu-tiny"], vocab_size=512, bos_token=0, num_heads=2, model_dim=32, seq_len=16, batch_tokens=64,
                 bigram_rows=257, dc_window=4, steps=14, extension_steps=2, window_block=4,
                 max_doc_len_stages="8,16,16", prefix_weight_stages="")


class TinyRun:
    """A model, its optimizer and its train loader one step into training: every kind of state a checkpoint holds."""

    def __init__(self, data_dir, seed=0, recipe=TINY):
        torch.manual_seed(seed)
        self.run_id = f"run-{seed}"
        self.config = Config(**recipe)
        self.steps_done = 0
        shard = os.path.join(data_dir, "tiny_train_000000.bin")
        write_shard(shard, np.random.default_rng(0).integers(0, TINY["vocab_size"], 4096))
        self.plan = make_plan(self.config)
        self.model = GPT.from_config(self.config)
        self.optimizer = Optimizer(self.model, self.plan)
        self.loader = TrainLoader([shard], TINY["batch_tokens"], TINY["seq_len"], 32, rank=0, world_size=1,
                                  device=torch.device("cpu"), vocab_size=TINY["vocab_size"], prefetch=False,
                                  stages=self.plan.stages)
        self.step()

    def step(self):
        self.model.set_windows(self.plan.windows_at(self.steps_done))
        self.optimizer.set_schedules(self.steps_done)
        loss = train_step(self.model, self.optimizer, self.loader.next_batch(), contextlib.nullcontext(),
                          self.steps_done, self.config)
        self.steps_done += 1
        return loss

    def save(self, folder, step, keep_last=0):
        return checkpoint.save(str(folder), step, self.model, self.optimizer, self.loader, 1.0,
                               dataclasses.asdict(self.config), {"train_gpt.py": "code"}, self.run_id, keep_last)


def checkpoint_steps(folder):
    return sorted(int(name[5:-3]) for name in os.listdir(folder) if re.fullmatch(r"step_\d+\.pt", name))


def test_keep_last_never_deletes_the_checkpoint_it_has_just_written(tmp_path):
    folder = tmp_path / "ckpt"
    older = TinyRun(tmp_path, seed=1)
    for step in (10, 12):  # an older, longer run left these
        older.save(folder, step)
    run = TinyRun(tmp_path)
    for step in (2, 4, 6):
        written = run.save(folder, step, keep_last=2)
        assert os.path.exists(written)  # the path the "resume with" line names
    assert checkpoint_steps(folder) == [4, 6, 10, 12]


def test_a_resumed_run_prunes_its_predecessors_checkpoints_and_no_other_runs(tmp_path):
    folder = tmp_path / "ckpt"
    TinyRun(tmp_path, seed=1).save(folder, 1)  # another run's, at a lower step than any of this run's
    stopped = TinyRun(tmp_path, seed=2)  # the run that stopped at step 4
    for step in (2, 4):
        stopped.save(folder, step, keep_last=2)
    run = TinyRun(tmp_path, seed=3)
    state = checkpoint.load(str(folder / "step_000004.pt"))
    checkpoint.restore(state, run.model, run.optimizer, run.loader)
    run.run_id = state["run_id"]  # as train_gpt.py continues the run it resumes
    run.save(folder, 6, keep_last=2)
    assert checkpoint_steps(folder) == [1, 4, 6]
    run.save(folder, 8, keep_last=2)
    assert checkpoint_steps(folder) == [1, 6, 8]


def test_resume_latest_skips_unreadable_newest_checkpoints_saying_so(tmp_path, capsys):
    folder = tmp_path / "ckpt"
    run = TinyRun(tmp_path)
    for step in (2, 4, 6, 8):
        run.save(folder, step)
    newest = folder / "step_000008.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # a copy cut short
    torch.save({"format": checkpoint.CHECKPOINT_FORMAT, "step": 6}, folder / "step_000006.pt")
    assert checkpoint.resolve("latest", str(folder)) == str(folder / "step_000004.pt")
    message = capsys.readouterr().err
    assert message.count("\n") == 1, message
    where = re.escape(str(folder))
    assert re.fullmatch(rf"--resume latest: skipped 2 unreadable checkpoint\(s\) \(cannot read checkpoint "
                        rf"{where}/step_000008.pt: RuntimeError: .+; {where}/step_000006.pt is not a complete "
                        rf"checkpoint: it has no train_time_ms, .+\); resuming from {where}/step_000004.pt\n",
                        message), message

    for step in (2, 4):
        (folder / f"step_00000{step}.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=rf"none of the 4 checkpoints in {where} can be read; the newest: "
                                              rf"cannot read checkpoint {where}/step_000008.pt"):
        checkpoint.resolve("latest", str(folder))


@pytest.mark.parametrize("recipe", [TINY, TINY46, TINY_HEAD], ids=["record11", "record46", "head"])
@pytest.mark.parametrize("steps_before", [1, 4])
def test_checkpoints_load_with_weights_only_and_restore_exactly(tmp_path, recipe, steps_before):
    # After 1 step (record46: Adam holds the first step's gradients for the second), or after 4
    # (record46: the second stage, its longer rows and windows, has begun).
    saved = TinyRun(tmp_path, recipe=recipe)
    for _ in range(steps_before - 1):
        saved.step()
    path = saved.save(tmp_path / "ckpt", steps_before)
    torch.load(path, weights_only=True)  # config, loader position, RNG and optimizer states: all plain data
    resumed = TinyRun(tmp_path, seed=1, recipe=recipe)
    checkpoint.restore(checkpoint.load(path), resumed.model, resumed.optimizer, resumed.loader)
    resumed.steps_done = saved.steps_done
    for windows in resumed.plan.windows_path(steps_before):
        resumed.model.set_windows(windows)
    for _ in range(3):  # equal updates need equal weights, optimizer states and the same next batches
        assert saved.step().item() == resumed.step().item()
    for a, b in zip(saved.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)


class RunsCodeWhenUnpickled:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


def test_a_checkpoint_that_would_run_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pt"
    torch.save({"format": checkpoint.CHECKPOINT_FORMAT, "model": RunsCodeWhenUnpickled(str(marker))}, path)
    with pytest.raises(CheckpointError) as refused:
        checkpoint.load(str(path))
    assert not marker.exists()
    assert str(refused.value) == (f"refusing to load {path}: it holds Python objects, not only tensors and plain data "
                                  "(Unsupported global: GLOBAL exec)")
    torch.load(path, weights_only=False)  # what the file does to a loader that trusts it
    assert marker.exists()


def test_a_checkpoint_folder_that_is_a_file_is_one_clear_error(tmp_path):
    a_file = tmp_path / "not_a_folder"
    a_file.write_text("")
    run = TinyRun(tmp_path)
    for folder in (a_file, a_file / "below"):
        expected = rf"^checkpoint folder {re.escape(str(folder))}: {re.escape(str(a_file))} is a file, not a folder"
        with pytest.raises(CheckpointError, match=expected):
            run.save(folder, 2)
        with pytest.raises(CheckpointError, match=expected):
            checkpoint.resolve("latest", str(folder))


def test_rank_finder_picks_only_the_launchers_own_worker(tmp_path):
    """The helper that kills a rank must never pick another train_gpt.py on the machine, say a real run."""
    # Each copy of this stand-in says who it is, so the test knows the right answer without the helper.
    script = "import os, time\nopen(f\"rank{os.environ['RANK']}.pid\", 'w').write(str(os.getpid()))\ntime.sleep(120)\n"
    for where in ("elsewhere", "launched"):
        (tmp_path / where).mkdir()
        (tmp_path / where / "train_gpt.py").write_text(script)
    env = {k: v for k, v in os.environ.items() if k != "RANK"}
    unrelated = subprocess.Popen([sys.executable, "train_gpt.py"], cwd=tmp_path / "elsewhere", env=dict(env, RANK="1"))
    launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                 "train_gpt.py"], cwd=tmp_path / "launched", env=env)
    try:
        pid_files = [tmp_path / "elsewhere" / "rank1.pid", tmp_path / "launched" / "rank1.pid"]
        deadline = time.monotonic() + 120
        while not all(f.exists() and f.read_text() for f in pid_files) and time.monotonic() < deadline:
            time.sleep(0.1)
        unrelated_pid, worker_pid = (int(f.read_text()) for f in pid_files)
        assert unrelated_pid == unrelated.pid
        assert [pid for pid in _pids() if _is_rank(pid, 1, launcher.pid)] == [worker_pid]
    finally:
        for proc in (unrelated, launcher):  # torchrun ends its workers when it is stopped
            proc.terminate()
            proc.wait(timeout=60)
