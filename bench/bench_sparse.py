"""Microbenchmark: one training step with dense vs sparse (``sparse_grad=True``) output gradients.

A step is what a trainer runs: zero the gradients, the sampled loss (negatives drawn inside it),
backward, and the optimizer step on the output embedding ``weight`` [V, D] and ``bias`` [V]. The
dense path writes a [V, D] gradient and updates every row; the sparse one only the touched rows
(at most N (1 + k)). For each V and optimizer (dense optimizer vs its sparse counterpart): the
step's time (median of repeats after a warm-up that also creates the optimizer state) and its
extra peak memory (beyond the parameters and the optimizer state; it includes the gradient). Prints
a table and writes one long CSV. Defaults: N=4096, D=256, k=64, V in {100,000, 1,000,000}, NCE,
float32, on CUDA when present, else CPU.

    python bench/bench_sparse.py [--device cpu] [--num-classes 100000 1000000] [--threads 2]
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import statistics
import time
from typing import Callable, Dict, List, Tuple

import torch

import fused_nce
from bench_losses import OBJECTIVES, PeakMemory, make_case

# name: (dense optimizer, its sparse-gradient counterpart, keyword arguments)
OPTIMIZERS: Dict[str, Tuple[Callable, Callable, dict]] = {
    "sgd": (torch.optim.SGD, torch.optim.SGD, dict(lr=0.1)),
    "adam": (torch.optim.Adam, torch.optim.SparseAdam, dict(lr=1e-3)),
    "adagrad": (torch.optim.Adagrad, torch.optim.Adagrad, dict(lr=0.1)),
}


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(t.numel() * t.element_size() for state in optimizer.state.values()
               for t in state.values() if isinstance(t, torch.Tensor))


def measure_step(args, num_classes: int, optimizer_name: str, sparse: bool, device: torch.device,
                 memory: PeakMemory) -> Dict[str, float]:
    case = argparse.Namespace(n=args.n, dim=args.dim, k=args.k, num_classes=num_classes)
    (hidden, weight, bias), target, sampler, _ = make_case(case, device, torch.float32, False)
    dense_cls, sparse_cls, kwargs = OPTIMIZERS[optimizer_name]
    optimizer = (sparse_cls if sparse else dense_cls)([weight, bias], **kwargs)
    loss_fn = getattr(fused_nce, f"{args.objective}_loss")

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        hidden.grad = None
        loss = loss_fn(hidden, weight, bias, target, sampler, num_negatives=args.k,
                       sparse_grad=sparse)
        loss.backward()
        optimizer.step()

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    step()  # warm-up; creates the optimizer state
    times = []
    for _ in range(args.repeats):
        synchronize()
        t0 = time.perf_counter()
        step()
        synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    optimizer.zero_grad(set_to_none=True)
    hidden.grad = None
    memory.start()
    step()
    extra = max(memory.peak(), 0)
    result = dict(median_ms=statistics.median(times), min_ms=min(times), max_ms=max(times),
                  step_peak_mb=extra / 2**20, optimizer_state_mb=state_bytes(optimizer) / 2**20,
                  grad_nnz_rows=weight.grad._nnz() if sparse else num_classes)
    del optimizer, hidden, weight, bias
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=4096, help="examples (tokens) per step")
    parser.add_argument("--dim", type=int, default=256, help="D")
    parser.add_argument("--k", type=int, default=64, help="negatives per example")
    parser.add_argument("--num-classes", type=int, nargs="+", default=[100_000, 1_000_000],
                        help="V, one run each")
    parser.add_argument("--objective", choices=OBJECTIVES, default="nce")
    parser.add_argument("--optimizers", nargs="+", choices=sorted(OPTIMIZERS),
                        default=["sgd", "adam"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--csv", default="bench/out/bench_sparse.csv")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    memory = PeakMemory(device)
    cpu_name = platform.processor() or platform.machine()
    device_name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"{cpu_name} x{torch.get_num_threads()} threads")
    meta = dict(device=device_name, torch=torch.__version__, date=datetime.date.today().isoformat(),
                threads=torch.get_num_threads(), n=args.n, dim=args.dim, k=args.k,
                objective=args.objective, dtype="float32")
    print(f"fused_nce sparse-gradient benchmark on {device_name}, torch {torch.__version__}: "
          f"N={args.n} D={args.dim} k={args.k} {args.objective} float32, "
          f"loss+backward+optimizer step, median of {args.repeats}")

    rows: List[dict] = []
    for num_classes in args.num_classes:
        for optimizer_name in args.optimizers:
            for sparse in [False, True]:
                r = measure_step(args, num_classes, optimizer_name, sparse, device, memory)
                rows.append(dict(meta, num_classes=num_classes, optimizer=optimizer_name,
                                 gradient="sparse" if sparse else "dense", **r))
                print(f"  V={num_classes:<9} {optimizer_name:<8} {rows[-1]['gradient']:<7}"
                      f"{r['median_ms']:10.1f} ms [{r['min_ms']:.1f}, {r['max_ms']:.1f}]"
                      f"  step peak {r['step_peak_mb']:8.1f} MB"
                      f"  optimizer state {r['optimizer_state_mb']:8.1f} MB", flush=True)

    print_summary(rows)
    os.makedirs(os.path.dirname(args.csv) or ".", exist_ok=True)
    with open(args.csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {args.csv}")


def print_summary(rows: List[dict]) -> None:
    """Markdown table: the sparse step against the dense one."""
    by_key = {(r["num_classes"], r["optimizer"], r["gradient"]): r for r in rows}
    print()
    print("| V | optimizer (dense / sparse) | dense ms | sparse ms | speed-up | dense step MB | "
          "sparse step MB | memory ratio | optimizer state MB |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for (num_classes, name, gradient), dense in by_key.items():
        sparse = by_key.get((num_classes, name, "sparse"))
        if gradient != "dense" or sparse is None:
            continue
        dense_cls, sparse_cls, _ = OPTIMIZERS[name]
        print(f"| {num_classes:,} | {dense_cls.__name__} / {sparse_cls.__name__} | "
              f"{dense['median_ms']:.1f} | {sparse['median_ms']:.1f} | "
              f"{dense['median_ms'] / sparse['median_ms']:.1f}x | {dense['step_peak_mb']:.1f} | "
              f"{sparse['step_peak_mb']:.1f} | "
              f"{dense['step_peak_mb'] / max(sparse['step_peak_mb'], 0.1):.1f}x | "
              f"{sparse['optimizer_state_mb']:.0f} |")


if __name__ == "__main__":
    main()
