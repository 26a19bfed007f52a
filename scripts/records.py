"""Read run logs and answer what a person submitting a record must know.

    python scripts/records.py summary records/
    python scripts/records.py stats LOGS... [--target 3.28] [--json]
    python scripts/records.py compare BASELINE_DIR CANDIDATE_DIR
    python scripts/records.py plot LOGS... -o out.png
    python scripts/records.py submit NAME LOGS... [--force]
    python scripts/records.py verify LOG

Reads this project's record logs and every format of the public leaderboard's
(KellerJordan/modded-nanogpt records/track_1_short) logs:
  - 2024-06 (llm.c): `s:N tel:X` val lines and `s:N trl:X` train lines, no times, no code;
  - 2024-10/11: the code between two `====` rules, then nvidia-smi, then
    `step:N/M val_loss:X train_time:Tms step_avg:Sms` and `step:N/M train_loss:X ...` lines;
  - 2024-12 on: the log starts with the code, a rule ends it; train lines carry no loss
    (`step:N/M train_time:Tms step_avg:Sms`).
This project's logs are `==== title ====` sections (sources, environment, hardware, config) then
the same step lines and a `status:` line; newer ones also carry the run's id, a hash of its
validation set and the final val loss in full precision.

A run counts once, as one sample: the logs of one run id are one run (a run resumed from its
checkpoints writes a log per resume, and its outcome is the last one's), two copies of one log are
refused naming both, and so are two runs of one seed. A run that failed, diverged, crashed or was
interrupted and never resumed counts as missing the target, never left out. The logs of one set
must run one program (the same embedded code, and for this project's logs the same config) on one
validation set (the same tokens, by hash).
"""
import argparse
import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import statistics
import sys
from datetime import datetime

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:  # run as `python scripts/records.py`, the path starts at scripts/
    sys.path.insert(0, REPO_ROOT)

# This project's log format, written and read by one module (the leaderboard's 2024-10 step lines share its grammar).
from training.record_log import (ENVIRONMENT_SECTION, HARDWARE_SECTION, NUMBER, STATUS_COMPLETED,  # noqa: E402
                                 STATUS_FAILED, STATUS_INTERRUPTED, STEP_LINE_PREFIX, parse_config_title,
                                 parse_cpu_hardware_line, parse_environment_line, parse_final_val_loss_line,
                                 parse_gpu_fallback_hardware_line, parse_log_file_name, parse_resumed_line,
                                 parse_run_id_line, parse_section_header, parse_source_title, parse_status_line,
                                 parse_step_line, parse_val_set_line)

TARGET_VAL_LOSS = 3.28
SIGNIFICANCE = 0.01  # the leaderboard's rule: p < 0.01 that the mean val loss is below the target
# The leaderboard's validation set: the first 10,485,760 tokens of FineWeb's val shard.
RECORD_VAL_TOKENS = 10_485_760
FINEWEB_VAL_FILES = ("fineweb_val_*.bin", "fineweb_val_000000.bin")  # --val-files names that mean that shard
# The target is a loss over GPT-2's 50,257 tokens. A model's vocabulary may be padded (config.py's default,
# 50304, is 50257 rounded up to a multiple of 128 for faster matmuls): the padded ids never occur in the
# data, so the loss is still over GPT-2's tokens.
GPT2_VOCAB_SIZE = 50257
GPT2_PADDED_VOCAB_SIZE = 50304
# The step lines round losses to 4 decimals: one rounding step. Rounding moves each loss by up to half of it
# (a std of 1e-4 / sqrt(12) = 2.9e-5 where the rounding is uniform), so a std of rounded losses below one step
# is mostly rounding: some runs' losses land on one grid value and the others one step away, whatever the runs'
# true spread. A t statistic divided by such a std measures the rounding, not the runs: no p-value from it.
ROUNDED_LOSS_STEP = 1e-4
# Config fields that change where a run writes, how it reports, resumes or which seed it draws, not what it
# computes: two runs that differ only in these ran one program. The validation set (val_files, val_tokens) is
# checked on its own, by content where the log has a val set line, and a problem names the log that differs.
NOT_COMPUTATION_FIELDS = frozenset({
    "seed", "records_dir", "checkpoint_dir", "resume", "allow_code_change", "progress", "wandb_project",
    "collective_timeout_s", "save_every", "save_final", "keep_last", "compile_cache", "train_files", "val_files",
    "val_tokens"})

LLMC_LINE = re.compile(rf"^s:(\d+) (tel|trl):({NUMBER})(?: .*)?$")  # tel: val loss, trl: train loss
STEP_LIKE = re.compile(rf"^(?:{re.escape(STEP_LINE_PREFIX)}|s:\d)")  # a line meant as a step line, parsed or not
RULE = re.compile(r"^={20,}$")
GPU_LINE = re.compile(r"^\|\s+\d+\s+(\S.*?)\s{2,}(?:On|Off)\s+\|")  # a GPU's row in nvidia-smi's table
# The trainer's failure when a train loss went non-finite (training/loop.py's divergence watch).
DIVERGED_REASON = re.compile(r"\bnon-finite\b")


@dataclasses.dataclass
class Run:
    """One log, as parsed; after group_runs, one run: its last log, with the logs it continues in earlier_logs."""
    path: str
    date: str = "unknown"
    hardware: str = "unknown"
    total_steps: int = 0
    val_points: list = dataclasses.field(default_factory=list)  # (step, val_loss, train_time_ms or None)
    status: str = "incomplete"  # completed, failed, interrupted, incomplete
    reason: str = ""
    sources: dict = dataclasses.field(default_factory=dict)  # embedded file path -> source text
    config: dict = dataclasses.field(default_factory=dict)
    preset: str = ""
    malformed: list = dataclasses.field(default_factory=list)  # step-like lines that do not parse
    fingerprint: str = None  # hash of the step lines: the same run has it in every copy of its log
    run_id: str = None  # this project's newer logs: the same in every log of one run, resumed or not
    resumed: object = None  # record_log.ResumedLine where the log continues a checkpoint of its run
    last_step: int = None  # the last step a step line reached; None without step lines
    exact_final_loss: float = None  # the `final val_loss:` line's full-precision value
    val_set: object = None  # record_log.ValSet: what the run validated on, by content
    earlier_logs: list = dataclasses.field(default_factory=list)  # logs of this run that this one continues

    @property
    def final(self):
        """The val point at the last step, or None."""
        if self.val_points and self.val_points[-1][0] == self.total_steps:
            return self.val_points[-1]
        return None

    @property
    def final_val_loss(self):
        """The final val loss in full precision where the log has it, else as the step line rounds it."""
        if not self.final:
            return None
        return self.exact_final_loss if self.exact_final_loss is not None else self.final[1]

    @property
    def final_loss_rounded(self):
        """Whether final_val_loss comes from a step line's 4 decimals."""
        return self.exact_final_loss is None

    @property
    def train_time_s(self):
        """None where the log records no time (llm.c's)."""
        return self.final[2] / 1000 if self.final and self.final[2] is not None else None

    @property
    def step_avg_ms(self):
        if self.train_time_s is None or not self.total_steps:
            return None
        return self.train_time_s * 1000 / self.total_steps

    @property
    def start_step(self):
        """The step the log started training from (a resumed checkpoint's), or None for a log that trained
        nothing (stopped before its first step line)."""
        if self.resumed is not None:
            return self.resumed.step
        return 0 if self.last_step is not None else None

    @property
    def seed(self):
        return self.config.get("seed")

    @property
    def logs(self):
        """Every log of the run, in the order they ran."""
        return self.earlier_logs + [self]

    @property
    def status_text(self):
        if not self.reason:
            return self.status
        # a completed run's reason says what came after its result (`then failed: ...`), not why it stopped
        return f"{self.status} ({self.reason})" if self.status == STATUS_COMPLETED else f"{self.status}: {self.reason}"


class LogError(ValueError):
    pass


def _parse_our_sections(lines, run):
    """Reads this project's `==== title ====` sections into run; returns the lines outside embedded sources."""
    sections, body, title = {}, [], None
    for line in lines:
        header = parse_section_header(line)
        if header is not None:
            title = header
            sections[title] = []
        elif title:
            sections[title].append(line)
            if parse_source_title(title) is None:
                body.append(line)
    for title, section_lines in sections.items():
        text = "\n".join(section_lines)
        source_path, preset = parse_source_title(title), parse_config_title(title)
        if source_path is not None:
            run.sources[source_path] = text.rstrip("\n") + "\n"
        elif preset is not None:
            try:
                run.config = json.loads(text)
            except json.JSONDecodeError:
                pass
            run.preset = preset
    hardware = sections.get(HARDWARE_SECTION)
    if hardware:
        run.hardware = _our_hardware(hardware, sections.get(ENVIRONMENT_SECTION, []))
    return body


def _our_hardware(hardware_lines, environment_lines):
    """`Nx <GPU model>` with N the world size, since nvidia-smi lists every GPU of the machine, used or not;
    else the CPU line."""
    environment = next(filter(None, map(parse_environment_line, environment_lines)), None)
    if environment and environment.device == "cuda":
        world_size = environment.world_size
        fallback = parse_gpu_fallback_hardware_line(hardware_lines[0])
        models = ([fallback.device_name] if fallback else
                  [m.group(1) for m in map(GPU_LINE.match, hardware_lines) if m])
        if models:
            return f"{world_size}x {', '.join(sorted(set(models[:world_size])))}"
    return _hardware_summary(hardware_lines) or hardware_lines[0]


def _hardware_summary(lines):
    gpus = [m.group(1) for m in map(GPU_LINE.match, lines) if m]
    if gpus:
        names = sorted(set(gpus))
        return ", ".join(f"{gpus.count(n)}x {n}" for n in names)
    for line in lines:
        if parse_cpu_hardware_line(line):
            return line
    return None


def _split_leaderboard_code(lines, run):
    """Puts a leaderboard log's embedded code into run.sources; returns the lines after it.

    Up to 2024-11 the code sits between two rules, from 2024-12 on the log starts with it; either way
    the rule that ends it is followed by a `Running pytorch ...` (later `Running Python ...`) line.
    llm.c's logs embed no code."""
    end = next((i for i in range(1, len(lines) - 1) if RULE.match(lines[i]) and lines[i + 1].startswith("Running ")),
               None)
    if end is None:
        return lines
    start = 1 if RULE.match(lines[0]) else 0
    run.sources["train_gpt.py"] = "\n".join(lines[start:end]) + "\n"
    return lines[end + 1:]


def _read_step_line(line, run):
    """Adds a step line's val point to run; returns False for a line that does not parse."""
    parsed = parse_step_line(line)  # this project's, and the leaderboard's from 2024-10 on
    if parsed:
        run.total_steps = parsed.total_steps
        run.last_step = parsed.step
        if parsed.val_loss is not None:
            run.val_points.append((parsed.step, parsed.val_loss, parsed.train_time_ms))
        return True
    match = LLMC_LINE.match(line)
    if match:
        step, kind, value = match.groups()
        run.total_steps = max(run.total_steps, int(step))  # llm.c states no total: its last step stands for it
        run.last_step = int(step)
        if kind == "tel":
            run.val_points.append((int(step), float(value), None))
        return True
    return False


def _read_run_line(line, run):
    """Reads one of the run section's lines that say which run this is and what it validated on; returns
    False for a line of another kind."""
    if (run_id := parse_run_id_line(line)) is not None:
        run.run_id = run_id
    elif (resumed := parse_resumed_line(line)) is not None:
        run.resumed = resumed
    elif (val_set := parse_val_set_line(line)) is not None:
        run.val_set = val_set
    elif (loss := parse_final_val_loss_line(line)) is not None:
        run.exact_final_loss = loss
    else:
        return False
    return True


def _date_in(lines):
    """The date of the first `Sun Nov 10 19:09:29 2024` line (nvidia-smi's), as `2024-11-10 19:09`, or None."""
    for line in lines:
        match = re.match(r"^\w{3} (\w{3} +\d+ \d\d:\d\d):\d\d (\d{4})\s*$", line)
        if match:
            return datetime.strptime(f"{match.group(1)} {match.group(2)}", "%b %d %H:%M %Y").strftime("%Y-%m-%d %H:%M")
    return None


def _finished_before_failing(run):
    """Whether a failed run had logged a finite final val loss before it failed: the failure came after the
    result (the final checkpoint's save), so the run completed. A divergence is no such failure: a run whose
    training went non-finite failed, whatever its last validation said (the divergence watch reads the train
    losses only at synchronisations, so it may speak after the last val line)."""
    return (run.status == STATUS_FAILED and run.final is not None and math.isfinite(run.final_val_loss)
            and not DIVERGED_REASON.search(run.reason))


def parse_log(path):
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise LogError(f"cannot read {path}: {e.strerror}") from None
    run = Run(path=path)
    opened = parse_log_file_name(path)  # this project's log names say when the run started
    if opened:
        run.date = opened.strftime("%Y-%m-%d %H:%M")
    if any(parse_section_header(line) is not None for line in lines[:5]):  # this project's log
        body = _parse_our_sections(lines, run)
    else:
        body = _split_leaderboard_code(lines, run)
    if run.hardware == "unknown":
        run.hardware = _hardware_summary(body) or "unknown"
    if run.date == "unknown":
        run.date = _date_in(body) or "unknown"
    status, step_lines = None, []
    for line in body:
        if STEP_LIKE.match(line):
            step_lines.append(line)
            if not _read_step_line(line, run):
                run.malformed.append(line)
        elif line_status := parse_status_line(line):
            status = line_status
        else:
            _read_run_line(line, run)
    if step_lines:  # a log without step lines has nothing that tells its run from another's
        run.fingerprint = hashlib.sha256("\n".join(step_lines).encode()).hexdigest()
    if status is not None:
        run.status, run.reason = status.kind, status.reason
    elif run.final:
        run.status = STATUS_COMPLETED  # leaderboard logs have no status line; a final val line means it finished
    if run.status in (STATUS_COMPLETED, "incomplete") and not run.final:
        run.status, run.reason = "incomplete", "no val_loss line at the last step"
    if run.status == STATUS_COMPLETED and not math.isfinite(run.final_val_loss):
        run.status, run.reason = STATUS_FAILED, f"diverged: final val loss is {run.final_val_loss}"
    if _finished_before_failing(run):
        run.status, run.reason = STATUS_COMPLETED, f"then {STATUS_FAILED}: {run.reason}"
    return run


def collect_logs(paths):
    """Log files from files and folders (recursively, *.txt and *.log), sorted."""
    found = []
    for path in paths:
        if os.path.isdir(path):
            for root, _, files in os.walk(path):
                found += [os.path.join(root, f) for f in files if f.endswith((".txt", ".log"))]
        elif os.path.exists(path):
            found.append(path)
        else:
            raise LogError(f"no such log file or folder: {path}")
    if not found:
        raise LogError(f"no logs (*.txt, *.log) in {' '.join(paths)}")
    return sorted(found)


def load_runs(paths):
    """One Run per log (group_runs makes runs of them)."""
    return [parse_log(p) for p in collect_logs(paths)]


# ----------------------------------------------------------------------------- statistics

def student_t_cdf(t, df):
    """P(T <= t) for Student's t with df degrees of freedom (regularised incomplete beta)."""
    x = df / (df + t * t)
    tail = 0.5 * _regularized_incomplete_beta(df / 2, 0.5, x)
    return 1 - tail if t > 0 else tail


def _regularized_incomplete_beta(a, b, x):
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log(1 - x)
    if x > (a + 1) / (a + b + 2):
        return 1 - _regularized_incomplete_beta(b, a, 1 - x)
    # Lentz's continued fraction
    tiny, f, c, d = 1e-300, 1.0, 1.0, 0.0
    for i in range(400):
        m = i // 2
        if i == 0:
            numerator = 1.0
        elif i % 2 == 0:
            numerator = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        else:
            numerator = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        d = 1 + numerator * d
        d = tiny if abs(d) < tiny else d
        c = 1 + numerator / c
        c = tiny if abs(c) < tiny else c
        d = 1 / d
        f *= c * d
        if abs(1 - c * d) < 1e-12:
            break
    return math.exp(log_front) * (f - 1) / a


def student_t_quantile(p, df):
    low, high = -1e3, 1e3
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if student_t_cdf(mid, df) < p else (low, mid)
    return (low + high) / 2


def _name(run):
    return os.path.relpath(run.path)


def _same_run_id(first, second, why):
    return LogError(f"{_name(first)} and {_name(second)} carry the same run id: {first.run_id}, but are not the logs "
                    f"of one run resumed from its checkpoints ({why}): each run must count once")


def _resume_chain(logs):
    """The logs of one run id in the order the run went through them: the fresh log, then each resumed log by
    the step it resumed from (a retry from the same checkpoint after a crash after the one it retries).
    Refuses two logs that cannot both be part of one run: two fresh ones (two runs given one id), two with
    identical step lines (a copy), or two that completed. Logs that trained nothing (stopped before their
    first step line) come first: they hold no part of the run's path."""
    started = sorted((r for r in logs if r.start_step is not None), key=lambda r: (r.start_step, r.date, r.path))
    fresh = [r for r in started if r.resumed is None]
    if len(fresh) > 1:
        raise _same_run_id(fresh[0], fresh[1], "both start at step 0")
    for earlier, later in zip(started, started[1:]):
        if earlier.start_step == later.start_step and earlier.fingerprint == later.fingerprint:
            raise _same_run_id(earlier, later, f"both start at step {later.start_step} with identical step lines")
    completed = [r for r in logs if r.status == STATUS_COMPLETED]
    if len(completed) > 1:
        raise _same_run_id(completed[0], completed[1], "both completed")
    return [r for r in logs if r.start_step is None] + started


def check_distinct(runs):
    """Refuses two logs of one run (a copy, a renamed copy, a file given twice): a run counts once.

    Logs with a run id are one run's logs exactly when they carry its id, and must then be its resumed
    logs; two runs with different ids are two runs even where their step lines are alike (two runs that
    crashed at the same step). Logs without one (the leaderboard's, this project's older ones) are one run
    when their step lines are identical."""
    by_id, first_log = {}, {}
    for r in runs:
        if r.run_id is not None:
            by_id.setdefault(r.run_id, []).append(r)
        elif r.fingerprint is not None:  # without step lines nothing tells this run from another
            if r.fingerprint in first_log:
                raise LogError(f"{_name(first_log[r.fingerprint])} and {_name(r)} hold the same run (identical "
                               f"step lines): each run must count once")
            first_log[r.fingerprint] = r
    for logs in by_id.values():
        _resume_chain(logs)


def group_runs(runs):
    """One Run per run, in the order of the runs' first logs: a log without a run id is a run, the logs of
    one run id are one (refused where they cannot be, check_distinct). A run of several logs is its last
    log, with the ones before in earlier_logs: the completed one if a log completed, else the one that got
    furthest in the resume chain (an interrupted run that no log resumed is a miss)."""
    check_distinct(runs)
    groups = {}
    for r in runs:
        groups.setdefault(r.run_id or id(r), []).append(r)
    grouped = []
    for logs in groups.values():
        if len(logs) == 1:
            grouped.append(logs[0])
            continue
        chain = _resume_chain(logs)
        last = next((r for r in chain if r.status == STATUS_COMPLETED), chain[-1])
        grouped.append(dataclasses.replace(last, earlier_logs=[r for r in chain if r is not last]))
    return grouped


def counts_as_missed(run):
    """Whether a run (one of group_runs') missed the target: it failed, diverged, stopped without a final val
    loss, or was interrupted and no log resumed it (leaving it out would bias p downward). A log without a run
    id (older logs) that was interrupted is not counted: the log that resumed it, which nothing links to it,
    carries the run on."""
    if run.status == STATUS_INTERRUPTED and run.run_id is None:
        return False
    return run.status != STATUS_COMPLETED


def _counted(run):
    return run.status == STATUS_COMPLETED or counts_as_missed(run)


def _groups_of(logs, key):
    """The logs by key, the largest group first (ties in the order of their first log)."""
    groups = {}
    for r in logs:
        groups.setdefault(key(r), []).append(r)
    return sorted(groups.values(), key=len, reverse=True)


def _describe_groups(groups, what):
    """`13 logs ran one program (e.g. a.txt), 13 logs ran another (e.g. b.txt)`."""
    return ", ".join(f"{len(logs)} log{'s' if len(logs) > 1 else ''} ran {'one' if i == 0 else 'another'}"
                     f"{f' {what}' if i == 0 else ''} (e.g. {_name(logs[0])})" for i, logs in enumerate(groups))


def _computation_config(run):
    return {k: v for k, v in run.config.items() if k not in NOT_COMPUTATION_FIELDS}


def check_same_program(logs):
    """Refuses a set of logs that ran different programs: their runs are not samples of one thing. The
    embedded code must match, and for this project's logs the config too (but for the fields that do not
    change the computation, NOT_COMPUTATION_FIELDS)."""
    programs = _groups_of(logs, lambda r: json.dumps(r.sources, sort_keys=True))
    if len(programs) > 1:
        raise LogError(f"the logs embed different code: {_describe_groups(programs, 'program')}: the runs of one "
                       f"set must all run the same code")
    configured = [r for r in logs if r.config]  # the leaderboard's logs hold no config: their code is their config
    configs = _groups_of(configured, lambda r: json.dumps(_computation_config(r), sort_keys=True))
    if len(configs) > 1:
        examples = [_computation_config(group[0]) for group in configs]
        fields = sorted({k for c in examples for k in c if any(other.get(k) != c[k] for other in examples)})
        raise LogError(f"the logs ran different configs: {_describe_groups(configs, 'config')}, differing in "
                       f"{', '.join(fields)}: the runs of one set must all run the same configuration")


def check_independent(runs):
    """Refuses two runs (different run ids) of one seed: they draw the same initialisation and read the same
    data in the same order (the loader's order does not depend on the seed), so they differ only by the GPU's
    nondeterminism: one sample twice, not two. The logs of one run (resumed) share its seed; the leaderboard's
    logs hold no config, so no seed to compare."""
    first_run = {}
    for r in runs:
        if r.seed is None:
            continue
        if r.seed in first_run:
            raise LogError(f"{_name(first_run[r.seed])} and {_name(r)} ran with the same seed ({r.seed}): two runs "
                           f"of one seed are not two independent samples; run each with its own --seed")
        first_run[r.seed] = r


def _is_gpt2_vocabulary(size):
    return size in (GPT2_VOCAB_SIZE, GPT2_PADDED_VOCAB_SIZE)


def _validation_problems(run):
    """Why one log's validation is not the leaderboard's: its val set line where it has one (the tokens read,
    by content), else its config (the token count and the files' names, older logs)."""
    name, problems = _name(run), []
    if run.val_set is not None:
        tokens = run.val_set.tokens
    else:
        tokens = run.config.get("val_tokens")
    if tokens != RECORD_VAL_TOKENS:
        problems.append(f"{name} validated on {tokens} tokens, not the leaderboard's {RECORD_VAL_TOKENS:,}")
    if run.val_set is None and os.path.basename(str(run.config.get("val_files"))) not in FINEWEB_VAL_FILES:
        problems.append(f"{name} validated on {run.config.get('val_files')}, not FineWeb's val shard "
                        f"({FINEWEB_VAL_FILES[1]})")
    vocabularies = [run.val_set.vocab_size] if run.val_set is not None else []
    vocabularies += [run.config["vocab_size"]] if "vocab_size" in run.config else []
    other = next((size for size in vocabularies if not _is_gpt2_vocabulary(size)), None)
    if other is not None:
        problems.append(f"{name} validated on a vocabulary of {other} tokens: the {TARGET_VAL_LOSS} target is for "
                        f"GPT-2's tokens")
    return problems


def _val_set_problem(logs):
    """A problem where the logs with a val set line validated on different tokens, naming each group. The
    leaderboard's val shard's hash is not known here: the content check is that every run read the same."""
    groups = _groups_of([r for r in logs if r.val_set is not None], lambda r: r.val_set.sha256)
    if len(groups) < 2:
        return None
    described = "; ".join(f"sha256 {group[0].val_set.sha256[:12]}... ({', '.join(map(_name, group))})"
                          for group in groups)
    return f"the runs validated on different validation sets: {described}"


def setup_problems(runs):
    """Why these runs (their logs) cannot make a record, whatever their val losses."""
    problems = []
    by_hardware = {}
    for r in runs:
        by_hardware.setdefault(r.hardware, []).append(_name(r))
    if len(by_hardware) > 1:
        groups = [f"{hardware} ({', '.join(paths)})" for hardware, paths in sorted(by_hardware.items())]
        problems.append(f"the runs ran on different hardware: {'; '.join(groups)}")
    for r in runs:
        if r.preset == "cpu-tiny":
            problems.append(f"{_name(r)} ran the cpu-tiny test preset")
        if r.config:  # leaderboard logs hold no config: their validation set is their code's
            problems += _validation_problems(r)
    val_set_problem = _val_set_problem(runs)
    if val_set_problem:
        problems.append(val_set_problem)
    return problems


def _spread_too_small(losses, rounded):
    """Whether the losses' spread is too small for a t-test at the precision the logs hold them: none at all,
    or below one rounding step where any loss is rounded to 4 decimals (ROUNDED_LOSS_STEP)."""
    std = statistics.stdev(losses)
    return std == 0 or (rounded and std < ROUNDED_LOSS_STEP)


def run_stats(runs, target=TARGET_VAL_LOSS):
    """Mean, std and the one-sided p-value (mean < target) of the final val losses, and whether the runs qualify.

    runs: logs (load_runs), grouped into runs here (group_runs). Refuses logs of one run that cannot both
    count, two runs of one seed and logs of different programs (LogError)."""
    grouped = group_runs(runs)
    check_same_program(runs)
    check_independent(grouped)
    done = [r for r in grouped if r.status == STATUS_COMPLETED]
    missed = [r for r in grouped if counts_as_missed(r)]
    losses = [r.final_val_loss for r in done]
    times = [r.train_time_s for r in done]
    timed = None not in times  # llm.c's logs record no train time
    rounded = any(r.final_loss_rounded for r in done)
    counted = [r for r in grouped if _counted(r)]
    result = dict(n=len(counted), completed=len(done), failed=len(missed), excluded=len(runs) - len(counted),
                  target=target, mean_val_loss=None, std_val_loss=None, p_value=None, mean_train_time_s=None,
                  std_train_time_s=None, loss_precision="4 decimals" if rounded else "full precision",
                  spread_too_small=False, problems=setup_problems(runs), qualifies=False)
    if done:
        result["mean_val_loss"] = statistics.fmean(losses)
        result["mean_train_time_s"] = statistics.fmean(times) if timed else None
    if len(done) >= 2:
        result["std_val_loss"] = statistics.stdev(losses)
        result["std_train_time_s"] = statistics.stdev(times) if timed else None
        if not missed:  # a missed run has no val loss to test: a p-value without it would flatter the rest
            if _spread_too_small(losses, rounded):
                result["spread_too_small"] = True
            else:
                t = (result["mean_val_loss"] - target) / (result["std_val_loss"] / math.sqrt(len(done)))
                result["p_value"] = student_t_cdf(t, len(done) - 1)
    result["qualifies"] = (result["p_value"] is not None and result["p_value"] < SIGNIFICANCE
                           and not result["problems"])
    return result


def stats_sentence(s):
    if s["failed"]:
        return (f"The {s['n']} runs do not qualify: {s['failed']} of them did not complete, and a run that did not "
                f"complete counts as missing the target.")
    if s["completed"] < 2:
        return f"{s['completed']} completed run(s): at least 2 are needed for a p-value, so these runs do not qualify."
    mean, target = s["mean_val_loss"], s["target"]
    if s["spread_too_small"]:
        spread = (f"the spread of their val losses (std {s['std_val_loss']:.2g}) is too small to test at the logs' "
                  f"precision ({s['loss_precision']})")
        return (f"The {s['n']} runs do not qualify: {'; '.join(s['problems'] + [spread])} (mean val loss "
                f"{mean:.4f}, no p-value).")
    relation = "below" if mean < target else "above" if mean > target else "equal to"
    measured = f"mean val loss {mean:.4f} is {relation} {target} with p = {s['p_value']:.4g}"
    if s["problems"]:
        return f"The {s['n']} runs do not qualify: {'; '.join(s['problems'])} ({measured})."
    verdict = "qualify" if s["qualifies"] else "do not qualify"
    return f"The {s['n']} runs {verdict}: {measured} (the leaderboard needs p < {SIGNIFICANCE})."


def compare_runs(baseline, candidate):
    """Welch's t-test on the train time (candidate - baseline), and the val loss difference. baseline and
    candidate: logs, each side a set of its own (one program, one seed per run)."""
    check_distinct(baseline + candidate)  # a run in both sets would count on both sides
    baseline_stats, candidate_stats = run_stats(baseline), run_stats(candidate)
    b, c = group_runs(baseline), group_runs(candidate)
    missed = [r for r in b + c if r.status != STATUS_COMPLETED]
    if missed:
        listed = "; ".join(f"{_name(r)} did not complete ({r.status_text})" for r in missed)
        raise LogError(f"cannot compare: {listed} (leaving a run out would bias the comparison)")
    if len(b) < 2 or len(c) < 2:
        raise LogError("compare needs at least 2 completed runs on each side")
    untimed = [_name(r) for r in b + c if r.train_time_s is None]
    if untimed:
        raise LogError(f"compare needs train times, and {', '.join(untimed)} record(s) none")
    bt, ct = [r.train_time_s for r in b], [r.train_time_s for r in c]
    va, vb = statistics.variance(bt) / len(bt), statistics.variance(ct) / len(ct)
    diff = statistics.fmean(ct) - statistics.fmean(bt)
    se = math.sqrt(va + vb)
    df = (va + vb) ** 2 / ((va ** 2 / (len(bt) - 1)) + (vb ** 2 / (len(ct) - 1))) if se > 0 else len(bt) + len(ct) - 2
    t = diff / se if se > 0 else None
    half = student_t_quantile(0.975, df) * se
    loss_diff = statistics.fmean(r.final_val_loss for r in c) - statistics.fmean(r.final_val_loss for r in b)
    return dict(time_diff_s=diff, time_ci95_s=(diff - half, diff + half), time_t=t, time_df=df,
                time_p_value=2 * student_t_cdf(-abs(t), df) if t is not None else None, val_loss_diff=loss_diff,
                baseline=baseline_stats, candidate=candidate_stats)


# ----------------------------------------------------------------------------- commands

def _fmt(value, spec):
    return "-" if value is None else format(value, spec)


def cmd_summary(args):
    runs = load_runs(args.logs)
    rows = [("file", "date", "hardware", "steps", "val_loss", "train_time", "step_avg", "status")]
    for r in runs:
        rows.append((os.path.relpath(r.path), r.date, r.hardware, str(r.total_steps), _fmt(r.final_val_loss, ".4f"),
                     _fmt(r.train_time_s, ".1f") + ("s" if r.train_time_s is not None else ""),
                     _fmt(r.step_avg_ms, ".2f") + ("ms" if r.step_avg_ms is not None else ""),
                     r.status + (f" ({r.reason})" if r.reason else "")))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return 0


def _print_how_runs_count(runs):
    """For grouped runs: the logs that do not count on their own, the runs that count as misses, and the runs
    that completed though their log ends in a failure."""
    for r in runs:
        for earlier in r.earlier_logs:
            print(f"not counted on its own: {_name(earlier)} ({earlier.status_text}), an earlier log of the run "
                  f"that {_name(r)} continues")
        if counts_as_missed(r):
            print(f"counted as missing the target: {_name(r)} ({r.status_text})")
        elif not _counted(r):
            print(f"not counted: {_name(r)} ({r.status_text}), a log without a run id: its resumed log carries the "
                  f"run on")
        elif r.reason:
            print(f"counted as completed: {_name(r)} (its final val loss was logged, {r.reason})")


def cmd_stats(args):
    runs = load_runs(args.logs)
    s = run_stats(runs, args.target)
    if args.json:
        print(json.dumps(s, indent=2))
        return 0
    _print_how_runs_count(group_runs(runs))
    for problem in s["problems"]:
        print(f"problem: {problem}")
    print(f"runs: {s['n']}" + (f" in {s['n'] + s['excluded']} logs" if s["excluded"] else "")
          + (f" ({s['failed']} did not complete)" if s["failed"] else ""))
    print(f"val loss of the completed runs: mean {_fmt(s['mean_val_loss'], '.4f')}, "
          f"std {_fmt(s['std_val_loss'], '.4f')}")
    print(f"p-value (mean < {s['target']}): {_fmt(s['p_value'], '.4g')}")
    print(f"train time: mean {_fmt(s['mean_train_time_s'], '.2f')} s, std {_fmt(s['std_train_time_s'], '.2f')} s")
    print(stats_sentence(s))
    return 0


def cmd_compare(args):
    baseline, candidate = load_runs([args.baseline]), load_runs([args.candidate])
    result = compare_runs(baseline, candidate)
    _print_how_runs_count(group_runs(baseline) + group_runs(candidate))
    low, high = result["time_ci95_s"]
    for name in ("baseline", "candidate"):
        s = result[name]
        print(f"{name:>9}: {s['n']} runs, val loss {s['mean_val_loss']:.4f} ± {s['std_val_loss']:.4f}, "
              f"train time {s['mean_train_time_s']:.2f} ± {s['std_train_time_s']:.2f} s, "
              f"p = {_fmt(s['p_value'], '.4g')}")
    print(f"train time difference (candidate - baseline): {result['time_diff_s']:+.2f} s, "
          f"95% CI [{low:+.2f}, {high:+.2f}] s (Welch's t = {_fmt(result['time_t'], '.3f')}, "
          f"df = {result['time_df']:.1f}, p = {_fmt(result['time_p_value'], '.4g')})")
    print(f"val loss difference (candidate - baseline): {result['val_loss_diff']:+.4f}")
    return 0


def plot_runs(runs, out_path, target=TARGET_VAL_LOSS):
    """Saves val loss against train time and against step; returns the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_time, by_step) = plt.subplots(1, 2, figsize=(13, 5))
    for r in runs:
        points = [p for p in r.val_points if p[0] > 0] or r.val_points
        if not points:
            continue
        label = os.path.basename(r.path) + ("" if r.status == "completed" else f" ({r.status})")
        if points[0][2] is not None:  # llm.c's logs record no time
            by_time.plot([p[2] / 1000 for p in points], [p[1] for p in points], marker=".", label=label)
        by_step.plot([p[0] for p in points], [p[1] for p in points], marker=".", label=label)
    for ax, xlabel in ((by_time, "train time (s)"), (by_step, "step")):
        ax.axhline(target, color="black", linestyle="--", linewidth=1, label=f"target {target}")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("val loss")
        ax.grid(alpha=0.3)
    by_time.set_title("val loss against train time")
    by_step.set_title("val loss against step")
    by_step.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)
    return fig


def cmd_plot(args):
    runs = load_runs(args.logs)
    plot_runs(runs, args.output, args.target)
    print(f"wrote {args.output}")
    return 0


def config_difference(run):
    """Fields of the run's config that differ from its preset's defaults in the current checkout."""
    if not run.config:
        return {}
    from config import PRESETS, Config

    defaults = dataclasses.asdict(dataclasses.replace(Config(), **PRESETS.get(run.preset or "speedrun", {})))
    return {k: (defaults.get(k), v) for k, v in run.config.items() if defaults.get(k) != v}


def unique_log_names(logs):
    """The file name of each log in one folder, in the logs' order: its own where no other log of the set has
    it, else prefixed with its folder's name (`a/log.txt` -> `a_log.txt`), numbered where that is taken too."""
    basenames = [os.path.basename(r.path) for r in logs]
    names = []
    for r, basename in zip(logs, basenames):
        if basenames.count(basename) > 1:
            basename = f"{os.path.basename(os.path.dirname(os.path.abspath(r.path)))}_{basename}"
        stem, extension = os.path.splitext(basename)
        name, number = basename, 2
        while name in names:
            name, number = f"{stem}_{number}{extension}", number + 1
        names.append(name)
    return names


def cmd_submit(args):
    logs = load_runs(args.logs)
    s = run_stats(logs, args.target)  # refuses two logs of one run, two runs of one seed, two programs
    runs = group_runs(logs)
    # --force overrides none of these: it submits runs that do not qualify, never runs that do not count
    problems = [f"{_name(r)} did not complete ({r.status_text})" for r in runs if r.status != STATUS_COMPLETED]
    if len(runs) < 2:
        problems.append(f"a record needs at least 2 runs, and {len(runs)} was given")
    if problems:
        print("refusing to submit:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    if not s["qualifies"]:
        if not args.force:
            print(f"refusing to submit: {stats_sentence(s)} Use --force to submit anyway.", file=sys.stderr)
            return 1
        print(f"warning: submitting runs that do not qualify: {stats_sentence(s)}", file=sys.stderr)
    name = re.sub(r"[^A-Za-z0-9_-]+", "", args.name)
    if not name:
        print("error: NAME must contain letters or digits", file=sys.stderr)
        return 2
    out_dir = os.path.join(args.records_dir, f"{datetime.now().strftime('%Y-%m-%d')}_{name}")
    if os.path.exists(out_dir):
        print(f"error: {out_dir} already exists", file=sys.stderr)
        return 2
    os.makedirs(out_dir)
    # one folder holds every log: two logs of one name (from two folders) must not overwrite each other
    copied_as = {}
    for r, copy_name in zip(logs, unique_log_names(logs)):
        shutil.copy2(r.path, os.path.join(out_dir, copy_name))
        copied_as[r.path] = copy_name
    plot_runs(logs, os.path.join(out_dir, "val_loss.png"), args.target)
    diff = config_difference(runs[0])
    lines = [f"# {args.name}", "", f"{s['n']} runs on {'; '.join(sorted({r.hardware for r in logs}))}.", "",
             "| statistic | value |", "| --- | --- |",
             f"| mean val loss | {s['mean_val_loss']:.4f} |", f"| std val loss | {_fmt(s['std_val_loss'], '.4f')} |",
             f"| p-value (mean < {s['target']}) | {_fmt(s['p_value'], '.4g')} |",
             f"| mean train time | {_fmt(s['mean_train_time_s'], '.2f')} s |",
             f"| std train time | {_fmt(s['std_train_time_s'], '.2f')} s |", "", stats_sentence(s), "",
             "## Config difference from the default preset", ""]
    if diff:
        lines += ["| field | default | this record |", "| --- | --- | --- |"]
        lines += [f"| {k} | {d!r} | {v!r} |" for k, (d, v) in sorted(diff.items())]
    else:
        lines.append("None: the runs used the preset as it is." if runs[0].config else "Unknown: the logs hold no config.")
    lines += ["", "## Runs", "", "| log | val loss | train time |", "| --- | --- | --- |"]
    lines += [f"| {', '.join(copied_as[log.path] for log in r.logs)} | {r.final_val_loss:.4f} | "
              f"{_fmt(r.train_time_s, '.2f')} s |" for r in runs]
    lines += ["", "![val loss](val_loss.png)", ""]
    with open(os.path.join(out_dir, "README.md"), "w") as f:
        f.write("\n".join(lines))
    print(f"wrote {out_dir}")
    return 0


def cmd_verify(args):
    run = parse_log(args.log)
    problems = []
    if not run.sources:
        problems.append("the log embeds no source code")
    for path, source in sorted(run.sources.items()):
        current = os.path.join(REPO_ROOT, path)
        if not os.path.exists(current):
            problems.append(f"{path}: embedded in the log, missing from this checkout")
        elif open(current, encoding="utf-8").read().rstrip("\n") != source.rstrip("\n"):
            problems.append(f"{path}: differs from this checkout")
    problems += [f"malformed step line: {line}" for line in run.malformed]
    if not run.val_points:
        problems.append("no val_loss lines")
    if run.status != "completed":
        problems.append(f"run status: {run.status_text}")
    if problems:
        print(f"{args.log}: {len(problems)} problem(s)\n  " + "\n  ".join(problems))
        return 1
    print(f"{args.log}: ok ({len(run.sources)} embedded file(s) match this checkout, final val loss "
          f"{run.final_val_loss:.4f})")
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("summary", help="one row per run")
    p.add_argument("logs", nargs="+")
    p.set_defaults(func=cmd_summary)
    p = sub.add_parser("stats", help="mean, std and p-value of the final val loss")
    p.add_argument("logs", nargs="+")
    p.add_argument("--target", type=float, default=TARGET_VAL_LOSS)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_stats)
    p = sub.add_parser("compare", help="a candidate set of runs against a baseline set")
    p.add_argument("baseline")
    p.add_argument("candidate")
    p.set_defaults(func=cmd_compare)
    p = sub.add_parser("plot", help="val loss against train time and step")
    p.add_argument("logs", nargs="+")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--target", type=float, default=TARGET_VAL_LOSS)
    p.set_defaults(func=cmd_plot)
    p = sub.add_parser("submit", help="make records/<date>_<NAME>/ from the logs of a record attempt")
    p.add_argument("name")
    p.add_argument("logs", nargs="+")
    p.add_argument("--target", type=float, default=TARGET_VAL_LOSS)
    p.add_argument("--records-dir", default=os.path.join(REPO_ROOT, "records"))
    p.add_argument("--force", action="store_true",
                   help="submit runs that do not qualify (p >= 0.01, mixed hardware, another validation set), flagged")
    p.set_defaults(func=cmd_submit)
    p = sub.add_parser("verify", help="check a log against this checkout")
    p.add_argument("log")
    p.set_defaults(func=cmd_verify)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except LogError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
