"""Where the time of one training step goes, kernel by kernel (torch.profiler), at the GPU target
shapes: per-example NCE (dense and sparse_grad) and shared-negatives NCE. Prints one table per
case, sorted by device time, and the step's total.

    python bench/gpu/profile_step.py [--n 8192 --dim 1024 --num-classes 1000000]
"""

import argparse
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench_losses import make_case  # noqa: E402

import fused_nce  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=8192)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--num-classes", type=int, default=1_000_000)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--plain", action="store_true",
                        help="the first case's steps alone, no profiler (to run under ncu)")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    for name, k, shared, sparse in [("per-example k=64 dense", 64, False, False),
                                    ("per-example k=64 sparse_grad", 64, False, True),
                                    ("shared k=1024 dense", 1024, True, False),
                                    ("shared k=1024 sparse_grad", 1024, True, True)]:
        args.k = k
        leaves, target, sampler, negatives = make_case(args, device, dtype, shared)

        def step(i: int) -> None:
            for leaf in leaves:
                leaf.grad = None
            fused_nce.nce_loss(*leaves, target, sampler, negatives=negatives[i % 3],
                               sparse_grad=sparse).backward()

        for i in range(3):
            step(i)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if args.plain:
            step(3)
            return
        with profile(activities=activities) as prof:
            for i in range(3):
                step(i)
            if device.type == "cuda":
                torch.cuda.synchronize()
        print(f"\n=== {name} (3 steps; N={args.n} D={args.dim} V={args.num_classes} {args.dtype})")
        print(prof.key_averages().table(sort_by=sort, row_limit=14, max_name_column_width=60))
        del leaves, negatives
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
