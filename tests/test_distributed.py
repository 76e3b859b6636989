"""fused_nce.distributed over real processes (gloo): loss and every gradient equal the
single-process fused_nce result on the whole output layer, for 2 and 3 ranks, even and uneven
splits (a rank may own no rows). Each launch runs many cases; each rank compares its own results
and returns the failures."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import fused_nce
import fused_nce.distributed as fd
from dist_helpers import run_ranks

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

N, D, K = 7, 5, 4
IGNORE = -100
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=2e-5, atol=2e-6)}
FUNCS = {"nce": (fused_nce.nce_loss, fd.nce_loss),
         "negative_sampling": (fused_nce.negative_sampling_loss, fd.negative_sampling_loss),
         "sampled_softmax": (fused_nce.sampled_softmax_loss, fd.sampled_softmax_loss)}


def make_inputs(v: int, dtype: torch.dtype, seed: int, ignore: bool):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=g, dtype=torch.float64).to(dtype)
    weight = torch.randn(v, D, generator=g, dtype=torch.float64).to(dtype)
    bias = torch.randn(v, generator=g, dtype=torch.float64).to(dtype)
    target = torch.randint(v, (N,), generator=g)
    if ignore:
        target[1] = target[4] = IGNORE
    noise = torch.rand(v, generator=g, dtype=torch.float64) + 0.1
    upstream = torch.randn(N, generator=g, dtype=torch.float64)  # weights a "none" loss
    return hidden, weight, bias, target, noise, upstream


def leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(True)


def run_case(v, objective, shared, with_bias, log_z, ignore, hits, reduction, dtype, sparse,
             explicit, seed, rank):
    """Returns the list of mismatches (empty when the distributed result equals the local one)."""
    start, end = fd.shard_range(v)
    hidden, weight, bias, target, noise, upstream = make_inputs(v, dtype, seed, ignore)
    local_fn, dist_fn = FUNCS[objective]
    kwargs = dict(shared_negatives=shared, remove_accidental_hits=hits, ignore_index=IGNORE,
                  reduction=reduction, sparse_grad=sparse)
    if explicit:
        g = torch.Generator().manual_seed(seed + 1)
        kwargs["negatives"] = torch.randint(v, (K,) if shared else (N, K), generator=g)
    else:
        kwargs["num_negatives"] = K
    results = []
    for distributed in (False, True):
        h, w = leaf(hidden), leaf(weight if not distributed else weight[start:end])
        b = (leaf(bias if not distributed else bias[start:end])) if with_bias else None
        extra = dict(kwargs)
        lz = None
        if objective == "nce":
            lz = leaf(torch.tensor(0.3, dtype=torch.float64)) if log_z == "learned" else None
            extra["log_z"] = lz if lz is not None else log_z
        if distributed:
            extra["num_classes"] = v
        torch.manual_seed(seed)  # the same draws on every rank and in the local run
        loss = (dist_fn if distributed else local_fn)(h, w, b, target, noise, **extra)
        (loss * upstream.to(loss.dtype)).sum().backward() if reduction == "none" else loss.backward()
        grads = {"hidden": h.grad, "weight": w.grad.to_dense(),
                 "bias": b.grad.to_dense() if b is not None else None,
                 "log_z": lz.grad if lz is not None else None}
        if distributed and sparse:
            assert w.grad.is_sparse
        results.append((loss.detach(), grads))
    (loss0, g0), (loss1, g1) = results
    problems = []
    tol = TOL[dtype]

    def compare(name, actual, expected):
        try:
            torch.testing.assert_close(actual, expected, **tol)
        except AssertionError as error:
            problems.append(f"{name}: {str(error).splitlines()[0:3]}")

    compare("loss", loss1, loss0)
    compare("hidden", g1["hidden"], g0["hidden"])
    compare("weight", g1["weight"], g0["weight"][start:end])
    if with_bias:
        compare("bias", g1["bias"], g0["bias"][start:end])
    if g0["log_z"] is not None:
        compare("log_z", g1["log_z"], g0["log_z"])
    if not bool(torch.isfinite(loss0).all()) or float(g0["hidden"].abs().sum()) == 0:
        problems.append("degenerate case: the reference is not finite or has no gradient")
    return problems


def grid(v: int):
    """Every objective x shared x bias x ignore_index x hits (float64), reductions and NCE's
    log_z (0, a constant, learned) taken in turn, plus a float32 / sparse_grad / explicit
    negatives sample."""
    cases = []
    product = itertools.product(FUNCS, (False, True), (False, True), (False, True), (False, True))
    for index, (objective, shared, with_bias, ignore, hits) in enumerate(product):
        reduction = ("mean", "sum", "none")[index % 3]
        log_z = (0.0, 0.7, "learned")[index % 3 if objective == "nce" else 0]
        cases.append((v, objective, shared, with_bias, log_z, ignore, hits, reduction,
                      torch.float64, False, False))
    for objective, shared in itertools.product(FUNCS, (False, True)):
        cases.append((v, objective, shared, True, "learned" if objective == "nce" else 0.0, True,
                      True, "mean", torch.float32, False, False))
        cases.append((v, objective, shared, True, 0.0, True, False, "sum", torch.float64, True,
                      False))
        cases.append((v, objective, shared, False, 0.0, False, True, "none", torch.float64,
                      False, True))
    return cases


def check_grid(rank: int, num_classes: list) -> list:
    failures = []
    for v in num_classes:
        for index, case in enumerate(grid(v)):
            problems = run_case(*case, seed=1000 * v + index, rank=rank)
            if problems:
                failures.append(f"rank {rank} case {case}: {problems}")
    return failures


def check_dtensor(rank: int, world_size: int) -> list:
    """A DTensor weight / bias placed Shard(0) on a 1-D mesh instead of the local shard and a
    group: the same loss, and gradients that come back as DTensors of the same placement."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    failures = []
    v = 10
    mesh = init_device_mesh("cpu", (world_size,))
    hidden, weight, bias, target, noise, _ = make_inputs(v, torch.float64, 11, ignore=True)
    negatives = torch.randint(v, (N, K), generator=torch.Generator().manual_seed(12))
    w = distribute_tensor(weight, mesh, [Shard(0)]).requires_grad_()
    b = distribute_tensor(bias, mesh, [Shard(0)]).requires_grad_()
    h = leaf(hidden)
    loss = fd.sampled_softmax_loss(h, w, b, target, noise, negatives=negatives,
                                   ignore_index=IGNORE)
    loss.backward()
    h0, w0, b0 = leaf(hidden), leaf(weight), leaf(bias)
    expected = fused_nce.sampled_softmax_loss(h0, w0, b0, target, noise, negatives=negatives,
                                              ignore_index=IGNORE)
    expected.backward()
    start, end = fd.shard_range(v)
    try:
        torch.testing.assert_close(loss, expected, **TOL[torch.float64])
        torch.testing.assert_close(h.grad, h0.grad, **TOL[torch.float64])
        assert tuple(w.grad.placements) == (Shard(0),)
        torch.testing.assert_close(w.grad.to_local(), w0.grad[start:end], **TOL[torch.float64])
        torch.testing.assert_close(b.grad.to_local(), b0.grad[start:end], **TOL[torch.float64])
        full = fd.full_softmax_loss(hidden, w.detach(), None, target, ignore_index=IGNORE,
                                    num_classes=v)
        torch.testing.assert_close(full, fused_nce.full_softmax_loss(
            hidden, weight, None, target, ignore_index=IGNORE), **TOL[torch.float64])
    except AssertionError as error:
        failures.append(f"rank {rank} DTensor: {error}")
    return failures


def check_compiled(rank: int) -> list:
    """torch.compile over a step with a model, each vocab-parallel loss and the full softmax:
    the same losses and gradients as eager, and the graph breaks only where the collectives run
    (the model, the sampling and the reduction stay compiled)."""
    failures = []
    v = 9
    start, end = fd.shard_range(v)
    hidden, weight, bias, target, noise, _ = make_inputs(v, torch.float32, 21, ignore=True)
    sampler = fused_nce.AliasSampler(noise)
    torch.manual_seed(0)  # the same replicated layer on every rank
    layer = torch.nn.Linear(D, D)
    w, b = leaf(weight[start:end]), leaf(bias[start:end])

    def step(x, t):
        h = torch.tanh(layer(x))
        return (fd.nce_loss(h, w, b, t, sampler, num_negatives=K, ignore_index=IGNORE)
                + fd.sampled_softmax_loss(h, w, b, t, sampler, num_negatives=K,
                                          shared_negatives=True, ignore_index=IGNORE)
                + fd.full_softmax_loss(h, w, b, t, num_classes=v, ignore_index=IGNORE))

    def run(fn):
        for p in (w, b, *layer.parameters()):
            p.grad = None
        torch.manual_seed(5)
        loss = fn(hidden, target)
        loss.backward()
        return [loss.detach()] + [p.grad.clone() for p in (w, b, *layer.parameters())]

    torch._dynamo.reset()
    expected, actual = run(step), run(torch.compile(step))
    for name, a, e in zip(["loss", "weight", "bias", "layer.weight", "layer.bias"], actual,
                          expected):
        if not torch.allclose(a, e, rtol=1e-5, atol=1e-6):
            failures.append(f"rank {rank} compiled {name} differs from eager")
    explanation = torch._dynamo.explain(step)(hidden, target)
    reasons = [str(r.reason) for r in explanation.break_reasons]
    if not reasons or any("_sharded_apply" not in r and "_full_softmax_apply" not in r
                          for r in reasons):
        failures.append(f"rank {rank} graph breaks outside the collectives: {reasons}")
    return failures


def check_positives_and_hard(rank: int, num_classes: list) -> list:
    """Several positives (padded), hard negatives, per-example weights and gBCE: the
    vocab-parallel losses equal the single-process ones, every objective, shared or not."""
    failures = []
    funcs = dict(FUNCS, gbce=(fused_nce.gbce_loss, fd.gbce_loss))
    for v in num_classes:
        start, end = fd.shard_range(v)
        for index, (objective, shared) in enumerate(itertools.product(funcs, (False, True))):
            hidden, weight, bias, target, noise, upstream = make_inputs(v, torch.float64,
                                                                        70 + index, ignore=True)
            g = torch.Generator().manual_seed(index)
            several = torch.randint(v, (N, 3), generator=g)
            several[:, 0] = target
            several[::3, 2] = IGNORE
            hard = torch.randint(v, (N, 2), generator=g)
            hard[::2, 1] = IGNORE
            weights = torch.rand(N, generator=g, dtype=torch.float64)
            negatives = torch.randint(v, (K,) if shared else (N, K), generator=g)
            extra = dict(negatives=negatives, sample_weight=weights, ignore_index=IGNORE,
                         sparse_grad=index % 2 == 1, remove_accidental_hits=True)
            if objective != "nce":
                extra["hard_negatives"] = hard
            if objective == "gbce":
                extra["t"] = 0.5
            local_fn, dist_fn = funcs[objective]
            results = []
            for distributed in (False, True):
                h = leaf(hidden)
                w = leaf(weight[start:end] if distributed else weight)
                b = leaf(bias[start:end] if distributed else bias)
                kw = dict(extra, num_classes=v) if distributed else extra
                loss = (dist_fn if distributed else local_fn)(h, w, b, several, noise, **kw)
                loss.backward()
                results.append((loss.detach(), h.grad, w.grad.to_dense(), b.grad.to_dense()))
            (l0, h0, w0, b0), (l1, h1, w1, b1) = results
            try:
                tol = TOL[torch.float64]
                torch.testing.assert_close(l1, l0, **tol)
                torch.testing.assert_close(h1, h0, **tol)
                torch.testing.assert_close(w1, w0[start:end], **tol)
                torch.testing.assert_close(b1, b0[start:end], **tol)
            except AssertionError as error:
                failures.append(f"rank {rank} V={v} {objective} shared={shared}: "
                                f"{str(error).splitlines()[:3]}")
    return failures


def check_all(rank: int, world_size: int, num_classes: list, bad_input: bool) -> list:
    """Everything one launch checks (process start-up costs more than all the cases)."""
    failures = check_grid(rank, num_classes) + check_full_softmax_and_sgd(rank)
    failures += check_positives_and_hard(rank, num_classes)
    failures += check_dtensor(rank, world_size)
    failures += check_compiled(rank) if world_size == 2 else []
    return failures + (check_bad_input(rank) if bad_input else [])


# P = 2 and 3 ranks; V = 10 over 3 is uneven (4, 4, 2) and V = 2 over 3 leaves a rank no rows.
@pytest.mark.parametrize("world_size,num_classes,bad_input", [(2, [9], False), (3, [10, 2], True)],
                         ids=["P2-V9", "P3-V10-V2"])
def test_equals_single_process(world_size, num_classes, bad_input):
    for failures in run_ranks(check_all, world_size, num_classes, bad_input):
        assert not failures, "\n".join(failures[:10])


def check_full_softmax_and_sgd(rank: int) -> list:
    failures = []
    v = 11
    start, end = fd.shard_range(v)
    for dtype, with_bias, reduction, chunk in itertools.product(
            (torch.float64, torch.float32), (False, True), ("mean", "sum", "none"), (None, 2)):
        hidden, weight, bias, target, _, upstream = make_inputs(v, dtype, 7, ignore=True)
        h, w = leaf(hidden), leaf(weight[start:end])
        b = leaf(bias[start:end]) if with_bias else None
        loss = fd.full_softmax_loss(h, w, b, target, num_classes=v, reduction=reduction,
                                    ignore_index=IGNORE, chunk_size=chunk)
        h0, w0 = leaf(hidden), leaf(weight)
        b0 = leaf(bias) if with_bias else None
        logits = F.linear(h0.double(), w0.double(), b0.double() if with_bias else None)
        expected = F.cross_entropy(logits, target, ignore_index=IGNORE, reduction=reduction)
        if reduction == "none":
            (loss * upstream.to(loss.dtype)).sum().backward()
            (expected * upstream).sum().backward()
        else:
            loss.backward()
            expected.backward()
        try:
            tol = TOL[dtype]
            torch.testing.assert_close(loss.double(), expected, **tol)
            torch.testing.assert_close(h.grad.double(), h0.grad.double(), **tol)
            torch.testing.assert_close(w.grad.double(), w0.grad[start:end].double(), **tol)
            if with_bias:
                torch.testing.assert_close(b.grad.double(), b0.grad[start:end].double(), **tol)
        except AssertionError as error:
            failures.append(f"full softmax {dtype} {with_bias} {reduction} {chunk}: {error}")
    # sparse_grad=True with torch.optim.SGD on each shard: the same steps as one process.
    hidden, weight, bias, target, noise, _ = make_inputs(v, torch.float64, 3, ignore=False)
    shard = torch.nn.Parameter(weight[start:end].clone())
    full = torch.nn.Parameter(weight.clone())
    opts = [torch.optim.SGD([shard], lr=0.5), torch.optim.SGD([full], lr=0.5)]
    for step in range(3):
        for param, opt, fn in ((shard, opts[0], fd.nce_loss), (full, opts[1], fused_nce.nce_loss)):
            opt.zero_grad()
            torch.manual_seed(step)
            fn(hidden, param, None, target, noise, num_negatives=K, sparse_grad=True).backward()
            opt.step()
    if not torch.allclose(shard.detach(), full.detach()[start:end], rtol=1e-12, atol=1e-12):
        failures.append("sparse SGD on the shards differs from SGD on the whole layer")
    if torch.equal(full.detach(), weight):
        failures.append("SGD did not move the weights")
    return failures


def expect_error(call, kind, words):
    try:
        call()
    except kind as error:
        missing = [w for w in words if w not in str(error)]
        return [f"{kind.__name__} without {missing}: {error}"] if missing else []
    except Exception as error:  # noqa: BLE001
        return [f"expected {kind.__name__}, got {type(error).__name__}: {error}"]
    return [f"expected {kind.__name__}, nothing raised"]


def check_bad_input(rank: int) -> list:
    v = 10
    start, end = fd.shard_range(v)
    hidden, weight, bias, target, noise, _ = make_inputs(v, torch.float64, 5, ignore=False)
    w = weight[start:end]
    problems = []
    # One rank passes a shard of the wrong size: it names weight, the others stop too.
    bad = weight[start:end + 1] if rank == 1 else w
    problems += expect_error(lambda: fd.nce_loss(hidden, bad, None, target, noise, num_negatives=K),
                             ValueError if rank == 1 else RuntimeError,
                             ["weight", f"[{start}, {end})"] if rank == 1 else ["rank(s) [1]"])
    # Ranks disagree on V.
    v_r = v + (rank == 0)
    s_r, e_r = fd.shard_range(v_r)
    problems += expect_error(
        lambda: fd.negative_sampling_loss(hidden, torch.zeros(e_r - s_r, D, dtype=torch.float64),
                                          None, target, num_classes=v_r,
                                          negatives=torch.zeros(N, K, dtype=torch.long)),
        ValueError, ["num_classes"])
    # Generators seeded differently draw different negatives: caught before any reduction.
    torch.manual_seed(rank)
    problems += expect_error(lambda: fd.sampled_softmax_loss(hidden, w, None, target, noise,
                                                             num_negatives=K),
                             ValueError, ["negatives", "seed"])
    # An index outside the global V is an error, not another rank's row.
    negs = torch.full((N, K), v)
    problems += expect_error(lambda: fd.nce_loss(hidden, w, None, target, noise, negatives=negs),
                             ValueError, ["negatives"])
    # The collectives still work after the errors above.
    loss = fd.nce_loss(hidden, w, None, target, noise, negatives=torch.zeros(N, K, dtype=torch.long))
    if not torch.isfinite(loss):
        problems.append("no loss after the errors")
    return problems


def test_no_group():
    if dist.is_initialized():
        pytest.skip("a default group exists in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        fd.shard_range(10)
    with pytest.raises(RuntimeError, match="init_process_group"):
        fd.nce_loss(torch.zeros(2, 3), torch.zeros(5, 3), None, torch.zeros(2, dtype=torch.long),
                    torch.ones(5), num_negatives=2)


def test_shard_ops_opcheck_and_sum_over_shards(device):
    """The shard ops in one process (each device's kernels): every shard's part adds up to the
    single-device loss and gradients, the ops pass torch.library.opcheck, and an index outside the
    global V raises (on the CPU; CUDA checks it in the kernel, a device-side assert)."""
    from fused_nce._ops import ops

    v, shards = 10, [(0, 4), (4, 8), (8, 10), (10, 10)]
    inputs = make_inputs(v, torch.float64, 11, ignore=True)
    hidden, weight, bias, target, noise, _ = (t.to(device) for t in inputs)
    q = noise / noise.sum()
    negs = torch.randint(v, (N, K), generator=torch.Generator().manual_seed(0)).to(device)
    log_z = torch.tensor(0.2, dtype=torch.float64, device=device)
    # One positive (NCE), and several positives with hard negatives and a positive weight (negative
    # sampling, as gBCE calls it); padding in both.
    g = torch.Generator().manual_seed(1)
    several = torch.randint(v, (N, 3), generator=g)
    several[:, 0] = target.cpu()
    several[1::4, 1:] = IGNORE
    hard = torch.randint(v, (N, 2), generator=g)
    hard[::3, 1] = IGNORE
    for tgt, hard_negs, objective, positive_weight in [
            (target, None, 0, 1.0), (several.to(device), hard.to(device), 1, 0.4)]:
        loss, coef = ops.sampled_loss_forward(hidden, weight, bias, tgt, negs, hard_negs, q, log_z,
                                              objective, positive_weight, True, IGNORE)
        grad_loss = torch.rand(N, dtype=torch.float64).to(device)
        gh, gw, gb = ops.sampled_loss_backward(grad_loss, coef, hidden, weight, True, tgt, negs,
                                               hard_negs, IGNORE)
        total, total_gh = torch.zeros_like(loss), torch.zeros_like(gh)
        for start, end in shards:
            args = (hidden, weight[start:end], bias[start:end], tgt, negs, hard_negs, q, log_z,
                    objective, positive_weight, True, IGNORE, start, v)
            part, part_coef = ops.shard_loss_forward(*args)
            total += part
            for mode in (0, 1, 2):
                bargs = (grad_loss, part_coef, hidden, weight[start:end], True, tgt, negs,
                         hard_negs, IGNORE, start, v, mode)
                part_gh, rows, part_gw, part_gb = ops.shard_loss_backward(*bargs)
                if mode == 0:
                    total_gh += part_gh
                    torch.testing.assert_close(part_gw, gw[start:end])
                    torch.testing.assert_close(part_gb, gb[start:end])
                if mode == 1:
                    torch.testing.assert_close(part_gw, gw[start:end][rows])
                torch.library.opcheck(ops.shard_loss_backward, bargs)
            torch.library.opcheck(ops.shard_loss_forward, args)
        torch.testing.assert_close(total, loss)
        torch.testing.assert_close(total_gh, gh)
    if device.type != "cpu":
        return
    bad = negs.clone()
    bad[2, 1] = v
    with pytest.raises(ValueError, match="negatives"):
        ops.shard_loss_forward(hidden, weight[:4], bias[:4], target, bad, None, q, log_z, 0, 1.0,
                               True, IGNORE, 0, v)
    with pytest.raises(ValueError, match="do not fit"):
        ops.shard_loss_forward(hidden, weight[:4], bias[:4], target, negs, None, q, log_z, 0, 1.0,
                               True, IGNORE, 8, v)
