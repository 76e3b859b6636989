// The columns of an example's loss, as every backend walks them: T positives (`target` [N, T];
// [N] is T = 1), k sampled negatives ([N, k], or [k] shared by every example) and h hard
// negatives chosen by the caller ([N, h]). Column j < T is positive j, T <= j < T + k sampled
// negative j - T, and T + k <= j hard negative j - T - k. `ignore_index` in a positive or a hard
// negative is padding; an example with no valid positive is ignored. Host and device compile the
// same code.
#pragma once

#include <cstdint>

#include "nce_math.h"

namespace fused_nce {

struct Columns {
  const int64_t* target;
  const int64_t* negatives;
  const int64_t* hard;  // null when h = 0
  int64_t num_positives, k, num_hard, ignore_index;
  bool shared;

  FUSED_NCE_HD int64_t count() const { return num_positives + k + num_hard; }
  FUSED_NCE_HD bool positive(int64_t j) const { return j < num_positives; }
  // A sampled negative: logQ-corrected, and with shared negatives a column of the GEMM.
  FUSED_NCE_HD bool sampled(int64_t j) const {
    return j >= num_positives && j < num_positives + k;
  }
  FUSED_NCE_HD bool from_gemm(int64_t j) const { return shared && sampled(j); }

  FUSED_NCE_HD int64_t class_of(int64_t i, int64_t j) const {
    if (j < num_positives) return target[i * num_positives + j];
    j -= num_positives;
    if (j < k) return shared ? negatives[j] : negatives[i * k + j];
    return hard[i * num_hard + j - k];
  }
  // Positives and hard negatives may be padding; sampled negatives never are.
  FUSED_NCE_HD bool padding(int64_t j, int64_t c) const {
    return !sampled(j) && c == ignore_index;
  }
  FUSED_NCE_HD int64_t valid_positives(int64_t i) const {
    int64_t m = 0;
    for (int64_t t = 0; t < num_positives; ++t) m += target[i * num_positives + t] != ignore_index;
    return m;
  }
  FUSED_NCE_HD bool is_valid_positive(int64_t i, int64_t c) const {
    for (int64_t t = 0; t < num_positives; ++t) {
      const int64_t p = target[i * num_positives + t];
      if (p != ignore_index && p == c) return true;
    }
    return false;
  }
  // Column j (class c) of example i takes no part in its loss: padding, or with
  // remove_accidental_hits a negative equal to one of the example's valid positives.
  FUSED_NCE_HD bool dropped(int64_t i, int64_t j, int64_t c, bool remove_accidental_hits) const {
    if (padding(j, c)) return true;
    return !positive(j) && remove_accidental_hits && is_valid_positive(i, c);
  }

  // The columns an example gathers itself (all but shared negatives' GEMM columns), numbered
  // 0 .. per_example() - 1; own_column maps that number to the column.
  FUSED_NCE_HD int64_t per_example() const { return shared ? num_positives + num_hard : count(); }
  FUSED_NCE_HD int64_t own_column(int64_t m) const {
    return shared && m >= num_positives ? m + k : m;
  }
};

}  // namespace fused_nce
