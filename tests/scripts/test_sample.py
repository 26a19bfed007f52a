"""scripts/sample.py: what top-k sampling picks, and one-line errors for files that are not checkpoints."""
import os
import sys

import pytest
import torch

from data.shards import GPT2_VOCAB_SIZE
from config import Config, make_plan
from model.gpt import GPT
from tests.util import REPO_ROOT
from training import checkpoint

sys.path.insert(0, os.path.join(REPO_ROOT, "scripts"))
import sample  # noqa: E402

SEQ_LEN = 32


def greedy(model, prompt, new_tokens):
    """Greedy decoding spelled out: the most likely real token (not a padded id), every step."""
    tokens = list(prompt)
    for _ in range(new_tokens):
        with torch.no_grad():
            tokens.append(int(model(torch.tensor([tokens]))[0, -1, :GPT2_VOCAB_SIZE].argmax()))
    return tokens[len(prompt):]


@pytest.mark.parametrize("random_head", [True, False], ids=["random-weights", "untrained-all-logits-tie"])
def test_top_k_1_samples_the_greedy_tokens_at_any_temperature(random_head):
    torch.manual_seed(0)
    model = GPT(make_plan(Config(vocab_size=50304, num_layers=2, num_heads=2, model_dim=32, seq_len=SEQ_LEN))).eval()
    if random_head:  # an untrained model's output layer is zero: every logit ties
        torch.nn.init.normal_(model.lm_head.weight, std=0.5)
    prompt = [50256, 464, 2163]
    expected = greedy(model, prompt, 8)
    for temperature in (0.5, 1.0, 3.0):
        for seed in range(3):
            sampled = sample.generate(model, prompt, 8, temperature, 1, SEQ_LEN, torch.Generator().manual_seed(seed),
                                      stop_at_eot=False)
            assert sampled == expected, (temperature, seed)


def one_line_error(capsys, path):
    assert sample.main(["--checkpoint", str(path), "--max-new-tokens", "1"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and captured.err.startswith("error: ")
    return captured.err


def test_files_that_are_not_whole_checkpoints_are_one_line_errors(tmp_path, capsys):
    path = tmp_path / "file.pt"
    torch.save({"format": checkpoint.CHECKPOINT_FORMAT, "step": 3}, path)
    assert one_line_error(capsys, path) == (f"error: {path} is not a complete checkpoint: it has no train_time_ms, "
                                            "config, code_hash, model, adamw, muon_momentum, loader, rng, world_size\n")

    torch.save({"model": {}, "config": {}}, path)  # a bare dict of weights, as other trainers save
    assert "is not a checkpoint of this trainer" in one_line_error(capsys, path)

    complete = {key: {} for key in checkpoint.KEYS}
    torch.save(dict(complete, format=checkpoint.CHECKPOINT_FORMAT), path)
    assert one_line_error(capsys, path) == \
        f"error: {path} does not hold a model this code can build: its config has no 'vocab_size'\n"

    # A config that builds a model (its vocabulary holds its --bos-token, as every run's must), but no weights.
    config = dict(vocab_size=64, bos_token=0, num_layers=1, num_heads=2, model_dim=8, seq_len=8, logit_softcap=30.0,
                  doc_masking=True)
    torch.save(dict(complete, format=checkpoint.CHECKPOINT_FORMAT, config=config), path)  # but no weights
    assert one_line_error(capsys, path).startswith(f"error: {path} does not hold a model this code can build: "
                                                   "Error(s) in loading state_dict for GPT: Missing key(s)")
