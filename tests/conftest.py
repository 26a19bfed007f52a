import glob
import os
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(REPO_ROOT), "shared")
PYDOCS = os.path.join(SHARED, "corpus", "pydocs", "docs.jsonl")
os.environ.setdefault("TIKTOKEN_CACHE_DIR", os.path.join(SHARED, "tiktoken_cache"))
# Before torch loads, for the tests that train in this process too (see train_gpt.py).
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
sys.path.insert(0, REPO_ROOT)

import torch  # noqa: E402 - after the variable above

# Triton compiles or interprets each function as it is decorated, its own library's when triton is first
# imported: where no GPU is, the whole suite runs the project's Triton kernels (model/triton_mlp.py,
# model/triton_loss.py) in Triton's interpreter, on CPU tensors. A run picks a Triton kernel on a CPU only
# by name (--mlp-kernel triton), so the runs the tests start, which inherit this, train as without it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

PYDOCS_SHARD_SIZE = 250_000  # tokens: the val shard, then 13 train shards


@pytest.fixture(scope="session")
def pydocs_dir(tmp_path_factory):
    """The pydocs corpus tokenized by the project's own script, as the README tells users to."""
    from data import fineweb

    out_dir = str(tmp_path_factory.mktemp("pydocs"))
    assert fineweb.main(["--local-files", PYDOCS, "--out-dir", out_dir, "--name", "pydocs",
                         "--shard-size", str(PYDOCS_SHARD_SIZE), "--workers", "2"]) == 0
    return out_dir


@pytest.fixture(scope="session")
def pydocs_files(pydocs_dir):
    return ["--train-files", os.path.join(pydocs_dir, "pydocs_train_*.bin"),
            "--val-files", os.path.join(pydocs_dir, "pydocs_val_*.bin")]


@pytest.fixture(scope="session")
def compact_files(pydocs_dir, tmp_path_factory):
    """The trainer's flags for pydocs in a vocabulary of 8,192 ids (tests/util.py says why)."""
    from tests.util import compact_vocabulary_args, write_compact_corpus

    return compact_vocabulary_args(write_compact_corpus(pydocs_dir, str(tmp_path_factory.mktemp("compact"))))


@pytest.fixture(scope="session")
def one_process_log(compact_files, tmp_path_factory):
    """The path of the record log of a small 1-process run (2 micro-batches a step)."""
    from tests.util import SMALL, completed_log, record_logs, run_trainer

    records = tmp_path_factory.mktemp("one")
    completed_log(run_trainer(SMALL + compact_files + ["--save-final", "true"], records), records)
    return record_logs(records)[0]


@pytest.fixture(scope="session")
def one_process_checkpoint(one_process_log):
    """The final checkpoint (step 16) of the 1-process run."""
    return f"{os.path.dirname(one_process_log)}_checkpoints/step_000016.pt"


@pytest.fixture(scope="session")
def one_process_run(one_process_log):
    return open(one_process_log).read()


@pytest.fixture(scope="session")
def gpt2_checkpoint(pydocs_files, tmp_path_factory):
    """The final checkpoint of a 3-step run on GPT-2's tokens, for the scripts that read text through
    GPT-2's tokenizer."""
    from tests.util import SMALL, completed_log, run_trainer

    records = tmp_path_factory.mktemp("gpt2")
    # three steps end before cpu-tiny's head would untie (the third stage's first odd step): untied from the start
    args = SMALL + pydocs_files + ["--steps", "3", "--extension-steps", "0", "--val-every", "0", "--save-final", "true",
                                   "--tied-head-stages", "0"]
    completed_log(run_trainer(args, records), records)
    return f"{records}_checkpoints/step_000003.pt"


@pytest.fixture(scope="session")
def two_process_run(compact_files, tmp_path_factory):
    from tests.util import SMALL, completed_log, run_trainer

    records = tmp_path_factory.mktemp("two")
    return completed_log(run_trainer(SMALL + compact_files + ["--save-every", "8"], records, nproc=2), records)


@pytest.fixture(scope="session")
def two_process_checkpoint(two_process_run, tmp_path_factory):
    """The step-8 checkpoint the 2-process run wrote on its way."""
    [path] = glob.glob(str(tmp_path_factory.getbasetemp() / "two*_checkpoints" / "step_000008.pt"))
    return path
