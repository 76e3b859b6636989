"""CUDA kernels against the CPU kernels: every path of the CUDA code (vector and scalar loads,
atomic and sorted scatter, shared GEMMs, device-built alias tables, Philox draws)."""

import subprocess
import sys
import textwrap

import pytest
import torch

import fused_nce
from conftest import DTYPES, OBJECTIVES
from helpers import (TOLERANCE, chi_square, chi_square_p_upper, deterministic_algorithms,
                     loss_and_grads, make_problem, run_fused, table_error_bound, table_probs)

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
    with deterministic_algorithms(deterministic):
        result = loss_and_grads(run_fused, objective, cuda, **kwargs)
    assert_agree(loss_and_grads(run_fused, objective, cpu, **kwargs), result, dtype, objective)


@pytest.mark.parametrize("k", [1, 33, 1000])
def test_cuda_any_k_and_many_repeats(k):
    """k above the warp size and far above V: every class is hit many times per row. Against
    float64: at k = 1000 each of the 7 weight rows sums ~43,000 float32 terms (atomics, in no
    fixed order), so the gradient tolerance grows with the square root of that count."""
    exact = make_problem(n=300, dim=32, num_classes=7, k=k, dtype=torch.float64)
    cuda = to_cuda(make_problem(n=300, dim=32, num_classes=7, k=k))
    terms_per_row = 300 * (1 + k) / 7
    loss_tol, grad_tol = TOLERANCE[torch.float32]
    grad_tol *= max(1.0, (terms_per_row / 1000) ** 0.5)
    for objective in OBJECTIVES:
        (loss64, grads64), (loss, grads) = (loss_and_grads(run_fused, objective, p)
                                            for p in (exact, cuda))
        torch.testing.assert_close(loss.cpu().double(), loss64, rtol=loss_tol, atol=loss_tol)
        for name, g, g64 in zip(["hidden", "weight", "bias"], grads, grads64):
            torch.testing.assert_close(g.cpu().double(), g64, rtol=grad_tol, atol=grad_tol,
                                       msg=lambda m: f"{objective} grad {name}: {m}")


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
                                           None, p.sampler.probs, log_z, 0, 1.0, True, -100)
        grad_loss = torch.linspace(0.5, 1.5, 50, dtype=torch.float64, device=p.hidden.device)
        results.append(ops.sampled_loss_backward_rows(grad_loss, coef, p.hidden, p.weight, True,
                                                      p.target, p.negatives, None, -100))
    for a, b in zip(*results):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-12, atol=1e-12)


def test_cuda_alias_table_is_built_on_the_device():
    weights = fused_nce.log_uniform_weights(100_003)
    weights[::10] = 0
    cpu = ops.alias_build(weights)
    cuda = ops.alias_build(weights.cuda())
    assert cuda.is_cuda
    # Both tables are valid; their prefix sums round differently (sequential on the CPU, a
    # parallel scan on the GPU), so compare the distributions they encode, not threshold bits.
    expected = weights / weights.sum()
    for table in [cpu, cuda]:
        assert bool(((table_probs(table) - expected).abs() <= table_error_bound(table)).all())
    gives = (cuda.cpu() & 0xFFFFFFFF) < 0xFFFFFFFF
    assert not bool((weights[(cuda.cpu() >> 32)[gives]] == 0).any())


@pytest.mark.parametrize("num_classes", [10_000_000, 2**24 - 3])
def test_cuda_alias_sampler_at_large_vocabularies(num_classes):
    """V = 1e7 and just below 2^24 (where torch.multinomial stops): the table encodes the
    distribution within its rounding bound, and 2e7 draws pass a chi-square test over 1,000
    groups of classes of equal mass."""
    weights = fused_nce.log_uniform_weights(num_classes).cuda()
    sampler = fused_nce.AliasSampler(weights)
    expected = (weights / weights.sum()).cpu()
    assert bool(((table_probs(sampler.table) - expected).abs()
                 <= table_error_bound(sampler.table)).all())
    torch.manual_seed(0)
    draws = sampler.sample(20_000_000)
    groups = 1000
    edges = torch.cumsum(expected, 0)
    group_of = torch.searchsorted(edges, torch.linspace(0, 1, groups + 1)[1:-1].double())
    group_of = torch.bucketize(torch.arange(num_classes), group_of, right=True)
    group_probs = torch.zeros(groups, dtype=torch.float64).index_add_(0, group_of, expected)
    statistic, dof = chi_square(group_of.cuda()[draws], group_probs)
    assert chi_square_p_upper(statistic, dof) > 1e-4, (statistic, dof)


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


@pytest.mark.parametrize("bad_line", ["t[1] = 10", "n[1, 2] = -1", "n[3, 0] = 10**12",
                                      "t[2] = -100; n[2, 1] = 10"])
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shared", [False, True], ids=["per_example", "shared"])
@pytest.mark.parametrize("dim", [1027, 1024])
def test_cuda_misaligned_views_and_wide_rows(dtype, shared, dim):
    """D >= 1024, not a multiple of 8, and weight / hidden views starting one element into a
    wider matrix (read in place: narrower vectors and the scalar tail) give the CPU's results."""
    p = make_problem(n=45, dim=dim, num_classes=90, k=20, dtype=dtype, shared=shared)
    expected = {o: loss_and_grads(run_fused, o, p) for o in OBJECTIVES}
    q = to_cuda(make_problem(n=45, dim=dim, num_classes=90, k=20, dtype=dtype, shared=shared))
    for objective in OBJECTIVES:
        leaves = []
        for t in [q.hidden, q.weight]:
            wide = torch.zeros(t.shape[0], dim + 3, dtype=dtype, device="cuda")
            wide[:, 1:dim + 1] = t
            leaves.append(wide.requires_grad_())
        bias = q.bias.clone().requires_grad_()
        hidden, weight = (wide[:, 1:dim + 1] for wide in leaves)
        assert weight.storage_offset() == 1 and not weight.is_contiguous()
        loss = run_fused(objective, q, [hidden, weight, bias])
        loss.backward(torch.linspace(0.5, 1.5, loss.numel(), device="cuda").reshape(loss.shape))
        grads = [leaves[0].grad[:, 1:dim + 1], leaves[1].grad[:, 1:dim + 1], bias.grad]
        assert_agree(expected[objective], (loss.detach(), grads), dtype, objective)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shared", [False, True], ids=["per_example", "shared"])
def test_cuda_low_precision_wide_rows(dtype, shared):
    """bfloat16 / float16 at D = 640 (several register tiles a row) and a mean reduction over
    a large batch: the small coefficients of the shared GEMMs keep their precision."""
    kwargs = dict(n=600, dim=640, num_classes=300, k=64, dtype=dtype, shared=shared)
    cpu, cuda = make_problem(**kwargs), to_cuda(make_problem(**kwargs))
    for objective in OBJECTIVES:
        assert_agree(loss_and_grads(run_fused, objective, cpu, reduction="mean"),
                     loss_and_grads(run_fused, objective, cuda, reduction="mean"), dtype,
                     objective)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shared", [False, True], ids=["per_example", "shared"])
@pytest.mark.parametrize("sparse_grad", [False, True], ids=["dense", "sparse"])
def test_cuda_hot_rows_are_summed_in_chunks_deterministically(dtype, shared, sparse_grad):
    """A few classes take tens of thousands of entries each (longer than a chunk): the chunked
    sums equal the CPU's and are bitwise the same from run to run."""
    kwargs = dict(n=3000, dim=96, num_classes=7, k=40, dtype=dtype, shared=shared)
    cpu, cuda = make_problem(**kwargs), to_cuda(make_problem(**kwargs))
    with deterministic_algorithms():
        runs = [loss_and_grads(run_fused, "nce", cuda, sparse_grad=sparse_grad) for _ in range(2)]
    dense = [[g.to_dense() if g.is_sparse else g for g in grads] for _, grads in runs]
    for a, b in zip(*dense):
        assert torch.equal(a, b)
    expected_loss, expected_grads = loss_and_grads(run_fused, "nce", cpu)
    assert_agree((expected_loss, expected_grads), (runs[0][0], dense[0]), dtype, "hot rows")


def test_cuda_float32_shared_gemms_ignore_tf32():
    """float32 means float32: with TF32 allowed globally, the shared-negative GEMMs still agree
    with float64 to float32 accuracy (TF32 would be off by ~1e-3 at D = 1024)."""
    kwargs = dict(n=256, dim=1024, num_classes=2000, k=512, shared=True)
    exact = make_problem(dtype=torch.float64, **kwargs)
    cuda = to_cuda(make_problem(**kwargs))
    allow, precision = torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision()
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.set_float32_matmul_precision("high")
        loss, grads = loss_and_grads(run_fused, "sampled_softmax", cuda, reduction="sum")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow
        torch.set_float32_matmul_precision(precision)
    expected_loss, expected_grads = loss_and_grads(run_fused, "sampled_softmax", exact,
                                                   reduction="sum")
    torch.testing.assert_close(loss.cpu().double(), expected_loss, rtol=1e-5, atol=1e-4)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g.cpu().double(), e, rtol=1e-4, atol=1e-5)


def gpu_memory_gb():
    return torch.cuda.get_device_properties(0).total_memory / 2**30


@pytest.mark.skipif(torch.cuda.is_available() and gpu_memory_gb() < 40, reason="needs 40 GB")
@pytest.mark.parametrize("sparse_grad", [False, True], ids=["dense", "sparse"])
def test_cuda_weight_beyond_2_31_elements(sparse_grad):
    """V * D > 2^31 (bfloat16, 4.3 GB): rows at the very end are read and written at the
    right place (64-bit offsets), against the CPU on just those rows."""
    num_classes, dim = 2**21 + 5, 1024
    torch.manual_seed(0)
    weight = torch.empty(num_classes, dim, dtype=torch.bfloat16, device="cuda").uniform_(-0.1, 0.1)
    rows = torch.arange(num_classes - 40, num_classes, device="cuda")
    hidden = torch.randn(16, dim, device="cuda").bfloat16()
    target = rows[:16]
    negatives = rows[16:].repeat(16, 1)[:, :12]
    weight.requires_grad_()
    loss = fused_nce.negative_sampling_loss(hidden, weight, None, target, negatives=negatives,
                                            reduction="sum", sparse_grad=sparse_grad)
    loss.backward()
    grad = weight.grad.coalesce().to_dense() if sparse_grad else weight.grad
    # The same problem on the CPU with the 40 rows renumbered 0..39.
    small = weight.detach()[rows].cpu().requires_grad_()
    base = num_classes - 40
    expected = fused_nce.negative_sampling_loss(hidden.cpu(), small, None, target.cpu() - base,
                                                negatives=negatives.cpu() - base, reduction="sum")
    expected.backward()
    torch.testing.assert_close(loss.cpu(), expected, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(grad[rows].cpu().float(), small.grad.float(), rtol=1.6e-2,
                               atol=1.6e-2)
    assert not grad[:base].any()


@pytest.mark.skipif(torch.cuda.is_available() and gpu_memory_gb() < 60, reason="needs 60 GB")
def test_cuda_more_than_2_31_entries():
    """N (1 + k) > 2^31 on the atomic path (float32): coefficient offsets past 2^31 are 64-bit.
    With zero weights every score is 0, so each row's gradient is a count times a constant."""
    n, k, num_classes, dim = 2**22, 512, 1_000_000, 4
    assert n * (1 + k) > 2**31
    hidden = torch.ones(n, dim, device="cuda")
    weight = torch.zeros(num_classes, dim, device="cuda", requires_grad=True)
    target = torch.arange(n, device="cuda") % num_classes
    negatives = torch.arange(n * k, device="cuda").remainder_(num_classes).view(n, k)
    noise = torch.ones(num_classes, device="cuda")
    loss = fused_nce.nce_loss(hidden, weight, None, target, noise, negatives=negatives,
                              reduction="sum")
    loss.backward()
    # d = -log(k / V) for every column: the target adds -sigmoid(-d), a negative sigmoid(d).
    d = -torch.log(torch.tensor(k / num_classes, dtype=torch.float64))
    neg_counts = torch.bincount(negatives.view(-1), minlength=num_classes).double()
    tgt_counts = torch.bincount(target, minlength=num_classes).double()
    per_row = neg_counts * torch.sigmoid(d) - tgt_counts * torch.sigmoid(-d)
    torch.testing.assert_close(weight.grad[:, 0].double(), per_row, rtol=1e-4, atol=1e-2)
    expected_loss = n * (torch.nn.functional.softplus(-d) + k * torch.nn.functional.softplus(d))
    torch.testing.assert_close(loss.double().cpu(), expected_loss, rtol=1e-4, atol=0)
    del negatives, loss


@pytest.mark.skipif(torch.cuda.is_available() and gpu_memory_gb() < 40, reason="needs 40 GB")
def test_cuda_sorted_path_refuses_too_many_entries_clearly():
    """bfloat16 (the sorted path) keys entries with int32: beyond 2^30 entries, a clear error
    before any work, not a wrong answer."""
    n, k = 2**21, 512
    hidden = torch.zeros(n, 8, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = torch.zeros(100, 8, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    target = torch.zeros(n, dtype=torch.int64, device="cuda")
    negatives = torch.zeros(n, k, dtype=torch.int64, device="cuda")
    loss = fused_nce.negative_sampling_loss(hidden, weight, None, target, negatives=negatives)
    with pytest.raises(ValueError, match="2\\^30 entries"):
        loss.backward()


def test_cuda_shared_negatives_with_more_row_tiles_than_a_grid_dimension_holds():
    """N > 65535 * 64 with shared negatives: the coefficient passes tile rows along the grid's
    x dimension, which has room for them (y would cap at 65,535 tiles)."""
    kwargs = dict(n=2**22 + 100, dim=8, num_classes=50, k=4, shared=True, ignore_every=0,
                  dtype=torch.float16)
    cpu, cuda = make_problem(**kwargs), to_cuda(make_problem(**kwargs))
    loss_cpu, grads_cpu = loss_and_grads(run_fused, "nce", cpu, reduction="mean")
    loss_cuda, grads_cuda = loss_and_grads(run_fused, "nce", cuda, reduction="mean")
    torch.testing.assert_close(loss_cuda.cpu(), loss_cpu, rtol=1e-4, atol=1e-4)
    for a, b in zip(grads_cpu, grads_cuda):
        torch.testing.assert_close(b.cpu().float(), a.float(), rtol=2e-2, atol=2e-3)
