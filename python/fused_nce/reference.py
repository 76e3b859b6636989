"""The losses in plain PyTorch ops: the oracle for the tests and the baseline for the benchmarks.

These take explicit negatives and noise probabilities (no sampling) and materialize the gathered
rows ``[N, k, D]``, as a straightforward implementation would (gathered in the input dtype, then
converted: never the whole table). Accumulation follows the kernels:
float32 for half / bfloat16 / float32 inputs, float64 for float64.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

# Smallest positive float32: a zero noise probability becomes a very unlikely class (nce_math.h).
TINY_PROB = 1.401298464324817e-45


def _scores(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
            negatives: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Target scores [N], negative scores [N, k], flat targets [N] and negatives [N, k].

    Rows are gathered in the input dtype first and only the gathered rows are converted to the
    accumulation dtype: never a copy of the whole ``[V, D]`` table or its gradient."""
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    h = hidden.reshape(-1, hidden.shape[-1]).to(acc)
    t = target.reshape(-1)
    safe_t = t.clamp(0, weight.shape[0] - 1)
    k = negatives.shape[-1]
    if negatives.dim() == 1:
        n = negatives.expand(h.shape[0], k)
        neg = h @ weight[negatives].to(acc).T
    else:
        n = negatives.reshape(-1, k)
        neg = torch.einsum("nd,nkd->nk", h, weight[n].to(acc))
    pos = (h * weight[safe_t].to(acc)).sum(-1)
    if bias is not None:
        pos = pos + bias[safe_t].to(acc)
        neg = neg + bias[n].to(acc)
    return pos, neg, t, n


def _log_q(noise_probs: Tensor, index: Tensor, dtype: torch.dtype) -> Tensor:
    return noise_probs.to(torch.float32).clamp_min(TINY_PROB).to(dtype).log()[index]


def _reduce(loss: Tensor, target: Tensor, ignore_index: int, reduction: str) -> Tensor:
    keep = target.reshape(-1) != ignore_index
    loss = torch.where(keep, loss, torch.zeros_like(loss))
    if reduction == "none":
        return loss.reshape(target.shape)
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / keep.sum().clamp_min(1)


def _binary_loss(pos: Tensor, neg: Tensor, t: Tensor, n: Tensor,
                 remove_accidental_hits: bool) -> Tensor:
    neg_terms = F.softplus(neg)
    if remove_accidental_hits:
        neg_terms = neg_terms.masked_fill(n == t.unsqueeze(1), 0.0)
    return F.softplus(-pos) + neg_terms.sum(-1)


def nce_loss(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
             noise_probs: Tensor, negatives: Tensor, *, log_z: Union[float, Tensor] = 0.0,
             remove_accidental_hits: bool = False, ignore_index: int = -100,
             reduction: str = "mean") -> Tensor:
    """NCE: ``softplus(-d(t)) + sum_j softplus(d(n_j))`` with ``d = s - log_z - log(k q)``."""
    pos, neg, t, n = _scores(hidden, weight, bias, target, negatives)
    k = negatives.shape[-1]
    shift = log_z + torch.log(torch.tensor(float(k), dtype=pos.dtype, device=pos.device))
    safe_t = t.clamp(0, weight.shape[0] - 1)
    pos = pos - shift - _log_q(noise_probs, safe_t, pos.dtype)
    neg = neg - shift - _log_q(noise_probs, n, pos.dtype)
    loss = _binary_loss(pos, neg, t, n, remove_accidental_hits)
    return _reduce(loss, target, ignore_index, reduction)


def negative_sampling_loss(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
                           negatives: Tensor, *, remove_accidental_hits: bool = False,
                           ignore_index: int = -100, reduction: str = "mean") -> Tensor:
    """Negative sampling: ``softplus(-s(t)) + sum_j softplus(s(n_j))``."""
    pos, neg, t, n = _scores(hidden, weight, bias, target, negatives)
    loss = _binary_loss(pos, neg, t, n, remove_accidental_hits)
    return _reduce(loss, target, ignore_index, reduction)


def sampled_softmax_loss(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
                         noise_probs: Tensor, negatives: Tensor, *,
                         remove_accidental_hits: bool = True, ignore_index: int = -100,
                         reduction: str = "mean") -> Tensor:
    """Sampled softmax with logQ correction: cross-entropy over ``[o(t), o(n_1..k)]``, o = s - log q."""
    pos, neg, t, n = _scores(hidden, weight, bias, target, negatives)
    safe_t = t.clamp(0, weight.shape[0] - 1)
    pos = pos - _log_q(noise_probs, safe_t, pos.dtype)
    neg = neg - _log_q(noise_probs, n, pos.dtype)
    if remove_accidental_hits:
        neg = neg.masked_fill(n == t.unsqueeze(1), float("-inf"))
    logits = torch.cat([pos.unsqueeze(1), neg], dim=1)
    loss = torch.logsumexp(logits, dim=1) - pos
    return _reduce(loss, target, ignore_index, reduction)


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
