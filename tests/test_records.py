"""scripts/records.py on leaderboard-format fixtures and on this project's own logs."""
import json
import math
import os
import shutil

import pytest

from scripts import records
from tests.util import REPO_ROOT

NVIDIA_SMI = """Sun Nov 10 19:09:29 2024
+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI 555.42.06              Driver Version: 555.42.06      CUDA Version: 12.5     |
|-----------------------------------------+------------------------+----------------------+
""" + "".join(f"|   {i}  NVIDIA H100 80GB HBM3          Off |   00000000:18:00.0 Off |                    0 |\n"
              for i in range(8))


def leaderboard_log(path, final_loss, total_time_ms=433570, steps=3000, code="print('record')\n", finished=True):
    """A log in KellerJordan/modded-nanogpt's format: code between rules, nvidia-smi, step lines."""
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


def test_leaderboard_logs_parse(tmp_path):
    run = records.parse_log(leaderboard_log(tmp_path / "a.txt", 3.2753))
    assert run.status == "completed" and run.final_val_loss == 3.2753 and run.total_steps == 3000
    assert run.train_time_s == pytest.approx(433.57) and run.step_avg_ms == pytest.approx(144.52, abs=0.01)
    assert run.hardware == "8x NVIDIA H100 80GB HBM3" and run.date == "2024-11-10 19:09"
    assert run.sources == {"train_gpt.py": "print('record')\n"}
    unfinished = records.parse_log(leaderboard_log(tmp_path / "b.txt", 3.27, finished=False))
    assert unfinished.status == "incomplete" and unfinished.final_val_loss is None


def test_own_log_parses(one_process_log):
    run = records.parse_log(one_process_log)
    assert run.status == "completed" and run.total_steps == 16 and run.hardware.startswith("CPU: ")
    assert [p[0] for p in run.val_points] == [0, 8, 16]
    assert run.preset == "cpu-tiny" and run.config["batch_tokens"] == 1024
    assert "train_gpt.py" in run.sources and "optim/muon.py" in run.sources


def test_stats_p_value_matches_the_t_distribution(tmp_path, capsys):
    losses = [3.270, 3.271, 3.272]
    for i, loss in enumerate(losses):
        leaderboard_log(tmp_path / f"run{i}.txt", loss, total_time_ms=430000 + 1000 * i)
    leaderboard_log(tmp_path / "crashed.txt", 3.0, finished=False)
    assert records.main(["stats", str(tmp_path), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    mean, std = sum(losses) / 3, math.sqrt(sum((x - sum(losses) / 3) ** 2 for x in losses) / 2)
    t = (mean - 3.28) / (std / math.sqrt(3))
    # Student's t with 2 degrees of freedom has the closed form CDF 1/2 + t / (2 sqrt(2 + t^2)).
    assert s["n"] == 3 and s["excluded"] == 1
    assert s["mean_val_loss"] == pytest.approx(mean) and s["std_val_loss"] == pytest.approx(std)
    assert s["p_value"] == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), rel=1e-6)
    assert s["mean_train_time_s"] == pytest.approx(431.0) and s["std_train_time_s"] == pytest.approx(1.0)
    assert s["qualifies"] is True
    assert records.main(["stats", str(tmp_path), "--target", "3.273"]) == 0
    out = capsys.readouterr().out
    assert "not counted: " in out and "crashed.txt (incomplete)" in out and "do not qualify" in out


def test_t_distribution_against_closed_forms():
    for t in (-3.0, -0.4, 0.0, 1.7):
        assert records.student_t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-9)
    assert records.student_t_quantile(0.975, 10) == pytest.approx(2.2281, abs=1e-4)


def test_compare_gives_time_difference_with_confidence_interval(tmp_path, capsys):
    (tmp_path / "base").mkdir()
    (tmp_path / "cand").mkdir()
    for i in range(4):
        leaderboard_log(tmp_path / "base" / f"b{i}.txt", 3.276 + i * 0.001, total_time_ms=433000 + 800 * i)
        leaderboard_log(tmp_path / "cand" / f"c{i}.txt", 3.277 + i * 0.001, total_time_ms=420000 + 800 * i)
    result = records.compare_runs(records.load_runs([str(tmp_path / "base")]), records.load_runs([str(tmp_path / "cand")]))
    assert result["time_diff_s"] == pytest.approx(-13.0)
    low, high = result["time_ci95_s"]
    # Equal sizes and spreads: Welch's interval is diff +- t(0.975, 6) * sqrt(2 s^2 / 4).
    s = records.statistics.stdev([433.0, 433.8, 434.6, 435.4])
    half = records.student_t_quantile(0.975, 6) * math.sqrt(2 * s * s / 4)
    assert (low, high) == (pytest.approx(-13.0 - half), pytest.approx(-13.0 + half)) and high < 0
    assert result["val_loss_diff"] == pytest.approx(0.001)
    assert records.main(["compare", str(tmp_path / "base"), str(tmp_path / "cand")]) == 0
    assert "95% CI" in capsys.readouterr().out


def test_plot_writes_a_png(tmp_path):
    logs = [leaderboard_log(tmp_path / f"r{i}.txt", 3.27 + i / 100) for i in range(2)]
    assert records.main(["plot", *logs, "-o", str(tmp_path / "p.png")]) == 0
    data = (tmp_path / "p.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


def test_submit_refuses_bad_sets_and_writes_a_record(tmp_path, capsys):
    good = [leaderboard_log(tmp_path / f"g{i}.txt", 3.270 + i * 0.001) for i in range(3)]
    unfinished = leaderboard_log(tmp_path / "u.txt", 3.27, finished=False)
    other_code = leaderboard_log(tmp_path / "o.txt", 3.27, code="print('other')\n")
    slow_loss = [leaderboard_log(tmp_path / f"s{i}.txt", 3.279 + i * 0.002) for i in range(3)]
    out_dir = tmp_path / "records"
    base = ["submit", "MyRecord", "--records-dir", str(out_dir)]
    assert records.main(base + good + [unfinished]) == 1
    assert "u.txt did not complete (incomplete)" in capsys.readouterr().err
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


def test_submit_reports_config_difference_of_own_logs(one_process_log, tmp_path):
    logs = [str(shutil.copy(one_process_log, tmp_path / f"run{i}.txt")) for i in range(2)]
    assert records.main(["submit", "Tiny", "--records-dir", str(tmp_path / "out"), "--force", *logs]) == 0
    [made] = os.listdir(tmp_path / "out")
    readme = (tmp_path / "out" / made / "README.md").read_text()
    assert "| batch_tokens | 2048 | 1024 |" in readme and "| seq_len | 256 | 128 |" in readme


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
