"""CPU weight gradients of 32 MiB or more (dense, or a sparse one's rows) reuse dropped memory."""

import multiprocessing

import pytest
import torch

import fused_nce
from fused_nce import reference
from helpers import make_problem

# [V, D] float32 of 33 MiB: over the reuse threshold.
NUM_CLASSES, DIM = 135_000, 64


def dense_grads(p, objective, hidden, weight, bias, negatives):
    fn = getattr(fused_nce, f"{objective}_loss")
    loss = fn(hidden, weight, bias, p.target, p.sampler, negatives=negatives)
    return torch.autograd.grad(loss, (hidden, weight, bias))


@pytest.mark.parametrize("objective", ["nce", "sampled_softmax"])
@pytest.mark.parametrize("shared", [False, True], ids=["per_example", "shared"])
@pytest.mark.parametrize("threads", [1, 2])
def test_a_reused_buffer_holds_only_the_new_gradient(objective, shared, threads):
    """The second gradient lands in the first one's memory (its old rows still there) and must
    equal the reference: every row is written, zeros included."""
    p = make_problem(n=37, dim=DIM, num_classes=NUM_CLASSES, k=6, shared=shared)
    hidden, weight, bias = p.leaves()
    other = torch.randint(0, NUM_CLASSES, p.negatives.shape, generator=torch.Generator().manual_seed(1))
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        fused_nce.release_cpu_buffers()
        first = dense_grads(p, objective, hidden, weight, bias, p.negatives)[1]
        address = first.data_ptr()
        del first  # its memory becomes the spare buffer
        assert fused_nce.utils.spare_cpu_buffer_bytes() >= NUM_CLASSES * DIM * 4
        grads = dense_grads(p, objective, hidden, weight, bias, other)
        assert grads[1].data_ptr() == address
        assert fused_nce.utils.spare_cpu_buffer_bytes() == 0
    finally:
        torch.set_num_threads(previous)
    ref_fn = getattr(reference, f"{objective}_loss")
    h, w, b = (t.detach().double().requires_grad_() for t in (hidden, weight, bias))
    ref_loss = ref_fn(h, w, b, p.target, p.sampler.probs.double(), other)
    expected = torch.autograd.grad(ref_loss, (h, w, b))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_release_gives_the_spare_buffers_back():
    p = make_problem(n=8, dim=DIM, num_classes=NUM_CLASSES, k=3)
    hidden, weight, bias = p.leaves()
    fused_nce.release_cpu_buffers()
    grads = [dense_grads(p, "nce", hidden, weight, bias, p.negatives)[1] for _ in range(3)]
    del grads  # three buffers dropped: two are kept, the third unmapped
    nbytes = fused_nce.utils.spare_cpu_buffer_bytes()
    assert NUM_CLASSES * DIM * 4 * 2 <= nbytes < NUM_CLASSES * DIM * 4 * 2 + (8 << 20)
    assert fused_nce.release_cpu_buffers() == nbytes
    assert fused_nce.utils.spare_cpu_buffer_bytes() == 0
    assert fused_nce.release_cpu_buffers() == 0


def test_small_gradients_use_the_ordinary_allocator():
    p = make_problem(n=8, dim=8, num_classes=1000, k=3)
    hidden, weight, bias = p.leaves()
    fused_nce.release_cpu_buffers()
    grad = dense_grads(p, "nce", hidden, weight, bias, p.negatives)[1]
    del grad
    assert fused_nce.utils.spare_cpu_buffer_bytes() == 0


@pytest.mark.parametrize("threads", [1, 2])
def test_sparse_rows_reuse_a_buffer_of_about_their_size(threads):
    """The [U, D] rows of a sparse gradient take a spare buffer up to a quarter larger than they
    need (U changes from step to step), old rows and all, and equal the dense gradient's rows."""
    num_classes = 2 * NUM_CLASSES
    p = make_problem(n=400, dim=DIM, num_classes=num_classes, k=4, ignore_every=0)
    hidden, weight, bias = p.leaves()
    first = torch.randint(0, num_classes, (400, 1_500), generator=torch.Generator().manual_seed(2))
    second = first[:, :1_400]  # fewer rows touched: U shrinks by a few percent

    def grad(negatives, sparse_grad):
        loss = fused_nce.nce_loss(hidden, weight, bias, p.target, p.sampler, negatives=negatives,
                                  sparse_grad=sparse_grad)
        return torch.autograd.grad(loss, weight)[0]

    def check_rows(sparse, dense):
        assert sparse.values().nbytes >= 32 << 20
        torch.testing.assert_close(sparse.values(), dense[sparse.indices()[0]], rtol=0, atol=0)

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        fused_nce.release_cpu_buffers()
        dense = grad(first, False)
        sparse = grad(first, True)
        check_rows(sparse, dense)
        address, size = sparse.values().data_ptr(), sparse.values().nbytes
        del sparse, dense  # both buffers become spares
        dense = grad(second, False)  # takes its own size back
        sparse = grad(second, True)
        assert sparse.values().nbytes < size
        assert sparse.values().data_ptr() == address
        check_rows(sparse, dense)
    finally:
        torch.set_num_threads(previous)


def _backward_in_child(p, address):
    torch.set_num_threads(1)  # no OpenMP pool in a forked child
    hidden, weight, bias = p.leaves()
    grad = dense_grads(p, "nce", hidden, weight, bias, p.negatives)[1]
    assert grad.data_ptr() == address  # the spare inherited from the parent
    torch.testing.assert_close(grad, dense_grads(p, "nce", hidden, weight, bias, p.negatives)[1],
                               rtol=0, atol=0)


def test_a_forked_child_takes_the_inherited_spare():
    """fork() holds the spare list's lock across the fork: the child finds it unlocked, takes
    the parent's spare buffer (its own copy-on-write mapping) and gives it back."""
    p = make_problem(n=8, dim=DIM, num_classes=NUM_CLASSES, k=3)
    hidden, weight, bias = p.leaves()
    fused_nce.release_cpu_buffers()
    grad = dense_grads(p, "nce", hidden, weight, bias, p.negatives)[1]
    address = grad.data_ptr()
    del grad
    child = multiprocessing.get_context("fork").Process(target=_backward_in_child,
                                                         args=(p, address))
    child.start()
    child.join(timeout=120)
    if child.is_alive():
        child.kill()
    assert child.exitcode == 0
    assert fused_nce.utils.spare_cpu_buffer_bytes() >= NUM_CLASSES * DIM * 4  # the parent's own
