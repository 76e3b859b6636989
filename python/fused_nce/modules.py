"""``NCELoss``: a sampled loss that owns its noise distribution."""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import Tensor, nn

from . import functional
from ._ops import OBJECTIVES
from .sampler import AliasSampler


class NCELoss(nn.Module):
    """Sampled loss over ``num_classes`` outputs with a fixed noise distribution.

    The module owns the alias table of ``noise_weights`` (buffers: moved by ``.to()`` /
    ``.cuda()``, saved in ``state_dict``) and, with ``learn_log_z=True``, a scalar ``log_z``
    parameter (NCE only). Call it as ``crit(hidden, weight, bias, target)``.

    Args:
        num_classes: V.
        noise_weights: non-negative ``[V]`` noise weights (e.g. :func:`unigram_weights`); None
            for uniform noise (gSASRec's, for ``objective="gbce"``).
        num_negatives: k, negatives drawn per example (or per batch when shared).
        objective: ``"nce"``, ``"negative_sampling"``, ``"sampled_softmax"`` or ``"gbce"``.
        shared_negatives: draw one ``[k]`` set of negatives per call for the whole batch.
        learn_log_z: learn the NCE normalizer ``log_z`` (initialized to 0).
        remove_accidental_hits: default True for sampled softmax, False otherwise.
        ignore_index: as in :func:`fused_nce.nce_loss`.
        reduction: as in :func:`fused_nce.nce_loss`.
        sparse_grad: as in :func:`fused_nce.nce_loss`.
        gbce_t: gBCE's calibration ``t`` in ``[0, 1]`` (:func:`fused_nce.gbce_loss`).

    ``forward`` also takes ``target`` ``[*, T]`` (several positives), ``hard_negatives`` and
    ``sample_weight`` as the functions do.
    """

    noise_probs: Tensor
    noise_table: Tensor

    def __init__(self, num_classes: int, noise_weights: Optional[Tensor], num_negatives: int, *,
                 objective: str = "nce", shared_negatives: bool = False, learn_log_z: bool = False,
                 remove_accidental_hits: Optional[bool] = None, ignore_index: int = -100,
                 reduction: str = "mean", sparse_grad: bool = False,
                 gbce_t: float = 0.75) -> None:
        super().__init__()
        objectives = (*OBJECTIVES, "gbce")
        if objective not in objectives:
            raise ValueError(f"objective must be one of {objectives}, got {objective!r}")
        if objective == "gbce":
            functional._gbce_beta(gbce_t, 1, 2)  # checks t
        if noise_weights is None:
            noise_weights = torch.ones(num_classes)
        if isinstance(num_negatives, bool) or not isinstance(num_negatives, int) or num_negatives < 1:
            raise ValueError(f"num_negatives must be an int >= 1, got {num_negatives!r}")
        if learn_log_z and objective != "nce":
            raise ValueError("learn_log_z applies to objective='nce' only")
        functional._check_reduction(reduction)
        if isinstance(noise_weights, Tensor) and noise_weights.shape != (num_classes,):
            raise ValueError(f"noise_weights must be [num_classes] = [{num_classes}], "
                             f"got shape {tuple(noise_weights.shape)}")
        sampler = AliasSampler(noise_weights)
        self.register_buffer("noise_probs", sampler.probs)
        self.register_buffer("noise_table", sampler.table)
        self.num_classes = num_classes
        self.num_negatives = num_negatives
        self.objective = objective
        self.shared_negatives = shared_negatives
        if remove_accidental_hits is None:
            remove_accidental_hits = objective == "sampled_softmax"
        self.remove_accidental_hits = remove_accidental_hits
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.sparse_grad = sparse_grad
        self.log_z = nn.Parameter(torch.zeros(())) if learn_log_z else None
        self.gbce_t = float(gbce_t)

    @property
    def sampler(self) -> AliasSampler:
        """The noise sampler, on this module's device."""
        return AliasSampler.from_tables(self.noise_probs, self.noise_table)

    def forward(self, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
                *, generator: Optional[torch.Generator] = None,
                hard_negatives: Optional[Tensor] = None,
                sample_weight: Optional[Tensor] = None) -> Tensor:
        common: Dict[str, Any] = dict(
            num_negatives=self.num_negatives, shared_negatives=self.shared_negatives,
            remove_accidental_hits=self.remove_accidental_hits, ignore_index=self.ignore_index,
            reduction=self.reduction, generator=generator, sparse_grad=self.sparse_grad,
            hard_negatives=hard_negatives, sample_weight=sample_weight)
        if self.objective == "nce":
            log_z = self.log_z if self.log_z is not None else 0.0
            return functional.nce_loss(hidden, weight, bias, target, self.sampler, log_z=log_z,
                                       **common)
        if self.objective == "gbce":
            common["t"] = self.gbce_t
        loss_fn = getattr(functional, f"{self.objective}_loss")
        loss: Tensor = loss_fn(hidden, weight, bias, target, self.sampler, **common)
        return loss

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, num_negatives={self.num_negatives}, "
                f"objective={self.objective!r}, shared_negatives={self.shared_negatives}"
                + (f", gbce_t={self.gbce_t}" if self.objective == "gbce" else "")
                + (", sparse_grad=True" if self.sparse_grad else ""))
