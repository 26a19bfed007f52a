"""Read run logs and answer what a person submitting a record must know.

    python scripts/records.py summary records/
    python scripts/records.py stats LOGS... [--target 3.28] [--json]
    python scripts/records.py compare BASELINE_DIR CANDIDATE_DIR
    python scripts/records.py plot LOGS... -o out.png
    python scripts/records.py submit NAME LOGS... [--force]
    python scripts/records.py verify LOG

Reads this project's record logs and the public leaderboard's (KellerJordan/modded-nanogpt)
logs alike: both carry `step:N/M val_loss:X train_time:Tms step_avg:Sms` lines. A run
without a final val line is incomplete: reported, never counted.
"""
import argparse
import dataclasses
import json
import math
import os
import re
import shutil
import statistics
import sys
from datetime import datetime

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET_VAL_LOSS = 3.28
SIGNIFICANCE = 0.01  # the leaderboard's rule: p < 0.01 that the mean val loss is below the target

STEP_LINE = re.compile(r"^step:(\d+)/(\d+) (val_loss|train_loss):(\S+) train_time:(\d+(?:\.\d+)?)ms "
                       r"step_avg:(\S+?)ms\s*$")
SECTION = re.compile(r"^==== (.+) ====$")
RULE = re.compile(r"^={20,}$")
GPU_LINE = re.compile(r"^\|\s+\d+\s+(NVIDIA [^|]*?)\s{2,}\S*\s*\|")


@dataclasses.dataclass
class Run:
    path: str
    date: str = "unknown"
    hardware: str = "unknown"
    total_steps: int = 0
    val_points: list = dataclasses.field(default_factory=list)  # (step, val_loss, train_time_ms)
    status: str = "incomplete"  # completed, failed, interrupted, incomplete
    reason: str = ""
    sources: dict = dataclasses.field(default_factory=dict)  # embedded file path -> source text
    config: dict = dataclasses.field(default_factory=dict)
    preset: str = ""
    malformed: list = dataclasses.field(default_factory=list)  # step-like lines that do not parse

    @property
    def final(self):
        """The val point at the last step, or None."""
        if self.val_points and self.val_points[-1][0] == self.total_steps:
            return self.val_points[-1]
        return None

    @property
    def final_val_loss(self):
        return self.final[1] if self.final else None

    @property
    def train_time_s(self):
        return self.final[2] / 1000 if self.final else None

    @property
    def step_avg_ms(self):
        return self.final[2] / self.total_steps if self.final and self.total_steps else None


class LogError(ValueError):
    pass


def _parse_our_sections(lines, run):
    title, body = None, []
    sections = {}
    for line in lines:
        match = SECTION.match(line)
        if match:
            if title:
                sections[title] = "\n".join(body)
            title, body = match.group(1), []
        elif title:
            body.append(line)
    if title:
        sections[title] = "\n".join(body)
    for title, text in sections.items():
        if title.startswith("source: "):
            run.sources[title[len("source: "):]] = text.rstrip("\n") + "\n"
        elif title.startswith("config"):
            try:
                run.config = json.loads(text)
            except json.JSONDecodeError:
                pass
            preset = re.search(r"preset (\S+)\)", title)
            run.preset = preset.group(1) if preset else ""
        elif title == "hardware":
            run.hardware = _hardware_summary(text.splitlines()) or text.strip().splitlines()[0]


def _hardware_summary(lines):
    gpus = [m.group(1).strip() for m in map(GPU_LINE.match, lines) if m]
    if gpus:
        names = sorted(set(gpus))
        return ", ".join(f"{gpus.count(n)}x {n}" for n in names)
    for line in lines:
        if line.startswith("CPU: "):
            return line
    return None


def parse_log(path):
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise LogError(f"cannot read {path}: {e.strerror}") from None
    run = Run(path=path)
    name_date = re.match(r"(\d{4}-\d{2}-\d{2})_(\d{2})-(\d{2})-(\d{2})_", os.path.basename(path))
    if name_date:
        run.date = f"{name_date.group(1)} {name_date.group(2)}:{name_date.group(3)}"
    if any(SECTION.match(line) for line in lines[:5]):  # this project's log
        _parse_our_sections(lines, run)
    elif lines and RULE.match(lines[0]):  # modded-nanogpt: code between the first two rules
        end = next((i for i in range(1, len(lines)) if RULE.match(lines[i])), None)
        if end is not None:
            run.sources["train_gpt.py"] = "\n".join(lines[1:end]) + "\n"
    if run.hardware == "unknown":
        run.hardware = _hardware_summary(lines) or "unknown"
    if run.date == "unknown":
        for line in lines:
            match = re.match(r"^\w{3} (\w{3} +\d+ \d\d:\d\d):\d\d (\d{4})\s*$", line)
            if match:
                run.date = datetime.strptime(f"{match.group(1)} {match.group(2)}", "%b %d %H:%M %Y").strftime(
                    "%Y-%m-%d %H:%M")
                break
    status = None
    for line in lines:
        if line.startswith("step:"):
            match = STEP_LINE.match(line)
            if not match:
                run.malformed.append(line)
                continue
            step, total, kind, value, time_ms = match.groups()[:5]
            run.total_steps = int(total)
            if kind == "val_loss":
                run.val_points.append((int(step), float(value), float(time_ms)))
        elif line.startswith("status: "):
            status = line[len("status: "):]
    if status is not None:
        kind, _, reason = status.partition(": ")
        run.status, run.reason = kind.split()[0], reason
    elif run.final:
        run.status = "completed"  # leaderboard logs have no status line; a final val line means it finished
    if run.status == "completed" and not run.final:
        run.status, run.reason = "incomplete", "no val_loss line at the last step"
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


def run_stats(runs, target=TARGET_VAL_LOSS):
    done = [r for r in runs if r.status == "completed"]
    losses = [r.final_val_loss for r in done]
    times = [r.train_time_s for r in done]
    n = len(done)
    result = dict(n=n, excluded=len(runs) - n, target=target, mean_val_loss=None, std_val_loss=None, p_value=None,
                  mean_train_time_s=None, std_train_time_s=None, qualifies=False)
    if n:
        result["mean_val_loss"] = statistics.fmean(losses)
        result["mean_train_time_s"] = statistics.fmean(times)
    if n >= 2:
        result["std_val_loss"] = statistics.stdev(losses)
        result["std_train_time_s"] = statistics.stdev(times)
        if result["std_val_loss"] > 0:
            t = (result["mean_val_loss"] - target) / (result["std_val_loss"] / math.sqrt(n))
            result["p_value"] = student_t_cdf(t, n - 1)
        else:
            result["p_value"] = 0.0 if result["mean_val_loss"] < target else 1.0
        result["qualifies"] = result["p_value"] < SIGNIFICANCE
    return result


def stats_sentence(s):
    if s["n"] < 2:
        return f"{s['n']} completed run(s): at least 2 are needed for a p-value, so these runs do not qualify."
    verdict = "qualify" if s["qualifies"] else "do not qualify"
    return (f"The {s['n']} runs {verdict}: mean val loss {s['mean_val_loss']:.4f} is below {s['target']} with "
            f"p = {s['p_value']:.4g} (the leaderboard needs p < {SIGNIFICANCE}).")


def compare_runs(baseline, candidate):
    b = [r for r in baseline if r.status == "completed"]
    c = [r for r in candidate if r.status == "completed"]
    if len(b) < 2 or len(c) < 2:
        raise LogError("compare needs at least 2 completed runs on each side")
    bt, ct = [r.train_time_s for r in b], [r.train_time_s for r in c]
    va, vb = statistics.variance(bt) / len(bt), statistics.variance(ct) / len(ct)
    diff = statistics.fmean(ct) - statistics.fmean(bt)
    se = math.sqrt(va + vb)
    df = (va + vb) ** 2 / ((va ** 2 / (len(bt) - 1)) + (vb ** 2 / (len(ct) - 1))) if se > 0 else len(bt) + len(ct) - 2
    half = student_t_quantile(0.975, df) * se
    loss_diff = statistics.fmean(r.final_val_loss for r in c) - statistics.fmean(r.final_val_loss for r in b)
    return dict(time_diff_s=diff, time_ci95_s=(diff - half, diff + half), val_loss_diff=loss_diff,
                baseline=run_stats(b), candidate=run_stats(c))


# ----------------------------------------------------------------------------- commands

def _fmt(value, spec):
    return "-" if value is None else format(value, spec)


def cmd_summary(args):
    runs = load_runs(args.logs)
    rows = [("file", "date", "hardware", "steps", "val_loss", "train_time", "step_avg", "status")]
    for r in runs:
        rows.append((os.path.relpath(r.path), r.date, r.hardware, str(r.total_steps), _fmt(r.final_val_loss, ".4f"),
                     _fmt(r.train_time_s, ".1f") + ("s" if r.final else ""), _fmt(r.step_avg_ms, ".2f") +
                     ("ms" if r.final else ""), r.status + (f" ({r.reason})" if r.reason else "")))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return 0


def cmd_stats(args):
    runs = load_runs(args.logs)
    s = run_stats(runs, args.target)
    if args.json:
        print(json.dumps(s, indent=2))
        return 0
    for r in runs:
        if r.status != "completed":
            print(f"not counted: {os.path.relpath(r.path)} ({r.status}{': ' + r.reason if r.reason else ''})")
    print(f"runs: {s['n']}")
    print(f"val loss: mean {_fmt(s['mean_val_loss'], '.4f')}, std {_fmt(s['std_val_loss'], '.4f')}")
    print(f"p-value (mean < {s['target']}): {_fmt(s['p_value'], '.4g')}")
    print(f"train time: mean {_fmt(s['mean_train_time_s'], '.2f')} s, std {_fmt(s['std_train_time_s'], '.2f')} s")
    print(stats_sentence(s))
    return 0


def cmd_compare(args):
    result = compare_runs(load_runs([args.baseline]), load_runs([args.candidate]))
    low, high = result["time_ci95_s"]
    for name in ("baseline", "candidate"):
        s = result[name]
        print(f"{name:>9}: {s['n']} runs, val loss {s['mean_val_loss']:.4f} ± {s['std_val_loss']:.4f}, "
              f"train time {s['mean_train_time_s']:.2f} ± {s['std_train_time_s']:.2f} s, p = {s['p_value']:.4g}")
    print(f"train time difference (candidate - baseline): {result['time_diff_s']:+.2f} s, "
          f"95% CI [{low:+.2f}, {high:+.2f}] s")
    print(f"val loss difference (candidate - baseline): {result['val_loss_diff']:+.4f}")
    return 0


def plot_runs(runs, out_path, target=TARGET_VAL_LOSS):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_time, by_step) = plt.subplots(1, 2, figsize=(13, 5))
    for r in runs:
        points = [p for p in r.val_points if p[0] > 0] or r.val_points
        if not points:
            continue
        label = os.path.basename(r.path) + ("" if r.status == "completed" else f" ({r.status})")
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


def cmd_plot(args):
    runs = load_runs(args.logs)
    plot_runs(runs, args.output, args.target)
    print(f"wrote {args.output}")
    return 0


def config_difference(run):
    """Fields of the run's config that differ from its preset's defaults in the current checkout."""
    sys.path.insert(0, REPO_ROOT)
    from train_gpt import PRESETS, Config

    if not run.config:
        return {}
    defaults = dataclasses.asdict(dataclasses.replace(Config(), **PRESETS.get(run.preset or "speedrun", {})))
    return {k: (defaults.get(k), v) for k, v in run.config.items() if defaults.get(k) != v}


def cmd_submit(args):
    runs = load_runs(args.logs)
    problems = [f"{os.path.relpath(r.path)} did not complete ({r.status}{': ' + r.reason if r.reason else ''})"
                for r in runs if r.status != "completed"]
    if len({json.dumps(r.sources, sort_keys=True) for r in runs}) > 1:
        problems.append("the logs embed different code: a record's runs must all run the same code")
    if problems:
        print("refusing to submit:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    s = run_stats(runs, args.target)
    if not s["qualifies"] and not args.force:
        print(f"refusing to submit: {stats_sentence(s)} Use --force to submit anyway.", file=sys.stderr)
        return 1
    name = re.sub(r"[^A-Za-z0-9_-]+", "", args.name)
    if not name:
        print("error: NAME must contain letters or digits", file=sys.stderr)
        return 2
    out_dir = os.path.join(args.records_dir, f"{datetime.now().strftime('%Y-%m-%d')}_{name}")
    if os.path.exists(out_dir):
        print(f"error: {out_dir} already exists", file=sys.stderr)
        return 2
    os.makedirs(out_dir)
    for r in runs:
        shutil.copy2(r.path, out_dir)
    plot_runs(runs, os.path.join(out_dir, "val_loss.png"), args.target)
    diff = config_difference(runs[0])
    lines = [f"# {args.name}", "", f"{s['n']} runs on {runs[0].hardware}.", "",
             "| statistic | value |", "| --- | --- |",
             f"| mean val loss | {s['mean_val_loss']:.4f} |", f"| std val loss | {_fmt(s['std_val_loss'], '.4f')} |",
             f"| p-value (mean < {s['target']}) | {_fmt(s['p_value'], '.4g')} |",
             f"| mean train time | {s['mean_train_time_s']:.2f} s |",
             f"| std train time | {_fmt(s['std_train_time_s'], '.2f')} s |", "", stats_sentence(s), "",
             "## Config difference from the default preset", ""]
    if diff:
        lines += ["| field | default | this record |", "| --- | --- | --- |"]
        lines += [f"| {k} | {d!r} | {v!r} |" for k, (d, v) in sorted(diff.items())]
    else:
        lines.append("None: the runs used the preset as it is." if runs[0].config else "Unknown: the logs hold no config.")
    lines += ["", "## Runs", "", "| log | val loss | train time |", "| --- | --- | --- |"]
    lines += [f"| {os.path.basename(r.path)} | {r.final_val_loss:.4f} | {r.train_time_s:.2f} s |" for r in runs]
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
        problems.append(f"run status: {run.status}{': ' + run.reason if run.reason else ''}")
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
    p.add_argument("--force", action="store_true", help="submit even if p >= 0.01")
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
