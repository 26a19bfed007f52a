"""A/B test on one machine: baseline and candidate runs interleaved, then their differences with intervals and p-values.

    python scripts/abtest.py --out abtests/my-change --pairs 8 --candidate-rev my-branch \\
        --nproc 8                                                    # the working tree against a branch, 8 GPUs a run
    python scripts/abtest.py --out abtests/lr --pairs 4 --candidate-flags="--stage-lr 1,1.6,1.8"
    python scripts/abtest.py --out ab --pairs 2 --baseline-flags="--steps 8" --candidate-flags="--steps 4" \\
        -- --preset cpu-tiny --device cpu --train-files 'data/pydocs/pydocs_train_*.bin' \\
        --val-files 'data/pydocs/pydocs_val_*.bin'                   # flags after -- go to every run

Timings differ between machines by more than many improvements, so a change is measured against its baseline on
the same machine, runs interleaved: pair i runs the baseline and the candidate, both with --seed i, in an order
drawn per pair (--order-seed makes the draw reproducible). An arm is a git revision (--baseline-rev,
--candidate-rev; default: the working tree as it is) and flags (--baseline-flags, --candidate-flags; give them as
--candidate-flags="..." when they start with a dash). A revision is exported with git archive into
OUT/trees/<sha>/ (the repository is not touched) and run from the repository's root, so relative data paths mean
the same for both arms. Before the first run each arm's train_gpt.py checks its flags (--plan); arms of different
presets (--preset in the flags, speedrun without one; and the logs' presets after) are refused unless
--allow-different-presets.

OUT holds everything: series.json (the plan and each finished run), the record logs (OUT/baseline/,
OUT/candidate/), each run's output (OUT/output/), checkpoints (OUT/checkpoints/<arm>_<pair>/, none at the end
unless the flags ask with --save-final), the report (OUT/abtest.md, OUT/abtest.png). Run the same command again
to resume an interrupted series: the run that was in flight runs again (its partial log goes to OUT/abandoned/),
finished runs never run or count twice; --pairs may grow to extend a finished series. Another command over the
same OUT is refused, naming what differs. A run that fails counts as missing the target and is not rerun.

The report: each arm's mean train time and final val loss (the full-precision `final val_loss:` line where the
log has one); candidate - baseline with 95% intervals, Welch's (unpaired) and paired by pair, and the one-sided
p-value that the candidate is lower (faster); each arm's p-value that its mean val loss is below --target (the
leaderboard's rule: p < 0.01); and steps against loss at the Track 3 rate (modded-nanogpt's
records/track_3_optimization: 0.0045 val loss per 100 steps, and a pair of arms differs significantly when
((baseline - candidate loss) + (baseline - candidate steps) / 100 * 0.0045) / sqrt(1/n1 + 1/n2) >= 0.004), beside
the rate each arm measured between its last two validations.
"""
import argparse
import dataclasses
import json
import math
import os
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:  # run as `python scripts/abtest.py`, the path starts at scripts/
    sys.path.insert(0, REPO_ROOT)

from scripts.records import (SIGNIFICANCE, TARGET_VAL_LOSS, LogError, parse_log, student_t_cdf,  # noqa: E402
                             student_t_quantile)
from training.record_log import STATUS_COMPLETED, STATUS_INTERRUPTED, parse_step_line  # noqa: E402

ARMS = ("baseline", "candidate")
COLOURS = {"baseline": "tab:blue", "candidate": "tab:orange"}
DEFAULT_PRESET = "speedrun"  # train_gpt.py's, when the flags name none
CONFIDENCE = 0.95
# Track 3's exchange rate of steps for val loss, and the statistic a pair of results must reach to differ
# (KellerJordan/modded-nanogpt, records/track_3_optimization/README.md, "Pairwise statistical significance").
LOSS_PER_100_STEPS = 0.0045
TRACK3_THRESHOLD = 0.004
# A spread this small against the values' size is float rounding (or 4-decimal logs), not a measurement.
NEGLIGIBLE_SPREAD = 1e-9
SERIES_FILE = "series.json"
# The series sets these per run; in the user's flags they would split or mislabel the series.
FLAGS_THE_SERIES_SETS = ("--seed", "--records-dir")


class Refusal(Exception):
    """What this tool will not do (run a command, compare runs), with the reason."""


# ----------------------------------------------------------------------------- statistics (pure)

@dataclasses.dataclass(frozen=True)
class Estimate:
    """A mean (or difference of means) against a reference: its value, 95% interval and the one-sided p-value
    that the true value is below the reference. Where the data cannot give an interval, `why` says why."""
    value: float = None
    low: float = None
    high: float = None
    p_below: float = None
    why: str = ""


def t_estimate(value, se, df, scale):
    """value's t-interval and P(true value < 0) from its standard error; none where the spread is nil at scale."""
    if se <= NEGLIGIBLE_SPREAD * scale:
        return Estimate(value, why="no spread")
    half = student_t_quantile(0.5 + CONFIDENCE / 2, df) * se
    return Estimate(value, value - half, value + half, student_t_cdf(value / se, df))


def one_sample(values, reference=0.0, scale=None, what="runs"):
    """mean(values) - reference, with the one-sample t-interval and p that the true mean is below reference."""
    if len(values) < 2:
        return Estimate(statistics.fmean(values) - reference if values else None, why=f"fewer than 2 {what}")
    scale = max(map(abs, values)) if scale is None else scale
    return t_estimate(statistics.fmean(values) - reference, statistics.stdev(values) / math.sqrt(len(values)),
                      len(values) - 1, scale)


def paired(baseline, candidate):
    """mean(candidate_i - baseline_i) over pairs, its t-interval and p that the candidate is lower."""
    scale = max(map(abs, baseline + candidate), default=0.0)  # the values' size, not the differences'
    return one_sample([c - b for b, c in zip(baseline, candidate, strict=True)], scale=scale,
                      what="pairs with both runs completed")


def welch(baseline, candidate):
    """mean(candidate) - mean(baseline), Welch's t-interval (unequal variances) and p that the candidate is lower."""
    if len(baseline) < 2 or len(candidate) < 2:
        value = statistics.fmean(candidate) - statistics.fmean(baseline) if baseline and candidate else None
        return Estimate(value, why="fewer than 2 runs in an arm")
    vb, vc = statistics.variance(baseline) / len(baseline), statistics.variance(candidate) / len(candidate)
    value = statistics.fmean(candidate) - statistics.fmean(baseline)
    se = math.sqrt(vb + vc)
    # Welch-Satterthwaite; without a spread there is no interval to take it for
    df = (vb + vc) ** 2 / (vb ** 2 / (len(baseline) - 1) + vc ** 2 / (len(candidate) - 1)) if se > 0 else None
    return t_estimate(value, se, df, scale=max(map(abs, baseline + candidate)))


def loss_in_steps(loss_difference, loss_per_100_steps=LOSS_PER_100_STEPS):
    """The steps a val loss difference is worth at the given rate."""
    return loss_difference / loss_per_100_steps * 100


def track3_statistic(loss_difference, step_difference, n_baseline, n_candidate,
                     loss_per_100_steps=LOSS_PER_100_STEPS):
    """Track 3's pairwise statistic of a candidate against a baseline (differences candidate - baseline): the loss
    it gains plus the loss its saved steps are worth, over sqrt(1/n1 + 1/n2). It differs at >= TRACK3_THRESHOLD."""
    gain = -loss_difference - step_difference / 100 * loss_per_100_steps
    return gain / math.sqrt(1 / n_baseline + 1 / n_candidate)


def loss_per_100_steps_at_end(val_points):
    """The val loss one run lost per 100 steps between its last two validations, or None with fewer than two."""
    points = sorted({step: loss for step, loss, *_ in val_points}.items())
    if len(points) < 2:
        return None
    (step_before, loss_before), (last_step, last_loss) = points[-2:]
    return (loss_before - last_loss) / (last_step - step_before) * 100


# ----------------------------------------------------------------------------- the plan and series.json

def resolve_revision(rev):
    """The full sha of a git revision, or None for the working tree."""
    if rev is None:
        return None
    result = subprocess.run(["git", "-C", REPO_ROOT, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise Refusal(f"'{rev}' is not a commit of the repository at {REPO_ROOT}")
    return result.stdout.strip()


def flag_value(flags, name):
    """The value the last `name VALUE` or `name=VALUE` in flags gives (argparse's rule), or None."""
    value = None
    for i, flag in enumerate(flags):
        if flag == name and i + 1 < len(flags):
            value = flags[i + 1]
        elif flag.startswith(name + "="):
            value = flag.split("=", 1)[1]
    return value


def names_flag(flags, name):
    return any(flag == name or flag.startswith(name + "=") for flag in flags)


def arm_flags(plan, arm):
    """Every flag an arm's runs take from the user: the common ones, then the arm's own (they win)."""
    return plan["common_flags"] + plan[arm]["flags"]


def preset_of(plan, arm):
    return flag_value(arm_flags(plan, arm), "--preset") or DEFAULT_PRESET


def draw_order(pairs, order_seed):
    """Which arm runs first in each pair; a longer series keeps a shorter one's draws as its first pairs."""
    rng = random.Random(order_seed)
    return [rng.sample(ARMS, 2) for _ in range(pairs)]


def make_plan(args, common_flags):
    plan = {arm: {"revision": resolve_revision(getattr(args, f"{arm}_rev")),
                  "flags": shlex.split(getattr(args, f"{arm}_flags"))} for arm in ARMS}
    plan.update(common_flags=common_flags, nproc=args.nproc, order_seed=args.order_seed, pairs=args.pairs,
                order=draw_order(args.pairs, args.order_seed))
    return plan


def check_flags(plan, allow_different_presets):
    """Refuses flags the series sets itself, and arms of different presets (unless allowed)."""
    for arm in ARMS:
        for name in FLAGS_THE_SERIES_SETS:
            if names_flag(arm_flags(plan, arm), name):
                raise Refusal(f"the {arm}'s flags name {name}: the series sets it for every run (seed = pair)")
    presets = {arm: preset_of(plan, arm) for arm in ARMS}
    if presets["baseline"] != presets["candidate"] and not allow_different_presets:
        raise Refusal(f"the baseline runs preset {presets['baseline']} and the candidate {presets['candidate']}: "
                      "pass --allow-different-presets to compare them anyway")


# What must match for a series to resume; --pairs may change (see reconcile).
COMMAND_FIELDS = {
    "baseline revision": lambda plan: plan["baseline"]["revision"] or "the working tree",
    "baseline flags": lambda plan: shlex.join(plan["baseline"]["flags"]),
    "candidate revision": lambda plan: plan["candidate"]["revision"] or "the working tree",
    "candidate flags": lambda plan: shlex.join(plan["candidate"]["flags"]),
    "flags of every run": lambda plan: shlex.join(plan["common_flags"]),
    "processes per run": lambda plan: plan["nproc"],
    "order seed": lambda plan: plan["order_seed"],
}


def new_series(plan):
    return {"plan": plan, "runs": [], "in_flight": None}


def load_series(out):
    path = os.path.join(out, SERIES_FILE)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def save_series(out, series):
    """Written whole to a new file, then renamed over the old: an interruption never leaves half a series."""
    path = os.path.join(out, SERIES_FILE)
    with open(path + ".new", "w", encoding="utf-8") as f:
        json.dump(series, f, indent=1)
    os.replace(path + ".new", path)


def reconcile(series, plan):
    """The series this command continues: the stored one where the commands match (its pairs set to this
    command's), a new one where nothing has finished yet; refuses a different command over finished runs."""
    if series is None:
        return new_series(plan)
    if not series["runs"]:
        return dict(series, plan=plan)  # its in-flight run, if any, is still checked and abandoned
    stored = series["plan"]
    differences = [f"{name}: the series has {show(stored)!r}, this command {show(plan)!r}"
                   for name, show in COMMAND_FIELDS.items() if show(stored) != show(plan)]
    started_pairs = 1 + max(run["pair"] for run in series["runs"])
    if plan["pairs"] < started_pairs:
        differences.append(f"--pairs {plan['pairs']}: the series has finished runs of {started_pairs} pairs")
    if differences:
        raise Refusal("this folder holds a series of another command (use another --out, or the series' "
                      "command):\n  " + "\n  ".join(differences))
    order = stored["order"] + plan["order"][len(stored["order"]):]  # the stored draws stand
    series["plan"] = dict(stored, pairs=plan["pairs"], order=order[:plan["pairs"]])
    return series


def planned_runs(plan):
    """(pair, arm) in the order they run."""
    return [(pair, arm) for pair in range(plan["pairs"]) for arm in plan["order"][pair]]


def finished(series):
    return {(run["pair"], run["arm"]) for run in series["runs"]}


# ----------------------------------------------------------------------------- running

def export_tree(out, sha):
    """OUT/trees/<sha>/: the revision's files from git archive (not a worktree: the repository is untouched);
    an existing export is used as it is."""
    tree = os.path.join(out, "trees", sha)
    if os.path.isdir(tree):
        return tree
    partial = tree + ".partial"  # renamed when complete: an interrupted export is never taken for a tree
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    archive = subprocess.Popen(["git", "-C", REPO_ROOT, "archive", "--format=tar", sha], stdout=subprocess.PIPE)
    extract = subprocess.run(["tar", "-x", "-C", partial], stdin=archive.stdout)
    archive.stdout.close()
    if archive.wait() != 0 or extract.returncode != 0:
        raise Refusal(f"could not export revision {sha} into {partial}")
    os.rename(partial, tree)
    return tree


def script_of(out, plan, arm):
    revision = plan[arm]["revision"]
    return os.path.join(export_tree(out, revision) if revision else REPO_ROOT, "train_gpt.py")


def launcher(nproc):
    if nproc == 1:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]


def run_flags(out, plan, pair, arm):
    """A run's flags: the user's, the pair's seed, the arm's log folder, and a checkpoint folder of its own with
    no final checkpoint unless the user's flags say otherwise."""
    flags = arm_flags(plan, arm) + ["--seed", str(pair), "--records-dir", os.path.join(out, arm)]
    if not names_flag(flags, "--checkpoint-dir"):
        flags += ["--checkpoint-dir", checkpoint_dir(out, pair, arm)]
    if not names_flag(flags, "--save-final"):
        flags += ["--save-final", "false"]
    return flags


def checkpoint_dir(out, pair, arm):
    return os.path.join(out, "checkpoints", f"{arm}_{pair}")


def check_arms_start(out, plan):
    """Each arm's train_gpt.py --plan with its flags, both at once: a flag its code refuses stops the series
    before any run."""
    commands = {arm: [sys.executable, script_of(out, plan, arm), *run_flags(out, plan, 0, arm), "--plan"]
                for arm in ARMS}
    checks = {arm: subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for arm, command in commands.items()}
    for arm, check in checks.items():
        stdout, stderr = check.communicate()
        if check.returncode != 0:
            raise Refusal(f"the {arm}'s train_gpt.py refuses its flags: {(stderr or stdout).strip()}")


def still_running(pid):
    """Whether a run an earlier driver started still trains (it would share the machine with the next run)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, another user's
    try:  # where /proc exists, a recycled pid is told from the run by its command line
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except OSError:
        return True
    return not cmdline or b"train_gpt.py" in cmdline  # none yet: a process in the middle of starting


def abandon_stale_files(out, series):
    """Moves what unfinished runs left (a log, a checkpoint folder) to OUT/abandoned/, so nothing reads it."""
    recorded = {run["log"] for run in series["runs"]}
    for arm in ARMS:
        folder = os.path.join(out, arm)
        for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
            if os.path.join(arm, name) not in recorded:
                move_to_abandoned(out, os.path.join(folder, name), os.path.join(arm, name))
    done = finished(series)
    for pair, arm in planned_runs(series["plan"]):
        folder = checkpoint_dir(out, pair, arm)
        if (pair, arm) not in done and os.path.exists(folder):
            stamp = time.strftime("%Y%m%d-%H%M%S")  # a run abandoned twice leaves two folders
            move_to_abandoned(out, folder, os.path.join("checkpoints", f"{arm}_{pair}_{stamp}"))


def move_to_abandoned(out, path, name):
    target = os.path.join(out, "abandoned", name)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    os.replace(path, target)
    print(f"abandoned (a run that did not finish): {os.path.relpath(path, out)} -> {os.path.relpath(target, out)}")


def run_one(out, series, pair, arm, label):
    """Runs one (pair, arm) and records it in series.json; None where the series must stop (the run was refused
    before training, or stopped by a signal) and the run stays unrecorded, to run again on resuming."""
    plan = series["plan"]
    arm_dir, output_path = os.path.join(out, arm), os.path.join(out, "output", f"{arm}_{pair}.txt")
    os.makedirs(arm_dir, exist_ok=True)
    os.makedirs(os.path.dirname(output_path), exist_ok=True)
    logs_before = set(os.listdir(arm_dir))
    print(f"{label} pair {pair}, {arm} (seed {pair}): output in {output_path}", flush=True)
    started = time.time()

    def in_flight(pid):  # a killed driver leaves this behind: the next one checks the run has ended
        series["in_flight"] = {"pair": pair, "arm": arm, "pid": pid}
        save_series(out, series)

    command = launcher(plan["nproc"]) + [script_of(out, plan, arm), *run_flags(out, plan, pair, arm)]
    exit_status = run_echoing_validation(command, output_path, in_flight)
    series["in_flight"] = None
    save_series(out, series)
    new_logs = sorted(set(os.listdir(arm_dir)) - logs_before)
    log = os.path.join(arm, new_logs[-1]) if new_logs else None
    if stops_the_series(out, log, exit_status, output_path):
        return None
    record = {"pair": pair, "arm": arm, "log": log, "run_id": run_id_of(out, log), "exit_status": exit_status}
    series["runs"].append(record)
    save_series(out, series)
    result = read_result(out, record)
    print(f"{label} pair {pair}, {arm}: {describe_result(result)} (wall {time.time() - started:.0f} s)", flush=True)
    return record


def run_echoing_validation(command, output_path, on_start):
    """Runs command from the repository root with its output into output_path, echoing its validation lines (the
    run's progress); on_start(pid) once it has started. Returns its exit status."""
    with open(output_path, "w", encoding="utf-8") as output, subprocess.Popen(
            command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as process:
        on_start(process.pid)
        for line in process.stdout:
            output.write(line)
            step = parse_step_line(line.rstrip("\n"))
            if step and step.val_loss is not None:
                print(f"    {line.rstrip()}", flush=True)
    return process.returncode


def stops_the_series(out, log, exit_status, output_path):
    """A run refused before training (no log, exit 2) or stopped by a signal is not a result: say so and stop."""
    if log is None and exit_status == 2:
        tail = open(output_path, encoding="utf-8").read().strip().splitlines()[-3:]
        print("error: the run was refused before training:\n  " + "\n  ".join(tail), file=sys.stderr)
        return True
    if log is not None and parse_log(os.path.join(out, log)).status == STATUS_INTERRUPTED:
        print("error: the run was stopped by a signal; run the same command again to resume (it runs again)",
              file=sys.stderr)
        return True
    return False


def run_id_of(out, log):
    """The run id of a log (None where the log has none: written by older code, or no log)."""
    return None if log is None else parse_log(os.path.join(out, log)).run_id


def run_series(out, series):
    """Runs every planned run not finished yet, in the plan's order; False where the series stopped early."""
    if series["in_flight"] and still_running(series["in_flight"]["pid"]):
        raise Refusal(f"a run of this series is still training (pid {series['in_flight']['pid']}): wait for it "
                      "or end it, then run this command again")
    os.makedirs(out, exist_ok=True)
    save_series(out, series)
    todo = [run for run in planned_runs(series["plan"]) if run not in finished(series)]
    if not todo:
        return True
    check_arms_start(out, series["plan"])
    abandon_stale_files(out, series)
    total = len(planned_runs(series["plan"]))
    for pair, arm in todo:
        label = f"[{len(series['runs']) + 1}/{total}]"
        if run_one(out, series, pair, arm, label) is None:
            return False
    return True


# ----------------------------------------------------------------------------- reading the runs

@dataclasses.dataclass
class RunResult:
    pair: int
    arm: str
    completed: bool  # a run that did not complete counts as missing the target
    status: str
    final_val_loss: float = None
    train_time_s: float = None
    steps: int = None
    val_points: list = dataclasses.field(default_factory=list)  # (step, val loss, train time ms)
    preset: str = ""
    code: str = ""  # the sources the log embeds, as one string: runs of one arm should all have the same
    log: str = None


def read_result(out, record):
    if record["log"] is None:
        return RunResult(record["pair"], record["arm"], False, f"failed (exit {record['exit_status']}, no log)")
    path = os.path.join(out, record["log"])
    run = parse_log(path)
    # The log decides, as for the records tool: a run that logged its final val loss and then failed (its final
    # checkpoint's save) completed, whatever its exit status.
    completed = run.status == STATUS_COMPLETED
    status = (run.status_text if completed else
              f"failed (exit {record['exit_status']}, log: {run.status_text})")
    return RunResult(record["pair"], record["arm"], completed, status, run.final_val_loss,
                     run.train_time_s, run.total_steps, run.val_points, run.preset,
                     json.dumps(run.sources, sort_keys=True), record["log"])


def describe_result(result):
    if not result.completed:
        return result.status
    return f"completed, final val loss {result.final_val_loss:.6f}, train time {result.train_time_s:.3f} s"


def check_logged_presets(results, allow_different_presets):
    """The presets the logs name, as the flags' check did before the runs; logs outlive and can contradict it."""
    presets = {arm: sorted({r.preset for r in results if r.arm == arm and r.preset}) for arm in ARMS}
    if presets["baseline"] != presets["candidate"] and not allow_different_presets:
        raise Refusal(f"the logs name different presets (baseline {', '.join(presets['baseline'])}, candidate "
                      f"{', '.join(presets['candidate'])}): pass --allow-different-presets to compare them anyway")


# ----------------------------------------------------------------------------- the comparison

def compare(results, target=TARGET_VAL_LOSS, loss_per_100_steps=LOSS_PER_100_STEPS):
    """Every statistic of the report, from the runs' results (a dict; Estimates where intervals apply)."""
    done = {arm: [r for r in results if r.arm == arm and r.completed] for arm in ARMS}
    summary = {arm: arm_summary(arm, results, done[arm], target) for arm in ARMS}
    both = sorted({r.pair for r in done["baseline"]} & {r.pair for r in done["candidate"]})
    by_pair = {arm: {r.pair: r for r in done[arm]} for arm in ARMS}
    for quantity in ("train_time_s", "final_val_loss"):
        values = {arm: [getattr(r, quantity) for r in done[arm]] for arm in ARMS}
        in_pairs = {arm: [getattr(by_pair[arm][pair], quantity) for pair in both] for arm in ARMS}
        summary[quantity] = {"welch": welch(values["baseline"], values["candidate"]),
                             "paired": paired(in_pairs["baseline"], in_pairs["candidate"])}
    summary["steps_for_loss"] = steps_for_loss(summary, loss_per_100_steps)
    return summary


def arm_summary(arm, results, done, target):
    """One arm's runs, means, p-value against the target, and measured val loss per 100 steps."""
    missed = sum(1 for r in results if r.arm == arm and not r.completed)
    losses = [r.final_val_loss for r in done]
    target_test = one_sample(losses, target)
    if missed:  # a missed run has no loss to test: a p-value without it would flatter the rest
        target_test = Estimate(target_test.value, why=f"{missed} run(s) missed the target (did not complete)")
    rates = [rate for rate in (loss_per_100_steps_at_end(r.val_points) for r in done) if rate is not None]
    return {"runs": len(done) + missed, "missed": missed,
            "steps": statistics.fmean(r.steps for r in done) if done else None,
            "train_time_s": mean_and_spread([r.train_time_s for r in done]),
            "final_val_loss": mean_and_spread(losses),
            "below_target": target_test,
            "loss_per_100_steps": statistics.fmean(rates) if rates else None}


def mean_and_spread(values):
    """(mean, standard deviation), None where the values cannot give them."""
    return (statistics.fmean(values) if values else None, statistics.stdev(values) if len(values) > 1 else None)


def steps_for_loss(summary, loss_per_100_steps):
    """The arms' val loss difference in steps, their step difference, and Track 3's statistic over both."""
    baseline, candidate = summary["baseline"], summary["candidate"]
    loss_difference = summary["final_val_loss"]["welch"].value
    if loss_difference is None:
        return None
    step_difference = candidate["steps"] - baseline["steps"]
    n_baseline, n_candidate = baseline["runs"] - baseline["missed"], candidate["runs"] - candidate["missed"]
    statistic = track3_statistic(loss_difference, step_difference, n_baseline, n_candidate, loss_per_100_steps)
    return {"rate": loss_per_100_steps, "loss_difference": loss_difference,
            "loss_in_steps": loss_in_steps(loss_difference, loss_per_100_steps), "step_difference": step_difference,
            "baseline_steps": baseline["steps"], "candidate_steps": candidate["steps"], "n_baseline": n_baseline,
            "n_candidate": n_candidate, "track3": statistic, "passes": statistic >= TRACK3_THRESHOLD}


# ----------------------------------------------------------------------------- the report

def fmt(value, spec):
    return "-" if value is None else format(value, spec)


def fmt_p(p):
    return "< 1e-6" if p < 1e-6 else f"{p:.3g}"  # a p of 0.0 is underflow, never certainty


def fmt_mean(mean_spread, spec):
    mean, spread = mean_spread
    return fmt(mean, spec) + ("" if spread is None else f" ± {format(spread, spec)}")


def fmt_estimate(estimate, spec):
    """`+1.23 [+1.00, +1.46]`, or the value and why there is no interval."""
    if estimate.value is None:
        return f"n/a ({estimate.why})"
    if estimate.why:
        return f"{format(estimate.value, '+' + spec)} (no interval: {estimate.why})"
    value, low, high = (format(x, "+" + spec) for x in (estimate.value, estimate.low, estimate.high))
    return f"{value} [{low}, {high}]"


def fmt_p_below(estimate):
    return f"n/a ({estimate.why})" if estimate.p_below is None else fmt_p(estimate.p_below)


def describe_arm(plan, arm):
    revision, flags = plan[arm]["revision"], shlex.join(plan[arm]["flags"])
    return (revision[:12] if revision else "the working tree") + (f", `{flags}`" if flags else "")


def markdown(plan, results, summary, target, notes):
    processes = f", {plan['nproc']} processes" if plan["nproc"] > 1 else ""
    return "\n".join([f"# A/B test: {plan['pairs']} pair(s) on one machine", "",
                      *[f"- {arm}: {describe_arm(plan, arm)}" for arm in ARMS],
                      f"- every run: `{shlex.join(plan['common_flags'])}`{processes}", "",
                      *arm_table(summary, target), *difference_table(summary),
                      *steps_for_loss_lines(summary),
                      *[f"- {note}" for note in notes], *([""] if notes else []),
                      *runs_table(plan, results)]) + "\n"


def arm_table(summary, target):
    lines = [f"| arm | runs | missed | steps | train time (s) | final val loss | p (mean val loss < {target}) "
             "| val loss per 100 steps at the end |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for arm in ARMS:
        s = summary[arm]
        lines.append(f"| {arm} | {s['runs']} | {s['missed']} | {fmt(s['steps'], 'g')} | "
                     f"{fmt_mean(s['train_time_s'], '.3f')} | {fmt_mean(s['final_val_loss'], '.5f')} | "
                     f"{fmt_p_below(s['below_target'])} | {fmt(s['loss_per_100_steps'], '.4f')} |")
    return lines + ["", f"Means ± standard deviation over the completed runs; p < {SIGNIFICANCE} qualifies for the "
                    "leaderboard.", ""]


def difference_table(summary):
    lines = ["| candidate - baseline | Welch: difference [95% interval] | Welch p (candidate lower) "
             "| paired: difference [95% interval] | paired p (candidate lower) |", "| --- | --- | --- | --- | --- |"]
    for quantity, name, spec in (("train_time_s", "train time (s)", ".3f"),
                                 ("final_val_loss", "final val loss", ".5f")):
        unpaired, in_pairs = summary[quantity]["welch"], summary[quantity]["paired"]
        lines.append(f"| {name} | {fmt_estimate(unpaired, spec)} | {fmt_p_below(unpaired)} | "
                     f"{fmt_estimate(in_pairs, spec)} | {fmt_p_below(in_pairs)} |")
    return lines + ["", "p: one-sided, that the candidate's true mean is lower (faster, or a lower val loss). Paired: "
                    "pair i's candidate minus pair i's baseline (one seed, run side by side).", ""]


def runs_table(plan, results):
    lines = ["| pair | order | arm | status | steps | train time (s) | final val loss | log |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in sorted(results, key=lambda r: (r.pair, plan["order"][r.pair].index(r.arm))):
        lines.append(f"| {r.pair} | {plan['order'][r.pair].index(r.arm) + 1} | {r.arm} | {r.status} | "
                     f"{fmt(r.steps, 'd')} | {fmt(r.train_time_s, '.3f')} | {fmt(r.final_val_loss, '.6f')} | "
                     f"{r.log or '-'} |")
    return lines


def steps_for_loss_lines(summary):
    s = summary["steps_for_loss"]
    if s is None:
        return ["Steps for loss: no run of one arm completed.", ""]
    net = -s["step_difference"] - s["loss_in_steps"]
    verdict = "passes" if s["passes"] else "does not pass"
    measured = ", ".join(f"{arm} {fmt(summary[arm]['loss_per_100_steps'], '.4f')}" for arm in ARMS)
    return [f"Steps for loss, at the Track 3 rate of {s['rate']} val loss per 100 steps:",
            f"- the val loss difference, {s['loss_difference']:+.5f}, is worth {s['loss_in_steps']:+,.1f} steps",
            f"- the candidate runs {s['step_difference']:+,g} steps ({s['candidate_steps']:g} against "
            f"{s['baseline_steps']:g}): net, it is {abs(net):,.1f} steps' worth {'ahead' if net >= 0 else 'behind'}",
            f"- Track 3's statistic ((baseline - candidate loss) + (baseline - candidate steps) / 100 x {s['rate']}) "
            f"/ sqrt(1/{s['n_baseline']} + 1/{s['n_candidate']}) = {s['track3']:+.5f}: {verdict} (it must reach "
            f"{TRACK3_THRESHOLD})",
            f"- the rate these runs measured between their last two validations: {measured} per 100 steps", ""]


def notes_on(results):
    """What the reader must know beyond the tables: runs that missed, code that changed within an arm."""
    notes = [f"pair {r.pair}'s {r.arm} {r.status}: it counts as missing the target and is left out of the "
             "differences" for r in results if not r.completed]
    for arm in ARMS:
        if len({r.code for r in results if r.arm == arm and r.code}) > 1:
            notes.append(f"the {arm}'s logs embed different code: its code changed during the series (the working "
                         "tree edited?)")
    return notes


def plot(results, path):
    """Val loss against step and against train time for every run, and each pair's train times."""
    fig, (by_step, by_time, per_pair) = plt.subplots(1, 3, figsize=(17, 4.8))
    labelled = set()
    for r in results:
        points = [p for p in r.val_points if p[0] > 0] or r.val_points  # step 0's loss would flatten the curves
        if not points:
            continue
        label = None if r.arm in labelled else r.arm
        labelled.add(r.arm)
        by_step.plot([p[0] for p in points], [p[1] for p in points], color=COLOURS[r.arm], marker=".", alpha=0.7,
                     label=label)
        by_time.plot([p[2] / 1000 for p in points], [p[1] for p in points], color=COLOURS[r.arm], marker=".",
                     alpha=0.7, label=label)
    for arm in ARMS:
        done = [r for r in results if r.arm == arm and r.completed]
        per_pair.plot([r.pair for r in done], [r.train_time_s for r in done], "o", color=COLOURS[arm], label=arm)
    for ax, xlabel, ylabel, title in ((by_step, "step", "val loss", "val loss against step"),
                                      (by_time, "train time (s)", "val loss", "val loss against train time"),
                                      (per_pair, "pair (seed)", "train time (s)", "train time of each pair")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    per_pair.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(out, series, args):
    results = [read_result(out, record) for record in series["runs"]]
    check_logged_presets(results, args.allow_different_presets)
    summary = compare(results, args.target, args.loss_per_100_steps)
    text = markdown(series["plan"], results, summary, args.target, notes_on(results))
    with open(os.path.join(out, "abtest.md"), "w", encoding="utf-8") as f:
        f.write(text)
    plot(results, os.path.join(out, "abtest.png"))
    print("\n" + text)
    print(f"wrote {os.path.join(out, 'abtest.md')} and {os.path.join(out, 'abtest.png')}")


# ----------------------------------------------------------------------------- command line

def parse_args(argv):
    common_flags = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     epilog="Flags after -- go to every run's train_gpt.py.")
    parser.add_argument("--out", required=True, help="the series' folder (run the same command again to resume)")
    parser.add_argument("--pairs", type=int, required=True,
                        help="pairs of runs, one baseline and one candidate each (more extend a finished series)")
    for arm in ARMS:
        parser.add_argument(f"--{arm}-rev", default=None, help=f"git revision of the {arm} (default: the working tree)")
        parser.add_argument(f"--{arm}-flags", default="", help=f"train_gpt.py flags of the {arm}'s runs only")
    parser.add_argument("--nproc", type=int, default=1, help="processes per run (torchrun) (default 1: plain python)")
    parser.add_argument("--order-seed", type=int, default=0, help="seed of each pair's drawn order")
    parser.add_argument("--target", type=float, default=TARGET_VAL_LOSS,
                        help="the val loss each arm's p-value tests its mean against (default %(default)s)")
    parser.add_argument("--loss-per-100-steps", type=float, default=LOSS_PER_100_STEPS,
                        help="the val loss 100 steps are worth (Track 3's rule, default %(default)s)")
    parser.add_argument("--allow-different-presets", action="store_true", help="compare arms of different presets")
    args = parser.parse_args(argv)
    if args.pairs < 1 or args.nproc < 1:
        parser.error("--pairs and --nproc must be at least 1")
    return args, common_flags


def main(argv=None):
    args, common_flags = parse_args(sys.argv[1:] if argv is None else argv)
    out = os.path.abspath(args.out)
    try:
        plan = make_plan(args, common_flags)
        check_flags(plan, args.allow_different_presets)
        series = reconcile(load_series(out), plan)
        if not run_series(out, series):
            return 1
        report(out, series, args)
    except (Refusal, LogError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: run the same command again to resume (the run in flight runs again)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
