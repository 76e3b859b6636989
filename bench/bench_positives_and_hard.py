"""Microbenchmark: several positives and hard negatives beside the sampled ones.

Per-example and shared negatives, T positives, k sampled and h hard negatives per example
(defaults T = 4, k = 64, h = 16; N = 4096, D = 256, V = 100,000, float32), sampled softmax and
gBCE, forward + backward. Rows per path:
- fused: the step with T + k + h columns;
- fused_plain: a plain step (one positive) with the same total number of columns, T + k + h - 1
  sampled negatives: the extra positives and hard negatives should cost what their columns cost;
- pytorch / pytorch_compiled / pytorch_sparse (and fused_sparse): the careful PyTorch of
  bench/baselines.py (multi_positive_loss), checked against the fused loss before it is timed.
Medians of --repeats, one CSV.

    python bench/bench_positives_and_hard.py [--csv bench/out/positives_and_hard.csv]
"""

from __future__ import annotations

import argparse
import datetime
import platform

import torch

import baselines
import fused_nce
from bench_losses import PeakMemory, check_against, measure, record_row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--num-classes", type=int, default=100_000)
    parser.add_argument("--positives", type=int, default=4, help="T")
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--hard", type=int, default=16, help="h")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--csv", default="bench/out/positives_and_hard.csv")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    memory = PeakMemory(device)
    n, dim, v, t, k, h = args.n, args.dim, args.num_classes, args.positives, args.k, args.hard
    g = torch.Generator(device).manual_seed(0)
    hidden = (torch.randn(n, dim, generator=g, device=device) / dim ** 0.5).to(dtype)
    weight = (torch.randn(v, dim, generator=g, device=device) * 0.1).to(dtype)
    bias = torch.zeros(v, device=device, dtype=dtype)
    leaves = [x.requires_grad_() for x in (hidden, weight, bias)]
    sampler = fused_nce.AliasSampler(fused_nce.log_uniform_weights(v), device=device)
    log_q = sampler.probs.log()
    target = sampler.sample((n, t), generator=g)
    hard = torch.randint(v, (n, h), generator=g, device=device)
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads")
    meta = dict(device=name, torch=torch.__version__, date=datetime.date.today().isoformat(),
                n=n, dim=dim, num_classes=v, positives=t, k=k, hard=h, dtype=args.dtype)
    print(f"{name}, torch {torch.__version__}: N={n} D={dim} V={v} T={t} k={k} h={h} "
          f"{args.dtype}, forward+backward, median of {args.repeats}")
    rows = []
    for mode in ("per_example", "shared"):
        shared = mode == "shared"
        negs = [sampler.sample((k,) if shared else (n, k), generator=g) for _ in range(3)]
        plain_k = t + k + h - 1
        plain_negs = [sampler.sample((plain_k,) if shared else (n, plain_k), generator=g)
                      for _ in range(3)]
        for objective in ("sampled_softmax", "gbce"):
            fn = getattr(fused_nce, f"{objective}_loss")
            beta = 1.0
            extra = {}
            if objective == "gbce":
                extra["t"] = 0.75
                alpha = k / (v - 1)
                beta = alpha * (0.75 * (1 - 1 / alpha) + 1 / alpha)
            else:
                extra["remove_accidental_hits"] = False  # as the careful version writes it

            def fused(ng, sparse=False, fn=fn, extra=extra):
                return fn(*leaves, target, sampler, negatives=ng, hard_negatives=hard,
                          sparse_grad=sparse, **extra)

            def careful(ng, sparse=False, objective=objective, beta=beta):
                return baselines.multi_positive_loss(objective, *leaves, target, ng, hard, log_q,
                                                     beta=beta, sparse=sparse)

            compiled = baselines.compiled(careful)
            steps = {
                "fused": (fused, negs),
                "fused_sparse": (lambda ng: fused(ng, True), negs),
                "fused_plain": (lambda ng, fn=fn, extra=extra: fn(
                    *leaves, target[:, 0], sampler, negatives=ng, **extra), plain_negs),
                "pytorch": (careful, negs),
                "pytorch_compiled": (compiled, negs),
                "pytorch_sparse": (lambda ng: careful(ng, True), negs),
            }
            for provider, (step, sets) in steps.items():
                note = ""
                if provider.startswith("pytorch"):
                    seconds = check_against(lambda: fused(negs[0]), lambda: step(negs[0]),
                                            leaves, dtype)
                    if provider == "pytorch_compiled":
                        note = f"first call (compile) {seconds:.1f} s"
                times, extra_bytes = measure(step, leaves, sets, device, 1, args.repeats, memory)
                record_row(rows, meta, args.csv, mode, objective, provider, times, extra_bytes,
                           note)
    print("\n| negatives | objective | fused ms | plain step, same columns ms | extra columns cost |"
          " fastest baseline | its ms | speed-up |")
    print("|---|---|---:|---:|---:|---|---:|---:|")
    by = {(r["mode"], r["objective"], r["provider"]): r for r in rows}
    for mode in ("per_example", "shared"):
        for objective in ("sampled_softmax", "gbce"):
            f = by[(mode, objective, "fused")]["median_ms"]
            plain = by[(mode, objective, "fused_plain")]["median_ms"]
            peers = [by[(mode, objective, p)] for p in ("pytorch", "pytorch_compiled",
                                                        "pytorch_sparse")]
            best = min(peers, key=lambda r: r["median_ms"])
            print(f"| {mode} | {objective} | {f:.1f} | {plain:.1f} | {f / plain:.2f}x | "
                  f"{best['provider']} | {best['median_ms']:.1f} | "
                  f"{best['median_ms'] / f:.2f}x |")
    print(f"wrote {args.csv}")


if __name__ == "__main__":
    main()
