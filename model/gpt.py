"""A GPT-2-small-class transformer with the modded-nanogpt record architectures.

Common to every record: rotary positions, RMSNorm without weights, QK-norm, ReLU^2 MLP, zero
output projections and head, untied embedding and head, a soft-capped head, and every layer
mixing in the normalised embedding x0. The rest is switched by config fields (config.py), each
a technique of a record:

- record #11: attention values mix in the first layer's values (value_residual); U-net skips
  join each first-half layer to its mirror in the second half (unet_skips=all); tanh soft-cap.
- record #46: layers without attention or MLP; value embeddings mixed into the values of some
  layers; one gated U-net skip and a backout; a smear gate looking one token back; a sparse
  per-head attention gate; half-truncated rotary with YaRN when windows grow; short and long
  sliding windows; a sigmoid soft-cap; an FP8 head; a uniform init.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from config import Config, ConfigError, config_from_dict, make_plan
from model.attention import attention_backend
from model.fp8 import fp8_linear, fp8_supported, head_scales
from model.rotary import Rotary, yarn_attention_scale


EVAL_HEAD_TOKENS = 16_384  # tokens per slice of the head and loss when no gradient is needed


def rms_norm(x):
    return F.rms_norm(x, (x.size(-1),))


def linear(x, module):
    """x through a bias-free nn.Linear whose weight may be stored in another dtype (--numerics record)."""
    return F.linear(x, module.weight.type_as(x))


class Layout:
    """Which layer has what (a plan's config.Layers), checked for a model (ConfigError if it does not fit)."""

    def __init__(self, plan):
        c, layers = plan.config, plan.layers
        self.num_layers = c.num_layers
        self.no_attention = layers.attention_free
        self.no_mlp = layers.mlp_free
        self.long_window = layers.long_window
        self.value_embeds = dict(layers.value_embeds)
        self.num_value_embeds = max(self.value_embeds.values(), default=-1) + 1
        self.skip = layers.unet_skip
        self.backout = layers.backout
        if self.no_attention >= set(range(c.num_layers)):
            raise ConfigError("--attention-free-layers leaves no layer with attention")
        without_attention = self.long_window & self.no_attention | set(self.value_embeds) & self.no_attention
        if without_attention:
            raise ConfigError(
                f"layer(s) {sorted(without_attention)} have no attention (--attention-free-layers) but a long window "
                "or a value embedding")
        unused = set(range(self.num_value_embeds)) - set(self.value_embeds.values())
        if unused:
            raise ConfigError(f"--value-embed-layers {c.value_embed_layers}: table(s) {sorted(unused)} "
                              "are used by no layer")

    def empty(self, i):
        return i in self.no_attention and i in self.no_mlp


class CausalSelfAttention(nn.Module):
    def __init__(self, c, rotary, attend, has_value_embed):
        super().__init__()
        self.num_heads = c.num_heads
        self.head_dim = c.model_dim // c.num_heads
        if c.merged_qkvo:  # record #46: Wq, Wk, Wv, Wo in one weight; q, k and v come from one matmul
            self.qkvo = nn.Parameter(torch.empty(4, c.model_dim, c.model_dim))
            for w in self.qkvo.data:  # nn.Linear's default init, drawn as the four separate matrices draw it
                nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        else:
            self.qkvo = None
            self.q, self.k, self.v, self.proj = (nn.Linear(c.model_dim, c.model_dim, bias=False) for _ in range(4))
        self.rotary = rotary  # shared by every layer: YaRN changes it in one place
        self.attend = attend
        # record #11: a learned share of the first attention layer's values
        self.value_mix = nn.Parameter(torch.tensor(0.5)) if c.value_residual else None
        # record #46: v <- a*v + b*ve, with b only where the layer has a value embedding
        self.value_embed_mix = None
        if c.value_embed_layers:
            self.value_embed_mix = nn.Parameter(torch.tensor([0.5, 0.5] if has_value_embed else [0.5]))
        # record #46: each head's output scaled by a sigmoid of the input's first gate_dims channels
        self.gate = nn.Linear(c.gate_dims, c.num_heads, bias=False) if c.attn_gate else None
        self.gate_dims = c.gate_dims

    def forward(self, x, value_embed, first_values, mask, scale):
        batch, seq_len, dim = x.shape
        shape = (batch, seq_len, self.num_heads, self.head_dim)
        if self.qkvo is not None:
            q, k, v = F.linear(x, self.qkvo[:3].flatten(0, 1)).view(batch, seq_len, 3 * self.num_heads,
                                                                     self.head_dim).chunk(3, dim=2)
        else:
            q, k, v = self.q(x).view(shape), self.k(x).view(shape), self.v(x).view(shape)
        if self.value_mix is not None:
            if first_values is None:
                first_values = v
            v = (1 - self.value_mix) * v + self.value_mix * first_values
        if self.value_embed_mix is not None:
            v = self.value_embed_mix[0] * v
            if value_embed is not None:
                # The tables are float32 weights that autocast does not touch: cast to v's dtype, or
                # they would promote v, and with it q and k, to float32 on a GPU.
                v = v + self.value_embed_mix[1] * value_embed.view(shape).type_as(v)
        # CUDA autocast runs rms_norm in float32 (CPU autocast does not): cast q and k back so
        # attention gets q, k and v in one dtype.
        q, k = self.rotary(rms_norm(q)).type_as(v), self.rotary(rms_norm(k)).type_as(v)
        y = self.attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, scale).transpose(1, 2)
        if self.gate is not None:
            y = y * torch.sigmoid(linear(x[..., : self.gate_dims], self.gate)).unsqueeze(-1)
        y = y.reshape(batch, seq_len, dim)
        return (self.proj(y) if self.qkvo is None else F.linear(y, self.qkvo[3])), first_values


class MLP(nn.Module):
    def __init__(self, model_dim):
        super().__init__()
        self.fc = nn.Linear(model_dim, 4 * model_dim, bias=False)
        self.proj = nn.Linear(4 * model_dim, model_dim, bias=False)

    def forward(self, x):
        return self.proj(F.relu(self.fc(x)).square())


class Block(nn.Module):
    def __init__(self, c, rotary, attend, has_attention, has_mlp, has_value_embed, x0_mix_init):
        super().__init__()
        self.attn = CausalSelfAttention(c, rotary, attend, has_value_embed) if has_attention else None
        self.mlp = MLP(c.model_dim) if has_mlp else None
        # weights of the residual stream x and of the embedding x0
        self.residual_mix = nn.Parameter(torch.tensor(x0_mix_init))

    def forward(self, x, x0, value_embed, first_values, mask, scale):
        x = self.residual_mix[0] * x + self.residual_mix[1] * x0
        if self.attn is not None:
            attn_out, first_values = self.attn(rms_norm(x), value_embed, first_values, mask, scale)
            x = x + attn_out
        if self.mlp is not None:
            x = x + self.mlp(rms_norm(x))
        return x, first_values


def check_model_config(plan):
    """Raises config.ConfigError for model settings (of a config.Plan) that cannot work; returns the Layout."""
    c = plan.config
    if c.model_dim % c.num_heads or (c.model_dim // c.num_heads) % 2:
        raise ConfigError(
            f"--model-dim {c.model_dim} must split into --num-heads {c.num_heads} heads of even size")
    if (c.smear_gate or c.attn_gate) and not 0 < c.gate_dims <= c.model_dim:
        raise ConfigError(f"--gate-dims {c.gate_dims} must be within 1..--model-dim")
    if c.softcap not in ("tanh", "sigmoid") or c.loss_reduction not in ("mean", "sum"):
        raise ConfigError(f"--softcap {c.softcap} / --loss-reduction {c.loss_reduction}: "
                                        "expected tanh or sigmoid / mean or sum")
    if c.hidden_init not in ("torch", "uniform"):
        raise ConfigError(f"--hidden-init {c.hidden_init} is not one of torch, uniform")
    if c.rope_truncated and (c.model_dim // c.num_heads) % 4:
        raise ConfigError(f"--rope-truncated needs a head size divisible by 4, got "
                                        f"{c.model_dim // c.num_heads}")
    return Layout(plan)


class GPT(nn.Module):
    def __init__(self, plan, attention="sdpa"):
        super().__init__()
        c = plan.config
        head_dim = c.model_dim // c.num_heads
        self.config = c
        self.layout = layout = check_model_config(plan)
        self.attention = attention_backend(attention)
        self.doc_masking = c.doc_masking
        self.embed = nn.Embedding(c.vocab_size, c.model_dim)
        self.value_embeds = nn.ModuleList(nn.Embedding(c.vocab_size, c.model_dim)
                                          for _ in range(layout.num_value_embeds))
        self.smear_gate = nn.Linear(c.gate_dims, 1, bias=False) if c.smear_gate else None
        self.smear_lambda = nn.Parameter(torch.tensor(0.0)) if c.smear_gate else None
        self.rotary = Rotary(head_dim, c.rope_base, truncated=c.rope_truncated, bf16_tables=c.numerics == "record")
        self.initial_attn_scale = c.attn_scale or 1 / math.sqrt(head_dim)
        self.attn_scale = self.initial_attn_scale  # a Python number: compiled graphs specialise on it
        self.windows = None  # (short, long) tokens, or None for full causal attention
        self.blocks = nn.ModuleList(
            None if layout.empty(i) else
            Block(c, self.rotary, self.attention.attend, i not in layout.no_attention, i not in layout.no_mlp,
                  i in layout.value_embeds, plan.x0_mix_init)
            for i in range(c.num_layers))
        if layout.skip == "all":
            self.num_encoder_layers = c.num_layers // 2
            self.skip_weights = nn.Parameter(torch.ones(c.num_layers - self.num_encoder_layers))
        elif layout.skip:
            self.skip_weights = nn.Parameter(torch.tensor([-1.5]))  # sigmoid gate logit: about 0.18 at init
        self.backout_lambda = nn.Parameter(torch.tensor(0.5)) if layout.backout is not None else None
        self.lm_head = nn.Linear(c.model_dim, c.vocab_size, bias=False)
        self._initialise()
        if c.numerics == "record":
            for module in self.bf16_modules():
                module.bfloat16()

    def bf16_modules(self):
        """The modules record #46 stores in bf16 (every nn.Embedding and nn.Linear of its model): under
        --numerics record their weights, gradients and optimizer moments are bf16 here too."""
        gates = [b.attn.gate for b in self.blocks if b is not None and b.attn is not None and b.attn.gate is not None]
        modules = [self.embed, *self.value_embeds, self.lm_head, self.smear_gate, *gates]
        return [m for m in modules if m is not None]

    def _initialise(self):
        c = self.config
        # Zero outputs: every block starts as the identity, the head predicts uniformly, the gates
        # start at sigmoid(0) = 0.5.
        zeroed = [self.lm_head.weight] + [m.weight for m in (self.smear_gate,) if m is not None]
        for block in self.blocks:
            if block is None:
                continue
            attn = block.attn
            if attn is not None:
                zeroed += [attn.gate.weight] if attn.gate is not None else []
                if c.merged_qkvo:
                    zeroed.append(attn.qkvo[3])
                    inputs = list(attn.qkvo[:3])
                else:
                    zeroed.append(attn.proj.weight)
                    inputs = [attn.q.weight, attn.k.weight, attn.v.weight]
                if c.hidden_init == "uniform":
                    self._uniform(inputs)
            if block.mlp is not None:
                zeroed.append(block.mlp.proj.weight)
                if c.hidden_init == "uniform":
                    self._uniform([block.mlp.fc.weight])
        with torch.no_grad():
            for weight in zeroed:
                weight.zero_()

    def _uniform(self, weights):
        # record #46: a uniform init with std 0.5/sqrt(model_dim), whatever a matrix's fan-in
        bound = math.sqrt(3) * 0.5 / math.sqrt(self.config.model_dim)
        for w in weights:
            nn.init.uniform_(w, -bound, bound)

    @classmethod
    def from_config(cls, c, attention="sdpa"):
        """The GPT that a run's config (config.Config, or a checkpoint's dict of it) describes.

        A checkpoint's dict that lacks newer fields gets their defaults: record #11's behaviour.
        """
        if isinstance(c, dict):
            missing = [k for k in ("vocab_size", "num_layers", "num_heads", "model_dim") if k not in c]
            if missing:  # every checkpoint of this trainer has them
                raise KeyError(missing[0])
            c = config_from_dict(c)
        assert isinstance(c, Config), c
        return cls(make_plan(c), attention)

    # -- windows and YaRN: set by the training loop at each stage

    def set_windows(self, windows, yarn=None):
        """Attention windows (short, long) in tokens, or None for full attention. With YaRN on (the
        config's yarn, unless `yarn` says otherwise), a longer long window stretches the slow rotary
        frequencies and grows the attention scale, as record #46 does at every stage change."""
        yarn = self.config.yarn if yarn is None else yarn
        if yarn and self.windows and windows and windows[1] != self.windows[1]:
            self.rotary.apply_yarn(self.windows[1], windows[1])
            self.attn_scale = yarn_attention_scale(self.attn_scale, self.windows[1], windows[1])
        self.windows = windows

    def reset_windows(self):
        self.rotary.reset()
        self.attn_scale = self.initial_attn_scale
        self.windows = None

    def layer_window(self, i):
        if self.windows is None:
            return None
        return self.windows[1] if i in self.layout.long_window else self.windows[0]

    # -- forward

    def head(self, x, float32=False):
        """Soft-capped float32 logits of the final normalised stream x. Under --numerics record the
        matmul is record #46's: bf16 operands and result (training and validation); `float32`
        computes it in float32 instead, whatever the numerics and the autocast."""
        c = self.config
        weight = self.lm_head.weight
        if float32:
            with torch.autocast(x.device.type, enabled=False):
                logits = F.linear(x.float(), weight.float())
        elif c.fp8_head and self.training and fp8_supported(x.device):
            logits = fp8_linear(x.flatten(0, -2), weight, *head_scales(c.model_dim))
            logits = logits.view(*x.shape[:-1], -1)
        else:  # under --numerics record a bf16 matmul of the bf16 head, whatever the autocast
            logits = self.lm_head(x.type_as(weight) if c.numerics == "record" else x)
        # The soft-cap in float32: the record computes it in bf16 eagerly, but compiled (as it ran),
        # inductor fuses it into its neighbours in float32 (docs/RECORD46.md section 11).
        logits = logits.float()
        if c.softcap == "sigmoid":
            return c.logit_softcap * torch.sigmoid(logits / c.softcap_temperature)
        return c.logit_softcap * torch.tanh(logits / c.logit_softcap)

    def forward(self, idx, targets=None, reduction=None, with_float32=False):
        """Logits for idx (batch, seq), or the cross-entropy against targets, reduced as `reduction`
        says (default: the config's loss_reduction). Without gradients, `with_float32` returns
        (loss, the same loss with a float32 head matmul): the loss as the record rounds it, and the
        model's own (they differ under --numerics record).

        With doc_masking, every bos_token (by default GPT-2's <|endoftext|>) starts a new document that attends
        only to itself.
        """
        c, layout = self.config, self.layout
        doc_ids = (idx == c.bos_token).cumsum(dim=1) if self.doc_masking else None
        batch, seq_len = idx.shape
        masks = {w: self.attention.mask(doc_ids, batch, seq_len, idx.device, w)
                 for w in {self.layer_window(i) for i in range(c.num_layers) if i not in layout.no_attention}}
        x = self.embed(idx).float()  # float32 activations whatever the table's dtype; autocast casts for matmuls
        if self.smear_gate is not None:  # x_t += lambda * sigmoid(w . x_t[:gate_dims]) * x_{t-1}
            gate = torch.sigmoid(linear(x[:, 1:, : c.gate_dims], self.smear_gate))
            x = torch.cat([x[:, :1], x[:, 1:] + self.smear_lambda * gate * x[:, :-1]], dim=1)
        x = x0 = rms_norm(x)
        value_embeds = [ve(idx) for ve in self.value_embeds]
        first_values, skips, skip_source, backout = None, [], None, None
        for i, block in enumerate(self.blocks):
            if layout.skip == "all":
                if i >= self.num_encoder_layers and skips:
                    x = x + self.skip_weights[i - self.num_encoder_layers] * skips.pop()
            elif layout.skip and i == layout.skip[1]:
                x = x + torch.sigmoid(self.skip_weights[0]) * skip_source
            if block is not None:
                table = layout.value_embeds.get(i)
                x, first_values = block(x, x0, None if table is None else value_embeds[table], first_values,
                                        masks.get(self.layer_window(i)), self.attn_scale)
            if layout.skip == "all" and i < self.num_encoder_layers:
                skips.append(x)
            elif layout.skip and i == layout.skip[0]:
                skip_source = x
            if i == layout.backout:
                backout = x
        if backout is not None:  # remove a learned share of the early layers' output
            x = x - self.backout_lambda * backout
        x = rms_norm(x)
        if targets is None:
            return self.head(x)
        reduction = reduction or c.loss_reduction
        if torch.is_grad_enabled():
            logits = self.head(x)
            return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), reduction=reduction)
        # Without gradients, the head and loss go in slices: float32 logits of one 262,144-token
        # validation row (record #46) would take 53 GB at once.
        x, targets = x.flatten(0, -2), targets.reshape(-1)
        losses = [self._sliced_loss(x, targets, reduction, float32=False)]
        if with_float32:
            losses.append(self._sliced_loss(x, targets, reduction, float32=True))
        return tuple(losses) if with_float32 else losses[0]

    def _sliced_loss(self, x, targets, reduction, float32):
        per_slice = "none" if reduction == "none" else "sum"
        losses = [F.cross_entropy(self.head(x[i : i + EVAL_HEAD_TOKENS], float32), targets[i : i + EVAL_HEAD_TOKENS],
                                  reduction=per_slice) for i in range(0, x.size(0), EVAL_HEAD_TOKENS)]
        if reduction == "none":
            return torch.cat(losses)
        return sum(losses) / (targets.numel() if reduction == "mean" else 1)
