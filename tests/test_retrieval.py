"""In-batch / mixed-negative softmax against the materialized reference, its ops, bad input, the
frequency estimator, and cross-rank negatives on 2 gloo processes against one process."""

import math

import pytest
import torch
import torch.distributed as dist

import fused_nce
from fused_nce import reference
from dist_helpers import run_ranks
from helpers import TOLERANCE

ops = torch.ops.fused_nce


def make_batch(n=23, dim=12, m=9, *, dtype=torch.float32, device="cpu", seed=0, num_items=15,
               scale=1.0):
    """A batch with repeated items (num_items < n + m), extras that repeat batch items, log q,
    and weights with zeros."""
    g = torch.Generator().manual_seed(seed)
    cast = dict(dtype=dtype, device=device)
    query = (scale * torch.randn(n, dim, generator=g, dtype=torch.float64) / dim ** 0.25)
    cands = (scale * torch.randn(n, dim, generator=g, dtype=torch.float64) / dim ** 0.25)
    extra = torch.randn(m, dim, generator=g, dtype=torch.float64) / dim ** 0.25
    ids = torch.randint(num_items, (n,), generator=g)
    extra_ids = torch.randint(num_items, (m,), generator=g)
    if m > 1:
        extra_ids[1] = extra_ids[0]  # a duplicate among the extras
    log_q = torch.log(torch.rand(n, generator=g, dtype=torch.float64) * 0.9 + 0.05)
    extra_log_q = torch.log(torch.rand(m, generator=g, dtype=torch.float64) * 0.9 + 0.05)
    weight = torch.rand(n, generator=g, dtype=torch.float64)
    weight[::5] = 0.0
    return dict(query=query.to(**cast), candidates=cands.to(**cast), candidate_ids=ids.to(device),
                extra_candidates=extra.to(**cast), extra_ids=extra_ids.to(device),
                log_q=log_q.to(device), extra_log_q=extra_log_q.to(device),
                sample_weight=weight.to(device))


def temperature_leaf(value, dtype, device):
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return torch.tensor(value, dtype=acc, device=device, requires_grad=True)


def loss_and_grads(fn, batch, temperature, **kwargs):
    """Loss and the gradients of query, candidates, extras and temperature."""
    leaves = {k: batch[k].detach().clone().requires_grad_()
              for k in ("query", "candidates", "extra_candidates")}
    t = temperature.detach().clone().requires_grad_()
    args = {**batch, **leaves, **kwargs}
    if kwargs.get("extra_candidates", True) is None:
        args.pop("extra_ids")
        args.pop("extra_log_q")
    q, c = args.pop("query"), args.pop("candidates")
    loss = fn(q, c, args.pop("candidate_ids"), temperature=t, **args)
    upstream = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype, device=loss.device)
    loss.backward(upstream.reshape(loss.shape))
    grads = [leaves["query"].grad, leaves["candidates"].grad, leaves["extra_candidates"].grad,
             t.grad]
    return loss.detach(), grads


def fused(query, candidates, ids, **kwargs):
    return fused_nce.in_batch_softmax_loss(query, candidates, ids, **kwargs)


def check_against_reference(batch, dtype, temperature=0.7, **kwargs):
    t = temperature_leaf(temperature, dtype, batch["query"].device)
    block = kwargs.pop("block_size", 0)
    loss, grads = loss_and_grads(fused, batch, t, block_size=block, **kwargs)
    ref_loss, ref_grads = loss_and_grads(reference.in_batch_softmax_loss, batch, t, **kwargs)
    loss_tol, grad_tol = TOLERANCE[dtype]
    torch.testing.assert_close(loss, ref_loss, rtol=max(loss_tol, 1e-6), atol=loss_tol)
    for name, g, r in zip(("query", "candidates", "extra_candidates", "temperature"), grads,
                          ref_grads):
        if r is None:
            assert g is None or not g.any(), name
            continue
        assert g is not None and g.dtype == r.dtype and g.shape == r.shape, name
        scale = r.double().abs().max().item()
        assert scale > 0, name
        tol = grad_tol * max(1.0, scale) if name == "temperature" else grad_tol
        torch.testing.assert_close(g.double(), r.double(), rtol=tol, atol=tol, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16],
                         ids=str)
@pytest.mark.parametrize("block_size", [0, 4], ids=["auto_block", "block4"])
def test_matches_reference(device, dtype, block_size):
    check_against_reference(make_batch(dtype=dtype, device=device), dtype, block_size=block_size)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("remove_hits", [True, False], ids=["remove_hits", "keep_hits"])
def test_options(device, reduction, remove_hits):
    check_against_reference(make_batch(device=device, seed=1, dtype=torch.float64), torch.float64,
                            block_size=5,
                            reduction=reduction, remove_accidental_hits=remove_hits)


def test_no_log_q_no_weights_no_extras(device):
    batch = make_batch(device=device, seed=2, dtype=torch.float64)
    check_against_reference(batch, torch.float64, block_size=3, log_q=None, extra_log_q=None,
                            sample_weight=None, extra_candidates=None)
    # Extras without their log q (only the in-batch columns corrected), and the other way round.
    check_against_reference(batch, torch.float64, block_size=3, extra_log_q=None)
    check_against_reference(batch, torch.float64, block_size=3, log_q=None)


def test_single_example(device):
    batch = make_batch(n=1, m=3, device=device, dtype=torch.float64)
    check_against_reference(batch, torch.float64, sample_weight=None)
    alone = make_batch(n=1, m=0, device=device, dtype=torch.float64)
    loss = fused(alone["query"], alone["candidates"], alone["candidate_ids"])
    assert loss.item() == 0.0  # one column: the positive


def test_accidental_hits_are_removed(device):
    """A duplicate of the positive (in the batch or among the extras) changes nothing when
    removed; kept, it is one more column."""
    batch = make_batch(n=4, m=2, device=device, dtype=torch.float64, num_items=1000, seed=3)
    q, c, ids = batch["query"], batch["candidates"], batch["candidate_ids"].clone()
    base = fused(q, c, ids, reduction="none")
    ids[1] = ids[0]
    removed = fused(q, c, ids, reduction="none")
    kept = fused(q, c, ids, reduction="none", remove_accidental_hits=False)
    assert torch.equal(removed[2:], base[2:]) and torch.equal(kept, base)
    assert (removed[:2] < base[:2]).all()  # one negative fewer for rows 0 and 1
    extra_ids = ids.new_tensor([ids[3].item(), 10_000])
    e = batch["extra_candidates"]
    with_hit = fused(q, c, ids, extra_candidates=e, extra_ids=extra_ids, reduction="none")
    only_other = fused(q, c, ids, extra_candidates=e[1:], extra_ids=extra_ids[1:],
                       reduction="none")
    torch.testing.assert_close(with_hit[3], only_other[3])
    assert not torch.allclose(with_hit[:3], only_other[:3])


def test_non_contiguous_inputs(device):
    batch = make_batch(device=device, dtype=torch.float64, seed=4)
    strided = dict(batch)
    for key in ("query", "candidates", "extra_candidates"):
        t = batch[key]
        wide = torch.zeros(t.shape[1], 2 * t.shape[0], dtype=t.dtype, device=t.device)
        wide[:, ::2] = t.T
        strided[key] = wide[:, ::2].T  # same values, strides (1, 2 * rows)
        assert not strided[key].is_contiguous()
    for key in ("candidate_ids", "extra_ids", "log_q", "sample_weight"):
        strided[key] = torch.stack([batch[key], batch[key]], 1)[:, 0]
    t = temperature_leaf(0.7, torch.float64, device)
    loss, grads = loss_and_grads(fused, strided, t, block_size=4)
    ref_loss, ref_grads = loss_and_grads(reference.in_batch_softmax_loss, batch, t)
    torch.testing.assert_close(loss, ref_loss)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)


def test_large_logits_stay_finite(device):
    """Scores of several thousand: a naive exp overflows even in float64; the float32 result
    matches float64."""
    batch = make_batch(device=device, scale=60.0, seed=5)
    t = temperature_leaf(0.05, torch.float32, device)
    loss, grads = loss_and_grads(fused, batch, t, block_size=4, reduction="none")
    batch64 = {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}
    ref_loss, _ = loss_and_grads(reference.in_batch_softmax_loss, batch64,
                                 temperature_leaf(0.05, torch.float64, device), reduction="none")
    assert ref_loss.abs().max() > 100
    assert all(torch.isfinite(g).all() for g in grads)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-4, atol=1e-2)


def test_temperature_float_equals_tensor(device):
    batch = make_batch(device=device)
    args = (batch["query"], batch["candidates"], batch["candidate_ids"])
    a = fused(*args, temperature=0.3)
    b = fused(*args, temperature=torch.tensor(0.3, device=device))
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, fused(*args))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gradcheck(device, seed):
    batch = make_batch(n=5, dim=4, m=3, dtype=torch.float64, device=device, seed=seed,
                       num_items=5)

    def loss(query, candidates, extra, temperature):
        return fused(query, candidates, batch["candidate_ids"], log_q=batch["log_q"],
                     extra_candidates=extra, extra_ids=batch["extra_ids"],
                     extra_log_q=batch["extra_log_q"], temperature=temperature,
                     sample_weight=batch["sample_weight"], reduction="none", block_size=3)

    inputs = (*(batch[k].clone().requires_grad_() for k in
                ("query", "candidates", "extra_candidates")),
              temperature_leaf(0.8, torch.float64, device))
    assert torch.autograd.gradcheck(loss, inputs)


def test_opcheck(device):
    batch = make_batch(n=7, m=4, device=device)
    columns = torch.cat([batch["candidates"], batch["extra_candidates"]])
    ids = torch.cat([batch["candidate_ids"], batch["extra_ids"]])
    log_q = torch.cat([batch["log_q"], batch["extra_log_q"]]).float()
    t = torch.tensor(0.5, device=device)
    args = (batch["query"], columns, log_q, ids, t, 0, True, 3)
    torch.library.opcheck(ops.in_batch_forward, args)
    _, lse = ops.in_batch_forward(*args)
    grad = torch.rand(7, device=device)
    torch.library.opcheck(ops.in_batch_backward,
                          (grad, batch["query"], columns, None, ids, t, lse, 2, False, 0))
    est = fused_nce.FrequencyEstimator(64).to(device)
    ids = torch.tensor([3, 5, 3, 90], device=device)
    state = (est.last_seen, est.gap, est.count)
    torch.library.opcheck(ops.frequency_update, (*state, ids, est.step, 0.1))
    torch.library.opcheck(ops.frequency_estimate, (*state, ids, est.step))


def test_compile(device):
    batch = make_batch(device=device)

    def step(query, candidates):
        return fused(query, candidates, batch["candidate_ids"], log_q=batch["log_q"])

    q = batch["query"].clone().requires_grad_()
    expected = step(q, batch["candidates"])
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = compiled(q, batch["candidates"])
    torch.testing.assert_close(got, expected)
    (g,) = torch.autograd.grad(got, q)
    (r,) = torch.autograd.grad(expected, q)
    torch.testing.assert_close(g, r)


BAD_INPUTS = [
    (dict(candidates=lambda b: b["candidates"][:-1]), ValueError, "candidates"),
    (dict(candidate_ids=lambda b: b["candidate_ids"].int()), TypeError, "candidate_ids"),
    (dict(candidate_ids=lambda b: b["candidate_ids"][:-1]), ValueError, "candidate_ids"),
    (dict(temperature=lambda b: 0.0), ValueError, "temperature"),
    (dict(temperature=lambda b: -1.0), ValueError, "temperature"),
    (dict(temperature=lambda b: torch.tensor(-0.5)), ValueError, "temperature"),
    (dict(temperature=lambda b: torch.ones(2)), ValueError, "temperature"),
    (dict(extra_candidates=lambda b: b["extra_candidates"]), ValueError, "extra_ids"),
    (dict(extra_ids=lambda b: b["extra_ids"]), ValueError, "extra_candidates"),
    (dict(extra_candidates=lambda b: b["extra_candidates"],
          extra_ids=lambda b: b["extra_ids"][:-1]), ValueError, "extra_ids"),
    (dict(extra_candidates=lambda b: b["extra_candidates"][:, :-1],
          extra_ids=lambda b: b["extra_ids"]), ValueError, "extra_candidates"),
    (dict(extra_candidates=lambda b: b["extra_candidates"],
          extra_ids=lambda b: b["extra_ids"].float()), TypeError, "extra_ids"),
    (dict(candidates=lambda b: b["candidates"].double()), TypeError, "candidates"),
    (dict(log_q=lambda b: b["log_q"][:-1]), ValueError, "log_q"),
    (dict(sample_weight=lambda b: b["sample_weight"][:, None]), ValueError, "sample_weight"),
    (dict(reduction=lambda b: "max"), ValueError, "reduction"),
    (dict(query=lambda b: b["query"].long()), TypeError, "query"),
    (dict(query=lambda b: b["query"][0]), ValueError, "query"),
]


@pytest.mark.parametrize("change,error,name", BAD_INPUTS, ids=[str(i) for i in
                                                               range(len(BAD_INPUTS))])
def test_bad_input(change, error, name):
    batch = make_batch()
    args = dict(query=batch["query"], candidates=batch["candidates"],
                candidate_ids=batch["candidate_ids"])
    for key, value in change.items():
        args[key] = value(batch)
    with pytest.raises(error, match=name):
        fused_nce.in_batch_softmax_loss(args.pop("query"), args.pop("candidates"),
                                        args.pop("candidate_ids"), **args)


def test_ops_check_shapes():
    """The ops themselves refuse out-of-range positives instead of reading past the columns."""
    q, cols = torch.randn(4, 3), torch.randn(5, 3)
    ids, t = torch.arange(5), torch.tensor(1.0)
    with pytest.raises(ValueError, match="positives"):
        ops.in_batch_forward(q, cols, None, ids, t, 2, True, 0)
    with pytest.raises(ValueError, match="column_ids"):
        ops.in_batch_forward(q, cols, None, ids[:4], t, 0, True, 0)
    with pytest.raises(ValueError, match="temperature"):
        ops.in_batch_forward(q, cols, None, ids, torch.tensor(0.0), 0, True, 0)


# ---- FrequencyEstimator

def zipf_probs(num_items, exponent=1.1):
    p = 1.0 / torch.arange(1, num_items + 1, dtype=torch.float64) ** exponent
    return p / p.sum()


def test_estimator_converges_on_zipf_stream(device):
    """Stationary Zipf stream, batches of 128 draws: for the 30 most frequent items, the
    estimated probability of being in a batch, 1 - (1 - p)^128, and the expected number of
    occurrences per batch, 128 p, are within 15%."""
    num_items, batch, steps = 5000, 128, 3000
    p = zipf_probs(num_items)
    truth = 1 - (1 - p) ** batch
    g = torch.Generator().manual_seed(0)
    est = fused_nce.FrequencyEstimator(2 ** 16, alpha=0.005).to(device)
    for _ in range(steps):
        est.update(torch.multinomial(p, batch, replacement=True, generator=g).to(device))
    top = torch.arange(30)
    estimate = est.log_prob(top.to(device)).exp().double().cpu()
    error = (estimate / truth[top] - 1).abs()
    assert error.max() < 0.15, error
    assert error[10:].mean() > 1e-3  # not trivially exact: those are not in every batch
    counts = est.log_expected_count(top.to(device)).exp().double().cpu()
    count_error = (counts / (batch * p[top]) - 1).abs()
    assert count_error.max() < 0.15, count_error
    assert counts[0] > 10  # the most frequent item: ~17 copies a batch, where the probability is 1
    never = est.log_prob(torch.tensor([10 ** 12], device=device))
    assert never.item() <= math.log(1 / steps) + 1e-6


def shifted_stream(est, probs, steps, g, device):
    for _ in range(steps):
        present = torch.rand(len(probs), generator=g, dtype=torch.float64) < probs
        est.update(torch.nonzero(present).squeeze(1).to(device))


def test_estimator_follows_popularity_shift(device):
    """Items 0-9 in a batch with probability 0.5 and 10-99 with 0.05, then 0-9 drop to 0.05 and
    10-19 rise to 0.5. The docstring's bound: within 11% in probability after
    ln(|r - 1| / 0.1) / alpha sightings at the new rate (r = old gap / new gap); checked on the
    group means against 15% (room for the average's noise)."""
    alpha = 0.02
    g = torch.Generator().manual_seed(1)
    est = fused_nce.FrequencyEstimator(2 ** 12, alpha=alpha).to(device)
    before = torch.full((100,), 0.05, dtype=torch.float64)
    before[:10] = 0.5
    after = before.clone()
    after[:10], after[10:20] = 0.05, 0.5
    shifted_stream(est, before, 1500, g, device)

    def group_error(items):
        estimate = est.log_prob(items.to(device)).exp().double().cpu()
        return (estimate.mean() / after[items].mean() - 1).abs().item()

    rising, falling = torch.arange(10, 20), torch.arange(10)

    def steps_needed(p_old, p_new):  # the bound's sightings times the new gap 1 / p_new
        ratio = p_new / p_old  # old gap / new gap
        return math.ceil(math.log(abs(ratio - 1) / 0.1) / alpha / p_new)

    rise, fall = steps_needed(0.05, 0.5), steps_needed(0.5, 0.05)
    assert rise < fall
    shifted_stream(est, after, rise // 10, g, device)
    assert group_error(rising) > 0.15  # not yet
    shifted_stream(est, after, rise - rise // 10, g, device)
    assert group_error(rising) < 0.15
    shifted_stream(est, after, fall - rise, g, device)
    assert group_error(falling) < 0.15
    assert group_error(rising) < 0.15


def test_estimator_duplicates_and_order(device):
    """Each distinct bucket takes one update per step with its number of occurrences: the state
    does not depend on the order of the ids, and repeats change the counts only."""
    ids = [torch.tensor([4, 7, 4, 4, 9, 7]), torch.tensor([9, 9, 1]), torch.tensor([4, 1, 1])]
    states = []
    for transform in (lambda x: x, lambda x: x.flip(0), torch.unique):
        est = fused_nce.FrequencyEstimator(32, alpha=0.1).to(device)
        for batch in ids:
            est.update(transform(batch).to(device))
        states.append(est.state_dict())
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key
        if key != "count":
            assert torch.equal(states[0][key], states[2][key]), key
    assert not torch.equal(states[0]["count"], states[2]["count"])
    est = fused_nce.FrequencyEstimator(1 << 10, alpha=0.5).to(device)
    for step in range(4):
        est.update(torch.tensor([1, 1, 1] + [2] * (step % 2), device=device))
    items = torch.tensor([1, 2], device=device)
    torch.testing.assert_close(est.log_prob(items).exp().cpu(), torch.tensor([1.0, 0.5]))
    torch.testing.assert_close(est.log_expected_count(items).exp().cpu(),
                               torch.tensor([3.0, 0.5]))


def test_estimator_hash_arrays_reduce_collision_bias():
    """With far fewer buckets than items, one array overestimates rare items; the longest gap
    over four arrays is closer."""
    probs = torch.full((400,), 0.01, dtype=torch.float64)
    probs[:20] = 0.5
    errors = []
    for arrays in (1, 4):
        g = torch.Generator().manual_seed(2)
        est = fused_nce.FrequencyEstimator(256, alpha=0.02, num_hashes=arrays)
        shifted_stream(est, probs, 1500, g, "cpu")
        estimate = est.log_prob(torch.arange(20, 400)).exp().double()
        errors.append((estimate.log() - math.log(0.01)).abs().mean().item())
    assert errors[1] < 0.7 * errors[0], errors


def test_estimator_state_dict_and_to():
    est = fused_nce.FrequencyEstimator(128, alpha=0.1)
    for step in range(5):
        est.update(torch.tensor([step, 3]))
    assert set(est.state_dict()) == {"last_seen", "gap", "count", "step"}
    copy = fused_nce.FrequencyEstimator(128, alpha=0.1)
    copy.load_state_dict(est.state_dict())
    ids = torch.arange(6)
    torch.testing.assert_close(copy.log_prob(ids), est.log_prob(ids))
    est.double()
    assert est.gap.dtype == est.count.dtype == torch.float32
    assert est.last_seen.dtype == torch.int64
    torch.testing.assert_close(est.log_prob(ids), copy.log_prob(ids))
    with pytest.raises(TypeError, match="ids"):
        est.update(torch.tensor([1.0]))
    with pytest.raises(ValueError, match="alpha"):
        fused_nce.FrequencyEstimator(8, alpha=0.0)
    with pytest.raises(ValueError, match="num_buckets"):
        fused_nce.FrequencyEstimator(0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_estimator_cuda_matches_cpu():
    g = torch.Generator().manual_seed(3)
    cpu, gpu = (fused_nce.FrequencyEstimator(512, alpha=0.05) for _ in range(2))
    gpu.cuda()
    for _ in range(50):
        ids = torch.randint(2000, (300,), generator=g)
        cpu.update(ids)
        gpu.update(ids.cuda())
    for key, value in cpu.state_dict().items():
        torch.testing.assert_close(gpu.state_dict()[key].cpu(), value, msg=key)


# ---- Cross-rank negatives: 2 gloo processes against one process with the whole batch

WORLD = 2


def global_batch():
    return make_batch(n=6 * WORLD, m=4, dtype=torch.float64, seed=7, num_items=9)


def run_loss(batch, rows, group=None):
    """Sum-reduced loss of `rows` of the batch; returns the loss and the gradients of query and
    candidates (rows), extras and temperature."""
    q = batch["query"][rows].clone().requires_grad_()
    c = batch["candidates"][rows].clone().requires_grad_()
    e = batch["extra_candidates"].clone().requires_grad_()
    t = torch.tensor(0.6, dtype=torch.float64, requires_grad=True)
    loss = fused_nce.in_batch_softmax_loss(
        q, c, batch["candidate_ids"][rows], log_q=batch["log_q"][rows], extra_candidates=e,
        extra_ids=batch["extra_ids"], extra_log_q=batch["extra_log_q"], temperature=t,
        sample_weight=batch["sample_weight"][rows], reduction="sum", group=group, block_size=5)
    loss.backward()
    return {"loss": loss.detach(), "query": q.grad, "candidates": c.grad, "extra": e.grad,
            "temperature": t.grad}


def gather_worker(rank, world_size):
    """Runs in each rank (the group is set up by ``run_ranks``): its rows' loss and gradients."""
    batch = global_batch()
    n = batch["query"].shape[0] // world_size
    return run_loss(batch, slice(rank * n, (rank + 1) * n), group=dist.group.WORLD)


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_gathered_negatives_equal_one_process():
    ranks = run_ranks(gather_worker, WORLD, timeout=120)
    whole = run_loss(global_batch(), slice(None))
    n = whole["query"].shape[0] // WORLD
    # Every loss term and each row's gradients live on exactly one rank; extras and temperature
    # get a part from each rank (what DDP's all-reduce would sum).
    torch.testing.assert_close(sum(r["loss"] for r in ranks), whole["loss"])
    for rank, r in enumerate(ranks):
        rows = slice(rank * n, (rank + 1) * n)
        torch.testing.assert_close(r["query"], whole["query"][rows])
        torch.testing.assert_close(r["candidates"], whole["candidates"][rows])
    torch.testing.assert_close(sum(r["extra"] for r in ranks), whole["extra"])
    torch.testing.assert_close(sum(r["temperature"] for r in ranks), whole["temperature"])
    # The gathered columns matter: one rank alone gives a different loss.
    alone = run_loss(global_batch(), slice(0, n))
    assert not torch.allclose(alone["loss"], ranks[0]["loss"])
