"""Fused row optimizers: update only the rows present in a sparse gradient, in one pass.

With ``sparse_grad=True`` the output embedding's gradient holds the touched rows only (about 16%
of a 1M-row vocabulary per step). ``torch.optim.SparseAdam`` still spends several tensor passes
and temporaries per step on them; these optimizers read each touched row's gradient, parameter
and state once and write the parameter and state in place (one registered op per parameter:
C++ over rows on the CPU, a vectorized kernel on CUDA). Rows that are not touched cost nothing.

- :class:`RowSGD` equals ``torch.optim.SGD`` (no momentum). ``weight_decay`` is lazy: it applies
  to the rows present in the gradient (``torch.optim.SGD`` turns a sparse gradient dense to decay
  every row).
- :class:`RowAdagrad` equals ``torch.optim.Adagrad``; ``rowwise=True`` keeps one accumulator per
  row (the mean over the row of the squared gradient): state ``[V]`` instead of ``[V, D]``.
- :class:`RowAdam` equals ``torch.optim.SparseAdam`` (lazy: a row's moments change only in steps
  that touch it; bias correction uses the parameter's step count), and ``torch.optim.Adam`` for a
  dense gradient.

A dense gradient updates every row. State is float32 for float32 / bfloat16 / float16 parameters
(float64 for float64) and stays so through ``state_dict`` / ``load_state_dict``.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Iterable, Optional, Tuple, Union

import torch
from torch import Tensor

from . import _C  # noqa: F401  (importing it registers torch.ops.fused_nce)

__all__ = ["RowAdagrad", "RowAdam", "RowSGD"]

_ops = torch.ops.fused_nce
_PARAM_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
Params = Union[Iterable[Tensor], Iterable[Dict[str, Any]]]


@torch.library.register_fake("fused_nce::row_sgd_step")
def _(param: Tensor, rows: Optional[Tensor], grad: Tensor, lr: float, weight_decay: float) -> None:
    return None


@torch.library.register_fake("fused_nce::row_adagrad_step")
def _(param: Tensor, state_sum: Tensor, rows: Optional[Tensor], grad: Tensor, lr: float,
      eps: float, rowwise: bool) -> None:
    return None


@torch.library.register_fake("fused_nce::row_adam_step")
def _(param: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, rows: Optional[Tensor], grad: Tensor,
      step_size: float, beta1: float, beta2: float, eps: float) -> None:
    return None


def state_dtype(param: Tensor) -> torch.dtype:
    """The optimizer state's dtype: float64 for float64 parameters, float32 otherwise."""
    return torch.float64 if param.dtype == torch.float64 else torch.float32


def row_gradient(param: Tensor, grad: Tensor,
                 coalesce: bool = True) -> Tuple[Optional[Tensor], Tensor]:
    """``(rows, values)`` of a gradient: the strictly ascending rows present and their values
    ``[U, ...]`` for a sparse COO gradient (coalesced here if it is not), ``(None, grad)`` for a
    dense one. With ``coalesce=False`` a gradient sparse in its rows only comes back as stored,
    rows not known to be unique: the ops check that they are strictly ascending."""
    if grad.device != param.device:
        raise ValueError(f"grad must be on its parameter's device {param.device}, got "
                         f"{grad.device}")
    if grad.shape != param.shape:
        raise ValueError(f"grad must have its parameter's shape {tuple(param.shape)}, got "
                         f"{tuple(grad.shape)}")
    if grad.dtype != param.dtype:
        raise TypeError(f"grad must have its parameter's dtype {param.dtype}, got {grad.dtype}")
    if grad.layout == torch.strided:
        return None, grad
    if grad.layout != torch.sparse_coo:
        raise TypeError(f"grad must be dense or sparse COO, got layout {grad.layout}")
    if not coalesce and grad.sparse_dim() == 1:
        return grad._indices()[0], grad._values()
    # The update is non-linear: duplicate entries of a row must be summed first.
    grad = grad.coalesce()
    indices, values = grad.indices(), grad.values()
    if grad.sparse_dim() == 1:
        return indices[0], values
    # Sparse in more than the row dimension: gather the entries into whole rows.
    rows, inverse = torch.unique(indices[0], sorted=True, return_inverse=True)
    row_values = values.new_zeros((rows.numel(), *param.shape[1:]))
    row_values[(inverse, *indices[1:])] = values
    return rows, row_values


class _RowOptimizer(torch.optim.Optimizer):
    """Checks every parameter once, when its group is added, and keeps float32 state on load."""

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        super().add_param_group(param_group)
        for p in self.param_groups[-1]["params"]:
            if p.layout != torch.strided:
                raise TypeError(f"params must be dense (strided) tensors, got layout {p.layout}")
            if p.dtype not in _PARAM_DTYPES:
                raise TypeError(f"params must be float32, float64, bfloat16 or float16, got "
                                f"{p.dtype}")
            if p.dim() < 1:
                raise ValueError("params must have at least one dimension (rows); got a 0-dim "
                                 "tensor: give it to a dense optimizer")
            if p.device.type not in ("cpu", "cuda"):
                raise ValueError(f"params must be on a CPU or CUDA device, got {p.device}")
            if not p.is_contiguous():
                raise ValueError("params must be contiguous")

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        # Optimizer.load_state_dict casts floating state to the parameter's dtype (bfloat16 for
        # bfloat16 parameters): cast again from the saved values, to the state dtype.
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for saved_id, p in zip(saved_ids, params):
            for key, value in state_dict["state"].get(saved_id, {}).items():
                if isinstance(value, Tensor) and value.is_floating_point():
                    self.state[p][key] = value.to(device=p.device, dtype=state_dtype(p),
                                                  copy=True)

    @torch.no_grad()
    def step(  # type: ignore[override]
            self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                # Accumulated into .grad, a coalesced gradient loses its flag but keeps its rows
                # unique and ascending. The CPU ops check the order before writing anything, far
                # cheaper than coalescing again (a sort); only rows out of order are coalesced.
                # (On CUDA that check is a device-side assert: coalesce there.)
                trust = grad.is_sparse and p.device.type == "cpu" and not grad.is_coalesced()
                rows, values = row_gradient(p, grad, coalesce=not trust)
                try:
                    self._update(group, p, rows, values)
                except ValueError as error:
                    if not (trust and "strictly ascending" in str(error)):
                        raise
                    self._update(group, p, *row_gradient(p, grad))
        return loss

    def _update(self, group: Dict[str, Any], param: Tensor, rows: Optional[Tensor],
                values: Tensor) -> None:
        raise NotImplementedError


def _check_non_negative(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not value >= 0.0:  # also rejects NaN
        raise ValueError(f"{name} must be non-negative, got {value}")
    return float(value)


class RowSGD(_RowOptimizer):
    """SGD on the rows present in each gradient: ``p -= lr * (g + weight_decay * p)``.

    Equals ``torch.optim.SGD(params, lr, weight_decay=weight_decay)`` on dense gradients and on
    sparse ones without weight decay; with a sparse gradient, weight decay applies to the rows
    present only (``torch.optim.SGD`` decays every row, a dense pass over the parameter).
    """

    def __init__(self, params: Params, lr: float, *, weight_decay: float = 0.0) -> None:
        defaults = dict(lr=_check_non_negative(lr, "lr"),
                        weight_decay=_check_non_negative(weight_decay, "weight_decay"))
        super().__init__(params, defaults)

    def _update(self, group: Dict[str, Any], param: Tensor, rows: Optional[Tensor],
                values: Tensor) -> None:
        _ops.row_sgd_step(param, rows, values, float(group["lr"]), float(group["weight_decay"]))


class RowAdagrad(_RowOptimizer):
    """Adagrad on the rows present in each gradient, as ``torch.optim.Adagrad``:
    ``sum += g^2; p -= lr * g / (sqrt(sum) + eps)``.

    With ``rowwise=True`` each row keeps one accumulator, ``sum_r += mean_j g_rj^2`` (state ``[V]``
    instead of ``[V, D]``; a 1-D parameter has one element per row, so it is the element-wise
    rule).
    """

    def __init__(self, params: Params, lr: float = 1e-2, *, eps: float = 1e-10,
                 initial_accumulator_value: float = 0.0, rowwise: bool = False) -> None:
        if not isinstance(rowwise, bool):
            raise TypeError(f"rowwise must be a bool, got {type(rowwise).__name__}")
        defaults = dict(lr=_check_non_negative(lr, "lr"), eps=_check_non_negative(eps, "eps"),
                        initial_accumulator_value=_check_non_negative(
                            initial_accumulator_value, "initial_accumulator_value"),
                        rowwise=rowwise)
        super().__init__(params, defaults)

    def _update(self, group: Dict[str, Any], param: Tensor, rows: Optional[Tensor],
                values: Tensor) -> None:
        state = self.state[param]
        if not state:
            shape = param.shape[:1] if group["rowwise"] else param.shape
            state["step"] = 0
            state["sum"] = torch.full(shape, group["initial_accumulator_value"],
                                      dtype=state_dtype(param), device=param.device)
        _ops.row_adagrad_step(param, state["sum"], rows, values, float(group["lr"]),
                              float(group["eps"]), bool(group["rowwise"]))
        state["step"] += 1  # only once the op has accepted the rows


class RowAdam(_RowOptimizer):
    """Lazy Adam on the rows present in each gradient, as ``torch.optim.SparseAdam``.

    A row's moments change only in steps whose gradient holds that row; bias correction uses the
    parameter's step count (the steps in which it had a gradient). A dense gradient updates every
    row and equals ``torch.optim.Adam``.
    """

    def __init__(self, params: Params, lr: float = 1e-3, *,
                 betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise TypeError(f"betas must be a pair of floats, got {betas!r}")
        for i, beta in enumerate(betas):
            if not 0.0 <= _check_non_negative(beta, f"betas[{i}]") < 1.0:
                raise ValueError(f"betas[{i}] must be in [0, 1), got {beta}")
        defaults = dict(lr=_check_non_negative(lr, "lr"), betas=tuple(float(b) for b in betas),
                        eps=_check_non_negative(eps, "eps"))
        super().__init__(params, defaults)

    def _update(self, group: Dict[str, Any], param: Tensor, rows: Optional[Tensor],
                values: Tensor) -> None:
        state = self.state[param]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(param, dtype=state_dtype(param),
                                                memory_format=torch.contiguous_format)
            state["exp_avg_sq"] = torch.zeros_like(param, dtype=state_dtype(param),
                                                   memory_format=torch.contiguous_format)
        step = state["step"] + 1
        beta1, beta2 = group["betas"]
        bias_correction2 = math.sqrt(1.0 - beta2 ** step)
        step_size = float(group["lr"]) * bias_correction2 / (1.0 - beta1 ** step)
        # torch.optim.Adam adds eps to the bias-corrected sqrt(v); SparseAdam to the raw one.
        eps = group["eps"] * (bias_correction2 if rows is None else 1.0)
        _ops.row_adam_step(param, state["exp_avg"], state["exp_avg_sq"], rows, values, step_size,
                           beta1, beta2, eps)
        state["step"] = step  # only once the op has accepted the rows
