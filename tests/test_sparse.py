"""sparse_grad=True: coalesced COO gradients of only the touched rows, for sparse optimizers."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import fused_nce
from conftest import OBJECTIVES
from helpers import deterministic_algorithms, make_problem


def touched_rows(p, remove_hits):
    """Classes whose rows get a gradient: kept targets and their (not dropped) negatives."""
    target = p.target.reshape(-1).cpu()
    kept = target != -100
    rows = set(target[kept].tolist())
    if p.negatives.dim() == 1:
        return rows | set(p.negatives.tolist())
    negatives = p.negatives.reshape(target.numel(), -1).cpu()
    for t, negs in zip(target[kept].tolist(), negatives[kept].tolist()):
        rows |= {n for n in negs if not (remove_hits and n == t)}
    return rows


@pytest.mark.parametrize("num_classes", [129, 200_003])
def test_sparse_rows_at_word_edges_of_a_large_vocabulary(device, num_classes):
    """Rows at the first and last of each 64-row word, and V's last row, among a few entries of
    a large V: the row gradient lists exactly them, ascending, with the dense gradient's values."""
    edges = sorted({0, 1, 62, 63, 64, 65, 127, 128, num_classes - 1})
    target = torch.tensor([63, 0, 128, num_classes - 1, 64, 63], device=device)
    negatives = torch.tensor([[1, 62, 65], [127, 64, 0], [63, 1, num_classes - 1],
                              [128, 127, 62], [65, 65, 1], [0, 128, 64]], device=device)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(6, 5, generator=g).to(device).requires_grad_()
    weight = torch.randn(num_classes, 5, generator=g).to(device).requires_grad_()
    bias = torch.randn(num_classes, generator=g).to(device).requires_grad_()
    noise = torch.ones(num_classes, device=device)

    def grads(sparse_grad):
        loss = fused_nce.nce_loss(hidden, weight, bias, target, noise, negatives=negatives,
                                  sparse_grad=sparse_grad)
        return torch.autograd.grad(loss, (weight, bias))

    dense, sparse = grads(False), grads(True)
    for g_sparse, g_dense in zip(sparse, dense):
        assert g_sparse.indices().tolist() == [edges]
        torch.testing.assert_close(g_sparse.to_dense(), g_dense, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("shared", [False, True], ids=["per_example", "shared"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("deterministic", [False, True], ids=["default", "deterministic"])
def test_sparse_gradient_is_the_dense_gradients_touched_rows(device, objective, shared, dtype,
                                                             deterministic):
    """Same rows and values. Bitwise where both sum each row in the same order (the CPU always;
    CUDA in deterministic mode); CUDA's default dense path adds with atomics, so up to rounding."""
    p = make_problem(n=23, num_classes=500, dtype=dtype, device=device, shared=shared)
    fn = getattr(fused_nce, f"{objective}_loss")
    remove_hits = objective == "sampled_softmax"
    leaves = p.leaves()

    def grads(sparse_grad):
        loss = fn(*leaves, p.target, p.sampler, negatives=p.negatives, sparse_grad=sparse_grad,
                  remove_accidental_hits=remove_hits)
        return torch.autograd.grad(loss, leaves)

    with deterministic_algorithms(deterministic):
        dense, sparse = grads(False), grads(True)
    exact = device.type == "cpu" or deterministic
    tol = 0 if exact else 1e-6
    torch.testing.assert_close(sparse[0], dense[0], rtol=0, atol=0)  # hidden: dense as ever
    expected_rows = sorted(touched_rows(p, remove_hits))
    assert len(expected_rows) < p.weight.shape[0] // 2
    for g, g_dense in zip(sparse[1:], dense[1:]):
        assert g.layout == torch.sparse_coo and g.is_coalesced()
        assert g.dtype == dtype and g.shape == g_dense.shape
        assert g.indices().tolist() == [expected_rows]
        torch.testing.assert_close(g.to_dense(), g_dense, rtol=tol, atol=tol)


class OpCalls(TorchDispatchMode):
    """Names of the ops run under it."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("shared", [False, True], ids=["per_example", "shared"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_frozen_output_layer_computes_grad_hidden_alone(device, shared, dtype):
    """Only hidden needs a gradient: backward runs the grad_hidden-only op (no row sums, no
    sort, no host sync) and gives the same grad_hidden as a full backward."""
    p = make_problem(n=31, num_classes=400, dtype=dtype, device=device, shared=shared)
    hidden, weight, bias = p.leaves()
    loss = fused_nce.nce_loss(hidden, weight, bias, p.target, p.sampler, negatives=p.negatives)
    (expected,) = torch.autograd.grad(loss, hidden, retain_graph=True)
    frozen_w, frozen_b = weight.detach(), bias.detach()
    loss = fused_nce.nce_loss(hidden, frozen_w, frozen_b, p.target, p.sampler,
                              negatives=p.negatives)
    with OpCalls() as calls:
        (grad_hidden,) = torch.autograd.grad(loss, hidden)
    assert "fused_nce.sampled_loss_backward_hidden.default" in calls.names
    assert not any("backward_rows" in n or n == "fused_nce.sampled_loss_backward.default"
                   for n in calls.names)
    torch.testing.assert_close(grad_hidden, expected, rtol=0, atol=0)


def test_grad_attribute_and_no_bias(device):
    """loss.backward() leaves a sparse .grad with the same rows; bias=None works; log_z dense."""
    p = make_problem(device=device)
    hidden, weight = p.leaves()[:2]
    log_z = torch.tensor(0.5, device=device, requires_grad=True)
    for _ in range(2):  # the second backward accumulates into the sparse .grad
        fused_nce.nce_loss(hidden, weight, None, p.target, p.sampler, negatives=p.negatives,
                           log_z=log_z, sparse_grad=True).backward()
    assert weight.grad.layout == torch.sparse_coo and log_z.grad.layout == torch.strided
    dense_weight = p.weight.clone().requires_grad_()
    fused_nce.nce_loss(hidden, dense_weight, None, p.target, p.sampler, negatives=p.negatives,
                       log_z=log_z).backward()
    # PyTorch's gradient accumulation does not keep the coalesced flag (nor for nn.Embedding).
    torch.testing.assert_close(weight.grad.coalesce().to_dense(), 2 * dense_weight.grad)


def test_module_sparse_grad(device):
    p = make_problem(device=device)
    crit = fused_nce.NCELoss(p.weight.shape[0], p.sampler.probs.cpu(), 5, sparse_grad=True,
                             objective="sampled_softmax").to(device)
    weight, bias = p.leaves()[1:]
    torch.manual_seed(0)
    crit(p.hidden, weight, bias, p.target).backward()
    assert weight.grad.layout == bias.grad.layout == torch.sparse_coo
    assert "sparse_grad=True" in repr(crit)


class LargestDenseOutput(TorchDispatchMode):
    """Records the largest strided tensor any op creates."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.layout == torch.strided:
                self.numel = max(self.numel, t.numel())
        return out


@pytest.mark.parametrize("shared", [False, True], ids=["per_example", "shared"])
def test_sparse_backward_never_allocates_a_dense_weight_gradient(shared):
    num_classes, dim = 20_000, 16
    p = make_problem(n=12, dim=dim, num_classes=num_classes, k=5, shared=shared)
    largest = {}
    for sparse_grad in [False, True]:
        hidden, weight, bias = p.leaves()
        loss = fused_nce.nce_loss(hidden, weight, bias, p.target, p.sampler,
                                  negatives=p.negatives, sparse_grad=sparse_grad)
        with LargestDenseOutput() as mode:
            loss.backward()
        largest[sparse_grad] = mode.numel
    assert largest[False] == num_classes * dim  # the dense path does write [V, D]
    assert largest[True] <= 12 * 6 * dim  # at most N (1 + k) rows


def step_with(optimizer_cls, sparse_grad, steps=3, **kwargs):
    p = make_problem(n=40, dim=8, num_classes=300, k=6, seed=1)
    hidden, weight, bias = p.leaves()
    optimizer = optimizer_cls([weight, bias], **kwargs)
    losses = []
    for step in range(steps):
        optimizer.zero_grad()
        torch.manual_seed(step)
        loss = fused_nce.negative_sampling_loss(hidden.detach(), weight, bias, p.target, p.sampler,
                                                num_negatives=6, sparse_grad=sparse_grad)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return p.weight, weight.detach(), losses


@pytest.mark.parametrize("optimizer_cls, kwargs", [
    (torch.optim.SGD, dict(lr=0.5)),
    (torch.optim.Adagrad, dict(lr=0.5)),
], ids=["sgd", "adagrad"])
def test_sparse_optimizers_match_dense(optimizer_cls, kwargs):
    """SGD and Adagrad take the sparse gradient and make the same steps as with the dense one."""
    _, dense, dense_losses = step_with(optimizer_cls, False, **kwargs)
    _, sparse, sparse_losses = step_with(optimizer_cls, True, **kwargs)
    torch.testing.assert_close(sparse, dense, rtol=1e-6, atol=1e-6)
    assert sparse_losses == pytest.approx(dense_losses, rel=1e-6)


def test_sparse_adam_trains_touched_rows_only():
    """SparseAdam's first step equals Adam's (untouched rows have a zero gradient there); only
    rows that were ever drawn or targeted move."""
    # The two place eps differently; a tiny eps makes their first steps agree.
    start, adam, _ = step_with(torch.optim.Adam, False, steps=1, lr=0.1, eps=1e-14)
    _, sparse_adam, _ = step_with(torch.optim.SparseAdam, True, steps=1, lr=0.1, eps=1e-14)
    torch.testing.assert_close(sparse_adam, adam, rtol=1e-6, atol=1e-6)
    _, trained, losses = step_with(torch.optim.SparseAdam, True, steps=20, lr=0.05)
    assert losses[-1] < losses[0]
    moved = (trained != start).any(1)
    assert 0 < moved.sum() < start.shape[0]


def test_sparse_grad_with_leading_batch_dims_and_reductions(device):
    p = make_problem(device=device, batch_shape=(3, 7))
    for reduction in ["mean", "sum", "none"]:
        leaves = p.leaves()
        # Bitwise: CUDA's dense rows are summed in the sparse path's order in deterministic mode.
        with deterministic_algorithms(device.type == "cuda"):
            loss = fused_nce.sampled_softmax_loss(*leaves, p.target, p.sampler,
                                                  negatives=p.negatives, reduction=reduction,
                                                  sparse_grad=True)
            sparse = torch.autograd.grad(loss.sum(), leaves)
            loss = fused_nce.sampled_softmax_loss(*leaves, p.target, p.sampler,
                                                  negatives=p.negatives, reduction=reduction)
            dense = torch.autograd.grad(loss.sum(), leaves)
        for g, expected in zip(sparse, dense):
            torch.testing.assert_close(g.to_dense(), expected, rtol=0, atol=0)
