"""Checkpoints: everything a run needs to continue exactly, written so a kill never corrupts one.

One file per checkpoint, `step_NNNNNN.pt` in the checkpoint folder, written by rank 0 to a
temporary name and renamed into place. It holds the model, the AdamW state (the same on
every rank), the Muon momentum of every matrix gathered from the rank that owns it (so a
run can resume on any number of processes), the loader position, RNG states, the step,
the accumulated train time, the config and a hash of the code.
"""
import glob
import hashlib
import os
import re

import torch
import torch.distributed as dist

from optim.muon import Muon

CHECKPOINT_FORMAT = 1
NAME = re.compile(r"^step_(\d{6,})\.pt$")


class CheckpointError(ValueError):
    pass


def code_hash(sources):
    """A short hash of the project's source files, as embedded in the record log."""
    digest = hashlib.sha256()
    for path, text in sorted(sources.items()):
        digest.update(path.encode() + b"\0" + text.encode() + b"\0")
    return digest.hexdigest()[:16]


def list_checkpoints(checkpoint_dir):
    """Complete checkpoints in the folder, oldest first (temporary files are not checkpoints)."""
    found = []
    for path in glob.glob(os.path.join(glob.escape(checkpoint_dir), "step_*.pt")):
        match = NAME.match(os.path.basename(path))
        if match:
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def resolve(resume, checkpoint_dir):
    """The checkpoint file that `--resume` names: a path, or 'latest' in the checkpoint folder."""
    if resume == "latest":
        found = list_checkpoints(checkpoint_dir)
        if not found:
            raise CheckpointError(f"--resume latest: no checkpoint in {checkpoint_dir} (set --checkpoint-dir)")
        return found[-1]
    if not os.path.isfile(resume):
        raise CheckpointError(f"--resume {resume}: no such checkpoint file")
    return resume


def _muon(optimizers):
    return next((opt for opt in optimizers if isinstance(opt, Muon)), None)


def save(path_dir, step, model, optimizers, loader, train_time_ms, config, sources, keep_last=0):
    """Collective: every rank must call it. Returns the path written (on every rank)."""
    distributed = dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    muon = _muon(optimizers)
    momentum = muon.momentum_state() if muon else {}
    if distributed:
        gathered = [None] * dist.get_world_size() if rank == 0 else None
        dist.gather_object({k: v.cpu() for k, v in momentum.items()}, gathered, dst=0)
        if rank == 0:
            momentum = {k: v for part in gathered for k, v in part.items()}
    path = os.path.join(path_dir, f"step_{step:06d}.pt")
    if rank == 0:
        os.makedirs(path_dir, exist_ok=True)
        state = {
            "format": CHECKPOINT_FORMAT,
            "step": step,
            "train_time_ms": train_time_ms,
            "config": config,
            "code_hash": code_hash(sources),
            "model": {k: v.cpu() for k, v in model.state_dict().items()},
            "adamw": [opt.state_dict() for opt in optimizers if not isinstance(opt, Muon)],
            "muon_momentum": {k: v.cpu() for k, v in momentum.items()},
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
            for old in list_checkpoints(path_dir)[:-keep_last]:
                os.remove(old)
    if distributed:
        dist.barrier()
    return path


def load(path):
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - truncated, not a checkpoint, unreadable: all one message
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a checkpoint of this trainer (format {CHECKPOINT_FORMAT})")
    return state


def restore(state, model, optimizers, loader):
    """Puts a loaded checkpoint's state into a freshly built model, optimizers and loader."""
    model.load_state_dict(state["model"])
    adamws = [opt for opt in optimizers if not isinstance(opt, Muon)]
    for opt, saved in zip(adamws, state["adamw"]):
        opt.load_state_dict(saved)
    muon = _muon(optimizers)
    if muon:
        muon.load_momentum_state(state["muon_momentum"])
    loader.load_state_dict(state["loader"])
    torch.set_rng_state(state["rng"]["torch"])
    if torch.cuda.is_available() and len(state["rng"]["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])


def model_from_checkpoint(path, device, attention="sdpa"):
    """The GPT of a checkpoint, weights loaded, in eval mode; returns (model, config dict)."""
    from model.gpt import GPT

    state = load(path)
    model = GPT.from_config(state["config"], attention)
    model.load_state_dict(state["model"])
    return model.to(device).eval(), state["config"]
