"""torch.compile(fullgraph=True): no graph break, sampling included; compiled == eager."""

import pytest
import torch

import fused_nce
from conftest import OBJECTIVES
from helpers import make_problem

NUM_NEGATIVES = 5


def no_graph_break(fn, *args) -> None:
    explanation = torch._dynamo.explain(fn)(*args)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_training_step_compiles_to_one_graph_and_matches_eager(device):
    """Model + NCELoss (drawing its negatives, learned log_z) compiled with fullgraph=True: the
    same seed gives the same per-example losses (so the same negatives) and gradients as eager."""
    p = make_problem(n=20, dim=12, num_classes=50, device=device, ignore_every=0)
    embed = torch.nn.Embedding(50, 12).to(device)
    crit = fused_nce.NCELoss(50, p.sampler.probs.cpu(), NUM_NEGATIVES, learn_log_z=True,
                             reduction="none").to(device)
    context, target = p.target.clone(), (p.target * 7 + 3) % 50
    weight, bias = p.leaves()[1:]
    params = [embed.weight, weight, bias, crit.log_z]

    def step(context, target):
        return crit(embed(context), weight, bias, target)

    def run(fn, seed):
        for param in params:
            param.grad = None
        torch.manual_seed(seed)
        loss = fn(context, target)
        loss.mean().backward()
        return loss.detach(), [param.grad.clone() for param in params]

    compiled_step = torch.compile(step, fullgraph=True)
    for seed in [3, 4]:
        loss, grads = run(compiled_step, seed)
        expected_loss, expected_grads = run(step, seed)
        torch.testing.assert_close(loss, expected_loss, rtol=0, atol=0)
        for g, expected in zip(grads, expected_grads):
            torch.testing.assert_close(g, expected, rtol=1e-5, atol=1e-6)
    assert not torch.equal(run(compiled_step, 5)[0], loss)  # a new seed, new draws


def test_dynamic_batch_size_without_recompiling(device):
    """dynamic=True: one graph for every batch size; the draws and all three objectives, per
    example and shared, equal eager's."""
    p = make_problem(n=30, dim=8, num_classes=40, device=device)
    weight, bias = p.weight, p.bias

    def losses(hidden, target):
        # One draw per graph: the compiler may reorder independent draws (see the README).
        negatives = p.sampler.sample((target.shape[0], 4))
        return negatives, torch.stack([
            fused_nce.nce_loss(hidden, weight, bias, target, p.sampler, negatives=negatives),
            fused_nce.negative_sampling_loss(hidden, weight, None, target, negatives=negatives[0],
                                             shared_negatives=True),
            fused_nce.sampled_softmax_loss(hidden, weight, bias, target, p.sampler,
                                           negatives=negatives, reduction="sum"),
        ])

    compiled = torch.compile(losses, fullgraph=True, dynamic=True)
    for n in [7, 19, 30]:
        hidden, target = p.hidden[:n], p.target[:n]
        torch.manual_seed(n)
        expected_negatives, expected = losses(hidden, target)
        torch.manual_seed(n)
        with torch._dynamo.config.patch(error_on_recompile=n != 7):
            negatives, loss = compiled(hidden, target)
        assert torch.equal(negatives, expected_negatives)
        torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)


def test_compiled_under_autocast(device):
    """A float32 output layer with autocast inside the compiled function, as in eager."""
    p = make_problem(n=16, dim=8, num_classes=40, device=device)
    hidden, weight, bias = p.hidden.detach(), *p.leaves()[1:]

    def loss_fn(hidden, target):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return fused_nce.nce_loss(hidden, weight, bias, target, p.sampler, num_negatives=4)

    torch.manual_seed(0)
    expected = loss_fn(hidden, p.target)
    torch.manual_seed(0)
    loss = torch.compile(loss_fn, fullgraph=True)(hidden, p.target)
    assert loss.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_no_graph_break_for_every_way_to_give_negatives(objective):
    """Noise as a sampler or as raw weights (validated without reading values while tracing),
    explicit and shared negatives, sparse gradients off."""
    p = make_problem()
    fn = getattr(fused_nce, f"{objective}_loss")
    weights = p.sampler.probs * 2

    def all_modes(hidden, weight, bias, target, negatives):
        return (fn(hidden, weight, bias, target, p.sampler, num_negatives=3)
                + fn(hidden, weight, bias, target, weights, num_negatives=3, shared_negatives=True)
                + fn(hidden, weight, bias, target, p.sampler, negatives=negatives)
                + fused_nce.full_softmax_loss(hidden, weight, bias, target, chunk_size=16))

    no_graph_break(all_modes, p.hidden, p.weight, p.bias, p.target, p.negatives)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_dynamic_batch_size_backward_without_recompiling(device, reduction):
    """dynamic=True through backward as well (the autograd in C++ reads sizes symbolically): one
    graph for every batch size, and the gradients equal eager's."""
    p = make_problem(n=30, dim=8, num_classes=40, device=device)
    weight, bias = p.leaves()[1:]

    def step(hidden, target, negatives):
        loss = fused_nce.nce_loss(hidden, weight, bias, target, p.sampler, negatives=negatives,
                                  reduction=reduction)
        return loss if reduction != "none" else loss.sum()

    compiled = torch.compile(step, fullgraph=True, dynamic=True)
    for n in [7, 19, 30]:
        grads = []
        for fn in (step, compiled):
            hidden = p.hidden[:n].detach().clone().requires_grad_()
            weight.grad = bias.grad = None
            with torch._dynamo.config.patch(error_on_recompile=fn is compiled and n != 7):
                fn(hidden, p.target[:n], p.negatives[:n]).backward()
            grads.append([hidden.grad, weight.grad, bias.grad])
        for actual, expected in zip(grads[1], grads[0]):
            torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def test_double_backward_raises():
    """Once differentiable: create_graph works, differentiating the gradients again raises."""
    p = make_problem(n=10, dim=6, num_classes=20)
    hidden, weight, bias = p.leaves()
    loss = fused_nce.nce_loss(hidden, weight, bias, p.target, p.sampler, negatives=p.negatives)
    (grad_hidden,) = torch.autograd.grad(loss, hidden, create_graph=True)
    assert grad_hidden.requires_grad
    with pytest.raises(RuntimeError, match="once differentiable"):
        grad_hidden.sum().backward()


@pytest.mark.parametrize("sparse_grad", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compiled_autograd_matches_eager(device, sparse_grad, reduction):
    """Compiled autograd takes the loss's backward node into its graph (its backward ops, traced
    through their fake kernels): the gradients of every input, log_z included, equal eager's.
    torch.compile does not trace sparse tensors, so with sparse_grad the graph breaks where the
    COO gradients are made (no fullgraph)."""
    from torch._dynamo import compiled_autograd
    from torch._dynamo.utils import counters

    p = make_problem(n=14, dim=6, num_classes=30, device=device, ignore_every=4)

    def gradients(compiled: bool):
        hidden, weight, bias = p.leaves()
        log_z = torch.tensor(0.2, device=device, requires_grad=True)
        loss = fused_nce.nce_loss(hidden, weight, bias, p.target, p.sampler, log_z=log_z,
                                  negatives=p.negatives, reduction=reduction,
                                  sparse_grad=sparse_grad)
        loss = loss if reduction != "none" else (loss * torch.arange(14, device=device)).sum()
        if compiled:
            compiler = torch.compile(backend="aot_eager", fullgraph=not sparse_grad)
            with compiled_autograd._enable(compiler):
                loss.backward()
        else:
            loss.backward()
        grads = [t.grad for t in (hidden, weight, bias, log_z)]
        return [g.to_dense() if g.is_sparse else g for g in grads]

    counters.clear()
    expected = gradients(compiled=False)
    actual = gradients(compiled=True)
    assert counters["compiled_autograd"]["captures"] == 1
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)
