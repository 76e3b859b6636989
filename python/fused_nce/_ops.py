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
def _(hidden, weight, bias, target, negatives, noise_probs, log_z, objective,
      remove_accidental_hits, ignore_index):
    n, k = hidden.shape[0], negatives.shape[-1]
    dtype = accumulation_dtype(hidden.dtype)
    return hidden.new_empty((n,), dtype=dtype), hidden.new_empty((n, 1 + k), dtype=dtype)


@torch.library.register_fake("fused_nce::sampled_loss_backward")
def _(grad_loss, coef, hidden, weight, has_bias, target, negatives, ignore_index):
    grad_bias = weight.new_empty((weight.shape[0],) if has_bias else (0,))
    return torch.empty_like(hidden), torch.empty_like(weight), grad_bias


@torch.library.register_fake("fused_nce::sampled_loss_backward_rows")
def _(grad_loss, coef, hidden, weight, has_bias, target, negatives, ignore_index):
    # How many distinct rows were touched is known only once the indices are read.
    num_rows = torch.library.get_ctx().new_dynamic_size()
    rows = target.new_empty((num_rows,))
    grad_bias = weight.new_empty((num_rows,) if has_bias else (0,))
    return torch.empty_like(hidden), rows, weight.new_empty((num_rows, weight.shape[1])), grad_bias


@torch.library.register_fake("fused_nce::alias_build")
def _(weights):
    return weights.new_empty(weights.shape, dtype=torch.int64)


@torch.library.register_fake("fused_nce::alias_sample")
def _(table, size, generator=None):
    return table.new_empty(size, dtype=torch.int64)


class SampledLossFunction(torch.autograd.Function):
    """Per-example sampled loss [N]; differentiable in hidden, weight, bias and log_z."""

    @staticmethod
    def forward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
                negatives: Tensor, noise_probs: Optional[Tensor], log_z: Tensor,
                objective: int, remove_accidental_hits: bool, ignore_index: int) -> Tuple[Tensor, Tensor]:
        return ops.sampled_loss_forward(hidden, weight, bias, target, negatives, noise_probs,
                                        log_z, objective, remove_accidental_hits, ignore_index)

    @staticmethod
    def setup_context(ctx: Any, inputs: Sequence[Any], output: Tuple[Tensor, Tensor]) -> None:
        hidden, weight, bias, target, negatives, _, log_z, objective, _, ignore_index = inputs
        _, coef = output
        ctx.mark_non_differentiable(coef)
        ctx.save_for_backward(hidden, weight, target, negatives, coef)
        ctx.has_bias = bias is not None
        ctx.objective = objective
        ctx.ignore_index = ignore_index

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_loss: Optional[Tensor], _grad_coef: Any):
        hidden, weight, target, negatives, coef = ctx.saved_tensors
        if grad_loss is None:
            grad_loss = torch.zeros_like(coef[:, 0])
        grad_loss = grad_loss.contiguous()
        grad_hidden = grad_weight = grad_bias = grad_log_z = None
        if any(ctx.needs_input_grad[:3]):
            grad_hidden, grad_weight, grad_bias = ops.sampled_loss_backward(
                grad_loss, coef, hidden, weight, ctx.has_bias, target, negatives,
                ctx.ignore_index)
            if not ctx.has_bias:
                grad_bias = None
        if ctx.needs_input_grad[6] and ctx.objective == NCE:
            # d = s - log_z - log(k q): dloss/dlog_z = -sum_j dloss/ds_j.
            grad_log_z = -(grad_loss.unsqueeze(1) * coef).sum()
        return (grad_hidden, grad_weight, grad_bias, None, None, None, grad_log_z,
                None, None, None)
