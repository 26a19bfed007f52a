"""What the benchmarks and the preflight measure a step against: the FLOPs of a token, a device's peak,
and synthetic batches shaped like real ones."""
import torch

from config import GPT2_VOCAB_SIZE

# Dense bf16 tensor-core peak, FLOP/s, by a substring of torch.cuda.get_device_name (first match wins).
PEAK_BF16_FLOPS = [
    ("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12), ("B200", 2250e12),
    ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12), ("A10G", 70e12), ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
]


def peak_flops(device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS if key in name), None)


def attended_keys_per_query(doc_len, window):
    """The mean number of keys a query attends in a document of doc_len tokens: itself and the tokens
    before it, at most `window` of them (None: all)."""
    keys_max = doc_len if window is None else min(window + 1, doc_len)
    return (keys_max * (keys_max + 1) / 2 + (doc_len - keys_max) * keys_max) / doc_len


def flops_per_token(model, seq_len, doc_len=None):
    """Training FLOPs per token: 6 per weight of every matmul (embeddings and value embeddings are
    lookups, not matmuls) plus, in each layer with attention, 12 * width per attended key (q.k and
    the weighted sum of v, forward and backward), with the layer's window, in documents of doc_len
    tokens (at most seq_len; None: the whole row). With the longest document a row can hold, real
    documents being shorter, this is an upper bound."""
    lookups = {id(model.embed.weight)} | {id(e.weight) for e in model.value_embeds}
    if model.bigram is not None:
        lookups.add(id(model.bigram.table))
    matmul_weights = sum(p.numel() for p in model.parameters() if p.ndim >= 2 and id(p) not in lookups)
    doc_len = doc_len or seq_len
    keys = sum(attended_keys_per_query(doc_len, model.layer_window(i))
               for i, block in enumerate(model.blocks) if block is not None and block.attn is not None)
    return 6 * matmul_weights + 12 * model.embed.embedding_dim * keys


def synthetic_micro_batches(config, micro_batch_tokens, accumulation, device, generator):
    """Random tokens (GPT-2's, or the config's smaller vocabulary) with a document start every ~500
    tokens, like real packed rows."""
    batches = []
    for _ in range(accumulation):
        shape = (micro_batch_tokens // config.seq_len, config.seq_len + 1)
        rows = torch.randint(0, min(GPT2_VOCAB_SIZE - 1, config.vocab_size), shape, generator=generator)
        rows[torch.rand(rows.shape, generator=generator) < 1 / 500] = config.bos_token
        rows = rows.to(device)
        batches.append((rows[:, :-1], rows[:, 1:]))
    return batches
