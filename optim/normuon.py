"""NorMuon: Muon whose orthogonalised update is rescaled per row or column by a second moment.

Each step, per matrix: Nesterov-style momentum, an approximate polar factor of it (Polar
Express by default), then NorMuon's normalisation: every entry of the longer dimension is
divided by the square root of a running mean of its squared update, and the matrix is scaled
back to the Frobenius norm it had. Decoupled weight decay, cautious by default, is applied
with the update. A 3D parameter of shape (k, m, n) is k matrices, each handled on its own.
The spec, from record #46's log, is docs/RECORD46.md section 4.1; HEAD's changes (a square
matrix's statistic per row, Q and K orthogonalised in blocks of heads' rows) are
docs/RECORD-HEAD.md section 5.1.

Work split under torch.distributed (no DDP: gradients arrive un-averaged). Parameters are
bucketed by (group, shape, dtype). Each bucket's gradients are stacked, zero-padded to a
multiple of the world size and reduce-scattered with AVG, so every rank receives the averaged
gradients of one contiguous chunk of the bucket. The rank updates only that chunk, keeping its
momentum and second moment, and an all-gather hands every rank all updated parameters.

mantissa_weights (HEAD, docs/RECORD-HEAD.md section 5.1; optim/mantissa.py): every parameter is
stored bf16, the upper half of a float32 master whose lower half (a uint16 "mantissa") the rank that
updates it keeps in its state. The update joins the two, runs on the float32 master exactly as it
runs on a float32 parameter (the decay, its sign test and the step all read the master), and splits
the result again: the bf16 weight is the master truncated toward zero. Gradients may come bf16 (the
parameter's dtype) or float32; they are upcast before the reduce-scatter and the momentum.
"""
import functools

import torch
import torch.distributed as dist

from optim.comm import world
from optim.mantissa import join, split

from optim.muon import NS_DTYPES, ns_dtype, orthogonalize

# Record #46's triples, one per iteration: derived for 5 iterations with safety factor 2e-2 and
# cushion 2, so they need the input's spectral norm to be at most about 1 (see norm_safety).
POLAR_EXPRESS_COEFFICIENTS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)

ORTHOGONALIZERS = ("polar_express", "newton_schulz")
SQUARE_STATS = ("column", "row")  # a square matrix's second moment: one value per column (record #46) or row (HEAD)


def polar_express(G, coefficients=POLAR_EXPRESS_COEFFICIENTS, norm_safety=1.02, eps=1e-6, dtype=torch.bfloat16,
                  round_once=False):
    """Approximates the polar factor U V^T of G = U S V^T (2D, or batched 3D), computed in `dtype`
    (round_once: see muon.orthogonalize)."""
    # The Frobenius norm bounds the spectral norm; 1.02 is the safety factor the triples were derived with.
    return orthogonalize(G, len(coefficients), coefficients, eps, dtype, norm_safety, round_once)


@functools.lru_cache(maxsize=None)
def _orthogonalizer(name, compile):
    fn = polar_express if name == "polar_express" else orthogonalize
    # Eager, each iteration launches a handful of small kernels; compiled, the elementwise work fuses.
    return torch.compile(fn) if compile else fn


def _check_group(group):
    """Raises ValueError for hyperparameters outside their domain (defaults and per-group values)."""
    problems = []
    if not group["lr"] >= 0:
        problems.append(f"lr={group['lr']} must be >= 0")
    if not group["weight_decay"] >= 0:
        problems.append(f"weight_decay={group['weight_decay']} must be >= 0")
    if not 0 <= group["momentum"] < 1:
        problems.append(f"momentum={group['momentum']} must be in [0, 1)")
    if not 0 <= group["beta2"] < 1:
        problems.append(f"beta2={group['beta2']} must be in [0, 1) (0 turns the normalisation off)")
    if not group["lr_mul"] > 0:
        problems.append(f"lr_mul={group['lr_mul']} must be > 0")
    if group["orthogonalizer"] not in ORTHOGONALIZERS:
        problems.append(f"orthogonalizer={group['orthogonalizer']!r} must be one of {ORTHOGONALIZERS}")
    if group["square_stat"] not in SQUARE_STATS:
        problems.append(f"square_stat={group['square_stat']!r} must be one of {SQUARE_STATS}")
    blocks = group["row_blocks"]
    for p in group["params"] if blocks is not None else ():
        matrices = p.shape[0] if p.ndim == 3 else 1
        if len(blocks) != matrices or not all(isinstance(r, int) and r >= 0 and (r == 0 or p.shape[-2] % r == 0)
                                              for r in blocks):
            problems.append(f"row_blocks={blocks!r} must give each of the {matrices} matrices of a parameter of shape "
                            f"{tuple(p.shape)} 0 (whole) or a number of rows dividing {p.shape[-2]}")
    if isinstance(group["ns_steps"], bool) or not isinstance(group["ns_steps"], int) or group["ns_steps"] < 1:
        problems.append(f"ns_steps={group['ns_steps']!r} must be a positive int")
    for p in group["params"]:
        if p.ndim not in (2, 3):
            problems.append(f"NorMuon optimises 2D matrices or 3D stacks of them, got a parameter of shape {tuple(p.shape)}")
    if problems:
        raise ValueError("invalid NorMuon hyperparameters: " + "; ".join(problems))


class NorMuon(torch.optim.Optimizer):
    """NorMuon on 2D matrices and 3D stacks of them; defaults are record #46's.

    A param group may carry `lr_mul` (default 1), `square_stat` (see SQUARE_STATS) and `row_blocks`:
    None, or per matrix of each of its parameters the rows of the blocks it is cut into (0: whole),
    each block orthogonalised and normalised as a matrix of its own (HEAD: Q and K of a (4, d, d)
    [Q; K; V; O] weight in blocks of two heads' rows, V and O whole). The trainer's schedule sets
    each group's "lr" and "momentum" before every step. Every parameter needs a gradient at each
    step (the work is split by position), and step() sets them all to None. torch's state_dict() holds only
    this rank's matrices; checkpoints that load under any world size use state_for_checkpoint /
    load_checkpoint_state.

    mantissa_weights=True (see the module's docstring): the parameters become bf16 here, at construction
    (each the upper half of its float32 value, the lower half the "mantissa" in the state of the rank
    that owns it), and stay bf16; the state's "mantissa" (uint16) goes with every checkpoint.
    """

    def __init__(self, params, lr=0.023, weight_decay=1.2, momentum=0.95, beta2=0.95, cautious=True,
                 orthogonalizer="polar_express", ns_steps=5, compile=False, ns_dtype="auto", round_once=False,
                 square_stat="column", mantissa_weights=False):
        self.mantissa_weights = mantissa_weights  # before add_param_group, which converts the parameters
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, beta2=beta2, cautious=cautious,
                        lr_mul=1.0, orthogonalizer=orthogonalizer, ns_steps=ns_steps, square_stat=square_stat,
                        row_blocks=None)
        super().__init__(params, defaults)
        self._compile = compile
        if ns_dtype not in NS_DTYPES:
            raise ValueError(f"NorMuon: ns_dtype {ns_dtype!r} is not one of {NS_DTYPES}")
        self.ns_dtype = ns_dtype
        self.round_once = round_once  # one rounding per addmm in the orthogonalisation, as record #46's kernels

    def add_param_group(self, param_group):
        super().add_param_group(param_group)  # fills in the defaults, which get checked with the group
        try:
            _check_group(self.param_groups[-1])
            if self.mantissa_weights:
                self._store_as_bf16(self.param_groups[-1])
        except ValueError:
            self.param_groups.pop()
            raise

    def _store_as_bf16(self, group):
        """mantissa_weights: each parameter of `group` becomes the bf16 upper half of its float32 value; the
        lower half goes into the state of the rank that updates it (ownership is by bf16 bucket)."""
        bad = [f"{tuple(p.shape)} {p.dtype}" for p in group["params"] if p.dtype not in (torch.float32, torch.bfloat16)]
        if bad:
            raise ValueError(f"mantissa_weights keeps float32 masters of float32 or bf16 parameters, got {bad}")
        lower = {}
        for p in group["params"]:
            upper, lower[id(p)] = split(p.detach().float())
            p.data = upper
        for _, p in self._owned():  # after every dtype changed: the buckets are by dtype
            if id(p) in lower:
                self.state[p]["mantissa"] = lower[id(p)]

    # --- one job each: momentum, orthogonalisation, normalisation, applying the update ---

    @staticmethod
    def _momentum(state, grad, m):
        """Nesterov form with an EMA buffer: buf <- m buf + (1-m) g, returns (1-m) g + m buf."""
        if "momentum" not in state:
            state["momentum"] = torch.zeros_like(grad, dtype=torch.float32)
        buf = state["momentum"]
        grad = grad.float()
        buf.lerp_(grad, 1 - m)
        return grad.lerp(buf, m)

    def _orthogonalize(self, u, group):
        fn = _orthogonalizer(group["orthogonalizer"], self._compile)
        dtype = ns_dtype(u.device, self.ns_dtype)
        if group["orthogonalizer"] == "polar_express":
            return fn(u, dtype=dtype, round_once=self.round_once)
        return fn(u, steps=group["ns_steps"], dtype=dtype, round_once=self.round_once)

    @staticmethod
    def _normalise(state, V, beta2, square_stat="column", key="second_moment"):
        """Divides each entry of the longer dimension by the root of its running mean square, keeping ||V||_F."""
        rows, cols = V.shape[-2:]
        n0 = V.norm(dim=(-2, -1), keepdim=True)
        # One statistic per column of a wide matrix, per row of a tall one; a square one's by square_stat.
        per_column = rows < cols or (rows == cols and square_stat == "column")
        s = V.square().mean(dim=-2 if per_column else -1, keepdim=True)
        if key not in state:
            state[key] = torch.zeros_like(s)
        buf2 = state[key]
        buf2.lerp_(s, 1 - beta2)  # no bias correction, as in the record
        V = V * buf2.clamp_min(1e-10).rsqrt()
        return V * (n0 / V.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-10))

    @staticmethod
    def _apply(p, V, group, rows=None):
        """p <- p - lr_eff (V + wd_eff [mask] p); the decay term is lr^2-scaled, as in the record.
        `rows`: the rows of the blocks p's update came in (their shape sets lr_eff), p's own by default."""
        rows, cols = (rows or p.shape[-2]), p.shape[-1]
        lr = group["lr"]
        lr_eff = lr * max(1.0, rows / cols) ** 0.5 * group["lr_mul"]
        if group["weight_decay"]:
            wd_eff = lr * group["weight_decay"]
            decay = p.float()
            if group["cautious"]:  # decay only where it pushes the same way as the update
                decay = decay * (V * decay >= 0)
            V = V + wd_eff * decay
        p.add_(V.to(p.dtype), alpha=-lr_eff)

    def _update(self, targets, grads, params, group):
        """Updates each tensor of `targets` in place; the state is kept under the matching param.
        mantissa_weights: the update runs on the float32 masters, which are then split into the bf16
        targets and the states' mantissas."""
        states = [self.state[p] for p in params]
        u = torch.stack([self._momentum(s, g, group["momentum"]) for s, g in zip(states, grads)])
        stored = targets
        if self.mantissa_weights:
            targets = [join(t, self._mantissa(s, t)) for t, s in zip(stored, states)]
        if group["row_blocks"] is not None:
            self._update_blocks(targets, u, states, group)
        else:
            # One batched orthogonalisation for the whole chunk: a 3D parameter contributes its k matrices.
            V = self._orthogonalize(u.flatten(0, -3), group).float().reshape(u.shape)
            for target, state, v in zip(targets, states, V):
                if group["beta2"] > 0:
                    v = self._normalise(state, v, group["beta2"], group["square_stat"])
                self._apply(target, v, group)
        if self.mantissa_weights:
            for weight, master, state in zip(stored, targets, states):
                upper, lower = split(master)
                weight.copy_(upper)
                state["mantissa"].copy_(lower)

    @staticmethod
    def _mantissa(state, weight):
        """The state's mantissa; zeros (the master is the bf16 weight) where there is none, as after loading a
        checkpoint saved without mantissa_weights."""
        if "mantissa" not in state:
            state["mantissa"] = torch.zeros(weight.shape, dtype=torch.uint16, device=weight.device)
        return state["mantissa"]

    def _update_blocks(self, targets, u, states, group):
        """_update for a group with row_blocks: per block height, every such block of the chunk in one batched
        orthogonalisation; each parameter keeps one second moment per block height ("second_moment.<rows>")."""
        count, rows, cols = len(states), u.shape[-2], u.shape[-1]
        u = u.reshape(count, -1, rows, cols)  # (parameters, matrices, rows, cols): a 2D parameter is one matrix
        heights = [r or rows for r in group["row_blocks"]]
        V = torch.empty_like(u)
        for height in dict.fromkeys(heights):  # each block height once, in order
            which = [j for j, h in enumerate(heights) if h == height]
            blocks = u[:, which].reshape(-1, height, cols)
            O = self._orthogonalize(blocks, group).float().reshape(count, -1, height, cols)
            for i, state in enumerate(states):
                o = O[i]
                if group["beta2"] > 0:
                    o = self._normalise(state, o, group["beta2"], group["square_stat"], f"second_moment.{height}")
                V[i, which] = o.reshape(len(which), rows, cols)
        for target, v in zip(targets, V):
            matrices = target.view(-1, rows, cols)  # a view: the updates land in target
            for matrix, update, height in zip(matrices, v, heights):
                self._apply(matrix, update, group, rows=height)

    # --- who owns what ---

    def _buckets(self):
        """(group, [(key, param)]) per (group, shape, dtype), in a stable order; keys do not depend on world size."""
        buckets = {}
        for g, group in enumerate(self.param_groups):
            for i, p in enumerate(group["params"]):
                buckets.setdefault((g, tuple(p.shape), p.dtype), (group, []))[1].append((f"{g}.{i}", p))
        return list(buckets.values())

    @staticmethod
    def _chunk(n, rank, world_size):
        """The chunk size (after padding n to a multiple of world_size) and the range of real entries this rank owns."""
        size = -(-n // world_size)
        return size, range(min(rank * size, n), min((rank + 1) * size, n))

    def _owned(self):
        rank, world_size = world()
        for _, members in self._buckets():
            _, mine = self._chunk(len(members), rank, world_size)
            yield from (members[i] for i in mine)

    # --- step ---

    @torch.no_grad()
    def step(self):
        rank, world_size = world()
        buckets = self._buckets()
        for _, members in buckets:
            if any(p.grad is None for _, p in members):
                raise RuntimeError("NorMuon.step: every parameter needs a gradient (the work is split by position)")
        if world_size == 1:
            for group, members in buckets:
                params = [p for _, p in members]
                self._update(params, [p.grad for p in params], params, group)
        else:
            self._distributed_step(buckets, rank, world_size)
        for _, members in buckets:
            for _, p in members:
                p.grad = None

    def _distributed_step(self, buckets, rank, world_size):
        # Pass 1: launch every bucket's reduce-scatter before waiting on any, so they overlap.
        scatters = []
        for _, members in buckets:
            grads = [p.grad for _, p in members]
            if self.mantissa_weights:  # bf16 gradients of the bf16 weights: averaged in float32, as today's
                grads = [g.float() for g in grads]
            size, _ = self._chunk(len(grads), rank, world_size)
            padding = [torch.zeros_like(grads[0])] * (size * world_size - len(grads))
            stacked = torch.stack(grads + padding)
            mine = stacked.new_empty((size, *stacked.shape[1:]))
            # reduce_scatter_single is torch 2.13's name for reduce_scatter_tensor.
            work = dist.reduce_scatter_single(mine, stacked, op=dist.ReduceOp.AVG, async_op=True)
            scatters.append((mine, work))
        # Pass 2: per bucket, update this rank's chunk (padding entries are skipped) and gather it.
        gathers = []
        for (group, members), (grad_chunk, work) in zip(buckets, scatters):
            work.wait()
            params = [p for _, p in members]
            size, mine = self._chunk(len(params), rank, world_size)
            chunk = torch.zeros((size, *params[0].shape), dtype=params[0].dtype, device=params[0].device)
            owned = [params[i] for i in mine]
            for target, p in zip(chunk, owned):
                target.copy_(p)
            if owned:
                self._update(list(chunk[: len(owned)]), list(grad_chunk[: len(owned)]), owned, group)
            full = chunk.new_empty((size * world_size, *chunk.shape[1:]))
            gathers.append((params, full, dist.all_gather_single(full, chunk, async_op=True)))
        # Pass 3: copy the gathered parameters back.
        for params, full, work in gathers:
            work.wait()
            for p, new in zip(params, full):
                p.copy_(new)

    # --- checkpoints, independent of the world size ---

    def state_for_checkpoint(self):
        """Every rank calls this (a collective); all get {"<group>.<index>": {"momentum", "second_moment"}} on CPU.

        "second_moment" is absent for groups with beta2 = 0, which keep none; under mantissa_weights each entry
        also has the uint16 "mantissa" (the parameter's bf16 weight is in the model's state).
        """
        mine = {key: {name: t.detach().cpu().clone() for name, t in self.state[p].items()}
                for key, p in self._owned() if self.state[p]}
        _, world_size = world()
        if world_size == 1:
            return mine
        # all_gather_object pickles tensors in torch's legacy format, which has no uint16: the mantissa travels as
        # int16, the same bits
        for entry in mine.values():
            if "mantissa" in entry:
                entry["mantissa"] = entry["mantissa"].view(torch.int16)
        everyone = [None] * world_size
        dist.all_gather_object(everyone, mine)
        gathered = {key: entry for ranks_dict in everyone for key, entry in ranks_dict.items()}
        for entry in gathered.values():
            if "mantissa" in entry:
                entry["mantissa"] = entry["mantissa"].view(torch.uint16)
        return gathered

    def load_checkpoint_state(self, saved):
        """Takes the entries of the matrices this rank owns, whatever the world size that saved them. Load the
        model's weights first. A checkpoint saved with mantissa_weights into an optimizer without: every
        parameter becomes its float32 master again; one saved without into one with: the masters start from
        the bf16 weights (mantissa 0)."""
        params = {key: p for _, members in self._buckets() for key, p in members}
        unknown = set(saved) - set(params)
        if unknown:
            raise ValueError(f"NorMuon checkpoint has keys for parameters this optimizer lacks: {sorted(unknown)}")
        for key, entry in saved.items():
            for name in ("momentum", "mantissa"):
                if name in entry and tuple(entry[name].shape) != tuple(params[key].shape):
                    raise ValueError(f"NorMuon checkpoint: {key} has {name} of shape {tuple(entry[name].shape)}, "
                                     f"the parameter {tuple(params[key].shape)}")
        if not self.mantissa_weights:
            for key, entry in saved.items():
                if "mantissa" in entry:  # on every rank, for every parameter: each holds them all
                    p = params[key]
                    with torch.no_grad():
                        p.copy_(join(p.detach().bfloat16(), entry["mantissa"].to(p.device)))
        self.state.clear()
        for key, p in self._owned():
            if key in saved:
                self.state[p] = {name: (t.to(p.device, torch.uint16) if name == "mantissa" else
                                        t.to(p.device, torch.float32)).clone()
                                 for name, t in saved[key].items() if self.mantissa_weights or name != "mantissa"}

    def load_state_dict(self, state_dict):
        """torch's, which casts floating state to the parameters' dtype: under mantissa_weights (bf16 weights)
        the float32 moments and the uint16 mantissa are put back as saved."""
        super().load_state_dict(state_dict)
        if self.mantissa_weights:
            ids = [i for group in state_dict["param_groups"] for i in group["params"]]
            params = dict(zip(ids, (p for group in self.param_groups for p in group["params"])))
            for i, entry in state_dict["state"].items():
                p = params[i]
                self.state[p] = {name: t.to(p.device, copy=True) for name, t in entry.items()}
