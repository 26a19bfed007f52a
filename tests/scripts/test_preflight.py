"""scripts/preflight.py on CPU, as CI runs it: one process, and two under torchrun."""
import dataclasses
import os
import re
import subprocess
import sys

import pytest
import torch

from config import PRESETS, Config, make_plan
from model import triton_loss, triton_mlp
from model.fp8 import fp8_linear, fp8_supported
from tests.util import COMPACT_BOS, COMPACT_VOCAB_SIZE, RECORD46_TINY, REPO_ROOT

sys.path.insert(0, os.path.join(REPO_ROOT, "scripts"))

# Small enough for seconds a step on two cores, in the end-to-end tests' compact vocabulary
# (tests/util.py); the same flags as train_gpt.py.
SMALL_PREFLIGHT = ["--preset", "cpu-tiny", "--device", "cpu", "--seq-len", "128", "--batch-tokens", "1024",
                   "--preflight-steps", "2", "--vocab-size", str(COMPACT_VOCAB_SIZE), "--bos-token", str(COMPACT_BOS)]


def run_preflight(args, nproc=None):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc else [sys.executable]
    return subprocess.run(launcher + ["scripts/preflight.py", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_preflight_passes_on_one_process_and_reports_each_check():
    result = run_preflight(SMALL_PREFLIGHT)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = re.findall(r"^(PASS|FAIL) ([\w .-]+?): ", result.stdout, re.M)
    assert [name for _, name in lines] == ["environment", "collectives", "attention sdpa", "attention flex",
                                           "attention flex-compiled", "matmul bfloat16", "matmul float32",
                                           "training", "step time", "mfu", "projected run"]
    assert "fp8 head: not checked, the run does not use it" in result.stdout  # cpu-tiny's head is bf16
    assert all(status == "PASS" for status, _ in lines)
    assert re.search(r"^PASS training: cpu-tiny loss 9\.0\d\d -> \d+\.\d{3} over 3 steps", result.stdout, re.M)
    # The last stage's rows (3 x 128 tokens) are shorter than cpu-tiny's 512-token document cut.
    assert re.search(r"^PASS mfu: [\d.]+ GFLOP/token \(attention counted over 384-token documents", result.stdout,
                     re.M)
    assert re.search(r"^PASS projected run: 64 steps x \d+ ms = [\d.]+ min", result.stdout, re.M)
    assert result.stdout.rstrip().endswith("preflight: all checks passed")
    assert "records" not in result.stdout  # no record log


def test_preflight_on_two_processes_checks_collectives_and_fails_a_model_that_cannot_learn():
    # Zero learning rates: the loss cannot go down, which the training check must catch.
    frozen = ["--adam-lr", "0", "--muon-lr", "0"]  # HEAD's Adam table: every Adam LR is adam_lr times a multiplier
    # --micro-batch-tokens counts the first stage's tokens, as in train_gpt.py: 2 rows of 128 of each
    # rank's 512, so 2 rows of 384 in the last stage.
    result = run_preflight(SMALL_PREFLIGHT + frozen + ["--micro-batch-tokens", "256"], nproc=2)
    assert result.returncode == 1, result.stdout + result.stderr
    assert re.search(r"^PASS collectives: gloo all_reduce correct \([\d.]+ GB/s bus\), all_gather correct",
                     result.stdout, re.M)
    # the same loss at the first and last step (about log(8192) = 9.011: the head starts small)
    assert re.search(r"^FAIL training: cpu-tiny loss (9\.0\d\d) -> \1 ", result.stdout, re.M)
    assert "(768-token micro-batches x 2 x 2 rank(s))" in result.stdout
    assert result.stdout.rstrip().endswith("preflight: FAIL: training")


@pytest.mark.skipif(not fp8_supported("cpu"), reason="this torch build's CPU torch._scaled_mm does not take float8")
def test_fp8_head_check_passes_the_kernels_and_fails_a_wrong_one(capsys, monkeypatch):
    import preflight

    # 8,192 ids instead of GPT-2's: the CPU's float8 matmuls take 2 minutes at 50,304 (measured on AMX)
    config = dataclasses.replace(Config(**PRESETS["cpu-tiny"]), fp8_head=True, vocab_size=8192, bos_token=0)
    report = preflight.Report(rank=0)
    preflight.check_fp8_head(report, config, torch.device("cpu"))
    # On CPU, _scaled_mm rounds as the float ops of the reference do; its logits sum in the order the
    # CPU's kernels choose (measured 0 on AVX2, 2.1e-05 on AMX: a few logits one bf16 step apart).
    match = re.fullmatch(r"PASS fp8 head: relative error against the float-op rounding: logits (\S+), input "
                         r"gradient 0\.0e\+00, weight gradient 0\.0e\+00 \(tolerance 1e-02\); float8's own error "
                         r"against the exact logits [\d.]+e-02 \(256 x 128 x 8192\)\n", capsys.readouterr().out)
    assert match and float(match.group(1)) < 2 ** -8
    # A kernel that loses the weight's scale: every logit 512 times too small.
    monkeypatch.setattr(preflight, "fp8_linear", lambda x, w, xs, ws, gs: fp8_linear(x, w, xs, 1.0, gs) * ws)
    preflight.check_fp8_head(report, config, torch.device("cpu"))
    assert capsys.readouterr().out.startswith("FAIL fp8 head: relative error against the float-op rounding: logits")
    assert report.failed == ["fp8 head"]


def test_flops_per_token_counts_every_matmul_weight_and_the_keys_each_query_attends():
    from training.benchmark import flops_per_token

    from model.gpt import GPT

    c = Config(**RECORD46_TINY)  # 8 layers; 0 and 4 without attention, 0 without MLP; 3 value tables
    d, heads, vocab, seq_len = c.model_dim, c.num_heads, c.vocab_size, 512
    matmuls = (6 * (4 * d * d + heads * 12)  # q, k, v, o and the attention gate of the 6 attention layers
               + 7 * 2 * d * 4 * d  # the 7 MLPs
               + 12 + vocab * d)  # smear gate, head; the embedding and value embeddings are lookups

    def attention_flops_per_token(doc_len, window):  # one layer: 4 * d a key forward, twice that backward
        keys = sum(min(position + 1, window + 1) for position in range(doc_len) for _ in range(seq_len // doc_len))
        return 12 * d * keys / seq_len

    model = GPT(make_plan(c))
    # Full causal attention: (T + 1) / 2 keys a query, so 6 * L * (T + 1) * d, the usual 6 * L * T * d.
    assert flops_per_token(model, seq_len) == pytest.approx(6 * matmuls + 6 * attention_flops_per_token(seq_len, seq_len))
    assert flops_per_token(model, seq_len, doc_len=128) == pytest.approx(
        6 * matmuls + 6 * attention_flops_per_token(128, 128))
    model.set_windows((64, 192))  # layers 2 and 7 have the long window: shorter and longer than a document
    assert flops_per_token(model, seq_len, doc_len=128) == pytest.approx(
        6 * matmuls + 4 * attention_flops_per_token(128, 64) + 2 * attention_flops_per_token(128, 192))


@pytest.mark.skipif(not (triton_mlp.triton_mlp_available("cpu") and triton_loss.triton_loss_available("cpu")),
                    reason="needs Triton's interpreter, which tests/conftest.py turns on where no GPU is")
def test_kernel_check_passes_the_triton_kernels_and_fails_a_wrong_one(capsys, monkeypatch):
    import preflight

    config = dataclasses.replace(Config(**PRESETS["cpu-tiny"]), model_dim=32, vocab_size=300, mlp_kernel="triton",
                                 loss_kernel="triton")
    report = preflight.Report(rank=0)
    preflight.check_kernels(report, config, torch.device("cpu"))
    out = capsys.readouterr().out
    assert re.search(r"^PASS mlp kernel triton: relative error against PyTorch \(torch.float32\): output \S+, "
                     r"gradients \S+, \S+, \S+ \(tolerance 2e-02\)$", out, re.M), out
    assert re.search(r"^PASS loss kernel triton: .* 2 x 64 positions x 300 ids", out, re.M), out
    # a kernel that drops the square of relu
    monkeypatch.setattr(preflight, "fused_relu_square_mlp", lambda x, fc, proj: torch.relu(x @ fc.t()) @ proj.t())
    preflight.check_kernels(report, dataclasses.replace(config, loss_kernel="plain"), torch.device("cpu"))
    out = capsys.readouterr().out
    assert out.startswith("FAIL mlp kernel triton") and "loss kernel: plain PyTorch (--loss-kernel plain)" in out
    assert report.failed == ["mlp kernel triton"]
