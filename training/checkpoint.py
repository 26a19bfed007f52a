"""Checkpoints: everything a run needs to continue exactly, written so a kill never corrupts one.

One file per checkpoint, `step_NNNNNN.pt` in the checkpoint folder, written by rank 0 to a
temporary name and renamed into place. It holds the model, the AdamW state (the same on
every rank), the Muon momentum of every matrix gathered from the rank that owns it, and the
state of the sharded optimizers (NorMuon, DistAdam) gathered whole (so a run can resume on
any number of processes), the loader position, RNG states, the step,
the accumulated train time, the config, a hash of the code and the id of the run that wrote it.
All of it is tensors and plain Python data, so it loads with `torch.load(weights_only=True)`:
reading a checkpoint never runs code that the file carries.
"""
import dataclasses
import glob
import hashlib
import os
import pickle
import re
import sys

import torch
import torch.distributed as dist

from config import (EOT_TOKEN, GPT2_VOCAB_SIZE, RESUME_MAY_CHANGE, RESUME_SAME_FIELDS, ConfigError, config_from_dict,
                    make_plan)
from model.gpt import GPT

CHECKPOINT_FORMAT = 1
NAME = re.compile(r"^step_(\d{6,})\.pt$")
# What save() writes besides "format" and the optional "run_id" and "sharded" (absent from
# checkpoints written before them).
KEYS = ("step", "train_time_ms", "config", "code_hash", "model", "adamw", "muon_momentum", "loader", "rng",
        "world_size")


class CheckpointError(ValueError):
    pass


def code_hash(sources):
    """A short hash of the project's source files, as embedded in the record log."""
    digest = hashlib.sha256()
    for path, text in sorted(sources.items()):
        digest.update(path.encode() + b"\0" + text.encode() + b"\0")
    return digest.hexdigest()[:16]


def check_folder(checkpoint_dir):
    """Raises CheckpointError if checkpoint_dir, or the first existing folder above it, is a file."""
    existing = os.path.abspath(checkpoint_dir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise CheckpointError(f"checkpoint folder {checkpoint_dir}: {existing} is a file, not a folder "
                              "(set --checkpoint-dir)")


def _checkpoints(checkpoint_dir):
    """(step, path) of the complete checkpoints in the folder, oldest first (temporary files are not checkpoints)."""
    found = []
    for path in glob.glob(os.path.join(glob.escape(checkpoint_dir), "step_*.pt")):
        match = NAME.match(os.path.basename(path))
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def resolve(resume, checkpoint_dir):
    """The checkpoint file that `--resume` names: a path, or 'latest': the newest readable one in the folder.

    An unreadable newest checkpoint (a disk that filled up, a copy cut short) is skipped, saying so on stderr.
    """
    if resume != "latest":
        if not os.path.isfile(resume):
            raise CheckpointError(f"--resume {resume}: no such checkpoint file")
        return resume
    check_folder(checkpoint_dir)
    found = _checkpoints(checkpoint_dir)
    if not found:
        raise CheckpointError(f"--resume latest: no checkpoint in {checkpoint_dir} (set --checkpoint-dir)")
    skipped = []
    for _, path in reversed(found):
        try:
            load(path, mmap=True)
        except CheckpointError as e:
            skipped.append(str(e))
            continue
        if skipped:
            _tell(f"--resume latest: skipped {len(skipped)} unreadable checkpoint(s) ({'; '.join(skipped)}); "
                  f"resuming from {path}")
        return path
    raise CheckpointError(f"--resume latest: none of the {len(found)} checkpoints in {checkpoint_dir} can be read; "
                          f"the newest: {skipped[0]}")


def _tell(message):
    # resolve() runs before the process group exists: torchrun's RANK says which process speaks for all.
    if int(os.environ.get("RANK", 0)) == 0:
        print(message, file=sys.stderr)


def save(path_dir, step, model, optimizer, loader, train_time_ms, config, sources, run_id, keep_last=0):
    """Collective: every rank must call it. Returns the path written (on every rank).

    `run_id` names the run the checkpoint belongs to: a fresh run's own, or the id of the checkpoint
    it resumed from, so a run and the runs resumed from it are one run. With keep_last, deletes this
    run's checkpoints from before `step` beyond the newest keep_last, the one just written counted;
    never the one just written, and never another run's, whatever their steps.
    """
    distributed = dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    optimizer_state = optimizer.state_dict()  # a collective
    path = os.path.join(path_dir, f"step_{step:06d}.pt")
    if rank == 0:
        check_folder(path_dir)
        os.makedirs(path_dir, exist_ok=True)
        state = {
            "format": CHECKPOINT_FORMAT,
            "run_id": run_id,
            "step": step,
            "train_time_ms": train_time_ms,
            "config": config,
            "code_hash": code_hash(sources),
            "model": {k: v.cpu() for k, v in model.state_dict().items()},
            **optimizer_state,  # "adamw", "sharded", "muon_momentum"
            "loader": loader.state_dict(),
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
            "world_size": dist.get_world_size() if distributed else 1,
        }
        tmp = path + ".tmp"
        torch.save(state, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic: a kill leaves either the old set of checkpoints or the new one
        if keep_last:
            _prune(path_dir, step, keep_last, run_id)
    if distributed:
        dist.barrier()
    return path


def _prune(checkpoint_dir, newest_step, keep_last, run_id):
    """Deletes this run's checkpoints before newest_step but the newest keep_last - 1 of them.

    Ones at later steps are left too: a run resumed from an earlier checkpoint overwrites them as it gets there.
    """
    older = [path for step, path in _checkpoints(checkpoint_dir) if step < newest_step and _run_of(path) == run_id]
    for path in older[:max(len(older) - (keep_last - 1), 0)]:
        os.remove(path)


def _run_of(path):
    """The id of the run that wrote a checkpoint; None for one that cannot be read or predates run ids."""
    try:
        return load(path, mmap=True).get("run_id")
    except CheckpointError:
        return None


def load(path, mmap=False):
    """A checkpoint's state; mmap maps its tensors instead of reading them, to look at a file cheaply."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        # weights_only refused a global: the file would run code or build objects. Other unpickling
        # errors (bytes that are no pickle at all) are unreadable files, below.
        refused = re.search(r"WeightsUnpickler error: (Unsupported global.*?|Unsupported operand.*?)"
                            r"(?= was not an allowed global|\.?\n|\.?$)", str(e))
        if refused:
            raise CheckpointError(f"refusing to load {path}: it holds Python objects, not only tensors and plain "
                                  f"data ({refused.group(1)})") from None
        raise CheckpointError(f"cannot read checkpoint {path}: {_describe(e)}") from None
    except Exception as e:  # noqa: BLE001 - truncated, not a checkpoint, unreadable: all one message
        raise CheckpointError(f"cannot read checkpoint {path}: {_describe(e)}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a checkpoint of this trainer (format {CHECKPOINT_FORMAT})")
    missing = [key for key in KEYS if key not in state]
    if missing:
        raise CheckpointError(f"{path} is not a complete checkpoint: it has no {', '.join(missing)}")
    return state


def _describe(error):
    # torch's messages go on for lines of advice; the first sentence says what is wrong
    first_sentence = str(error).strip().split("\n")[0].split(". ")[0]
    return f"{type(error).__name__}: {first_sentence}" if first_sentence else type(error).__name__


def restore(state, model, optimizer, loader):
    """Puts a loaded checkpoint's state into a freshly built model, optimizer (optim.Optimizer) and loader."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state)
    loader.load_state_dict(state["loader"])
    torch.set_rng_state(state["rng"]["torch"])
    if torch.cuda.is_available() and len(state["rng"]["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])


def parameter_shapes(config):
    """{state-dict key: shape} of the model a Config builds, without allocating it."""
    with torch.device("meta"):
        model = GPT(make_plan(config))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_resumable(state, path, config):
    """Raises ConfigError unless `config` builds the model a checkpoint holds and reads its data the same way.

    The message names the settings that make the difference (each one that alone changes a weight, or
    a declared one), and the first few weights of another shape or name."""
    saved_config = config_from_dict(state["config"])
    saved = {k: tuple(v.shape) for k, v in state["model"].items()}
    ours = parameter_shapes(config)
    differ = sorted(set(saved) ^ set(ours)) + sorted(k for k in set(saved) & set(ours) if saved[k] != ours[k])
    meaning = [f for f in RESUME_SAME_FIELDS if getattr(saved_config, f) != getattr(config, f)]
    if not differ and not meaning:
        return
    changed = [f.name for f in dataclasses.fields(config)
               if getattr(saved_config, f.name) != getattr(config, f.name) and f.name not in RESUME_MAY_CHANGE]

    def changes_weights(name):
        try:
            return parameter_shapes(dataclasses.replace(saved_config, **{name: getattr(config, name)})) != saved
        except ConfigError:  # a value that builds no model with the saved settings: part of the difference
            return True

    named = [f for f in changed if f in meaning or (differ and changes_weights(f))] or changed
    settings = ", ".join(f"{f} {getattr(saved_config, f)!r} -> {getattr(config, f)!r}" for f in named)
    weights = ""
    if differ:
        shown = ", ".join(f"{k} {saved.get(k, 'absent')} -> {ours.get(k, 'absent')}" for k in differ[:3])
        weights = f"; weights: {shown}{f' and {len(differ) - 3} more' if len(differ) > 3 else ''}"
    raise ConfigError(f"checkpoint {path} has a different model configuration ({settings}{weights}): "
                      "resume with the settings it was saved with")


def model_from_checkpoint(path, device, attention="sdpa", gpt2_tokens=False):
    """The GPT of a checkpoint, weights loaded, in eval mode; returns (model, config dict).

    gpt2_tokens: refuse a model trained on other token ids, for callers that read text through
    GPT-2's tokenizer (it would turn their prompts into other words).
    """
    state = load(path)
    try:
        model = GPT.from_config(state["config"], attention)
        model.load_state_dict(state["model"])
        # The attention windows and YaRN state the run had reached; a finished run's final windows.
        plan = make_plan(model.config)
        for windows in plan.windows_path(state["step"]):
            model.set_windows(windows)
        if state["step"] >= model.config.steps:
            model.set_windows(plan.final_windows, yarn=False)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:  # a config or weights that do not fit together
        reason = f"its config has no {e}" if isinstance(e, KeyError) else " ".join(str(e).split())
        raise CheckpointError(f"{path} does not hold a model this code can build: {reason}") from None
    c = model.config
    if gpt2_tokens and (c.vocab_size < GPT2_VOCAB_SIZE or c.bos_token != EOT_TOKEN):
        raise CheckpointError(f"{path} holds a model of {c.vocab_size} token ids whose documents start at id "
                              f"{c.bos_token}, not GPT-2's: this script reads text with GPT-2's tokenizer")
    return model.to(device).eval(), state["config"]
