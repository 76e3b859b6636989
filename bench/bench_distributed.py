"""Benchmark: vocab-parallel sampled losses over P CPU processes (gloo) against P = 1.

One training step (zero the gradients, the loss with negatives drawn inside it, backward, a
dense SGD update of this rank's shard of the output embedding) for each objective, on each
rank's shard of a [V, D] float32 layer. Per rank: the bytes of W and its gradient (the shard and
its dense gradient), the process's peak resident memory, the step's median time, and the bytes
each rank sends through all-reduce / all-gather per step (counted at the collective calls).
Defaults: V = 4,000,000, D = 128, N = 4096, k = 64; P = 1 runs with 2 threads, P = 2 with one
thread per process (2 cores either way). Prints a table and writes one CSV in bench/results/.

    python bench/bench_distributed.py [--num-classes 4000000] [--world-sizes 1 2] [--steps 3]
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import queue
import resource
import statistics
import tempfile
import time
from typing import Any, Dict, List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

OBJECTIVES = ("nce", "negative_sampling", "sampled_softmax")
DATE = "2026-11-27"


def count_collective_bytes(counter: List[int]) -> None:
    """Counts the bytes each rank hands to all_reduce / all_gather (the only collectives used)."""
    all_reduce, all_gather = dist.all_reduce, dist.all_gather

    def counted_reduce(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        counter[0] += tensor.numel() * tensor.element_size()
        return all_reduce(tensor, *args, **kwargs)

    def counted_gather(out: list, tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        counter[0] += tensor.numel() * tensor.element_size()
        return all_gather(out, tensor, *args, **kwargs)

    dist.all_reduce, dist.all_gather = counted_reduce, counted_gather  # type: ignore[assignment]


def rank_main(rank: int, world_size: int, args: argparse.Namespace) -> List[Dict[str, Any]]:
    import fused_nce
    import fused_nce.distributed as fd

    torch.set_num_threads(max(1, args.cores // world_size))
    counter = [0]
    count_collective_bytes(counter)
    v, d, n, k = args.num_classes, args.dim, args.n, args.k
    start, end = fd.shard_range(v)
    g = torch.Generator().manual_seed(0)
    counts = torch.rand(v, generator=g) * 1000 + 1
    sampler = fused_nce.AliasSampler(fused_nce.unigram_weights(counts))
    del counts
    weight = torch.nn.Parameter(torch.empty(end - start, d).uniform_(-0.05, 0.05, generator=g))
    hidden = torch.randn(n, d, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    target = torch.randint(v, (n,), generator=torch.Generator().manual_seed(2))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    rows = []
    for objective in OBJECTIVES:
        loss_fn = getattr(fd, f"{objective}_loss")
        times = []
        for step in range(1 + args.steps):
            dist.barrier()
            counter[0] = 0
            begin = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            hidden.grad = None
            torch.manual_seed(step)
            loss = loss_fn(hidden, weight, None, target, sampler, num_negatives=k)
            loss.backward()
            optimizer.step()
            elapsed = time.perf_counter() - begin
            if step > 0:  # the first step is the warm-up
                times.append(elapsed)
        grad = weight.grad
        assert grad is not None
        grad_bytes = grad.numel() * grad.element_size()
        del grad  # holding it would keep two gradients alive in the next objective's first step
        rows.append(dict(
            objective=objective, rank=rank, world_size=world_size, rows=end - start,
            w_grad_mb=(weight.numel() * weight.element_size() + grad_bytes) / 2**20,
            peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            median_ms=statistics.median(times) * 1e3, min_ms=min(times) * 1e3,
            max_ms=max(times) * 1e3, comm_bytes=counter[0], loss=float(loss.detach())))
    return rows


def entry(rank: int, world_size: int, store: str, args: argparse.Namespace, out: Any) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=world_size, timeout=datetime.timedelta(seconds=600))
    try:
        out.put(rank_main(rank, world_size, args))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run(world_size: int, args: argparse.Namespace) -> List[Dict[str, Any]]:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=entry, args=(r, world_size, os.path.join(tmp, "store"), args,
                                                 out)) for r in range(world_size)]
        for p in procs:
            p.start()
        results: List[Dict[str, Any]] = []
        try:
            for _ in range(world_size):
                results += out.get(timeout=args.timeout)
        except queue.Empty:
            raise TimeoutError(f"P = {world_size} did not finish in {args.timeout} s") from None
        finally:
            for p in procs:
                p.join(timeout=30)
                if p.is_alive():
                    p.kill()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-classes", type=int, default=4_000_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    machine = f"{platform.machine()} x{args.cores} cores"
    rows = []
    for world_size in args.world_sizes:
        rows += run(world_size, args)
    base = {r["objective"]: r for r in rows if r["world_size"] == 1 and r["rank"] == 0}
    print(f"V={args.num_classes} D={args.dim} N={args.n} k={args.k} float32, {machine}, "
          f"torch {torch.__version__}")
    print(f"{'objective':18} {'P':>2} {'rank':>4} {'rows':>9} {'W+grad MB':>10} {'peak RSS MB':>11} "
          f"{'step ms':>8} {'vs P=1':>7} {'mem vs P=1':>10} {'comm B/step':>11}")
    for r in sorted(rows, key=lambda r: (r["objective"], r["world_size"], r["rank"])):
        b = base.get(r["objective"])
        speed = f"{r['median_ms'] / b['median_ms']:.2f}x" if b else "-"
        mem = f"{r['w_grad_mb'] / b['w_grad_mb']:.2f}x" if b else "-"
        print(f"{r['objective']:18} {r['world_size']:>2} {r['rank']:>4} {r['rows']:>9} "
              f"{r['w_grad_mb']:>10.0f} {r['peak_rss_mb']:>11.0f} {r['median_ms']:>8.0f} "
              f"{speed:>7} {mem:>10} {r['comm_bytes']:>11}")
    path = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                    f"distributed-cpu-{platform.machine()}-{args.cores}cores-"
                                    f"{DATE}.csv")
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["machine", "torch", "date", "num_classes", "dim", "n", "k", "dtype",
                         "objective", "world_size", "rank", "rows", "w_grad_mb", "peak_rss_mb",
                         "median_ms", "min_ms", "max_ms", "comm_bytes"])
        for r in rows:
            writer.writerow([machine, torch.__version__, DATE, args.num_classes, args.dim, args.n,
                             args.k, "float32", r["objective"], r["world_size"], r["rank"],
                             r["rows"], round(r["w_grad_mb"], 1), round(r["peak_rss_mb"], 1),
                             round(r["median_ms"], 2), round(r["min_ms"], 2),
                             round(r["max_ms"], 2), r["comm_bytes"]])
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
