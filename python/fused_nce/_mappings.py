"""Every collective of the package, in one place (as Megatron's ``mappings.py``).

``copy_to_group``: identity forward, all-reduce (sum) of the gradient backward: a replicated input
(``hidden``, ``log_z``) whose every rank's use adds to its gradient. ``reduce_from_group``:
all-reduce (sum) forward, identity backward. ``all_gather_with_grad``: every rank's rows forward,
each rank's slice of the summed gradient backward (the retrieval loss's candidates). ``agree``:
the one small all-gather that checks the ranks' arguments against each other before any other
collective, so that a rank that rejects its input makes every rank raise instead of leaving the
others waiting.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

# A string: a torch built without distributed support has no ProcessGroup to name at import.
Group = Optional["dist.ProcessGroup"]


def resolve_group(group: Group) -> dist.ProcessGroup:
    """The given group, or the default one; a clear error where there is none."""
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this build of torch")
    if not dist.is_initialized():
        raise RuntimeError("group: torch.distributed is not initialized; call "
                           "torch.distributed.init_process_group first")
    resolved = group if group is not None else dist.group.WORLD
    assert resolved is not None
    if dist.get_rank(resolved) < 0:
        raise ValueError("group: this process is not a member of the given process group")
    return resolved


def collective_device(group: dist.ProcessGroup, like: Optional[Tensor] = None) -> torch.device:
    """Where small bookkeeping tensors must live for the group's backend."""
    if dist.get_backend(group) == "nccl":
        return like.device if like is not None and like.is_cuda else torch.device(
            "cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_(tensor: Tensor, group: dist.ProcessGroup, op: Any = dist.ReduceOp.SUM) -> Tensor:
    """In-place all-reduce of a tensor on the group's device (copied there and back if needed)."""
    device = collective_device(group, tensor)
    if tensor.device == device:
        dist.all_reduce(tensor, op=op, group=group)
        return tensor
    moved = tensor.to(device)
    dist.all_reduce(moved, op=op, group=group)
    return tensor.copy_(moved)


class _CopyToGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, tensor: Tensor, group: dist.ProcessGroup) -> Tensor:
        ctx.group = group
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Any:
        return all_reduce_(grad.contiguous().clone(), ctx.group), None


class _ReduceFromGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, tensor: Tensor, group: dist.ProcessGroup) -> Tensor:
        return all_reduce_(tensor.contiguous().clone(), group)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Any:
        return grad, None


def copy_to_group(tensor: Tensor, group: dist.ProcessGroup) -> Tensor:
    """Identity; in backward the gradient is summed over the group (every rank gets the total)."""
    if not tensor.requires_grad:
        return tensor
    result: Tensor = _CopyToGroup.apply(tensor, group)  # type: ignore[no-untyped-call]
    return result


def reduce_from_group(tensor: Tensor, group: dist.ProcessGroup) -> Tensor:
    """Sum over the group; the gradient passes through unchanged."""
    result: Tensor = _ReduceFromGroup.apply(tensor, group)  # type: ignore[no-untyped-call]
    return result


def all_gather(tensor: Tensor, group: Group) -> Tensor:
    """The ranks' ``tensor`` (same shape on every rank) concatenated along dim 0, rank order.
    No gradient."""
    world = dist.get_world_size(group)
    parts = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts)


class _GatherFromGroup(torch.autograd.Function):
    """Forward: every rank's rows concatenated. Backward: each rank's slice of the sum of all
    ranks' gradients, since every rank's loss reads every rank's rows.

    The backward is an all-reduce and a slice rather than a reduce-scatter: gloo has no
    reduce-scatter, and the gathered gradient is only ``P`` times one rank's rows.
    """

    @staticmethod
    def forward(ctx: Any, tensor: Tensor, group: Group) -> Tensor:
        ctx.group = group
        ctx.rows = tensor.shape[0]
        ctx.rank = dist.get_rank(group)
        return all_gather(tensor, group)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tuple[Tensor, None]:
        total = grad.contiguous().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=ctx.group)
        return total[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows], None


def all_gather_with_grad(tensor: Tensor, group: Group) -> Tensor:
    """:func:`all_gather` whose gradient flows back to the rank that owns each row."""
    result: Tensor = _GatherFromGroup.apply(tensor, group)  # type: ignore[no-untyped-call]
    return result


def agree(fields: Sequence[int], error: Optional[BaseException], group: dist.ProcessGroup,
          names: Sequence[str], like: Optional[Tensor] = None) -> List[List[int]]:
    """All-gathers each rank's ``fields`` (and whether it rejected its arguments). Raises on every
    rank if any rank raised (its own error where it has one) or if a field differs between ranks;
    returns every rank's fields otherwise."""
    device = collective_device(group, like)
    size = dist.get_world_size(group)
    mine = torch.tensor([0 if error is None else 1, *fields], dtype=torch.int64, device=device)
    gathered = [torch.empty_like(mine) for _ in range(size)]
    dist.all_gather(gathered, mine, group=group)
    rows = [g.tolist() for g in gathered]
    if error is not None:
        raise error
    failed = [rank for rank, row in enumerate(rows) if row[0]]
    if failed:
        raise RuntimeError(f"rank(s) {failed} of the group rejected their arguments (see the "
                           "error raised there); every rank stops before any other collective")
    for column, name in enumerate(names, start=1):
        values = [row[column] for row in rows]
        if len(set(values)) > 1:
            raise ValueError(f"{name} differs between the ranks of the group: {values} (rank "
                             "order); it must be the same on every rank")
    return [row[1:] for row in rows]
