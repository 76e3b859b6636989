"""How much of a CUDA step is host time: one NCE step (forward + gradients of hidden and weight)
timed eagerly, the host's time to issue it, and the same step captured in a CUDA graph and
replayed (GPU time alone). At the GPU target shapes and at the tiny fixed-cost shape.

    python bench/gpu/host_overhead.py [--csv bench/out/host_overhead.csv]
"""

import argparse
import datetime
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench_losses import time_call, write_csv  # noqa: E402

import fused_nce  # noqa: E402

CASES = [  # name, N, D, V, k, shared, dtype
    ("per_example", 8192, 1024, 1_000_000, 64, False, torch.bfloat16),
    ("shared", 8192, 1024, 1_000_000, 1024, True, torch.bfloat16),
    ("tiny", 64, 64, 1000, 16, False, torch.float32),
]


def make_step(n, dim, v, k, shared, dtype, device):
    g = torch.Generator(device).manual_seed(0)
    hidden = (torch.randn(n, dim, generator=g, device=device) / dim ** 0.5).to(dtype)
    weight = (torch.randn(v, dim, generator=g, device=device) * 0.1).to(dtype)
    hidden.requires_grad_()
    weight.requires_grad_()
    sampler = fused_nce.AliasSampler(fused_nce.log_uniform_weights(v), device=device)
    target = sampler.sample(n, generator=g)
    negatives = sampler.sample((k,) if shared else (n, k), generator=g)

    def step():
        loss = fused_nce.nce_loss(hidden, weight, None, target, sampler, negatives=negatives)
        return torch.autograd.grad(loss, [hidden, weight])

    return step


def median_ms(fn, repeats):
    """CUDA events around each call: GPU time, plus any time the GPU waits for the host."""
    return statistics.median(time_call(fn, torch.device("cuda"), repeats))


def host_ms(fn, repeats):
    """Wall time to issue the step, the GPU idle and synchronized before each."""
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize()
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--csv", default="bench/out/host_overhead.csv")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    device = torch.device("cuda")
    meta = dict(device=torch.cuda.get_device_name(device), torch=torch.__version__,
                date=datetime.date.today().isoformat())
    rows = []
    for name, n, dim, v, k, shared, dtype in CASES:
        step = make_step(n, dim, v, k, shared, dtype, device)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(side)
        eager = median_ms(step, args.repeats)
        issue = host_ms(step, args.repeats)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        replay = median_ms(graph.replay, args.repeats)
        row = dict(meta, case=name, n=n, dim=dim, num_classes=v, k=k, dtype=str(dtype),
                   eager_ms=round(eager, 4), host_issue_ms=round(issue, 4),
                   graph_replay_ms=round(replay, 4))
        rows.append(row)
        print(f"{name:12} eager {eager:8.3f} ms   host issues it in {issue:8.3f} ms   "
              f"graph replay {replay:8.3f} ms", flush=True)
        del graph, step
        torch.cuda.empty_cache()
    write_csv(args.csv, rows)
    print(f"wrote {args.csv}")


if __name__ == "__main__":
    main()
