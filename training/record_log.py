"""The record log's format: every line train_gpt.py writes to records/, and the parser of each.

A log is a file named `YYYY-MM-DD_HH-MM-SS_<8 hex digits>.txt` holding sections, each a header line
(`==== <title> ====`) and its text: command, one `source: <path>` per project file the run imported,
environment, hardware, `config (preset <name>)` (JSON), run. Then come the step lines, validation's
and training's, the summary lines (checkpoint, peak memory) and last a `status:` line.

Each line kind has a format function (what the trainer writes) and a parser (what scripts/records.py
reads) next to each other: changing one without the other fails tests/training/test_record_log.py.
Parsers take one line without its newline and return a typed value, or None for a line of another kind.

Standard library only: scripts/records.py imports this module and stays free of torch.
"""
import ast
import dataclasses
import os
import re
import sys
import uuid
from datetime import datetime

__all__ = [
    "NUMBER", "COMMAND_SECTION", "ENVIRONMENT_SECTION", "HARDWARE_SECTION", "RUN_SECTION", "STEP_LINE_PREFIX",
    "STATUS_COMPLETED", "STATUS_FAILED", "STATUS_INTERRUPTED",
    "StepLine", "StatusLine", "Interrupted", "EnvironmentLine", "SettingChange", "ResumedLine", "PeakMemory",
    "CpuHardware", "GpuFallbackHardware",
    "log_file_name", "parse_log_file_name",
    "format_section_header", "parse_section_header", "format_section",
    "format_source_title", "parse_source_title", "format_config_title", "parse_config_title",
    "format_step_line", "parse_step_line",
    "format_status_line", "parse_status_line", "format_failed_status",
    "format_resume_command", "format_interrupted_status", "parse_interrupted_status",
    "format_environment_line", "parse_environment_line",
    "format_resumed_line", "parse_resumed_line",
    "format_checkpoint_line", "parse_checkpoint_line",
    "format_cuda_peak_memory_line", "format_cpu_peak_memory_line", "parse_peak_memory_line",
    "format_parameters_line", "parse_parameters_line", "format_run_id_line", "parse_run_id_line",
    "ValSet", "format_val_set_line", "parse_val_set_line", "format_final_val_loss_line", "parse_final_val_loss_line",
    "format_cpu_hardware_line", "parse_cpu_hardware_line",
    "format_gpu_fallback_hardware_line", "parse_gpu_fallback_hardware_line",
    "ProgressLine", "RecordLog",
]

# A number as Python's format() writes a float (nan, inf, -inf included) or as the leaderboard's logs do.
NUMBER = r"[-+]?(?:\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|nan|inf)"


# ----------------------------------------------------------------------------- file name

LOG_FILE_NAME = re.compile(r"^(\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2})_")
_LOG_FILE_TIME = "%Y-%m-%d_%H-%M-%S"


def log_file_name(when=None, token=None):
    """`2026-11-25_14-03-59_1a2b3c4d.txt`: the local time the log was opened and 8 random hex digits."""
    when = datetime.now() if when is None else when
    token = uuid.uuid4().hex[:8] if token is None else token
    return f"{when.strftime(_LOG_FILE_TIME)}_{token}.txt"


def parse_log_file_name(name):
    """The datetime (to the second) a log file's name starts with, or None. Takes a path or a bare name."""
    match = LOG_FILE_NAME.match(os.path.basename(name))
    if not match:
        return None
    try:
        return datetime.strptime(match.group(1), _LOG_FILE_TIME)
    except ValueError:
        return None


# ----------------------------------------------------------------------------- sections

SECTION_HEADER = re.compile(r"^==== (.+) ====$")
COMMAND_SECTION = "command"
ENVIRONMENT_SECTION = "environment"
HARDWARE_SECTION = "hardware"
RUN_SECTION = "run"
_SOURCE_PREFIX = "source: "
CONFIG_TITLE = re.compile(r"^config \(preset (\S+)\)$")


def format_section_header(title):
    return f"==== {title} ===="


def parse_section_header(line):
    """The title of a section header line, or None."""
    match = SECTION_HEADER.match(line)
    return match.group(1) if match else None


def format_section(title, text):
    """A whole section as the log holds it: its header, its text without trailing blank lines, a newline."""
    return f"{format_section_header(title)}\n{text.rstrip()}\n"


def format_source_title(path):
    """The title of the section that embeds a project file (path relative to the repository)."""
    return f"{_SOURCE_PREFIX}{path}"


def parse_source_title(title):
    """The embedded file's path, or None for a section of another kind."""
    return title[len(_SOURCE_PREFIX):] if title.startswith(_SOURCE_PREFIX) else None


def format_config_title(preset):
    return f"config (preset {preset})"


def parse_config_title(title):
    """The preset named by a config section's title, or None for a section of another kind."""
    match = CONFIG_TITLE.match(title)
    return match.group(1) if match else None


# ----------------------------------------------------------------------------- step lines

STEP_LINE_PREFIX = "step:"
# The leaderboard's step lines since 2024-10 have the same grammar: a val or train loss, or neither (2024-12 on).
# A validation line may end with the loss of a float32 head (--numerics record), after the leaderboard's fields.
STEP_LINE = re.compile(rf"^step:(\d+)/(\d+) (?:(val_loss|train_loss):({NUMBER}) )?train_time:(\d+(?:\.\d+)?)ms "
                       rf"step_avg:(\S+?)ms(?: val_loss_float32:({NUMBER}))?\s*$")


@dataclasses.dataclass(frozen=True)
class StepLine:
    step: int
    total_steps: int
    train_time_ms: float
    step_avg_ms: float  # None where the line's average is not a number
    val_loss: float = None  # a validation line's loss
    train_loss: float = None  # a training line's loss (the leaderboard's lines since 2024-12 carry none)
    val_loss_float32: float = None  # a validation line's loss with a float32 head, under --numerics record


def format_step_line(step, total_steps, train_time_ms, val_loss=None, train_loss=None, val_loss_float32=None):
    """`step:N/M val_loss:X train_time:Tms step_avg:Sms` (or train_loss:X, or no loss at all); the average
    is over the steps trained so far (over 1 at step 0). A val_loss_float32 goes last, as
    ` val_loss_float32:Y`, where the leaderboard's parsers do not look."""
    if val_loss is not None and train_loss is not None:
        raise ValueError("a step line holds a val loss or a train loss, not both")
    if val_loss_float32 is not None and val_loss is None:
        raise ValueError("val_loss_float32 belongs to a validation line")
    if val_loss is not None:
        loss = f"val_loss:{val_loss:.4f} "
    elif train_loss is not None:
        loss = f"train_loss:{train_loss:.4f} "
    else:
        loss = ""
    float32 = f" val_loss_float32:{val_loss_float32:.4f}" if val_loss_float32 is not None else ""
    return (f"step:{step}/{total_steps} {loss}train_time:{train_time_ms:.0f}ms "
            f"step_avg:{train_time_ms / max(step, 1):.2f}ms{float32}")


def parse_step_line(line):
    """A StepLine, or None for a line that is not one (a step-like line that does not parse included)."""
    match = STEP_LINE.match(line)
    if not match:
        return None
    step, total, kind, value, time_ms, avg, float32 = match.groups()
    try:
        step_avg = float(avg)
    except ValueError:
        step_avg = None
    loss = float(value) if value is not None else None
    return StepLine(int(step), int(total), float(time_ms), step_avg,
                    val_loss=loss if kind == "val_loss" else None, train_loss=loss if kind == "train_loss" else None,
                    val_loss_float32=float(float32) if float32 is not None else None)


# ----------------------------------------------------------------------------- status line

STATUS_PREFIX = "status: "
STATUS_COMPLETED, STATUS_FAILED, STATUS_INTERRUPTED = "completed", "failed", "interrupted"


@dataclasses.dataclass(frozen=True)
class StatusLine:
    text: str  # all after `status: `
    kind: str  # completed, failed or interrupted: the first word before the first `: `
    reason: str  # after the first `: `; empty for completed


def format_status_line(status):
    """The log's last line; status is `completed`, `failed: <why>` or `interrupted: <...>`."""
    return f"{STATUS_PREFIX}{status}"


def format_failed_status(reason):
    return f"{STATUS_FAILED}: {reason}"


def parse_status_line(line):
    if not line.startswith(STATUS_PREFIX):
        return None
    text = line[len(STATUS_PREFIX):]
    head, _, reason = text.partition(": ")
    words = head.split()
    return StatusLine(text, words[0] if words else "", reason)


INTERRUPTED = re.compile(r"^interrupted: received (\w+) after step (\d+); checkpoint (.+?); resume with: (.*)$")


@dataclasses.dataclass(frozen=True)
class Interrupted:
    signal_name: str
    step: int
    checkpoint_path: str
    resume_command: str


def format_resume_command(args, checkpoint_path, nproc_per_node=None):
    """The command that resumes the run: its arguments with --resume replaced, under torchrun when
    nproc_per_node is given (a distributed run), else under python."""
    args = list(args)
    if "--resume" in args:  # the new --resume replaces the old one
        i = args.index("--resume")
        args = args[:i] + args[i + 2:]
    launcher = f"torchrun --standalone --nproc_per_node={nproc_per_node}" if nproc_per_node is not None else "python"
    return f"{launcher} train_gpt.py {' '.join(args)} --resume {checkpoint_path}"


def format_interrupted_status(signal_name, step, checkpoint_path, resume_command):
    """The status of a run stopped by a signal (`SIGTERM`) after `step`, saved at checkpoint_path."""
    return (f"{STATUS_INTERRUPTED}: received {signal_name} after step {step}; checkpoint {checkpoint_path}; "
            f"resume with: {resume_command}")


def parse_interrupted_status(status):
    """An Interrupted from a status's text (or a StatusLine), or None for another status."""
    match = INTERRUPTED.match(status.text if isinstance(status, StatusLine) else status)
    if not match:
        return None
    signal_name, step, path, command = match.groups()
    return Interrupted(signal_name, int(step), path, command)


# ----------------------------------------------------------------------------- environment section

ENVIRONMENT_LINE = re.compile(r"^world size (\d+), device ([^\s,]+), autocast dtype ([^\s,]+), attention ([^\s,]+), "
                              r"compile (True|False), accumulation steps (\d+)$")


@dataclasses.dataclass(frozen=True)
class EnvironmentLine:
    world_size: int
    device: str  # cuda or cpu
    autocast_dtype: str  # as torch names it: torch.bfloat16
    attention: str
    compile: bool
    accumulation_steps: int


def format_environment_line(world_size, device_type, autocast_dtype, attention, use_compile, accumulation_steps):
    """The environment section's line of what the run ran on: autocast_dtype as str() writes a torch dtype
    (torch.bfloat16), use_compile a bool."""
    return (f"world size {world_size}, device {device_type}, autocast dtype {autocast_dtype}, "
            f"attention {attention}, compile {use_compile}, accumulation steps {accumulation_steps}")


def parse_environment_line(line):
    match = ENVIRONMENT_LINE.match(line)
    if not match:
        return None
    world, device, dtype, attention, compiled, accumulation = match.groups()
    return EnvironmentLine(int(world), device, dtype, attention, compiled == "True", int(accumulation))


# ----------------------------------------------------------------------------- summary lines

RESUMED_LINE = re.compile(r"^resumed from (.+) at step (\d+) \(train_time (\d+(?:\.\d+)?)ms, saved by (\d+) "
                          r"process\(es\)\); changed settings: (.*)$")


@dataclasses.dataclass(frozen=True)
class SettingChange:
    name: str
    old: object  # the value saved with the checkpoint, read back from its repr
    new: object  # the value this run uses


@dataclasses.dataclass(frozen=True)
class ResumedLine:
    checkpoint_path: str
    step: int
    train_time_ms: float
    saved_world_size: int  # how many processes saved the checkpoint
    changed_settings: tuple  # SettingChange for each setting that differs from the checkpoint's


def format_resumed_line(checkpoint_path, step, train_time_ms, saved_world_size, changed_settings):
    """changed_settings: (name, value saved, value now) for each setting that differs from the checkpoint's."""
    changed = ", ".join(f"{name} {old!r} -> {new!r}" for name, old, new in changed_settings)
    return (f"resumed from {checkpoint_path} at step {step} (train_time {train_time_ms:.0f}ms, saved by "
            f"{saved_world_size} process(es)); changed settings: {changed or 'none'}")


_NOT_LITERAL = object()


def _literal(text):
    """The value a repr stands for (nan and inf included), or _NOT_LITERAL."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        try:
            return float(text)
        except ValueError:
            return _NOT_LITERAL


def _setting_change(item):
    """A SettingChange from `name old -> new`, cut at the ` -> ` whose both sides are values, or None."""
    name, space, values = item.partition(" ")
    if not space or not re.fullmatch(r"\w+", name):
        return None
    at = values.find(" -> ")
    while at >= 0:
        old, new = _literal(values[:at]), _literal(values[at + len(" -> "):])
        if old is not _NOT_LITERAL and new is not _NOT_LITERAL:
            return SettingChange(name, old, new)
        at = values.find(" -> ", at + 1)
    return None


def parse_resumed_line(line):
    """A ResumedLine, or None. The settings' values come back as Python values (config fields are str,
    int, float or bool), a setting that is not `name <repr> -> <repr>` makes the line not parse."""
    match = RESUMED_LINE.match(line)
    if not match:
        return None
    path, step, time_ms, world, changed = match.groups()
    changes, pending = [], ""
    if changed != "none":
        # The settings are joined by ", ", which a string value may hold too: a piece that is no
        # setting by itself is joined to the next.
        for piece in re.split(r", (?=\w+ )", changed):
            pending = f"{pending}, {piece}" if pending else piece
            change = _setting_change(pending)
            if change:
                changes.append(change)
                pending = ""
        if pending:
            return None
    return ResumedLine(path, int(step), float(time_ms), int(world), tuple(changes))


CHECKPOINT_LINE = re.compile(r"^checkpoint: (.+)$")


def format_checkpoint_line(path):
    """The final checkpoint's path."""
    return f"checkpoint: {path}"


def parse_checkpoint_line(line):
    """The checkpoint's path, or None."""
    match = CHECKPOINT_LINE.match(line)
    return match.group(1) if match else None


CUDA_PEAK_MEMORY = re.compile(r"^peak memory: (\d+) MiB allocated, (\d+) MiB reserved$")
CPU_PEAK_MEMORY = re.compile(r"^peak memory: (\d+) MiB resident \(rank (\d+)\)$")


@dataclasses.dataclass(frozen=True)
class PeakMemory:
    device: str  # cuda: allocated and reserved by torch's caching allocator; cpu: the process's resident set
    allocated_mib: int = None
    reserved_mib: int = None
    resident_mib: int = None
    rank: int = None


def format_cuda_peak_memory_line(allocated_mib, reserved_mib):
    """Whole MiB: the caller floors torch.cuda.max_memory_allocated/reserved() // 2**20."""
    return f"peak memory: {allocated_mib} MiB allocated, {reserved_mib} MiB reserved"


def format_cpu_peak_memory_line(resident_mib, rank):
    """Whole MiB: the caller floors getrusage's ru_maxrss (KiB on Linux) // 1024."""
    return f"peak memory: {resident_mib} MiB resident (rank {rank})"


def parse_peak_memory_line(line):
    match = CUDA_PEAK_MEMORY.match(line)
    if match:
        return PeakMemory("cuda", allocated_mib=int(match.group(1)), reserved_mib=int(match.group(2)))
    match = CPU_PEAK_MEMORY.match(line)
    if match:
        return PeakMemory("cpu", resident_mib=int(match.group(1)), rank=int(match.group(2)))
    return None


WARMUP_LINE = re.compile(r"^warm-up: (\d+\.\d) s untimed, compile (on|off)(?:; compile cache: (.+))?$")


@dataclasses.dataclass(frozen=True)
class Warmup:
    seconds: float  # the untimed warm-up's wall time: with compile on, mostly compiling
    compiled: bool
    cache: str = None  # what the compile cache loaded and saved, or None without one


def format_warmup_line(seconds, compiled, cache=None):
    """The untimed warm-up before the timed run: compile time is the first thing a user waits for."""
    return f"warm-up: {seconds:.1f} s untimed, compile {'on' if compiled else 'off'}" + (
        f"; compile cache: {cache}" if cache else "")


def parse_warmup_line(line):
    match = WARMUP_LINE.match(line)
    if not match:
        return None
    return Warmup(float(match.group(1)), match.group(2) == "on", match.group(3))


PARAMETERS_LINE = re.compile(r"^parameters: (\d{1,3}(?:,\d{3})*)$")


def format_parameters_line(count):
    """The run section's count of the model's parameters."""
    return f"parameters: {count:,}"


def parse_parameters_line(line):
    match = PARAMETERS_LINE.match(line)
    return int(match.group(1).replace(",", "")) if match else None


RUN_ID_LINE = re.compile(r"^run id: ([0-9a-f]{32})$")


def format_run_id_line(run_id):
    """The run section's id of the run (uuid4 hex): a resumed run's log carries its checkpoint's, so the logs of
    one run resumed several times are known as one run."""
    return f"run id: {run_id}"


def parse_run_id_line(line):
    match = RUN_ID_LINE.match(line)
    return match.group(1) if match else None


VAL_SET_LINE = re.compile(r"^val set: (\d+) tokens, sha256 ([0-9a-f]{64}), vocabulary (\d+)$")


@dataclasses.dataclass(frozen=True)
class ValSet:
    tokens: int  # the tokens validated on (the targets of --val-tokens inputs)
    sha256: str  # of the token ids read, as little-endian uint16 (the shards' own format), the last target included
    vocab_size: int


def format_val_set_line(tokens, sha256, vocab_size):
    """The run section's validation set, by content: two runs validated on the same tokens have the same hash,
    whatever their files are called."""
    return f"val set: {tokens} tokens, sha256 {sha256}, vocabulary {vocab_size}"


def parse_val_set_line(line):
    match = VAL_SET_LINE.match(line)
    return ValSet(int(match.group(1)), match.group(2), int(match.group(3))) if match else None


FINAL_VAL_LOSS_LINE = re.compile(rf"^final val_loss: ({NUMBER})$")


def format_final_val_loss_line(loss):
    """The last validation's loss in full precision (the step line rounds it to 4 decimals, as the leaderboard's
    do): statistics over runs read this one."""
    return f"final val_loss: {loss!r}"


def parse_final_val_loss_line(line):
    match = FINAL_VAL_LOSS_LINE.match(line)
    return float(match.group(1)) if match else None


# ----------------------------------------------------------------------------- hardware section

CPU_HARDWARE_LINE = re.compile(r"^CPU: (.*), (\d+|None) logical cores$")
GPU_FALLBACK_HARDWARE_LINE = re.compile(r"^(\d+) x (.+) \(nvidia-smi unavailable\)$")


@dataclasses.dataclass(frozen=True)
class CpuHardware:
    model: str
    logical_cores: int  # None where the system did not say (os.cpu_count())


@dataclasses.dataclass(frozen=True)
class GpuFallbackHardware:
    device_count: int  # the machine's GPUs, used or not
    device_name: str


def format_cpu_hardware_line(model, logical_cores):
    """The hardware section of a CPU run."""
    return f"CPU: {model}, {logical_cores} logical cores"


def parse_cpu_hardware_line(line):
    match = CPU_HARDWARE_LINE.match(line)
    if not match:
        return None
    return CpuHardware(match.group(1), None if match.group(2) == "None" else int(match.group(2)))


def format_gpu_fallback_hardware_line(device_count, device_name):
    """The hardware section of a CUDA run where nvidia-smi could not run (else it holds nvidia-smi's output)."""
    return f"{device_count} x {device_name} (nvidia-smi unavailable)"


def parse_gpu_fallback_hardware_line(line):
    match = GPU_FALLBACK_HARDWARE_LINE.match(line)
    return GpuFallbackHardware(int(match.group(1)), match.group(2)) if match else None


# ----------------------------------------------------------------------------- writers

class ProgressLine:
    """A live status line on a terminal's stderr, overwritten in place and never written to the log."""

    def __init__(self, enabled):
        self.enabled, self.shown = enabled, False

    def show(self, text):
        if self.enabled:
            sys.stderr.write("\r\x1b[K" + text)
            sys.stderr.flush()
            self.shown = True

    def clear(self):
        if self.shown:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()
            self.shown = False


class RecordLog:
    """Rank 0's log file in records/: sources, environment, config, every step line, a final status."""

    def __init__(self, records_dir, enabled, progress=None):
        self.path = None
        self.progress = progress or ProgressLine(False)
        if not enabled:
            return
        os.makedirs(records_dir, exist_ok=True)
        self.path = os.path.join(records_dir, log_file_name())
        self.file = open(self.path, "w", encoding="utf-8")

    def section(self, title, text):
        self.write(format_section(title, text))

    def write(self, text):
        if self.path:
            self.file.write(text)
            self.file.flush()

    def line(self, text):
        """A step or summary line: printed and logged."""
        if self.path:
            self.progress.clear()
            print(text, flush=True)
            self.write(text + "\n")

    def close(self, status):
        self.line(format_status_line(status))
        if self.path:
            self.file.close()
