// Math shared by the CPU and CUDA retrieval kernels: the in-batch softmax's per-element logit,
// masking, online log-sum-exp and gradient, and the frequency estimator's hashing and gap update.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "nce_math.h"  // FUSED_NCE_HD

namespace fused_nce {

// ---- In-batch softmax. Columns are the (gathered) in-batch candidates followed by the extras;
// the positive of row i is column pos_offset + i, and the row's item id is that column's id.

// o_ij = s_ij / T - log q_j, from the raw dot product s_ij.
template <typename T>
FUSED_NCE_HD T in_batch_logit(T score, T inv_temperature, T log_q) {
  return score * inv_temperature - log_q;
}

// A column is dropped from row i's softmax when it holds row i's item but is not its positive.
FUSED_NCE_HD bool in_batch_dropped(bool remove_accidental_hits, int64_t column, int64_t positive,
                                   int64_t column_id, int64_t row_id) {
  return remove_accidental_hits && column != positive && column_id == row_id;
}

// Running (max, sum of exp(x - max)) of a row: exp only ever sees non-positive arguments.
template <typename T>
struct OnlineLse {
  T max;
  T sum;
};

template <typename T>
FUSED_NCE_HD OnlineLse<T> online_lse_init() {
  return OnlineLse<T>{-std::numeric_limits<T>::infinity(), T(0)};
}

template <typename T>
FUSED_NCE_HD OnlineLse<T> online_lse_merge(OnlineLse<T> a, OnlineLse<T> b) {
  using std::exp;
  if (a.max == -std::numeric_limits<T>::infinity()) return b;
  if (b.max == -std::numeric_limits<T>::infinity()) return a;
  return a.max >= b.max ? OnlineLse<T>{a.max, a.sum + b.sum * exp(b.max - a.max)}
                        : OnlineLse<T>{b.max, b.sum + a.sum * exp(a.max - b.max)};
}

template <typename T>
FUSED_NCE_HD OnlineLse<T> online_lse_add(OnlineLse<T> a, T x) {
  return online_lse_merge(a, OnlineLse<T>{x, T(1)});
}

// The positive column is never dropped, so sum >= 1 and max is finite for finite logits.
template <typename T>
FUSED_NCE_HD T online_lse_value(OnlineLse<T> a) {
  using std::log;
  return a.max + log(a.sum);
}

// dloss_i / ds_ij (raw score) for loss_i = lse_i - o_ii scaled by grad_i:
// grad_i * (softmax_ij - [j == pos]) / T; zero for a dropped column.
template <typename T>
FUSED_NCE_HD T in_batch_score_grad(T logit, T lse, bool positive, T grad, T inv_temperature) {
  using std::exp;
  const T p = exp(logit - lse);  // logit <= lse: never exponentiates a positive number
  return grad * (positive ? p - T(1) : p) * inv_temperature;
}

// ---- Frequency estimator (Yi et al., RecSys 2019) with several hash arrays.

// splitmix64's finalizer: a bijective mix of the id's 64 bits before reduction to a bucket.
FUSED_NCE_HD uint64_t mix64(uint64_t x) {
  x ^= x >> 30;
  x *= 0xBF58476D1CE4E5B9ull;
  x ^= x >> 27;
  x *= 0x94D049BB133111EBull;
  x ^= x >> 31;
  return x;
}

// Bucket of `id` in hash array `array` (independent seeds per array).
FUSED_NCE_HD int64_t frequency_bucket(int64_t id, int64_t array, int64_t num_buckets) {
  const uint64_t seed = 0x9E3779B97F4A7C15ull * static_cast<uint64_t>(array + 1);
  return static_cast<int64_t>(mix64(static_cast<uint64_t>(id) ^ seed) %
                              static_cast<uint64_t>(num_buckets));
}

// A bucket last seen at `last` (-1: never) is seen at `step`: the new EMA of the gap. The first
// gap replaces the "no estimate yet" value 0 instead of being averaged with it.
FUSED_NCE_HD float frequency_gap_update(float gap, int64_t last, int64_t step, float alpha) {
  if (last < 0) return gap;
  const float observed = static_cast<float>(step - last);
  return gap == 0.0f ? observed : (1.0f - alpha) * gap + alpha * observed;
}

// Occurrences per sighting: an EMA of how many times the bucket's ids occur in a step where they
// occur at all; the first sighting's count replaces the "no estimate yet" value 0.
FUSED_NCE_HD float frequency_count_update(float count, int64_t occurrences, float alpha) {
  const float observed = static_cast<float>(occurrences);
  return count == 0.0f ? observed : (1.0f - alpha) * count + alpha * observed;
}

// The gap a bucket stands for after `steps` updates: its EMA, or, before a second sighting, the
// steps since its first (at least 1), or steps + 1 when never seen (at most one in that many).
FUSED_NCE_HD float frequency_bucket_gap(float gap, int64_t last, int64_t steps) {
  if (gap > 0.0f) return gap;
  if (last < 0) return static_cast<float>(steps + 1);
  const int64_t since = steps - last;
  return static_cast<float>(since > 1 ? since : 1);
}

// Expected occurrences per step of a bucket's ids: occurrences per sighting over steps per
// sighting (a ratio of averages, so it does not saturate at 1 as the probability does).
FUSED_NCE_HD float frequency_bucket_rate(float gap, float count, int64_t last, int64_t steps) {
  return (count > 0.0f ? count : 1.0f) / frequency_bucket_gap(gap, last, steps);
}

}  // namespace fused_nce
