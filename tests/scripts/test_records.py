"""scripts/records.py on leaderboard-format fixtures and on this project's own logs."""
import itertools
import json
import math
import os
import re
import shutil
import statistics
import uuid

import pytest

from scripts import records
from tests.util import REPO_ROOT
from training.record_log import format_resumed_line

FIXTURES = os.path.join(REPO_ROOT, "tests", "fixtures", "records")
NVIDIA_SMI = """Sun Nov 10 19:09:29 2024
+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI 555.42.06              Driver Version: 555.42.06      CUDA Version: 12.5     |
|-----------------------------------------+------------------------+----------------------+
""" + "".join(f"|   {i}  NVIDIA H100 80GB HBM3          Off |   00000000:18:00.0 Off |                    0 |\n"
              for i in range(8))


def leaderboard_log(path, final_loss, total_time_ms=433570, steps=3000, code="print('record')\n", finished=True):
    """A log in KellerJordan/modded-nanogpt's 2024-10/11 format: code between rules, nvidia-smi, step lines."""
    lines = ["=" * 100, code.rstrip("\n"), "=" * 100, "Running pytorch 2.5.1+cu124 compiled for CUDA 12.4",
             "nvidia-smi:", NVIDIA_SMI, "=" * 100]
    for step in range(0, steps + 1, 250):
        if not finished and step == steps:
            break
        t = total_time_ms * step / steps
        if step:
            lines.append(f"step:{step}/{steps} train_loss:{final_loss + 0.2:.4f} train_time:{t:.0f}ms "
                         f"step_avg:{t / step:.2f}ms")
        loss = final_loss if step == steps else 4.0 - step / steps * 0.5
        lines.append(f"step:{step}/{steps} val_loss:{loss:.4f} train_time:{t:.0f}ms step_avg:{t / max(step, 1):.2f}ms")
    path.write_text("\n".join(lines) + "\n")
    return str(path)


SEEDS = itertools.count(1)  # every log made here draws a seed of its own unless a test gives one


def read_fixture(source):
    return open(source if os.path.isabs(source) else os.path.join(FIXTURES, source)).read()


def with_final_loss(text, loss):
    """text with its last validation's loss set to loss: the step line's 4 decimals and, where the log has
    one, the full-precision `final val_loss:` line."""
    last = list(re.finditer(r"^(step:\d+/\d+ val_loss:)\S+", text, flags=re.M))[-1]
    text = f"{text[:last.start()]}{last.group(1)}{loss:.4f}{text[last.end():]}"
    return re.sub(r"^final val_loss: .*$", f"final val_loss: {loss!r}", text, flags=re.M)


def with_identity(text, run_id=None, seed=None):
    """text as the log of a run of its own: a fresh run id (where the log has one) and seed (where its config
    has one) unless given. A copy of a log with its id and seed would be the same run, or one run's seed twice."""
    text = re.sub(r"^run id: [0-9a-f]{32}$", f"run id: {run_id or uuid.uuid4().hex}", text, flags=re.M)
    return re.sub(r'^(\s*"seed": )\d+', rf"\g<1>{next(SEEDS) if seed is None else seed}", text, flags=re.M)


def stopped(text, before, status):
    """text cut before the line starting with `before`, ended by that status."""
    return text[:text.index("\n" + before) + 1] + f"status: {status}\n"


def variant(source, path, final_loss=None, replace=(), run_id=None, seed=None):
    """A copy of the log `source` (a path, or a file name in tests/fixtures/records) at path, with its last
    val loss set to final_loss and each (old, new) of replace applied: another run (its own run id and seed
    unless given) of the same program."""
    text = read_fixture(source)
    if final_loss is not None:
        text = with_final_loss(text, final_loss)
    for old, new in replace:
        assert old in text, old
        text = text.replace(old, new)
    path.write_text(with_identity(text, run_id, seed))
    return str(path)


def own_run_stopped(path, before, status, run_id=None, seed=None):
    """This project's log of a run that stopped before the line starting with `before`, with that status."""
    path.write_text(with_identity(stopped(read_fixture("own_speedrun.txt"), before, status), run_id, seed))
    return str(path)


def own_resumed(path, run_id, seed, at_step, final_loss=None, stop_before=None, status="completed"):
    """This project's log of run run_id (of that seed) resumed from its checkpoint at step at_step: a `resumed
    from` line, then the fixture's val lines from at_step on and its train lines after it, ending with status
    (before the line starting with stop_before, where given)."""
    lines = []
    for line in read_fixture("own_speedrun.txt").splitlines():
        step = re.match(r"^step:(\d+)/\d+ (val|train)_loss", line)
        if step and (int(step[1]) < at_step or (int(step[1]) == at_step and step[2] == "train")):
            continue  # trained by the logs before: the resumed run validates at at_step, then trains on
        lines.append(line)
        if line.startswith("val set: "):
            lines.append(format_resumed_line(f"checkpoints/step_{at_step:06d}.pt", at_step, 200.0 * at_step, 2, []))
    text = "\n".join(lines) + "\n"
    if final_loss is not None:
        text = with_final_loss(text, final_loss)
    text = stopped(text, stop_before or "status: ", status)
    path.write_text(with_identity(text, run_id, seed))
    return str(path)


def stats_json(capsys, *args):
    assert records.main(["stats", *map(str, args), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_leaderboard_logs_parse(tmp_path):
    run = records.parse_log(leaderboard_log(tmp_path / "a.txt", 3.2753))
    assert run.status == "completed" and run.final_val_loss == 3.2753 and run.total_steps == 3000
    assert run.train_time_s == pytest.approx(433.57) and run.step_avg_ms == pytest.approx(144.52, abs=0.01)
    assert run.hardware == "8x NVIDIA H100 80GB HBM3" and run.date == "2024-11-10 19:09"
    assert run.sources == {"train_gpt.py": "print('record')\n"}
    unfinished = records.parse_log(leaderboard_log(tmp_path / "b.txt", 3.27, finished=False))
    assert unfinished.status == "incomplete" and unfinished.final_val_loss is None


# Each format of KellerJordan/modded-nanogpt's records/track_1_short logs, as a small fixture of our own:
# (file, total steps, final val loss, train time in s or None, hardware, date, first line of embedded code)
LEADERBOARD_FORMATS = [
    ("llmc_2024-06.log", 7, 9.30177, None, "unknown", "unknown", None),
    ("leading_rule_2024-10.txt", 6, 6.4785, 75.795, "2x NVIDIA H100 80GB HBM3", "2024-10-10 08:00", "import os"),
    ("code_first_2024-12.txt", 6, 4.9876, 32.42, "2x NVIDIA H100 80GB HBM3", "2024-12-05 04:56", "import os"),
    ("code_first_2025.txt", 6, 3.2781, 1.39, "2x NVIDIA H100 80GB HBM3", "2025-09-05 12:34", "import os"),
]


@pytest.mark.parametrize("name, steps, final_loss, time_s, hardware, date, code", LEADERBOARD_FORMATS)
def test_every_leaderboard_log_format_parses(name, steps, final_loss, time_s, hardware, date, code):
    run = records.parse_log(os.path.join(FIXTURES, name))
    assert run.status == "completed" and not run.malformed
    assert run.total_steps == steps and run.final_val_loss == final_loss and run.train_time_s == time_s
    assert run.hardware == hardware and run.date == date
    assert [p[0] for p in run.val_points] == ([0, 4, 7] if name.startswith("llmc") else [0, 3, 6])
    if code:
        source = run.sources["train_gpt.py"]
        assert source.startswith(code + "\n") and "====" not in source and "Running" not in source
    else:
        assert run.sources == {}


@pytest.mark.skipif(not os.environ.get("MODDED_NANOGPT_RECORDS"),
                    reason="set MODDED_NANOGPT_RECORDS to a checkout's records/track_1_short to read the real logs")
def test_real_leaderboard_logs_parse():
    logs = [p for p in records.collect_logs([os.environ["MODDED_NANOGPT_RECORDS"]]) if os.path.getsize(p)]
    for run in map(records.parse_log, logs):
        assert not run.malformed and run.val_points and run.status in ("completed", "incomplete"), run.path
        llmc = records.LLMC_LINE.match(open(run.path).readline())
        assert bool(run.sources) != bool(llmc) and (run.hardware == "unknown") == bool(llmc), run.path
        if run.status == "completed":
            assert math.isfinite(run.final_val_loss) and (run.train_time_s is None) == bool(llmc), run.path


def test_own_log_parses(one_process_log):
    run = records.parse_log(one_process_log)
    assert run.status == "completed" and run.total_steps == 16 and run.hardware.startswith("CPU: ")
    assert [p[0] for p in run.val_points] == [0, 8, 16]
    assert run.preset == "cpu-tiny" and run.config["batch_tokens"] == 256
    assert "train_gpt.py" in run.sources and "optim/muon.py" in run.sources


def test_own_gpu_log_counts_the_gpus_it_used(tmp_path):
    # nvidia-smi lists the machine's 3 GPUs; the run used as many as its world size.
    run = records.parse_log(os.path.join(FIXTURES, "own_speedrun.txt"))
    assert run.status == "completed" and run.final_val_loss == 3.2770318984985352 and run.train_time_s == 1.2
    assert run.final[1] == 3.277 and not run.final_loss_rounded  # the step line's 4 decimals, the full value beside
    assert run.run_id == "5f0c3a9e8d7b4c2a9e1f0d3c5b7a9e1f" and run.seed == 0 and run.resumed is None
    assert (run.val_set.tokens, run.val_set.vocab_size) == (10_485_760, 50257) and run.val_set.sha256[:4] == "3f1a"
    assert run.hardware == "2x NVIDIA H100 80GB HBM3" and run.preset == "speedrun"
    assert run.sources == {"train_gpt.py": "print(\"a stand-in for this project's train_gpt.py\")\n"}
    three = variant("own_speedrun.txt", tmp_path / "three.txt", replace=[("world size 2,", "world size 3,")])
    assert records.parse_log(three).hardware == "3x NVIDIA H100 80GB HBM3"


def test_stats_p_value_matches_the_t_distribution(tmp_path, capsys):
    losses = [3.270, 3.271, 3.272]
    for i, loss in enumerate(losses):
        leaderboard_log(tmp_path / f"run{i}.txt", loss, total_time_ms=430000 + 1000 * i)
    assert records.main(["stats", str(tmp_path), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    mean, std = sum(losses) / 3, math.sqrt(sum((x - sum(losses) / 3) ** 2 for x in losses) / 2)
    t = (mean - 3.28) / (std / math.sqrt(3))
    # Student's t with 2 degrees of freedom has the closed form CDF 1/2 + t / (2 sqrt(2 + t^2)).
    assert s["n"] == 3 and s["failed"] == 0 and s["excluded"] == 0 and s["problems"] == []
    assert s["mean_val_loss"] == pytest.approx(mean) and s["std_val_loss"] == pytest.approx(std)
    assert s["p_value"] == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), rel=1e-6)
    assert s["mean_train_time_s"] == pytest.approx(431.0) and s["std_train_time_s"] == pytest.approx(1.0)
    assert s["qualifies"] is True
    assert records.main(["stats", str(tmp_path), "--target", "3.273"]) == 0
    assert "do not qualify: mean val loss 3.2710 is below 3.273" in capsys.readouterr().out


def test_stats_says_above_when_the_mean_is_above_the_target(tmp_path, capsys):
    logs = [leaderboard_log(tmp_path / f"r{i}.txt", loss) for i, loss in enumerate([3.2905, 3.2915, 3.2925])]
    assert records.main(["stats", *logs]) == 0
    out = capsys.readouterr().out
    assert "do not qualify: mean val loss 3.2915 is above 3.28" in out and "below" not in out


def test_the_same_run_never_counts_twice(tmp_path, capsys):
    good = [leaderboard_log(tmp_path / f"g{i}.txt", 3.270 + i * 0.001) for i in range(3)]
    renamed = str(shutil.copy(good[0], tmp_path / "renamed.txt"))
    out_dir = tmp_path / "records"
    submit = ["submit", "Dup", "--records-dir", str(out_dir), "--force"]
    assert records.main(submit + [good[0], good[0]]) == 2
    assert f"{os.path.relpath(good[0])} and {os.path.relpath(good[0])} hold the same run" in capsys.readouterr().err
    assert records.main(submit + [good[0], renamed]) == 2
    assert f"{os.path.relpath(good[0])} and {os.path.relpath(renamed)} hold the same run" in capsys.readouterr().err
    assert records.main(submit + [good[0]]) == 1
    assert "a record needs at least 2 runs, and 1 was given" in capsys.readouterr().err
    assert not out_dir.exists()
    # The runs of a submitted record are copies in records/: a folder holding both must not count them twice.
    os.remove(renamed)
    assert records.main(["submit", "Record", "--records-dir", str(out_dir), *good]) == 0
    [made] = os.listdir(out_dir)
    capsys.readouterr()
    assert records.main(["stats", str(tmp_path)]) == 2
    assert (f"{os.path.relpath(good[0])} and {os.path.relpath(out_dir / made / 'g0.txt')} hold the same run"
            in capsys.readouterr().err)
    assert records.main(["compare", str(tmp_path), str(out_dir)]) == 2
    assert "hold the same run" in capsys.readouterr().err


def test_runs_that_did_not_complete_count_as_missing_the_target(tmp_path, capsys):
    (tmp_path / "leaderboard").mkdir()
    for i in range(3):
        leaderboard_log(tmp_path / "leaderboard" / f"good{i}.txt", 3.270 + i * 0.001)
    leaderboard_log(tmp_path / "leaderboard" / "diverged.txt", float("nan"))
    leaderboard_log(tmp_path / "leaderboard" / "crashed.txt", 3.27, finished=False)
    assert records.main(["stats", str(tmp_path / "leaderboard"), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert (s["n"], s["completed"], s["failed"], s["excluded"]) == (5, 3, 2, 0)
    assert s["p_value"] is None and s["qualifies"] is False  # the 3 completed runs alone have p < 0.01
    assert records.main(["stats", str(tmp_path / "leaderboard")]) == 0
    out = capsys.readouterr().out
    assert "counted as missing the target: " in out and "diverged.txt (failed: diverged: final val loss is nan)" in out
    assert "crashed.txt (incomplete: no val_loss line at the last step)" in out
    assert "runs: 5 (2 did not complete)" in out
    assert "The 5 runs do not qualify: 2 of them did not complete" in out
    # This project's logs say why a run stopped: failed counts as a miss, and so does an interrupted run that no
    # log resumed (the logs of a resumed run count as one: test_logs_of_one_run_id_count_as_one_run).
    (tmp_path / "own").mkdir()
    for i in range(2):
        variant("own_speedrun.txt", tmp_path / "own" / f"good{i}.txt", 3.270 + i * 0.001)
    own_run_stopped(tmp_path / "own" / "failed.txt", "step:3/6 val_loss", "failed: non-finite train loss at step 3")
    own_run_stopped(tmp_path / "own" / "stopped.txt", "step:6/6", "interrupted: received SIGTERM after step 3")
    s = records.run_stats(records.load_runs([str(tmp_path / "own")]))
    assert (s["n"], s["completed"], s["failed"], s["excluded"], s["qualifies"]) == (4, 2, 2, 0, False)


def test_summary_calls_a_diverged_run_failed(tmp_path, capsys):
    log = leaderboard_log(tmp_path / "diverged.txt", float("nan"))
    assert records.main(["summary", log]) == 0
    assert "failed (diverged: final val loss is nan)" in capsys.readouterr().out


def test_compare_refuses_runs_that_did_not_complete(tmp_path, capsys):
    (tmp_path / "base").mkdir()
    (tmp_path / "cand").mkdir()
    for i in range(2):
        leaderboard_log(tmp_path / "base" / f"b{i}.txt", 3.276, total_time_ms=433000 + 800 * i)
        leaderboard_log(tmp_path / "cand" / f"c{i}.txt", 3.277, total_time_ms=420000 + 800 * i)
    crashed = leaderboard_log(tmp_path / "cand" / "crashed.txt", 3.27, finished=False)
    assert records.main(["compare", str(tmp_path / "base"), str(tmp_path / "cand")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot compare: ")
    assert f"{os.path.relpath(crashed)} did not complete (incomplete: no val_loss line at the last step)" in err


def test_t_distribution_against_closed_forms():
    for t in (-3.0, -0.4, 0.0, 1.7):
        assert records.student_t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-9)
    assert records.student_t_quantile(0.975, 10) == pytest.approx(2.2281, abs=1e-4)


def test_compare_is_welchs_test_on_unequal_sizes_and_spreads(tmp_path, capsys):
    (tmp_path / "base").mkdir()
    (tmp_path / "cand").mkdir()
    base_times, cand_times = [430, 432, 434], [412, 416, 420, 424, 428]
    for i, seconds in enumerate(base_times):
        leaderboard_log(tmp_path / "base" / f"b{i}.txt", 3.275 + i * 0.001, total_time_ms=seconds * 1000)
    for i, seconds in enumerate(cand_times):
        leaderboard_log(tmp_path / "cand" / f"c{i}.txt", 3.277 + i * 0.001, total_time_ms=seconds * 1000)
    result = records.compare_runs(records.load_runs([str(tmp_path / "base")]),
                                  records.load_runs([str(tmp_path / "cand")]))
    # By hand: baseline mean 432, variance (4 + 0 + 4) / 2 = 4; candidate mean 420, variance
    # (64 + 16 + 0 + 16 + 64) / 4 = 40. Welch: se^2 = 4/3 + 40/5 = 28/3, t = -12 / sqrt(28/3),
    # df = (28/3)^2 / ((4/3)^2 / 2 + 8^2 / 4) = 1568/304 = 5.158. (Pooled Student's would give
    # t = -3.105 with df = 6.)
    assert result["time_diff_s"] == pytest.approx(-12.0)
    assert result["time_t"] == pytest.approx(-12 / math.sqrt(28 / 3))
    assert result["time_t"] == pytest.approx(-3.9279, abs=1e-4)
    assert result["time_df"] == pytest.approx(1568 / 304)
    # From scipy 1.17: stats.ttest_ind(cand, base, equal_var=False).pvalue and stats.t.ppf(0.975, 1568 / 304).
    assert result["time_p_value"] == pytest.approx(0.0104336134504, rel=1e-6)
    half = 2.5470926424151 * math.sqrt(28 / 3)
    assert result["time_ci95_s"] == (pytest.approx(-12.0 - half, rel=1e-6), pytest.approx(-12.0 + half, rel=1e-6))
    assert result["val_loss_diff"] == pytest.approx(0.003)
    assert records.main(["compare", str(tmp_path / "base"), str(tmp_path / "cand")]) == 0
    out = capsys.readouterr().out
    assert "95% CI [-19.78, -4.22] s (Welch's t = -3.928, df = 5.2, p = 0.01043)" in out


def test_plot_draws_each_runs_val_points(tmp_path):
    logs = [leaderboard_log(tmp_path / f"r{i}.txt", 3.27 + i / 100, total_time_ms=430000 + 1000 * i) for i in range(2)]
    logs.append(os.path.join(FIXTURES, "llmc_2024-06.log"))
    assert records.main(["plot", *logs, "-o", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    runs = [records.parse_log(log) for log in logs]
    by_time, by_step = records.plot_runs(runs, str(tmp_path / "q.png")).axes
    *time_lines, target = by_time.get_lines()
    assert list(target.get_ydata()) == [3.28, 3.28]
    # Step 0 (the untrained model's loss) is left out; llm.c's log has no times, so no line against time.
    assert [(list(line.get_xdata()), list(line.get_ydata())) for line in time_lines] == [
        ([p[2] / 1000 for p in r.val_points[1:]], [p[1] for p in r.val_points[1:]]) for r in runs[:2]]
    assert [(list(line.get_xdata()), list(line.get_ydata())) for line in by_step.get_lines()[:-1]] == [
        ([p[0] for p in r.val_points[1:]], [p[1] for p in r.val_points[1:]]) for r in runs]
    assert [len(r.val_points) for r in runs] == [13, 13, 3]


def test_submit_refuses_bad_sets_and_writes_a_record(tmp_path, capsys):
    good = [leaderboard_log(tmp_path / f"g{i}.txt", 3.270 + i * 0.001) for i in range(3)]
    unfinished = leaderboard_log(tmp_path / "u.txt", 3.27, finished=False)
    other_code = leaderboard_log(tmp_path / "o.txt", 3.2705, code="print('other')\n")
    slow_loss = [leaderboard_log(tmp_path / f"s{i}.txt", 3.279 + i * 0.002) for i in range(3)]
    out_dir = tmp_path / "records"
    base = ["submit", "MyRecord", "--records-dir", str(out_dir)]
    assert records.main(base + good + [unfinished]) == 1
    assert "u.txt did not complete (incomplete: no val_loss line at the last step)" in capsys.readouterr().err
    assert records.main(base + good + [other_code]) == 2
    assert "error: the logs embed different code" in capsys.readouterr().err
    assert records.main(base + slow_loss) == 1
    assert "do not qualify" in capsys.readouterr().err and not out_dir.exists()
    assert records.main(base + good) == 0
    [made] = os.listdir(out_dir)
    assert made.endswith("_MyRecord")
    files = sorted(os.listdir(out_dir / made))
    assert files == ["README.md", "g0.txt", "g1.txt", "g2.txt", "val_loss.png"]
    readme = (out_dir / made / "README.md").read_text()
    assert "8x NVIDIA H100 80GB HBM3" in readme and "p-value" in readme and "The 3 runs qualify" in readme
    assert records.main(["submit", "Forced", "--records-dir", str(out_dir), "--force"] + slow_loss) == 0


def test_code_first_logs_with_different_code_are_refused(tmp_path, capsys):
    # From 2024-12 the leaderboard's logs start with the code: that code must be compared too.
    runs = [variant("code_first_2025.txt", tmp_path / f"a{i}.txt", 3.270 + i * 0.001) for i in range(2)]
    runs += [variant("code_first_2025.txt", tmp_path / f"b{i}.txt", 3.272 + i * 0.001,
                     replace=[("2025 style", "2025 style, with another attention kernel")]) for i in range(2)]
    assert records.main(["submit", "Mixed", "--records-dir", str(tmp_path / "out"), *runs]) == 2
    assert "the logs embed different code" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_verify_reads_step_lines_without_a_loss(capsys):
    log = os.path.join(FIXTURES, "code_first_2024-12.txt")
    assert records.main(["verify", log]) == 1
    assert capsys.readouterr().out == f"{log}: 1 problem(s)\n  train_gpt.py: differs from this checkout\n"


def test_submit_refuses_mixed_gpus_unless_forced(tmp_path, capsys):
    second_gpu = ("|   1  NVIDIA H100 80GB HBM3          On  |   00000000:3B:00.0 Off |                    0 |\n"
                  "| N/A   30C    P0            118W /  700W |    1185MiB /  81559MiB |      1%      Default |\n")
    two_gpus = [variant("code_first_2025.txt", tmp_path / f"two{i}.txt", 3.270 + i * 0.001) for i in range(2)]
    one_gpu = variant("code_first_2025.txt", tmp_path / "one.txt", 3.272, replace=[(second_gpu, "")])
    h200 = variant("code_first_2025.txt", tmp_path / "h200.txt", 3.272,
                   replace=[("NVIDIA H100 80GB HBM3", "NVIDIA H200")])
    out_dir = tmp_path / "records"
    for odd, hardware in ((one_gpu, "1x NVIDIA H100 80GB HBM3"), (h200, "2x NVIDIA H200")):
        assert records.main(["submit", "Mixed", "--records-dir", str(out_dir), *two_gpus, odd]) == 1
        err = capsys.readouterr().err
        assert "the runs ran on different hardware: " in err and f"{hardware} ({os.path.relpath(odd)})" in err
        assert not out_dir.exists()
    assert records.main(["submit", "Mixed", "--records-dir", str(out_dir), "--force", *two_gpus, one_gpu]) == 0
    assert "warning: submitting runs that do not qualify" in capsys.readouterr().err
    [made] = os.listdir(out_dir)
    readme = (out_dir / made / "README.md").read_text()
    assert "runs on 1x NVIDIA H100 80GB HBM3; 2x NVIDIA H100 80GB HBM3." in readme
    assert "The 3 runs do not qualify: the runs ran on different hardware" in readme


VAL_SET_LINE = ("val set: 10485760 tokens, sha256 3f1a0c2b9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d0e9f8a7b6c5d4e3f2a, "
                "vocabulary 50257\n")


def test_own_runs_must_use_the_leaderboard_validation_set(tmp_path, capsys):
    # Older logs (no val set line) are checked by their config: the token count and the files' names.
    older = [("run id: 5f0c3a9e8d7b4c2a9e1f0d3c5b7a9e1f\n", ""), (VAL_SET_LINE, "")]
    good = [variant("own_speedrun.txt", tmp_path / f"g{i}.txt", 3.270 + i * 0.001, replace=older) for i in range(3)]
    assert records.run_stats(records.load_runs(good))["qualifies"] is True
    fewer_tokens = variant("own_speedrun.txt", tmp_path / "fewer.txt", 3.2705,
                           replace=older + [('"val_tokens": 10485760', '"val_tokens": 5242880')])
    other_files = variant("own_speedrun.txt", tmp_path / "other.txt", 3.2705,
                          replace=older + [("data/fineweb10B/fineweb_val_*.bin", "data/edu/finewebedu_val_*.bin")])
    for odd, problem in ((fewer_tokens, "validated on 5242880 tokens, not the leaderboard's 10,485,760"),
                         (other_files, "validated on data/edu/finewebedu_val_*.bin, not FineWeb's val shard "
                                       "(fineweb_val_000000.bin)")):
        s = records.run_stats(records.load_runs(good[:2] + [odd]))
        assert s["qualifies"] is False and s["problems"] == [f"{os.path.relpath(odd)} {problem}"]
        assert records.main(["submit", "Odd", "--records-dir", str(tmp_path / "out"), *good[:2], odd]) == 1
        assert problem in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_cpu_tiny_runs_never_qualify(tmp_path, capsys):
    tiny = [variant("own_speedrun.txt", tmp_path / f"t{i}.txt", 3.270 + i * 0.001,
                    replace=[("(preset speedrun)", "(preset cpu-tiny)")]) for i in range(3)]
    s = records.run_stats(records.load_runs(tiny))
    assert s["p_value"] < 0.01 and s["qualifies"] is False
    assert s["problems"] == [f"{os.path.relpath(path)} ran the cpu-tiny test preset" for path in tiny]
    assert records.main(["stats", *tiny]) == 0
    assert "The 3 runs do not qualify: " in capsys.readouterr().out


def test_submit_reports_config_difference_of_own_logs(one_process_log, tmp_path, capsys):
    logs = [variant(one_process_log, tmp_path / f"run{i}.txt", 6.0 + i / 100) for i in range(2)]
    assert records.main(["submit", "Tiny", "--records-dir", str(tmp_path / "out"), "--force", *logs]) == 0
    assert "warning: submitting runs that do not qualify" in capsys.readouterr().err
    [made] = os.listdir(tmp_path / "out")
    readme = (tmp_path / "out" / made / "README.md").read_text()
    assert "| seq_len | 512 | 128 |" in readme and "| val_tokens | 16384 | 2048 |" in readme
    assert "| batch_tokens | 1024 | 256 |" in readme
    assert "The 2 runs do not qualify: " in readme and "ran the cpu-tiny test preset" in readme


def test_verify_checks_embedded_code_and_lines(one_process_log, tmp_path, capsys):
    assert records.main(["verify", one_process_log]) == 0
    assert "ok (" in capsys.readouterr().out
    tampered = tmp_path / "tampered.txt"
    text = open(one_process_log).read()
    text = text.replace("def lr_multiplier_at(", "def lr_multiplier_at_changed(", 1)
    text = text.replace("step:8/16 val_loss:", "step:8/16 val_loss:oops ", 1)
    tampered.write_text(text)
    assert records.main(["verify", str(tampered)]) == 1
    out = capsys.readouterr().out
    assert "optim/schedules.py: differs from this checkout" in out and "malformed step line: step:8/16" in out


# ----------------------------------------------------------------------------- runs, not logs (issue 22)

def test_logs_of_one_run_id_count_as_one_run(tmp_path, capsys):
    # One run in three logs: it crashed after step 3 (a periodic checkpoint there), was resumed from it and
    # interrupted after step 6, then resumed again for its final validation. Named so that their sorted order
    # is not the order they ran in.
    run_id, seed = uuid.uuid4().hex, 41
    first = own_run_stopped(tmp_path / "c_first.txt", "step:3/6 val_loss", "failed: RuntimeError: NCCL timeout",
                            run_id=run_id, seed=seed)
    second = own_resumed(tmp_path / "b_second.txt", run_id, seed, 3, stop_before="step:6/6 val_loss",
                         status="interrupted: received SIGTERM after step 6; checkpoint c; resume with: python x")
    last = own_resumed(tmp_path / "a_last.txt", run_id, seed, 6, final_loss=3.2712345)
    others = [variant("own_speedrun.txt", tmp_path / f"other{i}.txt", 3.270 + i * 0.001) for i in range(2)]
    s = stats_json(capsys, tmp_path)
    assert (s["n"], s["completed"], s["failed"], s["excluded"]) == (3, 3, 0, 2)
    assert s["mean_val_loss"] == pytest.approx(statistics.fmean([3.2712345, 3.270, 3.271]), abs=1e-12)
    [chain, *rest] = records.group_runs(records.load_runs([first, second, last, *others]))
    assert chain.path == last and [r.path for r in chain.earlier_logs] == [first, second]
    assert chain.final_val_loss == 3.2712345 and chain.train_time_s == 1.2 and chain.start_step == 6
    assert [r.path for r in rest] == others
    assert records.main(["stats", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert (f"not counted on its own: {os.path.relpath(first)} (failed: RuntimeError: NCCL timeout), an earlier "
            f"log of the run that {os.path.relpath(last)} continues") in out
    assert f"not counted on its own: {os.path.relpath(second)} (interrupted: " in out
    assert "counted as missing" not in out and "runs: 3 in 5 logs\n" in out
    # The run's last log decides: without the log that completed it, the run was interrupted, a miss.
    os.remove(last)
    s = stats_json(capsys, tmp_path)
    assert (s["n"], s["completed"], s["failed"], s["excluded"]) == (3, 2, 1, 1)


def test_an_interrupted_run_that_no_log_resumed_counts_as_a_miss(tmp_path, capsys):
    good = [variant("own_speedrun.txt", tmp_path / f"good{i}.txt", 3.270 + i * 0.001) for i in range(3)]
    interrupted = own_run_stopped(tmp_path / "stopped.txt", "step:6/6",
                                  "interrupted: received SIGTERM after step 3; checkpoint c; resume with: python x")
    s = stats_json(capsys, *good, interrupted)
    assert (s["n"], s["completed"], s["failed"], s["excluded"]) == (4, 3, 1, 0)
    assert s["p_value"] is None and s["qualifies"] is False
    assert records.main(["stats", *good, interrupted]) == 0
    out = capsys.readouterr().out
    assert f"counted as missing the target: {os.path.relpath(interrupted)} (interrupted: received SIGTERM" in out
    assert "The 4 runs do not qualify: 1 of them did not complete" in out


def test_a_resume_retried_from_the_same_checkpoint_is_one_run(tmp_path, capsys):
    """A run crashed after its checkpoint at step 3; its resume crashed again before the next checkpoint, and a
    second resume from the same checkpoint completed: one run of three logs, completed."""
    run_id, seed = uuid.uuid4().hex, 43
    first = own_run_stopped(tmp_path / "first.txt", "step:6/6", "failed: RuntimeError: NCCL timeout",
                            run_id=run_id, seed=seed)
    retry = own_resumed(tmp_path / "retry.txt", run_id, seed, 3, stop_before="step:6/6",
                        status="failed: RuntimeError: CUDA error: an illegal memory access was encountered")
    last = own_resumed(tmp_path / "last.txt", run_id, seed, 3, final_loss=3.2702)
    other = variant("own_speedrun.txt", tmp_path / "other.txt", 3.2711)
    s = stats_json(capsys, first, retry, last, other)
    assert (s["n"], s["completed"], s["failed"], s["excluded"]) == (2, 2, 0, 2)
    [chain, _] = records.group_runs(records.load_runs([first, retry, last, other]))
    assert chain.path == last and {r.path for r in chain.earlier_logs} == {first, retry}
    # a copy of a resumed log is still a copy
    shutil.copy(retry, tmp_path / "retry_copy.txt")
    assert records.main(["stats", str(tmp_path)]) == 2
    assert "both start at step 3 with identical step lines" in capsys.readouterr().err


def test_an_interrupted_older_log_without_a_run_id_is_left_out(tmp_path, capsys):
    """Logs written before run ids: the log that resumed an interrupted one cannot be linked to it, so the
    interrupted log is left out, as before, not counted as a miss."""
    good = [variant("own_speedrun.txt", tmp_path / f"good{i}.txt", 3.270 + i * 0.001) for i in range(3)]
    text = stopped(read_fixture("own_speedrun.txt"), "step:6/6",
                   "interrupted: received SIGTERM after step 3; checkpoint c; resume with: python x")
    older = tmp_path / "older.txt"
    older.write_text(with_identity(re.sub(r"^run id: [0-9a-f]{32}\n", "", text, flags=re.M)))
    s = stats_json(capsys, *good, older)
    assert (s["n"], s["completed"], s["failed"], s["excluded"]) == (3, 3, 0, 1)
    assert records.main(["stats", *good, str(older)]) == 0
    assert f"not counted: {os.path.relpath(older)} (interrupted: " in capsys.readouterr().out


def test_logs_of_one_run_id_that_are_no_resume_chain_are_refused(tmp_path, capsys):
    run_id = uuid.uuid4().hex
    # Two runs that started from step 0 under one id (their step lines differ: no copy of one another).
    a = variant("own_speedrun.txt", tmp_path / "a.txt", 3.270, run_id=run_id, seed=1)
    b = variant("own_speedrun.txt", tmp_path / "b.txt", 3.275, run_id=run_id, seed=2)
    for command in (["stats", a, b], ["submit", "X", "--records-dir", str(tmp_path / "out"), a, b]):
        assert records.main(command) == 2
        assert (f"error: {os.path.relpath(a)} and {os.path.relpath(b)} carry the same run id: {run_id}, but are not "
                f"the logs of one run resumed from its checkpoints (both start at step 0)") in capsys.readouterr().err
    # A completed run and a resumed log of the same id that completed too.
    resumed = own_resumed(tmp_path / "c.txt", run_id, 1, 3, final_loss=3.271)
    assert records.main(["stats", a, resumed]) == 2
    assert f"{os.path.relpath(a)} and {os.path.relpath(resumed)} carry the same run id: " in capsys.readouterr().err
    assert "(both completed)" in str(pytest.raises(records.LogError, records.group_runs,
                                                   records.load_runs([a, resumed])).value)
    # A copy of a log carries its id: still refused.
    copy = str(shutil.copy(a, tmp_path / "copy.txt"))
    assert records.main(["stats", a, copy]) == 2
    err = capsys.readouterr().err
    assert f"{os.path.relpath(a)} and {os.path.relpath(copy)} carry the same run id: {run_id}" in err
    assert not (tmp_path / "out").exists()


def test_a_run_that_failed_after_its_final_val_loss_completed(tmp_path, capsys):
    # The final checkpoint's save failed after the final validation: the run's result stands.
    failure = "failed: OSError: [Errno 28] No space left on device: checkpoints/step_000006.pt"
    saved_badly = variant("own_speedrun.txt", tmp_path / "saved_badly.txt", 3.2712,
                          replace=[("status: completed", f"status: {failure}")])
    run = records.parse_log(saved_badly)
    assert (run.status, run.reason) == ("completed", f"then {failure}") and run.final_val_loss == 3.2712
    assert records.main(["summary", saved_badly]) == 0
    assert f"completed (then {failure})" in capsys.readouterr().out
    good = [variant("own_speedrun.txt", tmp_path / f"good{i}.txt", 3.270 + i * 0.001) for i in range(2)]
    s = stats_json(capsys, saved_badly, *good)
    assert (s["n"], s["completed"], s["failed"]) == (3, 3, 0) and s["p_value"] is not None
    assert records.main(["stats", saved_badly, *good]) == 0
    out = capsys.readouterr().out
    counted = f"counted as completed: {os.path.relpath(saved_badly)} (its final val loss was logged, then {failure})"
    assert counted in out
    # A non-finite final loss, or a training that went non-finite, stays a failure.
    nan = variant("own_speedrun.txt", tmp_path / "nan.txt", float("nan"),
                  replace=[("status: completed", "status: failed: final val_loss is nan")])
    diverged = variant("own_speedrun.txt", tmp_path / "diverged.txt", 3.2712,
                       replace=[("status: completed", "status: failed: non-finite train loss at step 5; last good "
                                                      "checkpoint: none")])
    assert [records.parse_log(p).status for p in (nan, diverged)] == ["failed", "failed"]
    s = stats_json(capsys, nan, diverged, *good)
    assert (s["n"], s["completed"], s["failed"]) == (4, 2, 2)


def test_two_runs_of_one_seed_are_refused(tmp_path, capsys):
    (tmp_path / "base").mkdir()
    (tmp_path / "cand").mkdir()
    a = variant("own_speedrun.txt", tmp_path / "base" / "a.txt", 3.270, seed=7)
    b = variant("own_speedrun.txt", tmp_path / "base" / "b.txt", 3.271, seed=7)
    for i in range(2):
        variant("own_speedrun.txt", tmp_path / "cand" / f"c{i}.txt", 3.272 + i * 0.001, seed=i)
    refusal = (f"error: {os.path.relpath(a)} and {os.path.relpath(b)} ran with the same seed (7): two runs of one seed "
               f"are not two independent samples; run each with its own --seed")
    for command in (["stats", a, b], ["submit", "X", "--records-dir", str(tmp_path / "out"), "--force", a, b],
                    ["compare", str(tmp_path / "base"), str(tmp_path / "cand")]):
        assert records.main(command) == 2
        assert refusal in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    # A baseline and a candidate may run the same seeds: each side is a sample of its own.
    os.remove(b)
    variant("own_speedrun.txt", tmp_path / "base" / "b.txt", 3.271, seed=1)
    variant("own_speedrun.txt", tmp_path / "base" / "a.txt", 3.270, seed=0)
    assert records.main(["compare", str(tmp_path / "base"), str(tmp_path / "cand")]) == 0


def test_different_runs_that_crashed_at_the_same_step_are_two_misses(tmp_path, capsys):
    # Two runs (two ids, two seeds) whose logs hold the same step lines up to the same crash: two misses.
    crashed = [own_run_stopped(tmp_path / f"crashed{i}.txt", "step:3/6 val_loss", "failed: RuntimeError: CUDA error")
               for i in range(2)]
    good = [variant("own_speedrun.txt", tmp_path / f"good{i}.txt", 3.270 + i * 0.001) for i in range(2)]
    assert len({records.parse_log(p).fingerprint for p in crashed}) == 1
    s = stats_json(capsys, *crashed, *good)
    assert (s["n"], s["completed"], s["failed"], s["excluded"]) == (4, 2, 2, 0)
    # The same log twice is still one run, refused.
    copy = str(shutil.copy(crashed[0], tmp_path / "copy.txt"))
    assert records.main(["stats", crashed[0], copy]) == 2
    assert "carry the same run id" in capsys.readouterr().err


def test_the_validation_set_is_checked_by_content(tmp_path, capsys):
    other_hash = VAL_SET_LINE.replace("sha256 3f1a", "sha256 0000")
    # The same tokens under another file name: no problem (the hash says they are the same tokens).
    good = [variant("own_speedrun.txt", tmp_path / f"g{i}.txt", 3.270 + i * 0.001,
                    replace=[("data/fineweb10B/fineweb_val_*.bin", f"/mnt/copy{i}/val_*.bin")]) for i in range(3)]
    s = records.run_stats(records.load_runs(good))
    assert s["problems"] == [] and s["qualifies"] is True
    # Another set of tokens, with the leaderboard's file name: a problem naming both groups.
    other = variant("own_speedrun.txt", tmp_path / "other.txt", 3.2705, replace=[(VAL_SET_LINE, other_hash)])
    s = records.run_stats(records.load_runs(good[:2] + [other]))
    assert s["qualifies"] is False and s["problems"] == [
        f"the runs validated on different validation sets: sha256 3f1a0c2b9d8e... ({os.path.relpath(good[0])}, "
        f"{os.path.relpath(good[1])}); sha256 00000c2b9d8e... ({os.path.relpath(other)})"]
    # The token count from the val set line, whatever the config says.
    fewer = variant("own_speedrun.txt", tmp_path / "fewer.txt", 3.2705,
                    replace=[(VAL_SET_LINE, other_hash.replace("10485760 tokens", "5242880 tokens"))])
    problems = records.run_stats(records.load_runs(good[:2] + [fewer]))["problems"]
    assert f"{os.path.relpath(fewer)} validated on 5242880 tokens, not the leaderboard's 10,485,760" in problems
    # Another vocabulary, by the val set line or by the config: never scored against the GPT-2 target.
    vocabulary = " validated on a vocabulary of 8192 tokens: the 3.28 target is for GPT-2's tokens"
    small = [("vocabulary 50257", "vocabulary 8192"), ('"vocab_size": 50304', '"vocab_size": 8192')]
    small_val_set = variant("own_speedrun.txt", tmp_path / "small_val_set.txt", 3.2705, replace=small)
    small_config = variant("own_speedrun.txt", tmp_path / "small_config.txt", 3.2705,
                           replace=[(VAL_SET_LINE, ""), small[1]])
    for odd in (small_val_set, small_config):
        s = records.run_stats(records.load_runs([odd]))
        assert s["problems"] == [os.path.relpath(odd) + vocabulary]
    logs = [variant("own_speedrun.txt", tmp_path / f"s{i}.txt", 3.270 + i * 0.001, replace=small) for i in range(3)]
    assert records.main(["submit", "Small", "--records-dir", str(tmp_path / "out"), *logs]) == 1
    err = capsys.readouterr().err
    assert "do not qualify" in err and vocabulary in err and not (tmp_path / "out").exists()


def test_stats_use_the_full_precision_final_losses(tmp_path, capsys):
    # Rounded to 4 decimals these are 3.2700, 3.2701 and 3.2702: mean 3.2701, std 1e-4.
    losses = [3.27004, 3.27012, 3.27024]
    logs = [variant("own_speedrun.txt", tmp_path / f"r{i}.txt", loss) for i, loss in enumerate(losses)]
    assert [records.parse_log(p).final[1] for p in logs] == [3.27, 3.2701, 3.2702]
    s = stats_json(capsys, *logs)
    mean, std = statistics.fmean(losses), statistics.stdev(losses)
    t = (mean - 3.28) / (std / math.sqrt(3))
    assert s["mean_val_loss"] == pytest.approx(mean, abs=1e-12) and s["std_val_loss"] == pytest.approx(std, rel=1e-9)
    assert s["p_value"] == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), rel=1e-6)
    assert s["loss_precision"] == "full precision" and s["spread_too_small"] is False and s["qualifies"] is True


def test_a_spread_too_small_for_the_logs_precision_gives_no_p_value(tmp_path, capsys):
    # Equal 4-decimal losses: a std of 0 is the rounding's, not the runs'. Nor is a std below one rounding step.
    for losses in ([3.2700, 3.2700, 3.2700], [3.2700, 3.2700, 3.2701]):
        folder = tmp_path / str(losses[-1])
        folder.mkdir()
        logs = [leaderboard_log(folder / f"r{i}.txt", loss, total_time_ms=430000 + 1000 * i)
                for i, loss in enumerate(losses)]
        s = stats_json(capsys, *logs)
        assert s["p_value"] is None and s["spread_too_small"] is True and s["qualifies"] is False
        assert s["loss_precision"] == "4 decimals" and s["std_val_loss"] < 1e-4
        assert records.main(["stats", *logs]) == 0
        out = capsys.readouterr().out
        assert "p-value (mean < 3.28): -" in out
        assert (f"The 3 runs do not qualify: the spread of their val losses (std {s['std_val_loss']:.2g}) is too small "
                f"to test at the logs' precision (4 decimals) (mean val loss 3.2700, no p-value).") in out
    # In full precision only no spread at all is too small.
    equal = [variant("own_speedrun.txt", tmp_path / f"e{i}.txt", 3.27) for i in range(2)]
    s = records.run_stats(records.load_runs(equal))
    assert s["p_value"] is None and s["spread_too_small"] is True and s["loss_precision"] == "full precision"
    close = [variant("own_speedrun.txt", tmp_path / f"c{i}.txt", 3.27 + i * 1e-5) for i in range(3)]
    s = records.run_stats(records.load_runs(close))
    assert s["p_value"] < 1e-6 and s["spread_too_small"] is False


def test_stats_refuses_logs_of_different_programs(tmp_path, capsys):
    (tmp_path / "base").mkdir()
    (tmp_path / "cand").mkdir()
    base = [leaderboard_log(tmp_path / "base" / f"b{i}.txt", 3.275 + i * 0.001, code="print('base')\n")
            for i in range(3)]
    cand = [leaderboard_log(tmp_path / "cand" / f"c{i}.txt", 3.276 + i * 0.001, code="print('cand')\n",
                            total_time_ms=420000 + 1000 * i) for i in range(2)]
    refusal = (f"error: the logs embed different code: 3 logs ran one program (e.g. {os.path.relpath(base[0])}), "
               f"2 logs ran another (e.g. {os.path.relpath(cand[0])}): the runs of one set must all run the same code")
    for command in (["stats", str(tmp_path)], ["submit", "X", "--records-dir", str(tmp_path / "out"), "--force",
                                               str(tmp_path / "base"), str(tmp_path / "cand")]):
        assert records.main(command) == 2
        assert refusal in capsys.readouterr().err
    assert records.main(["compare", str(tmp_path / "base"), str(tmp_path / "cand")]) == 0  # one program a side
    leaderboard_log(tmp_path / "base" / "odd.txt", 3.279, code="print('cand')\n")
    assert records.main(["compare", str(tmp_path / "base"), str(tmp_path / "cand")]) == 2
    assert "error: the logs embed different code: 3 logs ran one program" in capsys.readouterr().err
    # This project's logs: the config too, but for the fields that do not change what a run computes.
    (tmp_path / "own").mkdir()
    own = [variant("own_speedrun.txt", tmp_path / "own" / f"o{i}.txt", 3.270 + i * 0.001,
                   replace=[('"steps": 6,', f'"steps": 6,\n  "records_dir": "r{i}",\n  "save_every": {i},')])
           for i in range(2)]
    assert stats_json(capsys, tmp_path / "own")["n"] == 2
    other = variant("own_speedrun.txt", tmp_path / "own" / "other.txt", 3.272,
                    replace=[('"steps": 6,', '"steps": 6,\n  "muon_lr": 0.05,')])
    assert records.main(["stats", str(tmp_path / "own")]) == 2
    assert (f"error: the logs ran different configs: 2 logs ran one config (e.g. {os.path.relpath(own[0])}), 1 log "
            f"ran another (e.g. {os.path.relpath(other)}), differing in muon_lr: the runs of one set must all run the "
            f"same configuration") in capsys.readouterr().err


def test_submit_gives_each_log_a_name_of_its_own(tmp_path, capsys):
    for folder in ("a", "b", "x/a"):
        (tmp_path / folder).mkdir(parents=True)
    logs = [leaderboard_log(tmp_path / folder / "log.txt", 3.270 + i * 0.001)
            for i, folder in enumerate(("a", "b", "x/a"))]
    logs.append(leaderboard_log(tmp_path / "c.txt", 3.2705))
    # In the logs' sorted order: a/log.txt, b/log.txt, c.txt, x/a/log.txt.
    names = {logs[0]: "a_log.txt", logs[1]: "b_log.txt", logs[3]: "c.txt", logs[2]: "a_log_2.txt"}
    out_dir = tmp_path / "out"
    assert records.main(["submit", "Same", "--records-dir", str(out_dir), *logs]) == 0
    [made] = os.listdir(out_dir)
    assert sorted(os.listdir(out_dir / made)) == ["README.md", "a_log.txt", "a_log_2.txt", "b_log.txt", "c.txt",
                                                  "val_loss.png"]
    for path, name in names.items():
        assert (out_dir / made / name).read_text() == open(path).read()
    assert records.unique_log_names(records.load_runs(logs)) == list(names.values())
    readme = (out_dir / made / "README.md").read_text()
    assert "| a_log.txt | 3.2700 |" in readme and "| b_log.txt | 3.2710 |" in readme
    assert "| a_log_2.txt | 3.2720 |" in readme and "| c.txt | 3.2705 |" in readme
    # A resumed run's logs are copied, and listed on its row in the order they ran.
    run_id = uuid.uuid4().hex
    first = own_run_stopped(tmp_path / "b" / "first.txt", "step:6/6",
                            "interrupted: received SIGTERM after step 3; checkpoint c; resume with: python x",
                            run_id=run_id, seed=3)
    resumed = own_resumed(tmp_path / "a" / "resumed.txt", run_id, 3, 3, final_loss=3.2712)
    others = [variant("own_speedrun.txt", tmp_path / f"o{i}.txt", 3.270 + i * 0.001) for i in range(2)]
    assert records.main(["submit", "Resumed", "--records-dir", str(out_dir), first, resumed, *others]) == 0
    [made] = [name for name in os.listdir(out_dir) if name.endswith("_Resumed")]
    assert "| first.txt, resumed.txt | 3.2712 | 1.20 s |" in (out_dir / made / "README.md").read_text()


@pytest.mark.skipif(not os.environ.get("MODDED_NANOGPT_RECORDS"),
                    reason="set MODDED_NANOGPT_RECORDS to a checkout's records/track_1_short to read the real logs")
@pytest.mark.parametrize("folder, programs", [("2026-07-17_FP8DownProjection", "13 logs ran one program"),
                                              ("2025-11-29_BatchSizeSchedule", "9 logs ran one program")])
def test_real_record_folders_of_two_programs_are_refused(folder, programs, capsys):
    # Record #89's folder holds its baseline's 13 logs and its own 13; record #46's holds two logs of
    # another validation interval beside its 9.
    path = os.path.join(os.environ["MODDED_NANOGPT_RECORDS"], folder)
    if not os.path.isdir(path):
        pytest.skip(f"no {folder} in MODDED_NANOGPT_RECORDS")
    assert records.main(["stats", path]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the logs embed different code: ") and programs in err
