"""DistAdam: Adam with its state sharded across ranks and the gradient reduce-scatter started
from backward hooks, as record #46 trains its embeddings, head and scalars (docs/RECORD46.md 4.2),
with HEAD's cautious weight decay and its embedding tied to the head for a while
(docs/RECORD-HEAD.md 5.2, 5.3).

No DDP wrapper is used: gradients arrive un-averaged (each rank's own data) and this optimizer
averages them. Each parameter is flattened and zero-padded to a multiple of the world size W;
rank r owns the r-th contiguous chunk and keeps Adam's state (float32, or bf16 as record #46
keeps it: `state_dtype`) for that chunk only.

A table whose rows a step mostly leaves untouched (HEAD's bigram hash table, --bigram-grad sparse) can
instead exchange only its gradient's nonzero rows (`exchange_sparsely`, HEAD's sparse comms): each
rank sends each row to the rank(s) whose chunk of the flattened table holds it, and
the owner adds them into its own rows. Rows no rank touched have a zero gradient either way, so the
owner's chunk is the dense reduce-scatter's (exactly under two ranks, up to the order of the sum under
more), and Adam steps every row of it as before: the untouched rows' moments decay.
"""
import math

import torch
import torch.distributed as dist

from optim.comm import start_row_exchange, world

# torch 2.13 renamed reduce_scatter_tensor / all_gather_into_tensor (the old names now warn);
# the old names keep older torch builds working.
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _chunk_size(p, world_size):
    # At least one element, so every rank has a chunk to send even for an empty tensor.
    return max(1, -(-p.numel() // world_size))


def _padded_flat(t, size):
    """t flattened and zero-padded to `size` elements (t itself, flattened, when no padding is needed)."""
    flat = t.reshape(-1)
    if flat.numel() == size:
        return flat
    out = flat.new_zeros(size)
    out[: flat.numel()] = flat
    return out


class _DenseReduce:
    """An async reduce-scatter (average over ranks) of a parameter's flattened, padded gradient."""

    def __init__(self, work, reduced, padded):
        self.work, self.reduced = work, reduced
        self._padded = padded  # the input, alive until the collective is done

    def finish(self):
        self.work.wait()

    def result(self):
        """This rank's chunk of the averaged gradient (flat, chunk elements)."""
        self.work.wait()
        return self.reduced


def _owned_rows(rank, chunk, rows, width):
    """(lo, hi, offset): the rows [lo, hi) of a (rows, width) table that rank's flat chunk
    [rank * chunk, (rank + 1) * chunk) of the padded flat table touches, the first and last possibly
    in part; the chunk starts `offset` elements into row lo. A chunk wholly in the padding has none."""
    lo = min(rows, rank * chunk // width)
    hi = min(rows, -(-(rank + 1) * chunk // width))
    return lo, hi, rank * chunk - lo * width


def _send_plan(grad, chunk, world_size, rank):
    """(ids, runs): the sorted ids of the nonzero rows of the (rows, width) `grad` (a device sync), and for
    each rank j the run ids[start : start + count] of those rows that hold elements of j's flat chunk
    (a row that straddles chunks goes to each); no run to `rank` itself, whose rows stay where they are."""
    width = grad.shape[1]
    ids = grad.any(dim=1).nonzero().squeeze(1)
    # the ranks whose chunks hold a row's first and last elements, both non-decreasing in the row id:
    # the rows rank j owns (in whole or in part) are those with first <= j <= last, a contiguous run
    first, last = ids * width // chunk, ((ids + 1) * width - 1) // chunk
    ranks = torch.arange(world_size, device=ids.device)
    bounds = torch.cat([torch.searchsorted(last, ranks), torch.searchsorted(first, ranks, right=True)]).tolist()
    return ids, [(start, max(0, end - start) if j != rank else 0)
                 for j, (start, end) in enumerate(zip(bounds[:world_size], bounds[world_size:]))]


class _SparseReduce:
    """A sparse exchange of a table's gradient rows under way (`DistAdam.exchange_sparsely`): the
    rows other ranks sent this one, to be added into its own rows of the gradient."""

    def __init__(self, exchange, grad, rank, chunk, world_size):
        self.exchange, self.grad, self.world_size, self.chunk = exchange, grad, world_size, chunk
        self.lo, self.hi, self.offset = _owned_rows(rank, chunk, *grad.shape)

    def finish(self):
        self.exchange.wait()

    def result(self):
        """This rank's chunk of the averaged gradient, as _DenseReduce.result gives it."""
        ids, rows = self.exchange.wait()
        region = self.grad[self.lo : self.hi].clone()  # this rank's own contribution to its rows
        if ids.numel():
            region.index_add_(0, ids - self.lo, rows)
        flat = _padded_flat(region.reshape(-1)[self.offset : self.offset + self.chunk], self.chunk)
        return flat.div_(self.world_size)  # the average, as the dense ReduceOp.AVG takes it


def _check_hyperparameters(lr, betas, eps, weight_decay, cautious_decay=0.0):
    if not lr >= 0:
        raise ValueError(f"DistAdam: invalid lr {lr}, expected >= 0")
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise ValueError(f"DistAdam: invalid betas {betas}, expected two values in [0, 1)")
    # eps = 0 turns every entry that never had a gradient (unused vocabulary rows, padding) into 0/0.
    if not eps > 0:
        raise ValueError(f"DistAdam: invalid eps {eps}, expected > 0")
    if not weight_decay >= 0:
        raise ValueError(f"DistAdam: invalid weight_decay {weight_decay}, expected >= 0")
    if not cautious_decay >= 0:
        raise ValueError(f"DistAdam: invalid cautious_decay {cautious_decay}, expected >= 0")


class DistAdam(torch.optim.Optimizer):
    """Adam on each rank's chunk of every parameter, then an all-gather of the updated chunks.

    The update is #46's: m <- b1 m + (1-b1) g, v <- b2 v + (1-b2) g^2,
    p <- p - lr sqrt(1-b2^t)/(1-b1^t) m/(sqrt(v) + eps), so eps is added to the uncorrected
    sqrt(v); weight decay, if any, is decoupled (p <- p (1 - lr wd)). t counts Adam steps.
    A group's `cautious_decay` c (HEAD's, 0 by default) decays instead where the update and the
    weight agree in sign, scaled by lr^2: with u = lr sqrt(1-b2^t)/(1-b1^t) m/(sqrt(v) + eps),
    p <- p - (u + lr^2 c [u p > 0] p), the mask strict (a zero does not agree).

    Every parameter gets a post-accumulate-grad hook. While `sync_grads` is True, the hook starts
    the async reduce-scatter (average over ranks) of the parameter's gradient as soon as backward
    has finished accumulating it, so the communication overlaps the rest of backward. step() waits
    for those and reduces any gradient no hook sent (sync_grads off, or p.grad set by hand). A
    gradient must not change between its hook's launch and step(). step() sets every grad to None.

    Stepping every other step on the sum of two steps' gradients (#46): on the skipped step do not
    zero these parameters' grads, so they accumulate in p.grad; on the stepping step turn
    sync_grads on for the last micro-batch only:

        for step in range(steps):
            adam_steps = step % 2 == 1
            for i, batch in enumerate(micro_batches):
                adam.sync_grads = adam_steps and i == len(micro_batches) - 1
                loss(batch).backward()
            muon.step(); muon.zero_grad()  # the other optimizer's grads only
            if adam_steps:
                adam.step()  # reduces the two steps' summed grads, then sets them to None
            adam.sync_grads = False

    `exchange_sparsely(p)` has a 2-D parameter's gradient (HEAD's bigram table) exchanged as its
    nonzero rows instead of the reduce-scatter, from the same hook (or step()): each rank finds its
    gradient's nonzero rows (`any` over each row, then `nonzero`: one device sync per exchange),
    tells every rank how many rows it will send it (a small blocking all-to-all), then starts two
    async all-to-alls, the row ids and the rows. The owners of a row are the ranks whose chunks of the
    flat padded table (the chunks above) hold any of its elements: a row that straddles chunks goes
    whole to each of their ranks, each keeping its part. step() waits for them, adds the received rows into this
    rank's own rows of the gradient and divides by the world size, as ReduceOp.AVG. Found from the
    gradient itself, the rows are right whatever summed into it: micro-batches, two steps' gradients,
    a checkpoint's pending gradient. Under one rank nothing is exchanged either way.

    A parameter whose grad is None is skipped; under several ranks every rank must agree on which
    (the same model and forward on every rank do). torch's state_dict() holds this rank's chunks;
    checkpoints that load under any world size use state_for_checkpoint / load_checkpoint_state.

    Tied (HEAD's embedding and head, `tie(copy, source)`): two parameters of one shape that are one
    weight. step() adds the copy's gradient into the source's (each the sum since the last step),
    steps the source alone on it and then copies the source into the copy, which keeps no state of
    its own; the hooks leave both gradients to step(), which reduces the sum once. `untie()` gives
    the copy the source's state (step count and moments: the same chunks on every rank, as the two
    have one shape), and from the next step each trains on its own gradient.
    """

    def __init__(self, params, lr=0.008, betas=(0.65, 0.95), eps=1e-8, weight_decay=0.0, state_dtype=torch.float32,
                 cautious_decay=0.0):
        _check_hyperparameters(lr, betas, eps, weight_decay, cautious_decay)
        self.state_dtype = state_dtype
        self.sync_grads = False
        self.tied = None  # (copy, source) while tied
        self._pending = {}  # param -> its reduction under way: a _DenseReduce or _SparseReduce
        self._hooks = []
        self._sparse = []  # the parameters exchange_sparsely named
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      cautious_decay=cautious_decay))

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            _check_hyperparameters(group["lr"], group["betas"], group["eps"], group["weight_decay"],
                                   group["cautious_decay"])
            for p in group["params"]:
                if not p.requires_grad:
                    raise ValueError(f"DistAdam: a parameter of shape {tuple(p.shape)} does not require grad")
        except ValueError:
            self.param_groups.pop()
            raise
        for p in group["params"]:
            self._hooks.append(p.register_post_accumulate_grad_hook(self._grad_ready))

    def tie(self, copy, source):
        """From now on `copy` is a copy of `source`, stepped with it (see the class docstring)."""
        params = [p for group in self.param_groups for p in group["params"]]
        if copy is source or not any(copy is p for p in params) or not any(source is p for p in params):
            raise ValueError("DistAdam.tie: give two different parameters of this optimizer")
        if copy.shape != source.shape:
            raise ValueError(f"DistAdam.tie: the copy's shape {tuple(copy.shape)} is not the source's "
                             f"{tuple(source.shape)}")
        self.tied = (copy, source)

    def exchange_sparsely(self, p):
        """From now on `p`'s gradient is exchanged as its nonzero rows (see the class docstring)."""
        if not any(p is q for group in self.param_groups for q in group["params"]):
            raise ValueError("DistAdam.exchange_sparsely: give a parameter of this optimizer")
        if p.ndim != 2 or p.numel() == 0:
            raise ValueError(f"DistAdam.exchange_sparsely: a table of rows is needed, not shape {tuple(p.shape)}")
        if not self.is_sparse(p):
            self._sparse.append(p)

    def is_sparse(self, p):
        """Whether `p`'s gradient is exchanged as its nonzero rows."""
        return any(p is q for q in self._sparse)

    @torch.no_grad()
    def untie(self):
        """The copy takes the source's state (step count, moments) and trains on its own from the next step."""
        copy, source = self.tied
        self.tied = None
        if self.state[source]:
            self.state[copy] = {k: v.clone() if torch.is_tensor(v) else v for k, v in self.state[source].items()}

    def _merge_tied_grads(self):
        """While tied: the copy's gradient added into the source's, the copy left without one."""
        copy, source = self.tied
        if copy.grad is not None:
            if source.grad is None:
                source.grad = copy.grad.clone()
            else:
                source.grad.add_(copy.grad)
            copy.grad = None

    def _keyed(self):
        """(key, param) for every parameter; keys are "<group>.<index>", independent of world size."""
        for g, group in enumerate(self.param_groups):
            for i, p in enumerate(group["params"]):
                yield f"{g}.{i}", p

    @torch.no_grad()
    def _launch(self, p, world_size):
        chunk = _chunk_size(p, world_size)
        if self.is_sparse(p):
            self._pending[p] = self._launch_sparse(p.grad, chunk, world_size)
            return
        padded = _padded_flat(p.grad, chunk * world_size)
        reduced = torch.empty(chunk, dtype=padded.dtype, device=padded.device)
        work = _reduce_scatter(reduced, padded, op=dist.ReduceOp.AVG, async_op=True)
        self._pending[p] = _DenseReduce(work, reduced, padded)

    @staticmethod
    def _launch_sparse(grad, chunk, world_size):
        rank = dist.get_rank()
        ids, runs = _send_plan(grad, chunk, world_size, rank)
        send_ids = torch.cat([ids[start : start + count] for start, count in runs])
        exchange = start_row_exchange(send_ids, grad[send_ids], [count for _, count in runs])
        return _SparseReduce(exchange, grad, rank, chunk, world_size)

    def _grad_ready(self, p):
        if not self.sync_grads or (self.tied is not None and any(p is q for q in self.tied)):
            return  # tied: step() reduces the two gradients' sum
        _, world_size = world()
        if world_size == 1:
            return
        stale = self._pending.pop(p, None)
        if stale is not None:  # a second backward with sync on: the newer grad includes the older
            stale.finish()
        self._launch(p, world_size)

    def _drop_pending(self):
        for pending in self._pending.values():
            pending.finish()  # a collective cannot be cancelled, only finished
        self._pending.clear()

    def _updated(self, own, grad, state, group):
        """The chunk `own` after one Adam step on `grad` (both flat, float32 maths), in own's dtype.

        Each stored tensor (moments, weights) is rounded once to its dtype, as a fused (compiled)
        step rounds it."""
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros(own.numel(), dtype=self.state_dtype, device=own.device)
            state["exp_avg_sq"] = torch.zeros(own.numel(), dtype=self.state_dtype, device=own.device)
        state["step"] += 1
        t, (b1, b2), lr = state["step"], group["betas"], group["lr"]
        g = grad.float()
        m, v = state["exp_avg"], state["exp_avg_sq"]
        if m.dtype == torch.float32:
            m.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
        else:
            m.copy_(m.float().mul_(b1).add_(g, alpha=1 - b1))
            v.copy_(v.float().mul_(b2).addcmul_(g, g, value=1 - b2))
            m, v = m.float(), v.float()
        x = own.float()
        if group["weight_decay"]:
            x = x * (1 - lr * group["weight_decay"])
        step_size = lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t)
        if group["cautious_decay"]:
            u = m.div(v.sqrt().add_(group["eps"])).mul_(step_size)
            u.addcmul_(x, u * x > 0, value=lr * lr * group["cautious_decay"])
            return (x - u).to(own.dtype)
        return x.addcdiv(m, v.sqrt().add_(group["eps"]), value=-step_size).to(own.dtype)

    @torch.no_grad()
    def step(self):
        rank, world_size = world()
        if self.tied is not None:
            self._merge_tied_grads()
        if world_size > 1:
            for _, p in self._keyed():
                if p.grad is not None and p not in self._pending:
                    self._launch(p, world_size)
        gathers = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                chunk = _chunk_size(p, world_size)
                flat = p.detach().reshape(-1)
                if world_size == 1:
                    new = self._updated(_padded_flat(flat, chunk), _padded_flat(p.grad, chunk), self.state[p], group)
                    p.copy_(new[: p.numel()].view_as(p))
                    continue
                grad = self._pending.pop(p).result()
                own = _padded_flat(flat[rank * chunk : (rank + 1) * chunk], chunk)
                new = self._updated(own, grad, self.state[p], group)
                full = torch.empty(chunk * world_size, dtype=p.dtype, device=p.device)
                gathers.append((p, full, _all_gather(full, new, async_op=True)))
        for p, full, work in gathers:
            work.wait()
            p.copy_(full[: p.numel()].view_as(p))
        if self.tied is not None:
            copy, source = self.tied
            copy.copy_(source)
        for _, p in self._keyed():
            p.grad = None
        self._pending.clear()

    @torch.no_grad()
    def state_for_checkpoint(self):
        """A collective: every rank calls it and gets the same world-size independent dict (CPU tensors).

        "state" maps each stepped parameter's key to its step count and full exp_avg / exp_avg_sq;
        "pending_grads" maps each parameter with a grad to that grad averaged over ranks, so a run
        stopped between a skipped step and the stepping step keeps its accumulated gradient.
        p.grad itself is left as it is.
        """
        rank, world_size = world()
        state, pending = {}, {}
        for key, p in self._keyed():
            s = self.state.get(p)
            if s:
                state[key] = {"step": s["step"]}
                for name in ("exp_avg", "exp_avg_sq"):
                    full = s[name]
                    if world_size > 1:
                        full = torch.empty(s[name].numel() * world_size, dtype=full.dtype, device=full.device)
                        _all_gather(full, s[name])
                    state[key][name] = full[: p.numel()].reshape(p.shape).to("cpu", copy=True)
            if p.grad is not None:
                grad = p.grad.detach().clone()
                if world_size > 1:
                    dist.all_reduce(grad, op=dist.ReduceOp.AVG)
                pending[key] = grad.to("cpu", copy=True)
        return {"state": state, "pending_grads": pending}

    @torch.no_grad()
    def load_checkpoint_state(self, checkpoint):
        """Loads a state_for_checkpoint dict saved under any world size.

        Each rank keeps its own chunk of the states; every rank gets the pending grads in p.grad.
        Averaging the next grads over ranks then gives the same sum for any world size:
        AVG(pending + g_r) = pending + AVG(g_r).
        """
        rank, world_size = world()
        params = dict(self._keyed())
        unknown = (set(checkpoint["state"]) | set(checkpoint["pending_grads"])) - set(params)
        if unknown:
            raise ValueError(f"DistAdam checkpoint has keys for parameters this optimizer lacks: {sorted(unknown)}")
        for key, p in params.items():
            for saved in (checkpoint["state"].get(key, {}).get("exp_avg"), checkpoint["pending_grads"].get(key)):
                if saved is not None and tuple(saved.shape) != tuple(p.shape):
                    raise ValueError(f"DistAdam checkpoint: {key} has shape {tuple(saved.shape)}, "
                                     f"the parameter {tuple(p.shape)}")
        self._drop_pending()
        self.state.clear()
        for key, p in params.items():
            chunk = _chunk_size(p, world_size)
            saved = checkpoint["state"].get(key)
            if saved is not None:
                self.state[p]["step"] = int(saved["step"])
                for name in ("exp_avg", "exp_avg_sq"):
                    full = _padded_flat(saved[name].to(device=p.device, dtype=self.state_dtype), chunk * world_size)
                    self.state[p][name] = full[rank * chunk : (rank + 1) * chunk].clone()
            grad = checkpoint["pending_grads"].get(key)
            p.grad = None if grad is None else grad.to(device=p.device, dtype=p.dtype).reshape(p.shape).clone()
