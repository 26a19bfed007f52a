"""Rows split at document starts for cards that cannot hold one row (--row-split-tokens): the pieces the
loader makes, and the update they give against the whole row's. With document masking no attention
crosses a document, so the pieces compute the whole row's gradient; only the techniques that read across
a document start (the look-back gate, the key offset, the bigram hash, the multi-token loss) see less."""
import contextlib
import dataclasses

import numpy as np
import pytest
import torch

from config import PRESETS, Config, ConfigError, make_plan
from data.loader import IGNORED_TARGET, MicroBatches, TrainLoader, padded_piece, split_at_documents
from data.shards import write_shard
from model.gpt import GPT
from training.loop import prepare_step, train_step

CPU = torch.device("cpu")
BOS = 0

# HEAD's recipe, small: every technique on (the multi-token loss over the next 3 tokens at step 0)
TINY_HEAD = dict(num_layers=8, num_heads=2, model_dim=32, vocab_size=320, bos_token=BOS, seq_len=96, batch_tokens=192,
                 bigram_rows=97, bigram_sign_rows=64, val_tokens=192, steps=24, extension_steps=0, window_block=8,
                 dc_window=8, max_doc_len_stages="", max_doc_len=0, attention_free_layers="4",
                 long_window_layers="2,7", value_embed_layers="1:0,6:1,7:2", unet_skips="2:4",
                 attn_input_layers="6:5,7:5", paired_head_layers="0,6", xsa_layers="1,2,3,5", dc_layers="7",
                 gated_attn_layers="2,7", mudd_gate_layer=3, numerics="float32", val_seq_len=0, fp8_mlp=False,
                 mantissa_weights=False, prefix_weight_stages="", mlp_kernel="plain", loss_kernel="plain")
# Off: each technique that reads across a document start
ACROSS_DOCUMENTS_OFF = dict(smear_gate=False, key_offset=False, bigram_rows=0, mtp_weight_stages="1,1,1")
DOC_LENGTHS = (20, 31, 9, 25, 12)  # one row of 96 inputs (+1 target): the last document is cut


def row_of_documents(seed=0):
    """A row of DOC_LENGTHS documents, each starting with BOS, seq_len + 1 = 97 tokens."""
    generator = np.random.default_rng(seed)
    docs = [np.concatenate([[BOS], generator.integers(1, 320, n - 1)]) for n in DOC_LENGTHS]
    return np.concatenate(docs)[:97]


def test_pieces_are_whole_documents_of_at_most_the_limit_covering_the_row():
    row = row_of_documents()
    starts = [0, 20, 51, 60, 85]
    assert split_at_documents(row, 40, BOS) == [(0, 20), (20, 60), (60, 96)]
    assert split_at_documents(row, 96, BOS) == [(0, 96)]
    for limit in (31, 45, 60, 95):
        pieces = split_at_documents(row, limit, BOS)
        assert pieces[0][0] == 0 and pieces[-1][1] == 96
        assert all(a[1] == b[0] for a, b in zip(pieces, pieces[1:]))  # contiguous
        assert all(first in starts and end - first <= limit for first, end in pieces)
        # greedy: a piece ends where the next document would not fit
        assert all(next_end - first > limit for (first, _), (_, next_end) in zip(pieces, pieces[1:]))
    with pytest.raises(ValueError, match="a document of 31 tokens does not fit a piece of 30 tokens"):
        split_at_documents(row, 30, BOS)


def test_the_loader_serves_each_row_as_its_pieces(tmp_path):
    stream = np.concatenate([row_of_documents(seed) for seed in range(12)]).astype(np.uint16)
    path = str(tmp_path / "train_000.bin")
    write_shard(path, stream)
    whole = TrainLoader([path], 192, 96, 96, 0, 1, CPU, bos_align=True, bos_token=BOS, max_doc_len=97,
                        vocab_size=320, prefetch=False)
    pieces = TrainLoader([path], 192, 96, 96, 0, 1, CPU, bos_align=True, bos_token=BOS, max_doc_len=97,
                         vocab_size=320, prefetch=False, piece_tokens=40)
    for _ in range(3):
        rows, split = whole.next_batch(), pieces.next_batch()
        assert len(split) == 6 and split.rows_per_rank == 2  # 2 rows of 3 pieces each
        assert sum(split.rows) == pytest.approx(2)
        # every piece is padded to one length: its real tokens, then <|endoftext|> inputs and ignored targets
        assert all(x.shape == y.shape == (1, 40) for x, y in split)
        real = [round(held * 96) for held in split.rows]
        assert all(torch.all(x[0, n:] == BOS) and torch.all(y[0, n:] == IGNORED_TARGET) and torch.all(y[0, :n] >= 0)
                   for (x, y), n in zip(split, real))
        # the pieces' real inputs are the rows' inputs, in order, and each piece's last target is the next one's BOS
        joined = torch.cat([x[0, :n] for (x, _), n in zip(split, real)])
        assert torch.equal(joined, torch.cat([x for x, _ in rows], dim=1).view(-1)) and sum(real) == 2 * 96
        assert all(x[0, 0] == BOS for x, _ in split)
        assert all(y[0, n - 1] == BOS for (_, y), n in zip(split[:2], real[:2]))


class GradientsOnly:
    """The optimizer as train_step sees it, without the update: the gradients stay on the parameters."""
    momentum = 0.0

    def backward_context(self, step, last):
        return contextlib.nullcontext()

    def step(self, step):
        pass


def perturbed_model(config):
    """HEAD's tiny model with every parameter moved off its initial value (the look-back gate and the bigram
    table start at zero, where they would change nothing)."""
    torch.manual_seed(0)
    model = GPT(make_plan(config), "sdpa")
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return model


def gradients(config, micro_batches):
    model = perturbed_model(config)
    prepare_step(model, GradientsOnly(), make_plan(config), 0)
    loss = train_step(model, GradientsOnly(), micro_batches, contextlib.nullcontext(), 0, config)
    return loss, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def whole_and_pieces(limit):
    """The row whole, and in pieces padded to `limit` positions as the loader serves them."""
    row = row_of_documents().astype(np.int64)
    whole = [(torch.from_numpy(row[None, :-1]), torch.from_numpy(row[None, 1:]))]
    bounds = split_at_documents(row, limit, BOS)
    pieces = MicroBatches([tuple(map(torch.from_numpy, padded_piece(row, a, b, limit, BOS))) for a, b in bounds],
                          [(b - a) / 96 for a, b in bounds], 1)
    return whole, pieces, bounds


@pytest.fixture(scope="module", autouse=True)
def _optimizer_step_free(monkeypatch_module):
    # prepare_step sets the optimizer's schedules; GradientsOnly has none to set
    monkeypatch_module.setattr(GradientsOnly, "set_schedules", lambda self, step: 1.0, raising=False)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_pieces_give_the_whole_rows_gradient_where_no_technique_reads_across_documents(reduction):
    config = Config(**{**PRESETS["speedrun"], **TINY_HEAD, **ACROSS_DOCUMENTS_OFF, "loss_reduction": reduction})
    whole, pieces, _ = whole_and_pieces(40)
    loss_whole, grads_whole = gradients(config, whole)
    loss_pieces, grads_pieces = gradients(config, pieces)
    torch.testing.assert_close(loss_pieces, loss_whole, rtol=1e-5, atol=1e-6)
    assert grads_whole.keys() == grads_pieces.keys()
    for name in grads_whole:
        torch.testing.assert_close(grads_pieces[name], grads_whole[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("technique, off", [("smear_gate", False), ("key_offset", False), ("bigram_rows", 0),
                                            ("mtp_weight_stages", "1,1,1")])
def test_each_technique_that_reads_across_documents_changes_the_gradient_alone(technique, off):
    """Each of the four named techniques, switched on alone, makes the pieces' gradient differ: the list of
    what changes under --row-split-tokens is complete and none of it is empty."""
    on = dict(PRESETS["speedrun"])[technique]
    config = Config(**{**PRESETS["speedrun"], **TINY_HEAD, **ACROSS_DOCUMENTS_OFF, technique: on})
    whole, pieces, _ = whole_and_pieces(40)
    _, grads_whole = gradients(config, whole)
    _, grads_pieces = gradients(config, pieces)
    differs = max((grads_pieces[n] - grads_whole[n]).abs().max() / grads_whole[n].abs().max().clamp_min(1e-12)
                  for n in grads_whole)
    assert differs > 1e-3, (technique, differs)


def test_with_every_technique_on_only_the_first_document_of_each_later_piece_changes():
    """The logits of a split row are the whole row's except in the documents that start a piece (after the
    first): the look-back gate, key offset and bigram hash read the token before a document's start, and
    what they read there travels through that document by attention, never into another document."""
    config = Config(**{**PRESETS["speedrun"], **TINY_HEAD})
    model = perturbed_model(config)
    model.set_windows(make_plan(config).windows_at(0))
    whole, pieces, bounds = whole_and_pieces(40)
    with torch.no_grad():
        logits_whole = model(whole[0][0])[0]
        logits_pieces = torch.cat([model(x)[0][: b - a] for (x, _), (a, b) in zip(pieces, bounds)])
    changed = torch.zeros(96, dtype=torch.bool)
    for first, _ in bounds[1:]:
        document = slice(first, first + DOC_LENGTHS[[0, 20, 51, 60, 85].index(first)])
        changed[document] = True
        # from its first token on (what reaches the later ones depends on the windows at step 0)
        assert (logits_pieces[document][0] - logits_whole[document][0]).abs().max() > 1e-3
    torch.testing.assert_close(logits_pieces[~changed], logits_whole[~changed], rtol=1e-4, atol=1e-5)


def test_a_piece_shorter_than_the_longest_document_is_refused():
    with pytest.raises(ConfigError, match="--row-split-tokens 200 is shorter than the longest document a row holds "
                                          r"\(512 tokens\)"):
        make_plan(Config(**{**PRESETS["cpu-tiny"], "row_split_tokens": "200"}))
    with pytest.raises(ConfigError, match="needs --bos-align true"):
        make_plan(Config(**{**PRESETS["record11"], "row_split_tokens": "512"}))
    with pytest.raises(ConfigError, match="--row-split-tokens 520 is not a multiple of 16"):
        make_plan(Config(**{**PRESETS["cpu-tiny"], "row_split_tokens": "520"}))
    assert make_plan(Config(**{**PRESETS["cpu-tiny"], "row_split_tokens": "512"})).row_split_tokens == 512
    assert make_plan(dataclasses.replace(Config(**PRESETS["cpu-tiny"]), row_split_tokens="off")).row_split_tokens == 0
