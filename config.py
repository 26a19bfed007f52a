"""The run's configuration: every hyperparameter and setting in one dataclass, the presets
that name published records, and the command line that sets any field (`--field-name value`).

Kept apart from train_gpt.py so that scripts (preflight, benchmarks, data download, records)
read the same config without importing the run.
"""
import argparse
import dataclasses
from dataclasses import dataclass


@dataclass
class Config:
    """Defaults are the `record11` preset: record #11 of KellerJordan/modded-nanogpt (2024-11-10)."""
    # data
    train_files: str = "data/fineweb10B/fineweb_train_*.bin"
    val_files: str = "data/fineweb10B/fineweb_val_*.bin"
    val_tokens: int = 10_485_760  # the leaderboard's fixed validation set size
    bos_align: bool = False  # start every training row at a document start (see data/loader.py)
    max_doc_len: int = 0  # with bos_align, cut documents to this many tokens (0: no limit)
    data_wrap: bool = False  # start over when the train files run out, instead of failing
    # batch: global tokens per optimizer step, and tokens per forward pass on one rank
    batch_tokens: int = 8 * 64 * 1024
    micro_batch_tokens: str = "auto"  # tokens per forward pass, or auto: the largest that fits (model/memory.py)
    seq_len: int = 1024
    # model
    num_layers: int = 12
    num_heads: int = 6
    model_dim: int = 768
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 128
    logit_softcap: float = 30.0
    doc_masking: bool = True  # no token attends across an <|endoftext|> boundary
    # optimization
    optimizer: str = "muon"  # muon: Muon for hidden matrices + AdamW for the rest; adamw: AdamW for all
    steps: int = 3000
    embed_lr: float = 0.6
    head_lr: float = 0.008
    scalar_lr: float = 0.04
    muon_lr: float = 0.04
    muon_ns_steps: int = 5
    muon_momentum_start: float = 0.85
    muon_momentum_end: float = 0.95
    muon_momentum_warmup_steps: int = 300
    adamw_matrix_lr: float = 0.0018  # hidden matrices under --optimizer adamw
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 0
    cooldown_frac: float = 0.3
    lr_floor: float = 0.0
    # evaluation, logging, runtime
    val_every: int = 125  # 0: validate only at the end
    train_log_every: int = 1
    untimed_warmup_steps: int = 10  # compile and warm up, then restore the initial state
    seed: int = 0
    records_dir: str = "records"
    wandb_project: str = ""  # mirror the run to Weights & Biases under this project ("" = off)
    checkpoint_dir: str = "checkpoints"
    save_every: int = 0  # also write a checkpoint every N steps (0: only at the end)
    save_final: bool = True  # write a checkpoint when the run ends
    keep_last: int = 0  # keep only this run's newest K checkpoints (0: keep all)
    resume: str = ""  # continue from a checkpoint file, or "latest" in --checkpoint-dir
    allow_code_change: bool = False  # resume a checkpoint written by different code, on purpose
    collective_timeout_s: int = 600  # a collective that waits longer (a dead rank) fails the run
    progress: str = "auto"  # live progress line on stderr: auto (when it is a terminal), on, off
    device: str = "auto"  # auto, cuda, cpu
    dtype: str = "auto"  # auto, bfloat16, float32 (autocast dtype; weights stay float32)
    compile: str = "auto"  # auto (on for CUDA), on, off
    attention: str = "auto"  # auto (flex on CUDA, sdpa elsewhere), flex, sdpa


PRESETS = {
    # Record #11 exactly. `speedrun` is the newest record this project implements: #11 until
    # record #46's techniques land (issue 10), each as a field of Config.
    "record11": {},
    "speedrun": {},
    # A model small enough to train on two CPU cores in a couple of minutes.
    "cpu-tiny": dict(
        val_tokens=16_384, batch_tokens=2048, seq_len=256,
        num_layers=4, num_heads=4, model_dim=128, steps=60, cooldown_frac=0.4,
        embed_lr=0.3, head_lr=0.01, scalar_lr=0.04, muon_lr=0.04, adamw_matrix_lr=0.003,
        muon_momentum_warmup_steps=20, val_every=20, train_log_every=10, untimed_warmup_steps=0,
    ),
}


class ConfigError(ValueError):
    """A setting that cannot work; the message says what to change."""


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        raise ConfigError(f"{message} (see --help)")


def _parse_bool(text):
    if text.lower() in ("true", "1", "yes", "on"):
        return True
    if text.lower() in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got '{text}'")


def parse_config(argv):
    parser = _OneLineParser(description="Train a GPT on FineWeb token shards and write a record log.",
                            argument_default=argparse.SUPPRESS)
    parser.add_argument("--preset", default="speedrun", help=f"one of: {', '.join(PRESETS)}")
    for field in dataclasses.fields(Config):
        parser.add_argument("--" + field.name.replace("_", "-"), type=_parse_bool if field.type is bool else field.type,
                            metavar=field.type.__name__.upper(), help=f"default {field.default!r} before the preset")
    args = vars(parser.parse_args(argv))
    preset = args.pop("preset")
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset '{preset}': use one of {', '.join(PRESETS)}")
    return preset, dataclasses.replace(Config(), **{**PRESETS[preset], **args})
