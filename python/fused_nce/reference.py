"""The losses in plain PyTorch ops: the oracle for the tests and the baseline for the benchmarks.

These take explicit negatives and noise probabilities (no sampling) and materialize the gathered
rows ``[N, k, D]``, as a straightforward implementation would (gathered in the input dtype, then
converted: never the whole table). Accumulation follows the kernels:
float32 for half / bfloat16 / float32 inputs, float64 for float64.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

# Smallest positive float32: a zero noise probability becomes a very unlikely class (nce_math.h).
TINY_PROB = 1.401298464324817e-45


class _Columns:
    """An example's scores by kind of column, in the accumulation dtype: positives ``pos`` [N, T]
    (``target`` [N] is T = 1), sampled negatives ``neg`` [N, k] and hard negatives ``hard``
    [N, h], with their (clamped) classes and which of them take part."""

    def __init__(self, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
                 negatives: Tensor, hard_negatives: Optional[Tensor], ignore_index: int,
                 remove_accidental_hits: bool) -> None:
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        h = hidden.reshape(-1, hidden.shape[-1]).to(acc)
        n, last = h.shape[0], weight.shape[0] - 1
        t = target.reshape(n, target.shape[-1] if target.dim() == hidden.dim() else 1)
        self.pos_valid = t != ignore_index
        self.counted = self.pos_valid.any(1)
        self.pos_class = t.clamp(0, last)
        k = negatives.shape[-1]
        self.neg_class = (negatives.expand(n, k) if negatives.dim() == 1
                          else negatives.reshape(n, k))
        hard = (hard_negatives.reshape(n, hard_negatives.shape[-1]) if hard_negatives is not None
                else t.new_empty((n, 0)))
        self.hard_class = hard.clamp(0, last)

        # Rows gathered in the input dtype first, then converted: never the whole [V, D] table.
        def scores(classes: Tensor) -> Tensor:
            out = torch.einsum("nd,nmd->nm", h, weight[classes].to(acc))
            return out + bias[classes].to(acc) if bias is not None else out

        self.pos = scores(self.pos_class)
        self.neg = (h @ weight[negatives].to(acc).T + (bias[negatives].to(acc) if bias is not None
                                                         else 0)
                    if negatives.dim() == 1 else scores(self.neg_class))
        self.hard = scores(self.hard_class)

        def hits(classes: Tensor) -> Tensor:
            same = classes.unsqueeze(2) == t.unsqueeze(1)
            return (same & self.pos_valid.unsqueeze(1)).any(2)

        self.neg_kept = ~hits(self.neg_class) if remove_accidental_hits else torch.ones_like(
            self.neg_class, dtype=torch.bool)
        self.hard_kept = hard != ignore_index
        if remove_accidental_hits:
            self.hard_kept &= ~hits(self.hard_class)


def _log_q(noise_probs: Tensor, index: Tensor, dtype: torch.dtype) -> Tensor:
    return noise_probs.to(torch.float32).clamp_min(TINY_PROB).to(dtype).log()[index]


def _finish(loss: Tensor, c: _Columns, target: Tensor, hidden: Tensor, reduction: str,
            sample_weight: Optional[Tensor]) -> Tensor:
    """Zero for uncounted examples, weighted, reduced ("mean" over the counted examples)."""
    loss = torch.where(c.counted, loss, torch.zeros_like(loss))
    if sample_weight is not None:
        loss = loss * sample_weight.reshape(-1).to(loss.dtype)
    if reduction == "none":
        return loss.reshape(hidden.shape[:-1])
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / c.counted.sum().clamp_min(1)


def _masked_sum(values: Tensor, keep: Tensor) -> Tensor:
    return torch.where(keep, values, torch.zeros_like(values)).sum(-1)


def _binary_loss(c: _Columns, pos: Tensor, neg: Tensor, positive_weight: float = 1.0) -> Tensor:
    return (positive_weight * _masked_sum(F.softplus(-pos), c.pos_valid)
            + _masked_sum(F.softplus(neg), c.neg_kept) + _masked_sum(F.softplus(c.hard), c.hard_kept))


def nce_loss(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
             noise_probs: Tensor, negatives: Tensor, *, log_z: Union[float, Tensor] = 0.0,
             remove_accidental_hits: bool = False, ignore_index: int = -100,
             reduction: str = "mean", sample_weight: Optional[Tensor] = None) -> Tensor:
    """NCE: ``sum_{t in P} softplus(-d(t)) + sum_j softplus(d(n_j))`` with
    ``d = s - log_z - log(k q)``."""
    c = _Columns(hidden, weight, bias, target, negatives, None, ignore_index,
                 remove_accidental_hits)
    k = negatives.shape[-1]
    shift = log_z + torch.log(torch.tensor(float(k), dtype=c.pos.dtype, device=c.pos.device))
    pos = c.pos - shift - _log_q(noise_probs, c.pos_class, c.pos.dtype)
    neg = c.neg - shift - _log_q(noise_probs, c.neg_class, c.pos.dtype)
    return _finish(_binary_loss(c, pos, neg), c, target, hidden, reduction, sample_weight)


def negative_sampling_loss(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
                           negatives: Tensor, *, remove_accidental_hits: bool = False,
                           ignore_index: int = -100, reduction: str = "mean",
                           hard_negatives: Optional[Tensor] = None,
                           sample_weight: Optional[Tensor] = None) -> Tensor:
    """Negative sampling: ``sum_{t in P} softplus(-s(t)) + sum_j softplus(s(n_j))`` (+ hard)."""
    c = _Columns(hidden, weight, bias, target, negatives, hard_negatives, ignore_index,
                 remove_accidental_hits)
    return _finish(_binary_loss(c, c.pos, c.neg), c, target, hidden, reduction, sample_weight)


def gbce_loss(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
              negatives: Tensor, *, t: float = 0.75, remove_accidental_hits: bool = False,
              ignore_index: int = -100, reduction: str = "mean",
              hard_negatives: Optional[Tensor] = None,
              sample_weight: Optional[Tensor] = None) -> Tensor:
    """gBCE (gSASRec): ``beta sum_{t in P} softplus(-s(t)) + sum_j softplus(s(n_j))`` (+ hard),
    ``beta = alpha (t (1 - 1/alpha) + 1/alpha)``, ``alpha = k / (V - 1)``."""
    c = _Columns(hidden, weight, bias, target, negatives, hard_negatives, ignore_index,
                 remove_accidental_hits)
    alpha = negatives.shape[-1] / (weight.shape[0] - 1)
    beta = alpha * (t * (1 - 1 / alpha) + 1 / alpha)
    return _finish(_binary_loss(c, c.pos, c.neg, beta), c, target, hidden, reduction,
                   sample_weight)


def sampled_softmax_loss(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
                         noise_probs: Tensor, negatives: Tensor, *,
                         remove_accidental_hits: bool = True, ignore_index: int = -100,
                         reduction: str = "mean", hard_negatives: Optional[Tensor] = None,
                         sample_weight: Optional[Tensor] = None) -> Tensor:
    """Sampled softmax with logQ correction: cross-entropy over ``[o(P), o(n_1..k), s(hard)]``
    with soft labels ``1/|P|`` on the positives, ``o = s - log q``."""
    c = _Columns(hidden, weight, bias, target, negatives, hard_negatives, ignore_index,
                 remove_accidental_hits)
    pos = c.pos - _log_q(noise_probs, c.pos_class, c.pos.dtype)
    neg = c.neg - _log_q(noise_probs, c.neg_class, c.pos.dtype)
    ninf = float("-inf")
    logits = torch.cat([pos.masked_fill(~c.pos_valid, ninf), neg.masked_fill(~c.neg_kept, ninf),
                        c.hard.masked_fill(~c.hard_kept, ninf)], dim=1)
    # An uncounted example (no valid positive) gets finite stand-in logits: no NaN gradient.
    logits = torch.where(c.counted.unsqueeze(1), logits, torch.zeros_like(logits))
    valid = c.pos_valid.sum(1).clamp_min(1)
    mean_positive = _masked_sum(pos, c.pos_valid) / valid
    lse = torch.logsumexp(logits, dim=1)
    loss = torch.where(c.counted, lse - mean_positive, torch.zeros_like(lse))
    return _finish(loss, c, target, hidden, reduction, sample_weight)


def _reduce(loss: Tensor, target: Tensor, ignore_index: int, reduction: str) -> Tensor:
    keep = target.reshape(-1) != ignore_index
    loss = torch.where(keep, loss, torch.zeros_like(loss))
    if reduction == "none":
        return loss.reshape(target.shape)
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / keep.sum().clamp_min(1)


def full_softmax_loss(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, *,
                      ignore_index: int = -100, reduction: str = "mean") -> Tensor:
    """Exact cross-entropy over all V classes on materialized ``[N, V]`` logits."""
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    h = hidden.reshape(-1, hidden.shape[-1])
    logits = F.linear(h, weight, bias).to(acc)
    loss = F.cross_entropy(logits, target.reshape(-1), ignore_index=ignore_index, reduction="none")
    return _reduce(loss, target, ignore_index, reduction)


def in_batch_softmax_loss(query: Tensor, candidates: Tensor, candidate_ids: Tensor, *,
                          log_q: Optional[Tensor] = None,
                          extra_candidates: Optional[Tensor] = None,
                          extra_ids: Optional[Tensor] = None,
                          extra_log_q: Optional[Tensor] = None,
                          temperature: Union[float, Tensor] = 1.0,
                          remove_accidental_hits: bool = True,
                          sample_weight: Optional[Tensor] = None,
                          reduction: str = "mean") -> Tensor:
    """In-batch (+ extra) softmax on the materialized ``[N, N + M]`` logits
    ``<query_i, cand_j> / temperature - log_q_j``; the positive of query i is column i."""
    acc = torch.float64 if query.dtype == torch.float64 else torch.float32
    n = query.shape[0]
    columns, ids = candidates.to(acc), candidate_ids
    lq = log_q.to(acc) if log_q is not None else torch.zeros(n, dtype=acc, device=query.device)
    if extra_candidates is not None and extra_ids is not None:
        m = extra_candidates.shape[0]
        columns = torch.cat([columns, extra_candidates.to(acc)])
        ids = torch.cat([ids, extra_ids])
        extra = (extra_log_q.to(acc) if extra_log_q is not None
                 else torch.zeros(m, dtype=acc, device=query.device))
        lq = torch.cat([lq, extra])
    t = temperature.to(acc) if isinstance(temperature, Tensor) else temperature
    logits = query.to(acc) @ columns.T / t - lq
    rows = torch.arange(n, device=query.device)
    if remove_accidental_hits:
        hit = ids.unsqueeze(0) == candidate_ids.unsqueeze(1)
        hit[rows, rows] = False
        logits = logits.masked_fill(hit, float("-inf"))
    loss = torch.logsumexp(logits, dim=1) - logits[rows, rows]
    if sample_weight is not None:
        loss = loss * sample_weight.to(acc)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / n
