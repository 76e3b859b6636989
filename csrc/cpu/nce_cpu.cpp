// Fused sampled losses on the CPU: one pass over each example's target and negative rows of W
// (read in place, never gathered into [N, k, D]), float32 accumulation (float64 for float64).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../checks.h"
#include "../fused_nce.h"
#include "../nce_math.h"
#include "clones.h"
#include "reused_buffers.h"
#include "rows.h"

namespace fused_nce {

// float32 rows, the common case, get AVX2 / FMA code where the CPU has it (picked once, when the
// library loads); everything else the baseline's. Dots keep eight lane sums in one vector (GCC /
// Clang vector extensions: two SSE registers in the baseline) and add the lanes as a tree at the
// end: a single running sum would wait on every multiply-add, and the compiler's own simd
// reduction adds the lanes one after another.
namespace {

typedef float f32x8 __attribute__((vector_size(32)));
constexpr int64_t kLanes = 8;

inline f32x8 load8(const float* p) {
  f32x8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline float sum_lanes(f32x8 v) {
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

}  // namespace

FUSED_NCE_CLONES float dot_f32(const float* a, const float* b, int64_t n) {
  f32x8 lanes = {};
  int64_t d = 0;
  for (; d + kLanes <= n; d += kLanes) lanes += load8(a + d) * load8(b + d);
  float sum = sum_lanes(lanes);
  for (; d < n; ++d) sum += a[d] * b[d];
  return sum;
}

namespace {

FUSED_NCE_CLONES void axpy_f32(float alpha, const float* x, float* y, int64_t n) {
#pragma omp simd
  for (int64_t d = 0; d < n; ++d) y[d] += alpha * x[d];
}

// Dots of one hidden row with `count` rows of W, four rows at a time: four independent sums keep
// the FMA units busy and four rows' loads in flight (the rows are scattered over W).
FUSED_NCE_CLONES void dots_f32(const float* h, const float* w, int64_t stride,
                               const int64_t* rows, int64_t count, int64_t n, float* out) {
  int64_t j = 0;
  for (; j + 4 <= count; j += 4) {
    const float* w0 = w + rows[j] * stride;
    const float* w1 = w + rows[j + 1] * stride;
    const float* w2 = w + rows[j + 2] * stride;
    const float* w3 = w + rows[j + 3] * stride;
    f32x8 s0 = {}, s1 = {}, s2 = {}, s3 = {};
    int64_t d = 0;
    for (; d + kLanes <= n; d += kLanes) {
      const f32x8 x = load8(h + d);
      s0 += x * load8(w0 + d);
      s1 += x * load8(w1 + d);
      s2 += x * load8(w2 + d);
      s3 += x * load8(w3 + d);
    }
    float t0 = sum_lanes(s0), t1 = sum_lanes(s1), t2 = sum_lanes(s2), t3 = sum_lanes(s3);
    for (; d < n; ++d) {
      t0 += h[d] * w0[d];
      t1 += h[d] * w1[d];
      t2 += h[d] * w2[d];
      t3 += h[d] * w3[d];
    }
    out[j] = t0;
    out[j + 1] = t1;
    out[j + 2] = t2;
    out[j + 3] = t3;
  }
  for (; j < count; ++j) out[j] = dot_f32(h, w + rows[j] * stride, n);
}

inline float float_from_bits(int32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline int32_t bits_of_float(float f) {
  int32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  return bits;
}

// exp and log over an example's columns: branch-free polynomials (Cephes' expf and logf, about
// 1 ulp) that the clones vectorize, where glibc's expf / logf are one call per value.
// y = exp(x) for x <= 88; below -87.3 (float32's smallest normal) it returns about 1e-38, not a
// subnormal or zero.
FUSED_NCE_CLONES void exp_f32(const float* x, float* y, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    float v = x[j] < -87.3365447f ? -87.3365447f : x[j];
    v = v > 88.0f ? 88.0f : v;
    // k = round(v / ln 2) by the 1.5 * 2^23 trick; v = k ln 2 + r with |r| <= ln 2 / 2.
    const float k = (v * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    const float r = (v - k * 0.693359375f) - k * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.0f;
    y[j] = p * float_from_bits((static_cast<int32_t>(k) + 127) << 23);
  }
}

// y = log(x) for positive finite x (y may be x).
FUSED_NCE_CLONES void log_f32(const float* x, float* y, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    // A subnormal x is scaled by 2^23 first. x = m 2^e with m in [sqrt(1/2), sqrt(2)), f = m - 1.
    const bool subnormal = x[j] < 1.17549435e-38f;
    const int32_t bits = bits_of_float(subnormal ? x[j] * 8388608.0f : x[j]);
    float m = float_from_bits((bits & 0x007fffff) | 0x3f800000);
    float e = static_cast<float>((bits >> 23) - (subnormal ? 150 : 127));
    const bool high = m > 1.41421356f;
    m = high ? m * 0.5f : m;
    e = high ? e + 1.0f : e;
    const float f = m - 1.0f;
    const float z = f * f;
    float p = 7.0376836292e-2f;
    p = p * f - 1.1514610310e-1f;
    p = p * f + 1.1676998740e-1f;
    p = p * f - 1.2420140846e-1f;
    p = p * f + 1.4249322787e-1f;
    p = p * f - 1.6668057665e-1f;
    p = p * f + 2.0000714765e-1f;
    p = p * f - 2.4999993993e-1f;
    p = p * f + 3.3333331174e-1f;
    const float tail = p * f * z + e * -2.12194440e-4f - 0.5f * z;
    y[j] = (f + tail) + e * 0.693359375f;
  }
}

// keep[j] = 0 where ids[j] == id, else 1: an accidental-hit mask (64-bit compares want AVX2).
FUSED_NCE_CLONES void keep_unless_f32(const int64_t* ids, int64_t id, float* keep, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) keep[j] = ids[j] == id ? 0.0f : 1.0f;
}

inline void keep_unless(const int64_t* ids, int64_t id, float* keep, int64_t n) {
  keep_unless_f32(ids, id, keep, n);
}
inline void keep_unless(const int64_t* ids, int64_t id, double* keep, int64_t n) {
  for (int64_t j = 0; j < n; ++j) keep[j] = ids[j] == id ? 0.0 : 1.0;
}

inline void exp_columns(const float* x, float* y, int64_t n) { exp_f32(x, y, n); }
inline void log_columns(const float* x, float* y, int64_t n) { log_f32(x, y, n); }
inline void exp_columns(const double* x, double* y, int64_t n) {
  for (int64_t j = 0; j < n; ++j) y[j] = std::exp(x[j]);
}
inline void log_columns(const double* x, double* y, int64_t n) {
  for (int64_t j = 0; j < n; ++j) y[j] = std::log(x[j]);
}

// The losses and dloss/ds of `rows` examples of `cols` columns each (columns.h), from nce_math.h's
// terms, with the exps and logs of all their columns computed together: a short example row
// would leave most of a vector loop to its scalar remainder. On entry s[r * cols + j] is example
// r's score of column j, log_q[...] the log noise probability of its class (0 for a hard
// negative; unused by negative sampling), keep[...] 1 or 0 (0: padding, a dropped accidental
// hit, or every column of an ignored example) and label[...] 0 at a negative and, at a positive,
// 1 / |P| for sampled softmax (its soft label) or the positive term's weight for the binary
// objectives (1; gBCE's beta). On exit s holds dloss/ds (0 where not kept) and loss[r] the loss
// (0 for an ignored example: one with nothing kept). `x`, `e` and `v` are scratch of
// rows * cols values each; `k` is the number of sampled negatives (NCE's log k).
template <typename T>
__attribute__((always_inline)) inline void block_loss_and_grad(
    int64_t objective, int64_t rows, int64_t cols, int64_t k, T* s, const T* log_q, const T* keep,
    const T* label, T log_z, T* loss, T* x, T* e, T* v) {
  const int64_t n = rows * cols;
  if (objective == kSampledSoftmax) {
    for (int64_t f = 0; f < n; ++f) s[f] -= log_q[f];
    // Row r's largest kept logit in v[r] (-inf when nothing is kept), then the sum of its exps.
    // The reductions are vector-wide (omp simd): a fixed order for a given row length.
    constexpr T kLowest = -std::numeric_limits<T>::infinity();
    for (int64_t r = 0; r < rows; ++r) {
      const T* o = s + r * cols;
      const T* kept = keep + r * cols;
      T max_logit = kLowest;
#pragma omp simd reduction(max : max_logit)
      for (int64_t j = 0; j < cols; ++j) {
        max_logit = std::max(max_logit, kept[j] != T(0) ? o[j] : kLowest);
      }
      max_logit = max_logit == kLowest ? T(0) : max_logit;
      v[r] = max_logit;
      T* xr = x + r * cols;
      // keep is 0 or 1 and every score finite: products, not selects, so that the loops vectorize.
#pragma omp simd
      for (int64_t j = 0; j < cols; ++j) xr[j] = kept[j] * (o[j] - max_logit);
    }
    exp_columns(x, e, n);
    for (int64_t r = 0; r < rows; ++r) {
      const T* er = e + r * cols;
      const T* kept = keep + r * cols;
      const T* labels = label + r * cols;
      T* sr = s + r * cols;
      T sum = T(0), positive_logits = T(0);
#pragma omp simd reduction(+ : sum, positive_logits)
      for (int64_t j = 0; j < cols; ++j) {
        sum += kept[j] * er[j];
        positive_logits += labels[j] * sr[j];
      }
      // An ignored example (nothing kept) gets loss 0 and no gradient.
      const bool ignored = sum == T(0);
      loss[r] = ignored ? T(0) : v[r] + std::log(sum) - positive_logits;
      // softmax(o)_j = exp(o_j - max) / sum: the exps above, no second pass of them.
      const T inv_sum = ignored ? T(0) : T(1) / sum;
#pragma omp simd
      for (int64_t j = 0; j < cols; ++j) {
        sr[j] = kept[j] * softmax_grad(labels[j], er[j] * inv_sum);
      }
    }
    return;
  }
  const T shift = binary_shift(objective, log_z, k);
  for (int64_t f = 0; f < n; ++f) {
    const T d = keep[f] != T(0) ? binary_logit(objective, s[f], log_q[f], shift) : T(0);
    x[f] = label[f] != T(0) ? -d : d;
    v[f] = -std::fabs(x[f]);
  }
  exp_columns(v, e, n);
  for (int64_t f = 0; f < n; ++f) v[f] = T(1) + e[f];
  log_columns(v, v, n);
  for (int64_t f = 0; f < n; ++f) {
    const bool positive = label[f] != T(0);
    const Term<T> term = binary_term_from_parts(positive, x[f], e[f], T(1) + e[f], v[f]);
    // The term's loss in v (its log is used), its gradient in s; a positive's weighted.
    const T weight = positive ? label[f] : T(1);
    v[f] = keep[f] != T(0) ? weight * term.loss : T(0);
    s[f] = keep[f] != T(0) ? weight * term.grad : T(0);
  }
  for (int64_t r = 0; r < rows; ++r) {
    T sum = T(0);
    for (int64_t j = 0; j < cols; ++j) sum += v[r * cols + j];
    loss[r] = sum;
  }
}

// float32, the common case: the block above compiled into the AVX2 / FMA clone too (inlined, as
// a template cannot carry the clones itself).
FUSED_NCE_CLONES void block_loss_and_grad_f32(int64_t objective, int64_t rows, int64_t cols,
                                              int64_t k, float* s, const float* log_q,
                                              const float* keep, const float* label, float log_z,
                                              float* loss, float* x, float* e, float* v) {
  block_loss_and_grad<float>(objective, rows, cols, k, s, log_q, keep, label, log_z, loss, x, e, v);
}

template <typename T>
void loss_and_grad(int64_t objective, int64_t rows, int64_t cols, int64_t k, T* s,
                   const T* log_q, const T* keep, const T* label, T log_z, T* loss, T* x, T* e,
                   T* v) {
  if constexpr (std::is_same_v<T, float>) {
    block_loss_and_grad_f32(objective, rows, cols, k, s, log_q, keep, label, log_z, loss, x, e, v);
  } else {
    block_loss_and_grad<T>(objective, rows, cols, k, s, log_q, keep, label, log_z, loss, x, e, v);
  }
}

template <typename acc_t, typename scalar_t>
inline void axpy(acc_t alpha, const scalar_t* x, acc_t* y, int64_t n) {
  if constexpr (std::is_same_v<acc_t, float> && std::is_same_v<scalar_t, float>) {
    axpy_f32(alpha, x, y, n);
  } else {
#pragma omp simd
    for (int64_t d = 0; d < n; ++d) y[d] += alpha * static_cast<acc_t>(x[d]);
  }
}

// y += sum_j coefs[j] * base[rows[j]], four rows at a time: y is loaded and stored once per four
// rows instead of once per row.
FUSED_NCE_CLONES void axpy_rows_f32(const float* base, int64_t stride, const int64_t* rows,
                                    const float* coefs, int64_t count, float* y, int64_t n) {
  int64_t j = 0;
  for (; j + 4 <= count; j += 4) {
    const float* x0 = base + rows[j] * stride;
    const float* x1 = base + rows[j + 1] * stride;
    const float* x2 = base + rows[j + 2] * stride;
    const float* x3 = base + rows[j + 3] * stride;
    const float c0 = coefs[j], c1 = coefs[j + 1], c2 = coefs[j + 2], c3 = coefs[j + 3];
#pragma omp simd
    for (int64_t d = 0; d < n; ++d) y[d] += c0 * x0[d] + c1 * x1[d] + c2 * x2[d] + c3 * x3[d];
  }
  for (; j < count; ++j) {
    const float* x = base + rows[j] * stride;
    const float c = coefs[j];
#pragma omp simd
    for (int64_t d = 0; d < n; ++d) y[d] += c * x[d];
  }
}

template <typename acc_t, typename scalar_t>
void axpy_rows(const scalar_t* base, int64_t stride, const int64_t* rows, const acc_t* coefs,
               int64_t count, acc_t* y, int64_t n) {
  if constexpr (std::is_same_v<acc_t, float> && std::is_same_v<scalar_t, float>) {
    axpy_rows_f32(base, stride, rows, coefs, count, y, n);
  } else {
    for (int64_t j = 0; j < count; ++j) axpy(coefs[j], base + rows[j] * stride, y, n);
  }
}

template <typename acc_t, typename scalar_t>
inline void store_row(const acc_t* x, scalar_t* y, int64_t n) {
#pragma omp simd
  for (int64_t d = 0; d < n; ++d) y[d] = static_cast<scalar_t>(x[d]);
}

// out[j] = <h, W[rows[j]]> + bias[rows[j]] for j < count (bias may be null).
template <typename acc_t, typename scalar_t>
void row_scores(const acc_t* h, const scalar_t* w, int64_t stride, const scalar_t* bias,
                const int64_t* rows, int64_t count, int64_t n, acc_t* out) {
  if constexpr (std::is_same_v<acc_t, float> && std::is_same_v<scalar_t, float>) {
    dots_f32(h, w, stride, rows, count, n, out);
  } else {
    for (int64_t j = 0; j < count; ++j) out[j] = dot(h, w + rows[j] * stride, n);
  }
  if (bias != nullptr) {
    for (int64_t j = 0; j < count; ++j) out[j] += static_cast<acc_t>(bias[rows[j]]);
  }
}

// Enough work per task that threads are not woken for a few dot products.
int64_t grain_for(int64_t work_per_item) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, work_per_item));
}

// Shapes and dtypes (checks.h), then index ranges, before any kernel reads memory through an index.
void check_inputs(const at::Tensor& hidden, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias, const at::Tensor& target,
                  const at::Tensor& negatives, const std::optional<at::Tensor>& hard_negatives,
                  int64_t ignore_index) {
  check_shapes(hidden, weight, bias, target, negatives, hard_negatives);
  constexpr const char* kBound = "the number of rows of weight";
  check_class_indices(target, weight.size(0), "target", true, ignore_index, kBound);
  check_class_indices(negatives, weight.size(0), "negatives", false, 0, kBound);
  if (hard_negatives.has_value()) {
    check_class_indices(*hard_negatives, weight.size(0), "hard_negatives", true, ignore_index,
                        kBound);
  }
}

// Entries sorted by the row they add to (counting sort, stable): entries order[start[r]] ..
// order[start[r + 1] - 1] belong to row r. `entry_row[e] < 0` drops entry e.
struct EntriesByRow {
  std::vector<int64_t> start, order;

  EntriesByRow(const std::vector<int64_t>& entry_row, int64_t num_rows) : start(num_rows + 1, 0) {
    for (const int64_t r : entry_row) {
      if (r >= 0) ++start[r + 1];
    }
    for (int64_t r = 0; r < num_rows; ++r) start[r + 1] += start[r];
    order.resize(start[num_rows]);
    std::vector<int64_t> next(start.begin(), start.end() - 1);
    for (int64_t e = 0, n = static_cast<int64_t>(entry_row.size()); e < n; ++e) {
      if (entry_row[e] >= 0) order[next[entry_row[e]]++] = e;
    }
  }
  bool touched(int64_t row) const { return start[row + 1] > start[row]; }
};

// The rows a row-sparse gradient holds: a bitmap over the V rows with the count of set bits before
// each 64-row word, so that marking, numbering and looking up cost O(V / 64 + entries), not O(V)
// (a step of a few thousand entries against V in the millions). Output row index(r) of a touched
// row r is the number of touched rows below it: rows come out ascending.
class TouchedRows {
 public:
  explicit TouchedRows(int64_t num_rows) : bits_((num_rows + 63) / 64, 0) {}
  void mark(int64_t row) { bits_[row >> 6] |= uint64_t{1} << (row & 63); }
  // Numbers the marked rows and returns how many there are.
  int64_t count() {
    rank_.resize(bits_.size());
    int64_t total = 0;
    for (size_t w = 0; w < bits_.size(); ++w) {
      rank_[w] = total;
      total += __builtin_popcountll(bits_[w]);
    }
    return total;
  }
  int64_t index(int64_t row) const {
    const uint64_t below = bits_[row >> 6] & ((uint64_t{1} << (row & 63)) - 1);
    return rank_[row >> 6] + __builtin_popcountll(below);
  }
  // The marked rows, ascending, into out.
  void list(int64_t* out) const {
    for (size_t w = 0; w < bits_.size(); ++w) {
      for (uint64_t word = bits_[w]; word != 0; word &= word - 1) {
        *out++ = static_cast<int64_t>(w) * 64 + __builtin_ctzll(word);
      }
    }
  }

 private:
  std::vector<uint64_t> bits_;
  std::vector<int64_t> rank_;
};

// Sums each row's entries into grad_weight / grad_bias. Each row is summed by one thread in entry
// order: no races, and the result is bitwise reproducible whatever the thread count.
// `touched == nullptr`: dense output, every row is written, zeros included (sparing a separate
// serial memset of [V, D]). Otherwise only touched rows are written, row r to touched->index(r).
// `add_entry(e, acc)` adds entry e's [D] contribution to acc and returns its bias contribution.
template <typename scalar_t, typename acc_t, typename AddEntry>
void sum_rows(const EntriesByRow& entries, const TouchedRows* touched, int64_t dim,
              scalar_t* grad_weight, scalar_t* grad_bias, const AddEntry& add_entry) {
  const auto& start = entries.start;
  const int64_t num_rows = static_cast<int64_t>(start.size()) - 1;
  // Rows [0, r) cost r + start[r] row-sized writes and reads; cut them into parts of equal cost
  // so hot rows (frequent classes, all at low indices under a Zipfian noise) are spread out.
  const int64_t num_parts = 4 * at::get_num_threads();
  const int64_t total_cost = num_rows + start[num_rows];
  std::vector<int64_t> part_begin(num_parts + 1, num_rows);
  part_begin[0] = 0;
  for (int64_t r = 0, p = 1; r < num_rows && p < num_parts; ++r) {
    while (p < num_parts && r + start[r] >= p * total_cost / num_parts) part_begin[p++] = r;
  }
  at::parallel_for(0, num_parts, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(dim);
    for (int64_t row = part_begin[begin]; row < part_begin[end]; ++row) {
      if (!entries.touched(row)) {
        // Dense output: an untouched row is zeros, written directly (no accumulator pass).
        if (touched == nullptr) {
          std::fill_n(grad_weight + row * dim, dim, scalar_t(0));
          if (grad_bias != nullptr) grad_bias[row] = scalar_t(0);
        }
        continue;
      }
      std::fill(acc.begin(), acc.end(), acc_t(0));
      acc_t bias_acc = 0;
      for (int64_t p = start[row]; p < start[row + 1]; ++p) {
        bias_acc += add_entry(entries.order[p], acc.data());
      }
      const int64_t out = touched != nullptr ? touched->index(row) : row;
      store_row(acc.data(), grad_weight + out * dim, dim);
      if (grad_bias != nullptr) grad_bias[out] = static_cast<scalar_t>(bias_acc);
    }
  });
}

// sum_rows for one thread or little work: each entry is added straight into its zeroed output
// row, in entry order. These are the additions sum_rows makes, in the same order, so the result is
// bitwise the same, without sorting the entries or a row accumulator (for acc_t == scalar_t).
template <typename acc_t, typename AddEntry>
void scatter_entries(const std::vector<int64_t>& entry_row, const TouchedRows* touched, int64_t dim,
                     acc_t* grad_weight, acc_t* grad_bias, const AddEntry& add_entry) {
  for (int64_t e = 0, n = static_cast<int64_t>(entry_row.size()); e < n; ++e) {
    const int64_t row = entry_row[e];
    if (row < 0) continue;
    const int64_t out = touched != nullptr ? touched->index(row) : row;
    const acc_t bias = add_entry(e, grad_weight + out * dim);
    if (grad_bias != nullptr) grad_bias[out] += bias;
  }
}

// base[rows[j]] += coefs[j] * x and bias[rows[j]] += coefs[j] (bias may be null) for j < count,
// in order (rows may repeat): one example's entries in scatter_entries' arithmetic. The serial
// path only (acc_t == scalar_t: entries are added into the output rows themselves).
template <typename scalar_t, typename acc_t>
void scatter_rows(const scalar_t* x, const int64_t* rows, const acc_t* coefs, int64_t count,
                  scalar_t* base, scalar_t* bias, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    for (int64_t j = 0; j < count; ++j) {
      axpy(coefs[j], x, base + rows[j] * n, n);
      if (bias != nullptr) bias[rows[j]] += coefs[j];
    }
  } else {
    TORCH_INTERNAL_ASSERT(false, "scatter_rows needs rows of the accumulation dtype");
  }
}

// Below this many multiply-adds of the weight gradient, waking threads costs more than it saves.
constexpr int64_t kSerialScatterWork = int64_t{1} << 18;

}  // namespace

std::tuple<at::Tensor, at::Tensor> sampled_loss_forward_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& target, const at::Tensor& negatives,
    const std::optional<at::Tensor>& hard_negatives, const std::optional<at::Tensor>& noise_probs,
    const at::Tensor& log_z, int64_t objective, double positive_weight,
    bool remove_accidental_hits, int64_t ignore_index) {
  // The GEMMs below are part of the kernel: an enclosing autocast region must not recast them.
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  check_inputs(hidden, weight, bias, target, negatives, hard_negatives, ignore_index);
  check_loss_args(weight, noise_probs, log_z, objective);
  const bool uses_noise = objective != kNegativeSampling;

  const ForwardInputs in = prepare_forward(hidden, weight, bias, target, negatives, noise_probs,
                                           uses_noise, hard_negatives);
  const at::Tensor &h = in.h, &w = in.w, &b = in.b, &tgt = in.tgt, &neg = in.neg, &q = in.q;
  const at::ScalarType acc_dtype = in.acc_dtype;
  const at::Tensor &loss = in.values, &coef = in.coef;
  const Columns columns = make_columns(tgt, neg, in.hard, ignore_index);
  const int64_t n_examples = h.size(0), dim = h.size(1), k = columns.k;
  const bool shared = columns.shared;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(),
                                  "sampled_loss_forward_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const acc_t log_z_value = static_cast<acc_t>(log_z.item<double>());
    // Shared negatives: one [N, D] x [D, k] GEMM gives every <h_i, W[n_j]>, written straight into
    // their columns of coef (BLAS takes its row stride); the negatives' bias and log q are the
    // same for every example, so they are looked up once, not N times.
    const float* qp = uses_noise ? q.const_data_ptr<float>() : nullptr;

    std::vector<acc_t> neg_bias, neg_log_q;
    if (shared) {
      auto wn = w.index_select(0, neg).to(acc_dtype);
      auto gemm_columns = coef.narrow(1, columns.num_positives, k);
      at::mm_out(gemm_columns, h.to(acc_dtype), wn.t());
      const int64_t* np = neg.const_data_ptr<int64_t>();
      neg_bias.assign(k, acc_t(0));
      neg_log_q.assign(k, acc_t(1));
      for (int64_t j = 0; j < k; ++j) {
        if (b.defined()) neg_bias[j] = static_cast<acc_t>(b.const_data_ptr<scalar_t>()[np[j]]);
        if (uses_noise) neg_log_q[j] = static_cast<acc_t>(clamp_noise_prob(qp[np[j]]));
      }
      log_columns(neg_log_q.data(), neg_log_q.data(), k);
    }
    const scalar_t* hp = h.const_data_ptr<scalar_t>();
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    const scalar_t* bp = b.defined() ? b.const_data_ptr<scalar_t>() : nullptr;
    acc_t* lossp = loss.mutable_data_ptr<acc_t>();
    acc_t* coefp = coef.mutable_data_ptr<acc_t>();
    const int64_t h_stride = h.stride(0), w_stride = w.stride(0);
    const int64_t cols = columns.count(), own = columns.per_example();
    const bool softmax = objective == kSampledSoftmax;

    at::parallel_for(0, n_examples, grain_for(cols * dim), [&](int64_t begin, int64_t end) {
      // Examples go through the epilogue kBlock at a time.
      constexpr int64_t kBlock = 16;
      const int64_t block_values = kBlock * cols;
      std::vector<acc_t> h_row(dim), log_q(block_values), keep(block_values),
          label(block_values), scratch(3 * block_values);
      std::vector<int64_t> rows(own);
      std::vector<acc_t> own_scores(own);
      for (int64_t b0 = begin; b0 < end; b0 += kBlock) {
        const int64_t block_rows = std::min(kBlock, end - b0);
        for (int64_t r = 0; r < block_rows; ++r) {
          const int64_t i = b0 + r;
          acc_t* s = coefp + i * cols;
          acc_t* q_row = log_q.data() + r * cols;
          acc_t* keep_row = keep.data() + r * cols;
          acc_t* label_row = label.data() + r * cols;
          const int64_t num_valid = columns.valid_positives(i);
          if (num_valid == 0) {
            std::fill(s, s + cols, acc_t(0));
            std::fill(q_row, q_row + cols, acc_t(1));
            std::fill(keep_row, keep_row + cols, acc_t(0));
            std::fill(label_row, label_row + cols, acc_t(0));
            continue;
          }
          const acc_t positive_label = softmax ? acc_t(1) / static_cast<acc_t>(num_valid)
                                               : static_cast<acc_t>(positive_weight);
          // Column by kind (columns.h), so that the k sampled ones, the many, take a short
          // loop. Noise probabilities are made logs below; a hard negative's is 1 (log 0), and
          // a shared negative's log is looked up once for the batch.
          const int64_t first = columns.num_positives, last = first + k;
          const int64_t* positives = columns.target + i * first;
          for (int64_t j = 0; j < first; ++j) {
            const bool valid = positives[j] != ignore_index;
            keep_row[j] = label_row[j] = valid ? acc_t(1) : acc_t(0);
            label_row[j] *= positive_label;
            q_row[j] = uses_noise && valid ? static_cast<acc_t>(clamp_noise_prob(qp[positives[j]]))
                                           : acc_t(1);
          }
          const int64_t* sampled = shared ? columns.negatives : columns.negatives + i * k;
          acc_t* keep_sampled = keep_row + first;
          if (!remove_accidental_hits) {
            std::fill(keep_sampled, keep_sampled + k, acc_t(1));
          } else if (first == 1) {
            // One positive (the common case): a compare per column, which vectorizes.
            keep_unless(sampled, positives[0], keep_sampled, k);
          } else {
            for (int64_t j = 0; j < k; ++j) {
              keep_sampled[j] = columns.is_valid_positive(i, sampled[j]) ? acc_t(0) : acc_t(1);
            }
          }
          std::fill(label_row + first, label_row + first + k, acc_t(0));
          acc_t* q_sampled = q_row + first;
          if (shared) {
            // Already logs, looked up once for the batch (0 where dropped).
            const acc_t noise_on = uses_noise ? acc_t(1) : acc_t(0);
_Pragma("omp simd")
            for (int64_t j = 0; j < k; ++j) {
              q_sampled[j] = noise_on * keep_sampled[j] * neg_log_q[j];
            }
          } else {
            for (int64_t j = 0; j < k; ++j) {
              q_sampled[j] = uses_noise && keep_sampled[j] != acc_t(0)
                                 ? static_cast<acc_t>(clamp_noise_prob(qp[sampled[j]]))
                                 : acc_t(1);
            }
          }
          for (int64_t j = last; j < cols; ++j) {
            const bool dropped =
                columns.dropped(i, j, columns.class_of(i, j), remove_accidental_hits);
            keep_row[j] = dropped ? acc_t(0) : acc_t(1);
            label_row[j] = acc_t(0);
            q_row[j] = acc_t(1);
          }
          // Scores of the columns this example gathers itself (padding reads row 0's place).
          for (int64_t o = 0; o < own; ++o) {
            const int64_t j = columns.own_column(o), c = columns.class_of(i, j);
            rows[o] = columns.padding(j, c) ? 0 : c;
          }
          load_row(hp + i * h_stride, h_row.data(), dim);
          row_scores(h_row.data(), wp, w_stride, bp, rows.data(), own, dim, own_scores.data());
          for (int64_t o = 0; o < own; ++o) s[columns.own_column(o)] = own_scores[o];
          if (shared) {
            acc_t* gemm_scores = s + first;
_Pragma("omp simd")
            for (int64_t j = 0; j < k; ++j) gemm_scores[j] += neg_bias[j];
          }
        }
        if (!uses_noise) {
          // Negative sampling reads no log q.
        } else if (!shared) {
          log_columns(log_q.data(), log_q.data(), block_rows * cols);
        } else {
          // The positives' and hard negatives' logs (the GEMM columns' are set).
          const int64_t first = columns.num_positives, last = first + k;
          for (int64_t r = 0; r < block_rows; ++r) {
            acc_t* q_row = log_q.data() + r * cols;
            log_columns(q_row, q_row, first);
            log_columns(q_row + last, q_row + last, cols - last);
          }
        }
        loss_and_grad<acc_t>(objective, block_rows, cols, k, coefp + b0 * cols, log_q.data(),
                             keep.data(), label.data(), log_z_value, lossp + b0, scratch.data(),
                             scratch.data() + block_values, scratch.data() + 2 * block_values);
      }
    });
  });
  return {loss, coef};
}

namespace {

// Shared negatives' coefficients times grad_loss ([N] or a scalar), [N, T + k + h], and the
// sums of the k GEMM columns first .. first + k - 1 (their bias gradients), in one pass. Threads
// split the columns, and each column is summed over the examples in order: the same bits at any
// thread count.
template <typename T>
void scale_and_sum_columns(const T* coef, const T* grad_loss, int64_t g_stride, int64_t n,
                           int64_t cols, int64_t first, int64_t k, T* scaled, T* sums) {
  // Blocks of 64 columns: each thread streams its columns' segments of every row.
  constexpr int64_t kColumnBlock = 64;
  const int64_t num_blocks = (cols + kColumnBlock - 1) / kColumnBlock;
  at::parallel_for(0, num_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> acc(kColumnBlock);
    for (int64_t block = begin; block < end; ++block) {
      const int64_t j0 = block * kColumnBlock, width = std::min(cols - j0, kColumnBlock);
      std::fill(acc.begin(), acc.end(), T(0));
      for (int64_t i = 0; i < n; ++i) {
        const T g_i = grad_loss[i * g_stride];
        const T* c_row = coef + i * cols + j0;
        T* o_row = scaled + i * cols + j0;
#pragma omp simd
        for (int64_t j = 0; j < width; ++j) {
          o_row[j] = c_row[j] * g_i;
          acc[j] += o_row[j];
        }
      }
      for (int64_t j = 0; j < width; ++j) {
        if (j0 + j >= first && j0 + j < first + k) sums[j0 + j - first] = acc[j];
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> scale_and_sum_columns(const at::Tensor& coef,
                                                         const at::Tensor& grad_loss,
                                                         int64_t first, int64_t k) {
  const int64_t n = coef.size(0), cols = coef.size(1);
  auto scaled = at::empty_like(coef);
  auto sums = at::empty({k}, coef.options());
  AT_DISPATCH_FLOATING_TYPES(coef.scalar_type(), "scale_and_sum_columns", [&] {
    scale_and_sum_columns(coef.const_data_ptr<scalar_t>(), grad_loss.const_data_ptr<scalar_t>(),
                          grad_loss.dim() == 0 ? 0 : 1, n, cols, first, k,
                          scaled.mutable_data_ptr<scalar_t>(), sums.mutable_data_ptr<scalar_t>());
  });
  return {scaled, sums};
}

// What a backward computes besides grad_hidden: the dense [V, D] / [V] gradients, only the touched
// rows (listed ascending in `rows`), or nothing (a frozen output layer).
enum class WeightGrad { kDense, kRows, kNone };

struct Gradients {
  at::Tensor hidden, rows, weight, bias;
};

Gradients backward_cpu(const at::Tensor& grad_loss, const at::Tensor& coef,
                       const at::Tensor& hidden, const at::Tensor& weight, bool has_bias,
                       const at::Tensor& target, const at::Tensor& negatives,
                       const std::optional<at::Tensor>& hard_negatives, int64_t ignore_index,
                       WeightGrad mode) {
  // The GEMMs below are part of the kernel: an enclosing autocast region must not recast them.
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  check_inputs(hidden, weight, std::nullopt, target, negatives, hard_negatives, ignore_index);
  const int64_t n_examples = hidden.size(0), dim = hidden.size(1), k = negatives.size(-1);
  const int64_t num_rows = weight.size(0);
  const int64_t cols = num_positives(target) + k + num_hard(hard_negatives);
  TORCH_CHECK_VALUE((grad_loss.dim() == 1 && grad_loss.size(0) == n_examples) ||
                        grad_loss.dim() == 0,
                    "grad_loss must be [N] or a scalar (the same for every example)");
  TORCH_CHECK_VALUE(coef.dim() == 2 && coef.size(0) == n_examples && coef.size(1) == cols,
                    "coef must be [N, T + k + h]");
  const auto acc_dtype = hidden.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto h = rows_of(hidden);
  const auto w = rows_of(weight);
  const auto tgt = target.contiguous();
  const auto neg = negatives.contiguous();
  const auto hard = hard_negatives.has_value() ? hard_negatives->contiguous() : at::Tensor();
  const Columns columns = make_columns(tgt, neg, hard, ignore_index);
  const bool shared = columns.shared;
  // Per-entry coefficients grad_loss[i] * dloss_i/ds_ij, multiplied where they are read; shared
  // negatives, whose GEMMs take them as a matrix, get them as one [N, T + k + h] product.
  const auto g = grad_loss.to(acc_dtype).contiguous();
  const auto coef_acc = coef.to(acc_dtype).contiguous();
  at::Tensor scaled = coef_acc, neg_bias_grad;
  if (shared) {
    std::tie(scaled, neg_bias_grad) = scale_and_sum_columns(coef_acc, g, columns.num_positives, k);
  }
  auto grad_hidden = at::empty({n_examples, dim}, h.options());
  at::Tensor rows, grad_weight, grad_bias;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(),
                                  "sampled_loss_backward_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* hp = h.const_data_ptr<scalar_t>();
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    const int64_t h_stride = h.stride(0), w_stride = w.stride(0);
    const int64_t* np = neg.const_data_ptr<int64_t>();
    const acc_t* cp = scaled.const_data_ptr<acc_t>();
    const acc_t* gp = g.const_data_ptr<acc_t>();
    const int64_t g_stride = g.dim() == 0 ? 0 : 1;
    const auto coef_at = [&](int64_t i, int64_t j) {
      return shared ? cp[i * cols + j] : cp[i * cols + j] * gp[i * g_stride];
    };
    scalar_t* ghp = grad_hidden.mutable_data_ptr<scalar_t>();

    // Shared negatives: dL/dH = C_neg W_n and dL/dW_n = C_neg^T H are two GEMMs.
    at::Tensor hidden_from_negs, grad_wn, grad_bn;
    if (shared) {
      const auto c_neg = scaled.narrow(1, columns.num_positives, k);
      hidden_from_negs = at::mm(c_neg, w.index_select(0, neg).to(acc_dtype)).contiguous();
      if (mode != WeightGrad::kNone) {
        grad_wn = at::mm(c_neg.t(), h.to(acc_dtype)).contiguous();
        grad_bn = neg_bias_grad;
      }
    }

    // The weight gradient's entries, in order: per example, e = i * own + m is the m-th column
    // example i gathers itself (columns.h: positives, sampled negatives unless shared, hard
    // negatives); with shared negatives, entries N * own .. N * own + k - 1 are their GEMM rows.
    // visit(e, row) with row -1 where it touches nothing: an ignored example (no valid
    // positive), padding, or a zero coefficient (dropped hits).
    const int64_t own = columns.per_example();
    const int64_t num_entries = n_examples * own + (shared ? k : 0);
    const auto entry_row = [&](int64_t i, int64_t m) {
      const int64_t j = columns.own_column(m);
      const int64_t c = columns.class_of(i, j);
      return columns.padding(j, c) || coef_at(i, j) == 0 ? int64_t{-1} : c;
    };
    const auto for_each_entry = [&](const auto& visit) {
      for (int64_t i = 0; i < n_examples; ++i) {
        const bool ignored = columns.valid_positives(i) == 0;
        for (int64_t m = 0; m < own; ++m) visit(i * own + m, ignored ? -1 : entry_row(i, m));
      }
      if (shared) {
        for (int64_t j = 0; j < k; ++j) visit(n_examples * own + j, np[j]);
      }
    };
    // One thread or little work: per example, its entries are added straight into the zeroed
    // output rows right after its grad_hidden, in entry order. These are the additions the
    // row-sorted path (sum_rows) makes, in the same order, so the result is bitwise the same
    // without sorting the entries or a row accumulator (for acc_t == scalar_t).
    const bool serial =
        std::is_same_v<scalar_t, acc_t> && mode != WeightGrad::kNone &&
        (at::get_num_threads() == 1 || num_entries * dim <= kSerialScatterWork);

    std::optional<TouchedRows> touched;
    if (mode == WeightGrad::kRows) {
      touched.emplace(num_rows);
      for_each_entry([&](int64_t, int64_t r) {
        if (r >= 0) touched->mark(r);
      });
      const int64_t num_touched = touched->count();
      rows = at::empty({num_touched}, tgt.options());
      touched->list(rows.mutable_data_ptr<int64_t>());
      grad_weight = empty_reused({num_touched, dim}, w.options());
      grad_bias = at::empty({has_bias ? num_touched : 0}, w.options());
    } else if (mode == WeightGrad::kDense) {
      rows = at::empty({0}, tgt.options());
      grad_weight = empty_reused({num_rows, dim}, w.options());
      grad_bias = at::empty({has_bias ? num_rows : 0}, w.options());
    }
    scalar_t* gwp = nullptr;
    scalar_t* gbp = nullptr;
    if (mode != WeightGrad::kNone) {
      gwp = grad_weight.mutable_data_ptr<scalar_t>();
      gbp = has_bias ? grad_bias.mutable_data_ptr<scalar_t>() : nullptr;
      if (serial) {
        std::fill_n(gwp, grad_weight.numel(), scalar_t(0));
        if (gbp != nullptr) std::fill_n(gbp, grad_bias.numel(), scalar_t(0));
      }
    }
    const TouchedRows* touched_rows = touched ? &*touched : nullptr;
    const bool scatter_per_example = serial && !shared;

    at::parallel_for(0, n_examples, scatter_per_example ? n_examples : grain_for(cols * dim),
                     [&](int64_t begin, int64_t end) {
      std::vector<acc_t> acc(dim), coefs(own);
      std::vector<int64_t> example_rows(own), out_rows(own);
      // Local copies: the stores below could alias the captured values, which the loop would
      // then reload from memory on every entry.
      const Columns cols_of = columns;
      const int64_t num_cols = cols, num_own = own;
      const acc_t* const coef_rows = cp;
      const acc_t* const grad_rows = gp;
      for (int64_t i = begin; i < end; ++i) {
        // The rows with a non-zero coefficient, in entry order (a zero one is never read); an
        // ignored example has none. c is coef_at(i, j), computed the same way.
        int64_t m = 0;
        const acc_t* c_row = coef_rows + i * num_cols;
        const acc_t g_i = shared ? acc_t(1) : grad_rows[i * g_stride];
        const int64_t gathered = cols_of.valid_positives(i) == 0 ? 0 : num_own;
        for (int64_t o = 0; o < gathered; ++o) {
          const int64_t j = cols_of.own_column(o);
          const acc_t c = shared ? c_row[j] : c_row[j] * g_i;
          if (c == 0) continue;
          const int64_t row = cols_of.class_of(i, j);
          if (cols_of.padding(j, row)) continue;
          example_rows[m] = row;
          coefs[m++] = c;
        }
        if (shared) {
          load_row(hidden_from_negs.const_data_ptr<acc_t>() + i * dim, acc.data(), dim);
        } else {
          std::fill(acc.begin(), acc.end(), acc_t(0));
        }
        axpy_rows(wp, w_stride, example_rows.data(), coefs.data(), m, acc.data(), dim);
        store_row(acc.data(), ghp + i * dim, dim);
        if (scatter_per_example) {
          for (int64_t j = 0; j < m; ++j) {
            out_rows[j] = touched_rows != nullptr ? touched_rows->index(example_rows[j])
                                                 : example_rows[j];
          }
          scatter_rows(hp + i * h_stride, out_rows.data(), coefs.data(), m, gwp, gbp, dim);
        }
      }
    });
    if (mode == WeightGrad::kNone || scatter_per_example) return;

    std::vector<int64_t> entry_rows(num_entries);
    for_each_entry([&](int64_t e, int64_t r) { entry_rows[e] = r; });
    const auto add_entries = [&](const auto& add_entry) {
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        if (serial) return scatter_entries(entry_rows, touched_rows, dim, gwp, gbp, add_entry);
      }
      sum_rows<scalar_t, acc_t>(EntriesByRow(entry_rows, num_rows), touched_rows, dim, gwp, gbp,
                                add_entry);
    };
    const int64_t first_gemm_entry = n_examples * own;
    const acc_t* gwn = shared ? grad_wn.const_data_ptr<acc_t>() : nullptr;
    const acc_t* gbn = shared ? grad_bn.const_data_ptr<acc_t>() : nullptr;
    add_entries([&](int64_t e, acc_t* acc) {
      if (e >= first_gemm_entry) {
        axpy(acc_t(1), gwn + (e - first_gemm_entry) * dim, acc, dim);
        return gbn[e - first_gemm_entry];
      }
      const int64_t i = e / own;
      const acc_t c = coef_at(i, columns.own_column(e - i * own));
      axpy(c, hp + i * h_stride, acc, dim);
      return c;
    });
  });
  return {grad_hidden, rows, grad_weight, grad_bias};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> sampled_loss_backward_cpu(
    const at::Tensor& grad_loss, const at::Tensor& coef, const at::Tensor& hidden,
    const at::Tensor& weight, bool has_bias, const at::Tensor& target,
    const at::Tensor& negatives, const std::optional<at::Tensor>& hard_negatives,
    int64_t ignore_index) {
  auto g = backward_cpu(grad_loss, coef, hidden, weight, has_bias, target, negatives,
                        hard_negatives, ignore_index, WeightGrad::kDense);
  return {g.hidden, g.weight, g.bias};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sampled_loss_backward_rows_cpu(
    const at::Tensor& grad_loss, const at::Tensor& coef, const at::Tensor& hidden,
    const at::Tensor& weight, bool has_bias, const at::Tensor& target,
    const at::Tensor& negatives, const std::optional<at::Tensor>& hard_negatives,
    int64_t ignore_index) {
  auto g = backward_cpu(grad_loss, coef, hidden, weight, has_bias, target, negatives,
                        hard_negatives, ignore_index, WeightGrad::kRows);
  return {g.hidden, g.rows, g.weight, g.bias};
}

at::Tensor sampled_loss_backward_hidden_cpu(const at::Tensor& grad_loss, const at::Tensor& coef,
                                            const at::Tensor& hidden, const at::Tensor& weight,
                                            const at::Tensor& target,
                                            const at::Tensor& negatives,
                                            const std::optional<at::Tensor>& hard_negatives,
                                            int64_t ignore_index) {
  return backward_cpu(grad_loss, coef, hidden, weight, false, target, negatives, hard_negatives,
                      ignore_index, WeightGrad::kNone)
      .hidden;
}

TORCH_LIBRARY_IMPL(fused_nce, CPU, m) {
  m.impl("sampled_loss_forward", &sampled_loss_forward_cpu);
  m.impl("sampled_loss_backward", &sampled_loss_backward_cpu);
  m.impl("sampled_loss_backward_rows", &sampled_loss_backward_rows_cpu);
  m.impl("sampled_loss_backward_hidden", &sampled_loss_backward_hidden_cpu);
  m.impl("alias_build", &alias_build_cpu);
  m.impl("alias_sample", &alias_sample_cpu);
}

}  // namespace fused_nce
