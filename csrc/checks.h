// Shape and dtype checks of the loss ops, shared by every backend (index ranges are checked by
// each backend: on the host for the CPU, in the kernels for CUDA, without a sync).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <optional>

#include "columns.h"
#include "nce_math.h"

namespace fused_nce {

// target [N] or [N, T]; negatives [N, k] or [k]; hard_negatives [N, h] where given.
inline void check_shapes(const at::Tensor& hidden, const at::Tensor& weight,
                         const std::optional<at::Tensor>& bias, const at::Tensor& target,
                         const at::Tensor& negatives,
                         const std::optional<at::Tensor>& hard_negatives = std::nullopt) {
  TORCH_CHECK_VALUE(hidden.dim() == 2, "hidden must be [N, D], got ", hidden.sizes());
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(1) == hidden.size(1),
                    "weight must be [V, D] with D = ", hidden.size(1), ", got ", weight.sizes());
  TORCH_CHECK_TYPE(weight.scalar_type() == hidden.scalar_type(),
                   "weight and hidden must share a dtype");
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == weight.size(0), "bias must be [V]");
    TORCH_CHECK_TYPE(bias->scalar_type() == weight.scalar_type(),
                     "bias and weight must share a dtype");
  }
  TORCH_CHECK_TYPE(target.scalar_type() == at::kLong, "target must be int64");
  TORCH_CHECK_TYPE(negatives.scalar_type() == at::kLong, "negatives must be int64");
  TORCH_CHECK_VALUE((target.dim() == 1 || (target.dim() == 2 && target.size(1) >= 1)) &&
                        target.size(0) == hidden.size(0),
                    "target must be [N] or [N, T] with T >= 1, got ", target.sizes());
  TORCH_CHECK_VALUE(negatives.dim() == 1 ||
                        (negatives.dim() == 2 && negatives.size(0) == hidden.size(0)),
                    "negatives must be [N, k] or [k], got ", negatives.sizes());
  if (hard_negatives.has_value()) {
    TORCH_CHECK_TYPE(hard_negatives->scalar_type() == at::kLong, "hard_negatives must be int64");
    TORCH_CHECK_VALUE(hard_negatives->dim() == 2 && hard_negatives->size(0) == hidden.size(0),
                      "hard_negatives must be [N, h], got ", hard_negatives->sizes());
  }
}

// T: the number of positive columns of target ([N] or [N, T]).
inline int64_t num_positives(const at::Tensor& target) {
  return target.dim() == 2 ? target.size(1) : 1;
}

inline int64_t num_hard(const std::optional<at::Tensor>& hard_negatives) {
  return hard_negatives.has_value() ? hard_negatives->size(1) : 0;
}

inline void check_loss_args(const at::Tensor& weight, const std::optional<at::Tensor>& noise_probs,
                            const at::Tensor& log_z, int64_t objective) {
  TORCH_CHECK_VALUE(objective >= kNce && objective <= kSampledSoftmax, "unknown objective ",
                    objective);
  TORCH_CHECK_VALUE(objective == kNegativeSampling ||
                        (noise_probs.has_value() && noise_probs->dim() == 1 &&
                         noise_probs->size(0) == weight.size(0)),
                    "noise_probs must be [V] for this objective");
  TORCH_CHECK_VALUE(log_z.numel() == 1, "log_z must be a scalar");
}

// The CPU backends' host check of class indices, before any kernel reads memory through one:
// each in [0, num_classes) (`bound` says what that is), or ignore_index where allowed. A
// branch-free pass finds whether any is bad (it vectorizes); only then is the first bad one looked
// up, in logical order whatever the tensor's strides, for the message.
inline void check_class_indices(const at::Tensor& indices, int64_t num_classes, const char* name,
                                bool has_ignore_index, int64_t ignore_index, const char* bound) {
  const auto values = indices.contiguous();
  const int64_t* p = values.const_data_ptr<int64_t>();
  const int64_t n = values.numel();
  // One unsigned comparison covers v >= 0 and v < num_classes.
  const auto good = [&](int64_t v) {
    return static_cast<uint64_t>(v) < static_cast<uint64_t>(num_classes) ||
           (has_ignore_index && v == ignore_index);
  };
  int64_t bad = 0;
  for (int64_t e = 0; e < n; ++e) bad += !good(p[e]);
  if (bad == 0) return;
  for (int64_t e = 0; e < n; ++e) {
    TORCH_CHECK_VALUE(good(p[e]), name, " holds the class index ", p[e], ", outside [0, ",
                      num_classes, ") (", bound, ")");
  }
}

// Rows with unit stride along D are read in place (a sliced or offset weight is never copied);
// anything else is made contiguous. Every backend reads rows at `row * stride(0)`.
inline at::Tensor rows_of(const at::Tensor& t) {
  return (t.dim() == 2 && (t.stride(1) == 1 || t.size(1) <= 1)) ? t : t.contiguous();
}

// A loss forward's inputs as every backend reads them (rows in place, indices and bias contiguous,
// the noise probabilities as float32 on hidden's device; b and q undefined when absent or unused)
// and its outputs, allocated in the accumulation dtype (float64 for float64, float32 otherwise):
// one value per example [N] (the loss, or a shard's statistic) and the coefficients [N, T + k + h].
struct ForwardInputs {
  at::Tensor h, w, b, tgt, neg, hard, q;
  at::ScalarType acc_dtype;
  at::Tensor values, coef;
};

inline ForwardInputs prepare_forward(const at::Tensor& hidden, const at::Tensor& weight,
                                     const std::optional<at::Tensor>& bias,
                                     const at::Tensor& target, const at::Tensor& negatives,
                                     const std::optional<at::Tensor>& noise_probs,
                                     bool uses_noise,
                                     const std::optional<at::Tensor>& hard_negatives =
                                         std::nullopt) {
  ForwardInputs in;
  in.h = rows_of(hidden);
  in.w = rows_of(weight);
  in.b = bias.has_value() ? bias->contiguous() : at::Tensor();
  in.tgt = target.contiguous();
  in.neg = negatives.contiguous();
  in.hard = hard_negatives.has_value() ? hard_negatives->contiguous() : at::Tensor();
  in.q = uses_noise ? noise_probs->to(in.h.device(), at::kFloat).contiguous() : at::Tensor();
  in.acc_dtype = in.h.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t n = in.h.size(0);
  const int64_t cols = num_positives(target) + in.neg.size(-1) + num_hard(hard_negatives);
  in.values = at::empty({n}, in.h.options().dtype(in.acc_dtype));
  in.coef = at::empty({n, cols}, in.h.options().dtype(in.acc_dtype));
  return in;
}

// The columns of a call (columns.h) over its contiguous index tensors.
inline Columns make_columns(const at::Tensor& target, const at::Tensor& negatives,
                            const at::Tensor& hard, int64_t ignore_index) {
  return Columns{target.const_data_ptr<int64_t>(),
                 negatives.const_data_ptr<int64_t>(),
                 hard.defined() && hard.numel() > 0 ? hard.const_data_ptr<int64_t>() : nullptr,
                 num_positives(target),
                 negatives.size(-1),
                 hard.defined() ? hard.size(1) : 0,
                 ignore_index,
                 negatives.dim() == 1};
}

}  // namespace fused_nce
