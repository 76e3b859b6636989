"""The public loss functions: argument checks, sampling, and dispatch to the fused ops."""

from __future__ import annotations

from dataclasses import dataclass
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


def _check_target(target: object, hidden: Tensor, several: bool = False) -> Tensor:
    """``target`` [*] (hidden's leading shape), or with ``several`` also [*, T]: T positives per
    example, ``ignore_index`` as padding."""
    target = _check_indices(target, "target")
    batch = hidden.shape[:-1]
    multi = several and target.dim() == hidden.dim() and target.dim() >= 1
    if multi and (target.shape[:-1] != batch or target.shape[-1] < 1):
        raise ValueError(f"target must be [*] or [*, T] with * = {tuple(batch)} (hidden's leading "
                         f"shape) and T >= 1, got {tuple(target.shape)}")
    if not multi and target.shape != batch:
        shapes = "[*] or [*, T]" if several else "[*]"
        raise ValueError(f"target must be {shapes} with * = {tuple(batch)} (hidden's leading "
                         f"shape), got {tuple(target.shape)}")
    if target.device != hidden.device:
        raise ValueError(f"target is on {target.device} but hidden is on {hidden.device}")
    return target


def _check_hard_negatives(hard_negatives: object, batch_shape: torch.Size,
                          device: torch.device) -> Tensor:
    hard = _check_indices(hard_negatives, "hard_negatives")
    if hard.dim() != len(batch_shape) + 1 or hard.shape[:-1] != batch_shape:
        raise ValueError(f"hard_negatives must be [*, h] with * = {tuple(batch_shape)} (hidden's "
                         f"leading shape), got {tuple(hard.shape)}")
    if hard.device != device:
        raise ValueError(f"hard_negatives is on {hard.device} but hidden is on {device}")
    return hard.reshape(batch_shape.numel(), hard.shape[-1])


def _check_sample_weight(sample_weight: object, batch_shape: torch.Size,
                         device: torch.device) -> Tensor:
    weight = _check_tensor(sample_weight, "sample_weight")
    if not weight.is_floating_point():
        raise TypeError(f"sample_weight must be a floating-point tensor, got {weight.dtype}")
    if weight.shape != batch_shape:
        raise ValueError(f"sample_weight must be [*] = {tuple(batch_shape)} (hidden's leading "
                         f"shape), got {tuple(weight.shape)}")
    if weight.device != device:
        raise ValueError(f"sample_weight is on {weight.device} but hidden is on {device}")
    if can_read_values(weight) and not bool((torch.isfinite(weight) & (weight >= 0)).all()):
        raise ValueError("sample_weight must be finite and non-negative")
    return weight.detach().reshape(-1)


def _counted(target: Tensor, ignore_index: int) -> Tensor:
    """Examples with at least one valid positive (target [N] or [N, T])."""
    valid = target != ignore_index
    return valid.any(-1) if target.dim() == 2 else valid


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
               generator: Optional[torch.Generator], min_k: int = 1,
               num_classes: int = 0) -> Tensor:
    """Explicit negatives (checked) or fresh draws: [N, k], or [k] when shared. ``min_k`` 0
    allows none (hard negatives only). Without a sampler the draws are uniform over
    ``num_classes``."""
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
        if k < min_k:
            raise ValueError("negatives must hold k >= 1 negatives per example")
        if num_negatives is not None and num_negatives != k:
            raise ValueError(f"num_negatives={num_negatives} disagrees with negatives (k = {k})")
        return negatives if shared or negatives.dim() == 2 else negatives.reshape(n, k)
    if num_negatives is None:
        raise ValueError("num_negatives is required when negatives is not given")
    if isinstance(num_negatives, bool) or not isinstance(num_negatives, int):
        raise TypeError(f"num_negatives must be an int, got {type(num_negatives).__name__}")
    if num_negatives < min_k:
        raise ValueError(f"num_negatives must be >= {min_k}, got {num_negatives}")
    size = (num_negatives,) if shared_negatives else (n, num_negatives)
    if num_negatives == 0:
        return torch.empty(size, dtype=torch.int64, device=device)
    if sampler is None:  # gBCE's default noise: uniform over the classes
        return torch.randint(num_classes, size, device=device, generator=generator)
    return sampler.sample(size, generator=generator)


@dataclass
class _Columns:
    """A sampled loss's checked columns and what its op takes besides the model (shared by the
    single-device and the vocab-parallel losses): target [N] / [N, T], negatives [N, k] / [k],
    hard negatives [N, h], per-example weights [N] and the op's objective code."""

    target: Tensor
    negatives: Tensor
    hard: Optional[Tensor]
    weights: Optional[Tensor]
    noise_probs: Optional[Tensor]
    code: int
    positive_weight: float


def _columns(objective: str, hidden: Tensor, target: Tensor, num_classes: int,
             noise: Optional[Noise], num_negatives: Optional[int], negatives: Optional[Tensor],
             shared_negatives: bool, generator: Optional[torch.Generator],
             hard_negatives: Optional[Tensor], sample_weight: Optional[Tensor],
             gbce_t: float) -> _Columns:
    """Checks the columns' arguments and draws the negatives (``target`` checked already)."""
    device, batch_shape = hidden.device, hidden.shape[:-1]
    gbce = objective == "gbce"
    uses_noise = objective not in ("negative_sampling", "gbce")
    hard = None
    if hard_negatives is not None:
        if objective == "nce":
            raise ValueError("hard_negatives are not supported by nce_loss: NCE's noise terms "
                             "assume negatives drawn from the noise distribution (use "
                             "sampled_softmax_loss, negative_sampling_loss or gbce_loss)")
        hard = _check_hard_negatives(hard_negatives, batch_shape, device)
    weights = (_check_sample_weight(sample_weight, batch_shape, device)
               if sample_weight is not None else None)
    sampler = None
    if noise is not None:
        sampler = _as_sampler(noise, num_classes, device)
    elif uses_noise or (negatives is None and not gbce):
        raise ValueError(f"noise is required for {objective} unless it is negative sampling "
                         "with explicit negatives")
    negs = _negatives(negatives, num_negatives, shared_negatives, sampler, batch_shape, device,
                      generator, min_k=0 if hard is not None and not gbce else 1,
                      num_classes=num_classes)
    positive_weight = _gbce_beta(gbce_t, negs.shape[-1], num_classes) if gbce else 1.0
    n = batch_shape.numel()
    # [*] / [*, T] to [N] / [N, T] (a view costs a microsecond: none where already flat).
    flat_target = (target.reshape(n, target.shape[-1]) if target.dim() == hidden.dim()
                   else target if target.dim() == 1 else target.reshape(n))
    return _Columns(flat_target, negs, hard, weights,
                    sampler.probs if (uses_noise and sampler is not None) else None,
                    OBJECTIVES["negative_sampling" if gbce else objective], positive_weight)


def _sampled_loss(objective: str, hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
                  target: Tensor, noise: Optional[Noise], num_negatives: Optional[int],
                  negatives: Optional[Tensor], shared_negatives: bool, log_z: Union[float, Tensor],
                  remove_accidental_hits: bool, ignore_index: int, reduction: str,
                  generator: Optional[torch.Generator], sparse_grad: bool,
                  hard_negatives: Optional[Tensor] = None,
                  sample_weight: Optional[Tensor] = None, gbce_t: float = 0.0) -> Tensor:
    hidden, weight, bias = _check_model(*_autocast(hidden, weight, bias, sparse_grad))
    target = _check_target(target, hidden, several=True)
    reduction = _check_reduction(reduction)
    c = _columns(objective, hidden, target, weight.shape[0], noise, num_negatives, negatives,
                 shared_negatives, generator, hard_negatives, sample_weight, gbce_t)
    log_z_t = _log_z_tensor(log_z, hidden.device, accumulation_dtype(hidden.dtype))
    batch_shape = hidden.shape[:-1]
    flat_hidden = hidden if hidden.dim() == 2 else hidden.reshape(-1, hidden.shape[-1])
    # With weights the op returns [N] and the weighted reduction follows here.
    kernel_reduction = "none" if c.weights is not None else reduction
    loss = sampled_loss(flat_hidden, weight, bias, c.target, c.negatives, c.hard, c.noise_probs,
                        log_z_t, c.code, c.positive_weight, bool(remove_accidental_hits),
                        int(ignore_index), bool(sparse_grad), kernel_reduction)
    if c.weights is not None:
        return _reduce(loss, c.target, ignore_index, reduction, batch_shape, c.weights)
    return loss if reduction != "none" or loss.shape == batch_shape else loss.reshape(batch_shape)


def _reduce(loss: Tensor, flat_target: Tensor, ignore_index: int, reduction: str,
            batch_shape: torch.Size, weights: Optional[Tensor] = None) -> Tensor:
    """Per-example losses [N] (times their weights, where given) to ``reduction``: "none" gives
    ``batch_shape``, "mean" divides by the number of counted examples (those with a valid
    positive in ``flat_target`` [N] or [N, T]), weighted or not."""
    if weights is not None:
        loss = loss * weights.to(loss.dtype)
    if reduction == "none":
        return loss.reshape(batch_shape)
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / _counted(flat_target, ignore_index).sum().clamp_min(1)


def _gbce_beta(t: object, k: int, num_classes: int) -> float:
    """gSASRec's beta = alpha (t (1 - 1/alpha) + 1/alpha), alpha = k / (V - 1): the power of the
    positive's sigmoid that calibrates BCE with k negatives sampled out of V - 1."""
    if isinstance(t, bool) or not isinstance(t, (int, float)):
        raise TypeError(f"t must be a float in [0, 1], got {type(t).__name__}")
    if not 0.0 <= float(t) <= 1.0:
        raise ValueError(f"t must lie in [0, 1], got {t}")
    if num_classes < 2:
        raise ValueError("gbce_loss needs weight with at least 2 rows (alpha = k / (V - 1))")
    if k < 1:
        raise ValueError("gbce_loss needs k >= 1 sampled or explicit negatives per example")
    alpha = k / (num_classes - 1)
    return alpha * (float(t) * (1.0 - 1.0 / alpha) + 1.0 / alpha)


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


def nce_loss(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
             noise: Optional[Noise] = None, *, num_negatives: Optional[int] = None,
             negatives: Optional[Tensor] = None, shared_negatives: bool = False,
             log_z: Union[float, Tensor] = 0.0, remove_accidental_hits: bool = False,
             ignore_index: int = -100, reduction: str = "mean",
             generator: Optional[torch.Generator] = None, sparse_grad: bool = False,
             hard_negatives: Optional[Tensor] = None,
             sample_weight: Optional[Tensor] = None) -> Tensor:
    """Noise contrastive estimation (Gutmann & Hyvarinen; Mnih & Teh).

    ``l_i = sum_{t in P_i} softplus(-d(t)) + sum_j softplus(d(n_ij))`` with
    ``d(w) = s_i(w) - log_z - log(k q(w))`` and ``s_i(w) = <hidden_i, weight[w]> + bias[w]``;
    ``P_i`` is the example's valid positives (one, or several with ``target`` ``[*, T]``).
    TensorFlow's ``nce_loss(num_true=T)`` instead labels each true logit ``1/T``, which adds
    ``(1 - 1/T) sum_{t in P_i} d(t)`` to this loss.

    Args:
        hidden: ``[*, D]`` float32 / float64 / float16 / bfloat16.
        weight: ``[V, D]`` output embedding, same dtype and device as ``hidden``.
        bias: ``[V]`` or None.
        target: ``[*]`` int64 classes, or ``[*, T]``: T positives per example. ``ignore_index``
            marks padding; an example with no valid positive contributes 0 and is not counted
            by ``"mean"``.
        noise: ``AliasSampler`` or ``[V]`` non-negative weights: the noise distribution q.
        num_negatives: k, the number of negatives to draw (when ``negatives`` is None).
        negatives: explicit int64 negatives ``[*, k]`` per example or ``[k]`` shared.
        shared_negatives: draw one ``[k]`` set for the whole batch.
        log_z: the log normalizer, a float or a 0-dim tensor (learned if it requires grad).
        remove_accidental_hits: drop negatives equal to any of the example's valid positives.
        ignore_index: target (and hard negative) value that marks padding.
        reduction: ``"mean"`` (over non-ignored examples), ``"sum"`` or ``"none"`` (``[*]``).
        generator: ``torch.Generator`` for the draws (default: torch's default generator, which
            is also the one to use under ``torch.compile``: it cannot trace a generator object).
        sparse_grad: make the gradients of ``weight`` and ``bias`` coalesced sparse COO tensors
            holding only the touched rows (for ``SGD``, ``SparseAdam``, ``Adagrad``).
        hard_negatives: ``[*, h]`` int64 negatives chosen by the caller (items shown but not
            clicked, mined neighbours), beside the sampled ones; ``ignore_index`` pads. Not for
            ``nce_loss`` (a ``ValueError``): NCE's noise terms assume draws from ``q``.
        sample_weight: ``[*]`` non-negative per-example weights (not differentiated):
            ``l_i <- sample_weight_i * l_i``; ``"mean"`` still divides by the number of counted
            examples.

    Under ``torch.autocast``, ``hidden``, ``weight`` and ``bias`` are cast to the autocast dtype
    as ``F.linear`` casts them; the loss stays float32.

    Returns:
        float32 loss (float64 for float64 inputs).
    """
    return _sampled_loss("nce", hidden, weight, bias, target, noise, num_negatives, negatives,
                         shared_negatives, log_z, remove_accidental_hits, ignore_index,
                         reduction, generator, sparse_grad, hard_negatives, sample_weight)


def negative_sampling_loss(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
                           noise: Optional[Noise] = None, *, num_negatives: Optional[int] = None,
                           negatives: Optional[Tensor] = None, shared_negatives: bool = False,
                           remove_accidental_hits: bool = False, ignore_index: int = -100,
                           reduction: str = "mean", generator: Optional[torch.Generator] = None,
                           sparse_grad: bool = False, hard_negatives: Optional[Tensor] = None,
                           sample_weight: Optional[Tensor] = None) -> Tensor:
    """Negative sampling (word2vec):
    ``sum_{t in P_i} softplus(-s_i(t)) + sum_j softplus(s_i(n_ij))``, hard negatives adding
    ``softplus(s_i(w))`` each.

    Arguments as in :func:`nce_loss` (no ``log_z``); ``noise`` may be None when ``negatives``
    is given, and ``num_negatives=0`` is allowed with ``hard_negatives`` (hard negatives only).
    """
    return _sampled_loss("negative_sampling", hidden, weight, bias, target, noise, num_negatives,
                         negatives, shared_negatives, 0.0, remove_accidental_hits, ignore_index,
                         reduction, generator, sparse_grad, hard_negatives, sample_weight)


def gbce_loss(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
              noise: Optional[Noise] = None, *, num_negatives: Optional[int] = None,
              negatives: Optional[Tensor] = None, shared_negatives: bool = False,
              t: float = 0.75, remove_accidental_hits: bool = False, ignore_index: int = -100,
              reduction: str = "mean", generator: Optional[torch.Generator] = None,
              sparse_grad: bool = False, hard_negatives: Optional[Tensor] = None,
              sample_weight: Optional[Tensor] = None) -> Tensor:
    """gBCE, generalised binary cross-entropy (gSASRec, Petrov & Macdonald, RecSys 2023).

    ``l_i = beta sum_{t in P_i} softplus(-s_i(t)) + sum_j softplus(s_i(n_ij))`` (hard negatives
    adding ``softplus(s_i(w))`` each) with ``beta = alpha (t (1 - 1/alpha) + 1/alpha)`` and
    ``alpha = k / (V - 1)``, k the sampled or explicit negatives per example (hard negatives not
    counted). ``t = 0`` is plain BCE (``beta = 1``); ``t`` must lie in ``[0, 1]``. With neither
    ``noise`` nor ``negatives`` the negatives are drawn uniformly over the V classes, as gSASRec
    draws them. Other arguments as in :func:`negative_sampling_loss`.
    """
    return _sampled_loss("gbce", hidden, weight, bias, target, noise, num_negatives, negatives,
                         shared_negatives, 0.0, remove_accidental_hits, ignore_index, reduction,
                         generator, sparse_grad, hard_negatives, sample_weight, t)


def sampled_softmax_loss(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
                         noise: Optional[Noise] = None, *, num_negatives: Optional[int] = None,
                         negatives: Optional[Tensor] = None, shared_negatives: bool = False,
                         remove_accidental_hits: bool = True, ignore_index: int = -100,
                         reduction: str = "mean", generator: Optional[torch.Generator] = None,
                         sparse_grad: bool = False, hard_negatives: Optional[Tensor] = None,
                         sample_weight: Optional[Tensor] = None) -> Tensor:
    """Sampled softmax with logQ correction (importance sampling).

    ``l_i = logsumexp_{w in P_i + negatives_i} o(w) - (1/|P_i|) sum_{t in P_i} o(t)`` with
    ``o(w) = s_i(w) - log q(w)`` (``o = s`` for a hard negative: it was not drawn from q); with
    one positive ``l_i = logsumexp(o(t_i), o(n_i1), ..., o(n_ik)) - o(t_i)``. Several positives
    get TensorFlow's soft labels ``1/|P_i|``: with no padding this equals
    ``tf.nn.sampled_softmax_loss(num_true=T)`` given the same sampled values. Arguments as in
    :func:`nce_loss` (no ``log_z``; accidental hits are removed by default;
    ``num_negatives=0`` is allowed with ``hard_negatives``).
    """
    return _sampled_loss("sampled_softmax", hidden, weight, bias, target, noise, num_negatives,
                         negatives, shared_negatives, 0.0, remove_accidental_hits, ignore_index,
                         reduction, generator, sparse_grad, hard_negatives, sample_weight)


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
    return _reduce(loss, t, ignore_index, reduction, target.shape)


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
