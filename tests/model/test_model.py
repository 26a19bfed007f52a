import math
import warnings

import pytest
import torch

from data.shards import EOT_TOKEN
from model.attention import ATTENTION_BACKENDS, attention_reference, resolve_backend
from config import Config, make_plan
from model.gpt import GPT
from optim.optimizer import Optimizer


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
@pytest.mark.parametrize("seq_len", [128, 256])
@pytest.mark.parametrize("documents", [False, True], ids=["causal", "documents"])
def test_backends_match_explicit_mask_reference(backend, seq_len, documents):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, seq_len, 32) for _ in range(3))
    # Documents of random lengths, including one spanning a 128-token block boundary.
    doc_ids = (torch.rand(2, seq_len) < 0.03).cumsum(1) if documents else None
    if documents:
        doc_ids[:, 100:140] = doc_ids[:, 100:101]
        doc_ids[:, 140:] += 1
    mask, attend = ATTENTION_BACKENDS[backend]
    out = attend(q, k, v, mask(doc_ids, 2, seq_len, q.device))
    assert torch.allclose(out, attention_reference(q, k, v, doc_ids), atol=1e-5)


def test_compiled_flex_attention_forward_on_cpu_matches_the_reference():
    """The inductor-generated FlexAttention kernel (forward only on CPU), fed the same mask_mod's block mask."""
    from torch.nn.attention.flex_attention import flex_attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 256, 32) for _ in range(3))
    doc_ids = (torch.rand(2, 256) < 0.03).cumsum(1)
    compiled = torch.compile(flex_attention, dynamic=False)
    for ids in (None, doc_ids):
        mask = ATTENTION_BACKENDS["flex"].mask(ids, 2, 256, q.device)
        assert torch.allclose(compiled(q, k, v, block_mask=mask), attention_reference(q, k, v, ids), atol=1e-5)


def test_one_mask_mod_gives_every_backend_its_mask():
    from torch.nn.attention.flex_attention import create_mask

    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2]])
    dense = ATTENTION_BACKENDS["sdpa"].mask(doc_ids, 1, 8, torch.device("cpu"))
    expected = torch.zeros(8, 8, dtype=torch.bool)
    for q in range(8):
        for kv in range(q + 1):
            expected[q, kv] = bool(doc_ids[0, q] == doc_ids[0, kv])
    assert torch.equal(dense[0, 0], expected)
    block_mask = ATTENTION_BACKENDS["flex"].mask(doc_ids, 1, 8, torch.device("cpu"))
    assert torch.equal(create_mask(block_mask.mask_mod, 1, None, 8, 8, device="cpu")[0, 0], expected)


def test_backend_choice():
    assert resolve_backend("auto", torch.device("cpu")) == "sdpa"
    assert resolve_backend("auto", torch.device("cuda")) == "flex"
    with pytest.raises(ValueError, match="unknown attention backend"):
        resolve_backend("magic", torch.device("cpu"))


def tiny_gpt(attention="sdpa", num_layers=3):
    torch.manual_seed(0)
    return GPT(make_plan(Config(vocab_size=50304, num_layers=num_layers, num_heads=2, model_dim=32, seq_len=64)),
               attention)


def mixing_gpt(attention):
    """A tiny GPT whose attention outputs and head are not zero, so positions visibly influence each other."""
    model = tiny_gpt(attention)
    torch.nn.init.normal_(model.lm_head.weight, std=0.02)
    for block in model.blocks:
        torch.nn.init.normal_(block.attn.proj.weight, std=0.05)
    return model


def test_untrained_model_predicts_uniformly():
    # The zero-initialised head makes every logit 0, so the first loss is exactly ln(vocab).
    model = tiny_gpt()
    idx = torch.randint(0, 50257, (2, 16))
    assert model(idx, idx).item() == pytest.approx(math.log(50304), abs=1e-5)


@pytest.mark.parametrize("attention", ["sdpa", "flex"])
def test_no_position_sees_the_future(attention):
    model = mixing_gpt(attention)
    idx = torch.randint(0, 50257, (1, 64))
    changed = idx.clone()
    changed[0, 40:] = (changed[0, 40:] + 7) % 50257
    with torch.no_grad():
        a, b = model(idx), model(changed)
    assert torch.allclose(a[0, :40], b[0, :40], atol=1e-5)
    assert not torch.allclose(a[0, 40:], b[0, 40:], atol=1e-3)


def test_softcap_is_30_tanh_of_the_head_output_over_30():
    model = tiny_gpt()
    torch.nn.init.normal_(model.lm_head.weight, std=20.0)  # raw logits from about -100 to 100
    head_outputs = []
    model.lm_head.register_forward_hook(lambda module, inputs, output: head_outputs.append(output))
    with torch.no_grad():
        logits = model(torch.randint(0, 50257, (1, 8)))
    [z] = head_outputs
    assert z.abs().max() > 60  # deep in the saturating range, where a clamp or another cap differs
    assert torch.allclose(logits, 30 * torch.tanh(z.float() / 30), atol=1e-5)


@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
def test_every_parameter_has_exactly_one_optimizer(optimizer):
    model = tiny_gpt(num_layers=4)
    config = Config(optimizer=optimizer, embed_lr=0.6, head_lr=0.008, scalar_lr=0.03, adamw_matrix_lr=0.002,
                    muon_lr=0.05)
    optimizers = Optimizer(model, make_plan(config)).parts
    seen = [id(p) for opt in optimizers for g in opt.param_groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())
    if optimizer == "muon":
        muon_params = optimizers[1].param_groups[0]["params"]
        assert all(p.ndim == 2 for p in muon_params)
        assert all(p is not model.embed.weight and p is not model.lm_head.weight for p in muon_params)
    # Each parameter's learning rate is the one its role has in the config.
    hidden = {id(p) for p in model.blocks.parameters() if p.ndim == 2}
    scalars = {id(p) for p in model.blocks.parameters() if p.ndim < 2} | {id(model.skip_weights)}
    expected_lr = {id(model.embed.weight): 0.6, id(model.lm_head.weight): 0.008}
    expected_lr.update({i: 0.03 for i in scalars})
    expected_lr.update({i: 0.05 if optimizer == "muon" else 0.002 for i in hidden})
    for opt in optimizers:
        for group in opt.param_groups:
            assert group["initial_lr"] == group["lr"]
            for p in group["params"]:
                assert group["lr"] == expected_lr[id(p)], tuple(p.shape)


@pytest.mark.parametrize("attention", ["sdpa", "flex"])
def test_no_token_attends_across_a_document_boundary(attention):
    model = mixing_gpt(attention)
    idx = torch.randint(0, 50000, (1, 64))
    idx[0, 0], idx[0, 30] = EOT_TOKEN, EOT_TOKEN  # documents [0, 30) and [30, 64)
    changed = idx.clone()
    changed[0, 5:30] = (changed[0, 5:30] + 11) % 50000
    with torch.no_grad():
        a, b = model(idx), model(changed)
        model.doc_masking = False
        c = model(changed)
    assert torch.allclose(a[0, 30:], b[0, 30:], atol=1e-5)  # the second document never saw the first
    assert not torch.allclose(a[0, 30:], c[0, 30:], atol=1e-3)  # without masking it does


def test_the_compiled_model_gets_a_static_graph_for_every_row_length():
    """Each stage's rows (and validation's) are a row length of their own; record #46 compiles one static
    graph for each. Dynamo on its own would recompile the second length with symbolic sizes. FlexAttention
    is traced as itself, not through the cache that holds its compiled form for eager use."""
    from training.setup import compile_model

    graph_inputs = []

    def recording_backend(graph, example_inputs):
        graph_inputs.append([tuple(t.shape) if isinstance(t, torch.Tensor) else t for t in example_inputs])
        return graph.forward

    model = mixing_gpt("flex").requires_grad_(False)  # FlexAttention has no backward on CPU
    compiled = compile_model(model, backend=recording_backend)
    idx = torch.randint(0, 50257, (1, 65))
    idx[0, 20] = EOT_TOKEN
    torch._dynamo.utils.warn_once_cache.clear()  # dynamo warns once a process
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for seq_len in (32, 64):
            expected = model(idx[:, :seq_len], idx[:, 1:seq_len + 1])
            assert torch.equal(compiled(idx[:, :seq_len], idx[:, 1:seq_len + 1]), expected)
    assert not [w for w in caught if "lru_cache" in str(w.message)]
    # A dynamic graph takes its sizes as SymInt inputs; a static one has its row length in the shapes.
    assert graph_inputs and not [x for inputs in graph_inputs for x in inputs if isinstance(x, torch.SymInt)]
    assert {32, 64} <= {d for inputs in graph_inputs for x in inputs if isinstance(x, tuple) for d in x}
