import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import model.triton_loss as triton_loss
from model.loss import kernel_position_losses

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
interpreted = pytest.mark.skipif(not triton_loss.triton_loss_available("cpu"),
                                reason="needs Triton's interpreter, which tests/conftest.py turns on where no GPU is")

ROWS, LENGTH, VOCAB = 2, 7, 300
BLOCK = 128  # VOCAB is not a multiple of it: three blocks, the last one part-masked
# HEAD's soft-cap written out: 23 sigmoid((z + 5) / 7.5); HEAD's stage-1 weights, a made-up prefix weight
CAP, OFFSET, TEMPERATURE = 23.0, 5.0, 7.5
WEIGHTS, PREFIX_WEIGHT = [1.0, 0.5, 0.25], 0.3
FP8_SCALE = 1e-5  # small enough that the largest gradients saturate e5m2 and the smallest are its subnormals
# Against kernel_position_losses, which computes in float32 too: torch's CPU kernels have been seen, rarely and
# not reproducibly, to return it a few float32 steps off (losses by 3e-6 of themselves), so the comparisons
# leave room for that; a wrong term or weight is off by 1e-2 or more
AGAINST_TORCH_FLOAT32 = dict(rtol=1e-4, atol=1e-5)


def make_batch(seed=0):
    """Logits, targets one past the slice (so position T-1's third term has no target) and prefix targets,
    with targets out of the vocabulary (-1), prefix targets without one (-1), a target repeated within a
    position's terms and a prefix target equal to an MTP target (two weights on one column)."""
    generator = torch.Generator().manual_seed(seed)
    logits = 8 * torch.randn(ROWS, LENGTH, VOCAB, generator=generator)
    targets = torch.randint(0, VOCAB, (ROWS, LENGTH + 1), generator=generator)
    targets[0, 2] = -1
    targets[1, LENGTH] = -1
    targets[0, 5] = targets[0, 4]
    prefix_targets = torch.randint(0, VOCAB, (ROWS, LENGTH), generator=generator)
    prefix_targets[0, 1] = prefix_targets[1, LENGTH - 1] = -1
    prefix_targets[1, 3] = targets[1, 4]
    return logits, targets, prefix_targets


def squash(logits):
    return torch.sigmoid((logits.double() + OFFSET) / TEMPERATURE)


def formula_losses(logits, targets, prefix_targets):
    """loss_i = -sum_k w_k log_softmax(z_i)[t_{i+k}] - w_p log_softmax(z_i)[prefix_i], in float64, over
    the targets that exist and are in the vocabulary."""
    log_probs = torch.log_softmax(CAP * squash(logits), dim=-1)
    losses = torch.zeros(logits.shape[:-1], dtype=torch.float64)
    terms = [(targets[:, k : k + LENGTH], w) for k, w in enumerate(WEIGHTS)] + [(prefix_targets, PREFIX_WEIGHT)]
    for term_targets, weight in terms:
        present = term_targets.size(1)
        picked = log_probs[:, :present].gather(-1, term_targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        losses[:, :present] -= weight * torch.where(term_targets >= 0, picked, 0.0)
    return losses


def formula_kernel_gradient(logits, targets, prefix_targets, grad_losses):
    """HEAD's kernel gradient: g_i (cap / temperature) s (1 - s) (S_i p - H_i), S_i = sum_k w_k (every k) +
    w_p where position i has a prefix target, and 0 where position i's own target is outside the vocabulary
    (a padded piece's ignored one), H_i the weights of position i's terms on each column."""
    s = squash(logits)
    probs = torch.softmax(CAP * s, dim=-1)
    hits = torch.zeros_like(s)
    terms = [(targets[:, k : k + LENGTH], w) for k, w in enumerate(WEIGHTS)] + [(prefix_targets, PREFIX_WEIGHT)]
    for term_targets, weight in terms:
        present = term_targets.size(1)
        one_hot = F.one_hot(term_targets.clamp(min=0), VOCAB) * (term_targets >= 0).unsqueeze(-1)
        hits[:, :present] += weight * one_hot
    normaliser = (sum(WEIGHTS) + PREFIX_WEIGHT * (prefix_targets >= 0)) * (targets[:, :LENGTH] >= 0)
    return (grad_losses.double() * (CAP / TEMPERATURE)).unsqueeze(-1) * s * (1 - s) * (
        normaliser.unsqueeze(-1) * probs - hits)


def fused(logits, targets, prefix_targets, **kwargs):
    return triton_loss.triton_position_losses(logits, targets, WEIGHTS, prefix_targets, PREFIX_WEIGHT,
                                              vocab_block=BLOCK, **kwargs)


def losses_and_gradient(function, logits, grad_losses, *args, **kwargs):
    logits = logits.detach().requires_grad_()
    losses = function(logits, *args, **kwargs)
    (grad,) = torch.autograd.grad(losses, logits, grad_losses)
    return losses.detach(), grad


def grad_per_position(seed=1):
    return torch.rand(ROWS, LENGTH, generator=torch.Generator().manual_seed(seed)) + 0.5


@interpreted
def test_forward_is_the_formula():
    logits, targets, prefix_targets = make_batch()
    losses = fused(logits, targets, prefix_targets)
    assert losses.shape == (ROWS, LENGTH) and losses.dtype == torch.float32
    torch.testing.assert_close(losses.double(), formula_losses(logits, targets, prefix_targets), rtol=1e-6, atol=1e-5)


@interpreted
def test_gradient_without_full_weight_sum_is_the_loss_gradient():
    logits, targets, prefix_targets = make_batch()
    grad_losses = grad_per_position()
    _, grad = losses_and_gradient(fused, logits, grad_losses, targets, prefix_targets, full_weight_sum=False)
    _, expected = losses_and_gradient(formula_losses, logits.double(), grad_losses.double(), targets, prefix_targets)
    torch.testing.assert_close(grad.double(), expected, rtol=1e-5, atol=1e-7)


@interpreted
def test_gradient_with_full_weight_sum_is_heads_kernels():
    """Differs from the loss's own gradient where a position has fewer MTP terms than weights: at the last
    position (w_2's target is past the slice) and near the targets outside the vocabulary."""
    logits, targets, prefix_targets = make_batch()
    grad_losses = grad_per_position()
    _, grad = losses_and_gradient(fused, logits, grad_losses, targets, prefix_targets)
    expected = formula_kernel_gradient(logits, targets, prefix_targets, grad_losses)
    torch.testing.assert_close(grad.double(), expected, rtol=1e-5, atol=1e-7)
    _, own = losses_and_gradient(formula_losses, logits.double(), grad_losses.double(), targets, prefix_targets)
    assert not torch.allclose(grad[:, -1].double(), own[:, -1], atol=1e-3)


@interpreted
def test_without_prefix_targets_and_with_two_weights():
    logits, targets, _ = make_batch()
    grad_losses = grad_per_position()
    losses, grad = losses_and_gradient(triton_loss.triton_position_losses, logits, grad_losses, targets,
                                       WEIGHTS[:2], vocab_block=BLOCK)
    expected_losses, expected_grad = losses_and_gradient(kernel_position_losses, logits, grad_losses, targets,
                                                         WEIGHTS[:2])
    torch.testing.assert_close(losses, expected_losses, **AGAINST_TORCH_FLOAT32)
    torch.testing.assert_close(grad, expected_grad, **AGAINST_TORCH_FLOAT32)


def away_from_bf16_ties(logits):
    """bf16 logits whose s lies at least 1/64 of a bf16 step from a bf16 rounding tie (a logit too near
    moves to the next bf16 value): s from a sigmoid a few float32 ulps off torch's (numpy's exp in the
    interpreter, a GPU's) then still rounds to torch's bf16 value."""
    logits = logits.bfloat16()
    while True:
        s = squash(logits)
        from_tie = (s / bf16_step(s) % 1 - 0.5).abs()
        near = from_tie < 1 / 64
        if not near.any():
            return logits
        logits = torch.where(near, (logits.float() + bf16_step(logits.float())).bfloat16(), logits)


def off_the_bf16_grid(logits):
    """float32 logits that round to the given bf16 ones: a random quarter of a bf16 step larger in magnitude,
    or, where the last bit is even, exactly half a step larger (a tie, which rounds to even: back)."""
    generator = torch.Generator().manual_seed(2)
    ties = ((logits.view(torch.int16) & 1) == 0) & (torch.rand(logits.shape, generator=generator) < 0.25)
    fraction = torch.where(ties, 0.5, 0.25 * torch.rand(logits.shape, generator=generator))
    logits = logits.float()
    return logits + torch.sign(logits) * fraction * bf16_step(logits)


def bf16_step(values):
    return 2.0 ** (torch.floor(torch.log2(values.abs().clamp_min(2**-126))) - 7)


def e5m2_step(values, scale):
    """The distance between e5m2 values of magnitude |values| / scale, times scale: 2 mantissa bits,
    subnormals below 2^-14 at a step of 2^-16."""
    return 2.0 ** (torch.floor(torch.log2((values.abs() / scale).clamp_min(2**-14))) - 2) * scale


def assert_at_most_one_rounding_apart(actual, expected, step, most_apart):
    """Equal but for a last rounding landing one step apart, for at most a fraction `most_apart` of the
    values: the roundings are the same, but the value rounded may be a little off (the kernel's exp and sum
    order are not torch's, and see AGAINST_TORCH_FLOAT32). A wrong rounding (truncating, not saturating,
    no subnormals) moves more values, or further."""
    apart = (actual.double() - expected.double()).abs()
    assert (apart <= step.double() * 1.0001).all()
    assert (apart > 0).float().mean() <= most_apart


@interpreted
@pytest.mark.parametrize("numerics, dtype, grad_fp8_scale", [("record", torch.bfloat16, None),
                                                             ("record", torch.float32, None),
                                                             ("float32", torch.float32, FP8_SCALE),
                                                             ("record", torch.bfloat16, FP8_SCALE)])
def test_matches_the_kernel_gradient_with_roundings(numerics, dtype, grad_fp8_scale):
    """Record numerics (s in bf16, from logits rounded to bf16) and the gradient's saturating e5m2 rounding,
    as kernel_position_losses does them. The gradient is returned in the logits' dtype."""
    logits, targets, prefix_targets = make_batch()
    if numerics == "record":
        logits = away_from_bf16_ties(logits)
        logits = logits if dtype == torch.bfloat16 else off_the_bf16_grid(logits)
    logits = logits.to(dtype)
    grad_losses = grad_per_position()
    kwargs = dict(numerics=numerics, grad_fp8_scale=grad_fp8_scale)
    losses, grad = losses_and_gradient(fused, logits, grad_losses, targets, prefix_targets, **kwargs)
    expected_losses, expected = losses_and_gradient(kernel_position_losses, logits, grad_losses, targets, WEIGHTS,
                                                    prefix_targets, PREFIX_WEIGHT, **kwargs)
    torch.testing.assert_close(losses, expected_losses, **AGAINST_TORCH_FLOAT32)
    assert grad.dtype == dtype
    if grad_fp8_scale is None and dtype == torch.float32:
        torch.testing.assert_close(grad, expected, **AGAINST_TORCH_FLOAT32)
        return
    if grad_fp8_scale is None:  # a bf16 step is 2^-8 of a value: the most often crossed
        assert_at_most_one_rounding_apart(grad, expected, bf16_step(expected.float()), most_apart=0.05)
        return
    step = torch.maximum(e5m2_step(expected.float(), grad_fp8_scale), bf16_step(expected.float()))
    assert_at_most_one_rounding_apart(grad, expected, step, most_apart=0.002)
    if dtype == torch.float32:  # each value an e5m2 value times the scale (but for float32's rounding of both)
        scaled = grad / grad_fp8_scale
        torch.testing.assert_close(scaled.to(torch.float8_e5m2).float(), scaled, rtol=1e-6, atol=0)
    # The batch reaches both ends of e5m2: saturated values, and subnormals (some rounded to zero)
    scaled = expected.float().abs() / grad_fp8_scale
    assert torch.isclose(scaled, torch.tensor(torch.finfo(torch.float8_e5m2).max), rtol=2**-8).sum() >= 5
    assert ((scaled > 0) & (scaled < 2**-14)).sum() >= 20 and (scaled == 0).sum() >= 5


def test_available_on_cpu_only_in_the_interpreter():
    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = "from model.triton_loss import triton_loss_available as a; print(a('cpu'), a('cuda'))"
    result = subprocess.run([sys.executable, "-c", code], env=environment, capture_output=True, text=True,
                            cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == (["False", "True"] if triton_loss.triton else ["False", "False"])
