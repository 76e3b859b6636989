"""Microbenchmark: one training step with dense gradients, sparse gradients + torch's optimizers,
and sparse gradients + fused_nce's row optimizers.

A step is what a trainer runs: zero the gradients (set to None), the sampled loss (negatives drawn
inside it), backward, and the optimizer step on the output embedding ``weight`` [V, D] and ``bias``
[V]. Targets are drawn from Zipf-distributed counts (count of rank r ~ 1 / (r + 1)); negatives from
unigram^0.75 noise over those counts (``--noise zipf``) or uniformly (``--noise uniform``). For each
V, noise and method: the step's time (median of repeats after a warm-up that also creates the
optimizer state), the optimizer step's own time, and the step's extra peak memory (beyond the
parameters and the optimizer state; it includes the gradient). Beside each optimizer time: its
memory-traffic floor, the bytes it must read and write (per element of each updated row: SGD 12,
row-wise Adagrad 12, Adagrad 20, Adam 28) at this machine's in-place read + write bandwidth.
Prints a table, writes one long CSV and a PNG. Defaults: N=4096, D=256, k=64, V in {100,000,
1,000,000}, NCE, float32.

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
from bench_losses import OBJECTIVES, PeakMemory, write_csv
from fused_nce.optim import RowAdagrad, RowAdam, RowSGD

# method: (family, optimizer factory, sparse gradient, bytes read + written per updated element)
Method = Tuple[str, Callable, bool, int]
METHODS: Dict[str, Method] = {
    "SGD (dense)": ("sgd", lambda ps: torch.optim.SGD(ps, lr=0.1), False, 12),
    "SGD (sparse)": ("sgd", lambda ps: torch.optim.SGD(ps, lr=0.1), True, 12),
    "RowSGD": ("sgd", lambda ps: RowSGD(ps, lr=0.1), True, 12),
    "Adagrad (sparse)": ("adagrad", lambda ps: torch.optim.Adagrad(ps, lr=0.1), True, 20),
    "RowAdagrad": ("adagrad", lambda ps: RowAdagrad(ps, lr=0.1), True, 20),
    "RowAdagrad rowwise": ("adagrad", lambda ps: RowAdagrad(ps, lr=0.1, rowwise=True), True, 12),
    "Adam (dense)": ("adam", lambda ps: torch.optim.Adam(ps, lr=1e-3), False, 28),
    "SparseAdam": ("adam", lambda ps: torch.optim.SparseAdam(ps, lr=1e-3), True, 28),
    "RowAdam": ("adam", lambda ps: RowAdam(ps, lr=1e-3), True, 28),
}


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(t.numel() * t.element_size() for state in optimizer.state.values()
               for t in state.values() if isinstance(t, torch.Tensor))


def update_bandwidth(device: torch.device) -> float:
    """Bytes per second read + written by an in-place pass over 512 MB (``x += 1``): the memory
    traffic of an optimizer step, which reads and writes its rows in place."""
    buf = torch.zeros(128 << 20, device=device)
    times = []
    for _ in range(5):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        buf.add_(1.0)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return 2 * buf.numel() * buf.element_size() / min(times)


def make_case(args, num_classes: int, noise: str, device: torch.device):
    g = torch.Generator(device).manual_seed(0)
    hidden = (torch.randn(args.n, args.dim, generator=g, device=device) / args.dim ** 0.5)
    weight = torch.randn(num_classes, args.dim, generator=g, device=device) * 0.1
    bias = torch.zeros(num_classes, device=device)
    counts = 1.0 / torch.arange(1, num_classes + 1, dtype=torch.float64)  # Zipf
    target = fused_nce.AliasSampler(counts, device=device).sample(args.n, generator=g)
    noise_weights = (fused_nce.unigram_weights(counts, 0.75) if noise == "zipf"
                     else torch.ones(num_classes, dtype=torch.float64))
    sampler = fused_nce.AliasSampler(noise_weights, device=device)
    return [t.requires_grad_() for t in (hidden, weight, bias)], target, sampler


def measure_step(args, num_classes: int, noise: str, method: str, device: torch.device,
                 memory: PeakMemory) -> Dict[str, float]:
    (hidden, weight, bias), target, sampler = make_case(args, num_classes, noise, device)
    _, factory, sparse, _ = METHODS[method]
    optimizer = factory([weight, bias])
    loss_fn = getattr(fused_nce, f"{args.objective}_loss")

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        hidden.grad = None
        loss = loss_fn(hidden, weight, bias, target, sampler, num_negatives=args.k,
                       sparse_grad=sparse)
        loss.backward()
        synchronize()
        t0 = time.perf_counter()
        optimizer.step()
        synchronize()
        return (time.perf_counter() - t0) * 1e3

    step()  # warm-up; creates the optimizer state
    times, optimizer_times = [], []
    for _ in range(args.repeats):
        synchronize()
        t0 = time.perf_counter()
        optimizer_times.append(step())
        times.append((time.perf_counter() - t0) * 1e3)
    optimizer.zero_grad(set_to_none=True)
    hidden.grad = None
    memory.start()
    step()
    extra = max(memory.peak(), 0)
    result = dict(median_ms=statistics.median(times), min_ms=min(times), max_ms=max(times),
                  optimizer_ms=statistics.median(optimizer_times), step_peak_mb=extra / 2**20,
                  optimizer_state_mb=state_bytes(optimizer) / 2**20,
                  grad_rows=weight.grad._nnz() if sparse else num_classes)
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
    parser.add_argument("--noise", nargs="+", choices=["zipf", "uniform"],
                        default=["zipf", "uniform"])
    parser.add_argument("--optimizers", nargs="+", choices=["sgd", "adagrad", "adam"],
                        default=["sgd", "adagrad", "adam"], help="optimizer families to run")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--csv", default="bench/out/bench_sparse.csv")
    parser.add_argument("--plot", default=None, help="PNG (default: the CSV's name, .png)")
    parser.add_argument("--replot", metavar="CSV", help="only render the table and plot of a CSV")
    args = parser.parse_args()
    if args.replot:
        rows = read_rows(args.replot)
        print_summary(rows)
        plot(rows, args.plot or os.path.splitext(args.replot)[0] + ".png")
        return

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    memory = PeakMemory(device)
    cpu_name = platform.processor() or platform.machine()
    device_name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"{cpu_name} {os.cpu_count()}-core CPU, {torch.get_num_threads()} threads")
    bandwidth = update_bandwidth(device)
    meta = dict(device=device_name, torch=torch.__version__, date=datetime.date.today().isoformat(),
                threads=torch.get_num_threads(), n=args.n, dim=args.dim, k=args.k,
                objective=args.objective, dtype="float32", bandwidth_gb_per_s=bandwidth / 1e9)
    print(f"fused_nce optimizer-step benchmark on {device_name}, torch {torch.__version__}, "
          f"{meta['date']}: N={args.n} D={args.dim} k={args.k} {args.objective} float32, "
          f"loss+backward+optimizer step, median of {args.repeats}; "
          f"in-place read + write bandwidth {bandwidth / 1e9:.1f} GB/s")

    rows: List[dict] = []
    for num_classes in args.num_classes:
        for noise in args.noise:
            for method, (family, _, sparse, traffic) in METHODS.items():
                if family not in args.optimizers:
                    continue
                r = measure_step(args, num_classes, noise, method, device, memory)
                floor_ms = traffic * r["grad_rows"] * (args.dim + 1) / bandwidth * 1e3
                rows.append(dict(meta, num_classes=num_classes, noise=noise, method=method,
                                 gradient="sparse" if sparse else "dense", **r,
                                 optimizer_floor_ms=floor_ms))
                print(f"  V={num_classes:<9} {noise:<8} {method:<19}{r['median_ms']:9.1f} ms "
                      f"[{r['min_ms']:.1f}, {r['max_ms']:.1f}]  optimizer {r['optimizer_ms']:8.1f}"
                      f" ms (floor {floor_ms:6.1f})  step peak {r['step_peak_mb']:7.1f} MB  "
                      f"state {r['optimizer_state_mb']:7.1f} MB  rows {r['grad_rows']}",
                      flush=True)

    print_summary(rows)
    write_csv(args.csv, rows)
    print(f"wrote {args.csv}")
    plot(rows, args.plot or os.path.splitext(args.csv)[0] + ".png")


def read_rows(path: str) -> List[dict]:
    """A CSV written by this script, numbers parsed."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for key, value in r.items():
            try:
                r[key] = int(value)
            except ValueError:
                try:
                    r[key] = float(value)
                except ValueError:
                    pass
    return rows


def print_summary(rows: List[dict]) -> None:
    """Markdown table: every method against the dense step and against torch's sparse one."""
    baselines = {"sgd": ("SGD (dense)", "SGD (sparse)"), "adagrad": (None, "Adagrad (sparse)"),
                 "adam": ("Adam (dense)", "SparseAdam")}
    by_key = {(r["num_classes"], r["noise"], r["method"]): r for r in rows}
    print()
    print("| V | noise | rows touched | method | step ms | optimizer ms | optimizer floor ms | "
          "vs dense | vs torch sparse | step peak MB | state MB |")
    print("|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for (num_classes, noise, method), r in by_key.items():
        dense_name, sparse_name = baselines[METHODS[method][0]]

        def ratio(name):
            base = by_key.get((num_classes, noise, name)) if name else None
            return f"{base['median_ms'] / r['median_ms']:.1f}x" if base else "-"

        touched = max(x["grad_rows"] for x in rows if x["num_classes"] == num_classes
                      and x["noise"] == noise and x["gradient"] == "sparse")
        print(f"| {num_classes:,} | {noise} | {touched / num_classes:.0%} | {method} | "
              f"{r['median_ms']:.1f} | {r['optimizer_ms']:.1f} | {r['optimizer_floor_ms']:.1f} | "
              f"{ratio(dense_name)} | {ratio(sparse_name)} | {r['step_peak_mb']:.0f} | "
              f"{r['optimizer_state_mb']:.0f} |")


def plot(rows: List[dict], path: str) -> None:
    """One panel per (V, noise): step time per method, the optimizer's share and its floor."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    panels = sorted({(r["num_classes"], r["noise"]) for r in rows},
                    key=lambda p: (p[0], p[1] != "zipf"))
    cols = 2 if len(panels) > 1 else 1
    fig, axes = plt.subplots((len(panels) + cols - 1) // cols, cols, figsize=(6.5 * cols, 3.6 *
                             ((len(panels) + cols - 1) // cols)), squeeze=False)
    for ax, (num_classes, noise) in zip(axes.flat, panels):
        rs = [r for r in rows if r["num_classes"] == num_classes and r["noise"] == noise]
        names = [r["method"] for r in rs]
        y = range(len(rs))
        loss_ms = [r["median_ms"] - r["optimizer_ms"] for r in rs]
        ax.barh(y, loss_ms, color="0.75", label="loss + backward")
        ax.barh(y, [r["optimizer_ms"] for r in rs], left=loss_ms,
                color=["tab:green" if n.startswith("Row") else "tab:red" for n in names],
                label="optimizer step")
        ax.scatter([lm + r["optimizer_floor_ms"] for lm, r in zip(loss_ms, rs)], y, marker="|",
                   s=150, color="k", zorder=3, label="optimizer memory-traffic floor")
        ax.set_yticks(list(y), names)
        ax.invert_yaxis()
        ax.set_xlabel("ms per training step (median)")
        touched = max(r["grad_rows"] for r in rs if r["gradient"] == "sparse") / num_classes
        ax.set_title(f"V = {num_classes:,}, {noise} noise ({touched:.0%} of rows touched)",
                     fontsize=10)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes[0][0].legend(loc="lower right", fontsize=8)
    r0 = rows[0]
    fig.suptitle(f"loss + backward + optimizer step, N={r0['n']} D={r0['dim']} k={r0['k']} "
                 f"{r0['objective']} float32\n{r0['device']}, torch {r0['torch']}, {r0['date']}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
