"""torch.use_deterministic_algorithms(True): the backward is bitwise reproducible."""

import pytest
import torch

import fused_nce
from conftest import OBJECTIVES
from helpers import (TOLERANCE, assert_bitwise_reproducible, deterministic_algorithms,
                     loss_and_grads, make_problem, run_fused, run_reference,
                     runs_per_thread_count)


@pytest.fixture
def deterministic():
    with deterministic_algorithms():
        yield


def gradients(objective, p, sparse_grad):
    leaves = p.leaves()
    log_z = torch.tensor(0.25, device=p.hidden.device, requires_grad=True)
    extra = dict(log_z=log_z) if objective == "nce" else {}
    fn = getattr(fused_nce, f"{objective}_loss")
    loss = fn(*leaves, p.target, p.sampler, negatives=p.negatives, sparse_grad=sparse_grad,
              reduction="sum", **extra)
    params = leaves + ([log_z] if objective == "nce" else [])
    grads = torch.autograd.grad(loss, params)
    return [g.to_dense() if g.is_sparse else g for g in grads]


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("shared", [False, True], ids=["per_example", "shared"])
@pytest.mark.parametrize("sparse_grad", [False, True], ids=["dense", "sparse"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_backward_is_bitwise_reproducible(deterministic, device, objective, shared, sparse_grad,
                                          dtype):
    """Many examples hitting a handful of rows (every row summed from hundreds of entries), run
    repeatedly at each of two thread counts: the same bits every time at one thread count, and,
    for per-example negatives, across thread counts too (see assert_bitwise_reproducible). On
    the CPU one thread adds the entries straight into the rows while several threads sort them
    by row first (the weight gradient's entries times D is above the CPU kernel's serial
    threshold, 2^18)."""
    p = make_problem(n=7000 if shared else 600, dim=40, num_classes=7, k=24, dtype=dtype,
                     device=device, shared=shared)
    threads = max(2, torch.get_num_threads())
    runs = runs_per_thread_count(lambda: gradients(objective, p, sparse_grad),
                                 [threads, 1, threads, 1, threads])
    assert_bitwise_reproducible(runs, across_thread_counts=not shared)


def test_deterministic_gradients_are_still_right(deterministic, device):
    """Deterministic mode changes no result: the gradients match the reference."""
    p = make_problem(n=300, num_classes=9, k=16, device=device)
    _, grads = loss_and_grads(run_fused, "sampled_softmax", p)
    _, expected = loss_and_grads(run_reference, "sampled_softmax", p)
    tol = TOLERANCE[torch.float32][1]
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, rtol=tol, atol=tol)


def test_sampling_is_reproducible_in_deterministic_mode(deterministic, device):
    sampler = fused_nce.AliasSampler(torch.rand(1000) + 0.01, device=device)
    torch.manual_seed(0)
    first = sampler.sample((64, 32))
    torch.manual_seed(0)
    assert torch.equal(sampler.sample((64, 32)), first)
