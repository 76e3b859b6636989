"""Calls every op on every path at tiny shapes, for compute-sanitizer (memcheck, racecheck):
per-example and shared negatives, each objective, each dtype, dense / sparse rows / frozen
weight, deterministic mode, odd D and misaligned views, the alias build and draws; several
positives, hard negatives, per-example weights and gBCE; the row optimizers, in-batch retrieval
with extra negatives and the frequency estimator, and the vocab-parallel shard ops.

    compute-sanitizer --tool memcheck python bench/gpu/sanitize_driver.py [--device cuda]
"""

import argparse

import torch

import fused_nce
from fused_nce.optim import RowAdagrad, RowAdam, RowSGD

OBJECTIVES = ["nce", "negative_sampling", "sampled_softmax"]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def run_all(device: torch.device) -> int:
    calls = 0
    g = torch.Generator().manual_seed(0)
    for dim in [8, 13]:
        for dtype in DTYPES:
            for shared in [False, True]:
                n, v, k = 37, 50, 9
                wide = torch.randn(v, dim + 1, generator=g).to(device, dtype)
                weight_view = wide[:, 1:]  # offset by one element: the scalar path
                hidden = torch.randn(n, dim, generator=g).to(device, dtype)
                bias = torch.randn(v, generator=g).to(device, dtype)
                target = torch.randint(v, (n,), generator=g).to(device)
                target[::5] = -100
                negatives = torch.randint(v, (k,) if shared else (n, k), generator=g).to(device)
                noise = torch.rand(v, generator=g, dtype=torch.float64) + 0.1
                sampler = fused_nce.AliasSampler(noise, device=device)
                for objective in OBJECTIVES:
                    fn = getattr(fused_nce, f"{objective}_loss")
                    for weight in [weight_view.contiguous(), weight_view]:
                        for grads in ["dense", "sparse", "frozen", "deterministic"]:
                            h = hidden.clone().requires_grad_()
                            w = weight.detach().clone() if grads != "frozen" else weight
                            b = bias.clone()
                            if grads != "frozen":
                                w.requires_grad_()
                                b.requires_grad_()
                            torch.use_deterministic_algorithms(grads == "deterministic")
                            try:
                                loss = fn(h, w, b, target, sampler, negatives=negatives,
                                          sparse_grad=grads == "sparse")
                                loss.backward()
                            finally:
                                torch.use_deterministic_algorithms(False)
                            calls += 1
    # Hot rows longer than a chunk, in bfloat16 (the sorted path).
    h = torch.randn(600, 16, device=device, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(5, 16, device=device, dtype=torch.bfloat16, requires_grad=True)
    t = torch.randint(5, (600,), device=device)
    negatives = torch.randint(5, (600, 8), device=device)
    fused_nce.negative_sampling_loss(h, w, None, t, negatives=negatives).backward()
    # Sampler: build and draws.
    sampler = fused_nce.AliasSampler(fused_nce.log_uniform_weights(1000), device=device)
    sampler.sample((64, 33))
    calls += 2 + run_v2_ops(device, g) + run_v3_losses(device, g)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return calls


def run_v2_ops(device: torch.device, g: torch.Generator) -> int:
    """The row optimizers, in-batch retrieval with the frequency estimator, and the vocab-parallel
    shard ops (one process, a shard of rows at a time)."""
    from fused_nce._ops import ops

    calls = 0
    for dtype in DTYPES:
        v, dim, n = 50, 13, 37
        rows = torch.tensor([1, 4, 5, 30, 49], device=device)
        for opt_cls in [RowSGD, RowAdagrad, RowAdam]:
            weight = torch.randn(v, dim, generator=g).to(device, dtype).requires_grad_()
            opt = opt_cls([weight], lr=0.1)
            values = torch.randn(len(rows), dim, generator=g).to(device, dtype)
            weight.grad = torch.sparse_coo_tensor(rows.unsqueeze(0), values, (v, dim),
                                                  check_invariants=True)
            opt.step()
            calls += 1
        query = torch.randn(n, dim, generator=g).to(device, dtype).requires_grad_()
        candidates = torch.randn(n, dim, generator=g).to(device, dtype).requires_grad_()
        ids = torch.randint(20, (n,), generator=g).to(device)
        estimator = fused_nce.FrequencyEstimator(num_buckets=64).to(device)
        estimator.update(ids)
        extra = torch.randn(9, dim, generator=g).to(device, dtype)
        extra_ids = torch.randint(20, (9,), generator=g).to(device)
        for block_size in [0, 8]:
            loss = fused_nce.in_batch_softmax_loss(
                query, candidates, ids, log_q=estimator.log_prob(ids), extra_candidates=extra,
                extra_ids=extra_ids, extra_log_q=estimator.log_prob(extra_ids),
                block_size=block_size)
            loss.backward()
            calls += 1
    # The shard ops of vocab-parallel losses, float32 and float64, every backward mode.
    for dtype in [torch.float32, torch.float64]:
        v, dim, n, k = 50, 13, 37, 9
        hidden = torch.randn(n, dim, generator=g).to(device, dtype)
        weight = torch.randn(v, dim, generator=g).to(device, dtype)
        bias = torch.randn(v, generator=g).to(device, dtype)
        target = torch.randint(v, (n,), generator=g).to(device)
        target[::5] = -100
        negatives = torch.randint(v, (n, k), generator=g).to(device)
        q = (torch.rand(v, generator=g, dtype=torch.float64) + 0.1).to(device)
        q /= q.sum()
        log_z = torch.zeros((), dtype=dtype, device=device)
        grad_loss = torch.rand(n, generator=g).to(device, dtype)
        several = torch.randint(v, (n, 3), generator=g).to(device)
        several[::4, 1:] = -100
        hard = torch.randint(v, (n, 2), generator=g).to(device)
        hard[::3, 0] = -100
        for start, end in [(0, 20), (20, 50), (50, 50)]:
            for objective in range(3):
                for tgt, hard_negs in [(target, None), (several, hard if objective else None)]:
                    _, coef = ops.shard_loss_forward(hidden, weight[start:end], bias[start:end],
                                                     tgt, negatives, hard_negs, q, log_z,
                                                     objective, 0.5, True, -100, start, v)
                    for mode in range(3):
                        ops.shard_loss_backward(grad_loss, coef, hidden, weight[start:end], True,
                                                tgt, negatives, hard_negs, -100, start, v, mode)
                    calls += 1
    return calls


def run_v3_losses(device: torch.device, g: torch.Generator) -> int:
    """Several positives (padded, ragged), hard negatives (padded), per-example weights and gBCE:
    per-example and shared, each dtype, dense / sparse / frozen / deterministic."""
    calls = 0
    n, v, k, dim = 37, 50, 9, 13
    for dtype in DTYPES:
        for shared in [False, True]:
            hidden = torch.randn(n, dim, generator=g).to(device, dtype)
            weight = torch.randn(v, dim, generator=g).to(device, dtype)
            bias = torch.randn(v, generator=g).to(device, dtype)
            target = torch.randint(v, (n, 4), generator=g).to(device)
            target[::3, 2:] = -100
            target[::7] = -100
            hard = torch.randint(v, (n, 5), generator=g).to(device)
            hard[::2, 4] = -100
            weights = torch.rand(n, generator=g).to(device)
            negatives = torch.randint(v, (k,) if shared else (n, k), generator=g).to(device)
            sampler = fused_nce.AliasSampler(torch.rand(v, generator=g) + 0.1, device=device)
            for name in ["nce", "negative_sampling", "sampled_softmax", "gbce"]:
                fn = getattr(fused_nce, f"{name}_loss")
                extra = {} if name == "nce" else dict(hard_negatives=hard)
                for grads in ["dense", "sparse", "frozen", "deterministic"]:
                    h = hidden.clone().requires_grad_()
                    w = weight.clone().requires_grad_(grads != "frozen")
                    b = bias.clone().requires_grad_(grads != "frozen")
                    torch.use_deterministic_algorithms(grads == "deterministic")
                    try:
                        loss = fn(h, w, b, target, sampler, negatives=negatives,
                                  sample_weight=weights, remove_accidental_hits=True,
                                  sparse_grad=grads == "sparse", **extra)
                        loss.backward()
                    finally:
                        torch.use_deterministic_algorithms(False)
                    calls += 1
    return calls


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(parser.parse_args().device)
    print(f"sanitize driver: {run_all(device)} loss calls on {device}, all finished")


if __name__ == "__main__":
    main()
