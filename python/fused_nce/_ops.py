"""The registered ops, their fake (meta) kernels and the autograd Function over them."""

from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import _C  # noqa: F401  (importing it registers torch.ops.fused_nce)

ops = torch.ops.fused_nce

# Values of the ops' `objective` argument (csrc/nce_math.h).
OBJECTIVES = {"nce": 0, "negative_sampling": 1, "sampled_softmax": 2}
NCE = OBJECTIVES["nce"]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Loss and coefficient dtype: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("fused_nce::sampled_loss_forward")
def _(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, negatives: Tensor,
      noise_probs: Optional[Tensor], log_z: Tensor, objective: int, remove_accidental_hits: bool,
      ignore_index: int) -> Tuple[Tensor, Tensor]:
    n, k = hidden.shape[0], negatives.shape[-1]
    dtype = accumulation_dtype(hidden.dtype)
    return hidden.new_empty((n,), dtype=dtype), hidden.new_empty((n, 1 + k), dtype=dtype)


@torch.library.register_fake("fused_nce::sampled_loss_backward")
def _(grad_loss: Tensor, coef: Tensor, hidden: Tensor, weight: Tensor, has_bias: bool,
      target: Tensor, negatives: Tensor, ignore_index: int) -> Tuple[Tensor, Tensor, Tensor]:
    grad_bias = weight.new_empty((weight.shape[0],) if has_bias else (0,))
    return torch.empty_like(hidden), torch.empty_like(weight), grad_bias


@torch.library.register_fake("fused_nce::sampled_loss_backward_rows")
def _(grad_loss: Tensor, coef: Tensor, hidden: Tensor, weight: Tensor, has_bias: bool,
      target: Tensor, negatives: Tensor,
      ignore_index: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    # How many distinct rows were touched is known only once the indices are read.
    num_rows = torch.library.get_ctx().new_dynamic_size()
    rows = target.new_empty((num_rows,))
    grad_bias = weight.new_empty((num_rows,) if has_bias else (0,))
    return torch.empty_like(hidden), rows, weight.new_empty((num_rows, weight.shape[1])), grad_bias


@torch.library.register_fake("fused_nce::sampled_loss_backward_hidden")
def _(grad_loss: Tensor, coef: Tensor, hidden: Tensor, weight: Tensor, target: Tensor,
      negatives: Tensor, ignore_index: int) -> Tensor:
    return hidden.new_empty(hidden.shape)


@torch.library.register_fake("fused_nce::alias_build")
def _(weights: Tensor) -> Tensor:
    return weights.new_empty(weights.shape, dtype=torch.int64)


@torch.library.register_fake("fused_nce::alias_sample")
def _(table: Tensor, size: Sequence[int], generator: Optional[torch.Generator] = None) -> Tensor:
    return table.new_empty(size, dtype=torch.int64)


class SampledLossFunction(torch.autograd.Function):
    """Per-example sampled loss [N]; differentiable in hidden, weight, bias and log_z.

    With ``sparse_grad`` the gradients of weight and bias are coalesced sparse COO tensors that
    hold only the touched rows.
    """

    # forward(ctx, ...) rather than a separate setup_context: Function.apply then skips binding
    # the arguments to forward's signature on every call (inspect, ~30 us a call). The kernels
    # exclude autocast themselves, so no autocast region is entered here either.
    @staticmethod
    def forward(ctx: Any, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
                negatives: Tensor, noise_probs: Optional[Tensor], log_z: Tensor,
                objective: int, remove_accidental_hits: bool, ignore_index: int,
                sparse_grad: bool) -> Tuple[Tensor, Tensor]:
        loss, coef = ops.sampled_loss_forward(
            hidden, weight, bias, target, negatives, noise_probs, log_z, objective,
            remove_accidental_hits, ignore_index)
        ctx.mark_non_differentiable(coef)
        ctx.save_for_backward(hidden, weight, target, negatives, coef)
        ctx.has_bias = bias is not None
        ctx.objective = objective
        ctx.ignore_index = ignore_index
        ctx.sparse_grad = sparse_grad
        return loss, coef

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_loss: Optional[Tensor],
                 _grad_coef: Any) -> Tuple[Optional[Tensor], ...]:
        hidden, weight, target, negatives, coef = ctx.saved_tensors
        if grad_loss is None:
            grad_loss = torch.zeros_like(coef[:, 0])
        grad_hidden = grad_weight = grad_bias = grad_log_z = None
        needs = ctx.needs_input_grad
        if needs[0] or needs[1] or needs[2]:
            if not (needs[1] or needs[2]):
                # A frozen output layer: grad_hidden alone, no weight rows at all.
                grad_hidden = ops.sampled_loss_backward_hidden(
                    grad_loss, coef, hidden, weight, target, negatives, ctx.ignore_index)
            elif ctx.sparse_grad:
                grad_hidden, rows, weight_rows, bias_rows = ops.sampled_loss_backward_rows(
                    grad_loss, coef, hidden, weight, ctx.has_bias, target, negatives,
                    ctx.ignore_index)
                grad_weight = _rows_to_sparse(rows, weight_rows, weight.shape)
                if ctx.has_bias:
                    grad_bias = _rows_to_sparse(rows, bias_rows, weight.shape[:1])
            else:
                grad_hidden, grad_weight, grad_bias = ops.sampled_loss_backward(
                    grad_loss, coef, hidden, weight, ctx.has_bias, target, negatives,
                    ctx.ignore_index)
            if not ctx.has_bias:
                grad_bias = None
        if needs[6] and ctx.objective == NCE:
            # d = s - log_z - log(k q): dloss/dlog_z = -sum_j dloss/ds_j.
            grad_log_z = -(grad_loss.unsqueeze(1) * coef).sum()
        return (grad_hidden, grad_weight, grad_bias, None, None, None, grad_log_z,
                None, None, None, None)


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
                 negatives: Tensor, noise_probs: Optional[Tensor], log_z: Tensor, objective: int,
                 remove_accidental_hits: bool, ignore_index: int, sparse_grad: bool) -> Tensor:
    """Differentiable per-example loss [N] (the arguments of ``SampledLossFunction.forward``)."""
    loss: Tensor
    loss, _ = SampledLossFunction.apply(  # type: ignore[no-untyped-call]
        hidden, weight, bias, target, negatives, noise_probs, log_z, objective,
        remove_accidental_hits, ignore_index, sparse_grad)
    return loss


def cast(tensor: Tensor, dtype: torch.dtype, sparse_grad: bool) -> Tensor:
    """``tensor.to(dtype)``, differentiable for the sparse gradients of ``sparse_grad=True``."""
    if not sparse_grad or tensor.dtype == dtype:
        return tensor.to(dtype)
    result: Tensor = CastFunction.apply(tensor, dtype)  # type: ignore[no-untyped-call]
    return result
