"""Several positives per example, hard negatives, per-example weights and gBCE: the fused losses
against the reference (float64 gradcheck too), TensorFlow's num_true softmax, and bad input."""

import math

import pytest
import torch
import torch.nn.functional as F

import fused_nce
from fused_nce import reference
from helpers import TOLERANCE, deterministic_algorithms, make_problem

IGNORE = -100
OBJECTIVES = ["nce", "negative_sampling", "sampled_softmax", "gbce"]


def extras(p, positives=3, hard=4, seed=1, pad=True):
    """[N, T] positives (the problem's target first) and [N, h] hard negatives, both padded with
    IGNORE in a ragged pattern, duplicates and hits with the positives included; [N] weights."""
    g = torch.Generator().manual_seed(seed)
    n, v = p.target.numel(), p.weight.shape[0]
    target = torch.randint(v, (n, positives), generator=g)
    target[:, 0] = p.target.cpu()
    hard_negatives = torch.randint(v, (n, hard), generator=g)
    if pad:
        target[1::3, 1:] = IGNORE           # one positive left
        target[2::5, :] = IGNORE            # no positive: not counted
        hard_negatives[::4, 1] = IGNORE     # padding among the hard negatives
    if positives > 1:
        target[3::7, 1] = target[3::7, 0]   # a duplicate positive counts twice
    hard_negatives[:, 0] = target[:, 1 if positives > 1 else 0].clamp_min(0)  # a hit
    weights = torch.rand(n, generator=g, dtype=torch.float64) * 2
    device = p.hidden.device
    return target.to(device), hard_negatives.to(device), weights.to(device)


def run_both(objective, p, target, hard, weights, leaves, **kwargs):
    """The fused loss on ``leaves`` and the reference's in float64 on copies of them (returned
    as the third value)."""
    hidden, weight, bias = leaves
    fn = getattr(fused_nce, f"{objective}_loss")
    ref = getattr(reference, f"{objective}_loss")
    extra = dict(kwargs)
    if objective != "nce":
        extra["hard_negatives"] = hard
    if objective == "gbce":
        extra["t"] = 0.6
    fused = fn(hidden, weight, bias, target, p.sampler, negatives=p.negatives,
               sample_weight=weights, **extra)
    extra.pop("sparse_grad", None)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    noise = [] if objective in ("negative_sampling", "gbce") else [p.sampler.probs]
    expected = ref(*ref_leaves, target, *noise, p.negatives, sample_weight=weights, **extra)
    return fused, expected, ref_leaves


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("shared", [False, True], ids=["per_example", "shared"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("sparse_grad", [False, True], ids=["dense", "sparse"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_matches_reference(device, objective, shared, reduction, sparse_grad, dtype):
    """Against the reference in float64 on the same (rounded) inputs."""
    p = make_problem(n=37, dim=13, num_classes=29, k=6, dtype=dtype, device=device,
                     shared=shared, ignore_every=0)
    target, hard, weights = extras(p)
    leaves = p.leaves()
    fused, expected, ref_leaves = run_both(objective, p, target, hard, weights, leaves,
                                           reduction=reduction, sparse_grad=sparse_grad,
                                           remove_accidental_hits=objective != "nce")
    loss_tol, grad_tol = TOLERANCE[dtype]
    tol = max(loss_tol, 1e-5) if dtype != torch.float64 else loss_tol
    torch.testing.assert_close(fused.double(), expected.detach(), rtol=tol, atol=tol)
    upstream = torch.linspace(0.5, 1.5, fused.numel(), device=device).reshape(fused.shape)
    fused.backward(upstream.to(fused.dtype))
    expected.backward(upstream.double())
    for leaf, ref_leaf in zip(leaves, ref_leaves):
        got = leaf.grad.to_dense() if leaf.grad.is_sparse else leaf.grad
        # bfloat16 gradients are rounded once, from float32 sums
        torch.testing.assert_close(got.double(), ref_leaf.grad.to(leaf.dtype).double(),
                                   rtol=grad_tol * 4, atol=grad_tol * 4)


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("shared", [False, True], ids=["per_example", "shared"])
def test_gradcheck(objective, shared):
    p = make_problem(n=7, dim=5, num_classes=11, k=3, dtype=torch.float64, shared=shared,
                     ignore_every=0)
    target, hard, weights = extras(p, positives=2, hard=2)
    fn = getattr(fused_nce, f"{objective}_loss")
    extra = {} if objective == "nce" else dict(hard_negatives=hard)
    if objective == "nce":
        extra["log_z"] = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    leaves = p.leaves()

    def loss(*args):
        h, w, b = args[:3]
        kw = dict(extra)
        if objective == "nce":
            kw["log_z"] = args[3]
        return fn(h, w, b, target, p.sampler, negatives=p.negatives, sample_weight=weights,
                  reduction="none", remove_accidental_hits=True, **kw)

    inputs = leaves + ([extra["log_z"]] if objective == "nce" else [])
    assert torch.autograd.gradcheck(loss, inputs)


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("shared", [False, True], ids=["per_example", "shared"])
def test_one_positive_column_is_the_plain_loss(device, objective, shared):
    """target [N, 1] and empty hard negatives give the bits of the [N] call."""
    p = make_problem(device=device, shared=shared)
    fn = getattr(fused_nce, f"{objective}_loss")
    plain = fn(p.hidden, p.weight, p.bias, p.target, p.sampler, negatives=p.negatives,
               reduction="none")
    extra = {} if objective == "nce" else dict(
        hard_negatives=p.target.new_empty((p.target.numel(), 0)))
    column = fn(p.hidden, p.weight, p.bias, p.target.unsqueeze(1), p.sampler,
                negatives=p.negatives, reduction="none", **extra)
    assert torch.equal(plain, column)


def test_sampled_softmax_equals_tensorflows_num_true(device):
    """TensorFlow's sampled_softmax_loss(num_true=T), as its source computes it: logits
    [true - log(expected true), sampled - log(expected sampled)] with expected counts k q(w),
    labels 1/T on the true columns, softmax cross-entropy; accidental hits get -inf logits.
    (Written out here, TensorFlow not being a test dependency.)"""
    p = make_problem(n=23, dim=9, num_classes=31, k=7, dtype=torch.float64, device=device,
                     shared=True, ignore_every=0)
    target, _, _ = extras(p, positives=3, pad=False)
    k = p.negatives.numel()
    q = p.sampler.probs.double()
    logits_true = (p.hidden @ p.weight.T + p.bias).gather(1, target) - (k * q[target]).log()
    logits_sampled = p.hidden @ p.weight[p.negatives].T + p.bias[p.negatives] \
        - (k * q[p.negatives]).log()
    hits = (p.negatives.view(1, k, 1) == target.unsqueeze(1)).any(2)
    logits_sampled = logits_sampled.masked_fill(hits, float("-inf"))
    logits = torch.cat([logits_true, logits_sampled], 1)
    labels = torch.cat([torch.full_like(logits_true, 1 / 3), torch.zeros_like(logits_sampled)], 1)
    tf = -(labels * F.log_softmax(logits, 1)).masked_fill(labels == 0, 0).sum(1)
    fused = fused_nce.sampled_softmax_loss(p.hidden, p.weight, p.bias, target, p.sampler,
                                           negatives=p.negatives, reduction="none")
    torch.testing.assert_close(fused, tf, rtol=1e-10, atol=1e-10)


def test_nce_with_several_positives_and_tensorflows_labels():
    """The docs' statement: TensorFlow's nce_loss(num_true=T), which labels each true logit 1/T,
    is this loss plus (1 - 1/T) sum_t d(t)."""
    p = make_problem(n=11, dim=6, num_classes=17, k=5, dtype=torch.float64, ignore_every=0)
    target, _, _ = extras(p, positives=4, pad=False)
    k = p.negatives.shape[-1]
    q = p.sampler.probs.double()
    d_true = (p.hidden @ p.weight.T + p.bias).gather(1, target) - math.log(k) - q[target].log()
    scores = torch.einsum("nd,nkd->nk", p.hidden, p.weight[p.negatives]) + p.bias[p.negatives]
    d_sampled = scores - math.log(k) - q[p.negatives].log()
    tf = (F.binary_cross_entropy_with_logits(d_true, torch.full_like(d_true, 0.25),
                                             reduction="none").sum(1)
          + F.softplus(d_sampled).sum(1))
    fused = fused_nce.nce_loss(p.hidden, p.weight, p.bias, target, p.sampler,
                               negatives=p.negatives, reduction="none")
    torch.testing.assert_close(fused + 0.75 * d_true.sum(1), tf, rtol=1e-10, atol=1e-10)


def test_gbce_beta_and_plain_bce():
    p = make_problem(n=20, dim=8, num_classes=41, k=4, dtype=torch.float64)
    args = (p.hidden, p.weight, p.bias, p.target)
    bce = fused_nce.gbce_loss(*args, negatives=p.negatives, t=0.0)
    ns = fused_nce.negative_sampling_loss(*args, negatives=p.negatives)
    assert torch.equal(bce, ns)
    # beta = alpha (t (1 - 1/alpha) + 1/alpha) on the positive term only
    t, alpha = 0.75, 4 / 40
    beta = alpha * (t * (1 - 1 / alpha) + 1 / alpha)
    keep = p.target != IGNORE
    safe = p.target.clamp_min(0)
    s_pos = (p.hidden * p.weight[safe]).sum(1) + p.bias[safe]
    s_neg = torch.einsum("nd,nkd->nk", p.hidden, p.weight[p.negatives]) + p.bias[p.negatives]
    want = torch.where(keep, beta * F.softplus(-s_pos) + F.softplus(s_neg).sum(1), 0.0)
    got = fused_nce.gbce_loss(*args, negatives=p.negatives, t=t, reduction="none")
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_gbce_default_noise_is_uniform():
    """Without noise or negatives, gBCE draws its negatives uniformly over V (as gSASRec)."""
    p = make_problem(n=40, dim=6, num_classes=50, k=8, dtype=torch.float64)
    args = (p.hidden, p.weight, p.bias, p.target)
    torch.manual_seed(0)
    drawn = fused_nce.gbce_loss(*args, num_negatives=8)
    torch.manual_seed(0)
    uniform = torch.randint(50, (40, 8))
    assert torch.equal(drawn, fused_nce.gbce_loss(*args, negatives=uniform))


def test_hard_negatives_only(device):
    """num_negatives=0 with hard negatives: the softmax over the positives and hard negatives."""
    p = make_problem(n=15, dim=6, num_classes=19, k=1, dtype=torch.float64, device=device,
                     ignore_every=0)
    _, hard, _ = extras(p, hard=5)
    loss = fused_nce.sampled_softmax_loss(p.hidden, p.weight, p.bias, p.target, p.sampler,
                                          num_negatives=0, hard_negatives=hard, reduction="none")
    s = p.hidden @ p.weight.T + p.bias
    o_t = s.gather(1, p.target.unsqueeze(1)).squeeze(1) - p.sampler.probs.double()[p.target].log()
    s_h = s.gather(1, hard.clamp_min(0)).masked_fill((hard == IGNORE) | (hard == p.target[:, None]),
                                                     float("-inf"))
    want = torch.logsumexp(torch.cat([o_t[:, None], s_h], 1), 1) - o_t
    torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-10)


def test_module_with_new_arguments():
    p = make_problem(n=12, dim=6, num_classes=23, k=4, dtype=torch.float64, ignore_every=0)
    target, hard, weights = extras(p, positives=2, hard=3)
    crit = fused_nce.NCELoss(23, p.sampler.probs, 4, objective="gbce", gbce_t=0.25)
    torch.manual_seed(3)
    got = crit(p.hidden, p.weight, p.bias, target, hard_negatives=hard, sample_weight=weights)
    torch.manual_seed(3)
    want = fused_nce.gbce_loss(p.hidden, p.weight, p.bias, target, p.sampler, num_negatives=4,
                               t=0.25, hard_negatives=hard, sample_weight=weights)
    assert torch.equal(got, want)
    assert "gbce_t=0.25" in repr(crit)


@pytest.mark.parametrize("shared", [False, True], ids=["per_example", "shared"])
def test_deterministic_backward(shared):
    p = make_problem(n=900, dim=24, num_classes=9, k=12, shared=shared, ignore_every=0)
    target, hard, weights = extras(p)
    runs = []
    with deterministic_algorithms():
        for _ in range(3):
            leaves = p.leaves()
            fused_nce.sampled_softmax_loss(*leaves, target, p.sampler, negatives=p.negatives,
                                           hard_negatives=hard, sample_weight=weights).backward()
            runs.append([leaf.grad for leaf in leaves])
    for grads in runs[1:]:
        for g, g0 in zip(grads, runs[0]):
            assert torch.equal(g, g0)


def test_compiles_with_fullgraph():
    p = make_problem(n=16, dim=8, num_classes=30, k=5, ignore_every=0)
    target, hard, weights = extras(p, positives=2, hard=3)

    def step(h, w, b):
        return fused_nce.sampled_softmax_loss(h, w, b, target, p.sampler, negatives=p.negatives,
                                              hard_negatives=hard, sample_weight=weights)

    compiled = torch.compile(step, fullgraph=True, dynamic=True)
    eager_leaves, compiled_leaves = p.leaves(), p.leaves()
    eager, got = step(*eager_leaves), compiled(*compiled_leaves)
    torch.testing.assert_close(got, eager)
    eager.backward()
    got.backward()
    for a, b in zip(eager_leaves, compiled_leaves):
        torch.testing.assert_close(b.grad, a.grad)


def test_opcheck_with_positives_and_hard(device):
    ops = torch.ops.fused_nce
    p = make_problem(n=9, dim=8, num_classes=13, k=3, device=device, ignore_every=0)
    target, hard, _ = extras(p, positives=2, hard=2)
    log_z = torch.tensor(0.0, device=device)
    for objective, weight in [(1, 0.4), (2, 1.0)]:
        args = (p.hidden, p.weight, p.bias, target, p.negatives, hard, p.sampler.probs, log_z,
                objective, weight, True, IGNORE)
        torch.library.opcheck(ops.sampled_loss_forward.default, args)
    _, coef = ops.sampled_loss_forward(*args)
    assert coef.shape == (9, 2 + 3 + 2)
    grad_loss = torch.linspace(0.1, 1.0, 9, device=device)
    back = (grad_loss, coef, p.hidden, p.weight, True, target, p.negatives, hard, IGNORE)
    torch.library.opcheck(ops.sampled_loss_backward.default, back)
    torch.library.opcheck(ops.sampled_loss_backward_rows.default, back)


# ---- bad input ----

def bad_call(objective="sampled_softmax", **overrides):
    p = make_problem(n=6, dim=4, num_classes=10, k=2, ignore_every=0)
    kwargs = dict(negatives=p.negatives)
    kwargs.update(overrides)
    target = kwargs.pop("target", p.target)
    fn = getattr(fused_nce, f"{objective}_loss")
    return fn(p.hidden, p.weight, p.bias, target, p.sampler, **kwargs)


@pytest.mark.parametrize("overrides, error, match", [
    (dict(objective="nce", hard_negatives=torch.zeros(6, 2, dtype=torch.long)), ValueError,
     "hard_negatives"),
    (dict(hard_negatives=torch.full((6, 2), 10)), ValueError, "hard_negatives"),
    (dict(hard_negatives=torch.full((6, 2), -5)), ValueError, "hard_negatives"),
    (dict(hard_negatives=torch.zeros(5, 2, dtype=torch.long)), ValueError, "hard_negatives"),
    (dict(hard_negatives=torch.zeros(6, dtype=torch.long)), ValueError, "hard_negatives"),
    (dict(hard_negatives=torch.zeros(6, 2)), TypeError, "hard_negatives"),
    (dict(target=torch.zeros(6, 0, dtype=torch.long)), ValueError, "target"),
    (dict(target=torch.zeros(5, 2, dtype=torch.long)), ValueError, "target"),
    (dict(target=torch.full((6, 2), 10)), ValueError, "target"),
    (dict(sample_weight=torch.tensor([1.0, float("nan"), 1, 1, 1, 1])), ValueError,
     "sample_weight"),
    (dict(sample_weight=torch.tensor([1.0, float("inf"), 1, 1, 1, 1])), ValueError,
     "sample_weight"),
    (dict(sample_weight=torch.tensor([1.0, -1.0, 1, 1, 1, 1])), ValueError, "sample_weight"),
    (dict(sample_weight=torch.ones(5)), ValueError, "sample_weight"),
    (dict(sample_weight=torch.ones(6, dtype=torch.long)), TypeError, "sample_weight"),
    (dict(objective="gbce", t=1.5), ValueError, r"\bt\b"),
    (dict(objective="gbce", t=-0.1), ValueError, r"\bt\b"),
    (dict(objective="gbce", t="0.5"), TypeError, r"\bt\b"),
    (dict(negatives=None, num_negatives=0), ValueError, "num_negatives"),
])
def test_bad_input(overrides, error, match):
    with pytest.raises(error, match=match):
        bad_call(**overrides)


def test_gbce_needs_two_classes_and_a_negative():
    hidden, weight = torch.zeros(3, 4), torch.zeros(1, 4)
    with pytest.raises(ValueError, match="2 rows"):
        fused_nce.gbce_loss(hidden, weight, None, torch.zeros(3, dtype=torch.long),
                            negatives=torch.zeros(3, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="num_negatives"):
        fused_nce.gbce_loss(torch.zeros(3, 4), torch.zeros(5, 4), None,
                            torch.zeros(3, dtype=torch.long), num_negatives=0,
                            hard_negatives=torch.zeros(3, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="t must"):
        fused_nce.NCELoss(5, None, 2, objective="gbce", gbce_t=2.0)
