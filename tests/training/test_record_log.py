"""training/record_log.py: each line kind's format function against its parser, today's exact text, and a
RecordLog's file read back by scripts/records.py."""
import hashlib
import json
import math
import os
import subprocess
import sys
import uuid
from datetime import datetime

import pytest

from scripts import records
from training import record_log as rl

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NAN, INF = float("nan"), float("inf")
SPACED = "/tmp/my checkpoints/run 1/step_000008.pt"  # a path with spaces


def same(a, b):
    """Equality that takes nan for nan, field by field through dataclasses and tuples."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if hasattr(a, "__dataclass_fields__") and type(a) is type(b):
        return all(same(getattr(a, f), getattr(b, f)) for f in a.__dataclass_fields__)
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(map(same, a, b))
    return type(a) is type(b) and a == b


# ----------------------------------------------------------------------------- round trips: format, then parse

@pytest.mark.parametrize("step, total, time_ms", [(0, 6, 0.0), (3, 6, 600.4), (1, 1, 0.49),
                                                  (10**12, 10**12 + 7, 1.5e15), (99_999, 100_000, 12_345_678.9)])
@pytest.mark.parametrize("loss_kind", ["val_loss", "train_loss", None])
@pytest.mark.parametrize("loss", [3.2781, 0.0, 10.8258, 1234.56789, NAN, INF, -INF])
def test_step_line_round_trip(step, total, time_ms, loss_kind, loss):
    losses = {loss_kind: loss} if loss_kind else {}
    line = rl.format_step_line(step, total, time_ms, **losses)
    parsed = rl.parse_step_line(line)
    written = float(f"{loss:.4f}")  # the line keeps 4 decimals
    assert same(parsed, rl.StepLine(step, total, float(f"{time_ms:.0f}"), float(f"{time_ms / max(step, 1):.2f}"),
                                    val_loss=written if loss_kind == "val_loss" else None,
                                    train_loss=written if loss_kind == "train_loss" else None)), line


def test_step_line_holds_one_loss():
    with pytest.raises(ValueError):
        rl.format_step_line(1, 2, 3.0, val_loss=1.0, train_loss=2.0)
    with pytest.raises(ValueError):
        rl.format_step_line(1, 2, 3.0, train_loss=1.0, val_loss_float32=2.0)


@pytest.mark.parametrize("loss, loss_float32", [(3.2781, 3.27695), (NAN, 3.1), (3.3, INF)])
def test_validation_line_with_the_float32_loss_round_trip(loss, loss_float32):
    """--numerics record: the record's loss where the leaderboard reads it, the float32 head's at the end."""
    line = rl.format_step_line(2160, 2160, 132_000.0, val_loss=loss, val_loss_float32=loss_float32)
    assert line.startswith(f"step:2160/2160 val_loss:{loss:.4f} train_time:132000ms step_avg:61.11ms")
    parsed = rl.parse_step_line(line)
    assert same(parsed, rl.StepLine(2160, 2160, 132_000.0, 61.11, val_loss=float(f"{loss:.4f}"),
                                    val_loss_float32=float(f"{loss_float32:.4f}"))), line


@pytest.mark.parametrize("title", ["command", "environment", "source: optim/muon.py", "config (preset cpu-tiny)",
                                   "source: a folder/with spaces.py"])
def test_section_round_trip(title):
    assert rl.parse_section_header(rl.format_section_header(title)) == title
    header, *text = rl.format_section(title, "line 1\nline 2\n\n\n").split("\n")
    assert rl.parse_section_header(header) == title and text == ["line 1", "line 2", ""]


@pytest.mark.parametrize("path", ["train_gpt.py", "optim/muon.py", "a dir/b c.py"])
def test_source_title_round_trip(path):
    title = rl.format_source_title(path)
    assert rl.parse_source_title(title) == path and rl.parse_config_title(title) is None


@pytest.mark.parametrize("preset", ["speedrun", "cpu-tiny", "record11"])
def test_config_title_round_trip(preset):
    title = rl.format_config_title(preset)
    assert rl.parse_config_title(title) == preset and rl.parse_source_title(title) is None


@pytest.mark.parametrize("status, kind, reason", [
    ("completed", "completed", ""),
    (rl.format_failed_status("non-finite train loss at step 5; last good checkpoint: /x y/step_000004.pt"), "failed",
     "non-finite train loss at step 5; last good checkpoint: /x y/step_000004.pt"),
    (rl.format_failed_status("RuntimeError: a: b"), "failed", "RuntimeError: a: b"),
    (rl.format_interrupted_status("SIGTERM", 3, SPACED, "python train_gpt.py --resume x"), "interrupted",
     f"received SIGTERM after step 3; checkpoint {SPACED}; resume with: python train_gpt.py --resume x"),
])
def test_status_line_round_trip(status, kind, reason):
    assert rl.parse_status_line(rl.format_status_line(status)) == rl.StatusLine(status, kind, reason)


@pytest.mark.parametrize("signal_name, step, nproc", [("SIGTERM", 3, None), ("SIGINT", 10**9, 8)])
@pytest.mark.parametrize("args", [[], ["--preset", "cpu-tiny", "--steps", "16"],
                                  ["--resume", "old.pt", "--steps", "16"], ["--steps", "16", "--resume", "old.pt"]])
def test_interrupted_status_round_trip(signal_name, step, nproc, args):
    command = rl.format_resume_command(args, SPACED, nproc)
    kept = [a for a in args if a not in ("--resume", "old.pt")]
    launcher = f"torchrun --standalone --nproc_per_node={nproc}" if nproc else "python"
    assert command == f"{launcher} train_gpt.py {' '.join(kept)} --resume {SPACED}"  # the old --resume gives way
    status = rl.format_interrupted_status(signal_name, step, SPACED, command)
    expected = rl.Interrupted(signal_name, step, SPACED, command)
    assert rl.parse_interrupted_status(status) == expected
    assert rl.parse_interrupted_status(rl.parse_status_line(rl.format_status_line(status))) == expected
    assert rl.parse_interrupted_status("completed") is None


@pytest.mark.parametrize("values", [(1, "cpu", "torch.float32", "sdpa", False, 2),
                                    (8, "cuda", "torch.bfloat16", "flex", True, 1),
                                    (1024, "cuda", "torch.bfloat16", "fa3", True, 64)])
def test_environment_line_round_trip(values):
    assert rl.parse_environment_line(rl.format_environment_line(*values)) == rl.EnvironmentLine(*values)


@pytest.mark.parametrize("changed", [
    [],
    [("steps", 16, 20)],
    [("lr", 0.1, NAN), ("save_final", False, True), ("records_dir", "records", "my records, b -> c"),
     ("cooldown_frac", 0.4, INF), ("wandb_project", "", "x, y z")],
])
@pytest.mark.parametrize("path, step, time_ms, world", [(SPACED, 8, 1234.4, 2),
                                                         ("ckpt/step_000001.pt", 10**12, 0.0, 1)])
def test_resumed_line_round_trip(path, step, time_ms, world, changed):
    line = rl.format_resumed_line(path, step, time_ms, world, changed)
    expected = rl.ResumedLine(path, step, float(f"{time_ms:.0f}"), world,
                              tuple(rl.SettingChange(*change) for change in changed))
    assert same(rl.parse_resumed_line(line), expected), line


@pytest.mark.parametrize("path", [SPACED, "ckpt/step_000016.pt", "C:\\runs\\step 1.pt"])
def test_checkpoint_line_round_trip(path):
    assert rl.parse_checkpoint_line(rl.format_checkpoint_line(path)) == path


@pytest.mark.parametrize("allocated, reserved", [(0, 0), (30123, 31000), (10**9, 10**9 + 1)])
def test_cuda_peak_memory_round_trip(allocated, reserved):
    assert (rl.parse_peak_memory_line(rl.format_cuda_peak_memory_line(allocated, reserved))
            == rl.PeakMemory("cuda", allocated_mib=allocated, reserved_mib=reserved))


@pytest.mark.parametrize("seconds, compiled, cache", [(0.04, False, None), (412.96, True, "none loaded; saved 9")])
def test_warmup_round_trip(seconds, compiled, cache):
    assert rl.parse_warmup_line(rl.format_warmup_line(seconds, compiled, cache)) == rl.Warmup(
        round(seconds, 1), compiled, cache)


@pytest.mark.parametrize("resident, rank", [(0, 0), (1843, 1), (10**9, 1023)])
def test_cpu_peak_memory_round_trip(resident, rank):
    assert (rl.parse_peak_memory_line(rl.format_cpu_peak_memory_line(resident, rank))
            == rl.PeakMemory("cpu", resident_mib=resident, rank=rank))


@pytest.mark.parametrize("count", [0, 7, 999, 1000, 123_532_032, 10**15])
def test_parameters_line_round_trip(count):
    assert rl.parse_parameters_line(rl.format_parameters_line(count)) == count


@pytest.mark.parametrize("model, cores", [("AMD EPYC 7B13", 2), ("Intel(R) Xeon(R) CPU @ 2.20GHz, rev 2", 224),
                                         ("x86_64", None), ("", 1)])
def test_cpu_hardware_line_round_trip(model, cores):
    assert rl.parse_cpu_hardware_line(rl.format_cpu_hardware_line(model, cores)) == rl.CpuHardware(model, cores)


@pytest.mark.parametrize("count, name", [(1, "NVIDIA H100 80GB HBM3"), (8, "NVIDIA H200 (x)")])
def test_gpu_fallback_hardware_line_round_trip(count, name):
    assert (rl.parse_gpu_fallback_hardware_line(rl.format_gpu_fallback_hardware_line(count, name))
            == rl.GpuFallbackHardware(count, name))


def test_log_file_name_round_trip():
    when = datetime(2026, 11, 25, 14, 3, 59)
    name = rl.log_file_name(when, "1a2b3c4d")
    assert name == "2026-11-25_14-03-59_1a2b3c4d.txt"
    assert rl.parse_log_file_name(name) == when and rl.parse_log_file_name(f"/a b/{name}") == when
    random_name = rl.log_file_name()
    assert rl.parse_log_file_name(random_name) is not None and len(random_name) == len(name)
    assert rl.parse_log_file_name("run.txt") is None and rl.parse_log_file_name("2026-13-45_00-00-00_x.txt") is None


def test_run_id_line_round_trip():
    run_id = uuid.uuid4().hex
    assert rl.parse_run_id_line(rl.format_run_id_line(run_id)) == run_id
    assert rl.parse_run_id_line("run id: not-hex") is None


@pytest.mark.parametrize("tokens, vocab", [(16_384, 8192), (10_485_760, 50257)])
def test_val_set_line_round_trip(tokens, vocab):
    digest = hashlib.sha256(str(tokens).encode()).hexdigest()
    assert rl.parse_val_set_line(rl.format_val_set_line(tokens, digest, vocab)) == rl.ValSet(tokens, digest, vocab)


@pytest.mark.parametrize("loss", [3.279123456789123, 3.28, 1e-7, float("inf")])
def test_final_val_loss_line_keeps_every_digit(loss):
    assert rl.parse_final_val_loss_line(rl.format_final_val_loss_line(loss)) == loss
    assert math.isnan(rl.parse_final_val_loss_line(rl.format_final_val_loss_line(float("nan"))))


# One line of each kind: every parser takes its own kind and no other.
LINES = {
    "step": rl.format_step_line(8, 16, 1234.0, val_loss=3.5),
    "section": rl.format_section_header("environment"),
    "status": rl.format_status_line(rl.format_interrupted_status("SIGTERM", 3, SPACED, "python train_gpt.py")),
    "environment": rl.format_environment_line(2, "cuda", "torch.bfloat16", "flex", True, 1),
    "resumed": rl.format_resumed_line(SPACED, 8, 100.0, 2, [("steps", 16, 20)]),
    "checkpoint": rl.format_checkpoint_line(SPACED),
    "peak memory": rl.format_cuda_peak_memory_line(1, 2),
    "parameters": rl.format_parameters_line(1234),
    "warm-up": rl.format_warmup_line(12.34, True, "loaded 3 artifacts from a b/x.bin"),
    "cpu hardware": rl.format_cpu_hardware_line("AMD EPYC", 2),
    "gpu fallback": rl.format_gpu_fallback_hardware_line(2, "NVIDIA H100"),
    "run id": rl.format_run_id_line("0123456789abcdef0123456789abcdef"),
    "val set": rl.format_val_set_line(2048, "ab" * 32, 8192),
    "final val_loss": rl.format_final_val_loss_line(3.2791),
}
PARSERS = {"step": rl.parse_step_line, "section": rl.parse_section_header, "status": rl.parse_status_line,
           "environment": rl.parse_environment_line, "resumed": rl.parse_resumed_line,
           "checkpoint": rl.parse_checkpoint_line, "peak memory": rl.parse_peak_memory_line,
           "parameters": rl.parse_parameters_line, "warm-up": rl.parse_warmup_line, "cpu hardware": rl.parse_cpu_hardware_line,
           "gpu fallback": rl.parse_gpu_fallback_hardware_line, "run id": rl.parse_run_id_line,
           "val set": rl.parse_val_set_line, "final val_loss": rl.parse_final_val_loss_line}


@pytest.mark.parametrize("kind", PARSERS)
def test_each_parser_reads_only_its_own_kind(kind):
    for line_kind, line in LINES.items():
        assert (PARSERS[kind](line) is not None) == (line_kind == kind), (kind, line)


# ----------------------------------------------------------------------------- today's text, byte for byte

def test_lines_are_the_text_logs_already_hold():
    # As train_gpt.py wrote them before this module: logs in records/ and on the leaderboard hold this text.
    # A deliberate change of the format changes these and must keep the parsers reading the old text.
    assert (rl.format_step_line(0, 6, 0.0, val_loss=10.8258)
            == "step:0/6 val_loss:10.8258 train_time:0ms step_avg:0.00ms")
    assert (rl.format_step_line(6, 6, 1200.3, train_loss=3.30123)
            == "step:6/6 train_loss:3.3012 train_time:1200ms step_avg:200.05ms")
    assert rl.format_step_line(4, 8, 10.0, val_loss=NAN) == "step:4/8 val_loss:nan train_time:10ms step_avg:2.50ms"
    assert rl.format_step_line(2, 3, 9.0) == "step:2/3 train_time:9ms step_avg:4.50ms"  # the leaderboard's 2024-12
    assert rl.format_section("config (preset speedrun)", '{\n  "steps": 6\n}\n') == (
        '==== config (preset speedrun) ====\n{\n  "steps": 6\n}\n')
    assert rl.format_source_title("optim/muon.py") == "source: optim/muon.py"
    assert rl.format_status_line("completed") == "status: completed"
    assert rl.format_failed_status("final val_loss is nan") == "failed: final val_loss is nan"
    assert (rl.format_interrupted_status("SIGTERM", 3, "c/step_000003.pt", rl.format_resume_command(
        ["--preset", "cpu-tiny", "--resume", "c/step_000001.pt"], "c/step_000003.pt", 2)) ==
        "interrupted: received SIGTERM after step 3; checkpoint c/step_000003.pt; resume with: torchrun --standalone "
        "--nproc_per_node=2 train_gpt.py --preset cpu-tiny --resume c/step_000003.pt")
    assert rl.format_resume_command([], "c.pt") == "python train_gpt.py  --resume c.pt"
    assert (rl.format_environment_line(2, "cuda", "torch.bfloat16", "flex", True, 1) == "world size 2, device cuda, "
            "autocast dtype torch.bfloat16, attention flex, compile True, accumulation steps 1")
    assert (rl.format_resumed_line("c/step_000008.pt", 8, 1234.5, 2, [("steps", 16, 20), ("val_files", "a", "b")])
            == "resumed from c/step_000008.pt at step 8 (train_time 1234ms, saved by 2 process(es)); changed "
               "settings: steps 16 -> 20, val_files 'a' -> 'b'")
    assert rl.format_resumed_line("c.pt", 8, 0.0, 1, []).endswith("; changed settings: none")
    assert rl.format_checkpoint_line("c/step_000016.pt") == "checkpoint: c/step_000016.pt"
    assert rl.format_cuda_peak_memory_line(30123, 31000) == "peak memory: 30123 MiB allocated, 31000 MiB reserved"
    assert rl.format_cpu_peak_memory_line(1843, 0) == "peak memory: 1843 MiB resident (rank 0)"
    assert rl.format_parameters_line(123532032) == "parameters: 123,532,032"
    assert rl.format_cpu_hardware_line("AMD EPYC 7B13", 2) == "CPU: AMD EPYC 7B13, 2 logical cores"
    assert rl.format_gpu_fallback_hardware_line(8, "NVIDIA H100") == "8 x NVIDIA H100 (nvidia-smi unavailable)"


def test_the_fixture_log_lines_parse_back_to_themselves():
    # tests/fixtures/records/own_speedrun.txt: the lines this project's trainer writes, as a log holds them.
    text = open(os.path.join(REPO_ROOT, "tests", "fixtures", "records", "own_speedrun.txt")).read()
    lines = text.splitlines()
    for line in lines:
        step = rl.parse_step_line(line)
        if step and step.step:  # the fixture's step 0 average is made up
            assert rl.format_step_line(step.step, step.total_steps, step.train_time_ms, step.val_loss,
                                       step.train_loss) == line
    environment = rl.parse_environment_line(lines[lines.index("==== environment ====") + 2])
    assert rl.format_environment_line(*(getattr(environment, f) for f in environment.__dataclass_fields__)) in lines
    peak = rl.parse_peak_memory_line("peak memory: 30123 MiB allocated, 31000 MiB reserved")
    assert rl.format_cuda_peak_memory_line(peak.allocated_mib, peak.reserved_mib) in lines
    assert rl.format_status_line(rl.parse_status_line(lines[-1]).text) == lines[-1] == "status: completed"


# ----------------------------------------------------------------------------- the writers, read by records.py

def write_log(records_dir, status, capsys, final_val_loss=3.2765):
    """A RecordLog of a 2-process CUDA run of 8 steps on a machine of 3 GPUs, resumed at step 4."""
    log = rl.RecordLog(str(records_dir), enabled=True)
    log.section(rl.COMMAND_SECTION, "python train_gpt.py --preset speedrun")
    log.section(rl.format_source_title("train_gpt.py"), "print('train')\n")
    log.section(rl.format_source_title("training/record_log.py"), "print('log')\n\n")
    log.section(rl.ENVIRONMENT_SECTION, "\n".join([
        "python 3.11.7, torch 2.9.0, triton 3.5.0",
        rl.format_environment_line(2, "cuda", "torch.bfloat16", "flex", True, 1),
        "micro-batch 65,536 tokens (1 accumulation step): the largest that fits"]))
    log.section(rl.HARDWARE_SECTION, rl.format_gpu_fallback_hardware_line(3, "NVIDIA H100 80GB HBM3"))
    config = {"steps": 8, "val_tokens": 10485760, "val_files": "data/fineweb10B/fineweb_val_*.bin"}
    log.section(rl.format_config_title("speedrun"), json.dumps(config, indent=2))
    log.section(rl.RUN_SECTION, rl.format_parameters_line(123_532_032))
    log.line(rl.format_resumed_line(SPACED, 4, 800.0, 2, [("save_every", 0, 4)]))
    expected = []
    for step in range(4, 9):
        time_ms = 200.0 * step
        if step % 2 == 0:
            loss = final_val_loss if step == 8 else 5 - step / 4
            log.line(rl.format_step_line(step, 8, time_ms, val_loss=loss))
            expected.append((step, float(f"{loss:.4f}"), time_ms))
        log.line(rl.format_step_line(step, 8, time_ms, train_loss=4.5 - step / 8))
    log.line(rl.format_checkpoint_line(SPACED))
    log.line(rl.format_cuda_peak_memory_line(30123, 31000))
    log.close(status)
    printed = capsys.readouterr().out
    text = open(log.path).read()
    assert printed == "".join(line + "\n" for line in text.splitlines() if line.startswith(
        ("resumed from ", "step:", "checkpoint: ", "peak memory: ", "status: ")))  # lines are printed too
    return log.path, expected


def test_record_log_is_read_by_records(tmp_path, capsys):
    path, val_points = write_log(tmp_path / "records", "completed", capsys)
    assert os.path.dirname(path) == str(tmp_path / "records")
    assert rl.parse_log_file_name(path) is not None
    run = records.parse_log(path)
    assert run.val_points == val_points and run.total_steps == 8 and not run.malformed
    assert run.status == "completed" and run.reason == "" and run.final_val_loss == 3.2765
    assert run.train_time_s == 1.6 and run.step_avg_ms == 200.0
    assert run.hardware == "2x NVIDIA H100 80GB HBM3"  # the world size's GPUs, not the machine's 3
    assert run.preset == "speedrun" and run.config["steps"] == 8
    assert run.sources == {"train_gpt.py": "print('train')\n", "training/record_log.py": "print('log')\n"}
    assert run.date == rl.parse_log_file_name(path).strftime("%Y-%m-%d %H:%M")
    assert records.run_stats([run])["problems"] == []


@pytest.mark.parametrize("status, kind, reason", [
    (rl.format_interrupted_status("SIGTERM", 8, SPACED, rl.format_resume_command(["--steps", "8"], SPACED)),
     "interrupted", f"received SIGTERM after step 8; checkpoint {SPACED}; resume with: python train_gpt.py "
                    f"--steps 8 --resume {SPACED}"),
    (rl.format_failed_status("non-finite train loss at step 7"), "failed", "non-finite train loss at step 7"),
])
def test_records_reads_why_a_run_stopped(tmp_path, capsys, status, kind, reason):
    path, _ = write_log(tmp_path, status, capsys)
    run = records.parse_log(path)
    assert (run.status, run.reason) == (kind, reason)
    # a log without a run id (this one's): an interrupted run is left out, its resumed log carries it on
    assert run.run_id is None and records.counts_as_missed(run) == (kind == "failed")


def test_records_calls_a_diverged_record_log_failed(tmp_path, capsys):
    path, _ = write_log(tmp_path, "completed", capsys, final_val_loss=NAN)
    run = records.parse_log(path)
    assert math.isnan(run.final_val_loss) and run.status == "failed"
    assert run.reason == "diverged: final val loss is nan"


def test_cpu_record_log_names_the_cpu(tmp_path):
    log = rl.RecordLog(str(tmp_path), enabled=True)
    log.section(rl.ENVIRONMENT_SECTION, rl.format_environment_line(1, "cpu", "torch.float32", "sdpa", False, 2))
    log.section(rl.HARDWARE_SECTION, rl.format_cpu_hardware_line("AMD EPYC 7B13", 2))
    log.close("completed")
    assert records.parse_log(log.path).hardware == "CPU: AMD EPYC 7B13, 2 logical cores"


def test_record_log_of_another_rank_writes_nothing(tmp_path, capsys):
    log = rl.RecordLog(str(tmp_path / "records"), enabled=False)
    log.section("command", "x")
    log.line(rl.format_step_line(1, 2, 3.0, train_loss=4.0))
    log.close("completed")
    assert log.path is None and not (tmp_path / "records").exists() and capsys.readouterr().out == ""


def test_progress_line_clears_before_a_log_line(tmp_path, capsys):
    progress = rl.ProgressLine(True)
    log = rl.RecordLog(str(tmp_path), enabled=True, progress=progress)
    progress.show("step 1/2  train_loss 4.0000")
    log.line("step:1/2 train_loss:4.0000 train_time:3ms step_avg:3.00ms")
    captured = capsys.readouterr()
    assert captured.err == "\r\x1b[Kstep 1/2  train_loss 4.0000\r\x1b[K" and not progress.shown
    assert captured.out == "step:1/2 train_loss:4.0000 train_time:3ms step_avg:3.00ms\n"
    rl.ProgressLine(False).show("never")
    assert capsys.readouterr().err == ""
    log.close("completed")


# ----------------------------------------------------------------------------- what the module may be

def test_the_module_and_records_import_only_the_standard_library():
    code = ("import sys; before = set(sys.modules); import training.record_log; from scripts import records; "
            "new = {m.split('.')[0] for m in set(sys.modules) - before}; "
            "print(sorted(new - set(sys.stdlib_module_names) - {'training', 'scripts'}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_records_runs_as_a_script_from_the_repository_root():
    fixture = os.path.join("tests", "fixtures", "records", "own_speedrun.txt")
    result = subprocess.run([sys.executable, "scripts/records.py", "summary", fixture], cwd=REPO_ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "2x NVIDIA H100 80GB HBM3" in result.stdout and "completed" in result.stdout


def test_the_module_source_holds_no_section_header():
    # train_gpt.py embeds this module's source in every log: a line of it read as a section header
    # would cut the embedded file in two.
    with open(rl.__file__, encoding="utf-8") as f:
        assert [line for line in f.read().splitlines() if rl.parse_section_header(line) is not None] == []
