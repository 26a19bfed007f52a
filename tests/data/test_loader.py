import hashlib
import numpy as np
import pytest
import torch

from data.loader import TrainLoader, load_validation_tokens, rank_rows, validation_batches
from data.shards import (EOT_TOKEN, HEADER_BYTES, ShardError, find_shards, read_header, read_tokens,
                         whole_steps_in_shard, write_shard)

CPU = torch.device("cpu")


def staged(batch_tokens, seq_len, steps, multiplier=lambda step: 1):
    """The config.Stage records of a run of `steps` steps whose step s has rows multiplier(s) times seq_len."""
    from config import Stage

    stages = []
    for step in range(steps):
        if stages and stages[-1].seq_len == seq_len * multiplier(step):
            stages[-1] = Stage(stages[-1].index, stages[-1].first_step, step + 1, stages[-1].rows, stages[-1].seq_len)
        else:
            stages.append(Stage(len(stages), step, step + 1, batch_tokens // seq_len, seq_len * multiplier(step)))
    return tuple(stages)


def make_shards(tmp_path, sizes, seed=0):
    rng = np.random.default_rng(seed)
    paths = []
    for i, size in enumerate(sizes):
        path = str(tmp_path / f"toy_train_{i:06d}.bin")
        write_shard(path, rng.integers(0, 50257, size))
        paths.append(path)
    return paths


def test_shard_round_trip(tmp_path):
    tokens = np.arange(1000) % 50257
    write_shard(str(tmp_path / "a.bin"), tokens)
    assert read_header(str(tmp_path / "a.bin")) == 1000
    assert np.array_equal(read_tokens(str(tmp_path / "a.bin")), tokens)


def test_bad_shards_name_the_file(tmp_path):
    path = make_shards(tmp_path, [500])[0]
    raw = bytearray(open(path, "rb").read())

    wrong_magic = tmp_path / "magic.bin"
    wrong_magic.write_bytes(b"\x00" * 4 + raw[4:])
    with pytest.raises(ShardError, match=f"{wrong_magic}.*magic"):
        read_header(str(wrong_magic))

    wrong_version = tmp_path / "version.bin"
    wrong_version.write_bytes(raw[:4] + np.int32(7).tobytes() + raw[8:])
    with pytest.raises(ShardError, match=f"{wrong_version}.*version 7"):
        read_header(str(wrong_version))

    truncated = tmp_path / "truncated.bin"
    truncated.write_bytes(raw[:-10])
    with pytest.raises(ShardError, match=f"{truncated}.*truncated"):
        read_header(str(truncated))

    tiny = tmp_path / "tiny.bin"
    tiny.write_bytes(raw[: HEADER_BYTES // 2])
    with pytest.raises(ShardError, match=f"{tiny}.*too short"):
        read_header(str(tiny))

    with pytest.raises(ShardError, match="cannot read shard .*missing.bin"):
        read_header(str(tmp_path / "missing.bin"))
    with pytest.raises(ShardError, match="no files match --train-files"):
        find_shards(str(tmp_path / "nothing_*.bin"), "--train-files")


def collect(loader, steps):
    return [[(x.clone(), y.clone()) for x, y in loader.next_batch()] for _ in range(steps)]


def test_ranks_and_micro_batches_partition_the_same_global_batch(tmp_path):
    paths = make_shards(tmp_path, [5000, 3000])
    single = collect(TrainLoader(paths, 512, 64, 512, 0, 1, CPU), 12)
    accumulated = collect(TrainLoader(paths, 512, 64, 128, 0, 1, CPU), 12)
    ranks = [collect(TrainLoader(paths, 512, 64, 128, r, 2, CPU), 12) for r in range(2)]
    for step in range(12):
        x, y = single[step][0]
        assert x.shape == (8, 64)
        assert torch.equal(x[:, 1:], y[:, :-1])  # targets are inputs shifted by one
        assert torch.equal(torch.cat([b[0] for b in accumulated[step]]), x)
        assert torch.equal(torch.cat([b[0] for r in ranks for b in r[step]]), x)
        assert torch.equal(torch.cat([b[1] for r in ranks for b in r[step]]), y)


def test_stream_is_consecutive_and_skips_short_shard_tails(tmp_path):
    paths = make_shards(tmp_path, [1100, 600])
    loader = TrainLoader(paths, 512, 64, 512, 0, 1, CPU)
    first, second, third = (loader.next_batch()[0][0].flatten() for _ in range(3))
    tokens = [torch.from_numpy(read_tokens(p).astype(np.int64)) for p in paths]
    assert torch.equal(first, tokens[0][:512]) and torch.equal(second, tokens[0][512:1024])
    assert torch.equal(third, tokens[1][:512])  # 1100 - 1024 tokens left: too few for another step
    with pytest.raises(ShardError, match="exhausted after 3 steps of 512 tokens: the 2 train file.* hold 1,700"):
        loader.next_batch()


def test_restored_position_resumes_the_stream(tmp_path):
    paths = make_shards(tmp_path, [3000, 3000])
    loader = TrainLoader(paths, 512, 64, 256, 0, 1, CPU)
    collect(loader, 4)
    state = loader.state_dict()
    expected = collect(loader, 5)
    resumed = TrainLoader(paths, 512, 64, 256, 0, 1, CPU)
    resumed.load_state_dict(state)
    got = collect(resumed, 5)
    assert all(torch.equal(a[0], b[0]) for s, t in zip(expected, got) for a, b in zip(s, t))


def test_validation_split_covers_the_first_val_tokens_once(tmp_path):
    paths = make_shards(tmp_path, [700, 700])  # the val set spans both files
    tokens = np.concatenate([read_tokens(p) for p in paths]).astype(np.int64)
    # 1024 tokens in rows of 64: 16 rows, 3 ranks take 6, 5 and 5 (the first rank one more)
    for world_size, row_len in ((1, None), (2, None), (4, None), (3, 64)):
        inputs, hashes = [], set()
        for rank in range(world_size):
            share, sha256 = load_validation_tokens(paths, 1024, rank, world_size, row_len=row_len)
            hashes.add(sha256)
            for x, y in validation_batches(share, 64, 128, CPU):
                assert torch.equal(x.flatten()[1:], y.flatten()[:-1])
                inputs.append(x.flatten())
        assert torch.equal(torch.cat(inputs), torch.from_numpy(tokens[:1024]))
        # every rank hashes the whole set, the last target included, as the shards store it
        assert hashes == {hashlib.sha256(tokens[:1025].astype("<u2").tobytes()).hexdigest()}
    assert load_validation_tokens(paths, 1024, 2, 3, row_len=64)[0].size == 5 * 64 + 1
    with pytest.raises(ShardError, match="val files hold 1400 tokens"):
        load_validation_tokens(paths, 1400, 0, 1)


def test_ranks_take_whole_rows_the_first_ones_one_more():
    assert [rank_rows(8, r, 3) for r in range(3)] == [(0, 3), (3, 6), (6, 8)]
    assert [rank_rows(8, r, 8) for r in range(8)] == [(r, r + 1) for r in range(8)]
    assert [rank_rows(7, r, 2) for r in range(2)] == [(0, 4), (4, 7)]
    with pytest.raises(ValueError, match="2 row.* cannot give each of 3 ranks a whole row"):
        rank_rows(2, 0, 3)


# ---------------------------------------------------------------- BOS-aligned batches

def make_documents(tmp_path, num_docs=120, shards=3, seed=0, max_len=300, straddle=True):
    """Shards of random documents (no <|endoftext|> inside), each prefixed by one; returns (paths, docs).

    With straddle, shard boundaries fall inside documents, as they do in FineWeb's shards.
    """
    rng = np.random.default_rng(seed)
    docs = [rng.integers(0, 50000, rng.integers(1, max_len)) for _ in range(num_docs)]
    with_bos = [np.concatenate([[EOT_TOKEN], d]) for d in docs]
    if straddle:
        parts = np.array_split(np.concatenate(with_bos), shards)
    else:
        parts = [np.concatenate(group) for group in np.array_split(np.array(with_bos, dtype=object), shards)]
    paths = []
    for i, part in enumerate(parts):
        paths.append(str(tmp_path / f"docs_train_{i:06d}.bin"))
        write_shard(paths[-1], part)
    return paths, docs


def split_documents(row):
    starts = list(np.flatnonzero(row == EOT_TOKEN)) + [len(row)]
    return [row[a + 1 : b] for a, b in zip(starts, starts[1:])]


def test_aligned_rows_start_at_documents_and_hold_whole_document_prefixes(tmp_path):
    paths, docs = make_documents(tmp_path, straddle=False)
    loader = TrainLoader(paths, 8 * 64, 64, 8 * 64, 0, 1, CPU, bos_align=True, max_doc_len=40)
    next_doc = 0
    for _ in range(6):
        (x, y), = loader.next_batch()
        for row in torch.cat([x, y[:, -1:]], dim=1).numpy():
            assert row[0] == EOT_TOKEN
            pieces = split_documents(row)
            for i, piece in enumerate(pieces):
                assert len(piece) + 1 <= 40  # max_doc_len counts the <|endoftext|>
                doc = docs[next_doc]
                assert np.array_equal(piece, doc[: len(piece)])  # documents in order, each from its start
                if i < len(pieces) - 1:  # only the row's last document is cut to fit the row
                    assert len(piece) == min(len(doc), 39)
                next_doc += 1
    assert next_doc > 50


def test_aligned_batches_do_not_depend_on_world_size_or_prefetch(tmp_path):
    paths, _ = make_documents(tmp_path, seed=1)
    one = collect(TrainLoader(paths, 512, 64, 512, 0, 1, CPU, bos_align=True, prefetch=False), 10)
    ranks = [collect(TrainLoader(paths, 512, 64, 128, r, 2, CPU, bos_align=True), 10) for r in range(2)]
    for step in range(10):
        assert torch.equal(torch.cat([b[0] for r in ranks for b in r[step]]), one[step][0][0])
        assert torch.equal(torch.cat([b[1] for r in ranks for b in r[step]]), one[step][0][1])


@pytest.mark.parametrize("bos_align", [False, True])
def test_restored_state_continues_across_shards_and_epochs(tmp_path, bos_align):
    paths, _ = make_documents(tmp_path, num_docs=60, seed=2)
    make = lambda: TrainLoader(paths, 256, 64, 128, 0, 1, CPU, bos_align=bos_align, wrap=True)  # noqa: E731
    loader = make()
    reference = collect(loader, 40)  # several passes over the data
    assert loader.epoch >= 1
    for cut in (3, 17, 29):
        resumed = make()
        collect(resumed, cut)
        state = resumed.state_dict()
        fresh = make()
        fresh.load_state_dict(state)
        got = collect(fresh, 40 - cut)
        for expected, actual in zip(reference[cut:], got):
            assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(expected, actual))


def test_wrap_repeats_the_data_and_exhaustion_is_explained(tmp_path):
    paths = make_shards(tmp_path, [1100])
    wrapping = TrainLoader(paths, 512, 64, 512, 0, 1, CPU, wrap=True)
    first = collect(wrapping, 2)
    again = collect(wrapping, 2)
    assert torch.equal(first[0][0][0], again[0][0][0]) and wrapping.epoch == 1
    with pytest.raises(ShardError, match="after 2 steps .* needs 2,560 tokens \\(5 steps\\) .* 1,100 tokens.*--data-wrap"):
        collect(TrainLoader(paths, 512, 64, 512, 0, 1, CPU, stages=staged(512, 64, 5)), 3)
    # With batch stages, the tokens a run needs count each step's multiplier: 2 x 128 + 2 x 256 + 384
    stages = staged(128, 64, 5, lambda step: 1 + step // 2)
    assert [(s.first_step, s.end_step, s.tokens_per_step) for s in stages] == [(0, 2, 128), (2, 4, 256), (4, 5, 384)]
    with pytest.raises(ShardError, match="needs 1,152 tokens \\(5 steps\\)"):
        collect(TrainLoader(paths, 128, 64, 128, 0, 1, CPU, stages=stages), 5)


@pytest.mark.parametrize("prefetch", [True, False])
def test_out_of_vocabulary_token_names_the_file_id_and_vocab_size(tmp_path, prefetch):
    # ShardError is a ValueError: the training loop ends the run with its one-line message.
    good = make_shards(tmp_path, [1100])[0]
    bad = str(tmp_path / "bad_train_000001.bin")
    write_shard(bad, np.array([EOT_TOKEN, 5, 50300, 7] * 300))
    loader = TrainLoader([good, bad], 512, 64, 512, 0, 1, CPU, vocab_size=50257, prefetch=prefetch)
    collect(loader, 2)  # the good shard's steps; the bad one is reached on the third
    with pytest.raises(ShardError, match=f"^shard {bad} holds token id 50300 at position 2, outside the vocabulary "
                                         "of 50257") as error:
        loader.next_batch()
    assert isinstance(error.value, ValueError)
    with pytest.raises(ShardError, match="token id 50300 .* vocabulary of 50257"):
        load_validation_tokens([bad], 512, 0, 1)


# ---------------------------------------------------------------- whole steps per shard, empty shards

def test_whole_steps_in_shard_counts_batches_of_batch_tokens_plus_one():
    assert [whole_steps_in_shard(n, 512) for n in (0, 1, 512, 513, 1024, 1025, 1100)] == [0, 0, 0, 1, 1, 2, 2]
    assert whole_steps_in_shard(10**8, 524288) == 190  # a FineWeb shard in the speedrun
    for batch_tokens in (1, 3, 8):
        for num_tokens in range(40):
            # Step k reads tokens [k * batch_tokens, (k + 1) * batch_tokens + 1): count those that fit.
            fitting = sum(1 for k in range(num_tokens + 1) if (k + 1) * batch_tokens + 1 <= num_tokens)
            assert whole_steps_in_shard(num_tokens, batch_tokens) == fitting


@pytest.mark.parametrize("bos_align", [False, True])
def test_empty_shards_are_skipped(tmp_path, bos_align):
    paths, _ = make_documents(tmp_path, num_docs=40, shards=2, seed=3)
    empty = [str(tmp_path / f"empty_train_{i:06d}.bin") for i in range(3)]
    for path in empty:
        write_shard(path, np.array([], dtype=np.uint16))
    with_empty = [empty[0], paths[0], empty[1], paths[1], empty[2]]
    make = lambda shards: TrainLoader(shards, 256, 64, 256, 0, 1, CPU, bos_align=bos_align, wrap=True)  # noqa: E731
    expected, got = collect(make(paths), 30), collect(make(with_empty), 30)  # 30 steps: several epochs
    assert all(torch.equal(a[0][0], b[0][0]) and torch.equal(a[0][1], b[0][1]) for a, b in zip(expected, got))
    with pytest.raises(ShardError, match="none of the 2 train file"):
        make(empty[:2]).next_batch()


def test_run_on_train_shards_including_an_empty_one_is_accepted_and_served(tmp_path):
    from config import make_plan, parse_config
    from training.setup import check_data, resolve_runtime

    train = make_shards(tmp_path, [0, 1100, 0])  # an empty shard counted as -1 steps refused this run
    val = str(tmp_path / "toy_val_000000.bin")
    write_shard(val, np.arange(600))
    _, config = parse_config([
        "--preset", "record11", "--seq-len", "64", "--batch-tokens", "512", "--micro-batch-tokens", "512",
        "--val-tokens", "512", "--steps", "2", "--train-files", str(tmp_path / "toy_train_*.bin"),
        "--val-files", val, "--device", "cpu", "--dtype", "float32", "--compile", "off"])
    plan = make_plan(config)
    micro = resolve_runtime(plan, 0, 1).micro_batch_tokens
    train_paths, _ = check_data(plan)
    assert train_paths == train
    loader = TrainLoader(train_paths, config.batch_tokens, config.seq_len, micro, 0, 1, CPU)
    tokens = torch.from_numpy(read_tokens(train[1]).astype(np.int64))
    first, second = (step[0][0].flatten() for step in collect(loader, 2))
    assert torch.equal(first, tokens[:512]) and torch.equal(second, tokens[512:1024])


def test_a_resume_with_a_larger_batch_never_serves_a_short_one(tmp_path):
    # Saved at position 768 by a run of 256-token batches; resumed with 512: the 257 tokens left in the
    # first shard cannot hold a 513-token batch, so the batch comes whole from the next shard.
    paths = make_shards(tmp_path, [1025, 1025])
    saved = TrainLoader(paths, 256, 128, 256, 0, 1, CPU, prefetch=False)
    for _ in range(3):
        saved.next_batch()
    assert saved.state_dict()["position"] == 768
    resumed = TrainLoader(paths, 512, 128, 512, 0, 1, CPU, prefetch=False)
    resumed.load_state_dict(saved.state_dict())
    [(inputs, targets)] = resumed.next_batch()
    second = read_tokens(paths[1])
    assert inputs.shape == (4, 128)
    assert torch.equal(inputs[0], torch.from_numpy(second[:128].astype(np.int64)))


@pytest.mark.parametrize("bos_align", [False, True])
def test_staged_rows_grow_and_are_the_same_on_1_2_and_4_ranks(tmp_path, bos_align):
    """Record #46's batch-size schedule: 8 rows a step, 16 / 32 / 48 tokens long by stage (x1, x2, x3),
    split over ranks and micro-batches without changing a row; prefetched as the run does."""
    paths, docs = make_documents(tmp_path, num_docs=400, seed=2, max_len=60)
    stages = staged(8 * 16, 16, 9, lambda step: 1 + step // 3)  # steps 0-2, 3-5, 6-8

    def rows(world_size, micro_rows):
        per_step = []
        loaders = [TrainLoader(paths, 8 * 16, 16, micro_rows * 16, r, world_size, CPU, bos_align=bos_align,
                               stages=stages) for r in range(world_size)]
        for step in range(9):
            batch = []
            for loader in loaders:
                batch += [torch.cat([x, y[:, -1:]], dim=1) for x, y in loader.next_batch()]
                loader.prefetch()
            per_step.append(torch.cat(batch))
        for loader in loaders:
            loader.close()
        return per_step

    one = rows(1, 8)
    assert [tuple(s.shape) for s in one] == [(8, 17)] * 3 + [(8, 33)] * 3 + [(8, 49)] * 3
    if bos_align:
        assert all((s[:, 0] == EOT_TOKEN).all() for s in one)
    for world_size, micro_rows in ((2, 4), (2, 1), (4, 1)):
        assert all(torch.equal(a, b) for a, b in zip(one, rows(world_size, micro_rows))), (world_size, micro_rows)


def record_stream(shards, rows, row_len, max_doc_len, steps):
    """Record #46's BOS-aligned stream, written out from its loader (docs/RECORD46.md section 6): per step,
    each row takes pieces [start, end) with end = min(next document start or the shard's end, start +
    max_doc_len, start + what the row still needs); a row needs row_len + 1 tokens. A step that needs
    a document start past its shard's last drops what it made and the shard's rest, and starts again
    at the next shard's first document. HEAD's stream is the same with max_doc_len a function of the
    step (its stage's), which max_doc_len may be."""
    shard, index, out = 0, 0, []
    while len(out) < steps:
        limit = max_doc_len(len(out)) if callable(max_doc_len) else max_doc_len
        tokens = shards[shard]
        starts = np.flatnonzero(tokens == EOT_TOKEN)
        i, step_rows = index, []
        for _ in range(rows):
            row, length = [], 0
            while length <= row_len:
                if i >= len(starts):
                    break
                start = starts[i]
                end = min(starts[i + 1] if i + 1 < len(starts) else len(tokens), start + limit,
                          start + row_len - length + 1)
                row.append(tokens[start:end])
                length += end - start
                i += 1
            if length <= row_len:
                break
            step_rows.append(np.concatenate(row))
        if len(step_rows) < rows:  # the shard ran out of documents: the step starts again in the next
            shard, index = shard + 1, 0
            continue
        index = i
        out.append(np.stack(step_rows))
    return out


def test_restart_at_shard_end_serves_record_46s_stream_and_continue_differs_there(tmp_path):
    paths, _ = make_documents(tmp_path, num_docs=400, shards=4, max_len=120)
    shards = [read_tokens(p) for p in paths]
    steps, rows, row_len, max_doc_len = 24, 4, 64, 48
    expected = record_stream(shards, rows, row_len, max_doc_len, steps)

    def served(restart):
        loader = TrainLoader(paths, rows * row_len, row_len, rows * row_len, 0, 1, CPU, bos_align=True,
                             max_doc_len=max_doc_len, restart_at_shard_end=restart)
        batches = [loader.next_batch()[0] for _ in range(steps)]
        return [torch.cat([x, y[:, -1:]], dim=1).numpy() for x, y in batches]

    restarted, continued = served(True), served(False)
    assert all(np.array_equal(a, b) for a, b in zip(restarted, expected))
    # the streams agree until the first shard end, and part there
    first_difference = next(s for s, (a, b) in enumerate(zip(continued, expected)) if not np.array_equal(a, b))
    assert 0 < first_difference < steps


# ---------------------------------------------------------------- the maximum document length per stage (HEAD)

def test_documents_are_cut_to_the_max_doc_len_of_the_stage_served(tmp_path):
    """HEAD's stream: 896 tokens of a document in its first stage, 2048 after, the rest of a cut document
    dropped; here 12 tokens in steps 0-4 and 40 in steps 5-11, in rows of 64, over shard ends."""
    from config import Stage

    paths, docs = make_documents(tmp_path, num_docs=400, shards=4, max_len=120)
    steps, rows, row_len = 12, 4, 64
    stages = (Stage(0, 0, 5, rows, row_len, max_doc_len=12), Stage(1, 5, steps, rows, row_len, max_doc_len=40))
    expected = record_stream([read_tokens(p) for p in paths], rows, row_len, lambda step: 12 if step < 5 else 40, steps)
    # the loader's own max_doc_len gives way to the stage's
    loader = TrainLoader(paths, rows * row_len, row_len, rows * row_len, 0, 1, CPU, bos_align=True, max_doc_len=2048,
                         stages=stages, restart_at_shard_end=True)
    served = []
    for _ in range(steps):
        (x, y), = loader.next_batch()
        loader.prefetch()  # made early, as the run does: still with the stage of the step it is for
        served.append(torch.cat([x, y[:, -1:]], dim=1).numpy())
    loader.close()
    assert all(np.array_equal(a, b) for a, b in zip(served, expected))
    longest = [max(len(piece) + 1 for row in step for piece in split_documents(row)[:-1]) for step in served]
    assert max(longest[:5]) == 12 and max(longest[5:]) == 40  # whole pieces: the row's last may be cut shorter


def test_a_stage_without_max_doc_len_keeps_the_loaders_and_zero_is_no_limit(tmp_path):
    from config import Stage

    paths, _ = make_documents(tmp_path, num_docs=200, shards=1, max_len=120, seed=4)

    def longest_piece(max_doc_len, stage_limits):
        stages = tuple(Stage(i, 3 * i, 3 * i + 3, 2, 16 * (i + 1), max_doc_len=limit)
                       for i, limit in enumerate(stage_limits))
        loader = TrainLoader(paths, 32, 16, 32, 0, 1, CPU, bos_align=True, max_doc_len=max_doc_len, stages=stages,
                             prefetch=False)
        batches = [loader.next_batch()[0] for _ in range(6)]
        return [max(len(piece) + 1 for row in torch.cat([x, y[:, -1:]], 1).numpy() for piece in split_documents(row))
                for x, y in batches]

    # stages made by hand, without a max_doc_len: the loader's 10 in both stages
    assert max(longest_piece(10, (None, None))) == 10
    # 0: no limit, whatever the row length (rows of 17 then 33 tokens)
    lengths = longest_piece(10, (0, 0))
    assert max(lengths[:3]) <= 17 and max(lengths[3:]) > 17


def test_the_plans_stages_carry_max_doc_len_stages_to_the_loader(tmp_path):
    from config import Config, make_plan

    plan = make_plan(Config(bos_align=True, batch_tokens=128, seq_len=32, steps=8, extension_steps=2,
                            batch_stages="1,2,3", max_doc_len_stages="6,20,30"))
    assert [s.max_doc_len for s in plan.stages] == [6, 20, 30, 30]  # the extension keeps the last stage's
    paths, _ = make_documents(tmp_path, num_docs=300, shards=1, max_len=80, seed=5)
    loader = TrainLoader(paths, 128, 32, 128, 0, 1, CPU, bos_align=True, stages=plan.stages, prefetch=False)
    for step in range(plan.config.steps):
        (x, y), = loader.next_batch()
        limit = plan.stage_at(step).max_doc_len
        assert x.shape == (4, plan.stage_at(step).seq_len)
        for row in torch.cat([x, y[:, -1:]], 1).numpy():
            assert all(len(piece) + 1 <= limit for piece in split_documents(row))


# ---------------------------------------------------------------- HEAD's stream (speedrun preset), rank by rank

def head_stream(shards, schedule, steps, ranks=8):
    """HEAD's training rows (modded-nanogpt f411b3d3, docs/RECORD-HEAD.md sections 6.1 and 7.2, 7.5), written
    out on its own terms: `schedule` lists (end step, tokens per rank T, max document length) per stage. At a
    step, rank 0, then 1, ... each fill a buffer of T + 1 tokens: while the buffer holds at most T tokens, the
    next unused document start s gives the piece [s, min(next start or the shard's end, s + max length,
    s + T + 1 - buffer)), and its document is used up. A step that needs a start past the shard's last drops
    all it made and starts again at the next shard's first start. Returns (per step, the rows in rank order;
    what the stream went through)."""
    seen = {"cut": set(), "exact_T_then_1": set(), "dropped_mid_step": set(), "stage_changes": 0}
    shard, next_doc, out, stage = 0, 0, [], 0
    while len(out) < steps:
        step = len(out)
        while schedule[stage][0] <= step:
            stage += 1
            seen["stage_changes"] += 1
        _, T, max_len = schedule[stage]
        tokens = shards[shard]
        starts = np.flatnonzero(tokens == EOT_TOKEN)
        i, rows = next_doc, []
        while len(rows) < ranks:
            pieces, held = [], 0
            while held <= T and i < len(starts):
                s = int(starts[i])
                i += 1
                e = min(int(starts[i]) if i < len(starts) else len(tokens), s + max_len, s + T + 1 - held)
                if held == T:
                    seen["exact_T_then_1"].add(T)
                if e - s == max_len and (i == len(starts) or e < starts[i]):
                    seen["cut"].add((T, max_len))
                pieces.append(tokens[s:e])
                held += e - s
            if held <= T:  # the shard has no document start left for this step
                break
            rows.append(np.concatenate(pieces))
        if len(rows) < ranks:
            if rows or pieces:
                seen["dropped_mid_step"].add(T)
            shard, next_doc = shard + 1, 0
            continue
        next_doc = i
        out.append(np.stack(rows))
    return out, seen


def head_like_documents(tmp_path, seed, tokens, shard_tokens):
    """Shards (cut inside documents) of documents each starting with <|endoftext|>: some shorter than a row,
    some around 896 and 2048 tokens, some longer, runs of 512-token documents (a buffer that reaches a
    multiple of 512 exactly) and documents of one token."""
    rng = np.random.default_rng(seed)
    lengths = []
    while sum(lengths) < tokens:
        kind = rng.random()
        if kind < 0.05:
            lengths += [512] * 14
        elif kind < 0.2:
            lengths.append(int(rng.choice([1, 895, 896, 897, 2047, 2048, 2049])))
        elif kind < 0.35:
            lengths.append(int(rng.integers(2049, 6000)))
        else:
            lengths.append(int(rng.integers(2, 1200)))
    stream = np.concatenate([np.concatenate([[EOT_TOKEN], rng.integers(0, EOT_TOKEN, n - 1)]) for n in lengths])
    cuts = np.cumsum(rng.integers(shard_tokens // 2, shard_tokens * 3 // 2, len(stream) // (shard_tokens // 2)))
    paths = []
    for i, part in enumerate(np.split(stream, cuts[cuts < len(stream)])):
        paths.append(str(tmp_path / f"head_train_{i:06d}.bin"))
        write_shard(paths[-1], part)
    return paths


@pytest.mark.parametrize("world_size", [1, 8])
def test_speedrun_preset_serves_heads_stream_across_shard_ends_and_stage_changes(tmp_path, world_size):
    """The speedrun preset's loader, as train_gpt.py builds it (untimed warm-up, rewind, prefetch), against
    HEAD's rows written out above: rows of 1024 / 2048 / 3072 tokens (HEAD's 16,384 / 32,768 / 49,152 scaled
    down) on HEAD's stage ends for 9 + 1 steps (3, 6, 9, 10), documents cut to 896 tokens in the first stage
    and 2048 after; on 8 ranks, rank r serves HEAD's rank r row, and on 1 rank the 8 rows in rank order (HEAD
    on 8 GPUs: a single-GPU HEAD builds a step in 8 loader calls, and at a shard end keeps the rows already
    made, so its stream differs from the 8-GPU one there)."""
    from config import PRESETS, Config, make_plan

    config = Config(**{**PRESETS["speedrun"], "steps": 10, "extension_steps": 1, "seq_len": 1024,
                       "batch_tokens": 8 * 1024})
    plan = make_plan(config)
    scheduled, multipliers, max_lens = 9, (1, 2, 3, 3), (896, 2048, 2048, 2048)
    ends = [round(scheduled / 3), round(2 * scheduled / 3), scheduled, config.steps]
    schedule = [(end, m * 1024, d) for end, m, d in zip(ends, multipliers, max_lens)]
    assert [(s.end_step, s.seq_len, s.max_doc_len) for s in plan.stages] == schedule

    paths = head_like_documents(tmp_path, seed=7, tokens=1_000_000, shard_tokens=30_000)
    expected, seen = head_stream([read_tokens(p) for p in paths], schedule, config.steps)
    # the data goes through what the comparison is about
    assert seen["cut"] >= {(1024, 896), (2048, 2048), (3072, 2048)}
    assert seen["exact_T_then_1"] >= {1024, 2048, 3072}
    assert seen["dropped_mid_step"] == {1024, 2048, 3072} and seen["stage_changes"] == 3

    loaders = [TrainLoader(paths, config.batch_tokens, config.seq_len, config.seq_len, rank, world_size, CPU,
                           bos_align=config.bos_align, bos_token=config.bos_token, max_doc_len=config.max_doc_len,
                           vocab_size=config.vocab_size, stages=plan.stages,
                           restart_at_shard_end=config.shard_end == "restart") for rank in range(world_size)]
    for loader in loaders:
        initial = loader.state_dict()
        for first in plan.first_steps():  # the untimed warm-up visits every stage, then rewinds
            loader.serve_as_step(first)
            loader.next_batch()
        loader.load_state_dict(initial)
    for step in range(config.steps):
        served = []
        for loader in loaders:
            served += [torch.cat([x, y[:, -1:]], 1).numpy() for x, y in loader.next_batch()]
            loader.prefetch()
        assert np.array_equal(np.concatenate(served), expected[step]), f"step {step} differs from HEAD's"
    for loader in loaders:
        loader.close()
