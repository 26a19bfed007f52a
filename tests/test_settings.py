"""Settings that shape the data, the attention or the schedule, checked through train_gpt.main on
what the model is actually fed: every optimizer step's batches and learning rates are recorded."""
import dataclasses
import glob
import signal

import numpy as np
import pytest
import torch

import train_gpt
from config import ConfigError, make_plan, parse_config
from data.loader import TrainLoader
from data.shards import EOT_TOKEN, HEADER_BYTES, HEADER_INTS, SHARD_MAGIC, SHARD_VERSION, read_tokens, write_shard
from model import attention
from tests.util import COMPACT_BOS, RECORD11_TINY, record_logs
from training.setup import check_data, resolve_runtime

# Seconds a step on two cores: 4 rows of 64 tokens, in 2 micro-batches.
TINY = RECORD11_TINY + ["--device", "cpu", "--seq-len", "64", "--batch-tokens", "256",
                        "--micro-batch-tokens", "128", "--val-tokens", "1024", "--val-every", "0", "--save-final", "false"]


@pytest.fixture
def trained(monkeypatch, tmp_path):
    """Runs train_gpt.main in this process; returns (exit code, steps, masks, log text).

    steps: per optimizer step, this rank's rows (inputs + last target) and each group's LR multiplier.
    masks: every dense attention mask the model built.
    """
    steps, masks = [], []
    real_train_step = train_gpt.train_step

    def recording_train_step(model, optimizer, micro_batches, autocast, step, config):
        rows = [torch.cat([x, y[:, -1:]], dim=1) for x, y in micro_batches]
        multipliers = [g["lr"] / g["initial_lr"] for opt in optimizer.parts for g in opt.param_groups]
        steps.append(dict(rows=torch.cat(rows).numpy(), lr_multipliers=multipliers))
        return real_train_step(model, optimizer, micro_batches, autocast, step, config)

    sdpa = attention.ATTENTION_BACKENDS["sdpa"]

    def recording_mask(doc_ids, batch, seq_len, device, window=None):
        mask = sdpa.mask(doc_ids, batch, seq_len, device, window)
        masks.append(mask)
        return mask

    monkeypatch.setattr(train_gpt, "train_step", recording_train_step)
    monkeypatch.setitem(attention.ATTENTION_BACKENDS, "sdpa", sdpa._replace(mask=recording_mask))
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def run(args):
        steps.clear(), masks.clear()
        records = tmp_path / f"records{len(list(tmp_path.iterdir()))}"
        try:
            code = train_gpt.main(TINY + list(args) + ["--records-dir", str(records),
                                                         "--checkpoint-dir", str(records) + "_checkpoints"])
        finally:  # the run installs its own stop handlers
            for s, h in handlers.items():
                signal.signal(s, h)
        logs = record_logs(records) if records.exists() else []
        return code, list(steps), list(masks), open(logs[0]).read() if logs else ""

    return run


def documents_of(paths):
    """Each shard's documents: from one <|endoftext|> to the next, or to the shard's end."""
    docs = []
    for path in paths:
        tokens = read_tokens(str(path))
        starts = list(np.flatnonzero(tokens == EOT_TOKEN)) + [len(tokens)]
        docs += [tokens[a:b] for a, b in zip(starts, starts[1:])]
    return docs


def test_bos_aligned_rows_pack_whole_documents_cut_to_max_doc_len(trained, pydocs_dir, pydocs_files):
    code, steps, _, _ = trained(pydocs_files + ["--bos-align", "true", "--max-doc-len", "40", "--steps", "2"])
    assert code == 0
    rows = np.concatenate([s["rows"] for s in steps])
    # The rule written out: documents in order, each cut to 40 tokens, packed into rows of
    # seq_len + 1 = 65; a row's last document is cut to fit, and the next row starts at the next one.
    docs = documents_of(sorted(glob.glob(f"{pydocs_dir}/pydocs_train_*.bin")))
    expected, doc = [], 0
    while len(expected) < len(rows):
        row = []
        while len(row) < 65:
            row += list(docs[doc][:min(40, 65 - len(row))])
            doc += 1
        expected.append(row)
    assert np.array_equal(rows, np.array(expected))
    assert len(rows) == 8 and all(row[0] == EOT_TOKEN for row in rows)


def test_bos_token_marks_the_documents_of_another_vocabulary(trained, compact_files):
    """--bos-token: the document start that alignment and masking look for (the compact corpus's 0)."""
    code, steps, masks, _ = trained(compact_files + ["--bos-align", "true", "--max-doc-len", "40", "--steps", "1"])
    assert code == 0
    rows = steps[0]["rows"]  # 4 rows of 65 tokens, in 2 micro-batches of 2
    assert len(rows) == 4 and all(row[0] == COMPACT_BOS for row in rows)
    assert all((row == COMPACT_BOS).sum() >= 2 for row in rows)  # documents cut to 40 tokens: two or more a row
    # Document-causal attention written out: query q sees key k <= q when both follow the same last BOS.
    for micro_batch, mask in enumerate(masks[:2]):
        for row, row_mask in zip(rows[2 * micro_batch: 2 * micro_batch + 2], mask):
            doc = np.cumsum(row[:-1] == COMPACT_BOS)
            expected = np.tril(doc[:, None] == doc[None, :])
            assert np.array_equal(row_mask[0].numpy(), expected)


def test_contiguous_rows_are_the_token_stream(trained, pydocs_dir, pydocs_files):
    code, steps, _, _ = trained(pydocs_files + ["--steps", "2"])
    assert code == 0
    stream = read_tokens(f"{pydocs_dir}/pydocs_train_000001.bin")
    for k, step in enumerate(steps):  # step k reads tokens [256k, 256k + 257) as 4 rows of 65
        for r, row in enumerate(step["rows"]):
            assert np.array_equal(row, stream[256 * k + 64 * r : 256 * k + 64 * r + 65])


def test_doc_masking_false_lets_attention_cross_documents(trained, pydocs_files):
    causal = torch.tril(torch.ones(64, 64, dtype=torch.bool))
    code, _, masks, _ = trained(pydocs_files + ["--steps", "1"])
    assert code == 0 and masks
    # The pydocs rows hold several documents: with masking, rows hide some earlier positions.
    assert any(not torch.equal(row_mask[0], causal) for m in masks for row_mask in m)
    code, _, masks, text = trained(pydocs_files + ["--steps", "1", "--doc-masking", "false"])
    assert code == 0 and masks and '"doc_masking": false' in text
    assert all(torch.equal(row_mask[0], causal) for m in masks for row_mask in m)


def test_warmup_then_cooldown_to_the_lr_floor(trained, pydocs_files):
    code, steps, _, _ = trained(pydocs_files + ["--steps", "10", "--warmup-steps", "3", "--cooldown-frac", "0.5",
                                                "--lr-floor", "0.2"])
    assert code == 0 and len(steps) == 10
    # Warm-up: (s + 1) / 3 for steps 0, 1, 2; then 1 while at least 5 steps remain; then linear
    # from 1 towards 0.2, which it would reach at step 10: 0.2 + 0.8 * (10 - s) / 5.
    expected = [1 / 3, 2 / 3, 1.0, 1.0, 1.0, 1.0, 0.2 + 0.8 * 4 / 5, 0.2 + 0.8 * 3 / 5, 0.2 + 0.8 * 2 / 5,
                0.2 + 0.8 * 1 / 5]
    for s, step in enumerate(steps):
        assert step["lr_multipliers"] == pytest.approx([expected[s]] * len(step["lr_multipliers"])), s


def test_data_wrap_starts_the_train_files_over(trained, pydocs_dir, pydocs_files, tmp_path):
    # One train shard holding exactly two steps (and a bit): step 3 must be step 1 again.
    tokens = read_tokens(f"{pydocs_dir}/pydocs_train_000001.bin")[: 2 * 256 + 10]
    write_shard(str(tmp_path / "two_steps_train_000000.bin"), tokens)
    short = pydocs_files[:1] + [str(tmp_path / "two_steps_train_*.bin")] + pydocs_files[2:]
    code, steps, _, _ = trained(short + ["--steps", "4", "--data-wrap", "true"])
    assert code == 0 and len(steps) == 4
    assert np.array_equal(steps[2]["rows"], steps[0]["rows"]) and np.array_equal(steps[3]["rows"], steps[1]["rows"])
    assert not np.array_equal(steps[1]["rows"], steps[0]["rows"])
    code, steps, _, _ = trained(short + ["--steps", "4"])
    assert code == 2 and not steps  # without it the run is refused before any step


def header_only_shard(path, num_tokens):
    """A shard whose header promises num_tokens: the file is sparse, so FineWeb's sizes cost no disk."""
    with open(path, "wb") as f:
        f.write(np.array([SHARD_MAGIC, SHARD_VERSION, num_tokens] + [0] * (HEADER_INTS - 3), dtype="<i4").tobytes())
        f.truncate(HEADER_BYTES + 2 * num_tokens)


@pytest.fixture(scope="module")
def fineweb_sized_shards(tmp_path_factory):
    """FineWeb10B's layout as the download script writes it: one val shard and train shards of 100M tokens."""
    folder = tmp_path_factory.mktemp("fineweb10B")
    header_only_shard(folder / "fineweb_val_000000.bin", 100_000_000)
    for i in range(1, 17):
        header_only_shard(folder / f"fineweb_train_{i:06d}.bin", 100_000_000)
    return folder


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("micro_batch_tokens", ["auto", "32768"])
def test_speedrun_preset_is_valid_on_1_to_8_ranks(fineweb_sized_shards, world_size, micro_batch_tokens):
    _, config = parse_config([
        "--train-files", str(fineweb_sized_shards / "fineweb_train_*.bin"),
        "--val-files", str(fineweb_sized_shards / "fineweb_val_*.bin"), "--micro-batch-tokens", micro_batch_tokens,
        "--device", "cpu", "--dtype", "bfloat16", "--compile", "off"])
    # HEAD (as record #46): 8 rows of 16,384 tokens a step, 2x and 3x as long in the later stages
    assert (config.batch_tokens, config.seq_len, config.val_tokens, config.steps) == (131_072, 16_384, 10_485_760, 1285)
    cpu = torch.device("cpu")
    plan = make_plan(config)
    train_paths, val_paths = check_data(plan)
    assert len(train_paths) == 16 and len(val_paths) == 1
    most_rows = -(-8 // world_size)  # 8 rows on 3 ranks: 3, 3 and 2
    rows = []
    for rank in range(world_size):
        micro = resolve_runtime(plan, rank, world_size).micro_batch_tokens
        assert micro == (most_rows * 16_384 if micro_batch_tokens == "auto" else min(32_768, most_rows * 16_384))
        loader = TrainLoader(train_paths, config.batch_tokens, config.seq_len, micro, rank, world_size, cpu,
                             prefetch=False, stages=plan.stages)
        rows.append(loader.end_row - loader.first_row)
        # a rank's micro-batches hold its rows, the last one fewer where they do not divide
        assert loader.accumulation_steps == -(-rows[-1] * 16_384 // micro)
    # Every world size computes the same global batch, in whole rows, the first ranks one more.
    assert sum(rows) == 8 and max(rows) - min(rows) <= 1 and rows == sorted(rows, reverse=True)


def test_speedrun_preset_refuses_more_ranks_than_rows_with_the_reason(fineweb_sized_shards):
    _, config = parse_config(["--train-files", str(fineweb_sized_shards / "fineweb_train_*.bin"),
                              "--val-files", str(fineweb_sized_shards / "fineweb_val_*.bin"),
                              "--device", "cpu", "--dtype", "bfloat16", "--compile", "off"])
    with pytest.raises(ConfigError) as refused:
        resolve_runtime(make_plan(config), 0, 9)
    assert str(refused.value) == ("--batch-tokens 131072 must be whole rows of --seq-len 16384, at least one for each "
                                  "of 9 rank(s): use a multiple of 16384 of at least 147456")


def test_speedrun_preset_refuses_float32_autocast_for_its_bf16_weights():
    """--mantissa-weights stores NorMuon's matrices in bf16: a float32 forward cannot multiply them."""
    _, config = parse_config(["--device", "cpu", "--dtype", "float32"])
    with pytest.raises(ConfigError, match="--mantissa-weights stores NorMuon's matrices in bf16"):
        resolve_runtime(make_plan(config))
    resolve_runtime(make_plan(dataclasses.replace(config, mantissa_weights=False, prefix_weight_stages="")))


def test_heads_schedule_fields_reach_the_loader_and_the_optimizer(trained, pydocs_files):
    """HEAD's schedules on a tiny run: 4 scheduled steps in 2 stages ending at round(4/2) = 2, and 2
    extension steps; documents cut to 10 tokens in stage 0 and 30 after; LR x1 then x2 by stage, the
    cooldown from step int(4 x (1 - 0.5)) = 2 to 0.2."""
    code, steps, _, _ = trained(pydocs_files + [
        "--bos-align", "true", "--batch-stages", "1,2", "--steps", "6", "--extension-steps", "2",
        "--stage-boundaries", "round", "--max-doc-len-stages", "10,30", "--stage-lr", "1,2",
        "--cooldown-start", "step", "--cooldown-frac", "0.5", "--lr-floor", "0.2"])
    assert code == 0 and len(steps) == 6
    for s, step in enumerate(steps):
        rows, limit = step["rows"], 10 if s < 2 else 30
        assert rows.shape == (4, 65 if s < 2 else 129)
        pieces = [np.split(row, np.flatnonzero(row == EOT_TOKEN)[1:]) for row in rows]
        assert all(len(piece) <= limit for row in pieces for piece in row)
        assert max(len(piece) for row in pieces for piece in row[:-1]) == limit  # pydocs' documents are long
    # t = (step - 2) / (4 - 2): m (1 - t) + 0.2 t with m = 2 from step 2
    expected = [1.0, 1.0, 2.0, 2 * 0.5 + 0.2 * 0.5, 0.2, 0.2]
    for s, step in enumerate(steps):
        assert step["lr_multipliers"] == pytest.approx([expected[s]] * len(step["lr_multipliers"])), s


def test_heads_optimizer_unties_after_the_untie_step_and_the_warm_up_ties_it_again(trained, pydocs_files, monkeypatch):
    """HEAD's optimizer fields through train_gpt.main: 2 stages of 3 steps, so the head unties after the update
    of step 3 (stage 1's first step, odd); the untimed warm-up runs steps 0-1 and 3-4, past the untie, and
    restores the tied state. The model starts them equal; Adam steps on odd steps, and each of its updates while
    tied copies the head into the embedding: they part at step 5's update, the first after the untie."""
    seen, recording = [], train_gpt.train_step

    def watching_train_step(model, optimizer, micro_batches, autocast, step, config):
        tied = optimizer.tied
        loss = recording(model, optimizer, micro_batches, autocast, step, config)
        seen.append((step, tied, torch.equal(model.embed.weight, model.lm_head.weight)))
        return loss

    monkeypatch.setattr(train_gpt, "train_step", watching_train_step)
    code, steps, _, _ = trained(pydocs_files + [
        "--steps", "6", "--batch-stages", "1,1", "--optimizer", "normuon", "--adam-every", "2",
        "--adam-table", "head", "--adam-weight-decay", "0.005", "--tied-head-stages", "1",
        "--untimed-warmup-steps", "2", "--head-init-std", "0.005"])  # HEAD's head init: record #11's zero head would leave both at zero
    assert code == 0 and len(steps) == 10
    warm_up = [(0, True, True), (1, True, True), (3, True, True), (4, False, True)]
    run = [(0, True, True), (1, True, True), (2, True, True), (3, True, True), (4, False, True), (5, False, False)]
    assert seen == warm_up + run
