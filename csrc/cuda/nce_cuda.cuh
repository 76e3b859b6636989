// What the loss kernels (nce_cuda.cu) and the weight-gradient scatter (nce_scatter_cuda.cu) share:
// the description of one call, a lane's register tile over a row, and the scatter entry points.
#pragma once

#include <ATen/ATen.h>

#include <limits>

#include "../checks.h"
#include "cuda_common.cuh"

namespace fused_nce {
namespace cuda {

// Everything a kernel needs to know about one call: its columns (../columns.h: T positives, k
// sampled negatives, [N, k] or shared [k], and h hard negatives). Rows of hidden and weight have
// unit stride along D and any row stride (a sliced weight is read in place, never copied).
template <typename scalar_t>
struct Problem {
  const scalar_t* hidden;
  const scalar_t* weight;
  const scalar_t* bias;  // null without bias
  Columns cols;
  int64_t n, dim, num_classes, hidden_stride, weight_stride;

  __device__ __forceinline__ int64_t columns() const { return cols.count(); }
  __device__ __forceinline__ int64_t column_class(int64_t i, int64_t j) const {
    return cols.class_of(i, j);
  }
  // An example with no valid positive: loss 0, no gradient.
  __device__ __forceinline__ bool ignored(int64_t i) const { return cols.valid_positives(i) == 0; }
  // A class index out of range is reported and then never used as an address.
  __device__ __forceinline__ bool valid(int64_t c) const {
    const bool ok = c >= 0 && c < num_classes;
    CUDA_KERNEL_ASSERT(ok && "fused_nce: class index outside [0, V)");
    return ok;
  }
  __device__ __forceinline__ const scalar_t* hidden_row(int64_t i) const {
    return hidden + i * hidden_stride;
  }
  __device__ __forceinline__ const scalar_t* weight_row(int64_t c) const {
    return weight + c * weight_stride;
  }
};

// `hard` may be undefined (no hard negatives).
template <typename scalar_t>
Problem<scalar_t> make_problem(const at::Tensor& h, const at::Tensor& w, const at::Tensor& b,
                               const at::Tensor& tgt, const at::Tensor& neg,
                               const at::Tensor& hard, int64_t ignore_index) {
  return Problem<scalar_t>{h.const_data_ptr<scalar_t>(),
                           w.const_data_ptr<scalar_t>(),
                           b.defined() ? b.const_data_ptr<scalar_t>() : nullptr,
                           make_columns(tgt, neg, hard, ignore_index),
                           h.size(0),
                           h.size(1),
                           w.size(0),
                           h.stride(0),
                           w.stride(0)};
}

// Calls visit(c, row) for each of the first `columns` columns example i gathers itself
// (Columns::own_column: all but shared negatives) whose coefficient c = g * coef[i, j] is
// non-zero and whose class is valid (not padding), on every lane in the same order: lanes load
// 32 (coefficient, class) pairs at a time and pass them round by shuffles, so each is read once.
// All 32 lanes must call it.
template <typename scalar_t, typename acc_t, typename Visit>
__device__ __forceinline__ void for_each_column(const Problem<scalar_t>& p, int64_t i,
                                                int64_t columns, acc_t g,
                                                const acc_t* __restrict__ coef, int lane,
                                                const Visit& visit) {
  const int64_t stride = p.columns();
  for (int64_t j0 = 0; j0 < columns; j0 += kWarpSize) {
    const int64_t own = j0 + lane;
    acc_t my_c = 0;
    int64_t my_row = 0;
    if (own < columns) {
      const int64_t j = p.cols.own_column(own);
      const int64_t c = p.column_class(i, j);
      my_c = g * coef[i * stride + j];
      if (my_c != 0 && !p.cols.padding(j, c) && p.valid(c)) {
        my_row = c;
      } else {
        my_c = 0;
      }
    }
    const int count = static_cast<int>(columns - j0 < kWarpSize ? columns - j0 : kWarpSize);
    for (int m = 0; m < count; ++m) {
      const acc_t c = __shfl_sync(kFullMask, my_c, m);
      const int64_t row = __shfl_sync(kFullMask, my_row, m);
      if (c != 0) visit(c, row);
    }
  }
}

// Widest vector for hidden and weight rows (their bases and row strides) and, where rows of D
// elements are written (gradients), for rows of `out_stride` elements.
template <typename scalar_t>
int problem_vector_width(const at::Tensor& h, const at::Tensor& w, int64_t out_stride = 0) {
  return vector_width<scalar_t>({h.const_data_ptr(), w.const_data_ptr()},
                                {h.stride(0), w.stride(0), out_stride});
}

// VEC elements of a row as acc_t: one vector load when `aligned`, else one element at a time
// (float32 / float64 work rows such as GEMM outputs, whose row length need not be a multiple of
// VEC).
template <int VEC, typename acc_t, typename T>
__device__ __forceinline__ void load_vec_if(const T* p, bool aligned, acc_t (&out)[VEC]) {
  if (aligned) {
    load_vec<VEC>(p, out);
  } else {
#pragma unroll
    for (int e = 0; e < VEC; ++e) out[e] = static_cast<acc_t>(p[e]);
  }
}

// Sums terms c * row over a warp, a register tile at a time: each lane keeps up to kTileVecs
// vectors of the result in registers, so each term's coefficient and row address are read once
// per tile, and the kTileVecs loads of a term are independent (in flight together).
// `terms(add)` must call `add(c, row, aligned)` for every term, in the same order on every lane
// (rows of scalar_t or acc_t; `aligned`: the row allows VEC-wide loads; a zero c skips the
// loads). `store(acc, offset)` writes VEC results at element `offset`; the last dim % VEC
// elements go through `store_one(value, offset)`.
template <int VEC, typename acc_t, typename Terms, typename Store, typename StoreOne>
__device__ __forceinline__ void sum_row_terms(int64_t dim, int lane, const Terms& terms,
                                              const Store& store, const StoreOne& store_one) {
  const int64_t num_vecs = dim / VEC;
  for (int64_t v0 = 0; v0 < num_vecs; v0 += kWarpSize * kTileVecs) {
    acc_t acc[kTileVecs][VEC];
#pragma unroll
    for (int u = 0; u < kTileVecs; ++u) {
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc[u][e] = 0;
    }
    terms([&](acc_t c, const auto* row, bool aligned) {
      if (c == 0) return;
#pragma unroll
      for (int u = 0; u < kTileVecs; ++u) {
        const int64_t v = v0 + lane + u * kWarpSize;
        if (v >= num_vecs) break;
        acc_t x[VEC];
        load_vec_if<VEC>(row + v * VEC, aligned, x);
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[u][e] += c * x[e];
      }
    });
#pragma unroll
    for (int u = 0; u < kTileVecs; ++u) {
      const int64_t v = v0 + lane + u * kWarpSize;
      if (v < num_vecs) store(acc[u], v * VEC);
    }
  }
  // The tail: fewer than VEC <= 16 elements, at most one per lane.
  const int64_t d = num_vecs * VEC + lane;
  if (num_vecs * VEC < dim) {
    acc_t acc = 0;
    terms([&](acc_t c, const auto* row, bool) {
      if (c != 0 && d < dim) acc += c * static_cast<acc_t>(row[d]);
    });
    if (d < dim) store_one(acc, d);
  }
}

// ---- The weight-gradient scatter (nce_scatter_cuda.cu) ----

// Inputs of the scatter, as backward prepared them: hidden / weight with unit stride along D,
// contiguous indices, coef [N, T + k + h] and grad_loss [N] in the accumulation dtype (hard
// undefined without hard negatives). With shared negatives, `shared_rows` [k, D] (float32 /
// float64) holds each negative's gradient row up to the factor `col_scale` [k] (undefined: 1) and
// `shared_bias` [k] its bias gradient.
struct ScatterInputs {
  at::Tensor hidden, weight, target, negatives, hard, coef, grad_loss;
  at::Tensor shared_rows, col_scale, shared_bias;
  int64_t ignore_index;
  bool has_bias;
};

// The sorted scatter keys rows and entries with int32 (chunk and run counts stay below
// num_entries + num_entries / 256 + 1): checked before any work.
inline void check_sorted_limits(int64_t num_classes, int64_t num_entries) {
  TORCH_CHECK_VALUE(num_classes < std::numeric_limits<int32_t>::max() &&
                        num_entries < std::numeric_limits<int32_t>::max() / 2,
                    "at most 2^31 - 2 classes and 2^30 entries (N * (T + k + h)) are supported on "
                    "CUDA with float16 / bfloat16, shared negatives, deterministic algorithms or "
                    "sparse_grad; got V = ", num_classes, " and ", num_entries, " entries");
}

// Adds every entry into zero-filled dense grad_weight [V, D] / grad_bias [V] by atomics
// (float32 / float64, per-example negatives).
void scatter_atomic(const ScatterInputs& in, at::Tensor& grad_weight, at::Tensor& grad_bias);

// Sums each touched row's entries in a fixed order (bitwise reproducible). Dense: writes the
// touched rows of zero-filled grad_weight / grad_bias. Compact: returns (rows ascending,
// grad_weight[rows], grad_bias[rows]).
std::tuple<at::Tensor, at::Tensor, at::Tensor> scatter_sorted(const ScatterInputs& in,
                                                              bool compact,
                                                              at::Tensor grad_weight,
                                                              at::Tensor grad_bias);

}  // namespace cuda
}  // namespace fused_nce
