"""The one optimizer the training loop talks to: it assigns every parameter a role, builds the
optimizers the config names, and owns their communication.

The loop calls, per step: `set_schedules(step)`, then for each micro-batch
`with opt.backward_context(step, last): loss.backward()`, then `opt.step(step)`. Which optimizers
average gradients how (DDP for Muon + AdamW, reduce-scatter inside NorMuon and DistAdam), and
Adam stepping every `adam_every` steps on summed gradients, stay in here.

Parameter roles (one table, `ROLES`): a role names which parameters it covers, and for each
--optimizer which optimizer trains them at which learning rate. Building fails naming any
parameter that no role covers, so a new parameter never silently goes untrained. Communication:
under muon and adamw, DDP all-reduces every gradient; under normuon, DistAdam reduce-scatters its
parameters' gradients from backward hooks and NorMuon its matrices' at its step, each then
all-gathering the updated parameters.
"""
import contextlib
import dataclasses

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from config import ConfigError
from optim.dist_adam import DistAdam
from optim.muon import Muon
from optim.normuon import ORTHOGONALIZERS, NorMuon
from optim.schedules import lr_multiplier, muon_momentum

MODEL_SCALARS = ("skip_weights", "smear_lambda", "backout_lambda")  # the scalars outside the blocks


@dataclasses.dataclass(frozen=True)
class Role:
    """Which parameters a role covers, and under each --optimizer who trains them: "matrix" (Muon or
    NorMuon, at --muon-lr) or "adam:<the Config field of its learning rate>"."""
    name: str
    covers: object  # (parameter name, parameter) -> bool; no two roles cover one parameter
    normuon: str
    muon: str
    adamw: str


def _is_gate(name):
    return name == "smear_gate.weight" or name.endswith(".attn.gate.weight")


# Adam's parameter groups follow this order; Muon's and NorMuon's matrices too.
ROLES = (
    Role("embed", lambda n, p: n == "embed.weight", "adam:embed_lr", "adam:embed_lr", "adam:embed_lr"),
    Role("value_embeds", lambda n, p: n.startswith("value_embeds."),
         "adam:value_embed_lr", "adam:value_embed_lr", "adam:value_embed_lr"),
    Role("head", lambda n, p: n == "lm_head.weight", "adam:head_lr", "adam:head_lr", "adam:head_lr"),
    Role("scalars", lambda n, p: (n.startswith("blocks.") and p.ndim < 2) or n in MODEL_SCALARS,
         "adam:scalar_lr", "adam:scalar_lr", "adam:scalar_lr"),
    # The gates are small matrices: NorMuon trains them (record #46); without it, Adam with the scalars.
    Role("gates", lambda n, p: _is_gate(n), "matrix", "adam:scalar_lr", "adam:scalar_lr"),
    Role("hidden", lambda n, p: n.startswith("blocks.") and p.ndim >= 2 and not _is_gate(n),
         "matrix", "matrix", "adam:adamw_matrix_lr"),
)
OPTIMIZERS = ("muon", "adamw", "normuon")


def parameter_roles(model):
    """{role name: [parameters]} in the model's parameter order; raises ConfigError naming any
    parameter that no role covers."""
    roles = {role.name: [] for role in ROLES}
    uncovered = []
    # The blocks' parameters first, then the model's scalars in MODEL_SCALARS' order: optimizer state
    # is matched to parameters by position, so this order is part of every checkpoint's format.
    order = {name: i for i, name in enumerate(MODEL_SCALARS, start=1)}
    for name, p in sorted(model.named_parameters(), key=lambda item: order.get(item[0], 0)):
        covering = [r for r in ROLES if r.covers(name, p)]
        assert len(covering) <= 1, f"{name} is covered by roles {[r.name for r in covering]}"
        if covering:
            roles[covering[0].name].append(p)
        else:
            uncovered.append(f"{name} {tuple(p.shape)}")
    if uncovered:
        raise ConfigError(f"no optimizer role covers parameter(s) {', '.join(uncovered)}: give each a role in "
                          "optim/optimizer.py's ROLES")
    return roles


def check_optimizer_config(c):
    """Raises ConfigError for optimizer settings that cannot work together."""
    if c.optimizer not in OPTIMIZERS:
        raise ConfigError(f"--optimizer {c.optimizer} is not one of {', '.join(OPTIMIZERS)}")
    if c.muon_orthogonalizer not in ORTHOGONALIZERS:
        raise ConfigError(f"--muon-orthogonalizer {c.muon_orthogonalizer} is not one of {', '.join(ORTHOGONALIZERS)}")
    if c.optimizer != "normuon" and (c.muon_orthogonalizer != "newton_schulz" or c.adam_every != 1):
        raise ConfigError("--muon-orthogonalizer polar_express and --adam-every above 1 need --optimizer normuon")


class Optimizer:
    """Every optimizer of a run behind one object. `parts` are the torch optimizers, in a fixed order."""

    def __init__(self, model, plan, fused=False, compile_muon=False):
        c = self.config = plan.config
        check_optimizer_config(c)
        self.plan = plan
        roles = parameter_roles(model)
        adam_groups, matrices = [], []
        for role in ROLES:
            trainer = getattr(role, c.optimizer)
            if not roles[role.name]:
                continue
            if trainer == "matrix":
                matrices.append(roles[role.name])
            else:
                group = dict(params=roles[role.name], lr=getattr(c, trainer.split(":")[1]), role=role.name)
                if c.optimizer == "adamw" and role.name == "hidden":
                    group["weight_decay"] = c.weight_decay
                adam_groups.append(group)
        # Muon and NorMuon take the hidden matrices first, then the gates: their state's keys follow this order.
        matrices = [p for params in reversed(matrices) for p in params]
        betas = (c.adam_beta1, c.adam_beta2)
        self.adam = self.muon = None
        if c.optimizer == "normuon":
            record = c.numerics == "record"  # record #46's roundings: bf16 Adam moments, bf16 Polar Express
            self.adam = DistAdam(adam_groups, betas=betas, eps=c.adam_eps,
                                 state_dtype=torch.bfloat16 if record else torch.float32)
            self.muon = NorMuon(matrices, lr=c.muon_lr, weight_decay=c.weight_decay, momentum=c.muon_momentum_end,
                                beta2=c.normuon_beta2, cautious=c.cautious_weight_decay,
                                orthogonalizer=c.muon_orthogonalizer, ns_steps=c.muon_ns_steps, compile=compile_muon,
                                ns_dtype="bfloat16" if record and c.muon_ns_dtype == "auto" else c.muon_ns_dtype,
                                round_once=record)
            self.parts = [self.adam, self.muon]
        else:
            adam = torch.optim.AdamW(adam_groups, betas=betas, eps=c.adam_eps, weight_decay=0.0,
                                     **({"fused": True} if fused else {}))
            self.parts = [adam]
            if c.optimizer == "muon":
                self.muon = Muon(matrices, lr=c.muon_lr, momentum=c.muon_momentum_end, weight_decay=c.weight_decay,
                                 ns_steps=c.muon_ns_steps, compile=compile_muon, ns_dtype=c.muon_ns_dtype)
                self.parts.append(self.muon)
        for opt in self.parts:
            for group in opt.param_groups:
                group["initial_lr"] = group["lr"]
        self._ddp = None

    @property
    def param_groups(self):
        return [group for opt in self.parts for group in opt.param_groups]

    # -- communication

    def distribute(self, model):
        """The module the loop runs forward and backward through. Under torch.distributed: wrapped in
        DDP when gradients are averaged for the optimizers (Muon, AdamW); as it is under NorMuon,
        whose optimizers reduce-scatter their own, with every rank starting from rank 0's weights."""
        if not dist.is_initialized():
            return model
        if self.config.optimizer == "normuon":
            for p in model.parameters():
                dist.broadcast(p.data, src=0)
            return model
        device = next(model.parameters()).device
        self._ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        return self._ddp

    def adam_steps_at(self, step):
        """Whether Adam steps at `step` (every adam_every steps, on the gradients summed since)."""
        return (step + 1) % self.config.adam_every == 0

    @contextlib.contextmanager
    def backward_context(self, step, last):
        """Around one micro-batch's backward: gradients are averaged across ranks on the last micro-batch
        of a step only (under NorMuon's Adam, only on a step where Adam steps)."""
        if self.adam is not None:
            self.adam.sync_grads = last and self.adam_steps_at(step)
        with (self._ddp.no_sync() if self._ddp is not None and not last else contextlib.nullcontext()):
            yield

    def step(self, step):
        """Steps every optimizer due at `step`; gradients are cleared, except the ones Adam keeps summing."""
        for opt in self.parts:
            if opt is not self.adam or self.adam_steps_at(step):
                opt.step()
        if self.adam is not None:  # each sharded optimizer cleared its own gradients; Adam's wait for its step
            self.adam.sync_grads = False
        else:
            for opt in self.parts:
                opt.zero_grad(set_to_none=True)

    # -- schedules

    def set_schedules(self, step):
        """Sets every group's learning rate and the Muon momentum for the update at `step`; returns the
        LR multiplier."""
        multiplier = lr_multiplier(self.plan, step)
        momentum = muon_momentum(self.plan, step)
        for opt in self.parts:
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * multiplier
                if opt is self.muon:
                    group["momentum"] = momentum
        return multiplier

    @property
    def momentum(self):
        return self.muon.param_groups[0]["momentum"] if self.muon else None

    # -- state

    def state_dict(self):
        """A collective: every rank calls it. The whole state, independent of the world size, on rank 0
        (the sharded optimizers' on every rank): {"adamw": [torch state dicts of the replicated
        optimizers], "sharded": [NorMuon's / DistAdam's gathered state], "muon_momentum": {key: buffer}}."""
        sharded = [opt.state_for_checkpoint() for opt in self.parts if isinstance(opt, (NorMuon, DistAdam))]
        momentum = self.muon.momentum_state() if isinstance(self.muon, Muon) else {}
        if dist.is_initialized():
            rank = dist.get_rank()
            gathered = [None] * dist.get_world_size() if rank == 0 else None
            dist.gather_object({k: v.cpu() for k, v in momentum.items()}, gathered, dst=0)
            if rank == 0:
                momentum = {k: v for part in gathered for k, v in part.items()}
        return {"adamw": [opt.state_dict() for opt in self.parts if isinstance(opt, torch.optim.AdamW)],
                "sharded": sharded, "muon_momentum": {k: v.cpu() for k, v in momentum.items()}}

    def load_state_dict(self, state):
        """Takes a state_dict() saved under any world size; each rank keeps its own share."""
        for opt, saved in zip([o for o in self.parts if isinstance(o, torch.optim.AdamW)], state["adamw"]):
            opt.load_state_dict(saved)
        for opt, saved in zip([o for o in self.parts if isinstance(o, (NorMuon, DistAdam))], state.get("sharded", [])):
            opt.load_checkpoint_state(saved)
        if isinstance(self.muon, Muon):
            self.muon.load_momentum_state(state["muon_momentum"])

    def local_state(self):
        """This rank's state as torch keeps it (no collective): for rewinding within a run."""
        return [opt.state_dict() for opt in self.parts]

    def load_local_state(self, state):
        for opt, saved in zip(self.parts, state):
            opt.load_state_dict(saved)
