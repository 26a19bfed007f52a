"""--numerics record: record #46's bf16 roundings, each against the rounding written out here."""
import dataclasses
from unittest import mock

import torch
import torch.nn.functional as F

from config import Config, make_plan
from model.gpt import GPT
from tests.util import RECORD46_TINY

VOCAB = 512


def tiny_plan(numerics):
    config = dataclasses.replace(Config(**RECORD46_TINY), vocab_size=VOCAB, bos_token=0, numerics=numerics)
    return make_plan(config)


def record_model():
    torch.manual_seed(0)
    model = GPT(tiny_plan("record"))
    with torch.no_grad():  # a head that is not zero, so that its roundings show
        model.lm_head.weight.copy_(torch.randn_like(model.lm_head.weight, dtype=torch.float32) * 0.05)
    return model.eval()


def test_record_numerics_store_the_records_tables_head_and_gates_in_bf16():
    model = record_model()
    # record #46 casts every nn.Embedding and nn.Linear of its model to bf16: the token and value
    # embeddings, the head and the smear and attention gates; its other weights stay float32.
    bf16 = {name for name, p in model.named_parameters() if p.dtype == torch.bfloat16}
    expected = {name for name, _ in model.named_parameters()
                if name.split(".")[0] in ("embed", "value_embeds", "lm_head", "smear_gate")
                or name.endswith("attn.gate.weight")}
    assert bf16 == expected and "embed.weight" in expected and any("attn.gate" in n for n in expected)
    assert all(p.dtype == torch.float32 for name, p in model.named_parameters() if name not in expected)
    assert all(p.dtype == torch.float32 for p in GPT(tiny_plan("float32")).parameters())


def test_the_record_head_is_a_bf16_matmul_then_a_float32_softcap():
    model = record_model()
    x = F.rms_norm(torch.randn(3, 5, model.config.model_dim), (model.config.model_dim,))
    weight = model.lm_head.weight
    bf16_logits = (x.bfloat16().float() @ weight.float().T).bfloat16().float()
    assert torch.allclose(model.head(x), 30 * torch.sigmoid(bf16_logits / 7.5), rtol=0, atol=1e-5)
    float32_logits = x @ weight.float().T
    assert torch.allclose(model.head(x, float32=True), 30 * torch.sigmoid(float32_logits / 7.5), rtol=0, atol=1e-5)
    assert not torch.allclose(model.head(x), model.head(x, float32=True), rtol=0, atol=1e-5)


def test_validation_gives_the_records_loss_and_the_float32_heads():
    model = record_model()
    idx = torch.randint(1, VOCAB, (2, 64), generator=torch.Generator().manual_seed(1))
    targets = idx.roll(-1, dims=1)
    with torch.no_grad(), mock.patch.object(model, "head", wraps=model.head) as head:
        loss, loss_float32 = model(idx, targets, reduction="mean", with_float32=True)
        assert torch.equal(loss, model(idx, targets, reduction="mean"))
        x = head.call_args_list[0].args[0]  # the final hidden state, through each head written out
        expected = F.cross_entropy(model.head(x), targets.reshape(-1))
        expected_float32 = F.cross_entropy(model.head(x, float32=True), targets.reshape(-1))
    assert torch.allclose(loss, expected) and torch.allclose(loss_float32, expected_float32)
    assert loss != loss_float32


def test_record_numerics_round_the_rotary_tables_to_bf16():
    model = record_model()
    rotary = model.rotary
    x = torch.randn(1, 40, 2, rotary.head_dim)
    angles = torch.arange(40, dtype=torch.float32)[:, None] * rotary.frequencies[None]
    cos, sin = angles.cos().bfloat16().float()[None, :, None], angles.sin().bfloat16().float()[None, :, None]
    x1, x2 = x.chunk(2, dim=-1)
    expected = torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)
    assert torch.allclose(rotary(x), expected, rtol=0, atol=1e-6)
    unrounded = GPT(tiny_plan("float32")).rotary(x)
    assert not torch.allclose(rotary(x), unrounded, rtol=0, atol=1e-6)


def test_a_record_numerics_step_trains_the_bf16_weights_with_bf16_moments():
    from optim.optimizer import Optimizer

    model = record_model().train()
    plan = tiny_plan("record")
    optimizer = Optimizer(model, plan)
    idx = torch.randint(1, VOCAB, (1, 512), generator=torch.Generator().manual_seed(2))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for step in range(2):  # Adam steps on odd steps
        model.set_windows(plan.windows_at(step))
        optimizer.set_schedules(step)
        model(idx, idx.roll(-1)).backward()
        optimizer.step(step)
    assert not torch.equal(model.embed.weight, before["embed.weight"]) and model.embed.weight.dtype == torch.bfloat16
    moments = [s for s in optimizer.adam.state.values() if s]
    assert moments and all(s["exp_avg"].dtype == s["exp_avg_sq"].dtype == torch.bfloat16 for s in moments)
    assert optimizer.muon.round_once and optimizer.muon.ns_dtype == "bfloat16"
