"""HEAD's training loss (modded-nanogpt f411b3d3) in plain PyTorch: a soft-capped head scored on the
next few tokens (multi-token prediction, record #53) and on the next token's prefix token (record #88).

For a row of T positions with soft-capped logits z_i, targets t_i (the token after position i),
MTP weights w_0..w_{n-1} and prefix weight w_p:

    loss_i = sum_{k < n, i + k < T} w_k CE(z_i, t_{i+k})  +  w_p CE(z_i, prefix(t_i))  [if prefix(t_i) exists]

No term stops at a document boundary. HEAD packs each rank's micro-batch into one row (T = the
rank's tokens), so only the last n-1 positions of it lose terms. The training loss is
sum_i loss_i * grad_scale (grad_scale = 1/grad_accum_steps), the sum and the scale applied by the
training loop (HEAD L2289, L2360), not by the loss.

Two implementations of loss_i:
- `position_losses`: the float32 autograd reference;
- `kernel_position_losses`: the same loss with the gradient of HEAD's fused CUDA kernel, which is
  not the loss's gradient on a row's last n-1 positions (see `kernel_position_losses`), in float32
  or with the kernel's roundings ("record" numerics).

The weights at a step come from the plan's stages (optim/schedules.py: loss_weights).
"""
from typing import NamedTuple

import torch
import torch.nn.functional as F

E5M2 = torch.float8_e5m2
E5M2_MAX = torch.finfo(E5M2).max  # 57344: the kernel's conversion saturates here, torch's goes to inf


class Softcap(NamedTuple):
    """z -> cap * sigmoid((z + offset) / temperature), or with kind "tanh", cap * tanh((z + offset) / temperature)."""
    cap: float
    temperature: float
    offset: float = 0.0
    kind: str = "sigmoid"


# HEAD (record #54, L1690): 23 sigmoid((z + 5) / 7.5). Record #46's is Softcap(30, 7.5), record #11's
# Softcap(30, 30, kind="tanh").
HEAD_SOFTCAP = Softcap(cap=23.0, temperature=7.5, offset=5.0)


def softcap(logits, cap, temperature, offset=0.0, kind="sigmoid"):
    """Logits squashed into (0, cap) (sigmoid) or (-cap, cap) (tanh), computed in logits' dtype."""
    scaled = (logits + offset) / temperature
    if kind == "sigmoid":
        return cap * torch.sigmoid(scaled)
    if kind == "tanh":
        return cap * torch.tanh(scaled)
    raise ValueError(f"softcap kind {kind!r} is not sigmoid or tanh")


# -- the loss

def position_losses(logits, targets, mtp_weights, prefix_targets=None, prefix_weight=0.0, cap=HEAD_SOFTCAP):
    """loss_i of every position, float32, with autograd's gradient (the reference).

    logits (..., T, V): the head's output for rows of T positions; targets (..., T): the token after
    each position (or more: a slice of a row with the targets after it, for the later tokens' terms); mtp_weights (n,): w_k for targets i..i+n-1; prefix_targets (..., T): each target's
    prefix token (NO_PREFIX = -1 where it has none), prefix_weight: w_p; cap: a Softcap. A target
    outside [0, V) adds no term, as in HEAD's kernel. Returns (..., T).
    """
    _check_shapes(logits, targets, prefix_targets)
    capped = softcap(logits.float(), *cap)
    return _weighted_terms(capped, torch.logsumexp(capped, dim=-1), targets.long(),
                           _as_weights(mtp_weights, logits.device), _optional_long(prefix_targets),
                           _as_weights(prefix_weight, logits.device).reshape(()))


def kernel_position_losses(logits, targets, mtp_weights, prefix_targets=None, prefix_weight=0.0,
                           cap=HEAD_SOFTCAP, numerics="float32", full_weight_sum=True, grad_fp8_scale=None):
    """`position_losses` with the gradient of HEAD's fused kernel (TK L955-1171, applied at HEAD L1687).

    With s = sigmoid((logit + offset) / temperature), z = cap * s and p = softmax(z), the kernel's
    gradient of position i's logit j is

        (cap / temperature) * s_j (1 - s_j) * (S_i p_j - H_ij) * g_i

    where H_ij is the total weight of loss_i's terms whose target is j (MTP and prefix alike),
    g_i the incoming gradient of loss_i, and S_i the normaliser's weight. The loss's own gradient has
    S_i = sum_j H_ij; the kernel takes S_i = sum_k w_k + (w_p if position i has a prefix target),
    counting the w_k of targets past the row's end too (TK L1094-1098), and 0 at a position whose own target
    is outside the vocabulary (a padded piece's ignored one; HEAD's rows have none). On a row's last n-1
    positions the two differ: full_weight_sum=False gives the loss's own gradient.

    HEAD's kernel ignores the incoming gradient: it bakes in g_i = grad_scale, which is what this
    gives when the caller takes sum(loss) * grad_scale, as HEAD's training loop does.

    numerics "float32": no rounding beyond float32's. "record": the kernel's roundings, logits in
    bf16 (HEAD's head returns bf16) and s rounded to bf16 before anything uses it, loss and gradient
    computed from that bf16 s in float32 (TK L1000-1005). The kernel's fast-math sigmoid (through
    tanh.approx), exp and log are not reproduced: they move s by about 2^-11 of itself before the bf16
    rounding, so a rare s lands one bf16 step away. grad_fp8_scale (HEAD: grad_scale * 0.75 / 448)
    rounds the logits' gradient to e5m2 at that scale, saturating at the largest finite value as the
    kernel's conversion does (TK L922-932, L1117-1118); the returned gradient is the rounded value
    times the scale, in logits' dtype (autograd's rule), which the FP8 head's backward (model/fp8.py)
    rounds back to the same e5m2 value: bf16's error is far inside half an e5m2 step.
    """
    _check_shapes(logits, targets, prefix_targets)
    if numerics not in ("float32", "record"):
        raise ValueError(f"numerics {numerics!r} is not float32 or record")
    if cap.kind != "sigmoid":
        raise ValueError("HEAD's kernel gradient is for a sigmoid soft-cap")
    return _KernelGradient.apply(logits, targets.long(), _as_weights(mtp_weights, logits.device),
                                 _optional_long(prefix_targets),
                                 _as_weights(prefix_weight, logits.device).reshape(()),
                                 cap, numerics == "record", full_weight_sum, grad_fp8_scale)


class _KernelGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, weights, prefix_targets, prefix_weight, cap, record, full_weight_sum,
                grad_fp8_scale):
        squashed = _squashed(logits, cap, record)
        capped = cap.cap * squashed.float()
        lse = torch.logsumexp(capped, dim=-1)
        # Saved in bf16 under record numerics: the kernel keeps nothing else of the logits.
        ctx.save_for_backward(squashed, lse, targets, weights, prefix_targets, prefix_weight)
        ctx.cap, ctx.full_weight_sum, ctx.grad_fp8_scale = cap, full_weight_sum, grad_fp8_scale
        ctx.logits_dtype = logits.dtype
        return _weighted_terms(capped, lse, targets, weights, prefix_targets, prefix_weight)

    @staticmethod
    def backward(ctx, grad_losses):
        squashed, lse, targets, weights, prefix_targets, prefix_weight = ctx.saved_tensors
        cap, scale = ctx.cap, ctx.grad_fp8_scale
        s = squashed.float()
        probs = torch.exp(cap.cap * s - lse.unsqueeze(-1))
        hits = _target_weight_per_column(targets, s.size(-2), weights, prefix_targets, prefix_weight, s.size(-1))
        if ctx.full_weight_sum:
            normaliser = weights.sum() + _prefix_weight_per_position(prefix_targets, prefix_weight, s.shape[:-1],
                                                                     s.size(-1))
            # A position whose own target is ignored (a padded piece's, data/loader.py) has no term to normalise:
            # HEAD's rows have none, so its kernel's gradient is unchanged where every target is real.
            normaliser = normaliser * _in_vocabulary(targets[..., : s.size(-2)], s.size(-1))
        else:
            normaliser = hits.sum(dim=-1)
        # Multiplied in the kernel's order (TK L1117), the e5m2 scale's reciprocal before the rest
        coefficient = grad_losses.float().unsqueeze(-1) * (cap.cap / cap.temperature)
        if scale is not None:
            coefficient = coefficient * (1.0 / scale)
        grad = coefficient * (normaliser.unsqueeze(-1) * probs - hits) * s * (1.0 - s)
        if scale is not None:
            grad = grad.clamp(-E5M2_MAX, E5M2_MAX).to(E5M2).float() * scale
        return grad.to(ctx.logits_dtype), None, None, None, None, None, None, None, None


def _squashed(logits, cap, record):
    """sigmoid((logits + offset) / temperature): float32, or under record numerics from bf16 logits and
    rounded to bf16."""
    if not record:
        return torch.sigmoid((logits.float() + cap.offset) / cap.temperature)
    return torch.sigmoid((logits.bfloat16().float() + cap.offset) / cap.temperature).bfloat16()


def _weighted_terms(capped, lse, targets, weights, prefix_targets, prefix_weight):
    """loss_i from soft-capped logits (..., T, V) and their logsumexp (..., T), summed in the kernel's
    order: the MTP terms by k, then the prefix term (TK L1072-1089). `targets` may run past the T
    positions (a slice of a row with the targets after it)."""
    positions, length = lse.size(-1), targets.size(-1)
    losses = torch.zeros_like(lse)
    for k in range(min(weights.numel(), length)):
        m = min(positions, length - k)  # no term where i + k is past the targets
        term = _cross_entropy_terms(capped[..., :m, :], lse[..., :m], targets[..., k : k + m])
        losses = losses + F.pad(weights[k] * term, (0, positions - m))
    if prefix_targets is not None:
        losses = losses + prefix_weight * _cross_entropy_terms(capped, lse, prefix_targets)
    return losses


def _cross_entropy_terms(capped, lse, targets):
    """-log softmax(capped)[target] per position, 0 where the target is outside the vocabulary."""
    valid = _in_vocabulary(targets, capped.size(-1))
    picked = capped.gather(-1, targets.clamp(0, capped.size(-1) - 1).unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, lse - picked, 0.0)


def _target_weight_per_column(targets, positions, weights, prefix_targets, prefix_weight, vocab_size):
    """(..., T, V) float32, T = positions: at position i and column j, the total weight of loss_i's terms
    whose target is j (`targets` may run past the T positions)."""
    length = targets.size(-1)
    hits = torch.zeros(*targets.shape[:-1], positions, vocab_size, dtype=torch.float32, device=targets.device)
    for k in range(min(weights.numel(), length)):
        m = min(positions, length - k)
        _add_at_targets(hits[..., :m, :], targets[..., k : k + m], weights[k], vocab_size)
    if prefix_targets is not None:
        _add_at_targets(hits, prefix_targets, prefix_weight, vocab_size)
    return hits


def _add_at_targets(hits, targets, weight, vocab_size):
    valid = _in_vocabulary(targets, vocab_size)
    hits.scatter_add_(-1, targets.clamp(0, vocab_size - 1).unsqueeze(-1), (weight * valid).unsqueeze(-1))


def _prefix_weight_per_position(prefix_targets, prefix_weight, shape, vocab_size):
    if prefix_targets is None:
        return torch.zeros(shape, dtype=torch.float32, device=prefix_weight.device)
    return prefix_weight * _in_vocabulary(prefix_targets, vocab_size)


def _in_vocabulary(targets, vocab_size):
    return (targets >= 0) & (targets < vocab_size)


def _as_weights(weights, device):
    # Tensors (the model's buffers) pass through: a compiled graph then does not specialise on their
    # values, as HEAD passes its weights.
    return torch.as_tensor(weights, dtype=torch.float32, device=device).detach()


def _optional_long(targets):
    return None if targets is None else targets.long()


def _check_shapes(logits, targets, prefix_targets):
    """targets: one per position of logits (..., T, V), or more (the targets after a slice of a row);
    prefix_targets: one per position."""
    positions = logits.shape[:-1]
    if (targets.shape[:-1] != positions[:-1] or targets.size(-1) < positions[-1]
            or (prefix_targets is not None and prefix_targets.shape != positions)):
        raise ValueError(f"logits {tuple(logits.shape)} need targets of shape {tuple(positions)} (or longer in the "
                         f"last dim) and prefix targets of shape {tuple(positions)}, got {tuple(targets.shape)}"
                         + ("" if prefix_targets is None else f" and {tuple(prefix_targets.shape)}"))
