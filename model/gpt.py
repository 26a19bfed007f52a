"""A GPT-2-small-class transformer with the modded-nanogpt record architecture.

Rotary positions, RMSNorm without weights, QK-norm, ReLU^2 MLP, zero-initialised output
projections, untied embedding and head, tanh logit soft-capping, plus the record's
shortcuts: every block mixes in the normalised embedding (x0), attention values mix in
the first block's values, and U-net skips join the first half of the stack to the second.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from data.shards import EOT_TOKEN
from model.attention import ATTENTION_BACKENDS


def rms_norm(x):
    return F.rms_norm(x, (x.size(-1),))


class Rotary(nn.Module):
    def __init__(self, head_dim, max_seq_len, base=10000.0):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x):
        """Rotates (batch, seq, heads, head_dim) pairs (i, i + head_dim/2) by position-dependent angles."""
        seq_len = x.size(1)
        cos, sin = self.cos[None, :seq_len, None, :], self.sin[None, :seq_len, None, :]
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1).type_as(x)


class CausalSelfAttention(nn.Module):
    def __init__(self, model_dim, num_heads, max_seq_len, attend):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = model_dim // num_heads
        self.q = nn.Linear(model_dim, model_dim, bias=False)
        self.k = nn.Linear(model_dim, model_dim, bias=False)
        self.v = nn.Linear(model_dim, model_dim, bias=False)
        self.proj = nn.Linear(model_dim, model_dim, bias=False)
        nn.init.zeros_(self.proj.weight)  # each block starts as the identity
        self.rotary = Rotary(self.head_dim, max_seq_len)
        self.value_mix = nn.Parameter(torch.tensor(0.5))  # share of the first block's values
        self.attend = attend

    def forward(self, x, first_values, mask):
        batch, seq_len, dim = x.shape
        shape = (batch, seq_len, self.num_heads, self.head_dim)
        q, k, v = self.q(x).view(shape), self.k(x).view(shape), self.v(x).view(shape)
        if first_values is None:
            first_values = v
        v = (1 - self.value_mix) * v + self.value_mix * first_values
        # CUDA autocast runs rms_norm in float32 (CPU autocast does not): cast q and k back so
        # attention gets q, k and v in one dtype.
        q, k = self.rotary(rms_norm(q)).type_as(v), self.rotary(rms_norm(k)).type_as(v)
        y = self.attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask)
        return self.proj(y.transpose(1, 2).reshape(batch, seq_len, dim)), first_values


class MLP(nn.Module):
    def __init__(self, model_dim):
        super().__init__()
        self.fc = nn.Linear(model_dim, 4 * model_dim, bias=False)
        self.proj = nn.Linear(4 * model_dim, model_dim, bias=False)
        nn.init.zeros_(self.proj.weight)

    def forward(self, x):
        return self.proj(F.relu(self.fc(x)).square())


class Block(nn.Module):
    def __init__(self, model_dim, num_heads, max_seq_len, attend):
        super().__init__()
        self.attn = CausalSelfAttention(model_dim, num_heads, max_seq_len, attend)
        self.mlp = MLP(model_dim)
        self.residual_mix = nn.Parameter(torch.tensor([1.0, 0.0]))  # weights of x and of the embedding x0

    def forward(self, x, x0, first_values, mask):
        x = self.residual_mix[0] * x + self.residual_mix[1] * x0
        attn_out, first_values = self.attn(rms_norm(x), first_values, mask)
        x = x + attn_out
        x = x + self.mlp(rms_norm(x))
        return x, first_values


class GPT(nn.Module):
    def __init__(self, vocab_size, num_layers, num_heads, model_dim, max_seq_len, logit_softcap=30.0,
                 attention="sdpa", doc_masking=True):
        super().__init__()
        if model_dim % num_heads or (model_dim // num_heads) % 2:
            raise ValueError(f"model_dim {model_dim} must split into {num_heads} heads of even size")
        self.attention = ATTENTION_BACKENDS[attention]
        self.logit_softcap = logit_softcap
        self.doc_masking = doc_masking
        self.embed = nn.Embedding(vocab_size, model_dim)
        self.blocks = nn.ModuleList(Block(model_dim, num_heads, max_seq_len, self.attention.attend)
                                    for _ in range(num_layers))
        self.num_encoder_layers = num_layers // 2
        self.skip_weights = nn.Parameter(torch.ones(num_layers - self.num_encoder_layers))
        self.lm_head = nn.Linear(model_dim, vocab_size, bias=False)
        nn.init.zeros_(self.lm_head.weight)

    @classmethod
    def from_config(cls, config, attention="sdpa"):
        """The GPT that a run's config (config.Config, or a checkpoint's dict of it) describes."""
        c = config if isinstance(config, dict) else vars(config)
        return cls(c["vocab_size"], c["num_layers"], c["num_heads"], c["model_dim"], max_seq_len=c["seq_len"],
                   logit_softcap=c["logit_softcap"], attention=attention, doc_masking=c["doc_masking"])

    def forward(self, idx, targets=None, reduction="mean"):
        """Logits for idx (batch, seq), or the cross-entropy against targets with the given reduction.

        With doc_masking, every <|endoftext|> starts a new document that attends only to itself.
        """
        doc_ids = (idx == EOT_TOKEN).cumsum(dim=1) if self.doc_masking else None
        mask = self.attention.mask(doc_ids, idx.size(0), idx.size(1), idx.device)
        x = x0 = rms_norm(self.embed(idx))
        first_values = None
        skips = []
        for i, block in enumerate(self.blocks):
            if i >= self.num_encoder_layers and skips:
                x = x + self.skip_weights[i - self.num_encoder_layers] * skips.pop()
            x, first_values = block(x, x0, first_values, mask)
            if i < self.num_encoder_layers:
                skips.append(x)
        logits = self.lm_head(rms_norm(x)).float()
        logits = self.logit_softcap * torch.tanh(logits / self.logit_softcap)
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), reduction=reduction)
