"""DDP (gloo, 2 CPU processes): gradients equal one process on the whole batch."""

import gc

import pytest
import torch
import torch.distributed as dist

import fused_nce
from dist_helpers import run_ranks

NUM_CLASSES, DIM, BATCH, NUM_NEGATIVES, WORLD_SIZE = 40, 8, 24, 6, 2

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


class TinyLM(torch.nn.Module):
    """Embedding, output layer and the loss (with its learned log_z) in one module for DDP.

    With sparse gradients the output layer is an ``nn.Embedding(sparse=True)``: DDP expects a
    sparse gradient from those parameters only (and then all-reduces it sparse).
    """

    def __init__(self, sparse_grad: bool = False) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(NUM_CLASSES, DIM)
        self.decoder = (torch.nn.Embedding(NUM_CLASSES, DIM, sparse=True) if sparse_grad
                        else torch.nn.Linear(DIM, NUM_CLASSES))
        noise = fused_nce.unigram_weights(torch.arange(1, NUM_CLASSES + 1).double())
        # Shared negatives drawn from the same seed on every rank: the draws are the same ones a
        # single process makes for the whole batch.
        self.loss = fused_nce.NCELoss(NUM_CLASSES, noise, NUM_NEGATIVES, shared_negatives=True,
                                      learn_log_z=True, sparse_grad=sparse_grad)

    def forward(self, context: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        bias = getattr(self.decoder, "bias", None)  # an Embedding has none
        return self.loss(self.embed(context), self.decoder.weight, bias, target)


def make_data(step: int):
    g = torch.Generator().manual_seed(100 + step)
    context = torch.randint(NUM_CLASSES, (BATCH,), generator=g)
    return context, (context * 3 + 1) % NUM_CLASSES


def train(model: torch.nn.Module, rank: int, world_size: int, steps: int = 2):
    """A few SGD steps on this rank's slice of each batch; returns the last step's gradients."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(steps):
        context, target = make_data(step)
        part = slice(rank * BATCH // world_size, (rank + 1) * BATCH // world_size)
        optimizer.zero_grad()
        torch.manual_seed(step)
        model(context[part], target[part]).backward()
        grads = {name: p.grad.to_dense() if p.grad.is_sparse else p.grad.clone()
                 for name, p in model.named_parameters()}
        optimizer.step()
    return grads


def worker(rank: int, world_size: int, sparse_grad: bool) -> dict:
    """Runs in each rank (the group is set up by ``run_ranks``); returns its gradients."""
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(TinyLM(sparse_grad))
    grads = train(model, rank, world_size)
    # Release DDP's reducer before the ranks meet at run_ranks' barrier and the group goes away:
    # with sparse gradients, gloo otherwise aborts now and then at process exit ("terminate
    # called without an active exception", seen with torch 2.13 about one run in three).
    del model
    gc.collect()
    return {name.removeprefix("module."): g for name, g in grads.items()}


@pytest.mark.parametrize("sparse_grad", [False, True], ids=["dense", "sparse"])
def test_ddp_gradients_equal_single_process(sparse_grad):
    per_rank = run_ranks(worker, WORLD_SIZE, sparse_grad, timeout=120)
    torch.manual_seed(0)
    expected = train(TinyLM(sparse_grad), rank=0, world_size=1)
    names = {"embed.weight", "decoder.weight", "loss.log_z"}
    assert set(expected) == (names if sparse_grad else names | {"decoder.bias"})
    for grads in per_rank:
        assert set(grads) == set(expected)
        for name, g in expected.items():
            assert g.abs().sum() > 0, name
            torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-6, msg=name)
