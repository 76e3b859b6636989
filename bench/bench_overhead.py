"""Fixed cost of one call at a tiny shape, where the arithmetic is negligible.

N=64, D=64, k=16, V=1,000, float32, 1 thread by default: microseconds per call (median of
rounds of many calls) for
  floor             a torch.autograd.Function over one registered op, forward + backward
                    (what any custom op costs: the bound the loss path is measured against)
  floor, 3 leaves   the same over this loss's three leaves (hidden, weight, bias): a scalar out,
                    dense zero gradients back, added into their .grad as the loss's are (what
                    torch's autograd costs for this step with no arithmetic at all)
  forward           nce_loss forward under no_grad, negatives drawn inside the call
  forward+backward  nce_loss forward + backward, negatives drawn inside the call
  ... explicit      the same with explicit negatives (no sampling)
  ... grads None    forward + backward with the .grad of hidden, weight and bias set to None
                    after each call, as optimizer.zero_grad() leaves them: backward hands its
                    gradients over instead of adding them into the old ones
  full softmax      F.linear + F.cross_entropy over all V classes, forward + backward
Prints a table and writes a CSV.

    python bench/bench_overhead.py [--csv bench/out/bench_overhead.csv]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time
from typing import Any, Callable, Dict, List

import torch
import torch.nn.functional as F

import fused_nce
from bench_losses import write_csv


class OneOp(torch.autograd.Function):
    """The floor: one registered op forward (a copy), one backward, nothing else."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad.clone()


class ThreeLeaves(torch.autograd.Function):
    """The floor of this step: the loss's leaves in, a scalar out, dense zero gradients back."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor) -> torch.Tensor:
        ctx.shapes = hidden.shape, weight.shape, bias.shape
        return hidden.new_zeros(())

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        return tuple(grad.new_zeros(shape) for shape in ctx.shapes)


def per_call_us(fn: Callable[[], None], calls: int, rounds: int) -> List[float]:
    for _ in range(calls // 4):
        fn()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t0) / calls * 1e6)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--csv", default="bench/out/bench_overhead.csv")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    n, dim, k, v = args.n, args.dim, args.k, args.num_classes
    hidden = torch.randn(n, dim, generator=g, requires_grad=True)
    weight = (torch.randn(v, dim, generator=g) * 0.1).requires_grad_()
    bias = torch.zeros(v, requires_grad=True)
    sampler = fused_nce.AliasSampler(fused_nce.log_uniform_weights(v))
    target = sampler.sample(n, generator=g)
    negatives = sampler.sample((n, k), generator=g)
    x = torch.randn(4, requires_grad=True)

    def floor() -> None:
        OneOp.apply(x).sum().backward()

    def floor_three_leaves() -> None:
        ThreeLeaves.apply(hidden, weight, bias).backward()

    def forward() -> None:
        with torch.no_grad():
            fused_nce.nce_loss(hidden, weight, bias, target, sampler, num_negatives=k)

    def forward_backward() -> None:
        fused_nce.nce_loss(hidden, weight, bias, target, sampler, num_negatives=k).backward()

    def forward_explicit() -> None:
        with torch.no_grad():
            fused_nce.nce_loss(hidden, weight, bias, target, sampler, negatives=negatives)

    def forward_backward_explicit() -> None:
        fused_nce.nce_loss(hidden, weight, bias, target, sampler, negatives=negatives).backward()

    def forward_backward_grads_none() -> None:
        fused_nce.nce_loss(hidden, weight, bias, target, sampler, num_negatives=k).backward()
        hidden.grad = weight.grad = bias.grad = None

    def full_softmax() -> None:
        F.cross_entropy(F.linear(hidden, weight, bias), target).backward()

    cases: Dict[str, Callable[[], None]] = {
        "floor": floor, "floor, 3 leaves": floor_three_leaves, "forward": forward,
        "forward+backward": forward_backward, "forward explicit": forward_explicit,
        "forward+backward explicit": forward_backward_explicit,
        "forward+backward grads None": forward_backward_grads_none, "full softmax": full_softmax}
    meta = dict(device=f"{platform.processor() or platform.machine()} x{args.threads} threads",
                torch=torch.__version__, date=datetime.date.today().isoformat(), n=n, dim=dim,
                k=k, num_classes=v)
    print(f"per-call cost on {meta['device']}, torch {torch.__version__}: N={n} D={dim} k={k} "
          f"V={v} float32, median of {args.rounds} rounds of {args.calls} calls")
    rows = []
    for name, fn in cases.items():
        times = per_call_us(fn, args.calls, args.rounds)
        rows.append(dict(meta, case=name, median_us=statistics.median(times), min_us=min(times),
                         max_us=max(times)))
    floor_us, leaves_us = rows[0]["median_us"], rows[1]["median_us"]
    print("\n| case | us per call | x floor | x floor, 3 leaves |\n|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['case']} | {r['median_us']:.1f} | {r['median_us'] / floor_us:.1f}x | "
              f"{r['median_us'] / leaves_us:.1f}x |")
    write_csv(args.csv, rows)
    print(f"\nwrote {args.csv}")


if __name__ == "__main__":
    main()
