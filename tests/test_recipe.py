"""Record #46's model techniques, each checked against its formula written out here
(docs/RECORD46.md §1-2), not against the implementation."""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from config import Config, ConfigError, parse_config
from data.shards import EOT_TOKEN
from model.gpt import GPT

SEQ = 48


def small(**overrides):
    """A small model with record #46's techniques on (the speedrun preset's fields, small sizes)."""
    _, c = parse_config(["--preset", "record46"])
    c = dataclasses.replace(c, num_layers=6, model_dim=64, num_heads=2, attention_free_layers="0,3",
                            long_window_layers="2,-1", value_embed_layers="1:1,2:2,4:0,5:1",
                            unet_skips="1:3", backout_layer="4", gate_dims=12, fp8_head=False, numerics="float32")
    c = dataclasses.replace(c, **overrides)
    torch.manual_seed(0)
    model = GPT.from_config(c)
    # Untrained, outputs and gates are zero; give every weight a value so each term shows.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2 and ("proj" in name or "gate" in name or "lm_head" in name):
                p.normal_(0, 0.3)
            elif name.endswith("qkvo"):  # a merged weight's output projection
                p[3].normal_(0, 0.3)
        for name, value in (("smear_lambda", 0.7), ("backout_lambda", 0.4), ("skip_weights", 0.3)):
            if getattr(model, name, None) is not None:
                getattr(model, name).fill_(value)
    return model


def tokens(batch=2):
    torch.manual_seed(1)
    idx = torch.randint(0, 50000, (batch, SEQ))
    idx[:, 0] = EOT_TOKEN
    idx[:, 20] = EOT_TOKEN
    return idx


def rms(x):
    return x / x.pow(2).mean(-1, keepdim=True).add(torch.finfo(x.dtype).eps).sqrt()


def capture(module, what="input"):
    """Records a module's positional inputs (a pre-hook) or its output on every call."""
    seen = []
    if what == "input":
        module.register_forward_pre_hook(lambda m, args: seen.append(args))
    else:
        module.register_forward_hook(lambda m, args, out: seen.append(out))
    return seen


def test_smear_adds_a_gated_share_of_the_previous_tokens_embedding():
    model = small()
    idx = tokens()
    seen = capture(model.blocks[1])
    with torch.no_grad():
        model(idx)
        [(x, x0, *_)] = seen
        e = model.embed(idx)
        w, lam = model.smear_gate.weight[0], model.smear_lambda
        expected = e.clone()
        for t in range(1, SEQ):  # x_t + lambda * sigmoid(w . e_t[:12]) * e_{t-1}; position 0 unchanged
            expected[:, t] = e[:, t] + lam * torch.sigmoid(e[:, t, :12] @ w)[:, None] * e[:, t - 1]
    assert torch.allclose(x0, rms(expected), atol=1e-5)


def test_attention_gate_scales_each_heads_output_by_a_sigmoid_of_the_inputs_first_channels():
    model = small(merged_qkvo=False)  # separate q, k, v and proj modules, to watch their inputs and outputs
    attn = model.blocks[2].attn
    outputs = []
    attend = attn.attend
    attn.attend = lambda *a: outputs.append(attend(*a)) or outputs[-1]
    seen_x, seen_proj = capture(attn), capture(attn.proj)
    with torch.no_grad():
        model(tokens())
        [(x, *_)], [(proj_in,)] = seen_x, seen_proj
        y = outputs[0].transpose(1, 2)  # (batch, seq, heads, head_dim)
        gate = torch.sigmoid(x[..., :12] @ attn.gate.weight.T)  # (batch, seq, heads)
    assert attn.gate.weight.shape == (2, 12)
    assert torch.allclose(proj_in, (y * gate[..., None]).flatten(2), atol=1e-6)


@pytest.mark.parametrize("layer, table", [(2, 2), (3, None), (5, 1)])
def test_values_mix_in_the_layers_value_embedding(layer, table):
    model = small(attention_free_layers="0", unet_skips="", value_embed_layers="1:1,2:2,4:0,5:1", merged_qkvo=False)
    attn = model.blocks[layer].attn
    values = []
    attend = attn.attend
    attn.attend = lambda q, k, v, *a: values.append(v) or attend(q, k, v, *a)
    seen = capture(attn.v, "output")
    idx = tokens()
    with torch.no_grad():
        attn.value_embed_mix.copy_(torch.tensor([0.3, 0.9][: attn.value_embed_mix.numel()]))
        model(idx)
        [v_proj] = seen
        expected = 0.3 * v_proj
        if table is not None:
            expected = expected + 0.9 * model.value_embeds[table](idx)
    assert attn.value_embed_mix.numel() == (1 if table is None else 2)
    assert torch.allclose(values[0].transpose(1, 2).flatten(2), expected, atol=1e-6)


def test_unet_skip_adds_a_sigmoid_gated_source_output_and_backout_subtracts_a_share():
    model = small()  # skip 1 -> 3, backout after layer 4
    outs = {i: capture(model.blocks[i], "output") for i in (1, 2, 4, 5)}
    seen_3, seen_head = capture(model.blocks[3]), capture(model.lm_head)
    with torch.no_grad():
        model(tokens())
        [(x_in_3, x0, *_)], [(head_in,)] = seen_3, seen_head
        expected_in_3 = outs[2][0][0] + torch.sigmoid(torch.tensor(0.3)) * outs[1][0][0]
        expected_head_in = rms(outs[5][0][0] - 0.4 * outs[4][0][0])
    assert torch.allclose(x_in_3, expected_in_3, atol=1e-6)
    assert torch.allclose(head_in, expected_head_in, atol=1e-5)


def test_each_layer_mixes_x_and_x0_with_learned_weights_starting_at_1_1_and_0():
    model = small()
    block = model.blocks[2]
    assert block.residual_mix.tolist() == pytest.approx([1.1, 0.0])
    seen_block, seen_attn = capture(block), capture(block.attn)
    with torch.no_grad():
        block.residual_mix.copy_(torch.tensor([0.8, 0.6]))
        model(tokens())
        [(x, x0, *_)], [(attn_in, *_)] = seen_block, seen_attn
    assert torch.allclose(attn_in, rms(0.8 * x + 0.6 * x0), atol=1e-5)


def test_sigmoid_softcap_is_30_sigmoid_of_z_over_7_5():
    model = small()
    seen = capture(model.lm_head, "output")
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 20.0)
        logits = model(tokens())
        [z] = seen
    assert z.abs().max() > 60
    assert torch.allclose(logits, 30 * torch.sigmoid(z / 7.5), atol=1e-5)
    assert torch.allclose(logits, 15 * (torch.tanh(z / 15) + 1), atol=1e-4)  # the same curve


def test_training_loss_is_summed_over_tokens_and_validation_asks_for_what_it_needs():
    model = small()
    idx = tokens()
    with torch.no_grad():
        summed = model(idx[:, :-1], idx[:, 1:])
        logits = model(idx[:, :-1])
        mean = F.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten())
    assert summed.item() == pytest.approx(mean.item() * idx[:, 1:].numel(), rel=1e-5)


def test_layers_without_attention_or_mlp_have_no_such_module_and_an_empty_layer_is_skipped():
    model = small(mlp_free_layers="0,4")
    assert model.blocks[0] is None  # no attention and no MLP: not even the x0 mix
    assert model.blocks[3].attn is None and model.blocks[3].mlp is not None
    assert model.blocks[4].mlp is None and model.blocks[4].attn is not None


def test_speedrun_model_has_record_46s_parameter_count():
    """#46 has 268,665,628 parameters with 64 packed scalars, of which 24 are unused or padding
    (docs/RECORD46.md §1.1, §1.7); this model keeps the 40 used ones as separate scalars."""
    _, c = parse_config(["--preset", "record46"])
    with torch.device("meta"):
        model = GPT.from_config(c)
    d, vocab = 768, 50304
    expected = (5 * vocab * d  # token embedding, 3 value embeddings, head
                + 10 * 4 * d * d  # q, k, v, o of the 10 attention layers
                + 11 * 2 * d * 4 * d  # the 11 MLPs
                + 12 + 10 * 6 * 12  # smear gate, attention gates
                + 40)  # the used scalars
    assert sum(p.numel() for p in model.parameters()) == expected == 268_665_628 - 64 + 40


def test_uniform_init_bound_is_sqrt3_times_half_over_sqrt_dim_and_outputs_start_at_zero():
    _, c = parse_config(["--preset", "record46"])
    c = dataclasses.replace(c, num_layers=4, model_dim=256, num_heads=2, attention_free_layers="", mlp_free_layers="",
                            long_window_layers="", value_embed_layers="", unet_skips="", backout_layer="")
    torch.manual_seed(0)
    model = GPT.from_config(c)
    bound = math.sqrt(3) * 0.5 / math.sqrt(256)
    for block in model.blocks:
        q, k, v, o = block.attn.qkvo  # the merged weight: q, k, v uniform, the output projection zero
        for w in (q, k, v, block.mlp.fc.weight):
            assert w.abs().max() <= bound and w.abs().max() > 0.95 * bound
            assert w.std().item() == pytest.approx(0.5 / math.sqrt(256), rel=0.05)
        for w in (o, block.mlp.proj.weight, block.attn.gate.weight):
            assert not w.any()
    assert not model.lm_head.weight.any() and not model.smear_gate.weight.any()
    idx = tokens()
    assert model(idx[:, :-1], idx[:, 1:], reduction="mean").item() == pytest.approx(math.log(50304), abs=1e-5)


def test_a_window_limits_what_a_token_sees_to_the_window_before_it():
    # one attention layer with the short window, no smear (which looks one more token back)
    model = small(num_layers=2, attention_free_layers="1", long_window_layers="", value_embed_layers="",
                  unet_skips="", backout_layer="", smear_gate=False)
    model.set_windows((8, 16))
    idx = torch.randint(0, 50000, (1, SEQ))
    t = 40
    with torch.no_grad():
        base = model(idx)[0, t]
        for back, changes in ((9, False), (8, True)):
            changed = idx.clone()
            changed[0, t - back] = (changed[0, t - back] + 1) % 50000
            assert (not torch.allclose(model(changed)[0, t], base, atol=1e-6)) == changes, back


def test_yarn_on_a_longer_long_window_stretches_rotary_and_grows_the_scale_but_not_at_the_final_window():
    model = small()
    initial = model.rotary.frequencies.clone()
    model.set_windows((128, 384))
    assert model.attn_scale == 0.1 and torch.equal(model.rotary.frequencies, initial)
    model.set_windows((384, 896))
    assert model.attn_scale == pytest.approx(0.1 * (1 + 0.2 * math.log(896 / 384)))
    assert not torch.equal(model.rotary.frequencies, initial)
    stretched = model.rotary.frequencies.clone()
    model.set_windows((768, 2560), yarn=False)
    assert torch.equal(model.rotary.frequencies, stretched)
    model.reset_windows()
    assert model.attn_scale == 0.1 and torch.equal(model.rotary.frequencies, initial)


@pytest.mark.parametrize("field, value, message", [
    ("value_embed_layers", "3:0", "no attention"),
    ("long_window_layers", "9", "does not exist"),
    ("unet_skips", "3:1", "source layer must come before"),
    ("value_embed_layers", "1:0,2:2", "used by no layer"),
    ("attention_free_layers", "0,1,2,3,4,5", "no layer with attention"),
])
def test_layouts_that_do_not_fit_are_one_clear_error(field, value, message):
    with pytest.raises(ConfigError, match=message):
        small(**{field: value})


def test_record11_model_is_unchanged_by_the_new_fields():
    """The defaults are record #11's: its parameters, in its order, with its init draws."""
    c = Config(num_layers=2, model_dim=64, num_heads=2)
    torch.manual_seed(0)
    model = GPT.from_config(c)
    names = [n for n, _ in model.named_parameters()]
    assert names == ["skip_weights", "embed.weight"] + [
        f"blocks.{i}.{name}" for i in range(2) for name in (
            "residual_mix", "attn.value_mix", "attn.q.weight", "attn.k.weight", "attn.v.weight", "attn.proj.weight",
            "mlp.fc.weight", "mlp.proj.weight")] + ["lm_head.weight"]
    torch.manual_seed(0)  # record #11's draws: the embedding, then each block's q, k, v, proj, fc, proj
    embed = torch.nn.Embedding(50304, 64)
    q = torch.nn.Linear(64, 64, bias=False)
    assert torch.equal(model.embed.weight, embed.weight) and torch.equal(model.blocks[0].attn.q.weight, q.weight)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_validation_loss_in_slices_equals_the_loss_in_one_piece(monkeypatch, reduction):
    import model.gpt as gpt_module

    model = small()
    idx = tokens()
    with torch.no_grad():
        whole = F.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten(), reduction=reduction)
        monkeypatch.setattr(gpt_module, "EVAL_HEAD_TOKENS", 10)  # 94 tokens: 10 slices, the last short
        sliced = model(idx[:, :-1], idx[:, 1:], reduction=reduction)
    assert torch.allclose(sliced, whole, rtol=1e-5, atol=1e-5)


def test_a_summed_loss_gives_the_same_gradient_whatever_the_rows_per_micro_batch():
    """Record #46 sums each row's token losses and averages over a rank's rows (one row per rank
    on 8 GPUs): 1 micro-batch of 2 rows and 2 micro-batches of 1 row give the same gradients."""
    from config import make_plan
    from optim.optimizer import Optimizer
    from training.loop import train_step

    idx = tokens(batch=2)
    grads = []
    for micro_batches in ([(idx[:, :-1], idx[:, 1:])], [(idx[:1, :-1], idx[:1, 1:]), (idx[1:, :-1], idx[1:, 1:])]):
        model = small(adam_every=1)
        config = model.config
        optimizer = Optimizer(model, make_plan(config))
        seen = {}
        for opt in optimizer.parts:  # the gradients as the optimizers get them
            step = opt.step
            opt.step = lambda step=step: seen.update({n: p.grad.clone() for n, p in model.named_parameters()
                                                      if p.grad is not None}) or step()
        train_step(model, optimizer, micro_batches, torch.autocast("cpu", enabled=False), 0, config)
        grads.append(seen)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name in grads[0]:
        scale = grads[0][name].abs().max()
        assert (grads[0][name] - grads[1][name]).abs().max() <= 1e-4 * scale, name  # float32 reordering


def _split_and_merged_models():
    """The same small #46 model twice: Q, K, V, O as four matrices, and as one (4, dim, dim) weight."""
    split, merged = small(merged_qkvo=False), small(merged_qkvo=True)
    split_params = dict(split.named_parameters())
    with torch.no_grad():
        for name, p in merged.named_parameters():
            if name.endswith("attn.qkvo"):
                p.copy_(_stacked(split_params, name))
            else:
                p.copy_(split_params[name])
    return split, merged


def _stacked(params, merged_name):
    """The four separate matrices that the merged weight `merged_name` holds, stacked as it stores them."""
    prefix = merged_name[: -len("qkvo")]
    return torch.stack([params[prefix + m + ".weight"] for m in ("q", "k", "v", "proj")])


@pytest.mark.parametrize("hidden_init", ["uniform", "torch"])
def test_merged_qkvo_starts_from_the_same_draws_as_four_matrices(hidden_init):
    """So switching merged_qkvo off in an ablation changes nothing but the storage."""
    models = []
    for merged in (False, True):
        _, c = parse_config(["--preset", "cpu-tiny", "--merged-qkvo", str(merged), "--hidden-init", hidden_init])
        torch.manual_seed(0)
        models.append(dict(GPT.from_config(c).named_parameters()))
    split, merged = models
    for name, p in merged.items():
        if name.endswith("attn.qkvo"):
            assert torch.equal(p, _stacked(split, name))
            assert not p[3].any() and p[:3].std() > 0
        else:
            assert torch.equal(p, split[name]), name


def test_merged_qkvo_weight_is_q_k_v_and_o_stacked_with_the_same_outputs_and_gradients():
    split, merged = _split_and_merged_models()
    idx = tokens()
    losses = [model(idx[:, :-1], idx[:, 1:]) for model in (split, merged)]
    for loss in losses:
        loss.backward()
    assert torch.allclose(losses[0], losses[1], rtol=1e-6)
    grads = dict((n, p.grad) for n, p in split.named_parameters())
    for name, p in merged.named_parameters():
        if name.endswith("attn.qkvo"):
            expected = _stacked(grads, name)
        else:
            expected = grads[name]
        # gradients of order 10 (a summed loss), float32 sums in another order
        assert torch.allclose(p.grad, expected, rtol=1e-5, atol=5e-5), name
        assert p.grad.abs().sum() > 0 or expected.abs().sum() == 0, name


@pytest.mark.parametrize("optimizer", ["normuon", "muon"])
def test_the_optimizer_updates_each_piece_of_the_merged_weight_as_its_own_matrix(optimizer):
    """Record #46 orthogonalises and normalises Q, K, V and O separately: the merged weight's update
    is the four matrices' updates."""
    from config import make_plan
    from optim.optimizer import Optimizer

    split, merged = _split_and_merged_models()
    idx = tokens()
    # Muon has no orthogonalizer choice and no Adam cadence: it takes the settings an optimizer check accepts.
    muon_settings = {} if optimizer == "normuon" else dict(muon_orthogonalizer="newton_schulz", adam_every=1)
    for model in (split, merged):
        # The iteration in float32 on any CPU: on one with AMX, auto iterates in bf16, where a batch of
        # four matrices and four single ones round differently (3e-4 apart, measured), and this test is
        # about which matrices are orthogonalised, not about bf16's rounding.
        config = dataclasses.replace(model.config, optimizer=optimizer, muon_ns_dtype="float32", **muon_settings)
        model(idx[:, :-1], idx[:, 1:]).backward()
        hidden = [o for o in Optimizer(model, make_plan(config)).parts if o.__class__.__name__ != "DistAdam"][-1]
        hidden.step()
    after = dict(split.named_parameters())
    for name, p in merged.named_parameters():
        if name.endswith("attn.qkvo"):
            assert torch.allclose(p, _stacked(after, name), atol=1e-5), name
