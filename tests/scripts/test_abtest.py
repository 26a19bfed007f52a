"""scripts/abtest.py: its statistics against formulas written out here, and short series of tiny CPU runs: a
known answer (fewer steps: faster and a higher val loss), a resumed series, the refusals, and two git revisions."""
import json
import math
import os
import shutil
import subprocess
import sys

import pytest

from scripts import abtest
from scripts.records import parse_log
from tests.util import REPO_ROOT, SMALL

# SMALL's model and batches, validated every 2 steps (two val points near the end for the measured rate), with
# no extension steps and the head untied from the start, so runs of 2 steps are valid too.
TINY = SMALL + ["--val-every", "2", "--extension-steps", "0", "--tied-head-stages", "0"]


def statistic_estimate(value, se, df_quantile, p):
    """The Estimate a t-statistic gives: value +- quantile * se, and p."""
    return abtest.Estimate(value, value - df_quantile * se, value + df_quantile * se, p)


# Student's t in closed form for 1 and 2 degrees of freedom, written out independently of scripts/records.py.
def cdf_df1(t):
    return 0.5 + math.atan(t) / math.pi


def cdf_df2(t):
    return 0.5 + t / (2 * math.sqrt(2 + t * t))


QUANTILE_975_DF1 = math.tan(math.pi * (0.975 - 0.5))
QUANTILE_975_DF2 = 0.95 * math.sqrt(2 / (1 - 0.95 ** 2))  # cdf_df2(q) = 0.975 solved for q


def assert_estimate(actual, expected):
    for field in ("value", "low", "high", "p_below"):
        assert getattr(actual, field) == pytest.approx(getattr(expected, field), rel=1e-6), field
    assert actual.why == ""


# ----------------------------------------------------------------------------- statistics

def test_welch_with_equal_spreads_has_two_degrees_of_freedom():
    # n = 2 a side, both variances 2: se = sqrt(2/2 + 2/2), df = (1 + 1)^2 / (1^2/1 + 1^2/1) = 2
    se, t = math.sqrt(2), (8 - 11) / math.sqrt(2)
    assert_estimate(abtest.welch([10.0, 12.0], [7.0, 9.0]), statistic_estimate(-3.0, se, QUANTILE_975_DF2, cdf_df2(t)))


def test_welch_t_and_degrees_of_freedom_by_hand():
    baseline, candidate = [1.0, 2.0, 4.0], [2.0, 3.5, 5.0, 7.0]
    mb, mc = 7 / 3, 17.5 / 4
    vb = sum((x - mb) ** 2 for x in baseline) / 2 / 3  # sample variance over n
    vc = sum((x - mc) ** 2 for x in candidate) / 3 / 4
    se = math.sqrt(vb + vc)
    df = (vb + vc) ** 2 / (vb ** 2 / 2 + vc ** 2 / 3)
    estimate = abtest.welch(baseline, candidate)
    assert estimate.value == pytest.approx(mc - mb)
    assert estimate.p_below == pytest.approx(abtest.student_t_cdf((mc - mb) / se, df))
    assert (estimate.high - estimate.low) / 2 == pytest.approx(abtest.student_t_quantile(0.975, df) * se)


def test_paired_interval_is_a_t_interval_on_the_differences():
    # differences -1 and -1.5: mean -1.25, sd sqrt(0.125), se 0.25, df 1
    estimate = abtest.paired([10.0, 11.0], [9.0, 9.5])
    assert_estimate(estimate, statistic_estimate(-1.25, 0.25, QUANTILE_975_DF1, cdf_df1(-1.25 / 0.25)))
    # Welch on the same numbers ignores the pairing: a wider interval around the same difference
    unpaired = abtest.welch([10.0, 11.0], [9.0, 9.5])
    assert unpaired.value == pytest.approx(-1.25) and unpaired.high - unpaired.low > estimate.high - estimate.low


def test_p_below_the_target_is_the_leaderboards_one_sided_t_test():
    losses = [3.270, 3.275, 3.2785]
    mean = sum(losses) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in losses) / 2)
    t = (mean - 3.28) / (sd / math.sqrt(3))
    assert abtest.one_sample(losses, 3.28).p_below == pytest.approx(cdf_df2(t))


def test_no_spread_gives_no_interval_and_no_p_value():
    assert abtest.paired([3.5, 3.6], [3.5, 3.6]) == abtest.Estimate(0.0, why="no spread")
    # differences of 4-decimal losses equal but for float rounding: still no spread
    baseline = [3.2791, 4.1234, 5.0007]
    candidate = [x + 0.0001 for x in baseline]
    assert abtest.paired(baseline, candidate).why == "no spread"
    assert abtest.welch([3.28, 3.28], [3.27, 3.27]).why == "no spread"
    assert abtest.one_sample([3.27, 3.27], 3.28).why == "no spread"
    assert abtest.welch([3.28], [3.27, 3.26]).why == "fewer than 2 runs in an arm"
    assert abtest.fmt_p(0.0) == "< 1e-6" and abtest.fmt_p(0.01234) == "0.0123"


def test_track3_statistic_reproduces_the_leaderboards_worked_examples():
    # records/track_3_optimization/README.md: result #12 against #6 (50 steps fewer, loss +0.0002, n = 20 and 20),
    # #13 against #8 (40 steps fewer, loss 3.2785 against 3.2778, n = 16 and 10), #13 against #11 (15 fewer, same loss)
    assert abtest.track3_statistic(0.0002, -50, 20, 20) == pytest.approx(0.00648, abs=5e-6)
    assert abtest.track3_statistic(3.2785 - 3.2778, -40, 10, 16) == pytest.approx(0.0027, abs=5e-5)
    assert abtest.track3_statistic(0.0, -15, 16, 10) == pytest.approx(0.00167, abs=5e-6)
    # "0.0014 val loss is worth about 100 * 0.0014/0.0045 = 31 steps"
    assert abtest.loss_in_steps(0.0014) == pytest.approx(31.1, abs=0.05)


def test_loss_per_100_steps_from_the_last_two_val_points():
    assert abtest.loss_per_100_steps_at_end([(0, 9.0, 0), (100, 3.30, 10), (200, 3.2955, 20)]) == pytest.approx(0.0045)
    assert abtest.loss_per_100_steps_at_end([(200, 3.2955, 20)]) is None


def result(pair, arm, loss, time_s, steps=100, completed=True):
    """A run's result as read from its log: two val points at its end, or none for a run that failed."""
    return abtest.RunResult(pair, arm, completed, "completed" if completed else "failed (exit 1, log: failed: x)",
                            loss if completed else None, time_s if completed else None, steps,
                            [(steps - 50, loss + 0.01, 0), (steps, loss, time_s * 1000)] if completed else [])


def test_a_failed_run_counts_as_a_miss_and_leaves_the_pairing():
    results = [result(0, "baseline", 3.30, 10.0), result(0, "candidate", 3.28, 9.0),
               result(1, "baseline", 3.31, 10.5), result(1, "candidate", None, None, completed=False),
               result(2, "baseline", 3.29, 10.2), result(2, "candidate", 3.27, 9.6)]
    summary = abtest.compare(results)
    assert (summary["candidate"]["runs"], summary["candidate"]["missed"]) == (3, 1)
    assert summary["candidate"]["below_target"].p_below is None
    assert "1 run(s) missed the target" in summary["candidate"]["below_target"].why
    assert summary["baseline"]["below_target"].p_below is not None
    # paired over pairs 0 and 2 only; Welch over every completed run
    assert summary["train_time_s"]["paired"].value == pytest.approx(((9.0 - 10.0) + (9.6 - 10.2)) / 2)
    assert summary["train_time_s"]["welch"].value == pytest.approx((9.0 + 9.6) / 2 - (10.0 + 10.5 + 10.2) / 3)
    assert summary["steps_for_loss"]["n_candidate"] == 2
    plan = {"pairs": 3, "order": [["baseline", "candidate"]] * 3, "nproc": 1, "common_flags": [],
            **{arm: {"revision": None, "flags": []} for arm in abtest.ARMS}}
    text = abtest.markdown(plan, results, summary, 3.28, abtest.notes_on(results))
    assert "pair 1's candidate failed (exit 1, log: failed: x): it counts as missing the target" in text


def test_run_id_and_final_loss_lines_are_read_outside_the_embedded_sources(tmp_path):
    log = tmp_path / "run.txt"
    log.write_text("==== source: training/example.py ====\nrun id: " + "a" * 32 + "\nfinal val_loss: 1.5\n"
                   "==== run ====\nrun id: " + "b" * 32 + "\nstep:4/4 val_loss:3.2800 train_time:10ms step_avg:2.50ms\n"
                   "final val_loss: 3.2799876\nstatus: completed\n")
    assert abtest.run_id_of(str(tmp_path), "run.txt") == "b" * 32
    assert parse_log(str(log)).final_val_loss == 3.2799876
    log.write_text(log.read_text().replace("final val_loss: 3.2799876\n", ""))  # a log of older code
    assert parse_log(str(log)).final_val_loss == 3.28


def test_the_order_is_seeded_and_a_longer_series_keeps_it():
    order = abtest.draw_order(20, 0)
    assert all(sorted(pair) == sorted(abtest.ARMS) for pair in order)
    assert order[:5] == abtest.draw_order(5, 0) and order != abtest.draw_order(20, 1)
    assert {tuple(pair) for pair in order} == {abtest.ARMS, abtest.ARMS[::-1]}  # both orders occur


def test_run_flags_set_seed_folders_and_no_final_checkpoint_unless_asked(tmp_path):
    plan = {"common_flags": ["--preset", "cpu-tiny"], "baseline": {"flags": []},
            "candidate": {"flags": ["--save-final", "true"]}}
    out = str(tmp_path)
    assert abtest.run_flags(out, plan, 3, "baseline") == [
        "--preset", "cpu-tiny", "--seed", "3", "--records-dir", os.path.join(out, "baseline"),
        "--checkpoint-dir", os.path.join(out, "checkpoints", "baseline_3"), "--save-final", "false"]
    assert abtest.run_flags(out, plan, 3, "candidate") == [
        "--preset", "cpu-tiny", "--save-final", "true", "--seed", "3", "--records-dir", os.path.join(out, "candidate"),
        "--checkpoint-dir", os.path.join(out, "checkpoints", "candidate_3")]
    assert abtest.launcher(1) == [sys.executable]
    assert abtest.launcher(8)[1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=8"]


# ----------------------------------------------------------------------------- series of tiny runs

# One thread a run: beside other work on two cores, a run's two threads wait on each other (a 2-step run measured
# 3 s of train time with one thread, 66 s with two, beside another run).
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(autouse=True)
def one_thread_a_run(monkeypatch):
    for name, value in ONE_THREAD.items():
        monkeypatch.setenv(name, value)


def abtest_main(capsys, *args):
    """(exit status, stdout, stderr) of the tool in this process (it imports no torch: each run is a process)."""
    status = abtest.main([str(a) for a in args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def series_args(out, compact_files, pairs=2):
    return ["--out", out, "--pairs", pairs, "--baseline-flags=--steps 10", "--candidate-flags=--steps 2", "--",
            *TINY, *compact_files]


@pytest.fixture(scope="module")
def fewer_steps_series(compact_files, tmp_path_factory):
    """A finished series of the working tree, from the command line: the candidate trains 2 steps, the baseline 10;
    (out, stdout)."""
    out = str(tmp_path_factory.mktemp("abtest") / "series")
    command = [sys.executable, os.path.join("scripts", "abtest.py"), *map(str, series_args(out, compact_files))]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, **ONE_THREAD))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result.stdout


def read_series(out):
    with open(os.path.join(out, "series.json")) as f:
        return json.load(f)


@pytest.mark.slow
def test_fewer_steps_is_faster_with_a_higher_val_loss(fewer_steps_series):
    out, printed = fewer_steps_series
    series = read_series(out)
    plan = series["plan"]
    assert [(r["pair"], r["arm"]) for r in series["runs"]] == abtest.planned_runs(plan)  # each once, in order
    assert plan["order"] == abtest.draw_order(2, 0) and series["in_flight"] is None
    for record in series["runs"]:
        assert record["exit_status"] == 0 and record["log"].startswith(record["arm"] + os.sep)
        run = parse_log(os.path.join(out, record["log"]))
        assert run.config["seed"] == record["pair"]
        assert run.total_steps == {"baseline": 10, "candidate": 2}[record["arm"]]
    run_ids = [record["run_id"] for record in series["runs"] if record["run_id"]]  # where the trainer writes them
    assert len(set(run_ids)) == len(run_ids)
    results = [abtest.read_result(out, record) for record in series["runs"]]
    summary = abtest.compare(results)
    assert summary["train_time_s"]["welch"].value < 0 and summary["final_val_loss"]["welch"].value > 0
    assert all(r.completed for r in results) and summary["steps_for_loss"]["step_difference"] == -8
    assert not os.path.exists(os.path.join(out, "checkpoints"))  # no final checkpoints unless the flags ask
    assert not summary["steps_for_loss"]["passes"]  # 8 steps saved are worth far less than the loss given up
    assert all(summary[arm]["loss_per_100_steps"] > 0 for arm in abtest.ARMS)
    text = open(os.path.join(out, "abtest.md")).read()
    assert text in printed and os.path.getsize(os.path.join(out, "abtest.png")) > 10_000
    assert f"| final val loss | {abtest.fmt_estimate(summary['final_val_loss']['welch'], '.5f')} |" in text
    for label in ("[1/4] pair 0", "[4/4] pair 1"):
        assert label in printed
    assert "final val loss" in printed and "    step:10/10 val_loss:" in printed  # each run's progress


def test_a_run_that_failed_after_logging_its_final_val_loss_completed(tmp_path):
    """As for the records tool: the final checkpoint's save failing after the final validation (exit 1) leaves a
    completed run; a run that failed before it is a miss."""
    fixture = open(os.path.join(REPO_ROOT, "tests", "fixtures", "records", "own_speedrun.txt")).read()
    (tmp_path / "candidate").mkdir()
    after = fixture.replace("status: completed", "status: failed: OSError: [Errno 28] No space left on device")
    before = fixture[:fixture.index("step:6/6 val_loss")] + "status: failed: RuntimeError: NCCL timeout\n"
    for name, text in (("after.txt", after), ("before.txt", before)):
        (tmp_path / "candidate" / name).write_text(text)
    record = {"pair": 0, "arm": "candidate", "run_id": None, "exit_status": 1}
    saved = abtest.read_result(str(tmp_path), dict(record, log="candidate/after.txt"))
    assert saved.completed and saved.final_val_loss == pytest.approx(3.277031898)
    assert not abtest.read_result(str(tmp_path), dict(record, log="candidate/before.txt")).completed


@pytest.mark.slow
def test_the_full_precision_final_val_loss_is_read_where_the_log_has_it(fewer_steps_series, tmp_path):
    out, _ = fewer_steps_series
    record = read_series(out)["runs"][0]
    (tmp_path / record["arm"]).mkdir()
    lines = [line for line in open(os.path.join(out, record["log"])).read().splitlines()
             if not line.startswith("final val_loss: ")]  # the working tree's trainer may write it already
    final = max(i for i, line in enumerate(lines) if " val_loss:" in line)
    lines.insert(final + 1, "final val_loss: 6.123456789")
    (tmp_path / record["log"]).write_text("\n".join(lines) + "\n")
    assert abtest.read_result(str(tmp_path), record).final_val_loss == 6.123456789


@pytest.mark.slow
def test_an_interrupted_series_resumes_with_exactly_the_missing_run(fewer_steps_series, compact_files, tmp_path,
                                                                   capsys):
    out = str(tmp_path / "series")
    shutil.copytree(fewer_steps_series[0], out)
    series = read_series(out)
    in_flight = series["runs"].pop()  # the last run was in flight when the driver was killed
    stale_log = os.path.join(out, in_flight["log"])
    text = open(stale_log).read()
    open(stale_log, "w").write(text[:text.index("step:2/")])  # its log stops mid-run
    stale_checkpoints = os.path.join(out, "checkpoints", f"{in_flight['arm']}_{in_flight['pair']}")
    os.makedirs(stale_checkpoints)
    open(os.path.join(stale_checkpoints, "step_000001.pt"), "w").close()  # a stopped run saves one
    series["in_flight"] = {"pair": in_flight["pair"], "arm": in_flight["arm"], "pid": os.getpid()}  # a recycled pid
    # this one failed on its own before its final validation: a miss, never rerun
    series["runs"][0]["exit_status"] = 1
    failed_log = os.path.join(out, series["runs"][0]["log"])
    failed_text = open(failed_log).read()
    last_val = failed_text.rindex("\nstep:", 0, failed_text.index("\nfinal val_loss:") if "\nfinal val_loss:" in
                                  failed_text else failed_text.index("\nstatus:"))
    open(failed_log, "w").write(failed_text[: last_val + 1] + "status: failed: RuntimeError: simulated\n")
    kept = series["runs"]
    with open(os.path.join(out, "series.json"), "w") as f:
        json.dump(series, f)

    status, printed, _ = abtest_main(capsys, *series_args(out, compact_files))
    assert status == 0
    progress = [line for line in printed.splitlines() if line.startswith("[")]
    assert len(progress) == 2 and all(line.startswith("[4/4]") for line in progress)  # one run: started, ended
    assert f"[4/4] pair {in_flight['pair']}, {in_flight['arm']} (seed {in_flight['pair']})" in printed
    resumed = read_series(out)
    assert resumed["runs"][:3] == kept and len(resumed["runs"]) == 4 and resumed["in_flight"] is None
    new = resumed["runs"][3]
    assert (new["pair"], new["arm"]) == (in_flight["pair"], in_flight["arm"]) and new["log"] != in_flight["log"]
    abandoned = os.path.join(out, "abandoned", in_flight["log"])
    assert open(abandoned).read() == text[:text.index("step:2/")] and not os.path.exists(stale_log)
    assert len(os.listdir(os.path.join(out, "abandoned", "checkpoints"))) == 1
    assert sorted(os.listdir(os.path.join(out, new["arm"]))) == sorted(
        os.path.basename(r["log"]) for r in resumed["runs"] if r["arm"] == new["arm"])
    report = open(os.path.join(out, "abtest.md")).read()
    failed = kept[0]
    assert (f"pair {failed['pair']}'s {failed['arm']} failed (exit 1, log: failed: RuntimeError: simulated)"
            in report)
    assert "1 run(s) missed the target" in report


def test_different_presets_are_refused_before_any_run(tmp_path, capsys):
    out = tmp_path / "series"
    status, _, err = abtest_main(capsys, "--out", out, "--pairs", 2, "--candidate-flags=--preset record46", "--",
                                 "--preset", "cpu-tiny")
    assert status == 2 and "the baseline runs preset cpu-tiny and the candidate record46" in err
    assert not out.exists()
    status, _, err = abtest_main(capsys, "--out", out, "--pairs", 2, "--baseline-flags=--preset cpu-tiny")
    assert status == 2 and "the baseline runs preset cpu-tiny and the candidate speedrun" in err  # the default
    assert not out.exists()
    status, _, err = abtest_main(capsys, "--out", out, "--pairs", 2, "--", "--seed", "5")
    assert status == 2 and "name --seed: the series sets it" in err and not out.exists()


@pytest.mark.slow
def test_another_command_over_a_series_is_refused(fewer_steps_series, compact_files, tmp_path, capsys):
    out = str(tmp_path / "series")
    shutil.copytree(fewer_steps_series[0], out)
    before = open(os.path.join(out, "series.json")).read()
    args = series_args(out, compact_files)
    changed = [a if a != "--candidate-flags=--steps 2" else "--candidate-flags=--steps 3" for a in args]
    status, _, err = abtest_main(capsys, *changed)
    assert status == 2 and "candidate flags: the series has '--steps 2', this command '--steps 3'" in err
    status, _, err = abtest_main(capsys, *["--candidate-rev", "HEAD", *args])
    assert status == 2 and "candidate revision: the series has 'the working tree'" in err
    status, _, err = abtest_main(capsys, *[1 if a == 2 else a for a in args])
    assert status == 2 and "--pairs 1: the series has finished runs of 2 pairs" in err
    assert open(os.path.join(out, "series.json")).read() == before
    # a run of the series still training (a driver killed, its run not): refused until it ends
    series = json.loads(before)
    series["runs"].pop()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "train_gpt.py"])
    try:
        with open(os.path.join(out, "series.json"), "w") as f:
            json.dump(dict(series, in_flight={"pair": 1, "arm": "x", "pid": sleeper.pid}), f)
        status, _, err = abtest_main(capsys, *args)
        assert status == 2 and f"still training (pid {sleeper.pid})" in err
    finally:
        sleeper.kill()
        sleeper.wait()
    assert sorted(os.listdir(out)) == sorted(os.listdir(fewer_steps_series[0]))  # nothing ran, nothing moved


def test_a_longer_series_extends_the_stored_plan():
    plan = {"baseline": {"revision": None, "flags": []}, "candidate": {"revision": None, "flags": ["--x"]},
            "common_flags": [], "nproc": 1, "order_seed": 0, "pairs": 2, "order": [["candidate", "baseline"]] * 2}
    series = {"plan": plan, "runs": [{"pair": 1, "arm": "baseline"}], "in_flight": None}
    longer = dict(plan, pairs=4, order=abtest.draw_order(4, 0))
    extended = abtest.reconcile(series, longer)["plan"]
    assert extended["pairs"] == 4 and extended["order"][:2] == plan["order"]  # the stored draws stand
    assert extended["order"][2:] == abtest.draw_order(4, 0)[2:]


@pytest.mark.slow
def test_two_revisions_exported_from_git(compact_files, tmp_path, capsys):
    # HEAD as both arms, differing in a flag that does not change the math: every pair's val losses are equal
    sha = subprocess.run(["git", "-C", REPO_ROOT, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    out = str(tmp_path / "series")
    args = ["--out", out, "--pairs", 2, "--baseline-rev", "HEAD", "--candidate-rev", "HEAD",
            "--baseline-flags=--train-log-every 1", "--candidate-flags=--train-log-every 2", "--", *TINY,
            "--steps", "2", *compact_files]
    status, printed, err = abtest_main(capsys, *args)
    assert status == 0, err
    tree = os.path.join(out, "trees", sha)
    head_config = subprocess.run(["git", "-C", REPO_ROOT, "show", "HEAD:config.py"], capture_output=True,
                                 text=True).stdout
    series = read_series(out)
    assert series["plan"]["baseline"]["revision"] == series["plan"]["candidate"]["revision"] == sha
    for record in series["runs"]:
        run = parse_log(os.path.join(out, record["log"]))
        assert run.sources["config.py"] == head_config  # the tree's modules, not the working tree's
        assert os.path.join(tree, "train_gpt.py") in open(os.path.join(out, record["log"])).read()
    summary = abtest.compare([abtest.read_result(out, record) for record in series["runs"]])
    assert summary["final_val_loss"]["paired"] == abtest.Estimate(0.0, why="no spread")
    assert "| +0.00000 (no interval: no spread) | n/a (no spread) |\n" in printed  # paired final val loss
    # the same command again: nothing runs, the export is used as it is
    open(os.path.join(tree, "marker"), "w").close()
    status, printed, _ = abtest_main(capsys, *args)
    assert status == 0 and "[1/4]" not in printed and os.path.exists(os.path.join(tree, "marker"))
    assert read_series(out)["runs"] == series["runs"]
