import pytest
import torch

from model.loss import HEAD_SOFTCAP, Softcap, kernel_position_losses, position_losses, softcap

ROWS, LENGTH, VOCAB = 2, 16, 64
# HEAD's soft-cap written out: 23 sigmoid((z + 5) / 7.5)
CAP, OFFSET, TEMPERATURE = 23.0, 5.0, 7.5
# MTP and prefix weights as in HEAD's stage 1 and (mid-way) stage 2
WEIGHTS = [([1.0, 0.5, 0.25], 0.25), ([1.0, 0.3], 0.1)]


def make_batch(seed=0):
    """Rows of logits, targets and prefix targets, with a repeated target (two MTP terms on one column)
    and a prefix target equal to an MTP target, the cases where the kernel sums weights per column."""
    generator = torch.Generator().manual_seed(seed)
    logits = 8 * torch.randn(ROWS, LENGTH, VOCAB, generator=generator)
    targets = torch.randint(0, VOCAB, (ROWS, LENGTH), generator=generator)
    targets[0, 6] = targets[0, 5]
    targets[0, LENGTH - 1] = targets[0, LENGTH - 2]  # in the last positions too
    table = torch.randint(-1, VOCAB, (VOCAB,), generator=generator)  # a toy prefix table, some ids without
    prefix_targets = table[targets]
    prefix_targets[1, 3] = targets[1, 4]
    prefix_targets[1, LENGTH - 2] = targets[1, LENGTH - 1]
    prefix_targets[1, 7] = -1
    return logits, targets, prefix_targets


def squash(logits):
    """sigmoid((z + 5) / 7.5) in float64, expanded."""
    return 1 / (1 + torch.exp(-(logits.double() + OFFSET) / TEMPERATURE))


def expanded_losses(squashed, targets, weights, prefix_targets, prefix_weight):
    """loss_i by loops, from s = the squashed logits: z = 23 s, and per position i
    sum_k w_k (lse(z_i) - z_i[t_{i+k}]) for i + k < T, plus w_p (lse(z_i) - z_i[prefix_i]) if prefix_i >= 0."""
    z = CAP * squashed
    rows = []
    for r in range(z.size(0)):
        row = []
        for i in range(z.size(1)):
            lse = torch.log(torch.exp(z[r, i]).sum())
            loss = torch.zeros((), dtype=z.dtype)
            for k, w in enumerate(weights):
                if i + k < z.size(1):
                    loss = loss + w * (lse - z[r, i, targets[r, i + k]])
            if prefix_targets[r, i] >= 0:
                loss = loss + prefix_weight * (lse - z[r, i, prefix_targets[r, i]])
            row.append(loss)
        rows.append(torch.stack(row))
    return torch.stack(rows)


def kernel_gradient_formula(squashed, targets, weights, prefix_targets, prefix_weight, grad_per_position):
    """HEAD's kernel gradient by loops: g_i (23 / 7.5) s_j (1 - s_j) (S_i p_j - H_ij), with
    S_i = sum of all w_k (past the row's end too) + w_p where position i has a prefix target, and
    H_ij = the weights of the terms of position i whose target is j."""
    s = squashed
    probs = torch.softmax(CAP * s, dim=-1)
    grad = torch.zeros_like(s)
    for r in range(s.size(0)):
        for i in range(s.size(1)):
            has_prefix = prefix_targets[r, i] >= 0
            total = sum(weights) + (prefix_weight if has_prefix else 0.0)
            hits = torch.zeros(s.size(-1), dtype=s.dtype)
            for k, w in enumerate(weights):
                if i + k < s.size(1):
                    hits[targets[r, i + k]] += w
            if has_prefix:
                hits[prefix_targets[r, i]] += prefix_weight
            grad[r, i] = (grad_per_position[r, i] * (CAP / TEMPERATURE) * s[r, i] * (1 - s[r, i])
                          * (total * probs[r, i] - hits))
    return grad


def autograd_of_expanded(logits, targets, weights, prefix_targets, prefix_weight, grad_per_position):
    logits = logits.detach().double().requires_grad_()
    losses = expanded_losses(squash(logits), targets, weights, prefix_targets, prefix_weight)
    (grad,) = torch.autograd.grad(losses, logits, grad_per_position.double())
    return losses.detach(), grad


def grad_of(losses_fn, logits, grad_per_position, **kwargs):
    logits = logits.detach().clone().requires_grad_()
    losses = losses_fn(logits, **kwargs)
    (grad,) = torch.autograd.grad(losses, logits, grad_per_position)
    return losses.detach(), grad


# -- soft-cap

def test_softcap_forms():
    z = torch.linspace(-40, 40, 81, dtype=torch.float64)
    assert torch.allclose(softcap(z, *HEAD_SOFTCAP), 23 / (1 + torch.exp(-(z + 5) / 7.5)))
    assert torch.allclose(softcap(z, *Softcap(30.0, 7.5)), 30 / (1 + torch.exp(-z / 7.5)))  # record #46
    tanh_form = (torch.exp(z / 30) - torch.exp(-z / 30)) / (torch.exp(z / 30) + torch.exp(-z / 30))
    assert torch.allclose(softcap(z, *Softcap(30.0, 30.0, kind="tanh")), 30 * tanh_form)  # record #11
    with pytest.raises(ValueError):
        softcap(z, 30.0, 30.0, kind="relu")


# -- the float32 reference

@pytest.mark.parametrize("weights, prefix_weight", WEIGHTS)
def test_reference_is_the_expanded_loss_and_its_gradient(weights, prefix_weight):
    logits, targets, prefix_targets = make_batch()
    grad_out = torch.rand(ROWS, LENGTH, generator=torch.Generator().manual_seed(1))
    losses, grad = grad_of(position_losses, logits, grad_out, targets=targets, mtp_weights=weights,
                           prefix_targets=prefix_targets, prefix_weight=prefix_weight)
    expected, expected_grad = autograd_of_expanded(logits, targets, weights, prefix_targets, prefix_weight, grad_out)
    assert losses.dtype == torch.float32 and losses.shape == (ROWS, LENGTH)
    torch.testing.assert_close(losses.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-4, atol=1e-6)


def test_reference_without_prefix_targets_and_with_targets_outside_the_vocabulary():
    logits, targets, _ = make_batch()
    no_prefix = torch.full_like(targets, -1)
    plain = position_losses(logits, targets, [1.0, 0.5])
    expected = expanded_losses(squash(logits), targets, [1.0, 0.5], no_prefix, 0.0)
    torch.testing.assert_close(plain.double(), expected, rtol=1e-5, atol=1e-5)
    # A target of -1 (or >= V) drops its terms: position 4's k=0 term and position 3's k=1 term.
    ignored = targets.clone()
    ignored[0, 4] = -1
    losses = position_losses(logits, ignored, [1.0, 0.5])
    z = CAP * squash(logits[0])
    lse = torch.logsumexp(z, dim=-1)
    assert losses[0, 4].item() == pytest.approx((0.5 * (lse[4] - z[4, targets[0, 5]])).item(), rel=1e-5)
    assert losses[0, 3].item() == pytest.approx((lse[3] - z[3, targets[0, 3]]).item(), rel=1e-5)


# -- HEAD's kernel gradient, float32 numerics

@pytest.mark.parametrize("weights, prefix_weight", WEIGHTS)
def test_kernel_gradient_is_the_loss_gradient_but_on_the_last_positions(weights, prefix_weight):
    logits, targets, prefix_targets = make_batch()
    grad_out = torch.rand(ROWS, LENGTH, generator=torch.Generator().manual_seed(1))
    args = dict(targets=targets, mtp_weights=weights, prefix_targets=prefix_targets, prefix_weight=prefix_weight)
    losses, grad = grad_of(kernel_position_losses, logits, grad_out, **args)
    reference, reference_grad = grad_of(position_losses, logits, grad_out, **args)
    assert torch.equal(losses, reference)

    tail = len(weights) - 1  # positions whose MTP window runs past the row's end
    body = LENGTH - tail
    torch.testing.assert_close(grad[:, :body], reference_grad[:, :body], rtol=1e-4, atol=1e-6)
    formula = kernel_gradient_formula(squash(logits), targets, weights, prefix_targets, prefix_weight, grad_out)
    torch.testing.assert_close(grad.double(), formula, rtol=1e-4, atol=1e-6)
    # the tail's gradient is really another: a softmax share of the missing weights per position
    assert (grad[:, body:] - reference_grad[:, body:]).abs().amax() > 1e-2

    _, exact_grad = grad_of(kernel_position_losses, logits, grad_out, full_weight_sum=False, **args)
    torch.testing.assert_close(exact_grad, reference_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("losses_fn", [position_losses, kernel_position_losses])
def test_a_row_padded_with_ignored_targets_is_the_shorter_row(losses_fn):
    """A piece of a row padded to a fixed length (data/loader.py: targets -100 after it, no prefix target): the
    padding adds no loss and no gradient, and the piece's own positions get what the piece alone would,
    the kernel's full weight sum at its end included."""
    logits, targets, prefix_targets = make_batch()
    weights, prefix_weight = WEIGHTS[0]
    grad_out = torch.rand(ROWS, LENGTH, generator=torch.Generator().manual_seed(1))
    real = LENGTH - 5
    padded_targets, padded_prefix = targets.clone(), prefix_targets.clone()
    padded_targets[:, real:], padded_prefix[:, real:] = -100, -1
    losses, grad = grad_of(losses_fn, logits, grad_out, targets=padded_targets, mtp_weights=weights,
                           prefix_targets=padded_prefix, prefix_weight=prefix_weight)
    assert torch.equal(losses[:, real:], torch.zeros(ROWS, 5)) and torch.equal(grad[:, real:], torch.zeros_like(grad[:, real:]))
    alone, alone_grad = grad_of(losses_fn, logits[:, :real], grad_out[:, :real], targets=targets[:, :real],
                                mtp_weights=weights, prefix_targets=prefix_targets[:, :real],
                                prefix_weight=prefix_weight)
    torch.testing.assert_close(losses[:, :real], alone, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad[:, :real], alone_grad, rtol=1e-6, atol=1e-7)


def test_kernel_gradient_of_the_scaled_sum_is_heads():
    """HEAD takes sum(loss) * grad_scale and bakes grad_scale into the kernel's gradient: the same."""
    logits, targets, prefix_targets = make_batch()
    weights, prefix_weight = WEIGHTS[0]
    grad_scale = 0.125
    logits = logits.requires_grad_()
    loss = kernel_position_losses(logits, targets, torch.tensor(weights), prefix_targets,
                                  torch.tensor([prefix_weight])).sum() * grad_scale
    loss.backward()
    formula = kernel_gradient_formula(squash(logits.detach()), targets, weights, prefix_targets, prefix_weight,
                                      torch.full((ROWS, LENGTH), grad_scale))
    torch.testing.assert_close(logits.grad.double(), formula, rtol=1e-4, atol=1e-7)


def test_kernel_gradient_without_prefix_targets():
    logits, targets, _ = make_batch()
    grad_out = torch.ones(ROWS, LENGTH)
    _, grad = grad_of(kernel_position_losses, logits, grad_out, targets=targets, mtp_weights=[1.0, 0.5, 0.25])
    formula = kernel_gradient_formula(squash(logits), targets, [1.0, 0.5, 0.25], torch.full_like(targets, -1),
                                      0.0, grad_out)
    torch.testing.assert_close(grad.double(), formula, rtol=1e-4, atol=1e-6)


# -- HEAD's kernel gradient, record numerics

def bf16_squashed(logits):
    """The kernel's s: sigmoid((z + 5) / 7.5) of bf16 logits, in float32, rounded to bf16."""
    s = torch.sigmoid((logits.bfloat16().float() + OFFSET) / TEMPERATURE).bfloat16().double()
    # within half a bf16 step: bf16 keeps 8 significant bits, so at most 2^-8 of the value
    assert ((s - squash(logits.bfloat16())).abs() <= 2 ** -8 * s).all()
    return s


@pytest.mark.parametrize("weights, prefix_weight", WEIGHTS)
def test_record_numerics_use_the_bf16_sigmoid(weights, prefix_weight):
    logits, targets, prefix_targets = make_batch()
    grad_out = torch.rand(ROWS, LENGTH, generator=torch.Generator().manual_seed(1))
    args = dict(targets=targets, mtp_weights=weights, prefix_targets=prefix_targets, prefix_weight=prefix_weight,
                numerics="record")
    losses, grad = grad_of(kernel_position_losses, logits.bfloat16(), grad_out, **args)
    assert losses.dtype == torch.float32 and grad.dtype == torch.bfloat16
    s = bf16_squashed(logits)
    expected = expanded_losses(s, targets, weights, prefix_targets, prefix_weight)
    torch.testing.assert_close(losses.double(), expected, rtol=1e-5, atol=1e-5)
    formula = kernel_gradient_formula(s, targets, weights, prefix_targets, prefix_weight, grad_out)
    torch.testing.assert_close(grad.double(), formula, rtol=2 ** -8, atol=1e-6)  # grad returned in bf16
    # float32 logits are rounded to bf16 first, as HEAD's head returns them
    losses_from_float, _ = grad_of(kernel_position_losses, logits, grad_out, **args)
    assert torch.equal(losses_from_float, losses)
    # and the bf16 rounding of s moves the loss off the float32 one
    assert not torch.allclose(losses, position_losses(logits.bfloat16(), targets, weights, prefix_targets,
                                                      prefix_weight), rtol=1e-6, atol=0)


def test_record_gradient_rounded_to_e5m2():
    logits, targets, prefix_targets = make_batch()
    weights, prefix_weight = WEIGHTS[0]
    grad_scale = 0.5
    scale = grad_scale * 0.75 / 448  # HEAD's grad_s
    grad_out = torch.full((ROWS, LENGTH), grad_scale)
    args = dict(targets=targets, mtp_weights=weights, prefix_targets=prefix_targets, prefix_weight=prefix_weight,
                numerics="record", grad_fp8_scale=scale)
    _, grad = grad_of(kernel_position_losses, logits.float(), grad_out, **args)
    exact = kernel_gradient_formula(bf16_squashed(logits), targets, weights, prefix_targets, prefix_weight,
                                    grad_out) / scale
    rounded = grad.double() / scale
    # on e5m2's grid: 3 significant bits, steps of 2^-16 below 2^-14
    on_grid = rounded.float().to(torch.float8_e5m2).double()
    torch.testing.assert_close(rounded, on_grid, rtol=1e-6, atol=0)
    # within half a step of the exact value: 2^-3 of it, or 2^-17 in the subnormal range
    assert ((rounded - exact).abs() <= torch.maximum(2 ** -3 * exact.abs(), torch.tensor(2.0 ** -17))).all()
    assert (rounded != exact).any()
    # beyond e5m2's largest finite value 57344 the kernel saturates instead of overflowing
    _, huge = grad_of(kernel_position_losses, logits.float(), 1e9 * grad_out, **args)
    assert torch.isfinite(huge).all() and (huge.abs() / scale).amax().item() == pytest.approx(57344)


def test_kernel_losses_refuse_bad_arguments():
    logits, targets, _ = make_batch()
    with pytest.raises(ValueError):
        kernel_position_losses(logits, targets, [1.0], numerics="fp8")
    with pytest.raises(ValueError):
        kernel_position_losses(logits, targets, [1.0], cap=Softcap(30.0, 30.0, kind="tanh"))
    with pytest.raises(ValueError):
        position_losses(logits, targets[:, 1:], [1.0])


# -- HEAD's weights by step

# HEAD's 1270 scheduled steps in thirds, round(1270/3) = 423 and round(2*1270/3) = 847, then 15 more
