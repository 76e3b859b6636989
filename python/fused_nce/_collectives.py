"""Collectives with gradients: what the retrieval loss needs to see every rank's candidates."""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

ProcessGroup = Any  # torch.distributed.ProcessGroup (absent from builds without distributed)


def all_gather(tensor: Tensor, group: Optional[ProcessGroup]) -> Tensor:
    """The ranks' ``tensor`` (same shape on every rank) concatenated along dim 0, rank order.
    No gradient."""
    world = dist.get_world_size(group)
    parts = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts)


class AllGatherFunction(torch.autograd.Function):
    """Forward: every rank's rows concatenated. Backward: each rank's slice of the sum of all
    ranks' gradients, since every rank's loss reads every rank's rows.

    The backward is an all-reduce and a slice rather than a reduce-scatter: gloo has no
    reduce-scatter, and the gathered gradient is only ``P`` times one rank's rows.
    """

    @staticmethod
    def forward(ctx: Any, tensor: Tensor, group: Optional[ProcessGroup]) -> Tensor:
        ctx.group = group
        ctx.rows = tensor.shape[0]
        ctx.rank = dist.get_rank(group)
        return all_gather(tensor, group)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tuple[Tensor, None]:
        total = grad.contiguous().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=ctx.group)
        return total[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows], None


def all_gather_with_grad(tensor: Tensor, group: Optional[ProcessGroup]) -> Tensor:
    """:func:`all_gather` whose gradient flows back to the rank that owns each row."""
    result: Tensor = AllGatherFunction.apply(tensor, group)  # type: ignore[no-untyped-call]
    return result
