"""The fast paths as the model and the run use them: which one a field picks where, the Triton kernels in
the whole model against its plain form, and the float8 MLP's weights made once per step and carried
through a resume. The kernels themselves are tested in test_triton_mlp.py, test_triton_loss.py and
test_fp8_mlp.py."""
import dataclasses

import pytest
import torch

from config import PRESETS, Config, ConfigError, make_plan
from model import triton_loss, triton_mlp
from model.fp8 import fp8_supported
from model.gpt import GPT, FP8_BOOTSTRAP_STEPS, kernel_choice
from optim.optimizer import Optimizer
from training.loop import prepare_step, train_step
from training.setup import resolve_runtime

pytest.importorskip("triton")
CPU = torch.device("cpu")

# HEAD's recipe (every technique, the multi-token and prefix loss) small enough for Triton's interpreter
TINY_HEAD = dict(num_layers=8, num_heads=2, model_dim=32, vocab_size=320, bos_token=0, seq_len=64, batch_tokens=128,
                 bigram_rows=97, bigram_sign_rows=64, val_tokens=128, steps=24, extension_steps=0, window_block=8,
                 dc_window=8, max_doc_len_stages="", max_doc_len=0, attention_free_layers="4",
                 long_window_layers="2,7", value_embed_layers="1:0,6:1,7:2", unet_skips="2:4",
                 attn_input_layers="6:5,7:5", paired_head_layers="0,6", xsa_layers="1,2,3,5", dc_layers="7",
                 gated_attn_layers="2,7", mudd_gate_layer=3, numerics="float32", val_seq_len=0, fp8_mlp=False,
                 mantissa_weights=False)


def tiny_head(**fields):
    return Config(**{**PRESETS["speedrun"], **TINY_HEAD, **fields})


@pytest.mark.parametrize("field, device, available, expected", [
    ("auto", "cuda", True, "triton"), ("auto", "cuda", False, "plain"), ("auto", "cpu", True, "plain"),
    ("plain", "cuda", True, "plain"), ("triton", "cpu", True, "triton")])
def test_auto_takes_a_kernel_on_a_gpu_where_it_runs_and_a_name_is_taken_as_it_is(field, device, available, expected):
    assert kernel_choice(field, lambda d: available, torch.device(device)) == expected


def test_a_run_refuses_a_triton_kernel_where_it_cannot_run(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # a plain process on a CPU
    config = tiny_head(device="cpu", prefix_weight_stages="")  # no prefix table to build
    with pytest.raises(ConfigError, match="--mlp-kernel triton needs CUDA and Triton"):
        resolve_runtime(make_plan(dataclasses.replace(config, mlp_kernel="triton")))
    runtime = resolve_runtime(make_plan(config))
    assert (runtime.mlp_kernel, runtime.loss_kernel) == ("plain", "plain")  # the speedrun's auto, on a CPU


def train(config, steps, batches, model=None, optimizer=None, first=0):
    plan = make_plan(config)
    if model is None:
        torch.manual_seed(0)
        model = GPT(plan, "sdpa")
        model.prefix_table = torch.randint(-1, config.vocab_size, (config.vocab_size,),
                                           generator=torch.Generator().manual_seed(1))
        optimizer = Optimizer(model, plan)
    losses = []
    for step in range(first, first + steps):
        prepare_step(model, optimizer, plan, step)
        losses.append(train_step(model, optimizer, [batches[step]], torch.autocast("cpu", enabled=False), step,
                                 config).item())
    return model, optimizer, losses


def token_batches(config, steps):
    generator = torch.Generator().manual_seed(2)
    rows = torch.randint(1, config.vocab_size, (steps, config.batch_tokens // config.seq_len, config.seq_len + 1),
                         generator=generator)
    rows[:, :, :: 23] = config.bos_token  # documents
    return [(r[:, :-1], r[:, 1:]) for r in rows]


@pytest.mark.skipif(not (triton_mlp.triton_mlp_available("cpu") and triton_loss.triton_loss_available("cpu")),
                    reason="needs Triton's interpreter, which tests/conftest.py turns on where no GPU is")
def test_the_triton_mlp_and_loss_train_the_model_as_its_plain_form_does():
    """HEAD's model in float32 (the interpreter's bf16 matmul is broken): the same losses and weights after
    three updates, the multi-token and prefix terms included, through every MLP and the sliced loss."""
    config = tiny_head()
    batches = token_batches(config, 3)
    plain_model, _, plain = train(config, 3, batches)
    calls = []
    launch = triton_mlp._launch
    triton_mlp._launch = lambda *args: calls.append(1) or launch(*args)  # the kernel really runs
    try:
        fast_model, _, fast = train(dataclasses.replace(config, mlp_kernel="triton", loss_kernel="triton"), 3, batches)
    finally:
        triton_mlp._launch = launch
    assert len(calls) == 3 * 2 * sum(b is not None and b.mlp is not None for b in fast_model.blocks)
    assert fast == pytest.approx(plain, rel=1e-5, abs=1e-5) and plain[-1] < plain[0]
    for (name, p), q in zip(plain_model.named_parameters(), fast_model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.skipif(not fp8_supported("cpu"), reason="this torch build's CPU torch._scaled_mm does not take float8")
def test_the_fp8_mlp_weights_are_made_each_step_and_a_resumed_run_continues_exactly():
    # two layers (a CPU's float8 matmuls are slow), as wide as float8 matmuls on CUDA need (multiples of 16)
    config = Config(num_layers=2, num_heads=2, model_dim=64, vocab_size=320, bos_token=0, seq_len=64,
                    batch_tokens=128, val_tokens=128, steps=24, fp8_mlp=True)
    steps = FP8_BOOTSTRAP_STEPS + 3  # past the bootstrap, into W2's delayed scale
    batches = token_batches(config, steps)
    model, _, whole = train(config, steps, batches)
    states = [block.mlp.fp8 for block in model.blocks]
    assert all(s.quantizations == steps for s in states)
    # past the bootstrap, W2's copy uses the scale its previous quantisation computed (headroom 1.12)
    assert states[1].proj_scale != model.blocks[1].mlp.proj.weight.detach().abs().amax() / 448
    # the float8 forward is in use: training without it ends elsewhere
    _, _, bf16 = train(dataclasses.replace(config, fp8_mlp=False), steps, batches)
    assert whole != bf16

    cut = FP8_BOOTSTRAP_STEPS + 1  # the first step that uses a delayed scale is the resumed run's first
    model, optimizer, first = train(config, cut, batches)
    saved = {"model": model.state_dict(), "optimizer": optimizer.local_state()}
    torch.manual_seed(5)  # another init, overwritten by the checkpoint
    resumed = GPT(make_plan(config), "sdpa")
    optimizer = Optimizer(resumed, make_plan(config))
    resumed.load_state_dict(saved["model"])
    optimizer.load_local_state(saved["optimizer"])
    _, _, rest = train(config, steps - cut, batches, resumed, optimizer, first=cut)
    assert first + rest == whole
