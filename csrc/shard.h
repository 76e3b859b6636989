// What the vocab-parallel (sharded W) ops share across backends: the row-range checks and the
// ownership test. A shard owns rows [row_start, row_start + rows) of a num_classes-row embedding.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

#include "nce_math.h"

namespace fused_nce {

inline void check_shard(const at::Tensor& weight, int64_t row_start, int64_t num_classes) {
  TORCH_CHECK_VALUE(num_classes >= 1, "num_classes must be >= 1, got ", num_classes);
  TORCH_CHECK_VALUE(row_start >= 0 && row_start + weight.size(0) <= num_classes,
                    "weight holds rows [", row_start, ", ", row_start + weight.size(0),
                    ") which do not fit in [0, ", num_classes, ")");
}

inline void check_shard_noise(const std::optional<at::Tensor>& noise_probs, const at::Tensor& log_z,
                              int64_t objective, int64_t num_classes) {
  TORCH_CHECK_VALUE(objective >= kNce && objective <= kSampledSoftmax, "unknown objective ",
                    objective);
  // The noise distribution is over all classes (replicated), indexed by global class.
  TORCH_CHECK_VALUE(objective == kNegativeSampling ||
                        (noise_probs.has_value() && noise_probs->dim() == 1 &&
                         noise_probs->size(0) == num_classes),
                    "noise_probs must be [num_classes] for this objective");
  TORCH_CHECK_VALUE(log_z.numel() == 1, "log_z must be a scalar");
}

// Whether global class c is a row of this shard (c is already known to be in [0, V)).
FUSED_NCE_HD bool owns(int64_t c, int64_t row_start, int64_t rows) {
  return c >= row_start && c < row_start + rows;
}

}  // namespace fused_nce
