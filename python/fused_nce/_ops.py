"""The registered ops and their fake (meta) kernels (the loss op's autograd: csrc/autograd.cpp)."""

from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import _C  # noqa: F401  (importing it registers torch.ops.fused_nce)

ops = torch.ops.fused_nce

# Values of the ops' `objective` argument (csrc/nce_math.h).
OBJECTIVES = {"nce": 0, "negative_sampling": 1, "sampled_softmax": 2}
# Values of the `reduction` argument of the sampled_loss op (csrc/autograd.cpp).
REDUCTION_CODES = {"none": 0, "sum": 1, "mean": 2}


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Loss and coefficient dtype: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def num_columns(target: Tensor, negatives: Tensor, hard_negatives: Optional[Tensor]) -> Any:
    """T + k + h: an example's positives, sampled negatives and hard negatives."""
    positives = target.shape[1] if target.dim() == 2 else 1
    hard = hard_negatives.shape[1] if hard_negatives is not None else 0
    return positives + negatives.shape[-1] + hard


@torch.library.register_fake("fused_nce::sampled_loss_forward")
def _(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, negatives: Tensor,
      hard_negatives: Optional[Tensor], noise_probs: Optional[Tensor], log_z: Tensor,
      objective: int, positive_weight: float, remove_accidental_hits: bool,
      ignore_index: int) -> Tuple[Tensor, Tensor]:
    n = hidden.shape[0]
    dtype = accumulation_dtype(hidden.dtype)
    cols = num_columns(target, negatives, hard_negatives)
    return hidden.new_empty((n,), dtype=dtype), hidden.new_empty((n, cols), dtype=dtype)


@torch.library.register_fake("fused_nce::sampled_loss")
def _(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, negatives: Tensor,
      hard_negatives: Optional[Tensor], noise_probs: Optional[Tensor], log_z: Tensor,
      objective: int, positive_weight: float, remove_accidental_hits: bool, ignore_index: int,
      sparse_grad: bool, reduction: int) -> Tensor:
    if reduction not in REDUCTION_CODES.values():
        raise ValueError(f"unknown reduction {reduction}")
    shape = (hidden.shape[0],) if reduction == REDUCTION_CODES["none"] else ()
    return hidden.new_empty(shape, dtype=accumulation_dtype(hidden.dtype))


@torch.library.register_fake("fused_nce::sampled_loss_backward")
def _(grad_loss: Tensor, coef: Tensor, hidden: Tensor, weight: Tensor, has_bias: bool,
      target: Tensor, negatives: Tensor, hard_negatives: Optional[Tensor],
      ignore_index: int) -> Tuple[Tensor, Tensor, Tensor]:
    grad_bias = weight.new_empty((weight.shape[0],) if has_bias else (0,))
    return torch.empty_like(hidden), torch.empty_like(weight), grad_bias


@torch.library.register_fake("fused_nce::sampled_loss_backward_rows")
def _(grad_loss: Tensor, coef: Tensor, hidden: Tensor, weight: Tensor, has_bias: bool,
      target: Tensor, negatives: Tensor, hard_negatives: Optional[Tensor],
      ignore_index: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    # How many distinct rows were touched is known only once the indices are read.
    num_rows = torch.library.get_ctx().new_dynamic_size()
    rows = target.new_empty((num_rows,))
    grad_bias = weight.new_empty((num_rows,) if has_bias else (0,))
    return torch.empty_like(hidden), rows, weight.new_empty((num_rows, weight.shape[1])), grad_bias


@torch.library.register_fake("fused_nce::sampled_loss_backward_hidden")
def _(grad_loss: Tensor, coef: Tensor, hidden: Tensor, weight: Tensor, target: Tensor,
      negatives: Tensor, hard_negatives: Optional[Tensor], ignore_index: int) -> Tensor:
    return hidden.new_empty(hidden.shape)


@torch.library.register_fake("fused_nce::alias_build")
def _(weights: Tensor) -> Tensor:
    return weights.new_empty(weights.shape, dtype=torch.int64)


@torch.library.register_fake("fused_nce::alias_sample")
def _(table: Tensor, size: Sequence[int], generator: Optional[torch.Generator] = None) -> Tensor:
    return table.new_empty(size, dtype=torch.int64)


def _rows_to_sparse(rows: Tensor, values: Tensor, size: Sequence[int]) -> Tensor:
    """A coalesced COO tensor of ``size`` whose only non-zero rows are ``values`` at ``rows``."""
    # rows come strictly ascending from the kernel: the tensor is coalesced as built, and
    # checking the invariants again would cost a pass over the indices.
    return torch.sparse_coo_tensor(rows.unsqueeze(0), values, tuple(size), is_coalesced=True,
                                   check_invariants=False)


class CastFunction(torch.autograd.Function):
    """``tensor.to(dtype)`` whose backward also casts a sparse gradient back (``Tensor.to``'s
    backward cannot change a sparse gradient's dtype)."""

    @staticmethod
    def forward(tensor: Tensor, dtype: torch.dtype) -> Tensor:
        return tensor.to(dtype)

    @staticmethod
    def setup_context(ctx: Any, inputs: Sequence[Any], output: Tensor) -> None:
        ctx.input_dtype = inputs[0].dtype

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tuple[Tensor, None]:
        return grad.to(ctx.input_dtype), None


def sampled_loss(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
                 negatives: Tensor, hard_negatives: Optional[Tensor],
                 noise_probs: Optional[Tensor], log_z: Tensor, objective: int,
                 positive_weight: float, remove_accidental_hits: bool, ignore_index: int,
                 sparse_grad: bool, reduction: str) -> Tensor:
    """The differentiable loss (csrc/autograd.cpp): per example [N], or its sum or mean over the
    examples not ignored (those with a valid positive). With ``sparse_grad`` the gradients of
    weight and bias are coalesced sparse COO tensors that hold only the touched rows."""
    loss: Tensor = ops.sampled_loss(hidden, weight, bias, target, negatives, hard_negatives,
                                    noise_probs, log_z, objective, positive_weight,
                                    remove_accidental_hits, ignore_index, sparse_grad,
                                    REDUCTION_CODES[reduction])
    return loss


def cast(tensor: Tensor, dtype: torch.dtype, sparse_grad: bool) -> Tensor:
    """``tensor.to(dtype)``, differentiable for the sparse gradients of ``sparse_grad=True``."""
    if not sparse_grad or tensor.dtype == dtype:
        return tensor.to(dtype)
    result: Tensor = CastFunction.apply(tensor, dtype)  # type: ignore[no-untyped-call]
    return result
