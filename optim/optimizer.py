"""The one optimizer the training loop talks to: it assigns every parameter a role, builds the
optimizers the config names, and owns their communication.

The loop calls, per step: `set_schedules(step)`, then for each micro-batch
`with opt.backward_context(step, last): loss.backward()`, then `opt.step(step)`. Which optimizers
average gradients how (DDP for Muon + AdamW, reduce-scatter inside NorMuon and DistAdam), and
Adam stepping every `adam_every` steps on summed gradients, stay in here.

Parameter roles (one table, `ROLES`): a role names which parameters it covers, for each
--optimizer which optimizer trains them at which learning rate, and its row of HEAD's table
(--adam-table head: Adam's betas and LR and weight-decay multipliers, or NorMuon's LR multiplier).
Building fails naming any parameter that no role covers, so a new parameter never silently goes
untrained. Communication: under muon and adamw, DDP all-reduces every gradient; under normuon,
DistAdam reduce-scatters its parameters' gradients from backward hooks and NorMuon its matrices'
at its step, each then all-gathering the updated parameters; --bigram-grad sparse has DistAdam send
the bigram table's nonzero gradient rows instead (all-to-all; under DDP it changes nothing).

The tied embedding and head (--tied-head-stages, HEAD): through the update of `plan.untie_step`
the embedding is a copy of the head that DistAdam steps with it on the sum of their gradients
(optim/dist_adam.py); after that update it takes the head's Adam state and trains on its own.
"""
import contextlib
import dataclasses

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from config import ConfigError, make_plan
from optim.dist_adam import DistAdam
from optim.muon import Muon
from optim.normuon import ORTHOGONALIZERS, SQUARE_STATS, NorMuon
from optim.schedules import lr_multiplier, muon_momentum

MODEL_SCALARS = ("skip_weights", "smear_lambda", "backout_lambda")  # the scalars outside the blocks


@dataclasses.dataclass(frozen=True)
class Adam:
    """A row of HEAD's Adam table: betas, the LR as a multiple of --adam-lr, the cautious weight decay
    as a multiple of --adam-weight-decay."""
    beta1: float
    beta2: float
    lr_mul: float = 1.0
    wd_mul: float = 1.0


@dataclasses.dataclass(frozen=True)
class Matrix:
    """NorMuon under HEAD's table, at lr_mul x --muon-lr x max(1, rows/cols)^0.5 of the stored shape."""
    lr_mul: float = 1.0


@dataclasses.dataclass(frozen=True)
class Role:
    """Which parameters a role covers; under each --optimizer who trains them with --adam-table fields:
    "matrix" (Muon or NorMuon, at --muon-lr) or "adam:<the Config field of its learning rate>"; and
    `head`, who trains them with --adam-table head (HEAD's table, normuon only): an Adam or a Matrix."""
    name: str
    covers: object  # (parameter name, parameter) -> bool; no two roles cover one parameter
    normuon: str
    muon: str
    adamw: str
    head: object


def _is_gate(name):
    return name == "smear_gate.weight" or name.endswith(".attn.gate.weight")


def _is_block_matrix(name, p, suffix=None):
    """A matrix of the blocks that is no gate; with `suffix`, the ones whose names end with it."""
    if not (name.startswith("blocks.") and p.ndim >= 2) or _is_gate(name) or name.endswith(".attn.ve_gate"):
        return False
    return name.endswith(suffix) if suffix else not name.endswith((".attn.qkvo", ".mlp.proj.weight"))


SCALAR_LR = ("adam:scalar_lr",) * 3
# Adam's parameter groups follow this order. HEAD's rows: docs/RECORD-HEAD.md 5.1-5.2 (HEAD L2026-2055,
# L510-522); its `scalars` (the attention's qkvo_lambdas, smear_lambda, skip_weights here) are one row.
ROLES = (
    # Role(name, covers, under --adam-table fields: normuon, muon, adamw; under --adam-table head: HEAD's row)
    Role("embed", lambda n, p: n == "embed.weight", *("adam:embed_lr",) * 3, Adam(0.5, 0.95, wd_mul=150)),
    Role("value_embeds", lambda n, p: n.startswith("value_embeds."), *("adam:value_embed_lr",) * 3,
         Adam(0.75, 0.95, lr_mul=75, wd_mul=5)),
    Role("head", lambda n, p: n == "lm_head.weight", *("adam:head_lr",) * 3, Adam(0.5, 0.95, wd_mul=150)),
    Role("scalars", lambda n, p: (n.startswith("blocks.") and p.ndim < 2) or n in MODEL_SCALARS, *SCALAR_LR,
         Adam(0.9, 0.99, lr_mul=5, wd_mul=0)),
    # The gates are small matrices: NorMuon trains them (record #46); without it, Adam with the scalars.
    # HEAD's row is its smear gate's (HEAD has no attention gate of this kind).
    Role("gates", lambda n, p: _is_gate(n), "matrix", "adam:scalar_lr", "adam:scalar_lr",
         Adam(0.9, 0.99, lr_mul=0.01, wd_mul=0)),
    # The block matrices (BLOCK_MATRICES). HEAD's LR multipliers are 1 for Q, K, V, O (their blocks are wide or
    # square: shape factor 1), 2 for c_fc and 4 for c_proj, which HEAD stores (4d, d): a shape factor of 2 times 2.
    # Stored (out, in), c_fc (4d, d) has the shape factor 2 and c_proj (d, 4d) 1: so 1 and 4 here.
    Role("qkvo", lambda n, p: _is_block_matrix(n, p, ".attn.qkvo"), "matrix", "matrix", "adam:adamw_matrix_lr",
         Matrix(1)),
    Role("mlp_out", lambda n, p: _is_block_matrix(n, p, ".mlp.proj.weight"), "matrix", "matrix",
         "adam:adamw_matrix_lr", Matrix(4)),
    Role("hidden", _is_block_matrix, "matrix", "matrix", "adam:adamw_matrix_lr", Matrix(1)),
    # HEAD's parameters; with --adam-table fields, each with the lr field of its nearest kin above
    Role("value_embed_gates", lambda n, p: n.endswith(".attn.ve_gate"), "matrix", "adam:scalar_lr", "adam:scalar_lr",
         Adam(0.9, 0.99)),
    Role("bigram", lambda n, p: n == "bigram.table", *("adam:value_embed_lr",) * 3,
         Adam(0.75, 0.95, lr_mul=75, wd_mul=5)),
    Role("resid_lambdas", lambda n, p: n == "resid_lambdas", *SCALAR_LR, Adam(0.9, 0.95, lr_mul=5, wd_mul=0)),
    Role("post_lambdas", lambda n, p: n == "post_lambdas", *SCALAR_LR, Adam(0.9, 0.95, wd_mul=0)),
    Role("mudd_weights", lambda n, p: n in ("mudd.w1", "mudd.w2"), *SCALAR_LR, Adam(0.9, 0.99, lr_mul=0.25)),
    Role("mudd_biases", lambda n, p: n == "mudd.b2", *SCALAR_LR, Adam(0.9, 0.99, lr_mul=0.25, wd_mul=0)),
    Role("mudd_gate_weights", lambda n, p: n in ("mudd_gates.w1", "mudd_gates.w2"), *SCALAR_LR,
         Adam(0.9, 0.99, lr_mul=0.1)),
    Role("mudd_gate_biases", lambda n, p: n in ("mudd_gates.b2", "mudd_gates.scale"), *SCALAR_LR,
         Adam(0.9, 0.99, lr_mul=0.1, wd_mul=0)),
)
# With --adam-table fields these roles train as one group (record #46's "hidden"), in the model's order: their
# optimizer state keeps the keys it had before they were roles of their own.
BLOCK_MATRICES = ("qkvo", "mlp_out", "hidden")
OPTIMIZERS = ("muon", "adamw", "normuon")
ADAM_TABLES = ("fields", "head")


def _named_parameters(model):
    """The model's (name, parameter) pairs in the optimizers' order: the blocks' parameters first, then the
    model's scalars in MODEL_SCALARS' order. Optimizer state is matched to parameters by position, so this
    order is part of every checkpoint's format."""
    order = {name: i for i, name in enumerate(MODEL_SCALARS, start=1)}
    return sorted(model.named_parameters(), key=lambda item: order.get(item[0], 0))


def parameter_roles(model):
    """{role name: [parameters]} in the model's parameter order; raises ConfigError naming any
    parameter that no role covers."""
    roles = {role.name: [] for role in ROLES}
    uncovered = []
    for name, p in _named_parameters(model):
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
    if c.adam_table not in ADAM_TABLES:
        raise ConfigError(f"--adam-table {c.adam_table} is not one of {', '.join(ADAM_TABLES)}")
    if c.normuon_square_stat not in SQUARE_STATS:
        raise ConfigError(f"--normuon-square-stat {c.normuon_square_stat} is not one of {', '.join(SQUARE_STATS)}")
    if c.optimizer != "normuon" and (c.muon_orthogonalizer != "newton_schulz" or c.adam_every != 1):
        raise ConfigError("--muon-orthogonalizer polar_express and --adam-every above 1 need --optimizer normuon")
    normuon_only = [flag for flag, on in (("--adam-table head", c.adam_table == "head"),
                                          ("--normuon-qk-block-heads", c.normuon_qk_block_heads != 0),
                                          ("--normuon-square-stat row", c.normuon_square_stat == "row"),
                                          ("--tied-head-stages", c.tied_head_stages != 0),
                                          ("--mantissa-weights", c.mantissa_weights)) if on]
    if c.optimizer != "normuon" and normuon_only:
        raise ConfigError(f"{', '.join(normuon_only)} need(s) --optimizer normuon")
    if not (c.adam_lr >= 0 and c.adam_weight_decay >= 0):
        raise ConfigError(f"--adam-lr {c.adam_lr} and --adam-weight-decay {c.adam_weight_decay} must be >= 0")
    if c.adam_weight_decay and c.adam_table != "head":
        raise ConfigError(f"--adam-weight-decay {c.adam_weight_decay} is a multiple of HEAD's per-role decay: it "
                          "needs --adam-table head")
    k = c.normuon_qk_block_heads
    if k:
        if not c.merged_qkvo:
            raise ConfigError(f"--normuon-qk-block-heads {k} cuts the merged [Q; K; V; O] weight: it needs "
                              "--merged-qkvo true")
        if k < 0 or c.num_heads % k:
            raise ConfigError(f"--normuon-qk-block-heads {k} must divide --num-heads {c.num_heads} (0: whole Q and K)")
    if c.tied_head_stages:
        untie = make_plan(c).untie_step
        if (untie + 1) % c.adam_every:
            raise ConfigError(f"--tied-head-stages {c.tied_head_stages}: the untie step {untie} is not an Adam step "
                              f"(--adam-every {c.adam_every}): the head's state moves to the embedding after an update")


class Optimizer:
    """Every optimizer of a run behind one object. `parts` are the torch optimizers, in a fixed order."""

    def __init__(self, model, plan, fused=False, compile_muon=False):
        c = self.config = plan.config
        check_optimizer_config(c)
        self.plan = plan
        roles = parameter_roles(model)
        adam_groups, matrix_groups = (self._head_groups(roles, c) if c.adam_table == "head"
                                      else self._fields_groups(roles, model, c))
        if c.adam_table == "fields" and not c.normuon_qk_block_heads:
            # one group, the block matrices first, then the gates: Muon's and NorMuon's state keys follow this order
            matrices = [p for group in matrix_groups for p in group["params"]]
        else:
            matrices = matrix_groups
        betas = (c.adam_beta1, c.adam_beta2)
        self.adam = self.muon = None
        if c.optimizer == "normuon":
            # the records' roundings: bf16 Polar Express with one rounding per product; Adam's moments in
            # bf16 as record #46 keeps them (HEAD keeps them in float32)
            record = c.numerics == "record"
            self.adam = DistAdam(adam_groups, betas=betas, eps=c.adam_eps,
                                 state_dtype=torch.bfloat16 if record and c.adam_table == "fields" else torch.float32)
            self.muon = NorMuon(matrices, lr=c.muon_lr, weight_decay=c.weight_decay, momentum=c.muon_momentum_end,
                                beta2=c.normuon_beta2, cautious=c.cautious_weight_decay,
                                orthogonalizer=c.muon_orthogonalizer, ns_steps=c.muon_ns_steps, compile=compile_muon,
                                ns_dtype="bfloat16" if record and c.muon_ns_dtype == "auto" else c.muon_ns_dtype,
                                round_once=record, square_stat=c.normuon_square_stat,
                                mantissa_weights=c.mantissa_weights)
            self.parts = [self.adam, self.muon]
            if c.bigram_grad == "sparse":  # the bigram table's gradient crosses ranks as its touched rows
                for table in roles["bigram"]:
                    self.adam.exchange_sparsely(table)
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
        self._tie = None  # (embedding, head) under --tied-head-stages
        if plan.untie_step is not None:
            embed, head = roles["embed"], roles["head"]
            if len(embed) != 1 or len(head) != 1 or embed[0].shape != head[0].shape:
                raise ConfigError("--tied-head-stages ties embed.weight to lm_head.weight: the model needs both, "
                                  "of one shape (vocabulary, model_dim)")
            self._tie = (embed[0], head[0])
            self.adam.tie(*self._tie)

    @staticmethod
    def _fields_groups(roles, model, c):
        """(Adam groups, matrix groups) of --adam-table fields: each role's LR from its Config field; the block
        matrices one group in the model's order (one per role with NorMuon's Q and K blocks)."""
        order = {id(p): i for i, (_, p) in enumerate(_named_parameters(model))}
        joined = not c.normuon_qk_block_heads
        adam_groups, matrix_groups = [], []
        for role in ROLES:
            trainer, params, name = getattr(role, c.optimizer), roles[role.name], role.name
            if joined and name in BLOCK_MATRICES:
                if name != BLOCK_MATRICES[0]:
                    continue
                params = sorted((p for r in BLOCK_MATRICES for p in roles[r]), key=lambda p: order[id(p)])
                name = "hidden"
            if not params:
                continue
            if trainer == "matrix":
                matrix_groups.append(Optimizer._matrix_group(params, name, 1.0, c))
            else:
                group = dict(params=params, lr=getattr(c, trainer.split(":")[1]), role=name)
                if c.optimizer == "adamw" and name in BLOCK_MATRICES:
                    group["weight_decay"] = c.weight_decay
                adam_groups.append(group)
        # the block matrices before the gates, as Muon and NorMuon have always taken them
        matrix_groups.sort(key=lambda group: group["role"] not in BLOCK_MATRICES)
        return adam_groups, matrix_groups

    @staticmethod
    def _head_groups(roles, c):
        """(Adam groups, NorMuon groups) of HEAD's table, one per role."""
        adam_groups, matrix_groups = [], []
        for role in ROLES:
            params, entry = roles[role.name], role.head
            if not params:
                continue
            if isinstance(entry, Matrix):
                matrix_groups.append(Optimizer._matrix_group(params, role.name, entry.lr_mul, c))
            else:
                adam_groups.append(dict(params=params, lr=c.adam_lr * entry.lr_mul, betas=(entry.beta1, entry.beta2),
                                        cautious_decay=c.adam_weight_decay * entry.wd_mul, role=role.name))
        return adam_groups, matrix_groups

    @staticmethod
    def _matrix_group(params, role, lr_mul, c):
        group = dict(params=params, role=role, lr_mul=lr_mul)
        if role == "qkvo" and c.normuon_qk_block_heads:  # Q and K in blocks of heads' rows, V and O whole
            rows = c.normuon_qk_block_heads * (c.model_dim // c.num_heads)
            group["row_blocks"] = (rows, rows, 0, 0)
        return group

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
            for buffer in model.buffers():  # HEAD's bigram sign table among them: drawn, not learned
                dist.broadcast(buffer, src=0)
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
        """Steps every optimizer due at `step`; gradients are cleared, except the ones Adam keeps summing.
        Unties the embedding from the head after the update of the plan's untie step (or of any step after
        it that finds them still tied)."""
        for opt in self.parts:
            if opt is not self.adam or self.adam_steps_at(step):
                opt.step()
        if self.adam is not None:  # each sharded optimizer cleared its own gradients; Adam's wait for its step
            self.adam.sync_grads = False
            if self.tied and step >= self.plan.untie_step:
                self.adam.untie()
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

    @property
    def tied(self):
        """Whether the embedding is still the head's copy (--tied-head-stages)."""
        return self.adam is not None and self.adam.tied is not None

    def _set_tied(self, tied):
        if tied and self._tie is None:
            raise ValueError("this optimizer state has the embedding tied to the head: resume it with the "
                             "--tied-head-stages it was saved with")
        if self.adam is not None:
            self.adam.tied = self._tie if tied else None

    # -- state

    def state_dict(self):
        """A collective: every rank calls it. The whole state, independent of the world size, on rank 0
        (the sharded optimizers' on every rank): {"adamw": [torch state dicts of the replicated
        optimizers], "sharded": [NorMuon's / DistAdam's gathered state], "muon_momentum": {key: buffer},
        "embed_tied": whether the embedding is still tied to the head}."""
        sharded = [opt.state_for_checkpoint() for opt in self.parts if isinstance(opt, (NorMuon, DistAdam))]
        momentum = self.muon.momentum_state() if isinstance(self.muon, Muon) else {}
        if dist.is_initialized():
            rank = dist.get_rank()
            gathered = [None] * dist.get_world_size() if rank == 0 else None
            dist.gather_object({k: v.cpu() for k, v in momentum.items()}, gathered, dst=0)
            if rank == 0:
                momentum = {k: v for part in gathered for k, v in part.items()}
        return {"adamw": [opt.state_dict() for opt in self.parts if isinstance(opt, torch.optim.AdamW)],
                "sharded": sharded, "muon_momentum": {k: v.cpu() for k, v in momentum.items()},
                "embed_tied": self.tied}

    def load_state_dict(self, state):
        """Takes a state_dict() saved under any world size; each rank keeps its own share."""
        for opt, saved in zip([o for o in self.parts if isinstance(o, torch.optim.AdamW)], state["adamw"]):
            opt.load_state_dict(saved)
        for opt, saved in zip([o for o in self.parts if isinstance(o, (NorMuon, DistAdam))], state.get("sharded", [])):
            opt.load_checkpoint_state(saved)
        if isinstance(self.muon, Muon):
            self.muon.load_momentum_state(state["muon_momentum"])
        self._set_tied(state.get("embed_tied", False))  # checkpoints from before the tie never tied

    def local_state(self):
        """This rank's state as torch keeps it (no collective): for rewinding within a run."""
        return {"parts": [opt.state_dict() for opt in self.parts], "embed_tied": self.tied}

    def load_local_state(self, state):
        for opt, saved in zip(self.parts, state["parts"]):
            opt.load_state_dict(saved)
        self._set_tied(state["embed_tied"])
