"""The fused losses against the reference, float64, gradcheck and opcheck."""

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import fused_nce
from fused_nce import reference
from conftest import DTYPES, OBJECTIVES
from helpers import (TOLERANCE, assert_bitwise_reproducible, deterministic_algorithms,
                     loss_and_grads, make_problem, run_fused, run_reference,
                     runs_per_thread_count)


def assert_close(actual, expected, tol, what):
    torch.testing.assert_close(actual.double(), expected.double(), rtol=tol, atol=tol, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("shared", [False, True], ids=["per_example", "shared"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("remove_hits", [False, True], ids=["keep_hits", "remove_hits"])
def test_matches_reference(device, dtype, objective, shared, bias, reduction, remove_hits):
    p = make_problem(dtype=dtype, device=device, bias=bias, shared=shared)
    kwargs = dict(reduction=reduction, remove_accidental_hits=remove_hits)
    loss, grads = loss_and_grads(run_fused, objective, p, **kwargs)
    ref_loss, ref_grads = loss_and_grads(run_reference, objective, p, **kwargs)
    expected_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert loss.dtype == expected_dtype
    loss_tol, grad_tol = TOLERANCE[dtype]
    assert_close(loss, ref_loss, loss_tol, "loss")
    for name, g, ref_g in zip(["hidden", "weight", "bias"], grads, ref_grads):
        assert g.dtype == dtype and g.shape == ref_g.shape
        assert_close(g, ref_g, grad_tol, f"grad {name}")


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("shared", [False, True], ids=["per_example", "shared"])
def test_float32_close_to_float64(device, objective, shared):
    """The float32 kernel's error against float64 truth is no worse than the reference's own."""
    p32 = make_problem(n=64, dim=200, num_classes=300, k=32, device=device, shared=shared)
    p64 = make_problem(n=64, dim=200, num_classes=300, k=32, device=device, shared=shared,
                       dtype=torch.float64)
    truth, truth_grads = loss_and_grads(run_reference, objective, p64)
    fused, fused_grads = loss_and_grads(run_fused, objective, p32)
    ref, ref_grads = loss_and_grads(run_reference, objective, p32)
    ref_error = (ref.double() - truth).abs().item()
    assert (fused.double() - truth).abs().item() <= max(4 * ref_error, 1e-6 * truth.abs().item())
    for g, ref_g, true_g in zip(fused_grads, ref_grads, truth_grads):
        ref_error = (ref_g.double() - true_g).abs().max().item()
        assert (g.double() - true_g).abs().max().item() <= max(4 * ref_error, 1e-6)


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("shared", [False, True], ids=["per_example", "shared"])
@pytest.mark.parametrize("seed", [0, 1])
def test_gradcheck(device, objective, shared, seed):
    p = make_problem(n=6, dim=5, num_classes=9, k=4, dtype=torch.float64, device=device,
                     shared=shared, ignore_every=4, seed=seed)
    log_z = torch.tensor(0.3, dtype=torch.float64, device=device, requires_grad=True)
    fn = getattr(fused_nce, f"{objective}_loss")

    def loss(hidden, weight, bias, log_z):
        extra = dict(log_z=log_z) if objective == "nce" else {}
        return fn(hidden, weight, bias, p.target, p.sampler, negatives=p.negatives,
                  reduction="none", **extra)

    inputs = (*p.leaves(), log_z)
    assert torch.autograd.gradcheck(loss, inputs)


def test_learned_log_z_gradient(device):
    p = make_problem(dtype=torch.float64, device=device)
    log_z = torch.tensor(-0.4, dtype=torch.float64, device=device, requires_grad=True)
    fused_nce.nce_loss(*p.leaves(), p.target, p.sampler, negatives=p.negatives, log_z=log_z).backward()
    ref_log_z = log_z.detach().clone().requires_grad_()
    reference.nce_loss(*p.leaves(), p.target, p.sampler.probs, p.negatives, log_z=ref_log_z).backward()
    torch.testing.assert_close(log_z.grad, ref_log_z.grad)
    assert log_z.grad.abs().item() > 0


def test_log_z_shifts_nce_loss(device):
    """log_z as a float and as a tensor are the same thing, and it changes the loss."""
    p = make_problem(device=device)
    common = dict(negatives=p.negatives)
    a = fused_nce.nce_loss(p.hidden, p.weight, p.bias, p.target, p.sampler, log_z=1.5, **common)
    b = fused_nce.nce_loss(p.hidden, p.weight, p.bias, p.target, p.sampler,
                           log_z=torch.tensor(1.5), **common)
    c = fused_nce.nce_loss(p.hidden, p.weight, p.bias, p.target, p.sampler, **common)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


def test_float_log_z_is_made_once_and_stays_right(device):
    """A float log_z is made into a tensor once and reused: a value first seen in inference mode
    still serves a training step, and a schedule of values (more than are kept) gives each call
    its own value."""
    p = make_problem(device=device, dtype=torch.float64)
    common = dict(negatives=p.negatives)
    with torch.inference_mode():
        first = fused_nce.nce_loss(p.hidden, p.weight, p.bias, p.target, p.sampler, log_z=0.75,
                                   **common)
    h, w, b = p.leaves()
    trained = fused_nce.nce_loss(h, w, b, p.target, p.sampler, log_z=0.75, **common)
    trained.backward()
    assert torch.equal(trained.detach(), first)
    for value in [0.1 * i for i in range(100)]:
        loss = fused_nce.nce_loss(p.hidden, p.weight, p.bias, p.target, p.sampler, log_z=value,
                                  **common)
        expected = reference.nce_loss(p.hidden, p.weight, p.bias, p.target, p.sampler.probs,
                                      p.negatives, log_z=torch.tensor(value, dtype=torch.float64))
        torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)


def test_duplicate_negatives_count_each_time(device):
    """A negative drawn twice contributes twice, in the loss and in the gradient."""
    p = make_problem(n=1, k=1, ignore_every=0, hits=False, device=device, dtype=torch.float64)
    p.target.fill_(3)
    once = p.negatives.reshape(1, 1).clone().fill_(5)
    twice = once.repeat(1, 2)
    h, w, b = p.leaves()
    base = fused_nce.negative_sampling_loss(h, w, b, p.target, negatives=once.new_tensor([[4]]))
    single = fused_nce.negative_sampling_loss(h, w, b, p.target, negatives=torch.cat([once.new_tensor([[4]]), once], 1))
    double = fused_nce.negative_sampling_loss(h, w, b, p.target, negatives=torch.cat([once.new_tensor([[4]]), twice], 1))
    torch.testing.assert_close(double - single, single - base)
    w.grad = None
    double.backward()
    term = torch.sigmoid(h.detach()[0] @ w.detach()[5] + b.detach()[5])
    torch.testing.assert_close(w.grad[5], 2 * term * h.detach()[0])


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_sampling_inside_the_loss(device, objective):
    """With num_negatives the loss draws from noise; the same seed gives the same loss."""
    p = make_problem(device=device)
    fn = getattr(fused_nce, f"{objective}_loss")
    losses = []
    for _ in range(2):
        torch.manual_seed(123)
        losses.append(fn(p.hidden, p.weight, p.bias, p.target, p.sampler, num_negatives=5))
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)
    g = torch.Generator(device=device).manual_seed(7)
    other = fn(p.hidden, p.weight, p.bias, p.target, p.sampler, num_negatives=5, generator=g)
    assert other.item() != losses[0].item()
    # Drawing explicitly with the same generator state gives the same loss.
    g.manual_seed(7)
    negatives = p.sampler.sample((p.target.numel(), 5), generator=g)
    explicit = fn(p.hidden, p.weight, p.bias, p.target, p.sampler, negatives=negatives)
    torch.testing.assert_close(other, explicit, rtol=0, atol=0)


def test_noise_as_weights_tensor(device):
    p = make_problem(device=device)
    weights = p.sampler.probs * 3.0
    a = fused_nce.nce_loss(p.hidden, p.weight, p.bias, p.target, weights, negatives=p.negatives)
    b = fused_nce.nce_loss(p.hidden, p.weight, p.bias, p.target, p.sampler, negatives=p.negatives)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("shared", [False, True], ids=["per_example", "shared"])
def test_backward_is_bitwise_reproducible(device, shared):
    """CPU: always, outside deterministic mode too. CUDA: in deterministic mode (atomics
    otherwise). Across thread counts only where the path promises it (helpers)."""
    p = make_problem(n=300, dim=64, num_classes=40, k=16, device=device, shared=shared)
    threads = max(2, torch.get_num_threads())
    with deterministic_algorithms(p.hidden.is_cuda):
        runs = runs_per_thread_count(lambda: loss_and_grads(run_fused, "nce", p)[1],
                                     [1, threads, 1, threads])
    assert_bitwise_reproducible(runs, across_thread_counts=not shared)


def test_opcheck(device):
    ops = torch.ops.fused_nce
    for shared in [False, True]:
        p = make_problem(n=11, dim=8, num_classes=13, k=3, device=device, shared=shared)
        log_z = torch.tensor(0.2, device=device)
        for objective in range(3):
            args = (p.hidden, p.weight, p.bias, p.target, p.negatives, None, p.sampler.probs,
                    log_z, objective, 1.0, True, -100)
            torch.library.opcheck(ops.sampled_loss_forward.default, args)
        _, coef = ops.sampled_loss_forward(*args)
        # The differentiable op (autograd in C++): every reduction, dense and sparse gradients.
        hidden, weight, bias = (t.detach().requires_grad_() for t in (p.hidden, p.weight, p.bias))
        for reduction, sparse_grad in [(0, False), (1, False), (2, False), (2, True)]:
            torch.library.opcheck(
                ops.sampled_loss.default,
                (hidden, weight, bias, p.target, p.negatives, None, p.sampler.probs,
                 log_z.clone().requires_grad_(), 0, 1.0, True, -100, sparse_grad, reduction),
                test_utils=("test_schema", "test_autograd_registration", "test_faketensor")
                + (() if sparse_grad else ("test_aot_dispatch_dynamic",)))
        grad_loss = torch.linspace(0.1, 1.0, 11, device=device)
        torch.library.opcheck(ops.sampled_loss_backward.default,
                              (grad_loss, coef, p.hidden, p.weight, True, p.target, p.negatives,
                               None, -100))
        torch.library.opcheck(ops.sampled_loss_backward_hidden.default,
                              (grad_loss, coef, p.hidden, p.weight, p.target, p.negatives, None,
                               -100))
        # A scalar grad_loss (a reduced loss's) stands for the same value for every example.
        scalar = torch.tensor(0.3, device=device)
        for op in (ops.sampled_loss_backward, ops.sampled_loss_backward_rows):
            args = (coef, p.hidden, p.weight, True, p.target, p.negatives, None, -100)
            torch.library.opcheck(op.default, (scalar, *args))
            # Bitwise: on CUDA the dense rows are summed in a fixed order in deterministic mode.
            with deterministic_algorithms(device.type == "cuda"):
                pairs = zip(op(scalar, *args), op(scalar.expand(11).contiguous(), *args))
                for got, expected in pairs:
                    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    torch.library.opcheck(ops.alias_build.default, (torch.rand(17, dtype=torch.float64),))
    table = fused_nce.AliasSampler(torch.rand(17), device=device).table
    # A fresh generator per call makes the random op's output comparable across opcheck's runs.
    torch.library.opcheck(ops.alias_sample.default, (table, [5, 3], None),
                          test_utils=("test_schema", "test_faketensor"))


def test_full_softmax_loss_matches_cross_entropy(device):
    p = make_problem(n=40, num_classes=50, device=device, dtype=torch.float64)
    h, w, b = p.leaves()
    logits = h @ w.T + b
    expected = torch.nn.functional.cross_entropy(logits, p.target, ignore_index=-100)
    for chunk in [None, 7, 50, 1000]:
        loss = fused_nce.full_softmax_loss(h, w, b, p.target, chunk_size=chunk)
        torch.testing.assert_close(loss, expected)
        (grad_h,) = torch.autograd.grad(loss, h)
        (expected_grad_h,) = torch.autograd.grad(expected, h, retain_graph=True)
        torch.testing.assert_close(grad_h, expected_grad_h)
    none = fused_nce.full_softmax_loss(h, w, None, p.target, reduction="none", chunk_size=9)
    assert none.shape == p.target.shape and none[0].item() == 0.0
    torch.testing.assert_close(reference.full_softmax_loss(h, w, b, p.target),
                               expected)


def test_full_softmax_bfloat16_loss_is_float32(device):
    p = make_problem(dtype=torch.bfloat16, device=device)
    loss = fused_nce.full_softmax_loss(p.hidden, p.weight, p.bias, p.target, chunk_size=16)
    assert loss.dtype == torch.float32
    exact = fused_nce.full_softmax_loss(p.hidden.double(), p.weight.double(), p.bias.double(), p.target)
    torch.testing.assert_close(loss.double(), exact, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_inference_mode_no_grad_and_grad_mode_agree(device, reduction):
    """Under inference_mode the op runs below autograd (its forward-only kernel): the same loss
    as under no_grad and as the differentiable path, for a 2-D batch too."""
    p = make_problem(n=12, device=device, batch_shape=(3, 4))
    h, w, b = p.leaves()
    kwargs = dict(negatives=p.negatives, remove_accidental_hits=True, reduction=reduction)
    with torch.inference_mode():
        inference = fused_nce.nce_loss(p.hidden, p.weight, p.bias, p.target, p.sampler, **kwargs)
    with torch.no_grad():
        no_grad = fused_nce.nce_loss(p.hidden, p.weight, p.bias, p.target, p.sampler, **kwargs)
    with_grad = fused_nce.nce_loss(h, w, b, p.target, p.sampler, **kwargs)
    assert inference.shape == no_grad.shape == with_grad.shape == (
        p.target.shape if reduction == "none" else ())
    assert torch.equal(inference, no_grad)
    assert torch.equal(inference, with_grad.detach())
    assert no_grad.grad_fn is None and with_grad.grad_fn is not None


def test_graph_node_keeps_its_tensors_only_while_retained(device):
    """The loss's graph node: retain_graph keeps its saved tensors (a second backward adds the
    same gradients again); without it they are freed, and another backward raises autograd's
    own error instead of reading freed memory."""
    p = make_problem(n=9, device=device)
    h, w, b = p.leaves()
    loss = fused_nce.nce_loss(h, w, b, p.target, p.sampler, negatives=p.negatives)
    assert loss.grad_fn.name() == "SampledLossBackward"
    loss.backward(retain_graph=True)
    first = [t.grad.clone() for t in (h, w, b)]
    loss.backward()
    for t, g in zip((h, w, b), first):
        torch.testing.assert_close(t.grad, 2 * g)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss.backward()


def test_backward_runs_only_for_the_gradients_asked_for():
    """autograd.grad(loss, [hidden]) with a trainable weight runs the grad_hidden-only backward
    (no weight rows at all), and asking for log_z alone runs no backward kernel; the gradients
    are those of a full backward."""
    p = make_problem(n=9)
    h, w, b = p.leaves()
    log_z = torch.tensor(0.1, requires_grad=True)
    loss = fused_nce.nce_loss(h, w, b, p.target, p.sampler, negatives=p.negatives, log_z=log_z)
    everything = torch.autograd.grad(loss, [h, w, b, log_z], retain_graph=True)

    def ops_run_for(inputs):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            grads = torch.autograd.grad(loss, inputs, retain_graph=True)
        names = {e.name for e in prof.events() if e.name.startswith("fused_nce::")}
        return grads, names

    (grad_hidden,), names = ops_run_for([h])
    assert names == {"fused_nce::sampled_loss_backward_hidden"}
    assert torch.equal(grad_hidden, everything[0])
    (grad_log_z,), names = ops_run_for([log_z])
    assert names == set()
    assert torch.equal(grad_log_z, everything[3])


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_negative_view_of_the_incoming_gradient(reduction):
    """An incoming gradient that is a negative view (its sign a flag, not in its data) is read
    with its sign, as the dispatcher would."""
    class TwiceNegated(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            return (grad * 2)._neg_view()

    p = make_problem(n=9)
    grads = []
    for wrap in (False, True):
        h, w, b = p.leaves()
        loss = fused_nce.nce_loss(h, w, b, p.target, p.sampler, negatives=p.negatives,
                                  reduction=reduction)
        (TwiceNegated.apply(loss) if wrap else loss).backward()
        grads.append([h.grad, w.grad, b.grad])
    for plain, negated in zip(*grads):
        torch.testing.assert_close(negated, -2 * plain)


def test_torch_func_grad_and_vjp_match_autograd():
    """torch.func's reverse-mode transforms go through the same graph node: grad and vjp give
    autograd's gradients."""
    p = make_problem(n=9)
    leaves = p.leaves()

    def loss(hidden, weight, bias):
        return fused_nce.nce_loss(hidden, weight, bias, p.target, p.sampler,
                                  negatives=p.negatives)

    loss(*leaves).backward()
    expected = [t.grad for t in leaves]
    plain = [t.detach() for t in leaves]
    by_grad = torch.func.grad(loss, argnums=(0, 1, 2))(*plain)
    by_vjp = torch.func.vjp(loss, *plain)[1](torch.tensor(1.0))
    for g, v, e in zip(by_grad, by_vjp, expected):
        torch.testing.assert_close(g, e)
        torch.testing.assert_close(v, e)


# torch's forward-mode machinery scripts helpers on first use, under its own deprecation warning.
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_frozen_inputs_record_no_graph_and_tangents_are_refused(device):
    """Nothing requires grad: a plain tensor comes back, no graph node. A forward-mode tangent
    is refused with autograd's error (the loss is differentiable in reverse mode only), not
    dropped."""
    p = make_problem(n=10, device=device)
    frozen = fused_nce.nce_loss(p.hidden, p.weight, p.bias, p.target, p.sampler,
                                negatives=p.negatives)
    assert frozen.grad_fn is None and not frozen.requires_grad
    with fwAD.dual_level():
        dual = fwAD.make_dual(p.hidden, torch.ones_like(p.hidden))
        with pytest.raises(RuntimeError, match="jvp"):
            fused_nce.nce_loss(dual, p.weight, p.bias, p.target, p.sampler, negatives=p.negatives)
