"""torch.autocast: inputs cast as F.linear casts them, the loss stays float32."""

import pytest
import torch

import fused_nce
from conftest import OBJECTIVES
from helpers import make_problem

AUTOCAST_DTYPES = [torch.bfloat16, torch.float16]


def grads_of(loss, leaves):
    return torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("shared", [False, True], ids=["per_example", "shared"])
@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES, ids=str)
def test_float32_weight_with_low_precision_hidden(device, objective, shared, dtype):
    """Under autocast a float32 output layer meets low-precision activations, as with F.linear;
    the result is the loss on the inputs cast by hand, and each gradient is in its input's dtype."""
    p = make_problem(device=device, shared=shared)
    fn = getattr(fused_nce, f"{objective}_loss")
    hidden = p.hidden.to(dtype).requires_grad_()
    weight, bias = p.leaves()[1:]
    with torch.autocast(device.type, dtype=dtype):
        assert torch.nn.functional.linear(hidden, weight, bias).dtype == dtype
        loss = fn(hidden, weight, bias, p.target, p.sampler, negatives=p.negatives)
        # Backward inside the region too: the kernels' float32 GEMMs must not be recast.
        grads = grads_of(loss, [hidden, weight, bias])
    assert loss.dtype == torch.float32
    by_hand = fn(hidden, weight.to(dtype), bias.to(dtype), p.target, p.sampler,
                 negatives=p.negatives)
    torch.testing.assert_close(loss, by_hand, rtol=0, atol=0)
    for g, expected, leaf in zip(grads, grads_of(by_hand, [hidden, weight, bias]),
                                 [hidden, weight, bias]):
        assert g.dtype == leaf.dtype
        torch.testing.assert_close(g, expected.to(leaf.dtype), rtol=0, atol=0)
    # And it is a faithful low-precision version of the float32 loss.
    exact = fn(p.hidden.float(), weight, bias, p.target, p.sampler, negatives=p.negatives)
    torch.testing.assert_close(loss, exact, rtol=3e-2, atol=3e-2)


def test_mixed_dtypes_still_rejected_outside_autocast(device):
    p = make_problem(device=device)
    with pytest.raises(TypeError, match="weight"):
        fused_nce.nce_loss(p.hidden.bfloat16(), p.weight, p.bias, p.target, p.sampler,
                           negatives=p.negatives)


def test_float64_is_not_cast(device):
    """As with F.linear, autocast leaves float64 alone: float64 loss, same value."""
    p = make_problem(device=device, dtype=torch.float64)
    args = (p.hidden, p.weight, p.bias, p.target, p.sampler)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss = fused_nce.sampled_softmax_loss(*args, negatives=p.negatives)
    assert loss.dtype == torch.float64
    assert torch.equal(loss, fused_nce.sampled_softmax_loss(*args, negatives=p.negatives))


def test_module_and_sparse_gradients_under_autocast(device):
    """NCELoss draws under autocast; a float32 weight still gets its sparse float32 gradient."""
    p = make_problem(device=device, ignore_every=0)
    crit = fused_nce.NCELoss(p.weight.shape[0], p.sampler.probs.cpu(), 4,
                             sparse_grad=True).to(device)
    weight = p.weight.clone().requires_grad_()
    with torch.autocast(device.type, dtype=torch.bfloat16):
        torch.manual_seed(0)
        loss = crit(p.hidden, weight, None, p.target)
    loss.backward()
    assert loss.dtype == torch.float32
    assert weight.grad.layout == torch.sparse_coo and weight.grad.dtype == torch.float32
    dense = p.weight.clone().requires_grad_()
    crit.sparse_grad = False
    with torch.autocast(device.type, dtype=torch.bfloat16):
        torch.manual_seed(0)
        crit(p.hidden, dense, None, p.target).backward()
    torch.testing.assert_close(weight.grad.to_dense(), dense.grad, rtol=0, atol=0)


def test_full_softmax_loss_under_autocast(device):
    """Evaluation under autocast: bfloat16 inputs, float32 logits and loss."""
    p = make_problem(device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss = fused_nce.full_softmax_loss(p.hidden, p.weight, p.bias, p.target, chunk_size=16)
    assert loss.dtype == torch.float32
    by_hand = fused_nce.full_softmax_loss(p.hidden.bfloat16(), p.weight.bfloat16(),
                                          p.bias.bfloat16(), p.target)
    torch.testing.assert_close(loss, by_hand, rtol=1e-6, atol=1e-6)
