"""Helpers for training and checking models with a sampled output layer.

A model trained with NCE at ``log_z = 0`` is meant to be self-normalized: its scores are already
log-probabilities, so ``exp(score)`` needs no sum over all V classes at inference time. These
helpers start such a model near that point and measure how close it stays.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ._ops import ops

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _check_float(value: object, name: str) -> None:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(value).__name__}")
    if value.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")


def init_output_bias_(bias: Tensor) -> Tensor:
    """Fill the output bias with ``-log(V)`` in place, ``V = bias.numel()``.

    With near-zero output weights every score is then ``-log(V)``, so the model starts
    normalized: ``log Z = logsumexp over V classes of -log(V) = 0`` (Zoph et al., 2016). Use it
    for models trained with NCE at ``log_z = 0``; it also does no harm for the other objectives.

    Args:
        bias: the output bias ``[V]`` (any shape is accepted; V is its number of elements).

    Returns:
        ``bias``, modified in place (outside autograd).
    """
    _check_float(bias, "bias")
    if bias.numel() == 0:
        raise ValueError("bias must have at least one element (V >= 1)")
    with torch.no_grad():
        bias.fill_(-math.log(bias.numel()))
    return bias


@torch.no_grad()
def log_partition(hidden: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *,
                  num_rows: Optional[int] = None, chunk_size: Optional[int] = 16384,
                  generator: Optional[torch.Generator] = None) -> Tensor:
    """Exact log normalizer ``log Z_i = logsumexp_w (<hidden_i, weight[w]> + bias[w])``.

    The sum runs over all V classes, ``chunk_size`` columns of logits at a time, so memory stays at
    ``rows x chunk_size``. For a self-normalized model (NCE with ``log_z = 0``) the values should sit
    near 0 with a small spread; report their mean and standard deviation.

    Args:
        hidden: ``[*, D]`` hidden states (the leading dims are flattened into N rows).
        weight: ``[V, D]`` output embedding, on hidden's device.
        bias: ``[V]`` output bias, or None.
        num_rows: evaluate a random sample of this many rows (drawn without replacement; all N
            rows when None or when ``num_rows >= N``).
        chunk_size: the most logit columns held at once (all V when None).
        generator: ``torch.Generator`` for the row sample (default: torch's default generator).

    Returns:
        ``[R]`` log Z per evaluated row, ``R = min(num_rows, N)``; float32 (float64 when an input
        is float64). No gradient is recorded.
    """
    _check_float(hidden, "hidden")
    _check_float(weight, "weight")
    if hidden.dim() < 1:
        raise ValueError("hidden must be [*, D], got a 0-dim tensor")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be [V, D] with D = {hidden.shape[-1]} (hidden's last dim), "
                         f"got shape {tuple(weight.shape)}")
    num_classes = weight.shape[0]
    if num_classes < 1:
        raise ValueError("weight must have at least one row (V >= 1)")
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device} but hidden is on {hidden.device}")
    dtypes = [hidden.dtype, weight.dtype]
    if bias is not None:
        _check_float(bias, "bias")
        if bias.shape != (num_classes,):
            raise ValueError(f"bias must be [V] = [{num_classes}], got shape {tuple(bias.shape)}")
        if bias.device != hidden.device:
            raise ValueError(f"bias is on {bias.device} but hidden is on {hidden.device}")
        dtypes.append(bias.dtype)
    for name, value in (("num_rows", num_rows), ("chunk_size", chunk_size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive int or None, got {value!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")

    # Sums of exponentials lose digits fast in low precision: accumulate in float32 at least.
    acc = torch.float64 if torch.float64 in dtypes else torch.float32
    rows = hidden.reshape(-1, hidden.shape[-1])
    if num_rows is not None and num_rows < rows.shape[0]:
        sample_device = generator.device if generator is not None else torch.device("cpu")
        picked = torch.randperm(rows.shape[0], generator=generator, device=sample_device)[:num_rows]
        rows = rows[picked.to(rows.device)]
    rows = rows.to(acc)
    step = num_classes if chunk_size is None else chunk_size
    # One [R, step] block of logits at a time; keep only each chunk's log-sum-exp.
    chunk_lse = []
    for start in range(0, num_classes, step):
        chunk_bias = bias[start:start + step].to(acc) if bias is not None else None
        logits = F.linear(rows, weight[start:start + step].to(acc), chunk_bias)
        chunk_lse.append(torch.logsumexp(logits, dim=1))
    return torch.logsumexp(torch.stack(chunk_lse, dim=1), dim=1)


def release_cpu_buffers() -> int:
    """Unmap the spare CPU gradient buffers; returns the bytes released.

    A ``weight`` gradient of 32 MiB or more (the dense ``[V, D]`` one at large V, or the
    ``[U, D]`` rows of a sparse one) is made on every CPU backward and usually dropped at the next
    ``optimizer.zero_grad()``. Its memory is then kept (at most two such buffers) and the next
    gradient that needs at least four fifths of it reuses it, skipping the page faults and the
    kernel's zeroing of a fresh mapping. Call this when training is over, or before measuring
    memory, to give that memory back to the system.
    """
    released: int = ops.release_cpu_buffers()
    return released


def spare_cpu_buffer_bytes() -> int:
    """The bytes held in spare CPU gradient buffers (see :func:`release_cpu_buffers`)."""
    nbytes: int = ops.cpu_buffer_bytes()
    return nbytes
