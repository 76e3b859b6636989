"""Property tests: every loss against ``fused_nce.reference`` over random problems.

Hypothesis draws the shapes (N down to 0, D not a multiple of the vector width, k = 1, V = 1,
batch shapes of one and two dimensions), per-example and shared negatives, strided and offset
views of ``hidden`` and ``weight``, float32 / float64 / bfloat16, duplicate ids and accidental
hits, ``ignore_index`` patterns (none, some, all ignored; a negative or a valid class as the
index), every reduction, dense and row-sparse gradients, with and without bias, NCE's ``log_z`` as a float or a learned tensor,
and noise given as an ``AliasSampler`` or as weights (zeros included). Losses and the gradients
of every input are compared. Out-of-range ids must raise ``ValueError`` naming the argument.

The example budget is fixed and the examples derandomized, so a run is reproducible and bounded
in time.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fused_nce
from fused_nce import reference
from helpers import TOLERANCE

OBJECTIVES = ["nce", "negative_sampling", "sampled_softmax"]
DTYPES = [torch.float32, torch.float64, torch.bfloat16]
REDUCTIONS = ["mean", "sum", "none"]

BUDGET = settings(max_examples=1000, deadline=None, derandomize=True, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def assert_close(actual, expected, tol, what):
    torch.testing.assert_close(actual.double(), expected.double(), rtol=tol, atol=tol,
                               msg=lambda m: f"{what}: {m}")


# ---- building a problem from hypothesis' draws -------------------------------------------------

def leaf(values: torch.Tensor, dtype: torch.dtype, compute_dtype=None) -> torch.Tensor:
    """A leaf holding ``values`` rounded to ``dtype``, stored in ``compute_dtype`` (the oracle's
    float64 for bfloat16 problems) or ``dtype``."""
    values = values.to(dtype)
    return values.to(compute_dtype or dtype).detach().clone().requires_grad_()


def view_of(base: torch.Tensor, layout: str, dim: int) -> torch.Tensor:
    """The ``[..., dim]`` tensor the loss sees, as a differentiable view of the leaf ``base``
    built by ``make_leaf`` for ``layout``."""
    if layout == "contiguous":
        return base
    if layout == "offset":        # unit stride along D, rows further apart, storage offset 1
        return base[..., 1:dim + 1]
    if layout == "step2":         # stride 2 along D
        return base[..., ::2]
    if layout == "transposed":    # [D, rows] stored, seen as [rows, D]
        return base.transpose(0, 1)
    raise AssertionError(layout)


def base_values(values: torch.Tensor, layout: str) -> torch.Tensor:
    """The storage ``view_of(base, layout, D)`` reads ``values`` (``[rows, D]``) from."""
    rows, dim = values.shape
    if layout == "contiguous":
        return values
    if layout == "offset":
        wide = torch.full((rows, dim + 3), 7.0, dtype=values.dtype)
        wide[:, 1:dim + 1] = values
        return wide
    if layout == "step2":
        wide = torch.full((rows, 2 * dim), 7.0, dtype=values.dtype)
        wide[:, ::2] = values
        return wide
    if layout == "transposed":
        return values.t().contiguous()
    raise AssertionError(layout)


LAYOUTS = ["contiguous", "offset", "step2", "transposed"]


@st.composite
def problems(draw, objectives=tuple(OBJECTIVES), dtypes=tuple(DTYPES)):
    objective = draw(st.sampled_from(objectives))
    dtype = draw(st.sampled_from(dtypes))
    v = draw(st.sampled_from([1, 2, 3, 5, 8, 13, 33]))
    dim = draw(st.sampled_from([1, 3, 7, 8, 9, 16, 17, 33]))
    k = draw(st.sampled_from([1, 2, 3, 4, 7]))
    two_dim_batch = draw(st.booleans())
    if two_dim_batch:
        batch_shape = (draw(st.integers(0, 3)), draw(st.integers(0, 4)))
    else:
        batch_shape = (draw(st.sampled_from([0, 1, 2, 5, 9, 17])),)
    n = int(torch.Size(batch_shape).numel())
    shared = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)

    h_values = torch.randn(n, dim, generator=g, dtype=torch.float64) / dim ** 0.25
    w_values = torch.randn(v, dim, generator=g, dtype=torch.float64) / dim ** 0.25
    b_values = torch.randn(v, generator=g, dtype=torch.float64)
    with_bias = draw(st.booleans())
    # A batch of more than one dimension is a reshape of [N, D]: only its rows' layout varies.
    h_layout = draw(st.sampled_from(LAYOUTS if not two_dim_batch else ["contiguous", "step2"]))
    w_layout = draw(st.sampled_from(LAYOUTS))

    target = torch.randint(v, (n,), generator=g)
    ignore_pattern = draw(st.sampled_from(["none", "some", "all"]))
    ignore_index = draw(st.sampled_from([-100, -1, "class"]))
    if ignore_index == "class":
        ignore_index = int(torch.randint(v, (), generator=g))  # a valid class marks ignored rows
    elif ignore_pattern == "some" and n:
        target[torch.rand(n, generator=g) < 0.4] = ignore_index
    elif ignore_pattern == "all":
        target[:] = ignore_index

    neg_shape = (k,) if shared else (n, k)
    negatives = torch.randint(v, neg_shape, generator=g)
    duplicates = draw(st.sampled_from(["random", "targets", "one_id"]))
    valid = target.clamp(0, v - 1)
    if duplicates == "targets" and n:
        # Accidental hits: each target appears among the negatives (per example or shared).
        if shared:
            negatives[: min(k, n)] = valid[: min(k, n)]
        else:
            negatives[:, 0] = valid
            if k > 1:
                negatives[:, -1] = valid
    elif duplicates == "one_id":
        negatives[:] = int(torch.randint(v, (), generator=g))
    noise_weights = torch.rand(v, generator=g, dtype=torch.float64) + 0.05
    if v > 1 and draw(st.booleans()):
        noise_weights[torch.rand(v, generator=g) < 0.3] = 0.0  # classes the sampler never draws
        noise_weights[int(valid[0]) if n else 0] += 0.5            # but never all of them
    return dict(
        objective=objective, dtype=dtype, v=v, dim=dim, k=k, batch_shape=batch_shape,
        shared=shared, h_values=h_values, w_values=w_values,
        b_values=b_values if with_bias else None, h_layout=h_layout, w_layout=w_layout,
        target=target.reshape(batch_shape), ignore_index=ignore_index,
        negatives=negatives if shared else negatives.reshape(*batch_shape, k),
        noise_weights=noise_weights,
        noise_as_sampler=draw(st.booleans()),
        reduction=draw(st.sampled_from(REDUCTIONS)),
        remove_hits=draw(st.booleans()),
        log_z=draw(st.sampled_from([0.0, 1.5, "learned"])),
        # Row-sparse gradients of a weight the loss sees as is (a view's backward would have to
        # scatter a sparse gradient into its base).
        sparse_grad=w_layout == "contiguous" and draw(st.booleans()),
    )


def model_inputs(case, dtype):
    """hidden, weight and bias as the case lays them out (views of leaves in ``dtype``), and the
    leaves by name."""
    h_base = leaf(base_values(case["h_values"], case["h_layout"]), case["dtype"], dtype)
    w_base = leaf(base_values(case["w_values"], case["w_layout"]), case["dtype"], dtype)
    hidden = view_of(h_base, case["h_layout"], case["dim"]).reshape(*case["batch_shape"],
                                                                    case["dim"])
    weight = view_of(w_base, case["w_layout"], case["dim"])
    leaves = {"hidden": h_base, "weight": w_base}
    bias = None
    if case["b_values"] is not None:
        bias = leaves["bias"] = leaf(case["b_values"], case["dtype"], dtype)
    return hidden, weight, bias, leaves


def run(case, fused: bool, oracle_dtype=None):
    """Loss and the gradients of every leaf, fused or reference (in ``oracle_dtype`` when set)."""
    dtype = oracle_dtype or case["dtype"]
    hidden, weight, bias, leaves = model_inputs(case, dtype)
    kwargs = dict(ignore_index=case["ignore_index"], reduction=case["reduction"],
                  remove_accidental_hits=case["remove_hits"])
    objective = case["objective"]
    if objective == "nce":
        log_z = case["log_z"]
        if log_z == "learned":
            acc = torch.float64 if dtype == torch.float64 else torch.float32
            log_z = leaves["log_z"] = torch.tensor(0.7, dtype=acc, requires_grad=True)
        kwargs["log_z"] = log_z
    sampler = fused_nce.AliasSampler(case["noise_weights"])
    target, negatives = case["target"], case["negatives"]
    if fused:
        noise = sampler if case["noise_as_sampler"] else case["noise_weights"]
        fn = getattr(fused_nce, f"{objective}_loss")
        loss = fn(hidden, weight, bias, target, noise, negatives=negatives,
                  sparse_grad=case["sparse_grad"], **kwargs)
    elif objective == "negative_sampling":
        loss = reference.negative_sampling_loss(hidden, weight, bias, target, negatives, **kwargs)
    else:
        fn = getattr(reference, f"{objective}_loss")
        loss = fn(hidden, weight, bias, target, sampler.probs, negatives, **kwargs)
    return backward(loss, leaves)


def backward(loss, leaves):
    # A non-uniform upstream gradient checks that each example's gradient is scaled by its own.
    upstream = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
    loss.backward(upstream)
    grads = {}
    for name, t in leaves.items():
        g = t.grad if t.grad is not None else torch.zeros_like(t)
        grads[name] = g.to_dense() if g.is_sparse else g
    return loss.detach(), grads


def compare(case, got, want):
    dtype = case["dtype"]
    loss_tol, grad_tol = TOLERANCE[dtype]
    loss, grads = got
    ref_loss, ref_grads = want
    expected_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert loss.dtype == expected_dtype
    assert loss.shape == ref_loss.shape
    assert_close(loss, ref_loss, loss_tol, "loss")
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        if name != "log_z":
            assert g.dtype == dtype, name
        assert_close(g, ref_grads[name], grad_tol, f"grad {name}")


def oracle_dtype(dtype):
    # The reference's bfloat16 backward adds duplicate rows in bfloat16 (index_put); the kernels
    # add in float32 and round once. So bfloat16 runs are checked against the reference in
    # float64 on the same (bfloat16) values, within bfloat16's tolerance.
    return torch.float64 if dtype == torch.bfloat16 else None


# ---- the sampled losses ------------------------------------------------------------------------

@BUDGET
@given(case=problems())
def test_sampled_losses_match_reference(case):
    want = run(case, fused=False, oracle_dtype=oracle_dtype(case["dtype"]))
    got = run(case, fused=True)
    compare(case, got, want)


@settings(BUDGET, max_examples=150)
@given(case=problems(), where=st.sampled_from(["target", "negatives"]),
       bad=st.sampled_from(["V", "big", "minus_one", "minus_two"]))
def test_out_of_range_ids_raise_value_error(case, where, bad):
    v = case["v"]
    value = {"V": v, "big": v + 1000, "minus_one": -1, "minus_two": -2}[bad]
    if where == "target":
        if value == case["ignore_index"]:
            value = -3  # the ignore_index itself is allowed
        target = case["target"].clone().reshape(-1)
        if not target.numel():
            target = torch.tensor([value])
            case["negatives"] = (case["negatives"] if case["shared"]
                                 else torch.zeros(1, case["k"], dtype=torch.int64))
            case["h_values"] = torch.ones(1, case["dim"], dtype=torch.float64)
            case["batch_shape"] = (1,)
            case["h_layout"] = "contiguous"
        else:
            target[int(torch.randint(target.numel(), ()))] = value
        case["target"] = target.reshape(case["batch_shape"])
    else:
        negatives = case["negatives"].clone()
        if not negatives.numel():
            # N = 0 with per-example negatives has nothing to corrupt: use a shared set.
            negatives = torch.zeros(case["k"], dtype=torch.int64)
        negatives.view(-1)[-1] = value
        case["negatives"] = negatives
    with pytest.raises(ValueError, match=where):
        run(case, fused=True)


# ---- full softmax ------------------------------------------------------------------------------

@settings(BUDGET, max_examples=250)
@given(case=problems(objectives=("full_softmax",)),
       chunk=st.sampled_from([None, 1, 2, 3, 1000]))
def test_full_softmax_matches_reference(case, chunk):
    def full(fused: bool, dtype):
        hidden, weight, bias, leaves = model_inputs(case, dtype)
        kwargs = dict(ignore_index=case["ignore_index"], reduction=case["reduction"])
        if fused:
            loss = fused_nce.full_softmax_loss(hidden, weight, bias, case["target"],
                                               chunk_size=chunk, **kwargs)
        else:
            loss = reference.full_softmax_loss(hidden, weight, bias, case["target"], **kwargs)
        return backward(loss, leaves)

    dtype = case["dtype"]
    want = full(False, oracle_dtype(dtype) or dtype)
    got = full(True, dtype)
    compare(case, got, want)


@settings(BUDGET, max_examples=50)
@given(case=problems(objectives=("full_softmax",)),
       bad=st.sampled_from(["V", "minus_two"]))
def test_full_softmax_out_of_range_target_raises(case, bad):
    v = case["v"]
    value = v if bad == "V" else -2
    if value == case["ignore_index"]:
        value = -3
    n, dim = max(1, case["h_values"].shape[0]), case["dim"]
    target = torch.zeros(n, dtype=torch.int64)
    target[-1] = value
    with pytest.raises(ValueError, match="target"):
        fused_nce.full_softmax_loss(torch.randn(n, dim), torch.randn(v, dim), None, target)
