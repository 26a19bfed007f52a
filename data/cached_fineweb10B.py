"""Download pre-tokenized GPT-2 FineWeb shards from the Hugging Face hub.

    python data/cached_fineweb10B.py 8                 # val shard + first 8 train shards of FineWeb-10B
    python data/cached_fineweb10B.py                   # as many as the speedrun preset needs
    python data/cached_fineweb10B.py 4 --dataset finewebedu10B
    python data/cached_fineweb10B.py --run-args --preset speedrun --steps 4000   # what that run needs

Each shard holds 100M tokens (about 200 MB). Shards already present and complete are
skipped; a truncated or corrupt one is downloaded again.
"""
import argparse
import math
import os
import sys

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.shards import ShardError, read_header, whole_steps_in_shard  # noqa: E402

DATA_DIR = os.path.dirname(os.path.abspath(__file__))
DATASETS = {  # name -> (hub dataset repo, shard file prefix)
    "fineweb10B": ("kjj0/fineweb10B-gpt2", "fineweb"),
    "fineweb100B": ("kjj0/fineweb100B-gpt2", "fineweb"),
    "finewebedu10B": ("kjj0/finewebedu10B-gpt2", "finewebedu"),
}
TOKENS_PER_SHARD = 10**8


class DownloadError(RuntimeError):
    pass


def shard_names(prefix, num_train_shards):
    return [f"{prefix}_val_000000.bin"] + [f"{prefix}_train_{i:06d}.bin" for i in range(1, num_train_shards + 1)]


def is_complete(path):
    if not os.path.exists(path):
        return False
    try:
        read_header(path)
        return True
    except ShardError:
        return False


def fetch_from_hub(repo_id, filename, local_dir):
    """The only network call: one file of a hub dataset into local_dir (resumes partial downloads)."""
    from huggingface_hub import hf_hub_download

    hf_hub_download(repo_id=repo_id, filename=filename, repo_type="dataset", local_dir=local_dir)


def download(dataset, num_train_shards, out_dir, log=print):
    """Makes sure the val shard and the first num_train_shards train shards are in out_dir, complete."""
    repo_id, prefix = DATASETS[dataset]
    names = shard_names(prefix, num_train_shards)
    missing = [n for n in names if not is_complete(os.path.join(out_dir, n))]
    log(f"{dataset}: {len(names) - len(missing)} of {len(names)} shards already complete in {out_dir}")
    os.makedirs(out_dir, exist_ok=True)
    for i, name in enumerate(missing, 1):
        path = os.path.join(out_dir, name)
        if os.path.exists(path):
            log(f"{name} is incomplete or corrupt: downloading it again")
            os.remove(path)
        log(f"[{i}/{len(missing)}] {repo_id}/{name}")
        try:
            fetch_from_hub(repo_id, name, out_dir)
        except Exception as e:  # the hub client raises many types; all mean the same to the user
            raise DownloadError(f"could not download {name} from {repo_id} ({type(e).__name__}: {e})") from e
        if not is_complete(path):
            raise DownloadError(f"{path} is incomplete after download")
    return [os.path.join(out_dir, n) for n in names]


def train_shards_needed(steps, batch_tokens, tokens_per_shard=TOKENS_PER_SHARD):
    """Train shards a run reads: the loader skips each shard's tail shorter than one batch."""
    steps_per_shard = whole_steps_in_shard(tokens_per_shard, batch_tokens)
    if steps_per_shard == 0:
        raise ValueError(f"--batch-tokens {batch_tokens:,} does not fit in one {tokens_per_shard:,}-token shard, "
                         "and a batch cannot cross shards: lower --batch-tokens")
    return math.ceil(steps / steps_per_shard)


# BOS-aligned rows skip the rest of each row's last document and of documents longer than
# max_doc_len; on FineWeb that is taken to be under a quarter of what a run reads (an estimate).
BOS_ALIGN_MARGIN = 1.25


def shards_for_plan(plan):
    """(dataset, train shards) the run of a plan (config.Plan) reads, or None if it reads other files."""
    config = plan.config
    for dataset, (_, prefix) in DATASETS.items():
        if config.train_files != f"data/{dataset}/{prefix}_train_*.bin":
            continue
        if not config.bos_align and len({stage.tokens_per_step for stage in plan.stages}) == 1:
            return dataset, train_shards_needed(config.steps, config.batch_tokens)
        multiplier = max(stage.seq_len for stage in plan.stages) // config.seq_len
        largest = config.batch_tokens * multiplier
        if whole_steps_in_shard(TOKENS_PER_SHARD, largest) == 0:
            raise ValueError(f"the last stage's batch, {multiplier} x --batch-tokens = {largest:,}, "
                             f"does not fit in one {TOKENS_PER_SHARD:,}-token shard, and a batch cannot cross shards: "
                             "lower --batch-tokens")
        margin = BOS_ALIGN_MARGIN if config.bos_align else 1.0
        return dataset, math.ceil(plan.total_tokens * margin / TOKENS_PER_SHARD) + 1  # + 1: shard tails too short
    return None


def shards_for_run(run_args):
    """(dataset, train shards) a train_gpt.py command line needs, or None if it reads other files."""
    from config import make_plan, parse_config

    return shards_for_plan(make_plan(parse_config(run_args)[1]))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("num_train_shards", nargs="?", type=int,
                        help="train shards to fetch (default: what the speedrun preset needs)")
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="fineweb10B")
    parser.add_argument("--out-dir", help="default data/<dataset>")
    parser.add_argument("--run-args", nargs=argparse.REMAINDER,
                        help="fetch what `train_gpt.py RUN_ARGS` reads (nothing if it uses other files)")
    args = parser.parse_args(argv)

    dataset, count = args.dataset, args.num_train_shards
    if args.run_args is not None:
        try:
            needed = shards_for_run(args.run_args)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if needed is None:
            print("the run reads its own --train-files: nothing to download")
            return 0
        dataset, count = needed
        print(f"the run needs the val shard and {count} train shard(s) of {dataset}")
    elif count is None:
        count = shards_for_run([])[1]
        print(f"the speedrun preset needs the val shard and {count} train shards")
    if count < 0:
        parser.error("the number of train shards cannot be negative")
    out_dir = args.out_dir or os.path.join(DATA_DIR, dataset)
    try:
        download(dataset, count, out_dir)
    except DownloadError as e:
        print(f"error: {e}\nCheck the internet connection (and HF_ENDPOINT / HF_TOKEN if you set them), then run "
              "the same command again: complete shards are kept.", file=sys.stderr)
        return 1
    print(f"{dataset}: val shard and {count} train shard(s) ready in {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
