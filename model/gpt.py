"""A GPT-2-small-class transformer with the modded-nanogpt record architectures.

Common to every record: rotary positions, RMSNorm without weights, QK-norm, ReLU^2 MLP, a
soft-capped head, and every layer taking in the normalised embedding x0. The rest is switched by
config fields (config.py), each a technique of a record:

- record #11: attention values mix in the first layer's values (value_residual); U-net skips
  join each first-half layer to its mirror in the second half (unet_skips=all); tanh soft-cap.
- record #46: layers without attention or MLP; value embeddings mixed into the values of some
  layers; one gated U-net skip and a backout; a smear gate looking one token back; a sparse
  per-head attention gate; half-truncated rotary with YaRN when windows grow; short and long
  sliding windows; a sigmoid soft-cap; an FP8 head; a uniform init.
- the leaderboard's HEAD (docs/RECORD-HEAD.md; `_sublayers`): per-sublayer residual scalars with
  x0 and a bigram hash embedding injected after attention under gates; paired heads, a partial key
  offset, XSA, DC-MHA and output gates (model/attention_ops.py); gated value embeddings; MUDD
  connections and gate MLPs (model/mudd.py); a head tied to the embedding for two stages; the
  multi-token and prefix-token loss (model/loss.py), in slices of a row.
"""
import math

import torch
import torch.nn as nn
import torch.utils.checkpoint
import torch.nn.functional as F

from config import Config, ConfigError, config_from_dict, make_plan
from model.attention import attention_backend
from model.attention_ops import (attention_output_gate, dc_attention, dc_mixing_weights, deinterleave_pairs,
                                 gated_value_embedding, interleave_pairs, interleaved_doc_ids, learnable_xsa,
                                 offset_stationary_keys, paired_positions, VALUE_GATE_INPUTS)
from model.bigram import BigramEmbedding, bigram_hash_ids, bigram_sign_ids
from model.fp8 import Fp8MlpState, fp8_linear, fp8_mlp, fp8_supported, head_scales
from model.loss import kernel_position_losses, position_losses, Softcap
from model.mudd import MuddConnections, MuddGates, StaticGates, gate_layout
from model.rotary import Rotary, yarn_attention_scale
from model import triton_loss, triton_mlp


EVAL_HEAD_TOKENS = 16_384  # tokens per slice of the head and loss when no gradient is needed
# positions per slice of HEAD's training loss: per row, 1.6 GB of float32 logits at 50,304 ids, and a few
# such temporaries in the backward
LOSS_SLICE_TOKENS = 8_192
# the float8 MLP's down-projection weight scale restarts from the current amax for the first steps, while
# the weights move fast (HEAD L2365)
FP8_BOOTSTRAP_STEPS = 16


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
        self._head_layout(c, layers)

    def _head_layout(self, c, layers):
        """HEAD's layers: the paired, XSA, DC and gated ones, the cached attention inputs, the MUDD layer and
        the two gate MLPs' layouts (None where nothing reads a gate)."""
        self.paired_heads, self.xsa, self.dc, self.gated_attn = (layers.paired_heads, layers.xsa, layers.dc,
                                                                 layers.gated_attn)
        self.attn_input = dict(layers.attn_input)
        self.mudd_layer = c.num_layers - 1 if c.mudd else None
        attention = set(range(c.num_layers)) - self.no_attention
        variants = {"--paired-head-layers": self.paired_heads, "--xsa-layers": self.xsa, "--dc-layers": self.dc,
                    "--gated-attn-layers": self.gated_attn, "--attn-input-layers": set(self.attn_input)}
        for flag, chosen in variants.items():
            if chosen - attention:
                raise ConfigError(f"{flag}: layer(s) {sorted(chosen - attention)} have no attention")
        if self.paired_heads & (self.xsa | self.dc):
            raise ConfigError(f"layer(s) {sorted(self.paired_heads & (self.xsa | self.dc))}: a paired-head layer "
                              "has no XSA or DC-MHA (their values do not line up with its heads)")
        if self.paired_heads and c.num_heads % 2:
            raise ConfigError(f"--paired-head-layers needs an even --num-heads, got {c.num_heads}")
        late = [(layer, source) for layer, source in self.attn_input.items() if source >= layer]
        if late:
            raise ConfigError(f"--attn-input-layers: {late} reads a layer that comes after it")
        needs_sublayers = {"--xsa-layers": self.xsa, "--dc-layers": self.dc, "--gated-attn-layers": self.gated_attn,
                           "--bigram-rows": c.bigram_rows, "--mudd": c.mudd, "--mudd-gates": c.mudd_gates,
                           "--attn-input-layers": self.attn_input}
        blocked = [flag for flag, on in needs_sublayers.items() if on and c.residual != "sublayer"]
        if blocked:
            raise ConfigError(f"{', '.join(blocked)} need --residual sublayer (their gates and injections are HEAD's)")
        if c.mudd and (self.backout is not None or self.mudd_layer in self.no_attention
                       or not (self.attn_input and isinstance(self.skip, tuple) and self.value_embeds)):
            raise ConfigError("--mudd needs attention in the last layer, --attn-input-layers (its source), one "
                              "--unet-skips source:target, --value-embed-layers, and no --backout-layer (it replaces it)")
        if c.mudd and self.mudd_layer not in self.attn_input:
            raise ConfigError(f"--mudd: the last layer ({self.mudd_layer}) must read a cached stream "
                              "(--attn-input-layers): MUDD mixes that stream in")
        if c.key_offset and not (c.rope_truncated and c.rope_pairs == "adjacent"):
            raise ConfigError("--key-offset shifts the keys' last half, which only --rope-truncated with --rope-pairs "
                              "adjacent keeps stationary")
        if c.value_embed_gate and not c.qkvo_lambdas:
            raise ConfigError("--value-embed-gate takes the place of #46's value mix: it needs --qkvo-lambdas")
        if c.residual == "sublayer" and (self.skip == "all" or c.value_residual):
            raise ConfigError("--residual sublayer has one gated skip (--unet-skips source:target) and no "
                              "--value-residual (record #11's)")
        if c.bigram_rows and (c.bigram_rows < 2 or 0 in self.no_attention):
            raise ConfigError(f"--bigram-rows {c.bigram_rows}: the hash needs at least 2 rows, and its first "
                              "injection's gate comes from layer 0's attention")
        if c.residual == "sublayer" and not 0 < c.mudd_gate_layer < c.num_layers:
            raise ConfigError(f"--mudd-gate-layer {c.mudd_gate_layer} must be a layer after the first")
        if c.softcap_offset and c.softcap != "sigmoid":
            raise ConfigError("--softcap-offset shifts the sigmoid soft-cap: it needs --softcap sigmoid")
        if c.mudd and c.num_heads % 2:
            raise ConfigError(f"--mudd gates the value embedding per half of the heads: --num-heads {c.num_heads} is odd")
        self.gate_layouts = None
        if c.residual == "sublayer":
            injections = sorted(attention - {self.mudd_layer})
            skip = c.mudd_gates and isinstance(self.skip, tuple)

            def layout(chosen):
                return gate_layout(c.num_heads, xsa=sorted(self.xsa & chosen), gated_attn=sorted(self.gated_attn & chosen),
                                   injections=[i for i in injections if i in chosen],
                                   skip=skip and self.skip[1] in chosen, dc=sorted(self.dc & chosen))

            pre, post = set(range(c.mudd_gate_layer)), set(range(c.mudd_gate_layer, c.num_layers))
            if skip and self.skip[1] < c.mudd_gate_layer:
                raise ConfigError(f"--mudd-gate-layer {c.mudd_gate_layer}: the skip's gate comes from the second gate "
                                  f"MLP, which must come before the skip's target layer {self.skip[1]}")
            self.gate_layouts = (layout(pre), layout(post))

    def empty(self, i):
        return i in self.no_attention and i in self.no_mlp


class CausalSelfAttention(nn.Module):
    def __init__(self, c, layer, layout, rotary, attend, has_value_embed):
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
        # HEAD: learned scalars on W_qkv and W_O; q and k are normed after, so the first scales v
        self.qkvo_lambdas = nn.Parameter(torch.tensor([0.5, 1.0])) if c.qkvo_lambdas else None
        # record #46: v <- a*v + b*ve, with b only where the layer has a value embedding
        self.value_embed_mix = None
        if c.value_embed_layers and not c.qkvo_lambdas:
            self.value_embed_mix = nn.Parameter(torch.tensor([0.5, 0.5] if has_value_embed else [0.5]))
        # HEAD: the value embedding added under a per-head gate of the input and itself (the MUDD
        # layer's gate comes from MUDD instead)
        self.ve_gate = None
        if c.value_embed_gate and has_value_embed and not layout.mudd_layer == layer:
            self.ve_gate = nn.Parameter(torch.zeros(c.num_heads, 2 * VALUE_GATE_INPUTS))
        # record #46: each head's output scaled by a sigmoid of the input's first gate_dims channels
        self.gate = nn.Linear(c.gate_dims, c.num_heads, bias=False) if c.attn_gate else None
        self.gate_dims = c.gate_dims
        # HEAD's attention variants (model/attention_ops.py)
        self.paired = layer in layout.paired_heads
        self.key_offset = c.key_offset and layer in layout.long_window and not self.paired
        self.xsa = layer in layout.xsa
        self.dc_window = c.dc_window if layer in layout.dc else 0

    def forward(self, x, value_embed, first_values, mask, scale, extras=None):
        """`extras` holds HEAD's per-layer inputs: its gates ("xsa", "attn_gate", "dc": (w1, w2)), the
        MUDD layer's "value_gate" (per head) and "value_add", the "doc_ids" (DC-MHA) and the
        "paired_mask" (paired layers)."""
        extras = extras or {}
        batch, seq_len, dim = x.shape
        shape = (batch, seq_len, self.num_heads, self.head_dim)
        if self.qkvo is not None:
            w_qkv = self.qkvo[:3].flatten(0, 1)
            if self.qkvo_lambdas is not None:
                w_qkv = self.qkvo_lambdas[0] * w_qkv
            q, k, v = F.linear(x, w_qkv).view(batch, seq_len, 3 * self.num_heads, self.head_dim).chunk(3, dim=2)
        elif self.qkvo_lambdas is not None:
            q, k, v = (F.linear(x, self.qkvo_lambdas[0] * m.weight).view(shape) for m in (self.q, self.k, self.v))
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
        elif value_embed is not None:
            value_embed = value_embed.type_as(v)
            # cast to v's dtype: a float32 gate would promote v, and with it q and k, on a GPU
            if self.ve_gate is not None:
                v = v + gated_value_embedding(x, value_embed, self.ve_gate).type_as(v)
            else:
                gate = extras.get("value_gate")  # the MUDD layer's, per head
                v = v + (value_embed.view(shape) if gate is None else gate.type_as(v)[..., None] * value_embed.view(shape))
        if "value_add" in extras:
            v = v + extras["value_add"].view(shape).type_as(v)
        # CUDA autocast runs rms_norm in float32 (CPU autocast does not): cast q and k back so
        # attention gets q, k and v in one dtype. A paired layer rotates head h at 2t + h % 2.
        positions = paired_positions(seq_len, self.num_heads, x.device) if self.paired else None
        q, k = self.rotary(rms_norm(q), positions).type_as(v), self.rotary(rms_norm(k), positions).type_as(v)
        if self.key_offset:
            k = offset_stationary_keys(k)
        if self.paired:  # heads p and p + heads/2 attend as one head over an interleaved sequence
            q2, k2, v2 = (interleave_pairs(t).transpose(1, 2) for t in (q, k, v))
            y = deinterleave_pairs(self.attend(q2, k2, v2, extras["paired_mask"], scale).transpose(1, 2))
        else:
            y = self.attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, scale).transpose(1, 2)
        if self.dc_window:
            w1, w2 = dc_mixing_weights(*extras["dc"], dtype=y.dtype)
            y = dc_attention(y, q, k, v, w1, w2, scale, extras["doc_ids"], self.dc_window)
        if self.xsa:
            y = learnable_xsa(y, v, extras["xsa"])
        if "attn_gate" in extras:
            y = attention_output_gate(y, extras["attn_gate"])
        if self.gate is not None:
            y = y * torch.sigmoid(linear(x[..., : self.gate_dims], self.gate)).unsqueeze(-1)
        y = y.reshape(batch, seq_len, dim)
        if self.qkvo is None:
            return (self.proj(y) if self.qkvo_lambdas is None else F.linear(y, self.qkvo_lambdas[1] * self.proj.weight),
                    first_values)
        w_o = self.qkvo[3] if self.qkvo_lambdas is None else self.qkvo_lambdas[1] * self.qkvo[3]
        return F.linear(y, w_o), first_values


def kernel_choice(field, available, device):
    """"triton" or "plain": what a fast-path field (--mlp-kernel, --loss-kernel) picks on `device`. auto takes
    the Triton kernel on a GPU where `available` says it runs, the plain PyTorch form elsewhere: on CPU only
    Triton's interpreter runs it, much slower, which the tests ask for by name."""
    if field == "auto":
        return "triton" if device.type == "cuda" and available(device) else "plain"
    return field


class MLP(nn.Module):
    """relu(x W_fc^T)^2 W_proj^T: in plain PyTorch, with the activation fused into the first matmul by a
    Triton kernel (--mlp-kernel, model/triton_mlp.py), or in training with both projections' forward in
    float8 where the device has float8 matmuls (--fp8-mlp, model/fp8.py; `GPT.refresh_fp8` remakes the
    float8 weights before each step)."""

    def __init__(self, c):
        super().__init__()
        self.fc = nn.Linear(c.model_dim, 4 * c.model_dim, bias=False)
        self.proj = nn.Linear(4 * c.model_dim, c.model_dim, bias=False)
        self.kernel = c.mlp_kernel
        self.fp8 = Fp8MlpState(c.model_dim) if c.fp8_mlp else None

    def forward(self, x):
        if self.fp8 is not None and self.training and fp8_supported(x.device):
            return fp8_mlp(x, self.fc.weight, self.proj.weight, self.fp8)
        if kernel_choice(self.kernel, triton_mlp.triton_mlp_available, x.device) == "triton":
            return triton_mlp.fused_relu_square_mlp(x, self.fc.weight, self.proj.weight)
        return self.proj(F.relu(self.fc(x)).square())


class Block(nn.Module):
    def __init__(self, c, layer, layout, rotary, attend, x0_mix_init):
        super().__init__()
        has_attention = layer not in layout.no_attention
        self.attn = (CausalSelfAttention(c, layer, layout, rotary, attend, layer in layout.value_embeds)
                     if has_attention else None)
        self.mlp = MLP(c) if layer not in layout.no_mlp else None
        # weights of the residual stream x and of the embedding x0 (HEAD's sublayers have the model's)
        self.residual_mix = nn.Parameter(torch.tensor(x0_mix_init)) if c.residual == "block" else None

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
    if c.hidden_init not in ("torch", "uniform", "uniform_qkvo"):
        raise ConfigError(f"--hidden-init {c.hidden_init} is not one of torch, uniform, uniform_qkvo")
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
        self.rotary = Rotary(head_dim, c.rope_base, truncated=c.rope_truncated, bf16_tables=c.numerics == "record",
                             adjacent_pairs=c.rope_pairs == "adjacent")
        self.initial_attn_scale = c.attn_scale or 1 / math.sqrt(head_dim)
        self.attn_scale = self.initial_attn_scale  # a Python number: compiled graphs specialise on it
        self.windows = None  # (short, long) tokens, or None for full causal attention
        self.blocks = nn.ModuleList(
            None if layout.empty(i) else
            Block(c, i, layout, self.rotary, self.attention.attend, plan.x0_mix_init)
            for i in range(c.num_layers))
        if layout.skip == "all":
            self.num_encoder_layers = c.num_layers // 2
            self.skip_weights = nn.Parameter(torch.ones(c.num_layers - self.num_encoder_layers))
        elif layout.skip:
            self.skip_weights = nn.Parameter(torch.tensor([-1.5]))  # sigmoid gate logit: about 0.18 at init
        self.backout_lambda = nn.Parameter(torch.tensor(0.5)) if layout.backout is not None else None
        self.lm_head = nn.Linear(c.model_dim, c.vocab_size, bias=False)
        self._init_head_record(plan, layout)
        self._initialise()
        if c.numerics == "record":
            for p in self.bf16_parameters():
                p.data = p.data.bfloat16()

    def _init_head_record(self, plan, layout):
        """The leaderboard HEAD's modules, each only where its field asks for it."""
        c = plan.config
        # per sublayer: x = resid * x + post * f(norm(x)); sqrt(1.1) per sublayer makes 1.1 per layer
        self.resid_lambdas = self.post_lambdas = None
        if c.residual == "sublayer":
            self.resid_lambdas = nn.Parameter(torch.full((c.num_layers, 2), 1.1 ** 0.5))
            self.post_lambdas = nn.Parameter(torch.ones(c.num_layers, 2))
        self.bigram = BigramEmbedding(c.bigram_rows, c.model_dim, c.bigram_sign_rows) if c.bigram_rows else None
        self.mudd = MuddConnections(c.model_dim) if c.mudd else None
        self.mudd_gates = None
        if layout.gate_layouts is not None:
            self.mudd_gates = MuddGates(c.model_dim, *layout.gate_layouts) if c.mudd_gates else StaticGates(*layout.gate_layouts)
        # the prefix of each token id (data/prefix_tokens.py): the run sets it when the prefix loss is on
        self.register_buffer("prefix_table", None, persistent=False)
        # HEAD's loss (multi-token and prefix-token terms, in slices of a row) where the config gives its
        # weights; they are buffers, so a compiled graph changes only where the terms do (at a stage
        # change), not each step
        self.head_loss = bool(c.mtp_weight_stages or c.prefix_weight_stages)
        longest = max(len(s.mtp_weights_start) for s in plan.stages)
        self.register_buffer("mtp_weights", torch.ones(longest), persistent=False)
        self.register_buffer("prefix_weight", torch.zeros(()), persistent=False)
        self.loss_terms = (1, False)  # (multi-token weights in use, prefix term on): set per step

    def bf16_parameters(self):
        """The parameters the record stores in bf16: under --numerics record their weights and gradients
        are bf16 here too. Record #46: every nn.Embedding and nn.Linear of its model (the token and
        value embeddings, the head, the smear and attention gates). HEAD: every parameter Adam trains
        but the scalars and the gate scale (docs/RECORD-HEAD.md section 8.1)."""
        gates = [b.attn.gate for b in self.blocks if b is not None and b.attn is not None and b.attn.gate is not None]
        modules = [self.embed, *self.value_embeds, self.lm_head, self.smear_gate, *gates, self.bigram, self.mudd]
        params = [p for m in modules if m is not None for p in m.parameters()]
        params += [b.attn.ve_gate for b in self.blocks if b is not None and b.attn is not None and b.attn.ve_gate is not None]
        if self.mudd_gates is not None:
            params += [p for name, p in self.mudd_gates.named_parameters() if name != "scale"]
        return params

    def _initialise(self):
        c = self.config
        # Zero outputs: every block starts as the identity, the head predicts uniformly (HEAD: a
        # small random head), the gates start at sigmoid(0) = 0.5.
        zeroed = [m.weight for m in (self.smear_gate,) if m is not None]
        uniform = c.hidden_init in ("uniform", "uniform_qkvo")
        for block in self.blocks:
            if block is None:
                continue
            attn = block.attn
            if attn is not None:
                zeroed += [attn.gate.weight] if attn.gate is not None else []
                if c.merged_qkvo:
                    outputs, inputs = [attn.qkvo[3]], list(attn.qkvo[:3])
                else:
                    outputs, inputs = [attn.proj.weight], [attn.q.weight, attn.k.weight, attn.v.weight]
                if c.hidden_init == "uniform_qkvo":  # HEAD: the output projection uniform too
                    inputs += outputs
                else:
                    zeroed += outputs
                if uniform:
                    self._uniform(inputs)
            if block.mlp is not None:
                zeroed.append(block.mlp.proj.weight)
                if uniform:
                    self._uniform([block.mlp.fc.weight])
        with torch.no_grad():
            for weight in zeroed:
                weight.zero_()
            if c.head_init_std:
                self.lm_head.weight.normal_(0, c.head_init_std)
            else:
                self.lm_head.weight.zero_()
            if c.value_embed_std != 1.0:  # nn.Embedding draws N(0, 1)
                for table in self.value_embeds:
                    table.weight.normal_(0, c.value_embed_std)
            if c.tied_head_stages:  # one weight until the untie step (optim/optimizer.py keeps them equal)
                self.embed.weight.copy_(self.lm_head.weight)

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

    @property
    def softcap(self):
        c = self.config
        if c.softcap == "sigmoid":
            return Softcap(c.logit_softcap, c.softcap_temperature, c.softcap_offset)
        return Softcap(c.logit_softcap, c.logit_softcap, kind="tanh")

    def head_logits(self, x, float32=False):
        """Float32 logits of the final normalised stream x, before the soft-cap. Under --numerics record
        the matmul is record #46's: bf16 operands and result (training and validation); `float32`
        computes it in float32 instead, whatever the numerics and the autocast."""
        c = self.config
        weight = self.lm_head.weight
        if float32:
            with torch.autocast(x.device.type, enabled=False):
                logits = F.linear(x.float(), weight.float())
        elif c.fp8_head and self.training and fp8_supported(x.device):
            logits = fp8_linear(x.flatten(0, -2), weight, *head_scales(c.model_dim, c.fp8_head_scales))
            logits = logits.view(*x.shape[:-1], -1)
        else:  # under --numerics record a bf16 matmul of the bf16 head, whatever the autocast
            logits = self.lm_head(x.type_as(weight) if c.numerics == "record" else x)
        return logits.float()

    def head(self, x, float32=False):
        """Soft-capped float32 logits of x (head_logits). The soft-cap in float32: the record computes it
        in bf16 eagerly, but compiled (as it ran), inductor fuses it into its neighbours in float32
        (docs/RECORD46.md section 11)."""
        cap, temperature, offset, kind = self.softcap
        logits = self.head_logits(x, float32)
        if kind == "sigmoid":
            # as records #46 and HEAD write it; without an offset, the one before HEAD's
            return cap * torch.sigmoid((logits + offset if offset else logits) / temperature)
        return cap * torch.tanh(logits / cap)

    @torch.no_grad()
    def refresh_fp8(self, step):
        """Makes the float8 MLP weights (--fp8-mlp) that the training forwards of `step` multiply, once per
        step, from the weights the previous update left (as HEAD does after each update, L2365). W2's
        delayed scale restarts from its current amax ("bootstrap") up to step FP8_BOOTSTRAP_STEPS and
        where the state has never been quantised (a new model, the warm-up's reset). A checkpoint holds
        the state as the update left it, so a resumed run makes the same copies as an uninterrupted one."""
        for block in self.blocks:
            state = block.mlp.fp8 if block is not None and block.mlp is not None else None
            if state is None or (state.ready and state.step == step):
                continue
            state.quantize(block.mlp.fc.weight, block.mlp.proj.weight,
                           bootstrap=step <= FP8_BOOTSTRAP_STEPS or state.quantizations == 0)
            state.step = step

    def set_loss_weights(self, mtp_weights, prefix_weight):
        """The training loss of the next steps: sum_k mtp_weights[k] * CE(next k+1-th token) plus
        prefix_weight * CE(the target's prefix token), per position (model/loss.py; HEAD)."""
        if prefix_weight and self.prefix_table is None:
            raise RuntimeError("a prefix-token loss needs the model's prefix_table (set by the run)")
        if len(mtp_weights) > self.mtp_weights.numel():
            raise ValueError(f"{len(mtp_weights)} multi-token weights; the plan's stages have at most "
                             f"{self.mtp_weights.numel()}")
        with torch.no_grad():
            self.mtp_weights[: len(mtp_weights)].copy_(torch.tensor(mtp_weights, dtype=torch.float32))
            self.prefix_weight.fill_(prefix_weight)
        self.loss_terms = (len(mtp_weights), bool(prefix_weight))

    def forward(self, idx, targets=None, reduction=None, with_float32=False):
        """Logits for idx (batch, seq), or the cross-entropy against targets, reduced as `reduction`
        says (default: the config's loss_reduction). Without gradients, `with_float32` returns
        (loss, the same loss with a float32 head matmul): the loss as the record rounds it, and the
        model's own (they differ under --numerics record). With gradients, the loss is the
        set_loss_weights one (next-token cross-entropy unless set).

        With doc_masking, every bos_token (by default GPT-2's <|endoftext|>) starts a new document that attends
        only to itself.
        """
        c, layout = self.config, self.layout
        doc_ids = (idx == c.bos_token).cumsum(dim=1) if self.doc_masking else None
        batch, seq_len = idx.shape
        windows = {self.layer_window(i) for i in range(c.num_layers) if i not in layout.no_attention}
        masks = {w: self.attention.mask(doc_ids, batch, seq_len, idx.device, w) for w in windows}
        x = self.embed(idx).float()  # float32 activations whatever the table's dtype; autocast casts for matmuls
        if self.smear_gate is not None:  # x_t += lambda * sigmoid(w . x_t[:gate_dims]) * x_{t-1}
            gate = torch.sigmoid(linear(x[:, 1:, : c.gate_dims], self.smear_gate))
            x = torch.cat([x[:, :1], x[:, 1:] + self.smear_lambda * gate * x[:, :-1]], dim=1)
        x = x0 = rms_norm(x)
        value_embeds = [ve(idx) for ve in self.value_embeds]
        if c.residual == "sublayer":
            x = self._sublayers(idx, x0, value_embeds, masks, doc_ids)
        else:
            x = self._blocks(x0, value_embeds, masks)
        x = rms_norm(x)
        if targets is None:
            return self.head(x)
        reduction = reduction or c.loss_reduction
        if torch.is_grad_enabled():
            return self._training_loss(x, targets, reduction)
        # Without gradients, the head and loss go in slices: float32 logits of one 262,144-token
        # validation row (record #46) would take 53 GB at once.
        x, targets = x.flatten(0, -2), targets.reshape(-1)
        losses = [self._sliced_loss(x, targets, reduction, float32=False)]
        if with_float32:
            losses.append(self._sliced_loss(x, targets, reduction, float32=True))
        return tuple(losses) if with_float32 else losses[0]

    def _blocks(self, x0, value_embeds, masks):
        """Records #11 and #46: x = a x + b x0 before each layer, then x + attention, x + MLP."""
        layout = self.layout
        x, first_values, skips, skip_source, backout = x0, None, [], None, None
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
        return x

    def _sublayers(self, idx, x0, value_embeds, masks, doc_ids):
        """HEAD: per sublayer x = resid x + post f(norm(x)); after attention x0 and the bigram embedding
        are added under their gates; the MUDD layer and the end mix earlier streams (model/mudd.py)."""
        c, layout = self.config, self.layout
        batch, seq_len = idx.shape
        paired_doc_ids = interleaved_doc_ids(doc_ids)
        paired_masks = {w: self.attention.mask(paired_doc_ids, batch, 2 * seq_len, idx.device, w)
                        for w in {self.layer_window(i) for i in layout.paired_heads}}
        gates = dict(self.mudd_gates.pre(x0)) if self.mudd_gates is not None else {}
        bigram = None
        if self.bigram is not None:
            bigram = self.bigram(bigram_hash_ids(idx, c.bigram_rows), bigram_sign_ids(idx, c.bigram_sign_rows))
            bigram = bigram.type_as(x0)
        x = x0 if bigram is None else x0 + gates["bigram_0"] * bigram
        # `after[i]`: the stream after layer i, kept for the layers that read it later
        kept_layers = {*layout.attn_input.values(), *(layout.skip or ()), layout.backout}
        stream0, after, mu = x, {}, None
        for i, block in enumerate(self.blocks):
            if self.mudd_gates is not None and i == c.mudd_gate_layer:
                gates.update(self.mudd_gates.post(x))
            if block is None:
                continue
            if layout.skip and i == layout.skip[1]:
                skip_gate = gates["skip"] if "skip" in gates else 1.0
                x = x + torch.sigmoid(self.skip_weights[0]) * skip_gate * after[layout.skip[0]]
            if block.attn is not None:
                source = layout.attn_input.get(i)
                attn_in = rms_norm(x if source is None else after[source])
                extras = {"doc_ids": doc_ids, "paired_mask": paired_masks.get(self.layer_window(i))}
                for key, name in (("xsa", f"xsa{i}"), ("attn_gate", f"attn_gate{i}")):
                    if name in gates:
                        extras[key] = gates[name]
                if f"dc_w1_{i}" in gates:
                    extras["dc"] = (gates[f"dc_w1_{i}"], gates[f"dc_w2_{i}"])
                table = layout.value_embeds.get(i)
                if i == layout.mudd_layer:  # MUDD: V and the stream take in earlier streams
                    mu, before_last, kept = self.mudd.last_layer(x), x, after[source]
                    extras["value_add"] = mu["value_stream0"] * stream0 + mu["value_source"] * kept + mu["value_x"] * x
                    extras["value_gate"] = mu["value_embed_gate"].repeat_interleave(c.num_heads // 2, dim=-1)
                    x = (1 + mu["x_extra"]) * x + mu["stream0"] * stream0 + mu["source"] * kept
                attn_out, _ = block.attn(attn_in, None if table is None else value_embeds[table], None,
                                         masks.get(self.layer_window(i)), self.attn_scale, extras)
                if i == layout.mudd_layer:
                    x = mu["resid_attn"] * x + mu["post_attn"] * attn_out + mu["x0"] * stream0
                    if bigram is not None:
                        x = x + mu["bigram"] * bigram
                else:
                    x = self.resid_lambdas[i, 0] * x + self.post_lambdas[i, 0] * attn_out + gates[f"x0_{i}"] * x0
                    if bigram is not None and i != 0:  # layer 0's came before it
                        x = x + gates[f"bigram_{i}"] * bigram
            if block.mlp is not None:
                mlp_out = block.mlp(rms_norm(x))
                if i == layout.mudd_layer:
                    x = mu["resid_mlp"] * x + mu["post_mlp"] * mlp_out
                else:
                    x = self.resid_lambdas[i, 1] * x + self.post_lambdas[i, 1] * mlp_out
            if i in kept_layers:
                after[i] = x
        if layout.backout is not None:  # without MUDD, record #46's backout
            x = x - self.backout_lambda * after[layout.backout]
        if self.mudd is not None:  # the end: x takes in earlier streams (the backout among them)
            final = self.mudd.final(x)
            x = (x + final["stream0"] * stream0 + final["source"] * after[layout.attn_input[layout.mudd_layer]]
                 + final["before_last"] * before_last + final["value_embed0"] * value_embeds[0].type_as(x)
                 + final["skip_source"] * after[layout.skip[0]])
        return x

    def _training_loss(self, x, targets, reduction):
        if not self.head_loss:  # records #11 and #46: next-token cross-entropy
            logits = self.head(x)
            return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), reduction=reduction)
        count, prefix_on = self.loss_terms
        mtp_weights, prefix_weight = self.mtp_weights[:count], self.prefix_weight if prefix_on else None
        # HEAD's loss per position, in slices of a row: each slice's logits (slice x vocabulary, float32)
        # are made again in the backward instead of kept, as HEAD's fused kernel keeps none of them
        total = 0
        for start in range(0, x.size(1), LOSS_SLICE_TOKENS):
            end = min(start + LOSS_SLICE_TOKENS, x.size(1))
            # the slice's positions score the targets up to len(mtp_weights) - 1 tokens after it
            ahead = targets[:, start : end + count - 1]
            args = (x[:, start:end], ahead, targets[:, start:end], mtp_weights, prefix_weight)
            if end - start == x.size(1):  # the whole row in one slice: nothing to save by recomputing
                total = total + self._slice_loss(*args)
            else:
                total = total + torch.utils.checkpoint.checkpoint(self._slice_loss, *args, use_reentrant=False)
        # a mean over the real targets: a padded piece's (data/loader.py) others add no term
        return total if reduction == "sum" else total / (targets >= 0).sum()

    def _slice_loss(self, x, ahead, targets, mtp_weights, prefix_weight):
        """The summed loss of a slice of positions. Under --numerics record with HEAD's fused kernel's
        gradient, which counts every weight even where a later target is past the row's end; with
        --loss-kernel triton by a Triton kernel of the same loss and gradient (model/triton_loss.py)."""
        logits = self.head_logits(x)
        # an ignored target (a padded piece's, below 0) has no prefix target: -1, outside the vocabulary
        prefix_targets = None if prefix_weight is None else self.prefix_table[targets.clamp_min(0)].masked_fill(
            targets < 0, -1)
        prefix_weight = 0.0 if prefix_weight is None else prefix_weight
        record = self.config.numerics == "record"
        # the kernel computes HEAD's sigmoid soft-cap: auto keeps the plain loss for another
        if (kernel_choice(self.config.loss_kernel, triton_loss.triton_loss_available, logits.device) == "triton"
                and self.softcap.kind == "sigmoid"):
            losses = triton_loss.triton_position_losses(logits, ahead, mtp_weights, prefix_targets, prefix_weight, self.softcap,
                                            numerics="record" if record else "float32", full_weight_sum=record)
        elif record:
            losses = kernel_position_losses(logits, ahead, mtp_weights, prefix_targets, prefix_weight,
                                            self.softcap, numerics="record")
        else:
            losses = position_losses(logits, ahead, mtp_weights, prefix_targets, prefix_weight, self.softcap)
        return losses.sum()

    def _sliced_loss(self, x, targets, reduction, float32):
        per_slice = "none" if reduction == "none" else "sum"
        losses = [F.cross_entropy(self.head(x[i : i + EVAL_HEAD_TOKENS], float32), targets[i : i + EVAL_HEAD_TOKENS],
                                  reduction=per_slice) for i in range(0, x.size(0), EVAL_HEAD_TOKENS)]
        if reduction == "none":
            return torch.cat(losses)
        return sum(losses) / (targets.numel() if reduction == "mean" else 1)
