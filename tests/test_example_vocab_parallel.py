"""Smoke test of examples/train_lm_vocab_parallel.py under torchrun (2 CPU processes): a few steps
lower the validation loss and match the single-process run with the same seed."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_lm_vocab_parallel.py"


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_vocab_parallel_lm_matches_single_process(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
               "2", str(EXAMPLE), "--quick", "--device", "cpu", "--steps", "15", "--vocab-size",
               "500", "--train-tokens", "20000", "--valid-tokens", "2000", "--check",
               "--out", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    first, last = map(float, re.search(r"validation loss ([\d.]+) -> ([\d.]+)",
                                       result.stdout).groups())
    single = float(re.search(r"single process: validation loss ([\d.]+)", result.stdout)[1])
    assert last < first
    assert abs(single - last) < 1e-4 * abs(single)
