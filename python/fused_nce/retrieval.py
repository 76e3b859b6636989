"""Retrieval losses: in-batch and mixed-negative softmax with logQ correction, and the streaming
item-frequency estimator that supplies logQ.

The ops (``torch.ops.fused_nce.in_batch_*``, ``frequency_*``), their fake kernels and the
autograd Function live here; the argument checks are in :func:`in_batch_softmax_loss`.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ._mappings import Group, all_gather, all_gather_with_grad
from ._ops import accumulation_dtype, ops
from .functional import FLOAT_DTYPES, _check_reduction


@torch.library.register_fake("fused_nce::in_batch_forward")
def _(query: Tensor, columns: Tensor, log_q: Optional[Tensor], column_ids: Tensor,
      temperature: Tensor, pos_offset: int, remove_accidental_hits: bool,
      block_size: int) -> Tuple[Tensor, Tensor]:
    acc = accumulation_dtype(query.dtype)
    n = query.shape[0]
    return query.new_empty((n,), dtype=acc), query.new_empty((n,), dtype=acc)


@torch.library.register_fake("fused_nce::in_batch_backward")
def _(grad_loss: Tensor, query: Tensor, columns: Tensor, log_q: Optional[Tensor],
      column_ids: Tensor, temperature: Tensor, lse: Tensor, pos_offset: int,
      remove_accidental_hits: bool, block_size: int) -> Tuple[Tensor, Tensor, Tensor]:
    acc = accumulation_dtype(query.dtype)
    return torch.empty_like(query), torch.empty_like(columns), query.new_empty((), dtype=acc)


@torch.library.register_fake("fused_nce::frequency_update")
def _(last_seen: Tensor, gap: Tensor, count: Tensor, ids: Tensor, step: Tensor,
      alpha: float) -> None:
    return None


@torch.library.register_fake("fused_nce::frequency_estimate")
def _(last_seen: Tensor, gap: Tensor, count: Tensor, ids: Tensor,
      step: Tensor) -> Tuple[Tensor, Tensor]:
    return (ids.new_empty(ids.shape, dtype=torch.float32),
            ids.new_empty(ids.shape, dtype=torch.float32))


class InBatchSoftmaxFunction(torch.autograd.Function):
    """Per-row loss ``logsumexp_j o_ij - o_i,pos`` [N] over column blocks; differentiable in
    query, columns and temperature. Saves only the per-row log-sum-exp; backward recomputes the
    blocks."""

    @staticmethod
    def forward(query: Tensor, columns: Tensor, log_q: Optional[Tensor], column_ids: Tensor,
                temperature: Tensor, pos_offset: int, remove_accidental_hits: bool,
                block_size: int) -> Tuple[Tensor, Tensor]:
        # The kernels accumulate in float32 themselves: an enclosing autocast must not recast.
        with torch.autocast(query.device.type, enabled=False):
            outputs: Tuple[Tensor, Tensor] = ops.in_batch_forward(
                query, columns, log_q, column_ids, temperature, pos_offset,
                remove_accidental_hits, block_size)
        return outputs

    @staticmethod
    def setup_context(ctx: Any, inputs: Sequence[Any], output: Tuple[Tensor, Tensor]) -> None:
        query, columns, log_q, column_ids, temperature = inputs[:5]
        _, lse = output
        ctx.mark_non_differentiable(lse)
        ctx.save_for_backward(query, columns, log_q, column_ids, temperature, lse)
        ctx.pos_offset, ctx.remove_accidental_hits, ctx.block_size = inputs[5:8]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_loss: Optional[Tensor],
                 _grad_lse: Any) -> Tuple[Optional[Tensor], ...]:
        query, columns, log_q, column_ids, temperature, lse = ctx.saved_tensors
        if grad_loss is None:
            grad_loss = torch.zeros_like(lse)
        with torch.autocast(query.device.type, enabled=False):
            grad_query, grad_columns, grad_temperature = ops.in_batch_backward(
                grad_loss.contiguous(), query, columns, log_q, column_ids, temperature, lse,
                ctx.pos_offset, ctx.remove_accidental_hits, ctx.block_size)
        needs = ctx.needs_input_grad
        return (grad_query if needs[0] else None, grad_columns if needs[1] else None, None, None,
                grad_temperature.to(temperature.dtype).reshape(temperature.shape)
                if needs[4] else None,
                None, None, None)


def _tensor(value: object, name: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(value).__name__}")
    return value


def _ids(value: object, name: str, rows: int, device: torch.device) -> Tensor:
    ids = _tensor(value, name)
    if ids.dtype != torch.int64:
        raise TypeError(f"{name} must be an int64 tensor of item ids, got {ids.dtype}")
    if ids.shape != (rows,):
        raise ValueError(f"{name} must be [{rows}], got shape {tuple(ids.shape)}")
    if ids.device != device:
        raise ValueError(f"{name} is on {ids.device} but query is on {device}")
    return ids


def _vector(value: object, name: str, rows: int, device: torch.device) -> Tensor:
    vector = _tensor(value, name)
    if not vector.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {vector.dtype}")
    if vector.shape != (rows,):
        raise ValueError(f"{name} must be [{rows}], got shape {tuple(vector.shape)}")
    if vector.device != device:
        raise ValueError(f"{name} is on {vector.device} but query is on {device}")
    return vector


def _rows(value: object, name: str, query: Tensor, rows: Optional[int] = None) -> Tensor:
    matrix = _tensor(value, name)
    dim = query.shape[1]
    if matrix.dim() != 2 or matrix.shape[1] != dim or (rows is not None and matrix.shape[0] != rows):
        want = f"[{rows}, {dim}]" if rows is not None else f"[M, {dim}]"
        raise ValueError(f"{name} must be {want} (query is [N, D] = {list(query.shape)}), "
                         f"got shape {tuple(matrix.shape)}")
    if matrix.dtype != query.dtype:
        raise TypeError(f"{name} ({matrix.dtype}) and query ({query.dtype}) must share a dtype")
    if matrix.device != query.device:
        raise ValueError(f"{name} is on {matrix.device} but query is on {query.device}")
    return matrix


def _temperature(value: object, device: torch.device, acc: torch.dtype) -> Tensor:
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.dim() != 0:
            raise ValueError(f"temperature must be a float or a 0-dim tensor, got shape "
                             f"{tuple(value.shape)}")
        if not value.is_floating_point():
            raise TypeError(f"temperature must be floating point, got {value.dtype}")
        # Checked here where that costs no device sync; the kernels check it again.
        if value.device.type == "cpu" and not torch.compiler.is_compiling():
            if not float(value.detach()) > 0:
                raise ValueError(f"temperature must be positive, got {float(value.detach())}")
        return value.to(device=device, dtype=acc)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not value > 0 or not math.isfinite(value):
            raise ValueError(f"temperature must be positive and finite, got {value}")
        return torch.full((), float(value), dtype=acc, device=device)
    raise TypeError(f"temperature must be a float or a 0-dim tensor, got {type(value).__name__}")


def in_batch_softmax_loss(query: Tensor, candidates: Tensor, candidate_ids: Tensor, *,
                          log_q: Optional[Tensor] = None,
                          extra_candidates: Optional[Tensor] = None,
                          extra_ids: Optional[Tensor] = None,
                          extra_log_q: Optional[Tensor] = None,
                          temperature: Union[float, Tensor] = 1.0,
                          remove_accidental_hits: bool = True,
                          sample_weight: Optional[Tensor] = None, reduction: str = "mean",
                          group: Group = None,
                          block_size: int = 0) -> Tensor:
    """Softmax over the batch's own candidates (and optional extra negatives), logQ-corrected.

    Row ``i`` of ``candidates`` is the positive of query ``i`` and a negative of every other
    query. The logits are ``o_ij = <query_i, cand_j> / temperature - log_q_j`` over the ``N``
    in-batch columns followed by the ``M`` extra ones (mixed negative sampling, Yang et al.,
    WWW 2020), and ``l_i = sample_weight_i * (logsumexp_j o_ij - o_ii)``. The ``[N, N + M]``
    logits are never held: columns are processed in blocks with an online log-sum-exp, and the
    backward pass recomputes them (extra memory ~ ``N * block``).

    Args:
        query: ``[N, D]`` float32, float64, float16 or bfloat16.
        candidates: ``[N, D]``, same dtype and device.
        candidate_ids: ``[N]`` int64 item ids of the candidates.
        log_q: ``[N]`` log of each candidate's sampling probability (e.g. from
            :class:`FrequencyEstimator`); None: no correction of the in-batch columns.
        extra_candidates: ``[M, D]`` extra negatives shared by every query; needs ``extra_ids``.
        extra_ids: ``[M]`` int64 item ids of the extras.
        extra_log_q: ``[M]`` their log-probabilities; None: no correction of the extras.
        temperature: positive float or 0-dim tensor (learnable: it gets a gradient).
        remove_accidental_hits: drop every column ``j != i`` whose id is ``candidate_ids[i]``.
        sample_weight: ``[N]`` per-example weights.
        reduction: "mean" (sum / N), "sum" or "none" (``[N]``).
        group: a process group: candidates, ids and ``log_q`` of every rank are gathered (every
            rank must pass the same ``N``), gradients flow back to their owner, and each query
            sees ``N * P + M`` columns. Extras stay local.
        block_size: columns per block; 0 chooses about 4M scores per block.

    Returns the loss in float32 (float64 for float64 inputs).
    """
    query = _tensor(query, "query")
    if query.dtype not in FLOAT_DTYPES:
        raise TypeError(f"query must be float32, float64, float16 or bfloat16, got {query.dtype}")
    if query.dim() != 2 or query.shape[0] < 1:
        raise ValueError(f"query must be [N, D] with N >= 1, got shape {tuple(query.shape)}")
    n, device = query.shape[0], query.device
    acc = accumulation_dtype(query.dtype)
    candidates = _rows(candidates, "candidates", query, n)
    candidate_ids = _ids(candidate_ids, "candidate_ids", n, device)
    if log_q is not None:
        log_q = _vector(log_q, "log_q", n, device)
    reduction = _check_reduction(reduction)
    if sample_weight is not None:
        sample_weight = _vector(sample_weight, "sample_weight", n, device)
    if extra_candidates is None:
        if extra_ids is not None or extra_log_q is not None:
            raise ValueError("extra_ids and extra_log_q need extra_candidates")
    else:
        extra_candidates = _rows(extra_candidates, "extra_candidates", query)
        if extra_ids is None:
            raise ValueError("extra_candidates needs extra_ids (the extras' item ids)")
        m = extra_candidates.shape[0]
        extra_ids = _ids(extra_ids, "extra_ids", m, device)
        if extra_log_q is not None:
            extra_log_q = _vector(extra_log_q, "extra_log_q", m, device)
    if not isinstance(block_size, int) or block_size < 0:
        raise ValueError(f"block_size must be a non-negative int, got {block_size!r}")
    temperature_t = _temperature(temperature, device, acc)

    pos_offset = 0
    if group is not None:
        rank = torch.distributed.get_rank(group)
        candidates = all_gather_with_grad(candidates, group)
        candidate_ids = all_gather(candidate_ids, group)
        if log_q is not None:
            log_q = all_gather(log_q.detach(), group)
        pos_offset = rank * n
    num_in_batch = candidates.shape[0]

    columns, ids, column_log_q = candidates, candidate_ids, log_q
    if extra_candidates is not None and extra_ids is not None:
        columns = torch.cat([candidates, extra_candidates])
        ids = torch.cat([candidate_ids, extra_ids])
        if log_q is not None or extra_log_q is not None:
            # A part given no log q is not corrected (log q = 0).
            in_batch = (log_q.to(acc) if log_q is not None
                        else torch.zeros(num_in_batch, dtype=acc, device=device))
            extra = (extra_log_q.to(acc) if extra_log_q is not None
                     else torch.zeros(extra_ids.shape[0], dtype=acc, device=device))
            column_log_q = torch.cat([in_batch, extra])
    if column_log_q is not None:
        column_log_q = column_log_q.detach()

    loss: Tensor
    loss, _ = InBatchSoftmaxFunction.apply(  # type: ignore[no-untyped-call]
        query, columns, column_log_q, ids, temperature_t, pos_offset,
        bool(remove_accidental_hits), block_size)
    if sample_weight is not None:
        loss = loss * sample_weight.to(acc)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / n


class FrequencyEstimator(nn.Module):
    """Streaming estimate of how likely each item is to appear in a training batch.

    After Yi et al. (RecSys 2019): each of ``num_hashes`` arrays of ``num_buckets`` buckets keeps
    the step at which the bucket was last seen and an exponential moving average (rate ``alpha``)
    of the gap between its sightings; an item seen every ``g`` steps on average has probability
    about ``1 / g`` of being in a batch (:meth:`log_prob`). Each bucket also keeps an average of
    how many times its item occurs in a step where it occurs at all, so that
    :meth:`log_expected_count` (occurrences per sighting / steps per sighting) keeps growing for
    items that are in nearly every batch, where the probability saturates at 1. Call
    :meth:`update` once per training step with that step's item ids.

    Which to use as logQ: the correction of a softmax over sampled columns is the log of each
    item's expected number of copies among them, :meth:`log_expected_count`; it equals
    :meth:`log_prob` for items far from being in every batch.

    Hash collisions: an item sharing a bucket with another item sees that item's occurrences as
    its own, so collisions only ever shorten a bucket's gap and add to its counts. Each array
    hashes with an independent seed and the estimate takes the longest gap (the smallest rate)
    over the arrays: the least polluted, as a count-min sketch takes the smallest count.

    Duplicates: each step's buckets are sorted and every distinct bucket is updated once, with
    its number of occurrences, so the result does not depend on the order of ``ids``.

    Adaptation: the averages forget at rate ``alpha`` per sighting. When an item's gap changes
    from ``g_old`` to ``g_new`` (ratio ``r = g_old / g_new``), the old gap's weight left after
    ``k`` sightings is ``(1 - alpha)^k``, so the estimate is within 10% of the new gap (within
    11% in probability) after ``ln(|r - 1| / 0.1) / alpha`` sightings: 230 at ``alpha = 0.01``
    for an item that becomes 10x more popular (``r = 10``), i.e. 230 times its new gap in steps;
    200 sightings for one that becomes 10x rarer.

    Before a second sighting a bucket has no average gap yet: its gap is the number of steps
    since the first sighting, and an id never seen in ``t`` steps gets gap ``t + 1``.

    Its state (``last_seen``, ``gap``, ``count``, ``step``) is buffers: it is saved in
    ``state_dict`` and moves with ``.to()``. ``gap`` and ``count`` stay float32 whatever dtype
    the module is cast to; they take ``16 * num_hashes * num_buckets`` bytes (32 MiB at the
    defaults). On CUDA an update sorts the step's buckets (one host sync).
    """

    last_seen: Tensor
    gap: Tensor
    count: Tensor
    step: Tensor

    def __init__(self, num_buckets: int = 2 ** 20, *, alpha: float = 0.01,
                 num_hashes: int = 2) -> None:
        super().__init__()
        if not isinstance(num_buckets, int) or num_buckets < 1:
            raise ValueError(f"num_buckets must be a positive int, got {num_buckets!r}")
        if not isinstance(num_hashes, int) or num_hashes < 1:
            raise ValueError(f"num_hashes must be a positive int, got {num_hashes!r}")
        if not isinstance(alpha, (int, float)) or not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha!r}")
        self.alpha = float(alpha)
        self.register_buffer("last_seen", torch.full((num_hashes, num_buckets), -1,
                                                     dtype=torch.int64))
        self.register_buffer("gap", torch.zeros(num_hashes, num_buckets))
        self.register_buffer("count", torch.zeros(num_hashes, num_buckets))
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))

    def _apply(self, fn: Any, recurse: bool = True) -> "FrequencyEstimator":
        super()._apply(fn, recurse)  # type: ignore[no-untyped-call]
        # module.double() / .half() cast floating buffers; the kernels keep them in float32.
        for name in ("gap", "count"):
            if getattr(self, name).dtype != torch.float32:
                setattr(self, name, getattr(self, name).float())
        return self

    def _check_ids(self, ids: object) -> Tensor:
        tensor = _tensor(ids, "ids")
        if tensor.dtype != torch.int64:
            raise TypeError(f"ids must be an int64 tensor of item ids, got {tensor.dtype}")
        if tensor.device != self.gap.device:
            raise ValueError(f"ids is on {tensor.device} but the estimator is on "
                             f"{self.gap.device}")
        return tensor

    def _estimate(self, ids: Tensor) -> Tuple[Tensor, Tensor]:
        ids = self._check_ids(ids)
        gap: Tensor
        rate: Tensor
        gap, rate = ops.frequency_estimate(self.last_seen, self.gap, self.count, ids, self.step)
        return gap, rate

    @torch.no_grad()
    def update(self, ids: Tensor) -> None:
        """Record one training step whose batch holds ``ids`` (any shape)."""
        ids = self._check_ids(ids)
        ops.frequency_update(self.last_seen, self.gap, self.count, ids.reshape(-1), self.step,
                             self.alpha)
        self.step += 1

    @torch.no_grad()
    def expected_gap(self, ids: Tensor) -> Tensor:
        """Estimated number of steps between batches holding each id (float32, ``ids``' shape)."""
        return self._estimate(ids)[0]

    @torch.no_grad()
    def log_prob(self, ids: Tensor) -> Tensor:
        """Log of each id's estimated probability of appearing in a batch (float32, <= 0)."""
        return -torch.log(self._estimate(ids)[0])

    @torch.no_grad()
    def log_expected_count(self, ids: Tensor) -> Tensor:
        """Log of each id's estimated number of occurrences per batch (float32)."""
        return torch.log(self._estimate(ids)[1])

    def extra_repr(self) -> str:
        arrays, buckets = self.gap.shape
        return f"num_buckets={buckets}, alpha={self.alpha}, num_hashes={arrays}"
