"""Walker/Vose alias sampler and the usual noise distributions."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ._ops import ops

Size = Union[int, Sequence[int], torch.Size]


def can_read_values(tensor: Tensor) -> bool:
    """Whether a check may look at ``tensor``'s values now.

    Not while ``torch.compile`` traces (it would break the graph) nor while a CUDA graph is being
    captured (it would synchronize); the kernels check indices and weights themselves then.
    """
    if torch.compiler.is_compiling():
        return False
    return not (tensor.is_cuda and torch.cuda.is_current_stream_capturing())


def check_noise_weights(weights: object, name: str = "weights") -> Tensor:
    """Validate noise weights: a non-empty 1-D real tensor, finite, non-negative, not all zero."""
    if not isinstance(weights, Tensor):
        raise TypeError(f"{name} must be a Tensor of non-negative weights, got {type(weights).__name__}")
    if weights.dtype == torch.bool or weights.is_complex():
        raise TypeError(f"{name} must be a real (floating or integer) tensor, got {weights.dtype}")
    if weights.dim() != 1 or weights.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 1-D tensor [V], got shape {tuple(weights.shape)}")
    w = weights.detach().to(torch.float64)
    if not can_read_values(w):
        return w
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"{name} must be finite (no NaN or inf)")
    if bool((w < 0).any()):
        raise ValueError(f"{name} must be non-negative")
    if not bool((w > 0).any()):
        raise ValueError(f"{name} must not all be zero")
    return w


class AliasSampler:
    """Draws classes with replacement from ``weights / weights.sum()`` in O(1) per draw.

    Walker's alias method with Vose's O(V) construction. Draws are exact up to 2^-32 per
    bucket; zero-weight classes are never drawn. Randomness comes from the given
    ``torch.Generator`` (torch's default generator for the device when None), so
    ``torch.manual_seed`` reproduces draws.

    Args:
        weights: non-negative weights ``[V]`` (need not be normalized).
        device: where the table lives and draws are made (default: ``weights.device``).
    """

    probs: Tensor
    """float32 ``[V]``: the normalized noise distribution q."""
    table: Tensor
    """int64 ``[V]``: the alias table (packed threshold and alias of each bucket)."""

    def __init__(self, weights: Tensor, *,
                 device: Optional[Union[str, torch.device]] = None) -> None:
        w = check_noise_weights(weights)
        device = torch.device(device) if device is not None else weights.device
        # Built where it will be used: on a GPU the construction is parallel too.
        w = w.to(device)
        table: Tensor = ops.alias_build(w)
        self._set((w / w.sum()).to(torch.float32), table)

    @classmethod
    def from_tables(cls, probs: Tensor, table: Tensor) -> "AliasSampler":
        """A sampler over an existing ``probs`` / alias ``table`` pair (no rebuild)."""
        sampler = cls.__new__(cls)
        sampler._set(probs, table)
        return sampler

    def _set(self, probs: Tensor, table: Tensor) -> None:
        self.probs = probs
        self.table = table

    @property
    def num_classes(self) -> int:
        return self.probs.shape[0]

    @property
    def device(self) -> torch.device:
        return self.probs.device

    def to(self, device: Union[str, torch.device]) -> "AliasSampler":
        return AliasSampler.from_tables(self.probs.to(device), self.table.to(device))

    def sample(self, size: Size, *, generator: Optional[torch.Generator] = None) -> Tensor:
        """int64 class indices of shape ``size``, on ``self.device``."""
        shape = normalize_size(size)
        if generator is not None and not same_device(generator.device, self.device):
            raise ValueError(
                f"generator is on {generator.device} but the sampler is on {self.device}")
        draws: Tensor = ops.alias_sample(self.table, shape, generator)
        return draws

    def __repr__(self) -> str:
        return f"AliasSampler(num_classes={self.num_classes}, device={self.device})"


def same_device(a: torch.device, b: torch.device) -> bool:
    """Whether a and b are one device: torch.Generator("cuda").device has no index, and means
    the current device."""
    def resolved(d: torch.device) -> torch.device:
        if d.type == "cuda" and d.index is None:
            return torch.device("cuda", torch.cuda.current_device())
        return d

    return resolved(a) == resolved(b)


def normalize_size(size: Size) -> Tuple[int, ...]:
    shape = (size,) if isinstance(size, int) else tuple(size)
    if any(not isinstance(s, int) or s < 0 for s in shape):
        raise ValueError(f"size must be non-negative integers, got {size!r}")
    return shape


def unigram_weights(counts: Tensor, power: float = 0.75) -> Tensor:
    """Smoothed unigram noise weights ``counts ** power`` (float64), word2vec's default 0.75."""
    w = check_noise_weights(counts, "counts")
    return w.pow(power)


def log_uniform_weights(num_classes: int) -> Tensor:
    """Zipfian (log-uniform) weights ``log((w + 2) / (w + 1))`` for classes sorted by frequency."""
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    w = torch.arange(num_classes, dtype=torch.float64)
    return torch.log1p(1.0 / (w + 1.0))
