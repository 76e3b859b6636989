"""Side by side: the sampled losses against full-softmax libraries that fuse the output layer.

For each V (default 256,000 and 1,000,000) one training step of the output layer, forward and
backward, N tokens of dimension D, no bias, for
  fused_nce nce                  k per-example negatives drawn in the call, dense weight gradient
  fused_nce nce sparse_grad      the same with row-sparse weight gradients
  fused_nce sampled_softmax      k_shared shared negatives (one GEMM), sparse_grad
  F.cross_entropy                F.linear + F.cross_entropy on the materialized [N, V] logits
  F.linear_cross_entropy         torch's fused linear + cross-entropy, where torch has it
  liger FLCE                     Liger's LigerFusedLinearCrossEntropyLoss, where installed
  cut cross-entropy              Apple's cut_cross_entropy.linear_cross_entropy, where installed
Time: median of --repeats after a warm-up (CUDA events on a GPU); memory: the extra peak beyond
the inputs and the gradients. A provider that is not installed or cannot run here is listed with
the reason. A full softmax that runs out of memory at N is measured at N/2, N/4, ... and scaled
up to N (time and logits memory are linear in N); its row says so. Prints a table and writes a
CSV (device, torch version, date on every row); bench/plot_side_by_side.py draws it.

    python bench/bench_full_softmax_libs.py [--n 8192 --dim 1024 --dtype bfloat16]
        [--num-classes 256000 1000000] [--csv bench/out/side_by_side.csv]
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
import statistics
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

import fused_nce
from bench_losses import DTYPES, PeakMemory, grad_nbytes, is_oom, time_call, write_csv

Step = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def library_steps(k: int, k_shared: int, sampler: fused_nce.AliasSampler) -> Dict[str, Tuple[Optional[Step], str]]:
    """provider -> (step(hidden, weight, target) -> loss, or None; why it is missing)."""
    steps: Dict[str, Tuple[Optional[Step], str]] = {
        "fused_nce nce": (lambda h, w, t: fused_nce.nce_loss(h, w, None, t, sampler,
                                                             num_negatives=k), ""),
        "fused_nce nce sparse_grad": (lambda h, w, t: fused_nce.nce_loss(
            h, w, None, t, sampler, num_negatives=k, sparse_grad=True), ""),
        "fused_nce sampled_softmax shared": (lambda h, w, t: fused_nce.sampled_softmax_loss(
            h, w, None, t, sampler, num_negatives=k_shared, shared_negatives=True,
            sparse_grad=True), ""),
        "F.cross_entropy": (lambda h, w, t: F.cross_entropy(F.linear(h, w).float(), t), ""),
    }
    if hasattr(F, "linear_cross_entropy"):
        steps["F.linear_cross_entropy"] = (lambda h, w, t: F.linear_cross_entropy(h, w, t), "")
    else:
        steps["F.linear_cross_entropy"] = (None, f"not in torch {torch.__version__}")
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        liger = LigerFusedLinearCrossEntropyLoss()
        steps["liger FLCE"] = (lambda h, w, t: liger(w, h, t), "")
    except Exception as error:  # not installed, or no triton / GPU here
        steps["liger FLCE"] = (None, f"{type(error).__name__}: {error}"[:120])
    try:
        from cut_cross_entropy import linear_cross_entropy
        steps["cut cross-entropy"] = (lambda h, w, t: linear_cross_entropy(h, w, t), "")
    except Exception as error:
        steps["cut cross-entropy"] = (None, f"{type(error).__name__}: {error}"[:120])
    return steps


def measure(step: Step, hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
            repeats: int, memory: PeakMemory) -> Tuple[List[float], float]:
    """Milliseconds per forward + backward, and the extra peak bytes of one step."""
    def run() -> None:
        hidden.grad = weight.grad = None
        step(hidden, weight, target).backward()

    times = time_call(run, hidden.device, repeats)  # after a warm-up (compilation, for some libraries)
    hidden.grad = weight.grad = None
    memory.start()
    run()
    grads = sum(grad_nbytes(g) for g in (hidden.grad, weight.grad) if g is not None)
    extra = memory.peak() - grads
    hidden.grad = weight.grad = None
    return times, max(float(extra), 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=8192, help="tokens per step")
    parser.add_argument("--dim", type=int, default=1024, help="D")
    parser.add_argument("--k", type=int, default=64, help="per-example negatives")
    parser.add_argument("--k-shared", type=int, default=1024, help="shared negatives")
    parser.add_argument("--num-classes", type=int, nargs="+", default=[256_000, 1_000_000])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--csv", default="bench/out/side_by_side.csv")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    memory = PeakMemory(device)
    device_name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads")
    meta = dict(device=device_name, torch=torch.__version__, date=datetime.date.today().isoformat(),
                n=args.n, dim=args.dim, dtype=args.dtype)
    print(f"side by side on {device_name}, torch {torch.__version__}: N={args.n} D={args.dim} "
          f"{args.dtype}, forward + backward of the output layer, median of {args.repeats}")
    rows: List[dict] = []

    def write() -> None:  # after every row: a run cut short keeps what it measured
        write_csv(args.csv, rows)

    def record(v: int, provider: str, k: int, times: List[float], extra: float, note: str) -> None:
        nan = float("nan")
        rows.append(dict(meta, num_classes=v, provider=provider, k=k,
                         median_ms=statistics.median(times) if times else nan,
                         min_ms=min(times) if times else nan, max_ms=max(times) if times else nan,
                         extra_peak_mb=extra / 2**20 if times else nan, note=note))
        r = rows[-1]
        shown = f"{r['median_ms']:10.2f} ms {r['extra_peak_mb']:10.1f} MB" if times else " " * 27
        print(f"  V={v:<9} {provider:<34} {shown}  {note}", flush=True)
        write()

    for v in args.num_classes:
        g = torch.Generator(device).manual_seed(v)
        hidden = (torch.randn(args.n, args.dim, generator=g, device=device)
                  / args.dim ** 0.5).to(dtype).requires_grad_()
        weight = (torch.randn(v, args.dim, generator=g, device=device) * 0.02).to(dtype)
        weight.requires_grad_()
        sampler = fused_nce.AliasSampler(fused_nce.log_uniform_weights(v), device=device)
        target = sampler.sample(args.n, generator=g)  # Zipfian, like words
        for provider, (step, missing) in library_steps(args.k, args.k_shared, sampler).items():
            k = args.k_shared if "shared" in provider else (args.k if "fused" in provider else v)
            if step is None:
                record(v, provider, k, [], 0.0, f"skipped: {missing}")
                continue
            n, note = args.n, ""
            while True:
                try:
                    h = hidden[:n].detach().requires_grad_()
                    times, extra = measure(step, h, weight, target[:n], args.repeats, memory)
                    break
                except Exception as error:  # out of memory, or a library that fails here
                    hidden.grad = weight.grad = None
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    if is_oom(error) and provider == "F.cross_entropy" and n > 256:
                        n //= 2
                        continue
                    times, extra = [], 0.0
                    note = ("out of memory" if is_oom(error)
                            else f"failed: {type(error).__name__}: {error}"[:160])
                    break
            if times and n < args.n:
                scale = args.n / n
                times, extra = [t * scale for t in times], extra * scale
                note = f"out of memory at N={args.n}: measured at N={n}, scaled x{scale:g}"
            record(v, provider, k, times, extra, note)
        del hidden, weight, sampler
        if device.type == "cuda":
            torch.cuda.empty_cache()

    print_table(rows)
    print(f"wrote {args.csv}")


def print_table(rows: List[dict]) -> None:
    """Markdown: time and memory of every provider, and each one's time over fused_nce nce's."""
    print("\n| V | provider | ms | extra MB | time vs fused_nce nce | note |\n|---:|---|---:|---:|---:|---|")
    for r in rows:
        base = next((b for b in rows if b["num_classes"] == r["num_classes"]
                     and b["provider"] == "fused_nce nce"), None)
        ratio = (r["median_ms"] / base["median_ms"]
                 if base and not math.isnan(r["median_ms"]) else float("nan"))
        ms = "-" if math.isnan(r["median_ms"]) else f"{r['median_ms']:.2f}"
        mb = "-" if math.isnan(r["extra_peak_mb"]) else f"{r['extra_peak_mb']:.0f}"
        times = "-" if math.isnan(ratio) else f"{ratio:.1f}x"
        print(f"| {r['num_classes']:,} | {r['provider']} | {ms} | {mb} | {times} | {r['note']} |")


if __name__ == "__main__":
    main()
