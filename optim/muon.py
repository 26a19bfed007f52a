"""Muon: SGD momentum whose update is orthogonalised by a Newton-Schulz iteration.

Arguments follow torch.optim.Muon. Under torch.distributed each rank orthogonalises its
share of the matrices and the updates are all-gathered, so the Newton-Schulz cost is
divided by the world size. Gradients must already be averaged across ranks. A 3D parameter
of shape (k, m, n) is k matrices, each orthogonalised on its own.
"""
import functools

import torch
import torch.distributed as dist

from optim.comm import world

# Quintic coefficients tuned to push small singular values up fast rather than to converge
# exactly: the output's singular values land roughly in [0.7, 1.2], which trains as well as
# the exact polar factor.
DEFAULT_NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalize(G, steps=5, coefficients=DEFAULT_NS_COEFFICIENTS, eps=1e-7, dtype=torch.bfloat16, norm_safety=1.0,
                  round_once=False):
    """Approximates the polar factor U V^T of G = U S V^T (2D, or batched 3D), computed in `dtype`.

    `coefficients` is one (a, b, c) triple for every iteration, or a list with one per iteration;
    the input is first divided by its Frobenius norm times `norm_safety`. round_once computes
    b A + c A A and a X + B X each with one rounding to `dtype` (addmm), as record #46's kernels
    do; otherwise each product and sum is rounded on its own.
    """
    if G.ndim not in (2, 3):
        raise ValueError(f"orthogonalize expects a 2D or 3D tensor, got shape {tuple(G.shape)}")
    per_step = [tuple(coefficients)] * steps if len(coefficients) == 3 and not isinstance(coefficients[0], (tuple, list)) else [tuple(c) for c in coefficients]
    if len(per_step) != steps:
        raise ValueError(f"got {len(per_step)} coefficient triples for {steps} Newton-Schulz steps")
    X = G.to(dtype)
    tall = G.size(-2) > G.size(-1)
    if tall:  # iterate on the smaller Gram matrix X X^T
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * norm_safety + eps)  # spectral norm <= Frobenius norm <= 1
    add_product = torch.baddbmm if X.ndim == 3 else torch.addmm  # beta * input + alpha * (m1 @ m2)
    for a, b, c in per_step:
        A = X @ X.mT
        if round_once:
            B = add_product(A, A, A, beta=b, alpha=c)
            X = add_product(X, B, X, beta=a)
        else:
            B = b * A + c * A @ A
            X = a * X + B @ X
    if tall:
        X = X.mT
    return X


NS_DTYPES = ("auto", "bfloat16", "float32")


def ns_dtype(device, choice="auto"):
    """The dtype the orthogonalisation iterates in: `choice`, or for auto bfloat16 on GPUs, as the records
    run it, and on CPUs with AMX. On CPUs without AMX, bf16 matmuls of these shapes run 10-20x slower
    than float32 (a 768x768 iteration: 8 s against 0.3 s, measured), so auto iterates in float32 there."""
    if choice != "auto":
        return getattr(torch, choice)
    return torch.bfloat16 if device.type == "cuda" or torch.cpu._is_amx_tile_supported() else torch.float32


@functools.lru_cache(maxsize=1)
def _compiled_orthogonalize():
    # Eager, each Newton-Schulz step launches a handful of small kernels per matrix; compiled,
    # the elementwise work around the matmuls fuses away.
    return torch.compile(orthogonalize)


class Muon(torch.optim.Optimizer):
    def __init__(self, params, lr=0.02, weight_decay=0.0, momentum=0.95, nesterov=True,
                 ns_coefficients=DEFAULT_NS_COEFFICIENTS, eps=1e-7, ns_steps=5, compile=False, ns_dtype="auto"):
        if lr < 0 or weight_decay < 0 or not 0 <= momentum < 1:
            raise ValueError(f"invalid Muon hyperparameters lr={lr} weight_decay={weight_decay} momentum={momentum}")
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        ns_coefficients=ns_coefficients, eps=eps, ns_steps=ns_steps)
        super().__init__(params, defaults)
        self.orthogonalize = _compiled_orthogonalize() if compile else orthogonalize
        if ns_dtype not in NS_DTYPES:
            raise ValueError(f"Muon: ns_dtype {ns_dtype!r} is not one of {NS_DTYPES}")
        self.ns_dtype = ns_dtype
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim not in (2, 3):
                    raise ValueError(f"Muon optimises 2D matrices or 3D stacks of them, got a parameter of shape "
                                     f"{tuple(p.shape)}")

    def _update_for(self, p, group):
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p.grad)
        buf = state["momentum_buffer"]
        buf.mul_(group["momentum"]).add_(p.grad)
        g = p.grad.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf
        update = self.orthogonalize(g, group["ns_steps"], group["ns_coefficients"], group["eps"],
                                    ns_dtype(p.device, self.ns_dtype))
        # Orthogonal updates of tall matrices have smaller entries; this keeps their RMS comparable.
        return update * max(1.0, p.size(-2) / p.size(-1)) ** 0.5

    def _apply(self, p, update, group):
        if group["weight_decay"]:
            p.mul_(1 - group["lr"] * group["weight_decay"])
        p.add_(update.to(p.dtype), alpha=-group["lr"])

    def _rounds(self, group, world_size):
        """Rounds of up to world_size matrices of one shape: rank r handles the r-th of each round."""
        by_shape = {}
        for p in group["params"]:
            by_shape.setdefault(tuple(p.shape), []).append(p)
        return [same[i : i + world_size] for same in by_shape.values() for i in range(0, len(same), world_size)]

    def _owned(self):
        """(key, param) for the matrices whose momentum this rank keeps; keys do not depend on world size."""
        rank, world_size = world()
        for g, group in enumerate(self.param_groups):
            index = {id(p): i for i, p in enumerate(group["params"])}
            for round_params in self._rounds(group, world_size):
                if rank < len(round_params):
                    yield f"{g}.{index[id(round_params[rank])]}", round_params[rank]

    def momentum_state(self):
        """This rank's momentum buffers, keyed by group and parameter index (merge ranks' dicts to save)."""
        return {key: self.state[p]["momentum_buffer"] for key, p in self._owned() if "momentum_buffer" in self.state[p]}

    def load_momentum_state(self, buffers):
        """Takes the buffers this rank owns from a merged dict, whatever the world size that saved it."""
        self.state.clear()
        for key, p in self._owned():
            if key in buffers:
                self.state[p]["momentum_buffer"] = buffers[key].to(device=p.device, dtype=p.dtype).clone()

    @torch.no_grad()
    def step(self):
        rank, world_size = world()
        distributed = world_size > 1
        for group in self.param_groups:
            if any(p.grad is None for p in group["params"]):
                raise RuntimeError("Muon.step: every matrix needs a gradient (the work is split by position)")
            # After each rank orthogonalises its matrix of a round, one all_gather hands every rank
            # all of the round's updates.
            for round_params in self._rounds(group, world_size):
                if not distributed:
                    for p in round_params:
                        self._apply(p, self._update_for(p, group), group)
                    continue
                if rank < len(round_params):
                    mine = self._update_for(round_params[rank], group)
                else:  # a short last round: this rank contributes a placeholder
                    device = round_params[0].device
                    mine = torch.zeros(round_params[0].shape, dtype=ns_dtype(device, self.ns_dtype), device=device)
                gathered = [torch.empty_like(mine) for _ in range(world_size)]
                dist.all_gather(gathered, mine.contiguous())
                for p, update in zip(round_params, gathered):
                    self._apply(p, update, group)
