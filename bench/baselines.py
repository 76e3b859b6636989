"""The sampled losses as a careful PyTorch user writes them: the peers every speed claim is measured
against, in the same run (not the tests' oracle, ``fused_nce.reference``).

Rows are gathered first, in the input dtype (``W[t]``, ``W[n]``, or ``F.embedding(...,
sparse=True)`` for row-sparse gradients), scores come from one GEMM (shared negatives) or a
batched matrix-vector product (per-example negatives), and only the ``[N, 1 + k]`` scores go to
float32 for the loss. ``log_q`` is the ``[V]`` table of log noise probabilities, computed once
outside the step. Providers:

- ``pytorch``: eager, dense gradients;
- ``pytorch_compiled``: the same function under ``torch.compile`` (compile time reported apart);
- ``pytorch_sparse``: eager with ``F.embedding(..., sparse=True)`` gathers, so ``W`` gets a
  row-sparse gradient (the bias a dense one), the peer of ``sparse_grad=True``.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def _rows(table: Tensor, index: Tensor, sparse: bool) -> Tensor:
    return F.embedding(index, table, sparse=True) if sparse else table[index]


def sampled_loss(objective: str, hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
                 target: Tensor, negatives: Tensor, log_q: Tensor, *, sparse: bool = False,
                 log_z: float = 0.0) -> Tensor:
    """The mean NCE / negative sampling / sampled softmax (logQ, accidental hits removed) loss
    over ``[N]`` examples with ``[N, k]`` or shared ``[k]`` negatives."""
    shared = negatives.dim() == 1
    w_t = _rows(weight, target, sparse)                       # [N, D]
    w_n = _rows(weight, negatives, sparse)                    # [k, D] or [N, k, D]
    pos = (hidden * w_t).sum(-1).float()                      # [N]
    if shared:
        neg = (hidden @ w_n.T).float()                        # [N, k]
    else:
        neg = torch.bmm(w_n, hidden.unsqueeze(2)).squeeze(2).float()
    if bias is not None:
        # A [V] bias keeps a dense gradient (sparse autograd cannot go back through a [V, 1]
        # view of it): V floats, small beside the [V, D] weight's.
        pos = pos + bias[target].float()
        neg = neg + bias[negatives].float()
    k = negatives.shape[-1]
    if objective == "negative_sampling":
        return (F.softplus(-pos) + F.softplus(neg).sum(-1)).mean()
    q_t, q_n = log_q[target], log_q[negatives]
    if objective == "nce":
        shift = log_z + math.log(k)
        return (F.softplus(-(pos - shift - q_t)) + F.softplus(neg - shift - q_n).sum(-1)).mean()
    o_t, o_n = pos - q_t, neg - q_n
    o_n = o_n.masked_fill(negatives == target.unsqueeze(1), float("-inf"))
    logits = torch.cat([o_t.unsqueeze(1), o_n], dim=1)
    return (torch.logsumexp(logits, dim=1) - o_t).mean()


def in_batch_loss(query: Tensor, candidates: Tensor, candidate_ids: Tensor, log_q: Tensor,
                  temperature: Tensor) -> Tensor:
    """In-batch softmax, logQ-corrected, accidental hits removed: one ``[N, N]`` GEMM and
    ``F.cross_entropy`` on the float32 logits."""
    logits = (query @ candidates.T).float() / temperature - log_q.float()
    hits = candidate_ids.unsqueeze(0) == candidate_ids.unsqueeze(1)
    hits.fill_diagonal_(False)
    logits = logits.masked_fill(hits, float("-inf"))
    labels = torch.arange(query.shape[0], device=query.device)
    return F.cross_entropy(logits, labels)


def compiled(fn: Callable, mode: Optional[str] = None) -> Callable:
    """``fn`` under ``torch.compile`` (fixed shapes, as a training loop's)."""
    return torch.compile(fn, dynamic=False, mode=mode)


def multi_positive_loss(objective: str, hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
                        target: Tensor, negatives: Tensor, hard_negatives: Tensor, log_q: Tensor,
                        *, beta: float = 1.0, sparse: bool = False) -> Tensor:
    """Several positives ``[N, T]`` (no padding), sampled negatives ``[N, k]`` or ``[k]`` and
    hard negatives ``[N, h]``, as a careful user writes them: one gather of the example's
    ``T + h`` own rows (and ``k`` sampled), bmm / GEMM scores, float32 loss. Sampled softmax
    (logQ on the drawn columns, soft labels 1/T, accidental hits kept) or gBCE / BCE with the
    positive terms weighted by ``beta``."""
    own = torch.cat([target, hard_negatives], 1)
    w_own = _rows(weight, own, sparse)                                    # [N, T + h, D]
    s_own = torch.bmm(w_own, hidden.unsqueeze(2)).squeeze(2).float()
    w_n = _rows(weight, negatives, sparse)
    s_neg = ((hidden @ w_n.T) if negatives.dim() == 1
             else torch.bmm(w_n, hidden.unsqueeze(2)).squeeze(2)).float()
    if bias is not None:
        s_own = s_own + bias[own].float()
        s_neg = s_neg + bias[negatives].float()
    t = target.shape[1]
    s_pos, s_hard = s_own[:, :t], s_own[:, t:]
    if objective == "sampled_softmax":
        o_pos = s_pos - log_q[target]
        o_neg = s_neg - log_q[negatives]
        logits = torch.cat([o_pos, o_neg.expand(s_pos.shape[0], -1), s_hard], 1)
        return (torch.logsumexp(logits, 1) - o_pos.mean(1)).mean()
    return (beta * F.softplus(-s_pos).sum(1) + F.softplus(s_neg).sum(1)
            + F.softplus(s_hard).sum(1)).mean()
