"""Problem builders and tolerances shared by the tests."""

import contextlib
import math
from dataclasses import dataclass
from typing import Optional

import torch

import fused_nce
from fused_nce import reference

# (loss, gradient) tolerances of the fused kernels against the reference on the same inputs:
# both accumulate in float32 (float64), so only summation order and the final rounding differ.
TOLERANCE = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.bfloat16: (2e-5, 1.6e-2),
    torch.float16: (2e-5, 2e-3),
}


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool = True):
    """torch.use_deterministic_algorithms(enabled) inside the block: on CUDA the dense weight
    gradient then sums each row in a fixed order (atomics otherwise)."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(enabled)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


@dataclass
class Problem:
    hidden: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    target: torch.Tensor
    negatives: torch.Tensor
    sampler: fused_nce.AliasSampler

    def leaves(self):
        tensors = [self.hidden, self.weight] + ([self.bias] if self.bias is not None else [])
        return [t.detach().clone().requires_grad_() for t in tensors]


def make_problem(n=29, dim=24, num_classes=61, k=9, *, dtype=torch.float32, device="cpu",
                 bias=True, shared=False, ignore_every=7, hits=True, seed=0, batch_shape=None):
    g = torch.Generator().manual_seed(seed)
    batch_shape = batch_shape or (n,)
    n = int(torch.Size(batch_shape).numel())
    hidden = torch.randn(*batch_shape, dim, generator=g, dtype=torch.float64) / dim ** 0.25
    weight = torch.randn(num_classes, dim, generator=g, dtype=torch.float64) / dim ** 0.25
    b = torch.randn(num_classes, generator=g, dtype=torch.float64) if bias else None
    target = torch.randint(num_classes, batch_shape, generator=g)
    flat_target = target.view(-1)
    if ignore_every:
        flat_target[::ignore_every] = -100
    noise_weights = torch.rand(num_classes, generator=g, dtype=torch.float64) + 0.05
    sampler = fused_nce.AliasSampler(noise_weights, device=device)
    if shared:
        negatives = torch.randint(num_classes, (k,), generator=g)
        if hits and n > 1:
            negatives[0] = flat_target[1].clamp_min(0)
    else:
        negatives = torch.randint(num_classes, (*batch_shape, k), generator=g)
        if hits:
            flat = negatives.view(n, k)
            flat[:, 0] = flat_target.clamp_min(0)  # accidental hits (and duplicates) in every row
            if k >= 3:
                flat[:, 1] = flat[:, 2]
    cast = dict(dtype=dtype, device=device)
    return Problem(hidden.to(**cast), weight.to(**cast), b.to(**cast) if b is not None else None,
                   target.to(device), negatives.to(device), sampler)


def run_fused(objective, p: Problem, leaves, **kwargs):
    hidden, weight, *rest = leaves
    bias = rest[0] if rest else None
    fn = getattr(fused_nce, f"{objective}_loss")
    return fn(hidden, weight, bias, p.target, p.sampler, negatives=p.negatives, **kwargs)


def run_reference(objective, p: Problem, leaves, **kwargs):
    hidden, weight, *rest = leaves
    bias = rest[0] if rest else None
    fn = getattr(reference, f"{objective}_loss")
    if objective == "negative_sampling":
        return fn(hidden, weight, bias, p.target, p.negatives, **kwargs)
    return fn(hidden, weight, bias, p.target, p.sampler.probs, p.negatives, **kwargs)


def loss_and_grads(run, objective, p: Problem, **kwargs):
    leaves = p.leaves()
    loss = run(objective, p, leaves, **kwargs)
    # A non-uniform upstream gradient checks that each example's gradient is scaled by its own.
    upstream = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
    loss.backward(upstream.to(loss.device))
    return loss.detach(), [leaf.grad for leaf in leaves]


def runs_per_thread_count(compute, schedule):
    """``compute()`` once per entry of ``schedule`` (thread counts, e.g. ``[2, 1, 2, 1]``), each
    under that many threads; returns ``{threads: [results...]}`` in run order. The caller's
    thread count is restored afterwards."""
    before = torch.get_num_threads()
    runs: dict = {}
    try:
        for num_threads in schedule:
            torch.set_num_threads(num_threads)
            runs.setdefault(num_threads, []).append(compute())
    finally:
        torch.set_num_threads(before)
    return runs


def assert_bitwise_reproducible(runs, across_thread_counts):
    """Every run of ``runs_per_thread_count`` equals the first at its thread count, bit for bit;
    with ``across_thread_counts`` also the first run at every other thread count.

    Shared negatives hand their [k, N] x [N, D] sums to torch's BLAS (MKL / oneDNN on x86),
    whose blocking, and so summation order, may change with the thread count on some CPUs
    (seen on AVX-512 Xeons): those paths promise what torch promises, the same bits at a fixed
    thread count. The per-example paths sum every row in a fixed order whatever the thread count.
    """
    groups = list(runs.values())
    first = groups[0][0]
    for group in groups:
        for tensors in group:
            expected = first if across_thread_counts else group[0]
            for got, want in zip(tensors, expected):
                assert torch.equal(got, want)


# ---- the alias sampler ----

def chi_square_p_upper(statistic, dof):
    """P(X >= statistic) for chi-square(dof), by the Wilson-Hilferty normal approximation."""
    z = ((statistic / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
    return 0.5 * math.erfc(z / math.sqrt(2))


def chi_square(draws, probs):
    counts = torch.bincount(draws.cpu(), minlength=probs.numel()).double()
    expected = probs.cpu().double() * draws.numel()
    keep = expected > 0
    return (((counts - expected) ** 2)[keep] / expected[keep]).sum().item(), int(keep.sum()) - 1


def table_probs(table):
    """The distribution an alias table encodes: bucket c keeps c with probability threshold / 2^32
    and hands the rest to its alias."""
    table = table.cpu()
    num_classes = table.numel()
    keep = (table & 0xFFFFFFFF).double() / 2.0**32
    alias = table >> 32
    probs = keep.clone()
    probs.index_add_(0, alias, 1.0 - keep)
    return probs / num_classes


def table_error_bound(table):
    """How far table_probs may be from the exact distribution, per class: each bucket truncates
    its threshold to 32 bits (2^-32 / V per bucket that hands the class mass), and the double
    prefix sums over V classes round (a bound that grows with V, landing on the last heavies)."""
    table = table.cpu()
    num_classes = table.numel()
    keep = table & 0xFFFFFFFF
    gives = keep < 0xFFFFFFFF
    buckets = 1 + torch.bincount((table >> 32)[gives], minlength=num_classes).double()
    return (buckets * 2.0**-32 + max(1e-8, num_classes * 1e-12)) / num_classes
