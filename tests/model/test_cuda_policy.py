"""Every preset and attention backend, typed as CUDA autocast types it, trained and validated on CPU.

CPU autocast keeps `rms_norm` in bf16 where CUDA autocast returns float32, so a dtype mix that
only a GPU run produces never shows in a plain CPU test. `model.cuda_autocast` makes CPU
autocast cast as CUDA's does; these tests check what reaches attention, the head and the loss.
"""
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_mask

from config import PRESETS, Config, make_plan
from data.loader import IGNORED_TARGET
from model.attention import ATTENTION_BACKENDS
import model.gpt as gpt_module
from model.gpt import GPT
from model.cuda_autocast import cuda_autocast_policy, ops_with_autocast_kernel
from optim.optimizer import Optimizer
from tests.util import COMPACT_BOS, COMPACT_VOCAB_SIZE
from training.loop import prepare_step, train_step, validation_loss

# torch 2.12 put rms_norm on CUDA autocast's float32 list (the pinned 2.13 has it; a GPU image
# with an older torch does not), so the harness must read it from the installed torch.
RMS_NORM_IN_FLOAT32 = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 12)


def test_the_emulation_follows_cuda_rules_that_cpu_autocast_does_not():
    x = torch.randn(4, 8)
    w = torch.randn(8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert F.rms_norm(x.bfloat16(), (8,)).dtype == torch.bfloat16  # CPU's rule
        assert F.softmax(x.bfloat16(), -1).dtype == torch.bfloat16
        assert torch.linalg.inv(w.bfloat16()).dtype == torch.float32  # CPU casts inv to float32; CUDA does not
    with cuda_autocast_policy(), torch.autocast("cpu", dtype=torch.bfloat16):
        # On CUDA's float32 list since torch 2.12; before, CUDA autocast had no rule for it.
        assert F.rms_norm(x.bfloat16(), (8,)).dtype == (torch.float32 if RMS_NORM_IN_FLOAT32 else torch.bfloat16)
        assert F.softmax(x.bfloat16(), -1).dtype == torch.float32
        assert F.linear(x, w).dtype == torch.bfloat16  # on CUDA's lower-precision list
        assert torch.cat([x, x.bfloat16()]).dtype == torch.float32  # no rule: type promotion
        with pytest.raises(RuntimeError, match="Low precision dtypes not supported"):
            torch.linalg.inv(w.bfloat16())  # as on a GPU: not cast, and bf16 is refused
        assert (x.bfloat16() * 2).dtype == torch.bfloat16  # no autocast rule at all
    with torch.autocast("cpu", dtype=torch.bfloat16):  # leaving the context restores CPU's rules
        assert F.rms_norm(x.bfloat16(), (8,)).dtype == torch.bfloat16


def test_the_op_lists_come_from_the_dispatcher():
    cuda_ops = ops_with_autocast_kernel("AutocastCUDA")
    assert {"aten::linear", "aten::mm", "aten::softmax.int", "aten::nll_loss"} <= cuda_ops
    assert ("aten::rms_norm" in cuda_ops) == RMS_NORM_IN_FLOAT32
    assert "aten::cat" not in cuda_ops and "aten::cat" in ops_with_autocast_kernel("AutocastCPU")


class DtypeProbe:
    """Records the dtypes reaching attention, the head and the loss of a GPT."""

    def __init__(self, model, monkeypatch):
        self.attention, self.head_in, self.head_out, self.loss_in = [], [], [], []
        for block in model.blocks:
            if block is None or block.attn is None:
                continue
            attend = block.attn.attend

            def spy(q, k, v, mask, scale=None, attend=attend):
                self.attention.append((q.dtype, k.dtype, v.dtype))
                if isinstance(mask, BlockMask) and torch.is_grad_enabled() and q.requires_grad:
                    # FlexAttention has no CPU backward: the same mask_mod, densely, through SDPA.
                    dense = create_mask(mask.mask_mod, q.size(0), None, q.size(-2), k.size(-2), q.device)
                    out = F.scaled_dot_product_attention(q, k, v, attn_mask=dense, scale=scale)
                else:
                    out = attend(q, k, v, mask, scale)
                self.attention.append((out.dtype,))
                return out

            block.attn.attend = spy
        model.lm_head.register_forward_hook(self._head)
        fp8_linear = gpt_module.fp8_linear

        def fp8_spy(x, *args):  # the FP8 head (record #46, in training) bypasses lm_head's forward
            out = fp8_linear(x, *args)
            self._head(None, (x,), out)
            return out

        monkeypatch.setattr(gpt_module, "fp8_linear", fp8_spy)
        cross_entropy = F.cross_entropy

        def loss_spy(logits, *args, **kwargs):
            self.loss_in.append(logits.dtype)
            return cross_entropy(logits, *args, **kwargs)

        monkeypatch.setattr(F, "cross_entropy", loss_spy)
        for name in ("position_losses", "kernel_position_losses"):  # HEAD's training loss
            monkeypatch.setattr(gpt_module, name, self._loss_spy(getattr(gpt_module, name)))

    def _loss_spy(self, loss):
        def spy(logits, *args, **kwargs):
            self.loss_in.append(logits.dtype)
            return loss(logits, *args, **kwargs)

        return spy

    def _head(self, module, inputs, output):
        self.head_in.append(inputs[0].dtype)
        self.head_out.append(output.dtype)

    def clear(self):
        for seen in (self.attention, self.head_in, self.head_out, self.loss_in):
            seen.clear()


def tokens_with_documents(rows, config, generator):
    idx = torch.randint(0, config.vocab_size, (rows, config.seq_len + 1), generator=generator)
    idx[:, 0] = config.bos_token
    idx[:, config.seq_len // 3] = config.bos_token  # a second document in every row
    return idx


@pytest.mark.parametrize("attention", sorted(ATTENTION_BACKENDS))
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_cuda_typed_training_and_validation(preset, attention, monkeypatch):
    """Accumulated training steps and a validation pass of the preset's model, CUDA-typed.

    Every field of the preset holds except the sizes: 128 channels in heads of the preset's size,
    32-token sequences, a vocabulary of 8,192 (the compact corpus's, documents starting at id 0).
    bf16 matmuls run 15x slower than float32 on CPUs without AVX-512 (this one), dtypes do not
    depend on sizes, and the full-size model is typed the same way (at no cost, on fake tensors)
    by the memory estimate's test.
    """
    preset_config = Config(**PRESETS[preset])
    head_dim = preset_config.model_dim // preset_config.num_heads
    # HEAD's paired heads and MUDD's value gate need an even number of heads
    num_heads = max(1 if preset_config.residual == "block" else 2, 128 // head_dim)
    config = dataclasses.replace(preset_config, seq_len=32, num_heads=num_heads, model_dim=num_heads * head_dim,
                                 vocab_size=COMPACT_VOCAB_SIZE, bos_token=COMPACT_BOS,
                                 bigram_rows=min(preset_config.bigram_rows, 1024),
                                 # the float8 MLP (slow on a CPU) with one backend: its dtypes do not depend on it
                                 fp8_mlp=preset_config.fp8_mlp and attention == "sdpa")
    torch.manual_seed(0)
    plan = make_plan(config)
    model = GPT(plan, attention)
    # the prefix-token loss's table: any ids will do for the dtypes
    model.prefix_table = torch.randint(-1, config.vocab_size, (config.vocab_size,), generator=torch.Generator())
    optimizer = Optimizer(model, plan)
    probe = DtypeProbe(model, monkeypatch)
    generator = torch.Generator().manual_seed(0)
    batches = [tokens_with_documents(1, config, generator) for _ in range(2)]
    micro_batches = [(b[:, :-1], b[:, 1:]) for b in batches]
    # the second as a padded piece of a split row (data/loader.py): <|endoftext|> inputs and ignored targets at its end
    inputs, targets = (t.clone() for t in micro_batches[1])
    inputs[:, -8:], targets[:, -8:] = config.bos_token, IGNORED_TARGET
    micro_batches[1] = (inputs, targets)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    grads = {}
    for p_name, p in model.named_parameters():
        p.register_post_accumulate_grad_hook(lambda p, name=p_name: grads.__setitem__(name, p.grad.dtype))

    with cuda_autocast_policy():
        # The zero-initialised head passes gradients on once Adam has moved it: after step 0, or
        # after step 1 when Adam steps every second step (record #46).
        for step in range(2 + config.adam_every):
            prepare_step(model, optimizer, plan, step)  # HEAD: its loss weights too
            loss = train_step(model, optimizer, micro_batches, autocast, step, config)
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        # Attention gets q, k and v in one dtype, the autocast one, as a GPU kernel needs them.
        assert probe.attention and all(set(d) == {torch.bfloat16} for d in probe.attention), probe.attention
        assert set(probe.head_out) == {torch.bfloat16}  # the head's matmul runs in bf16
        assert set(probe.loss_in) == {torch.float32}  # the loss sees float32 logits
        # Backward: every parameter got a gradient in its own dtype, float32 but for the weights that
        # --numerics record stores in bf16; the optimizers kept each weight's dtype and moved them.
        bf16 = {id(p) for p in model.bf16_parameters()} if config.numerics == "record" else set()
        assert bool(bf16) == (config.numerics == "record")
        if config.mantissa_weights:  # NorMuon's matrices in bf16, their float32 masters' low halves beside them
            bf16 |= {id(p) for group in optimizer.muon.param_groups for p in group["params"]}
        expected = {name: torch.bfloat16 if id(p) in bf16 else torch.float32 for name, p in model.named_parameters()}
        assert grads == expected
        for name, p in model.named_parameters():
            assert p.dtype == expected[name], name
        moved = [name for name, p in model.named_parameters() if not torch.equal(p, before[name])]
        first = next(i for i, b in enumerate(model.blocks) if b is not None and b.attn is not None)
        attention_out = f"blocks.{first}.attn." + ("qkvo" if config.merged_qkvo else "proj.weight")
        assert {"embed.weight", "lm_head.weight", attention_out, f"blocks.{first}.mlp.proj.weight"} <= set(moved)
        if config.fp8_head or config.fp8_mlp:  # the CPU runs the FP8 paths as a Hopper GPU would
            assert model.training and gpt_module.fp8_supported(torch.device("cpu"))
        if config.fp8_mlp:  # each MLP's float8 weights made before every step, its activation scale measured
            states = [b.mlp.fp8 for b in model.blocks if b is not None and b.mlp is not None]
            assert states and all(s.quantizations == 2 + config.adam_every and s.post_amax > 0 for s in states)

        probe.clear()
        val = tokens_with_documents(2, config, generator)
        record = config.numerics == "record"  # then also the loss with a float32 head
        val_loss = validation_loss(model, [(val[:, :-1], val[:, 1:])], autocast, torch.device("cpu"), with_float32=record)
        for loss in val_loss if record else (val_loss,):
            assert loss == loss and loss > 0
        assert probe.attention and all(set(d) == {torch.bfloat16} for d in probe.attention), probe.attention
        assert set(probe.head_out) == {torch.bfloat16} and set(probe.loss_in) == {torch.float32}
