"""The golden runs: short float32 runs of every preset whose printed losses must never change
unless a change means to change them (tests/test_golden.py compares them with tests/fixtures/golden.json).

    python tests/golden_runs.py WORKDIR record11,record46,cpu-tiny --train-files ... --val-files ...
    torchrun --standalone --nproc_per_node=2 tests/golden_runs.py WORKDIR cpu-tiny --train-files ...

Runs the named runs of GOLDEN_RUNS in this one process, one after another (under torchrun, one
run a launch: a process group is set up once a process) and writes WORKDIR/figures.json:
{run: {"train": [[step, loss], ...], "val": [[step, loss], ...]}} as the record logs print them.
On one process, the record46 run saves a checkpoint at step 5 and is then resumed from it.
"""
import io
import json
import os
import re
import sys
from contextlib import redirect_stdout

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

COMMON = ["--device", "cpu", "--dtype", "float32", "--numerics", "float32", "--train-log-every", "1", "--save-final", "false"]
GOLDEN_RUNS = {
    # record #11's recipe at a small width: contiguous rows, DDP, Muon + AdamW
    "record11": ["--preset", "record11", "--num-layers", "4", "--num-heads", "2", "--model-dim", "64",
                 "--seq-len", "64", "--batch-tokens", "256", "--micro-batch-tokens", "64", "--steps", "8",
                 "--val-tokens", "1024", "--val-every", "4", "--untimed-warmup-steps", "0",
                 "--muon-momentum-warmup-steps", "4", "--cooldown-frac", "0.5"],
    # record #46's recipe (12 layers) at a small width: 3 stages of 3 steps and an extension step,
    # windows of 8-token blocks, one untimed warm-up step per stage, NorMuon + DistAdam
    "record46": ["--preset", "record46", "--num-heads", "2", "--model-dim", "64", "--seq-len", "64",
                 "--batch-tokens", "128", "--micro-batch-tokens", "64", "--max-doc-len", "96", "--steps", "10",
                 "--extension-steps", "1", "--window-block", "8", "--val-tokens", "1024", "--val-seq-len", "256",
                 "--val-every", "5", "--untimed-warmup-steps", "1", "--muon-momentum-warmup-steps", "4",
                 "--muon-momentum-cooldown-steps", "2", "--fp8-head", "false"],
    # the cpu-tiny preset at the suite's SMALL size (tests/util.py)
    "cpu-tiny": ["--preset", "cpu-tiny", "--seq-len", "128", "--batch-tokens", "256", "--micro-batch-tokens", "128",
                 "--val-tokens", "2048", "--val-seq-len", "1024", "--steps", "16", "--val-every", "8"],
}
RESUME_FROM = ("record46", 5)


def losses(log_text, kind):
    return [[int(step), float(loss)]
            for step, loss in re.findall(rf"^step:(\d+)/\d+ {kind}:(\S+) ", log_text, re.M)]


def run(name, args, workdir):
    import train_gpt

    records = os.path.join(workdir, name)
    with redirect_stdout(io.StringIO()) as out:
        status = train_gpt.main(args + ["--records-dir", records, "--checkpoint-dir", records + "_checkpoints"])
    if status != 0:
        raise SystemExit(f"golden run {name} failed with status {status}:\n{out.getvalue()[-2000:]}")
    if int(os.environ.get("RANK", 0)) != 0:
        return None
    [log] = [os.path.join(records, f) for f in os.listdir(records) if f.endswith(".txt")]
    text = open(log).read()
    return {"train": losses(text, "train_loss"), "val": losses(text, "val_loss")}


def main(argv):
    workdir, names, data_args = argv[0], argv[1].split(","), argv[2:]
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    figures = {}
    for name in names:
        extra = ["--save-every", str(RESUME_FROM[1])] if name == RESUME_FROM[0] and world_size == 1 else []
        figures[name] = run(name, COMMON + GOLDEN_RUNS[name] + data_args + extra, workdir)
        if extra:
            checkpoint = os.path.join(workdir, f"{name}_checkpoints", f"step_{RESUME_FROM[1]:06d}.pt")
            figures[f"{name} resumed at step {RESUME_FROM[1]}"] = run(
                f"{name}-resumed", COMMON + GOLDEN_RUNS[name] + data_args + ["--resume", checkpoint], workdir)
    if int(os.environ.get("RANK", 0)) == 0:
        with open(os.path.join(workdir, "figures.json"), "w") as f:
            json.dump(figures, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
