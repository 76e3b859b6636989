"""Bad input gets a clear error naming the argument; odd but valid input just works."""

import pytest
import torch

import fused_nce
from conftest import DTYPES, OBJECTIVES
from helpers import loss_and_grads, make_problem, run_fused, run_reference

V, D, N = 20, 8, 6


def good_args():
    g = torch.Generator().manual_seed(0)
    return dict(hidden=torch.randn(N, D, generator=g), weight=torch.randn(V, D, generator=g),
                bias=torch.randn(V, generator=g), target=torch.randint(V, (N,), generator=g),
                noise=torch.ones(V), num_negatives=4)


BAD_INPUTS = [
    (dict(target=torch.tensor([0, 1, 2, 3, 4, V])), ValueError, "target"),
    (dict(target=torch.tensor([0, 1, -1, 3, 4, 5])), ValueError, "target"),
    (dict(target=torch.zeros(N, dtype=torch.float32)), TypeError, "target"),
    (dict(target=torch.zeros(N + 1, dtype=torch.int64)), ValueError, "target"),
    # Strided views whose storage holds only valid indices where the view does not look: the
    # check must read the view's own values.
    (dict(target=torch.tensor([0, 0, 1, 0, 2, 0, 3, 0, 4, 0, V * 1000, 0])[::2]), ValueError,
     "target"),
    (dict(negatives=torch.tensor([[0] * 6] * (N - 1) + [[0, 0, 0, 0, V * 1000, 0]]).t()[::2].t(),
          num_negatives=None), ValueError, "negatives"),
    (dict(negatives=torch.full((N, 3), V), num_negatives=None), ValueError, "negatives"),
    (dict(negatives=torch.full((N, 3), -2), num_negatives=None), ValueError, "negatives"),
    (dict(negatives=torch.full((3,), V), num_negatives=None), ValueError, "negatives"),
    (dict(negatives=torch.zeros(N + 1, 3, dtype=torch.int64), num_negatives=None), ValueError, "negatives"),
    (dict(negatives=torch.zeros(N, 0, dtype=torch.int64), num_negatives=None), ValueError, "negatives"),
    (dict(negatives=torch.zeros(N, 3), num_negatives=None), TypeError, "negatives"),
    (dict(negatives=torch.zeros(N, 3, dtype=torch.int64)), ValueError, "num_negatives"),
    (dict(noise=torch.tensor([-1.0] + [1.0] * (V - 1))), ValueError, "noise"),
    (dict(noise=torch.tensor([float("nan")] + [1.0] * (V - 1))), ValueError, "noise"),
    (dict(noise=torch.tensor([float("inf")] + [1.0] * (V - 1))), ValueError, "noise"),
    (dict(noise=torch.zeros(V)), ValueError, "noise"),
    (dict(noise=torch.ones(V + 1)), ValueError, "noise"),
    (dict(noise=fused_nce.AliasSampler(torch.ones(V + 1))), ValueError, "noise"),
    (dict(noise=[1.0] * V), TypeError, "noise"),
    (dict(noise=None), ValueError, "noise"),
    (dict(num_negatives=0), ValueError, "num_negatives"),
    (dict(num_negatives=None), ValueError, "num_negatives"),
    (dict(num_negatives=2.0), TypeError, "num_negatives"),
    (dict(reduction="avg"), ValueError, "reduction"),
    (dict(hidden=torch.randn(N, D + 1)), ValueError, "weight"),
    (dict(hidden=torch.randn(N, D, dtype=torch.float64)), TypeError, "weight"),
    (dict(hidden=torch.randint(3, (N, D))), TypeError, "hidden"),
    (dict(hidden="x"), TypeError, "hidden"),
    (dict(weight=torch.randn(V, D, 1)), ValueError, "weight"),
    (dict(weight=torch.randn(0, D)), ValueError, "weight"),
    (dict(bias=torch.randn(V + 1)), ValueError, "bias"),
    (dict(bias=torch.randn(V, dtype=torch.float64)), TypeError, "bias"),
    (dict(log_z="zero"), TypeError, "log_z"),
    (dict(log_z=torch.zeros(2)), ValueError, "log_z"),
]


@pytest.mark.parametrize("change, error, name", BAD_INPUTS)
def test_bad_input_names_the_argument(change, error, name):
    args = {**good_args(), **change}
    hidden, weight, bias, target = (args.pop(a) for a in ["hidden", "weight", "bias", "target"])
    with pytest.raises(error, match=name):
        fused_nce.nce_loss(hidden, weight, bias, target, **args)


def test_bad_objective_and_module_arguments():
    with pytest.raises(ValueError, match="objective"):
        fused_nce.NCELoss(V, torch.ones(V), 4, objective="hinge")
    with pytest.raises(ValueError, match="num_negatives"):
        fused_nce.NCELoss(V, torch.ones(V), 0)
    with pytest.raises(ValueError, match="noise_weights"):
        fused_nce.NCELoss(V, torch.ones(V + 1), 4)
    with pytest.raises(ValueError, match="reduction"):
        fused_nce.NCELoss(V, torch.ones(V), 4, reduction="avg")
    with pytest.raises(ValueError, match="log_z"):
        fused_nce.NCELoss(V, torch.ones(V), 4, objective="sampled_softmax", learn_log_z=True)


def test_ops_check_indices_themselves():
    """Called directly, the ops still refuse out-of-range indices before reading memory."""
    a = good_args()
    ops = torch.ops.fused_nce
    bad_negatives = torch.full((N, 2), 10**12)
    with pytest.raises(ValueError, match="negatives"):
        ops.sampled_loss_forward(a["hidden"], a["weight"], None, a["target"], bad_negatives, None,
                                 torch.ones(V) / V, torch.tensor(0.0), 0, 1.0, False, -100)
    coef = torch.ones(N, 3)
    with pytest.raises(ValueError, match="target"):
        ops.sampled_loss_backward(torch.ones(N), coef, a["hidden"], a["weight"], False,
                                  torch.full((N,), V), torch.zeros(N, 2, dtype=torch.int64), None,
                                  -100)


def test_negative_sampling_needs_no_noise_with_explicit_negatives():
    a = good_args()
    negatives = torch.randint(V, (N, 3))
    loss = fused_nce.negative_sampling_loss(a["hidden"], a["weight"], a["bias"], a["target"],
                                            negatives=negatives)
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="noise"):
        fused_nce.sampled_softmax_loss(a["hidden"], a["weight"], a["bias"], a["target"],
                                       negatives=negatives)


# ---- odd but valid -------------------------------------------------------------------------

@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_batch(device, objective, reduction):
    p = make_problem(n=0, device=device)
    loss, grads = loss_and_grads(run_fused, objective, p, reduction=reduction)
    assert loss.shape == ((0,) if reduction == "none" else ())
    if reduction != "none":
        assert loss.item() == 0.0
    assert all(torch.all(g == 0) for g in grads)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_all_targets_ignored(device, objective):
    p = make_problem(device=device)
    p.target.fill_(-100)
    loss, grads = loss_and_grads(run_fused, objective, p)
    assert loss.item() == 0.0
    assert all(torch.all(g == 0) for g in grads)


def test_ignore_index_may_be_a_class(device):
    """An in-range ignore_index (e.g. a padding class) skips those examples."""
    p = make_problem(device=device, ignore_every=0)
    p.target[::3] = 0
    loss, grads = loss_and_grads(run_fused, "nce", p, ignore_index=0, reduction="none")
    ref, ref_grads = loss_and_grads(run_reference, "nce", p, ignore_index=0, reduction="none")
    assert torch.all(loss[::3] == 0)
    torch.testing.assert_close(loss, ref)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_one_class_and_more_negatives_than_classes(device, objective):
    p = make_problem(num_classes=1, k=5, device=device, ignore_every=0)
    loss, grads = loss_and_grads(run_fused, objective, p)
    ref, ref_grads = loss_and_grads(run_reference, objective, p)
    torch.testing.assert_close(loss, ref)
    q = make_problem(num_classes=3, k=50, device=device)
    for run in (run_fused, run_reference):
        assert torch.isfinite(loss_and_grads(run, objective, q)[0])
    torch.testing.assert_close(loss_and_grads(run_fused, objective, q)[0],
                               loss_and_grads(run_reference, objective, q)[0])


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_non_contiguous_inputs(device, objective):
    p = make_problem(device=device, dtype=torch.float64)
    dense = loss_and_grads(run_fused, objective, p, reduction="none")
    # The same values through strided views: every other element, a transposed weight.
    p.hidden = torch.stack([p.hidden, p.hidden], dim=-1)[..., 0]
    p.weight = p.weight.T.contiguous().T
    p.bias = torch.stack([p.bias, p.bias], dim=1)[:, 1]
    p.target = torch.stack([p.target, p.target], dim=1)[:, 0]
    p.negatives = p.negatives.T.contiguous().T
    assert not p.hidden.is_contiguous() and not p.weight.is_contiguous()
    assert not p.target.is_contiguous() and not p.negatives.is_contiguous()
    strided = loss_and_grads(run_fused, objective, p, reduction="none")
    torch.testing.assert_close(strided[0], dense[0])
    for g, r in zip(strided[1], dense[1]):
        torch.testing.assert_close(g, r)


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("shared", [False, True], ids=["per_example", "shared"])
def test_leading_batch_dims(device, objective, shared):
    p = make_problem(batch_shape=(3, 5), device=device, shared=shared)
    loss, grads = loss_and_grads(run_fused, objective, p, reduction="none")
    ref, ref_grads = loss_and_grads(run_reference, objective, p, reduction="none")
    assert loss.shape == (3, 5)
    torch.testing.assert_close(loss, ref)
    for g, r in zip(grads, ref_grads):
        assert g.shape == r.shape
        torch.testing.assert_close(g, r)


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("scale", [1e4, -1e4])
def test_huge_scores_stay_finite(device, objective, scale):
    p = make_problem(device=device, ignore_every=0)
    p.bias = torch.full_like(p.bias, scale)
    p.bias[::2] = -scale
    loss, grads = loss_and_grads(run_fused, objective, p)
    ref, _ = loss_and_grads(run_reference, objective, p)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-2)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_tiny_noise_probabilities(device, objective):
    p = make_problem(device=device, ignore_every=0)
    weights = torch.ones(p.weight.shape[0], dtype=torch.float64)
    weights[:10] = 1e-35 * weights.sum()
    p.sampler = fused_nce.AliasSampler(weights, device=device)
    p.negatives[:, 3] = 0  # a class of probability ~1e-35 as a negative for every example
    loss, grads = loss_and_grads(run_fused, objective, p)
    ref, ref_grads = loss_and_grads(run_reference, objective, p)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
    torch.testing.assert_close(loss, ref)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)


def test_zero_probability_target(device):
    """A target the noise never draws (q = 0) still gives a finite loss and gradient: its log q
    is that of the smallest positive (subnormal) float32, as in the reference."""
    p = make_problem(device=device, ignore_every=0, hits=False)
    weights = torch.ones(p.weight.shape[0])
    weights[p.target[0]] = 0
    p.sampler = fused_nce.AliasSampler(weights, device=device)
    p.negatives[p.negatives == p.target[0]] = (p.target[0] + 1) % p.weight.shape[0]
    for objective in OBJECTIVES:
        loss, grads = loss_and_grads(run_fused, objective, p)
        assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
        ref, ref_grads = loss_and_grads(run_reference, objective, p)
        torch.testing.assert_close(loss, ref)
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r)


# ---- empty and degenerate batches reach every backward helper ----------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shared", [False, True], ids=["per_example", "shared"])
@pytest.mark.parametrize("grads", ["dense", "sparse", "frozen"])
def test_empty_batch_backward_every_path(device, dtype, shared, grads):
    """N = 0 through every backward (dense, sparse rows, grad_hidden only) and dtype: zero
    gradients of the right shapes, no reduction over an empty dimension."""
    p = make_problem(n=0, device=device, dtype=dtype, shared=shared)
    hidden, weight, bias = p.leaves()
    if grads == "frozen":
        weight.requires_grad_(False)
        bias.requires_grad_(False)
    loss = fused_nce.sampled_softmax_loss(hidden, weight, bias, p.target, p.sampler,
                                          negatives=p.negatives, reduction="sum",
                                          sparse_grad=grads == "sparse")
    loss.backward()
    assert loss.item() == 0.0 and hidden.grad.shape == hidden.shape
    for g, leaf in [(weight.grad, weight), (bias.grad, bias)]:
        if grads == "frozen":
            assert g is None
            continue
        dense = g.to_dense() if g.is_sparse else g
        assert dense.shape == leaf.shape and dense.dtype == dtype and not dense.any()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shared", [False, True], ids=["per_example", "shared"])
def test_all_ignored_and_no_negatives_at_the_op_level(device, dtype, shared):
    """The ops take k = 0 and batches where every example is ignored: zero loss, zero
    coefficients, zero gradients (the Python layer asks for k >= 1; the kernels must not care)."""
    ops = torch.ops.fused_nce
    p = make_problem(n=9, device=device, dtype=dtype, shared=shared)
    log_z = torch.tensor(0.0, device=device)
    grad_loss = torch.ones(9, device=device)
    for target, negatives in [(torch.full_like(p.target, -100), p.negatives),
                              (p.target, p.negatives[..., :0])]:
        loss, coef = ops.sampled_loss_forward(p.hidden, p.weight, p.bias, target, negatives, None,
                                              p.sampler.probs, log_z, 0, 1.0, False, -100)
        assert coef.shape == (9, 1 + negatives.shape[-1])
        ignored = target == -100
        assert not loss[ignored].any() and not coef[ignored].any()
        g_hidden, g_weight, g_bias = ops.sampled_loss_backward(
            grad_loss, coef, p.hidden, p.weight, True, target, negatives, None, -100)
        g_rows = ops.sampled_loss_backward_rows(grad_loss, coef, p.hidden, p.weight, True,
                                                target, negatives, None, -100)
        g_only = ops.sampled_loss_backward_hidden(grad_loss, coef, p.hidden, p.weight, target,
                                                  negatives, None, -100)
        torch.testing.assert_close(g_only, g_hidden, rtol=0, atol=0)
        torch.testing.assert_close(g_rows[0], g_hidden, rtol=0, atol=0)
        if bool(ignored.all()):
            assert not g_hidden.any() and not g_weight.any() and not g_bias.any()


def test_negatives_of_ignored_examples_are_checked_too():
    """An out-of-range negative is an error even in an ignored example (CPU and CUDA agree: the
    CUDA kernels assert on it)."""
    a = good_args()
    target = a["target"].clone()
    target[2] = -100
    negatives = torch.randint(V, (N, 3))
    negatives[2, 1] = V
    with pytest.raises(ValueError, match="negatives"):
        fused_nce.nce_loss(a["hidden"], a["weight"], a["bias"], target, a["noise"],
                           negatives=negatives)


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("shared", [False, True], ids=["per_example", "shared"])
@pytest.mark.parametrize("dim", [13, 24])
def test_row_strided_and_offset_weight_views(device, objective, shared, dim):
    """Rows with unit stride along D but any row stride and offset (a slice of a wider matrix,
    starting one element in: misaligned for vector loads) give the same results as contiguous
    copies."""
    p = make_problem(dim=dim, device=device, shared=shared)
    loss, grads = loss_and_grads(run_fused, objective, p, reduction="none")
    wide_weight = torch.zeros(p.weight.shape[0], dim + 3, device=device)
    wide_weight[:, 1:dim + 1] = p.weight
    wide_hidden = torch.zeros(p.hidden.shape[0], dim + 5, device=device)
    wide_hidden[:, 1:dim + 1] = p.hidden
    wide_weight.requires_grad_()
    wide_hidden.requires_grad_()
    bias = p.bias.clone().requires_grad_()
    weight, hidden = wide_weight[:, 1:dim + 1], wide_hidden[:, 1:dim + 1]
    assert weight.stride() == (dim + 3, 1) and weight.storage_offset() == 1
    strided = run_fused(objective, p, [hidden, weight, bias], reduction="none")
    strided.backward(torch.linspace(0.5, 1.5, strided.numel(), device=device))
    torch.testing.assert_close(strided.detach(), loss)
    for g, r in zip([wide_hidden.grad[:, 1:dim + 1], wide_weight.grad[:, 1:dim + 1], bias.grad],
                    grads):
        torch.testing.assert_close(g, r)


def test_kernel_errors_carry_their_numbers():
    """A check inside the C++ ops formats its numbers into the message. (A module linked with its
    own copy of libstdc++, symbols exported, lost them: the stream stopped at the first number,
    and on one machine crashed.)"""
    h, w = torch.zeros(4, 8), torch.zeros(10, 8)
    target, negatives = torch.tensor([0, 1, 2, 11]), torch.zeros(4, 3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"class index 11, outside \[0, 10\)"):
        torch.ops.fused_nce.sampled_loss_forward(h, w, None, target, negatives, None, None,
                                                 torch.tensor(0.0), 2, 1.0, True, -100)
