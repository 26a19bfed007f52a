"""Golden figures: every preset's printed losses at 1 and 2 processes, and a resumed run's, as they
were when the figures were recorded (tests/fixtures/golden.json, written by tests/golden_runs.py at
14d13d6). A change meant to keep numbers must pass this unchanged; one meant to change them says so
and records them again:

    python tests/golden_runs.py DIR record11,record46,cpu-tiny FILES...   (and at 2 processes, one run a launch)

The last digits depend on the CPU's kernels (AVX2 and AVX-512 sum in other orders; with AMX the
orthogonalisation runs in bf16), so the figures are kept per kind of CPU. On a kind without
figures the tests skip, naming it: record its figures with the commit above checked out.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from tests.util import REPO_ROOT

CPU_KIND = torch.backends.cpu.get_cpu_capability() + ("+AMX" if torch.cpu._is_amx_tile_supported() else "")
GOLDEN = json.load(open(os.path.join(REPO_ROOT, "tests", "fixtures", "golden.json"))).get(CPU_KIND)
pytestmark = pytest.mark.skipif(GOLDEN is None, reason=f"no golden figures recorded for a {CPU_KIND} CPU")


def golden_figures(compact_files, workdir, names, nproc=None):
    env = dict(os.environ, OMP_NUM_THREADS="1" if nproc else "2")  # as the figures were recorded
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                if nproc else [sys.executable])
    result = subprocess.run(launcher + ["tests/golden_runs.py", str(workdir), ",".join(names), *compact_files],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.load(open(workdir / "figures.json"))


@pytest.mark.slow
def test_one_process_runs_and_the_resumed_run_keep_their_golden_losses(compact_files, tmp_path):
    figures = golden_figures(compact_files, tmp_path, ["record11", "record46", "cpu-tiny"])
    assert set(figures) == set(GOLDEN["1 process"])
    for name, expected in GOLDEN["1 process"].items():
        assert figures[name] == expected, name


@pytest.mark.slow
@pytest.mark.parametrize("name", ["record11", "record46", "cpu-tiny"])
def test_two_process_runs_keep_their_golden_losses(compact_files, tmp_path, name):
    assert golden_figures(compact_files, tmp_path, [name], nproc=2)[name] == GOLDEN["2 processes"][name]
