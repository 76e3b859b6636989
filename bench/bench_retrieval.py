"""Microbenchmark: the blocked in-batch softmax against the materialized-logits reference.

Mixed negatives: N queries, their N in-batch candidates and M extra candidates, log q on every
column, accidental hits removed, a learnable temperature. Forward+backward time (median of
repeats after a warm-up; CUDA events on a GPU) and extra peak memory beyond the inputs and the
gradients. Defaults: N = 8192, D = 128, M = 8192; float32 on the CPU, plus bfloat16 on CUDA when
present. Prints a table and writes one CSV.

    python bench/bench_retrieval.py [--device cpu] [--n 8192] [--repeats 3]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time
from typing import Callable, Dict, List

import torch

import fused_nce
from bench_losses import PeakMemory, write_csv
from fused_nce import reference

PROVIDERS: Dict[str, Callable[..., torch.Tensor]] = {
    "fused": fused_nce.in_batch_softmax_loss,
    "reference": reference.in_batch_softmax_loss,
}


def make_case(args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    g = torch.Generator(device).manual_seed(0)
    n, d, m = args.n, args.dim, args.m

    def rows(count: int) -> torch.Tensor:
        x = torch.randn(count, d, generator=g, device=device)
        return (x / x.norm(dim=1, keepdim=True)).to(dtype).requires_grad_()

    # Ids from a catalogue 4x the batch: some accidental hits, as with real popular items.
    ids = torch.randint(4 * n, (n,), generator=g, device=device)
    extra_ids = torch.randint(4 * n, (m,), generator=g, device=device)
    log_q = torch.log(torch.rand(n, generator=g, device=device) * 0.01 + 1e-4)
    extra_log_q = torch.full((m,), -6.0, device=device)
    temperature = torch.tensor(0.05, device=device, requires_grad=True)
    leaves = [rows(n), rows(n), rows(m), temperature]
    kwargs = dict(log_q=log_q, extra_ids=extra_ids, extra_log_q=extra_log_q)
    return leaves, ids, kwargs


def measure(fn: Callable, leaves: List[torch.Tensor], ids: torch.Tensor, kwargs: dict,
            device: torch.device, repeats: int, memory: PeakMemory):
    query, candidates, extra, temperature = leaves

    def run() -> None:
        for leaf in leaves:
            leaf.grad = None
        fn(query, candidates, ids, extra_candidates=extra, temperature=temperature,
           **kwargs).backward()

    run()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            run()
            times.append((time.perf_counter() - t0) * 1e3)
    for leaf in leaves:
        leaf.grad = None
    memory.start()
    run()
    grad_bytes = sum(leaf.grad.numel() * leaf.grad.element_size() for leaf in leaves)
    extra_bytes = max(memory.peak() - grad_bytes, 0)
    for leaf in leaves:
        leaf.grad = None
    return times, extra_bytes


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.machine()} CPU, {torch.get_num_threads()} threads"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--n", type=int, default=8192)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--m", type=int, default=8192)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--date", default=datetime.date.today().isoformat())
    p.add_argument("--csv", default=None)
    args = p.parse_args()
    device = torch.device(args.device)
    dtypes = [torch.float32] + ([torch.bfloat16] if device.type == "cuda" else [])
    memory = PeakMemory(device)
    rows = []
    for dtype in dtypes:
        leaves, ids, kwargs = make_case(args, device, dtype)
        for provider, fn in PROVIDERS.items():
            times, extra = measure(fn, leaves, ids, kwargs, device, args.repeats, memory)
            rows.append(dict(machine=machine(device), torch=torch.__version__, date=args.date,
                             device=device.type, dtype=str(dtype).replace("torch.", ""),
                             n=args.n, dim=args.dim, m=args.m, provider=provider,
                             median_ms=statistics.median(times), min_ms=min(times),
                             max_ms=max(times), extra_peak_mb=extra / 2 ** 20))
            r = rows[-1]
            print(f"{r['dtype']:9s} {provider:10s} {r['median_ms']:9.1f} ms "
                  f"[{r['min_ms']:.1f}, {r['max_ms']:.1f}]  {r['extra_peak_mb']:8.1f} MB extra",
                  flush=True)
    print(f"\n{rows[0]['machine']}, torch {torch.__version__}, {args.date}; N={args.n}, "
          f"D={args.dim}, M={args.m}, forward+backward")
    print("| dtype | fused ms | reference ms | time ratio | fused extra MB | reference extra MB "
          "| memory ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for dtype in dtypes:
        name = str(dtype).replace("torch.", "")
        f, r = (next(x for x in rows if x["dtype"] == name and x["provider"] == prov)
                for prov in ("fused", "reference"))
        print(f"| {name} | {f['median_ms']:.0f} | {r['median_ms']:.0f} | "
              f"{f['median_ms'] / r['median_ms']:.2f}x | {f['extra_peak_mb']:.1f} | "
              f"{r['extra_peak_mb']:.1f} | {f['extra_peak_mb'] / max(r['extra_peak_mb'], 0.1):.3f} |")
    path = args.csv or os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "results",
        f"retrieval-{device.type}-{platform.machine()}-{torch.get_num_threads()}threads-"
        f"{args.date}.csv")
    write_csv(path, rows)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
