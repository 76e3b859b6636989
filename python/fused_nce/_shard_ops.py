"""Fake (meta) kernels of the vocab-parallel ops (schemas in csrc/ops.cpp)."""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from ._ops import accumulation_dtype, num_columns


@torch.library.register_fake("fused_nce::shard_loss_forward")
def _(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, negatives: Tensor,
      hard_negatives: Optional[Tensor], noise_probs: Optional[Tensor], log_z: Tensor,
      objective: int, positive_weight: float, remove_accidental_hits: bool, ignore_index: int,
      row_start: int, num_classes: int) -> Tuple[Tensor, Tensor]:
    n = hidden.shape[0]
    dtype = accumulation_dtype(hidden.dtype)
    cols = num_columns(target, negatives, hard_negatives)
    return hidden.new_empty((n,), dtype=dtype), hidden.new_empty((n, cols), dtype=dtype)


@torch.library.register_fake("fused_nce::shard_loss_backward")
def _(grad_loss: Tensor, coef: Tensor, hidden: Tensor, weight: Tensor, has_bias: bool,
      target: Tensor, negatives: Tensor, hard_negatives: Optional[Tensor], ignore_index: int,
      row_start: int, num_classes: int, mode: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    dim = weight.shape[1]
    rows: Union[int, torch.SymInt] = weight.shape[0] if mode == 0 else 0
    if mode == 1 and weight.shape[0] > 0:
        # How many rows were touched is known only once the indices are read.
        rows = torch.library.get_ctx().new_dynamic_size()
    return (torch.empty_like(hidden), target.new_empty((rows if mode == 1 else 0,)),
            weight.new_empty((rows, dim)), weight.new_empty((rows if has_bias else 0,)))
