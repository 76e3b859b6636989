"""The public loss functions: argument checks, sampling, and dispatch to the fused ops."""

from __future__ import annotations

from typing import Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ._ops import OBJECTIVES, accumulation_dtype, cast, sampled_loss
from .sampler import AliasSampler, can_read_values

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
REDUCTIONS = ("mean", "sum", "none")
Noise = Union[AliasSampler, Tensor]


def _check_tensor(value: object, name: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(value).__name__}")
    return value


def _check_indices(value: object, name: str) -> Tensor:
    tensor = _check_tensor(value, name)
    if tensor.dtype == torch.int64:
        return tensor
    if tensor.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} must be an integer tensor (int64), got {tensor.dtype}")
    return tensor.long()


def _autocast(hidden: object, weight: object, bias: object,
              sparse_grad: bool = False) -> Tuple[object, object, object]:
    """Under ``torch.autocast``, cast as ``F.linear`` does: floating inputs but float64 go to the
    autocast dtype (so a float32 weight meets bfloat16 activations)."""
    if not isinstance(hidden, Tensor) or not torch.is_autocast_enabled(hidden.device.type):
        return hidden, weight, bias
    dtype = torch.get_autocast_dtype(hidden.device.type)

    def autocast(value: object, sparse: bool) -> object:
        if isinstance(value, Tensor) and value.is_floating_point() and value.dtype != torch.float64:
            return cast(value, dtype, sparse)
        return value

    return autocast(hidden, False), autocast(weight, sparse_grad), autocast(bias, sparse_grad)


def _check_model(hidden: object, weight: object, bias: object) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    hidden = _check_tensor(hidden, "hidden")
    weight = _check_tensor(weight, "weight")
    if hidden.dtype not in FLOAT_DTYPES:
        raise TypeError(f"hidden must be float32, float64, float16 or bfloat16, got {hidden.dtype}")
    if hidden.dim() < 1:
        raise ValueError("hidden must be [*, D], got a 0-dim tensor")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be [V, D] with D = {hidden.shape[-1]} (hidden's last dim), "
                         f"got shape {tuple(weight.shape)}")
    if weight.shape[0] < 1:
        raise ValueError("weight must have at least one row (V >= 1)")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight ({weight.dtype}) and hidden ({hidden.dtype}) must share a dtype")
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device} but hidden is on {hidden.device}")
    if bias is not None:
        bias = _check_tensor(bias, "bias")
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must be [V] = [{weight.shape[0]}], got shape {tuple(bias.shape)}")
        if bias.dtype != weight.dtype:
            raise TypeError(f"bias ({bias.dtype}) and weight ({weight.dtype}) must share a dtype")
        if bias.device != weight.device:
            raise ValueError(f"bias is on {bias.device} but weight is on {weight.device}")
    return hidden, weight, bias


def _check_target(target: object, hidden: Tensor) -> Tensor:
    target = _check_indices(target, "target")
    if target.shape != hidden.shape[:-1]:
        raise ValueError(f"target must have hidden's leading shape {tuple(hidden.shape[:-1])}, "
                         f"got {tuple(target.shape)}")
    if target.device != hidden.device:
        raise ValueError(f"target is on {target.device} but hidden is on {hidden.device}")
    return target


def _check_reduction(reduction: object) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def _as_sampler(noise: object, num_classes: int, device: torch.device) -> AliasSampler:
    if isinstance(noise, AliasSampler):
        sampler = noise
    elif isinstance(noise, Tensor):
        if noise.dim() != 1 or noise.shape[0] != num_classes:
            raise ValueError(f"noise must be [V] = [{num_classes}] weights, got shape {tuple(noise.shape)}")
        try:
            sampler = AliasSampler(noise, device=device)
        except (ValueError, TypeError) as error:
            raise type(error)(str(error).replace("weights", "noise", 1)) from None
    else:
        raise TypeError(f"noise must be an AliasSampler or a Tensor of weights, got {type(noise).__name__}")
    if sampler.num_classes != num_classes:
        raise ValueError(f"noise has {sampler.num_classes} classes but weight has {num_classes} rows")
    if sampler.device != device:
        raise ValueError(f"noise is on {sampler.device} but hidden is on {device}")
    return sampler


def _negatives(negatives: object, num_negatives: object, shared_negatives: bool,
               sampler: Optional[AliasSampler], batch_shape: torch.Size, device: torch.device,
               generator: Optional[torch.Generator]) -> Tensor:
    """Explicit negatives (checked) or fresh draws: [N, k], or [k] when shared."""
    n = batch_shape.numel()
    if negatives is not None:
        negatives = _check_indices(negatives, "negatives")
        if negatives.device != device:
            raise ValueError(f"negatives is on {negatives.device} but hidden is on {device}")
        shared = negatives.dim() == 1
        if shared_negatives and not shared:
            raise ValueError(f"negatives must be [k] when shared_negatives=True, got {tuple(negatives.shape)}")
        if not shared and negatives.shape[:-1] != batch_shape:
            raise ValueError(f"negatives must be [*, k] with * = {tuple(batch_shape)} or [k], "
                             f"got {tuple(negatives.shape)}")
        k = negatives.shape[-1]
        if k < 1:
            raise ValueError("negatives must hold k >= 1 negatives per example")
        if num_negatives is not None and num_negatives != k:
            raise ValueError(f"num_negatives={num_negatives} disagrees with negatives (k = {k})")
        return negatives if shared or negatives.dim() == 2 else negatives.reshape(n, k)
    if num_negatives is None:
        raise ValueError("num_negatives is required when negatives is not given")
    if isinstance(num_negatives, bool) or not isinstance(num_negatives, int):
        raise TypeError(f"num_negatives must be an int, got {type(num_negatives).__name__}")
    if num_negatives < 1:
        raise ValueError(f"num_negatives must be >= 1, got {num_negatives}")
    assert sampler is not None
    size = (num_negatives,) if shared_negatives else (n, num_negatives)
    return sampler.sample(size, generator=generator)


def _sampled_loss(objective: str, hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
                  target: Tensor, noise: Optional[Noise], num_negatives: Optional[int],
                  negatives: Optional[Tensor], shared_negatives: bool, log_z: Union[float, Tensor],
                  remove_accidental_hits: bool, ignore_index: int, reduction: str,
                  generator: Optional[torch.Generator], sparse_grad: bool) -> Tensor:
    hidden, weight, bias = _check_model(*_autocast(hidden, weight, bias, sparse_grad))
    target = _check_target(target, hidden)
    reduction = _check_reduction(reduction)
    num_classes, device = weight.shape[0], hidden.device
    uses_noise = objective != "negative_sampling"
    sampler = None
    if noise is not None:
        sampler = _as_sampler(noise, num_classes, device)
    elif uses_noise or negatives is None:
        raise ValueError(f"noise is required for {objective} unless it is negative sampling "
                         "with explicit negatives")
    batch_shape = target.shape
    negs = _negatives(negatives, num_negatives, shared_negatives, sampler, batch_shape, device,
                      generator)
    log_z_t = _log_z_tensor(log_z, device, accumulation_dtype(hidden.dtype))
    noise_probs = sampler.probs if (uses_noise and sampler is not None) else None
    # [*, D] and [*] to [N, D] and [N] (a view costs a microsecond: none where already flat).
    flat = target.dim() == 1
    loss = sampled_loss(
        hidden if flat else hidden.reshape(-1, hidden.shape[-1]), weight, bias,
        target if flat else target.reshape(-1), negs, noise_probs,
        log_z_t, OBJECTIVES[objective], bool(remove_accidental_hits), int(ignore_index),
        bool(sparse_grad), reduction)
    return loss if flat or reduction != "none" else loss.reshape(target.shape)


# A float log_z as a 0-dim tensor, made once per (value, device, dtype) instead of on every call;
# at most _LOG_Z_CACHE_SIZE of them, so a schedule of log_z values cannot grow it without bound.
_log_z_cache: Dict[Tuple[float, torch.device, torch.dtype], Tensor] = {}
_LOG_Z_CACHE_SIZE = 64


def _log_z_tensor(log_z: object, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``log_z`` (a float or a 0-dim tensor, checked) as a 0-dim tensor of ``dtype``."""
    if isinstance(log_z, Tensor):
        if log_z.numel() != 1 or log_z.dim() != 0:
            raise ValueError(f"log_z must be a float or a 0-dim tensor, got shape {tuple(log_z.shape)}")
        return log_z.to(device=device, dtype=dtype)
    if not isinstance(log_z, (int, float)) or isinstance(log_z, bool):
        raise TypeError(f"log_z must be a float or a 0-dim tensor, got {type(log_z).__name__}")
    value = float(log_z)
    if torch.compiler.is_compiling():
        return torch.full((), value, dtype=dtype, device=device)
    key = (value, device, dtype)
    cached = _log_z_cache.get(key)
    if cached is not None:
        return cached
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        # Filled only when the graph replays: not a tensor to keep.
        return torch.full((), value, dtype=dtype, device=device)  # a fill: no copy to capture
    with torch.inference_mode(False):  # a tensor that calls outside inference mode can use too
        tensor = torch.full((), value, dtype=dtype, device=device)
    if len(_log_z_cache) >= _LOG_Z_CACHE_SIZE:
        _log_z_cache.clear()
    _log_z_cache[key] = tensor
    return tensor


def _reduce(loss: Tensor, target: Tensor, ignore_index: int, reduction: str) -> Tensor:
    """Per-example losses [N] to ``reduction`` ("mean": over the examples not ignored)."""
    if reduction == "none":
        return loss.reshape(target.shape)
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / (target != ignore_index).sum().clamp_min(1)


def nce_loss(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
             noise: Optional[Noise] = None, *, num_negatives: Optional[int] = None,
             negatives: Optional[Tensor] = None, shared_negatives: bool = False,
             log_z: Union[float, Tensor] = 0.0, remove_accidental_hits: bool = False,
             ignore_index: int = -100, reduction: str = "mean",
             generator: Optional[torch.Generator] = None, sparse_grad: bool = False) -> Tensor:
    """Noise contrastive estimation (Gutmann & Hyvarinen; Mnih & Teh).

    ``l_i = softplus(-d(t_i)) + sum_j softplus(d(n_ij))`` with ``d(w) = s_i(w) - log_z - log(k q(w))``
    and ``s_i(w) = <hidden_i, weight[w]> + bias[w]``.

    Args:
        hidden: ``[*, D]`` float32 / float64 / float16 / bfloat16.
        weight: ``[V, D]`` output embedding, same dtype and device as ``hidden``.
        bias: ``[V]`` or None.
        target: ``[*]`` int64 classes; ``ignore_index`` marks examples to skip.
        noise: ``AliasSampler`` or ``[V]`` non-negative weights: the noise distribution q.
        num_negatives: k, the number of negatives to draw (when ``negatives`` is None).
        negatives: explicit int64 negatives ``[*, k]`` per example or ``[k]`` shared.
        shared_negatives: draw one ``[k]`` set for the whole batch.
        log_z: the log normalizer, a float or a 0-dim tensor (learned if it requires grad).
        remove_accidental_hits: drop negatives equal to the example's target.
        ignore_index: target value whose examples contribute 0 and are not counted.
        reduction: ``"mean"`` (over non-ignored examples), ``"sum"`` or ``"none"`` (``[*]``).
        generator: ``torch.Generator`` for the draws (default: torch's default generator, which
            is also the one to use under ``torch.compile``: it cannot trace a generator object).
        sparse_grad: make the gradients of ``weight`` and ``bias`` coalesced sparse COO tensors
            holding only the touched rows (for ``SGD``, ``SparseAdam``, ``Adagrad``).

    Under ``torch.autocast``, ``hidden``, ``weight`` and ``bias`` are cast to the autocast dtype
    as ``F.linear`` casts them; the loss stays float32.

    Returns:
        float32 loss (float64 for float64 inputs).
    """
    return _sampled_loss("nce", hidden, weight, bias, target, noise, num_negatives, negatives,
                         shared_negatives, log_z, remove_accidental_hits, ignore_index,
                         reduction, generator, sparse_grad)


def negative_sampling_loss(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
                           noise: Optional[Noise] = None, *, num_negatives: Optional[int] = None,
                           negatives: Optional[Tensor] = None, shared_negatives: bool = False,
                           remove_accidental_hits: bool = False, ignore_index: int = -100,
                           reduction: str = "mean", generator: Optional[torch.Generator] = None,
                           sparse_grad: bool = False) -> Tensor:
    """Negative sampling (word2vec): ``softplus(-s_i(t_i)) + sum_j softplus(s_i(n_ij))``.

    Arguments as in :func:`nce_loss` (no ``log_z``); ``noise`` may be None when ``negatives``
    is given.
    """
    return _sampled_loss("negative_sampling", hidden, weight, bias, target, noise, num_negatives,
                         negatives, shared_negatives, 0.0, remove_accidental_hits, ignore_index,
                         reduction, generator, sparse_grad)


def sampled_softmax_loss(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
                         noise: Optional[Noise] = None, *, num_negatives: Optional[int] = None,
                         negatives: Optional[Tensor] = None, shared_negatives: bool = False,
                         remove_accidental_hits: bool = True, ignore_index: int = -100,
                         reduction: str = "mean", generator: Optional[torch.Generator] = None,
                         sparse_grad: bool = False) -> Tensor:
    """Sampled softmax with logQ correction (importance sampling).

    ``l_i = logsumexp(o(t_i), o(n_i1), ..., o(n_ik)) - o(t_i)`` with ``o(w) = s_i(w) - log q(w)``.
    Arguments as in :func:`nce_loss` (no ``log_z``; accidental hits are removed by default).
    """
    return _sampled_loss("sampled_softmax", hidden, weight, bias, target, noise, num_negatives,
                         negatives, shared_negatives, 0.0, remove_accidental_hits, ignore_index,
                         reduction, generator, sparse_grad)


def full_softmax_loss(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, *,
                      ignore_index: int = -100, reduction: str = "mean",
                      chunk_size: Optional[int] = None) -> Tensor:
    """Exact cross-entropy over all V classes (for evaluation: perplexity = exp(mean loss)).

    Never holds more than ``chunk_size`` columns of logits at once (all V when None). The loss is
    float32 (float64 for float64 inputs) and differentiable. Under ``torch.autocast`` the inputs
    are cast as in :func:`nce_loss` and the logits accumulate in float32 all the same.
    """
    hidden, weight, bias = _check_model(*_autocast(hidden, weight, bias))
    target = _check_target(target, hidden)
    reduction = _check_reduction(reduction)
    num_classes = weight.shape[0]
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    acc = accumulation_dtype(hidden.dtype)
    h = hidden.reshape(-1, hidden.shape[-1])
    t = target.reshape(-1)
    keep = t != ignore_index
    safe_t = torch.where(keep, t, torch.zeros_like(t))
    if can_read_values(safe_t) and bool(((safe_t < 0) | (safe_t >= num_classes)).any()):
        raise ValueError(f"target holds class indices outside [0, {num_classes})")
    with torch.autocast(hidden.device.type, enabled=False):  # keep the float32 logits float32
        loss = _full_softmax(h, weight, bias, safe_t, keep, acc, chunk_size)
    return _reduce(loss, target, ignore_index, reduction)


def _full_softmax(h: Tensor, weight: Tensor, bias: Optional[Tensor], safe_t: Tensor, keep: Tensor,
                  acc: torch.dtype, chunk_size: Optional[int]) -> Tensor:
    num_classes = weight.shape[0]
    step = num_classes if chunk_size is None else chunk_size
    chunk_lse = []
    for start in range(0, num_classes, step):
        w = weight[start:start + step]
        b = bias[start:start + step] if bias is not None else None
        if torch.is_grad_enabled() and step < num_classes:
            # Recompute each chunk's logits in backward instead of keeping all of them.
            lse = torch.utils.checkpoint.checkpoint(_chunk_logsumexp, h, w, b, acc,
                                                    use_reentrant=False)
        else:
            lse = _chunk_logsumexp(h, w, b, acc)
        chunk_lse.append(lse)
    lse = torch.logsumexp(torch.stack(chunk_lse, dim=1), dim=1)
    target_logit = (h.to(acc) * weight[safe_t].to(acc)).sum(-1)
    if bias is not None:
        target_logit = target_logit + bias[safe_t].to(acc)
    return torch.where(keep, lse - target_logit, torch.zeros_like(lse))


def _chunk_logsumexp(h: Tensor, w: Tensor, b: Optional[Tensor], acc: torch.dtype) -> Tensor:
    logits = F.linear(h.to(acc), w.to(acc), b.to(acc) if b is not None else None)
    return torch.logsumexp(logits, dim=1)
