"""Vocab-parallel sampled losses: the rows of the output embedding split over a process group.

The rank with index r of a group of P ranks owns rows ``[min(V, r c), min(V, (r + 1) c))`` of the
``[V, D]`` embedding, ``c = ceil(V / P)`` (the split of a DTensor placed ``Shard(0)``). ``hidden``,
``target``, the negatives, the noise and ``log_z`` are replicated: every rank draws the same
negatives from one alias table over all V classes with the same generator state.

Forward: each rank's kernel reads only its own rows (``fused_nce::shard_loss_forward``). NCE and
negative sampling sum over the ranks one ``[N]`` vector of partial losses; sampled softmax and
the full softmax combine per-rank maxima and sums of exponentials into the global log-sum-exp::

    M_i = max_r m_ri,    S_i = sum_r sum_{w owned by r} exp(o_i(w) - M_i),    lse_i = M_i + log S_i

(two all-reduces of ``[N]``: max, then the sums stacked with the target's logit), after which
each rank's coefficients ``softmax - [target]`` follow locally. Backward: one all-reduce of
``grad_hidden``; each shard's gradient (dense or sparse rows) stays on its rank.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from . import _shard_ops  # noqa: F401  (fake kernels of the shard ops)
from . import functional as fn
from ._mappings import Group, agree, all_reduce_, copy_to_group, resolve_group
from ._ops import OBJECTIVES, _rows_to_sparse, accumulation_dtype, ops
from .modules import NCELoss
from .sampler import AliasSampler

__all__ = ["shard_range", "nce_loss", "negative_sampling_loss", "sampled_softmax_loss",
           "gbce_loss", "full_softmax_loss", "VocabParallelNCELoss"]

SOFTMAX = OBJECTIVES["sampled_softmax"]
NCE = OBJECTIVES["nce"]
# Backward modes of fused_nce::shard_loss_backward.
_DENSE, _ROWS, _HIDDEN = 0, 1, 2


def shard_range(num_classes: int, group: Group = None) -> Tuple[int, int]:
    """``(start, end)``: the rows of the ``[num_classes, D]`` embedding this rank owns."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
    pg = resolve_group(group)
    return _range(num_classes, dist.get_rank(pg), dist.get_world_size(pg))


def _range(num_classes: int, rank: int, size: int) -> Tuple[int, int]:
    per_rank = -(-num_classes // size)
    return min(num_classes, rank * per_rank), min(num_classes, (rank + 1) * per_rank)


def _num_classes(noise: object, num_classes: Optional[int]) -> int:
    from_noise: Optional[int] = None
    if isinstance(noise, AliasSampler):
        from_noise = noise.num_classes
    elif isinstance(noise, Tensor) and noise.dim() == 1:
        from_noise = noise.shape[0]
    if num_classes is not None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
        if from_noise is not None and from_noise != num_classes:
            raise ValueError(f"num_classes={num_classes} disagrees with noise ({from_noise} "
                             "classes)")
        return num_classes
    if from_noise is None:
        raise ValueError("num_classes is required when there is no noise to read V from")
    return from_noise


def _check_shard(hidden: object, weight: object, bias: object, start: int,
                 end: int) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """``fused_nce``'s model checks, with ``weight`` the shard ``[end - start, D]``."""
    weight_t = fn._check_tensor(weight, "weight")
    if weight_t.dim() != 2 or weight_t.shape[0] != end - start:
        raise ValueError(f"weight must be this rank's shard of rows [{start}, {end}): "
                         f"[{end - start}, D], got shape {tuple(weight_t.shape)}")
    if end == start:
        # A rank may own no rows (V < P ranks' split): fn._check_model wants one, so the
        # dtype / device / D checks run against a one-row stand-in of the same kind.
        h, _, _ = fn._check_model(hidden, weight_t.new_empty((1, weight_t.shape[1])), None)
        if bias is not None:
            bias_t = fn._check_tensor(bias, "bias")
            if bias_t.shape != (0,) or bias_t.dtype != weight_t.dtype:
                raise ValueError(f"bias must be this rank's (empty) shard [0] of "
                                 f"{weight_t.dtype}, got {tuple(bias_t.shape)} {bias_t.dtype}")
            return h, weight_t, bias_t
        return h, weight_t, None
    return fn._check_model(hidden, weight_t, bias)


class _ShardedLoss(torch.autograd.Function):
    """Per-example loss [N] over all shards (replicated), differentiable in this rank's hidden
    part, shard, bias shard and log_z; the forward does the [N] collectives."""

    @staticmethod
    def forward(ctx: Any, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], log_z: Tensor,
                target: Tensor, negatives: Tensor, hard_negatives: Optional[Tensor],
                noise_probs: Optional[Tensor], objective: int, positive_weight: float,
                remove_accidental_hits: bool, ignore_index: int, sparse_grad: bool,
                start: int, num_classes: int, group: dist.ProcessGroup) -> Tensor:
        stat, coef = ops.shard_loss_forward(hidden, weight, bias, target, negatives,
                                            hard_negatives, noise_probs, log_z, objective,
                                            positive_weight, remove_accidental_hits,
                                            ignore_index, start, num_classes)
        if objective != SOFTMAX:
            loss = all_reduce_(stat, group)
        else:
            loss, coef = _global_softmax(stat, coef, target, ignore_index, group)
        ctx.save_for_backward(hidden, weight, target, negatives, hard_negatives, coef)
        ctx.args = (bias is not None, objective, ignore_index, sparse_grad, start, num_classes)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_loss: Tensor) -> Tuple[Optional[Tensor], ...]:
        hidden, weight, target, negatives, hard_negatives, coef = ctx.saved_tensors
        has_bias, objective, ignore_index, sparse_grad, start, num_classes = ctx.args
        needs = ctx.needs_input_grad
        grad_hidden = grad_weight = grad_bias = grad_log_z = None
        if needs[0] or needs[1] or needs[2]:
            mode = _HIDDEN if not (needs[1] or needs[2]) else (_ROWS if sparse_grad else _DENSE)
            grad_hidden, rows, grad_weight, grad_bias = ops.shard_loss_backward(
                grad_loss, coef, hidden, weight, has_bias, target, negatives, hard_negatives,
                ignore_index, start, num_classes, mode)
            if mode == _HIDDEN:
                grad_weight = grad_bias = None
            elif mode == _ROWS:
                grad_weight = _rows_to_sparse(rows, grad_weight, weight.shape)
                grad_bias = _rows_to_sparse(rows, grad_bias, weight.shape[:1]) if has_bias else None
            if not has_bias:
                grad_bias = None
        if needs[3] and objective == NCE:
            # This shard's part of dloss/dlog_z; copy_to_group sums the parts.
            grad_log_z = -(grad_loss.unsqueeze(1) * coef).sum()
        return (grad_hidden, grad_weight, grad_bias, grad_log_z) + (None,) * 12


def _global_softmax(local_max: Tensor, logits: Tensor, target: Tensor, ignore_index: int,
                    group: dist.ProcessGroup) -> Tuple[Tensor, Tensor]:
    """Loss [N] and this shard's coefficients softmax - label from the owned logits (-inf
    elsewhere; target [N] or [N, T], whose first T columns are the positives) and their
    per-example maxima, by one max and one sum all-reduce of [N]. A positive's label is 1 / |P|,
    |P| its example's valid positives; a finite positive logit is one this shard owns."""
    positives = target.reshape(target.shape[0], -1) if target.dim() == 2 else target.unsqueeze(1)
    valid = (positives != ignore_index).sum(1)
    keep = valid > 0
    top = all_reduce_(local_max, group, dist.ReduceOp.MAX)
    top = torch.where(keep, top, torch.zeros_like(top))  # ignored examples: -inf everywhere
    width = positives.shape[1]
    owned = torch.isfinite(logits[:, :width])
    owned_logits = torch.where(owned, logits[:, :width], torch.zeros_like(logits[:, :width]))
    sums = torch.stack([torch.exp(logits - top.unsqueeze(1)).sum(1), owned_logits.sum(1)])
    all_reduce_(sums, group)
    count = valid.clamp_min(1).to(top.dtype)
    lse = torch.where(keep, top + torch.log(sums[0]), torch.zeros_like(top))
    loss = torch.where(keep, lse - sums[1] / count, torch.zeros_like(top))
    coef = torch.exp(logits - lse.unsqueeze(1))
    coef[:, :width] -= owned.to(coef.dtype) / count.unsqueeze(1)
    return loss, coef


def _local_shard(weight: object, bias: object, group: Group) -> Tuple[object, object, Group]:
    """A DTensor ``weight`` placed ``Shard(0)`` on a 1-D mesh stands for its local rows and the
    mesh's group (its split is :func:`shard_range`'s); ``to_local`` carries the gradient back."""
    try:
        from torch.distributed.tensor import DTensor, Shard
    except ImportError:  # torch without DTensor
        return weight, bias, group
    if not isinstance(weight, DTensor):
        return weight, bias, group
    mesh = weight.device_mesh
    if mesh.ndim != 1 or tuple(weight.placements) != (Shard(0),):
        raise ValueError(f"weight as a DTensor must be placed Shard(0) on a 1-D mesh, got "
                         f"{tuple(weight.placements)} on a {mesh.ndim}-D mesh")
    mesh_group = mesh.get_group()
    if group is not None and group != mesh_group:
        raise ValueError("group differs from the process group of weight's device mesh")
    if isinstance(bias, DTensor):
        if tuple(bias.placements) != (Shard(0),) or bias.device_mesh != mesh:
            raise ValueError("bias as a DTensor must be placed Shard(0) on weight's mesh")
        bias = bias.to_local()
    return weight.to_local(), bias, mesh_group


def _sharded_loss(objective: str, hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
                  target: Tensor, noise: Optional[fn.Noise], num_negatives: Optional[int],
                  negatives: Optional[Tensor], shared_negatives: bool,
                  log_z: Union[float, Tensor], remove_accidental_hits: bool, ignore_index: int,
                  reduction: str, generator: Optional[torch.Generator], sparse_grad: bool,
                  group: Group, num_classes: Optional[int],
                  hard_negatives: Optional[Tensor] = None,
                  sample_weight: Optional[Tensor] = None, gbce_t: float = 0.0) -> Tensor:
    weight, bias, group = _local_shard(weight, bias, group)  # type: ignore[assignment]
    pg = resolve_group(group)
    rank, size = dist.get_rank(pg), dist.get_world_size(pg)
    try:
        v = _num_classes(noise, num_classes)
        start, end = _range(v, rank, size)
        hidden, weight, bias = _check_shard(*fn._autocast(hidden, weight, bias, sparse_grad),
                                            start, end)
        target = fn._check_target(target, hidden, several=True)
        reduction = fn._check_reduction(reduction)
        c = fn._columns(objective, hidden, target, v, noise, num_negatives, negatives,
                        shared_negatives, generator, hard_negatives, sample_weight, gbce_t)
        log_z_t = fn._log_z_tensor(log_z, hidden.device, accumulation_dtype(hidden.dtype))
        # Converted here, where a bad value still reaches the agreement check as an error.
        hits, ignore, sparse = bool(remove_accidental_hits), int(ignore_index), bool(sparse_grad)
        fields = [v, hidden.shape[-1], target.numel(), c.negatives.shape[-1],
                  c.hard.shape[-1] if c.hard is not None else 0]
    except (ValueError, TypeError) as caught:
        # The rank still joins the agreement all-gather, which raises on every rank.
        agree([0] * len(_LOSS_FIELDS), caught, pg, _LOSS_FIELDS, like=_tensor_or_none(hidden))
    loss: Tensor = _sharded_apply(fields, pg, hidden, weight, bias, log_z_t, c.target,
                                  c.negatives, c.hard, c.noise_probs, c.code, c.positive_weight,
                                  hits, ignore, sparse, start)
    return fn._reduce(loss, c.target, ignore_index, reduction, hidden.shape[:-1], c.weights)


# What the ranks of a vocab-parallel loss must agree on (_sharded_apply's fields, in order).
_LOSS_FIELDS = ["num_classes (V)", "hidden's last dim (D)", "the number of examples (N)",
                "the number of negatives (k)", "the number of hard negatives (h)", "target",
                "negatives (seed every rank's generator alike)", "hard_negatives"]
_FULL_SOFTMAX_FIELDS = ["num_classes (V)", "hidden's last dim (D)", "the number of examples (N)",
                        "target"]


def _tensor_or_none(value: object) -> Optional[Tensor]:
    return value if isinstance(value, Tensor) else None


@torch.compiler.disable
def _sharded_apply(fields: List[int], pg: dist.ProcessGroup, hidden: Tensor, weight: Tensor,
                   bias: Optional[Tensor], log_z: Tensor, target: Tensor, negatives: Tensor,
                   hard_negatives: Optional[Tensor], noise_probs: Optional[Tensor],
                   objective: int, positive_weight: float, remove_accidental_hits: bool,
                   ignore_index: int, sparse_grad: bool, start: int) -> Tensor:
    """The collectives and the shard kernels: the agreement check, then ``_ShardedLoss``.

    Outside any compiled graph (the one graph break of a compiled vocab-parallel loss): the
    check reads index sums on the host and every collective runs eagerly, so a compiled step
    does exactly the eager step's communication, in the same order on every rank.
    """
    # Replicated inputs must be equal on every rank: a cheap fingerprint of the indices (a rank
    # whose generator state differs draws other negatives).
    hard_sum = int(hard_negatives.sum()) if hard_negatives is not None else 0
    agree(fields + [int(target.sum()), int(negatives.sum()), hard_sum], None, pg, _LOSS_FIELDS,
          like=hidden)
    h = copy_to_group(hidden.reshape(-1, hidden.shape[-1]), pg)
    lz = copy_to_group(log_z, pg) if objective == NCE else log_z
    loss: Tensor = _ShardedLoss.apply(  # type: ignore[no-untyped-call]
        h, weight, bias, lz, target, negatives, hard_negatives, noise_probs, objective,
        positive_weight, remove_accidental_hits, ignore_index, sparse_grad, start, fields[0], pg)
    return loss


def nce_loss(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
             noise: Optional[fn.Noise] = None, *, num_negatives: Optional[int] = None,
             negatives: Optional[Tensor] = None, shared_negatives: bool = False,
             log_z: Union[float, Tensor] = 0.0, remove_accidental_hits: bool = False,
             ignore_index: int = -100, reduction: str = "mean",
             generator: Optional[torch.Generator] = None, sparse_grad: bool = False,
             group: Group = None, num_classes: Optional[int] = None,
             sample_weight: Optional[Tensor] = None) -> Tensor:
    """:func:`fused_nce.nce_loss` with ``weight`` / ``bias`` this rank's shard (rows
    :func:`shard_range`) of the ``[V, D]`` / ``[V]`` output layer over ``group``.

    ``hidden``, ``target``, ``negatives``, ``noise``, ``log_z`` and the generator state must be
    the same on every rank. V is ``noise.num_classes`` (or ``num_classes``). Every rank returns
    the loss of the whole layer; ``hidden`` and ``log_z`` get their full gradient on every rank,
    the shard its rows of the full gradient.
    """
    return _sharded_loss("nce", hidden, weight, bias, target, noise, num_negatives, negatives,
                         shared_negatives, log_z, remove_accidental_hits, ignore_index,
                         reduction, generator, sparse_grad, group, num_classes,
                         sample_weight=sample_weight)


def negative_sampling_loss(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
                           noise: Optional[fn.Noise] = None, *,
                           num_negatives: Optional[int] = None,
                           negatives: Optional[Tensor] = None, shared_negatives: bool = False,
                           remove_accidental_hits: bool = False, ignore_index: int = -100,
                           reduction: str = "mean", generator: Optional[torch.Generator] = None,
                           sparse_grad: bool = False, group: Group = None,
                           num_classes: Optional[int] = None,
                           hard_negatives: Optional[Tensor] = None,
                           sample_weight: Optional[Tensor] = None) -> Tensor:
    """:func:`fused_nce.negative_sampling_loss` over a vocab-parallel shard (see
    :func:`nce_loss`); pass ``num_classes`` when there is no noise."""
    return _sharded_loss("negative_sampling", hidden, weight, bias, target, noise, num_negatives,
                         negatives, shared_negatives, 0.0, remove_accidental_hits, ignore_index,
                         reduction, generator, sparse_grad, group, num_classes, hard_negatives,
                         sample_weight)


def gbce_loss(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
              noise: Optional[fn.Noise] = None, *, num_negatives: Optional[int] = None,
              negatives: Optional[Tensor] = None, shared_negatives: bool = False,
              t: float = 0.75, remove_accidental_hits: bool = False, ignore_index: int = -100,
              reduction: str = "mean", generator: Optional[torch.Generator] = None,
              sparse_grad: bool = False, group: Group = None, num_classes: Optional[int] = None,
              hard_negatives: Optional[Tensor] = None,
              sample_weight: Optional[Tensor] = None) -> Tensor:
    """:func:`fused_nce.gbce_loss` over a vocab-parallel shard (see :func:`nce_loss`); pass
    ``num_classes`` when there is no noise (the draws are then uniform over it)."""
    return _sharded_loss("gbce", hidden, weight, bias, target, noise, num_negatives, negatives,
                         shared_negatives, 0.0, remove_accidental_hits, ignore_index, reduction,
                         generator, sparse_grad, group, num_classes, hard_negatives,
                         sample_weight, t)


def sampled_softmax_loss(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
                         noise: Optional[fn.Noise] = None, *,
                         num_negatives: Optional[int] = None,
                         negatives: Optional[Tensor] = None, shared_negatives: bool = False,
                         remove_accidental_hits: bool = True, ignore_index: int = -100,
                         reduction: str = "mean", generator: Optional[torch.Generator] = None,
                         sparse_grad: bool = False, group: Group = None,
                         num_classes: Optional[int] = None,
                         hard_negatives: Optional[Tensor] = None,
                         sample_weight: Optional[Tensor] = None) -> Tensor:
    """:func:`fused_nce.sampled_softmax_loss` over a vocab-parallel shard (see :func:`nce_loss`);
    the log-sum-exp over the example's logits is combined across the ranks."""
    return _sharded_loss("sampled_softmax", hidden, weight, bias, target, noise, num_negatives,
                         negatives, shared_negatives, 0.0, remove_accidental_hits, ignore_index,
                         reduction, generator, sparse_grad, group, num_classes, hard_negatives,
                         sample_weight)


class _FullSoftmax(torch.autograd.Function):
    """Exact cross-entropy [N] over all shards; logits a chunk of columns at a time, recomputed
    in backward instead of kept."""

    @staticmethod
    def forward(ctx: Any, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
                keep: Tensor, start: int, step: int, group: dist.ProcessGroup) -> Tensor:
        acc = accumulation_dtype(hidden.dtype)
        h = hidden.to(acc)
        rows = weight.shape[0]
        parts = [torch.logsumexp(_logits(h, weight, bias, c, step, acc), dim=1)
                 for c in range(0, rows, step)]
        local = (torch.logsumexp(torch.stack(parts, 1), 1) if parts
                 else h.new_full((h.shape[0],), float("-inf")))
        top = all_reduce_(local.clone(), group, dist.ReduceOp.MAX)
        owned = keep & (target >= start) & (target < start + rows)
        local_t = (target - start).clamp(0, max(rows - 1, 0))
        target_logit = torch.zeros_like(top)
        if rows > 0:
            picked = (h * weight.index_select(0, local_t).to(acc)).sum(1)
            if bias is not None:
                picked = picked + bias.index_select(0, local_t).to(acc)
            target_logit = torch.where(owned, picked, target_logit)
        sums = all_reduce_(torch.stack([torch.exp(local - top), target_logit]), group)
        lse = top + torch.log(sums[0])
        ctx.save_for_backward(hidden, weight, bias, lse, owned, local_t, keep)
        ctx.step = step
        return torch.where(keep, lse - sums[1], torch.zeros_like(lse))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_loss: Tensor) -> Tuple[Optional[Tensor], ...]:
        hidden, weight, bias, lse, owned, local_t, keep = ctx.saved_tensors
        acc = lse.dtype
        h = hidden.to(acc)
        g = torch.where(keep, grad_loss.to(acc), torch.zeros_like(lse))
        grad_h = torch.zeros_like(h)
        grad_w = torch.empty(weight.shape, dtype=acc, device=weight.device)
        grad_b = torch.empty(weight.shape[:1], dtype=acc, device=weight.device)
        step = ctx.step
        examples = torch.arange(h.shape[0], device=h.device)
        for c in range(0, weight.shape[0], step):
            coef = torch.exp(_logits(h, weight, bias, c, step, acc) - lse.unsqueeze(1))
            coef.mul_(g.unsqueeze(1))
            # The target's column, where this chunk holds it: softmax - 1.
            in_chunk = owned & (local_t >= c) & (local_t < c + coef.shape[1])
            coef[examples[in_chunk], local_t[in_chunk] - c] -= g[in_chunk]
            w = weight[c:c + step].to(acc)
            grad_h.addmm_(coef, w)
            grad_w[c:c + step] = coef.t() @ h
            grad_b[c:c + step] = coef.sum(0)
        return (grad_h.to(hidden.dtype), grad_w.to(weight.dtype),
                grad_b.to(weight.dtype) if bias is not None else None) + (None,) * 5


def _logits(h: Tensor, weight: Tensor, bias: Optional[Tensor], c: int, step: int,
            acc: torch.dtype) -> Tensor:
    b = bias[c:c + step].to(acc) if bias is not None else None
    return F.linear(h, weight[c:c + step].to(acc), b)


def full_softmax_loss(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, *,
                      group: Group = None, num_classes: Optional[int] = None,
                      ignore_index: int = -100, reduction: str = "mean",
                      chunk_size: Optional[int] = None) -> Tensor:
    """Exact vocab-parallel cross-entropy (evaluation, perplexity) with ``weight`` / ``bias``
    this rank's shard; equal to :func:`fused_nce.full_softmax_loss` on the whole layer. Holds at
    most ``chunk_size`` columns of logits at once (all of the shard's when None)."""
    weight, bias, group = _local_shard(weight, bias, group)  # type: ignore[assignment]
    pg = resolve_group(group)
    rank, size = dist.get_rank(pg), dist.get_world_size(pg)
    try:
        if num_classes is None:
            raise ValueError("num_classes (V, over all shards) is required")
        v = _num_classes(None, num_classes)
        start, end = _range(v, rank, size)
        hidden, weight, bias = _check_shard(*fn._autocast(hidden, weight, bias), start, end)
        target = fn._check_target(target, hidden)
        reduction = fn._check_reduction(reduction)
        if chunk_size is not None and (isinstance(chunk_size, bool)
                                       or not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
        fields = [v, hidden.shape[-1], target.numel()]
    except (ValueError, TypeError) as caught:
        # The rank still joins the agreement all-gather, which raises on every rank.
        agree([0] * len(_FULL_SOFTMAX_FIELDS), caught, pg, _FULL_SOFTMAX_FIELDS,
              like=_tensor_or_none(hidden))
    loss = _full_softmax_apply(fields, pg, hidden, weight, bias, target, ignore_index, start,
                               chunk_size)
    return fn._reduce(loss, target.reshape(-1), ignore_index, reduction, target.shape)


@torch.compiler.disable
def _full_softmax_apply(fields: List[int], pg: dist.ProcessGroup, hidden: Tensor, weight: Tensor,
                        bias: Optional[Tensor], target: Tensor, ignore_index: int, start: int,
                        chunk_size: Optional[int]) -> Tensor:
    """The checks that read values, the agreement check and ``_FullSoftmax``: eager, as in
    ``_sharded_apply``."""
    flat = target.reshape(-1)
    keep = flat != ignore_index
    error: Optional[BaseException] = None
    if bool(((flat < 0) | (flat >= fields[0]))[keep].any()):
        error = ValueError(f"target holds class indices outside [0, {fields[0]})")
    agree(fields + [int(flat.sum()) if error is None else 0], error, pg, _FULL_SOFTMAX_FIELDS,
          like=hidden)
    rows = weight.shape[0]
    step = max(1, chunk_size if chunk_size is not None else rows)
    h = copy_to_group(hidden.reshape(-1, hidden.shape[-1]), pg)
    with torch.autocast(hidden.device.type, enabled=False):
        loss: Tensor = _FullSoftmax.apply(  # type: ignore[no-untyped-call]
            h, weight, bias, flat, keep, start, step, pg)
    return loss


class VocabParallelNCELoss(NCELoss):
    """:class:`fused_nce.NCELoss` over a vocab-parallel output layer: call it with this rank's
    shard of the weight and bias (rows :func:`shard_range`). The noise table covers all V classes
    on every rank, so every rank draws the same negatives from the same generator state."""

    def __init__(self, num_classes: int, noise_weights: Tensor, num_negatives: int, *,
                 group: Group = None, **kwargs: Any) -> None:
        super().__init__(num_classes, noise_weights, num_negatives, **kwargs)
        self.group = group

    def shard_range(self) -> Tuple[int, int]:
        """This rank's rows of the output layer."""
        return shard_range(self.num_classes, self.group)

    def forward(self, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
                *, generator: Optional[torch.Generator] = None,
                hard_negatives: Optional[Tensor] = None,
                sample_weight: Optional[Tensor] = None) -> Tensor:
        log_z = self.log_z if self.log_z is not None else 0.0
        return _sharded_loss(self.objective, hidden, weight, bias, target, self.sampler,
                             self.num_negatives, None, self.shared_negatives, log_z,
                             self.remove_accidental_hits, self.ignore_index, self.reduction,
                             generator, self.sparse_grad, self.group, self.num_classes,
                             hard_negatives, sample_weight, self.gbce_t)

