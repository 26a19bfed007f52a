"""Trains a preset, then again with each record technique switched off, and tables the final val losses.

    python scripts/ablate.py --preset cpu-tiny --train-files 'data/pydocs/pydocs_train_*.bin' \\
        --val-files 'data/pydocs/pydocs_val_*.bin'
    python scripts/ablate.py ... --only smear,windows --out docs/ablation.md
    python scripts/ablate.py ... -- --steps 32     # flags after -- go to every run

Every run is `train_gpt.py` with the preset and one switch: the same data, seed and steps, so
the difference in final val loss is that technique's effect at this scale (one seed: small
differences are within run-to-run noise; see --seeds). The runs' logs stay in --records-dir.
"""
import argparse
import dataclasses
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from config import PRESETS, Config  # noqa: E402
from training import record_log  # noqa: E402

# Each technique of record #46 and the flags that switch it off (docs/RECORD46.md §10).
RECORD46_TECHNIQUES = {
    "smear": ("one-token look-back gate", ["--smear-gate", "false"]),
    "attn-gate": ("sparse attention gate", ["--attn-gate", "false"]),
    "merged-qkvo": ("merged QKVO weight (the same update; a speed technique)", ["--merged-qkvo", "false"]),
    "value-embeds": ("value embeddings", ["--value-embed-layers", ""]),
    "unet-skip": ("gated U-net skip", ["--unet-skips", ""]),
    "backout": ("backout", ["--backout-layer", ""]),
    "attention-free": ("layers without attention (all but the empty first)", ["--attention-free-layers", "0"]),
    "x0-mix-init": ("x/x0 mix starting at (1.1, 0)", ["--x0-mix-init", "1,0"]),
    "truncated-rope": ("half-truncated rotary, base 1024", ["--rope-truncated", "false", "--rope-base", "10000"]),
    "yarn": ("YaRN at window growth", ["--yarn", "false"]),
    "attn-scale": ("attention scale 0.1", ["--attn-scale", "0"]),
    "windows": ("short/long sliding windows", ["--window-stages", "", "--final-window", ""]),
    "sigmoid-softcap": ("sigmoid soft-cap", ["--softcap", "tanh"]),
    "uniform-init": ("uniform init", ["--hidden-init", "torch"]),
    "sum-loss": ("loss summed over tokens", ["--loss-reduction", "mean"]),
    "polar-express": ("Polar Express", ["--muon-orthogonalizer", "newton_schulz"]),
    "normuon": ("NorMuon second moment", ["--normuon-beta2", "0"]),
    "cautious-wd": ("cautious weight decay", ["--cautious-weight-decay", "false"]),
    "adam-every-2": ("Adam every second step", ["--adam-every", "1"]),
    "batch-stages": ("batch-size stages (constant 2x instead)", ["--batch-stages", "2,2,2"]),
    "lr-stages": ("LR stages", ["--lr-stages", ""]),
    "momentum-cooldown": ("momentum cooldown", ["--muon-momentum-cooldown-steps", "0"]),
    "bos-align": ("BOS-aligned rows", ["--bos-align", "false"]),
    "record-numerics": ("the record's bf16 roundings", ["--numerics", "float32"]),
}

# Each technique of the leaderboard's HEAD (docs/RECORD-HEAD.md) that a preset built on it (speedrun,
# cpu-tiny) can switch off with its flags alone; the layer numbers are cpu-tiny's.
HEAD_TECHNIQUES = {
    "smear": RECORD46_TECHNIQUES["smear"],
    "value-embeds": ("value embeddings (MUDD's final mix reads table 0: off with it)",
                     ["--value-embed-layers", "", "--mudd", "false", "--backout-layer", "5"]),
    "ve-gate": ("value-embedding gates", ["--value-embed-gate", "false"]),
    "ve-init": ("value embeddings N(0, 0.01^2) (N(0, 1) instead)", ["--value-embed-std", "1"]),
    "qkvo-lambdas": ("QKV and O scalars (#46's value mix instead, which takes the gates' place)",
                     ["--qkvo-lambdas", "false", "--value-embed-gate", "false"]),
    "paired-heads": ("paired-head attention", ["--paired-head-layers", ""]),
    "key-offset": ("partial key offset", ["--key-offset", "false"]),
    "xsa": ("learnable XSA", ["--xsa-layers", ""]),
    "dc-mha": ("DC-MHA (head-mixing local softmax)", ["--dc-layers", ""]),
    "gated-attn": ("attention output gates", ["--gated-attn-layers", ""]),
    "bigram": ("bigram hash embedding", ["--bigram-rows", "0"]),
    "mudd": ("MUDD dense connections (#46's backout instead)", ["--mudd", "false", "--backout-layer", "5"]),
    "mudd-gates": ("MUDD gate MLPs (learned constants instead)", ["--mudd-gates", "false"]),
    "unet-skip": ("gated U-net skip (MUDD's final mix reads it: off with it)",
                  ["--unet-skips", "", "--mudd", "false", "--backout-layer", "5"]),
    "uniform-o": ("uniform init of the output projection (zero instead)", ["--hidden-init", "uniform"]),
    "head-init": ("head N(0, 0.005^2) (zero, untied, instead)", ["--head-init-std", "0", "--tied-head-stages", "0"]),
    "tied-head": ("head tied to the embedding for two stages", ["--tied-head-stages", "0"]),
    "softcap": ("soft-cap 23 sigmoid((z + 5)/7.5) (#46's 30 sigmoid(z/7.5) instead)",
                ["--softcap-offset", "0", "--logit-softcap", "30"]),
    "mtp": ("multi-token prediction", ["--mtp-weight-stages", ""]),
    "prefix-loss": ("prefix-token loss", ["--prefix-weight-stages", ""]),
    "truncated-rope": ("half-truncated rotary, base 1024 (the key offset shifts its stationary half: off with it)",
                       ["--rope-truncated", "false", "--rope-base", "10000", "--key-offset", "false"]),
    "adjacent-rope": ("rotary on adjacent pairs (a permutation of dims; the key offset needs them: off with it)",
                      ["--rope-pairs", "halves", "--key-offset", "false"]),
    "yarn": RECORD46_TECHNIQUES["yarn"],
    "windows": RECORD46_TECHNIQUES["windows"],
    "doc-len-stages": ("documents cut to 224 tokens in stage 1 (512 throughout instead)",
                       ["--max-doc-len-stages", "512,512,512"]),
    "normuon": RECORD46_TECHNIQUES["normuon"],
    "adam-every-2": RECORD46_TECHNIQUES["adam-every-2"],
    "batch-stages": RECORD46_TECHNIQUES["batch-stages"],
    "stage-lr": ("LR 1 / 1.52 / 1.73 by stage (1 throughout instead)", ["--stage-lr", ""]),
    "momentum-cooldown": RECORD46_TECHNIQUES["momentum-cooldown"],
    "record-numerics": ("the record's roundings", ["--numerics", "float32"]),
}


def techniques(preset):
    """The technique table of a preset: HEAD's for the presets built on it, record #46's otherwise."""
    return HEAD_TECHNIQUES if preset.residual == "sublayer" else RECORD46_TECHNIQUES


def switched(flags):
    """The Config fields a technique's flags set, with their values."""
    fields = {f.name: f.type for f in dataclasses.fields(Config)}
    values = {}
    for flag, text in zip(flags[::2], flags[1::2]):
        name = flag[2:].replace("-", "_")
        values[name] = text.lower() == "true" if fields[name] is bool else fields[name](text)
    return values


def final_val_loss(log_path):
    lines = open(log_path, encoding="utf-8").read().rstrip().splitlines()
    status = record_log.parse_status_line(lines[-1]) if lines else None
    if status is None or status.kind != record_log.STATUS_COMPLETED:
        return None
    losses = [step.val_loss for step in map(record_log.parse_step_line, lines) if step and step.val_loss is not None]
    return losses[-1] if losses else None


def run(name, flags, common, records_dir, timeout_s, threads):
    """Final val loss of one run (None if it failed), and its wall time."""
    folder = os.path.join(records_dir, name)
    os.makedirs(folder, exist_ok=True)
    cmd = [sys.executable, os.path.join(REPO_ROOT, "train_gpt.py"), *common, *flags, "--records-dir", folder,
           "--save-final", "false", "--progress", "off"]
    start = time.time()
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    result = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout_s, env=env)
    logs = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".txt"))
    loss = final_val_loss(logs[-1]) if logs else None
    if loss is None:
        print(f"  {name}: failed (exit {result.returncode}): {(result.stderr or result.stdout).strip()[-300:]}",
              file=sys.stderr)
    return loss, time.time() - start


def markdown(preset, rows, baseline):
    lines = [f"| technique switched off ({preset}) | flags | final val loss | difference |", "|---|---|---|---|"]
    for name, description, flags, loss in rows:
        shown = " ".join(f"`{f}`" if f else '`""`' for f in flags) or "(the preset)"
        if loss is None:
            lines.append(f"| {description} | {shown} | failed | |")
        elif name == "baseline":
            lines.append(f"| none: {description} | {shown} | {loss:.4f} | |")
        else:
            lines.append(f"| {description} | {shown} | {loss:.4f} | {loss - baseline:+.4f} |")
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    passthrough = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="cpu-tiny", choices=sorted(PRESETS))
    parser.add_argument("--train-files", required=True)
    parser.add_argument("--val-files", required=True)
    parser.add_argument("--only", default="", help="comma-separated techniques (default all): "
                        f"for speedrun and cpu-tiny {', '.join(HEAD_TECHNIQUES)}; for record46 "
                        f"{', '.join(RECORD46_TECHNIQUES)}")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--records-dir", default="", help="where the runs' logs go (default: a temporary folder)")
    parser.add_argument("--out", default="", help="also write the table (markdown) to this file")
    parser.add_argument("--timeout-s", type=int, default=3600, help="per run")
    parser.add_argument("--baseline-log", default="",
                        help="the record log of a finished run of the preset with the same flags: reused, not rerun")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs at once, each with its share of the CPU cores as threads")
    args = parser.parse_args(argv)
    preset = dataclasses.replace(Config(), **PRESETS[args.preset])
    table = techniques(preset)
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(table)
    unknown = [n for n in names if n not in table]
    if unknown:
        parser.error(f"unknown technique(s) {', '.join(unknown)} of {args.preset}; known: {', '.join(table)}")
    records_dir = args.records_dir or tempfile.mkdtemp(prefix="ablate_")
    common = ["--preset", args.preset, "--train-files", args.train_files, "--val-files", args.val_files,
              "--device", args.device, *passthrough]

    variants = [] if args.baseline_log else [("baseline", f"the {args.preset} recipe", [])]
    for name in names:
        description, flags = table[name]
        if dataclasses.replace(preset, **switched(flags)) == preset:
            print(f"{name}: skipped, already off in {args.preset}", flush=True)
            continue
        variants.append((name, description, flags))
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    print(f"{len(variants)} runs of {args.preset}, {args.jobs} at a time; logs in {records_dir}", flush=True)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(run, name, flags, common, records_dir, args.timeout_s, threads): name
                   for name, _, flags in variants}
        losses = {}
        if args.baseline_log:
            losses["baseline"] = final_val_loss(args.baseline_log)
            print(f"baseline: {losses['baseline']} (from {args.baseline_log})", flush=True)
        for future in as_completed(futures):
            loss_off, seconds = future.result()
            losses[futures[future]] = loss_off
            print(f"{futures[future]}: {'failed' if loss_off is None else f'{loss_off:.4f}'} ({seconds:.0f} s)",
                  flush=True)
    if args.baseline_log:
        variants.insert(0, ("baseline", f"the {args.preset} recipe", []))
    rows = [(name, description, flags, losses[name]) for name, description, flags in variants]
    loss = losses["baseline"]
    if loss is None:
        print("error: the baseline run failed; nothing to compare against", file=sys.stderr)
        return 1
    text = markdown(args.preset, rows, loss)
    print("\n" + text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    return 0 if all(r[3] is not None for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
