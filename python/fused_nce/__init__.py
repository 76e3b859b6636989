"""Fused NCE, negative sampling and sampled softmax losses: O(1 + k) per token instead of O(V)."""

from . import reference
from .functional import (
    full_softmax_loss,
    gbce_loss,
    nce_loss,
    negative_sampling_loss,
    sampled_softmax_loss,
)
from .modules import NCELoss
from .retrieval import FrequencyEstimator, in_batch_softmax_loss
from .sampler import AliasSampler, log_uniform_weights, unigram_weights
from .utils import init_output_bias_, log_partition, release_cpu_buffers
from . import optim

__version__ = "0.1.0"

__all__ = [
    "AliasSampler",
    "FrequencyEstimator",
    "NCELoss",
    "full_softmax_loss",
    "gbce_loss",
    "in_batch_softmax_loss",
    "init_output_bias_",
    "log_partition",
    "log_uniform_weights",
    "nce_loss",
    "negative_sampling_loss",
    "optim",
    "reference",
    "release_cpu_buffers",
    "sampled_softmax_loss",
    "unigram_weights",
]
