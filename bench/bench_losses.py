"""Microbenchmark: the fused losses against the PyTorch a careful user writes, and full softmax.

For each negatives mode (per-example, shared, in-batch) and objective: forward+backward time
(median of repeats after warm-up; CUDA events on a GPU) and extra peak memory (beyond the inputs
and the gradients). Prints a table and writes one long CSV. Defaults: N=4096, D=256, k=64 per
example, k=1024 shared, V=100,000, float32, on CUDA when present, else CPU. Targets and
negatives are drawn from a Zipfian (log-uniform) distribution, as words are: the most frequent
class takes ~5% of all entries, the hot-row case of the row-gradient sums.

Providers (each checked against ``fused`` on the same inputs before it is timed):
- fused: dense gradients; fused_sparse: ``sparse_grad=True`` (only the touched rows);
- pytorch, pytorch_compiled, pytorch_sparse: bench/baselines.py, rows gathered first in the
  input dtype, GEMM / bmm scores, float32 loss; eager, ``torch.compile`` (compile time in the
  note; on a GPU also ``max-autotune-no-cudagraphs`` as pytorch_autotuned) and eager with
  ``F.embedding(..., sparse=True)`` (the peer of fused_sparse);
- reference: ``fused_nce.reference``, the tests' oracle (materializes ``[N, k, D]``), for the
  record only: never a headline ratio;
- tensorflow: with shared negatives on the CPU, ``tf.nn.nce_loss`` /
  ``tf.nn.sampled_softmax_loss`` when tensorflow is installed.

    python bench/bench_losses.py [--device cpu] [--n 4096] [--csv bench/out/bench_losses.csv]
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import datetime
import os
import platform
import re
import statistics
import time
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

import baselines
import fused_nce
from fused_nce import reference

OBJECTIVES = ["nce", "negative_sampling", "sampled_softmax"]
BASELINES = ("pytorch", "pytorch_compiled", "pytorch_autotuned", "pytorch_sparse")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}


class PeakMemory:
    """Peak bytes in use during a region, relative to its start.

    CUDA: the caching allocator's peak. CPU: the process's resident-set high-water mark, reset
    with /proc/self/clear_refs; while it is measured, malloc returns large blocks to the system at
    once, and fused_nce its spare gradient buffers, so freed memory is not hidden in a cache.
    Timed runs use the thresholds that glibc's dynamic ones settle at in a training loop (32 MB),
    not the measuring ones: otherwise every buffer over 1 MB would be a fresh mapping whose page
    faults each step pays.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.libc = ctypes.CDLL("libc.so.6") if device.type == "cpu" else None
        self._malloc_thresholds(32 << 20)

    def _malloc_thresholds(self, nbytes: int) -> None:
        if self.libc is not None:
            self.libc.mallopt(-3, nbytes)  # M_MMAP_THRESHOLD: larger blocks straight from mmap
            self.libc.mallopt(-1, 2 * nbytes)  # M_TRIM_THRESHOLD

    def _cpu_status(self, field: str) -> int:
        with open("/proc/self/status") as f:
            return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1)) * 1024

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            self._malloc_thresholds(1 << 20)
            self.libc.malloc_trim(0)
            fused_nce.release_cpu_buffers()  # the spare gradient buffers count as new memory
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.base = self._cpu_status("VmRSS")

    def peak(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self.base
        peak = self._cpu_status("VmHWM") - self.base
        self._malloc_thresholds(32 << 20)
        return peak


def make_case(args, device: torch.device, dtype: torch.dtype, shared: bool, seed: int = 0):
    g = torch.Generator(device).manual_seed(seed)
    n, dim, v = args.n, args.dim, args.num_classes
    k = args.shared_k if shared else args.k
    hidden = (torch.randn(n, dim, generator=g, device=device) / dim ** 0.5).to(dtype)
    weight = (torch.randn(v, dim, generator=g, device=device) * 0.1).to(dtype)
    bias = torch.zeros(v, device=device, dtype=dtype)
    sampler = fused_nce.AliasSampler(fused_nce.log_uniform_weights(v), device=device)
    target = sampler.sample(n, generator=g)  # Zipfian targets, like words
    # A few negative sets to rotate through, so repeats do not reuse the same rows.
    negatives = [sampler.sample((k,) if shared else (n, k), generator=g) for _ in range(3)]
    leaves = [t.requires_grad_() for t in (hidden, weight, bias)]
    return leaves, target, sampler, negatives


def providers(objective: str, device: torch.device) -> Dict[str, Callable]:
    """name -> step(h, w, b, t, sampler, negatives, log_q) returning the mean loss."""
    fused = getattr(fused_nce, f"{objective}_loss")
    ref = getattr(reference, f"{objective}_loss")

    def run_fused(h, w, b, t, sampler, negatives, log_q):
        return fused(h, w, b, t, sampler, negatives=negatives)

    def run_fused_sparse(h, w, b, t, sampler, negatives, log_q):
        return fused(h, w, b, t, sampler, negatives=negatives, sparse_grad=True)

    def run_reference(h, w, b, t, sampler, negatives, log_q):
        if objective == "negative_sampling":
            return ref(h, w, b, t, negatives)
        return ref(h, w, b, t, sampler.probs, negatives)

    def careful(h, w, b, t, negatives, log_q):
        return baselines.sampled_loss(objective, h, w, b, t, negatives, log_q)

    def careful_sparse(h, w, b, t, sampler, negatives, log_q):
        return baselines.sampled_loss(objective, h, w, b, t, negatives, log_q, sparse=True)

    def eager(fn):
        return lambda h, w, b, t, sampler, negatives, log_q: fn(h, w, b, t, negatives, log_q)

    steps = {"fused": run_fused, "fused_sparse": run_fused_sparse,
             "pytorch": eager(careful), "pytorch_compiled": eager(baselines.compiled(careful))}
    if device.type == "cuda":
        steps["pytorch_autotuned"] = eager(baselines.compiled(careful,
                                                              "max-autotune-no-cudagraphs"))
    steps["pytorch_sparse"] = careful_sparse
    steps["reference"] = run_reference
    return steps


def in_batch_case(args, device: torch.device, dtype: torch.dtype):
    """N queries and their N candidates (a two-tower batch), Zipfian item ids, log q of each."""
    g = torch.Generator(device).manual_seed(1)
    n, dim = args.n, args.dim

    def rows() -> torch.Tensor:
        x = torch.randn(n, dim, generator=g, device=device)
        return (x / x.norm(dim=1, keepdim=True)).to(dtype).requires_grad_()

    sampler = fused_nce.AliasSampler(fused_nce.log_uniform_weights(args.num_classes),
                                     device=device)
    ids = sampler.sample(n, generator=g)
    log_q = sampler.probs[ids].log()
    temperature = torch.tensor(0.05, device=device)
    return [rows(), rows()], ids, log_q, temperature


def in_batch_providers(device: torch.device) -> Dict[str, Callable]:
    """name -> step(query, candidates, ids, log_q, temperature) returning the mean loss."""
    def fused(q, c, ids, log_q, temp):
        return fused_nce.in_batch_softmax_loss(q, c, ids, log_q=log_q, temperature=temp)

    steps = {"fused": fused, "pytorch": baselines.in_batch_loss,
             "pytorch_compiled": baselines.compiled(baselines.in_batch_loss)}
    if device.type == "cuda":
        steps["pytorch_autotuned"] = baselines.compiled(baselines.in_batch_loss,
                                                        "max-autotune-no-cudagraphs")
    steps["reference"] = lambda q, c, ids, log_q, temp: reference.in_batch_softmax_loss(
        q, c, ids, log_q=log_q, temperature=temp)
    return steps


def check_against(expected: Callable, step: Callable, leaves: List[torch.Tensor],
                  dtype: torch.dtype) -> float:
    """Runs both steps once on the same inputs and raises unless the loss and every gradient
    agree; returns the seconds the step's call took (its compile, for a compiled one)."""
    def run(fn):
        for leaf in leaves:
            leaf.grad = None
        t0 = time.perf_counter()
        loss = fn()
        loss.backward()
        if loss.is_cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        grads = [leaf.grad.to_dense() if leaf.grad.is_sparse else leaf.grad for leaf in leaves]
        for leaf in leaves:
            leaf.grad = None
        return loss.detach().float(), [g.float() for g in grads], seconds

    want_loss, want_grads, _ = run(expected)
    got_loss, got_grads, seconds = run(step)
    tol = 1e-4 if dtype in (torch.float32, torch.float64) else 2e-2
    torch.testing.assert_close(got_loss, want_loss, rtol=tol, atol=tol)
    for got, want in zip(got_grads, want_grads):
        scale = want.abs().max().item() or 1.0
        torch.testing.assert_close(got / scale, want / scale, rtol=tol, atol=tol)
    return seconds


def tensorflow_steps(leaves, target, k: int, threads: int) -> Dict[str, Callable[[], None]]:
    """TensorFlow's own sampled losses (when tensorflow is installed): tf.nn.nce_loss and
    tf.nn.sampled_softmax_loss with their default sampler (log-uniform, k shared negatives drawn
    without replacement each step), forward + backward in one tf.function. The weight gradient
    is TensorFlow's row-sparse IndexedSlices."""
    try:
        import tensorflow as tf  # optional: pip install tensorflow-cpu
    except ImportError:
        return {}
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    hidden, weight, bias = (tf.Variable(t.detach().float().cpu().numpy()) for t in leaves)
    labels = tf.constant(target.cpu().numpy().reshape(-1, 1))
    num_classes = int(weight.shape[0])
    steps = {}
    for objective, loss_fn in [("nce", tf.nn.nce_loss), ("sampled_softmax", tf.nn.sampled_softmax_loss)]:
        @tf.function
        def step(loss_fn=loss_fn):
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(loss_fn(weights=weight, biases=bias, labels=labels,
                                              inputs=hidden, num_sampled=k,
                                              num_classes=num_classes))
            return tape.gradient(loss, [hidden, weight, bias])

        def run(step=step) -> None:
            grads = step()
            _ = grads[0].numpy()  # wait for the step to finish

        steps[objective] = run
    return steps


def full_softmax(h, w, b, t, sampler, negatives):
    return F.cross_entropy(F.linear(h, w, b).float(), t)


def measure(step: Callable, leaves: List[torch.Tensor], negatives: List[torch.Tensor],
            device: torch.device, warmup: int, repeats: int, memory: PeakMemory):
    def run(i: int) -> None:
        for leaf in leaves:
            leaf.grad = None
        step(negatives[i % len(negatives)]).backward()

    for i in range(warmup):
        run(i)
    times = []
    for i in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run(i)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            run(i)
            times.append((time.perf_counter() - t0) * 1e3)
    for leaf in leaves:
        leaf.grad = None
    memory.start()
    run(0)
    grad_bytes = sum(grad_nbytes(leaf.grad) for leaf in leaves)
    extra = memory.peak() - grad_bytes
    for leaf in leaves:
        leaf.grad = None
    return times, max(extra, 0)


def grad_nbytes(grad: torch.Tensor) -> int:
    if grad.is_sparse:
        return (grad._values().numel() * grad._values().element_size()
                + grad._indices().numel() * grad._indices().element_size())
    return grad.numel() * grad.element_size()


def time_call(fn: Callable, device: torch.device, repeats: int) -> List[float]:
    """Milliseconds per call (CUDA events on a GPU), after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=4096, help="examples (tokens) per step")
    parser.add_argument("--dim", type=int, default=256, help="D")
    parser.add_argument("--k", type=int, default=64, help="negatives per example")
    parser.add_argument("--shared-k", type=int, default=1024, help="shared negatives per batch")
    parser.add_argument("--num-classes", type=int, default=100_000, help="V")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--objectives", nargs="+", choices=OBJECTIVES, default=OBJECTIVES)
    parser.add_argument("--modes", nargs="+", choices=["per_example", "shared", "in_batch"],
                        default=["per_example", "shared", "in_batch"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-full-softmax", action="store_true", help="skip the O(V) baseline")
    parser.add_argument("--draws", type=int, default=None,
                        help="alias sampler draws to time (default: N * k)")
    parser.add_argument("--build-classes", type=int, default=None,
                        help="V of the timed alias table build (default: --num-classes)")
    parser.add_argument("--csv", default="bench/out/bench_losses.csv")
    parser.add_argument("--summarize", nargs="+", metavar="CSV",
                        help="measure nothing: print the tables of CSVs this script wrote")
    args = parser.parse_args()
    if args.summarize:
        for path in args.summarize:
            summarize(path)
        return

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    memory = PeakMemory(device)
    device_name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads")
    meta = dict(device=device_name, torch=torch.__version__, date=datetime.date.today().isoformat(),
                threads=torch.get_num_threads(), n=args.n, dim=args.dim, k=args.k,
                shared_k=args.shared_k, num_classes=args.num_classes, dtype=args.dtype)
    print(f"fused_nce microbenchmark on {device_name}, torch {torch.__version__}: "
          f"N={args.n} D={args.dim} k={args.k} (shared {args.shared_k}) V={args.num_classes} {args.dtype}, "
          f"forward+backward, median of {args.repeats}")

    rows: List[dict] = []

    def record(mode, objective, provider, times, extra, note=""):
        record_row(rows, meta, args.csv, mode, objective, provider, times, extra, note)

    for mode in args.modes:
        if mode == "in_batch":
            leaves, ids, log_q, temperature = in_batch_case(args, device, dtype)
            steps = in_batch_providers(device)
            args_of = (ids, log_q, temperature)
            cases = [("in_batch_softmax", steps, lambda fn: lambda negs: fn(*leaves, *args_of))]
            negatives = [None]
        else:
            leaves, target, sampler, negatives = make_case(args, device, dtype, mode == "shared")
            log_q = sampler.probs.log()  # computed once, outside the step, as a user would
            cases = [(objective, providers(objective, device),
                      lambda fn: lambda negs, fn=fn: fn(*leaves, target, sampler, negs, log_q))
                     for objective in args.objectives]
        for objective, steps, bind in cases:
            fused_step = bind(steps["fused"])
            for name, fn in steps.items():
                step = bind(fn)
                note = ""
                if name != "fused":
                    seconds = check_against(lambda: fused_step(negatives[0]),
                                            lambda: step(negatives[0]), leaves, dtype)
                    if "compiled" in name or "autotuned" in name:
                        note = f"first call (compile) {seconds:.1f} s"
                times, extra = measure(step, leaves, negatives, device, 1, args.repeats, memory)
                record(mode, objective, name, times, extra, note)
        if mode == "shared" and device.type == "cpu" and dtype == torch.float32:
            for objective, run in tensorflow_steps(leaves, target, args.shared_k,
                                                   torch.get_num_threads()).items():
                if objective in args.objectives:
                    record(mode, objective, "tensorflow", time_call(run, device, args.repeats), 0)
        del leaves, negatives

    if not args.no_full_softmax:
        # The [N, V] logits may not fit (N = 8192, V = 1e6 in float32 is 33 GB, twice over in
        # backward): then measure at N/2, N/4, ... and scale up, time and memory being linear in N.
        n = args.n
        while True:
            try:
                case = make_case(argparse.Namespace(**{**vars(args), "n": n}), device, dtype, False)
                leaves, target, sampler, negatives = case
                step = lambda negs: full_softmax(*leaves, target, sampler, negs)  # noqa: E731
                times, extra = measure(step, leaves, negatives, device, 1,
                                       max(2, args.repeats // 2), memory)
                break
            except Exception as error:
                case = leaves = step = None
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                if not is_oom(error) or n <= 256:
                    raise
                n //= 2
        note = ""
        if n < args.n:
            scale = args.n / n
            times, extra = [t * scale for t in times], extra * scale
            note = f"out of memory at N={args.n}: measured at N={n}, scaled x{scale:g}"
        record("-", "full_softmax", "full_softmax", times, extra, note)
        del case, leaves, step
    # Sampling: --draws (N * k) draws, the alias table against
    # torch.multinomial(replacement=True), and the table's construction (on the device).
    weights = fused_nce.log_uniform_weights(args.num_classes).to(device)
    sampler = fused_nce.AliasSampler(weights, device=device)
    draws = args.draws or args.n * args.k
    for provider, fn in [("fused", lambda: sampler.sample(draws)),
                         ("multinomial", lambda: torch.multinomial(sampler.probs, draws, replacement=True))]:
        record("-", "sample", provider, time_call(fn, device, args.repeats), 0, f"{draws} draws")
    build_classes = args.build_classes or args.num_classes
    build_weights = fused_nce.log_uniform_weights(build_classes).to(device)
    record("-", "alias_build", "fused",
           time_call(lambda: torch.ops.fused_nce.alias_build(build_weights), device, args.repeats),
           0, f"V={build_classes}")

    print_summary(rows)
    print(f"wrote {args.csv}")


def record_row(rows: List[dict], meta: dict, csv_path: str, mode: str, objective: str,
               provider: str, times: List[float], extra: float, note: str = "") -> None:
    """Appends one provider's figures (milliseconds, extra bytes) to ``rows``, prints them and
    rewrites the CSV: a run cut short (out of time, out of memory) keeps what it measured."""
    rows.append(dict(meta, mode=mode, objective=objective, provider=provider,
                     median_ms=statistics.median(times), min_ms=min(times), max_ms=max(times),
                     extra_peak_mb=extra / 2**20, note=note))
    r = rows[-1]
    print(f"  {mode:<12} {objective:<18} {provider:<17} {r['median_ms']:10.2f} ms "
          f"[{r['min_ms']:.2f}, {r['max_ms']:.2f}]  {r['extra_peak_mb']:9.1f} MB  {note}",
          flush=True)
    write_csv(csv_path, rows)


def write_csv(path: str, rows: List[dict]) -> None:
    """Rows (dicts with the same keys) to a CSV at path, its folder made if needed."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def summarize(path: str) -> None:
    """The tables of a CSV written by this script, under the machine, torch and date it names."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for key in ("median_ms", "min_ms", "max_ms", "extra_peak_mb"):
            r[key] = float(r[key])
    first = rows[0]
    print(f"{first['device']}, torch {first['torch']}, {first['date']}: N={first['n']} "
          f"D={first['dim']} k={first['k']} V={first['num_classes']} {first['dtype']}, "
          f"forward+backward")
    print_summary(rows)
    print()


def is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def headline(rows) -> List[dict]:
    """Per path (negatives, objective) and fused provider: the fastest careful-PyTorch baseline
    of that path, its name, and the speed and memory ratios. The dense fused step is measured
    against the dense baselines (eager, compiled), the sparse_grad step against every baseline,
    sparse included (a user who can take sparse gradients picks the fastest)."""
    by_key = {(r["mode"], r["objective"], r["provider"]): r for r in rows}
    lines = []
    for (mode, objective, provider), r in by_key.items():
        if provider not in ("fused", "fused_sparse"):
            continue
        allowed = [b for b in BASELINES if provider == "fused_sparse" or b != "pytorch_sparse"]
        peers = [by_key[(mode, objective, b)] for b in allowed if (mode, objective, b) in by_key]
        if not peers:
            continue
        best = min(peers, key=lambda p: p["median_ms"])
        least_memory = min(p["extra_peak_mb"] for p in peers)
        lines.append(dict(mode=mode, objective=objective, provider=provider,
                          fused_ms=r["median_ms"], fused_mb=r["extra_peak_mb"],
                          baselines={p["provider"]: p["median_ms"] for p in peers},
                          fastest=best["provider"], fastest_ms=best["median_ms"],
                          speedup=best["median_ms"] / r["median_ms"],
                          fastest_mb=best["extra_peak_mb"], least_mb=least_memory,
                          memory_ratio=least_memory / max(r["extra_peak_mb"], 0.1)))
    return lines


def print_summary(rows) -> None:
    """Markdown tables: fused against the fastest careful PyTorch of each path, then the rest."""
    by_key = {(r["mode"], r["objective"], r["provider"]): r for r in rows}
    full = by_key.get(("-", "full_softmax", "full_softmax"))
    names = [b for b in BASELINES if any(key[2] == b for key in by_key)]
    print()
    print("| negatives | objective | fused | fused ms | " + " | ".join(f"{b} ms" for b in names)
          + " | fastest baseline | speed-up | fused extra MB | baseline extra MB | memory ratio |"
          + (" vs full softmax |" if full else ""))
    print("|---|---|---|---:|" + "---:|" * len(names) + "---|---:|---:|---:|---:|"
          + ("---:|" if full else ""))
    for h in headline(rows):
        cells = " | ".join(f"{h['baselines'][b]:.2f}" if b in h["baselines"] else "-"
                           for b in names)
        gradient = "sparse_grad" if h["provider"] == "fused_sparse" else "dense"
        line = (f"| {h['mode']} | {h['objective']} | {gradient} | {h['fused_ms']:.2f} | {cells} | "
                f"{h['fastest']} | {h['speedup']:.2f}x | {h['fused_mb']:.1f} | "
                f"{h['least_mb']:.1f} | {h['memory_ratio']:.1f}x |")
        if full:
            line += f" {full['median_ms'] / h['fused_ms']:.0f}x |"
        print(line)
    compiles = [r for r in rows if "compile" in r["note"]]
    if compiles:
        print("\ncompile time (first call): " + ", ".join(
            f"{r['mode']}/{r['objective']}/{r['provider']} {r['note'].split()[-2]} s"
            for r in compiles))
    refs = [r for r in rows if r["provider"] == "reference"]
    if refs:
        print("\nfused_nce.reference (the tests' oracle, materializes [N, k, D]; not a baseline): "
              + ", ".join(f"{r['mode']}/{r['objective']} {r['median_ms']:.1f} ms "
                          f"{r['extra_peak_mb']:.0f} MB" for r in refs))
    tf_rows = [(key, r) for key, r in by_key.items() if key[2] == "tensorflow"]
    if tf_rows:
        print("\n| vs TensorFlow (shared negatives) | tensorflow ms | fused ms | sparse_grad ms | "
              "sparse_grad speed-up |\n|---|---:|---:|---:|---:|")
        for (mode, objective, _), r in tf_rows:
            fused, sparse = (by_key.get((mode, objective, p)) for p in ("fused", "fused_sparse"))
            if fused and sparse:
                print(f"| {objective} | {r['median_ms']:.2f} | {fused['median_ms']:.2f} | "
                      f"{sparse['median_ms']:.2f} | {r['median_ms'] / sparse['median_ms']:.2f}x |")
    if full:
        print(f"\nfull softmax (F.cross_entropy on [N, V] logits): {full['median_ms']:.1f} ms, "
              f"{full['extra_peak_mb']:.1f} MB extra {full['note']}")
    sample = {r["provider"]: r for r in rows if r["objective"] == "sample"}
    if sample:
        draws = int(sample["fused"]["note"].split()[0])
        rate = {p: draws / r["median_ms"] / 1e6 for p, r in sample.items()}
        print(f"\nsampling {draws} draws, V={rows[0]['num_classes']}: alias {rate['fused']:.3f} G draws/s, "
              f"torch.multinomial {rate['multinomial']:.3f} G draws/s "
              f"({rate['fused'] / rate['multinomial']:.1f}x)")
    for r in rows:
        if r["objective"] == "alias_build":
            print(f"alias table build, {r['note']}: {r['median_ms']:.2f} ms")


if __name__ == "__main__":
    main()
