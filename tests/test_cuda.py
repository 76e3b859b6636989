"""CUDA kernels against the CPU kernels: every path of the CUDA code (vector and scalar loads,
atomic and sorted scatter, shared GEMMs, device-built alias tables, Philox draws)."""

import subprocess
import sys
import textwrap

import pytest
import torch

import fused_nce
from conftest import DTYPES, OBJECTIVES
from helpers import TOLERANCE, loss_and_grads, make_problem, run_fused

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

ops = torch.ops.fused_nce


def to_cuda(p):
    p.hidden, p.weight = p.hidden.cuda(), p.weight.cuda()
    p.bias = p.bias.cuda() if p.bias is not None else None
    p.target, p.negatives = p.target.cuda(), p.negatives.cuda()
    p.sampler = p.sampler.to("cuda")
    return p


def assert_agree(cpu, cuda, dtype, what):
    loss_tol, grad_tol = TOLERANCE[dtype]
    (loss_cpu, grads_cpu), (loss_cuda, grads_cuda) = cpu, cuda
    torch.testing.assert_close(loss_cuda.cpu().double(), loss_cpu.double(), rtol=loss_tol, atol=loss_tol)
    for name, a, b in zip(["hidden", "weight", "bias"], grads_cpu, grads_cuda):
        assert b.is_cuda and b.dtype == a.dtype
        torch.testing.assert_close(b.cpu().double(), a.double(), rtol=grad_tol, atol=grad_tol,
                                   msg=lambda m: f"{what} grad {name}: {m}")


# dim 64 takes 16-byte vector loads for every dtype; 13 takes the one-element path.
@pytest.mark.parametrize("dim", [64, 13])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("shared", [False, True], ids=["per_example", "shared"])
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "sorted"])
def test_cuda_matches_cpu(dim, dtype, objective, shared, deterministic):
    cpu = make_problem(n=77, dim=dim, num_classes=50, k=40, dtype=dtype, shared=shared)
    cuda = to_cuda(make_problem(n=77, dim=dim, num_classes=50, k=40, dtype=dtype, shared=shared))
    kwargs = dict(remove_accidental_hits=True, reduction="sum")
    before = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(deterministic)
        result = loss_and_grads(run_fused, objective, cuda, **kwargs)
    finally:
        torch.use_deterministic_algorithms(before)
    assert_agree(loss_and_grads(run_fused, objective, cpu, **kwargs), result, dtype, objective)


@pytest.mark.parametrize("k", [1, 33, 1000])
def test_cuda_any_k_and_many_repeats(k):
    """k above the warp size and far above V: every class is hit many times per row."""
    cpu = make_problem(n=300, dim=32, num_classes=7, k=k)
    cuda = to_cuda(make_problem(n=300, dim=32, num_classes=7, k=k))
    for objective in OBJECTIVES:
        assert_agree(loss_and_grads(run_fused, objective, cpu),
                     loss_and_grads(run_fused, objective, cuda), torch.float32, objective)


def test_cuda_non_contiguous_and_empty():
    p = to_cuda(make_problem(n=40, dim=32))
    wide = torch.randn(40, 64, device="cuda")[:, ::2]
    wide.copy_(p.hidden)
    loss = fused_nce.nce_loss(wide, p.weight, p.bias, p.target, p.sampler, negatives=p.negatives)
    expected = fused_nce.nce_loss(p.hidden, p.weight, p.bias, p.target, p.sampler,
                                  negatives=p.negatives)
    torch.testing.assert_close(loss, expected)
    empty = fused_nce.nce_loss(p.hidden[:0], p.weight, p.bias, p.target[:0], p.sampler,
                               negatives=p.negatives[:0], reduction="sum")
    assert empty.item() == 0.0


@pytest.mark.parametrize("shared", [False, True], ids=["per_example", "shared"])
def test_cuda_touched_rows_match_cpu(shared):
    cpu = make_problem(n=50, dim=16, num_classes=300, k=8, dtype=torch.float64, shared=shared)
    cuda = to_cuda(make_problem(n=50, dim=16, num_classes=300, k=8, dtype=torch.float64,
                                shared=shared))
    results = []
    for p in [cpu, cuda]:
        log_z = torch.tensor(0.1, dtype=torch.float64, device=p.hidden.device)
        _, coef = ops.sampled_loss_forward(p.hidden, p.weight, p.bias, p.target, p.negatives,
                                           p.sampler.probs, log_z, 0, True, -100)
        grad_loss = torch.linspace(0.5, 1.5, 50, dtype=torch.float64, device=p.hidden.device)
        results.append(ops.sampled_loss_backward_rows(grad_loss, coef, p.hidden, p.weight, True,
                                                      p.target, p.negatives, -100))
    for a, b in zip(*results):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-12, atol=1e-12)


def test_cuda_alias_table_is_built_on_the_device():
    weights = fused_nce.log_uniform_weights(100_003)
    weights[::10] = 0
    cpu = ops.alias_build(weights)
    cuda = ops.alias_build(weights.cuda())
    assert cuda.is_cuda
    # Same construction; only the order of the prefix sums' additions may differ.
    keep_cpu, keep_cuda = (cpu & 0xFFFFFFFF).double(), (cuda.cpu() & 0xFFFFFFFF).double()
    assert (keep_cpu - keep_cuda).abs().max().item() <= 2.0**32 * 1e-9
    gives = keep_cuda < 0xFFFFFFFF
    assert not bool((weights[(cuda.cpu() >> 32)[gives]] == 0).any())


def test_cuda_draws_follow_the_seed_and_the_generator():
    sampler = fused_nce.AliasSampler(torch.rand(1000) + 0.1, device="cuda")
    torch.manual_seed(5)
    a = sampler.sample(10_000)
    torch.manual_seed(5)
    assert torch.equal(sampler.sample(10_000), a)
    assert not torch.equal(sampler.sample(10_000), a)
    g = torch.Generator("cuda").manual_seed(5)
    b = sampler.sample(10_000, generator=g)
    assert torch.equal(sampler.sample(10_000, generator=torch.Generator("cuda").manual_seed(5)), b)


def test_cuda_sampling_is_captured_by_a_cuda_graph():
    sampler = fused_nce.AliasSampler(torch.rand(500) + 0.1, device="cuda")
    sampler.sample(64)  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        draws = sampler.sample(4096)
    graph.replay()
    first = draws.clone()
    graph.replay()
    assert not torch.equal(draws, first), "each replay must draw afresh"
    assert int(draws.min()) >= 0 and int(draws.max()) < 500


@pytest.mark.parametrize("bad_line", ["t[1] = 10", "n[1, 2] = -1", "n[3, 0] = 10**12"])
def test_cuda_bad_index_is_a_device_assert_not_a_crash(bad_line):
    """A bad index stops the kernel with a device-side assert (in a subprocess: it poisons the
    CUDA context) instead of reading out of bounds."""
    code = textwrap.dedent(f"""
        import torch, fused_nce
        h, w = torch.randn(4, 8, device="cuda"), torch.randn(10, 8, device="cuda")
        t = torch.tensor([1, 2, 3, 4], device="cuda")
        n = torch.randint(10, (4, 3), device="cuda")
        {bad_line}
        fused_nce.negative_sampling_loss(h, w, None, t, negatives=n).item()
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode != 0
    assert "assert" in (result.stderr + result.stdout).lower()
