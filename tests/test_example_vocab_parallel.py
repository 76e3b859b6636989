"""Smoke test of examples/train_lm_vocab_parallel.py under torchrun: a few steps lower the
validation loss and match the single-process run with the same seed, batches and negatives, with
the output layer split over 2 processes, and over a 2 x 2 mesh (DDP over the data-parallel
dimension, the vocabulary split over the other)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_lm_vocab_parallel.py"


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
@pytest.mark.parametrize("procs,data_parallel", [(2, 1), (4, 2)], ids=["tp2", "dp2xtp2"])
def test_vocab_parallel_lm_matches_single_process(tmp_path, procs, data_parallel):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
               str(procs), str(EXAMPLE), "--quick", "--device", "cpu", "--steps", "15",
               "--vocab-size", "500", "--train-tokens", "20000", "--valid-tokens", "2000",
               "--check", "--data-parallel", str(data_parallel), "--out", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    first, last = map(float, re.search(r"validation loss ([\d.]+) -> ([\d.]+)",
                                       result.stdout).groups())
    single = float(re.search(r"single process: validation loss ([\d.]+)", result.stdout)[1])
    assert last < first
    assert abs(single - last) < 1e-4 * abs(single)
