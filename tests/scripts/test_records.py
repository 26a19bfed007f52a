"""scripts/records.py on leaderboard-format fixtures and on this project's own logs."""
import json
import math
import os
import shutil

import pytest

from scripts import records
from tests.util import REPO_ROOT

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


def variant(source, path, final_loss=None, replace=()):
    """A copy of the log `source` (a path, or a file name in tests/fixtures/records) at path, with its last
    val loss set to final_loss (which makes it another run) and each (old, new) of replace applied."""
    text = open(source if os.path.isabs(source) else os.path.join(FIXTURES, source)).read()
    if final_loss is not None:
        head, _, tail = text.rpartition(" val_loss:")
        text = f"{head} val_loss:{final_loss:.4f} {tail.split(' ', 1)[1]}"
    for old, new in replace:
        assert old in text, old
        text = text.replace(old, new)
    path.write_text(text)
    return str(path)


def own_run_stopped(path, before, status):
    """This project's log of a run that stopped before the line starting with `before`, with that status."""
    text = open(os.path.join(FIXTURES, "own_speedrun.txt")).read()
    path.write_text(text[:text.index("\n" + before) + 1] + f"status: {status}\n")
    return str(path)


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
    assert run.status == "completed" and run.final_val_loss == 3.277 and run.train_time_s == 1.2
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
    # This project's logs say why a run stopped: failed counts as a miss; interrupted goes on in a resumed log.
    (tmp_path / "own").mkdir()
    for i in range(2):
        variant("own_speedrun.txt", tmp_path / "own" / f"good{i}.txt", 3.270 + i * 0.001)
    own_run_stopped(tmp_path / "own" / "failed.txt", "step:3/6 val_loss", "failed: non-finite train loss at step 3")
    own_run_stopped(tmp_path / "own" / "stopped.txt", "step:6/6", "interrupted: received SIGTERM after step 3")
    s = records.run_stats(records.load_runs([str(tmp_path / "own")]))
    assert (s["n"], s["completed"], s["failed"], s["excluded"], s["qualifies"]) == (3, 2, 1, 1, False)


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
    assert records.main(base + good + [other_code]) == 1
    assert "embed different code" in capsys.readouterr().err
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
    assert records.main(["submit", "Mixed", "--records-dir", str(tmp_path / "out"), *runs]) == 1
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


def test_own_runs_must_use_the_leaderboard_validation_set(tmp_path, capsys):
    good = [variant("own_speedrun.txt", tmp_path / f"g{i}.txt", 3.270 + i * 0.001) for i in range(3)]
    assert records.run_stats(records.load_runs(good))["qualifies"] is True
    fewer_tokens = variant("own_speedrun.txt", tmp_path / "fewer.txt", 3.2705,
                           replace=[('"val_tokens": 10485760', '"val_tokens": 5242880')])
    other_files = variant("own_speedrun.txt", tmp_path / "other.txt", 3.2705,
                          replace=[("data/fineweb10B/fineweb_val_*.bin", "data/edu/finewebedu_val_*.bin")])
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
