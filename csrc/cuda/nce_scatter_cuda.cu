// The weight / bias gradients of the sampled losses on CUDA, written into the touched rows only.
// Atomic: one warp per example adds its rows' contributions (float32 / float64; 16-byte vector
// reductions on sm_90). Sorted: entries are sorted by row, each row's entries are cut into chunks
// of a fixed size so that a hot row (a frequent class: thousands of entries per batch) is summed
// by many warps; a row's chunk sums are then added in chunk order. The result does not depend on
// scheduling (bitwise reproducible), which bfloat16 / float16 (no rounding per addition), shared
// negatives, deterministic mode and sparse rows need.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <cub/cub.cuh>

#include <limits>

#include "nce_cuda.cuh"

namespace fused_nce {
namespace cuda {
namespace {

// VEC float atomics at p (aligned to VEC floats): one vector reduction on sm_90.
template <int VEC, typename T>
__device__ __forceinline__ void atomic_add_vec(T* p, const T (&x)[VEC]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  constexpr bool kVector = std::is_same_v<T, float> && (VEC == 4 || VEC == 2);
  if constexpr (kVector && VEC == 4) {
    asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};" ::"l"(p), "f"(x[0]), "f"(x[1]),
                 "f"(x[2]), "f"(x[3])
                 : "memory");
  } else if constexpr (kVector) {
    asm volatile("red.global.add.v2.f32 [%0], {%1, %2};" ::"l"(p), "f"(x[0]), "f"(x[1])
                 : "memory");
  } else {
#pragma unroll
    for (int e = 0; e < VEC; ++e) atomicAdd(p + e, x[e]);
  }
#else
#pragma unroll
  for (int e = 0; e < VEC; ++e) atomicAdd(p + e, x[e]);
#endif
}

// One warp per example: grad_weight[c_j] += grad_loss[i] coef[i, j] h_i. The lane's share of h_i
// stays in registers while the example's T + k + h rows are visited (for_each_column).
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kWarpsPerBlock* kWarpSize)
    scatter_atomic_kernel(const Problem<scalar_t> p, const scalar_t* __restrict__ coef,
                          const scalar_t* __restrict__ grad_loss,
                          scalar_t* __restrict__ grad_weight,
                          scalar_t* __restrict__ grad_bias) {
  const int64_t i = global_warp();
  if (i >= p.n || p.ignored(i)) return;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t cols = p.columns(), dim = p.dim, num_vecs = dim / VEC;
  const scalar_t g = grad_loss[i];
  const scalar_t* h = p.hidden_row(i);
  const auto for_each_nonzero = [&](const auto& visit) {
    for_each_column(p, i, cols, g, coef, lane, visit);
  };
  for (int64_t v0 = 0; v0 < num_vecs; v0 += kWarpSize * kTileVecs) {
    scalar_t hv[kTileVecs][VEC];
#pragma unroll
    for (int u = 0; u < kTileVecs; ++u) {
      const int64_t v = v0 + lane + u * kWarpSize;
      if (v < num_vecs) load_vec<VEC>(h + v * VEC, hv[u]);
    }
    for_each_nonzero([&](scalar_t c, int64_t row) {
#pragma unroll
      for (int u = 0; u < kTileVecs; ++u) {
        const int64_t v = v0 + lane + u * kWarpSize;
        if (v >= num_vecs) break;
        scalar_t x[VEC];
#pragma unroll
        for (int e = 0; e < VEC; ++e) x[e] = c * hv[u][e];
        atomic_add_vec<VEC>(grad_weight + row * dim + v * VEC, x);
      }
    });
  }
  const int64_t d = num_vecs * VEC + lane;
  if (num_vecs * VEC < dim) {
    const scalar_t hd = d < dim ? h[d] : scalar_t(0);
    for_each_nonzero([&](scalar_t c, int64_t row) {
      if (d < dim) atomicAdd(grad_weight + row * dim + d, c * hd);
    });
  }
  if (grad_bias == nullptr) return;
  for (int64_t j = lane; j < cols; j += kWarpSize) {
    const int64_t row = p.column_class(i, j);
    const scalar_t c = g * coef[i * cols + j];
    if (c != 0 && !p.cols.padding(j, row) && p.valid(row)) atomicAdd(grad_bias + row, c);
  }
}

// Entries are (example, column) pairs, e = i * own + m for the m-th column example i gathers
// itself (Columns::own_column; own = Columns::per_example()); with shared negatives N * own + j is
// the shared negative j (its gradient row comes from a GEMM). Key = the row an entry adds to, or
// V for entries that add nothing (ignored examples, padding, zero coefficients, bad indices).
template <typename scalar_t>
__global__ void entry_keys_kernel(const Problem<scalar_t> p,
                                  const acc_type<scalar_t>* __restrict__ coef,
                                  const acc_type<scalar_t>* __restrict__ grad_loss,
                                  int64_t num_entries, int32_t* __restrict__ keys,
                                  int32_t* __restrict__ entries) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= num_entries) return;
  int64_t row;
  const int64_t own = p.cols.per_example();
  if (e >= p.n * own) {
    row = p.cols.negatives[e - p.n * own];
  } else {
    const int64_t i = e / own, j = p.cols.own_column(e % own);
    const bool zero = grad_loss[i] * coef[i * p.columns() + j] == 0;
    const int64_t cls = p.column_class(i, j);
    row = (zero || p.cols.padding(j, cls) || p.ignored(i)) ? p.num_classes : cls;
  }
  if (row != p.num_classes && !p.valid(row)) row = p.num_classes;
  keys[e] = static_cast<int32_t>(row);
  entries[e] = static_cast<int32_t>(e);
}

// Entries per chunk: a warp sums at most this many entries of one row.
constexpr int kChunk = 256;

__device__ __forceinline__ int32_t chunks_of(int32_t length) {
  return (length + kChunk - 1) / kChunk;
}

// For each run (row): its number of chunks, and of partial sums (runs of one chunk write their
// row directly and need none).
__global__ void run_chunks_kernel(const int32_t* __restrict__ run_lengths,
                                  const int32_t* __restrict__ num_runs, int64_t max_runs,
                                  int32_t* __restrict__ chunk_counts,
                                  int32_t* __restrict__ partial_counts) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= max_runs) return;
  const int32_t chunks = r < *num_runs ? chunks_of(run_lengths[r]) : 0;
  chunk_counts[r] = chunks;
  partial_counts[r] = chunks > 1 ? chunks : 0;
}

// chunk_run[c] = the run chunk c belongs to; total_chunks = their number.
__global__ void chunk_runs_kernel(const int32_t* __restrict__ chunk_counts,
                                  const int32_t* __restrict__ chunk_begin,
                                  const int32_t* __restrict__ num_runs,
                                  int32_t* __restrict__ chunk_run,
                                  int32_t* __restrict__ total_chunks) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int32_t runs = *num_runs;
  if (r >= runs) return;
  for (int32_t m = 0; m < chunk_counts[r]; ++m) {
    chunk_run[chunk_begin[r] + m] = static_cast<int32_t>(r);
  }
  if (r == runs - 1) *total_chunks = chunk_begin[r] + chunk_counts[r];
}

// Where the sorted runs are and where their sums go.
struct Runs {
  const int32_t* keys;      // row of each run (V: entries that add nothing, sorted last)
  const int32_t* lengths;
  const int32_t* starts;    // first sorted entry of each run
  const int32_t* chunk_begin;
  const int32_t* partial_begin;
  const int32_t* chunk_run;
  const int32_t* num_runs;
  const int32_t* total_chunks;
  const int32_t* sorted_entries;
};

// The row gradients of shared negatives (GEMM rows, each times its column scale) and their bias.
template <typename acc_t>
struct SharedRows {
  const acc_t* rows;
  const float* col_scale;  // null: 1
  const acc_t* bias;
};

// One warp per chunk: sums the chunk's entries in sorted (= entry) order. A run of one chunk
// writes its row (row r to out[r] when dense, out[run] when compact); a longer run writes the
// chunk's sum to its partial slot.
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kWarpsPerBlock* kWarpSize)
    sum_chunks_kernel(const Problem<scalar_t> p, const acc_type<scalar_t>* __restrict__ coef,
                      const acc_type<scalar_t>* __restrict__ grad_loss,
                      const SharedRows<acc_type<scalar_t>> shared, const Runs runs, bool compact,
                      acc_type<scalar_t>* __restrict__ partial_rows,
                      acc_type<scalar_t>* __restrict__ partial_bias,
                      scalar_t* __restrict__ grad_weight, scalar_t* __restrict__ grad_bias) {
  using acc_t = acc_type<scalar_t>;
  const int64_t chunk = global_warp();
  if (chunk >= *runs.total_chunks) return;
  const int32_t run = runs.chunk_run[chunk];
  const int64_t row = runs.keys[run];
  if (row >= p.num_classes) return;
  const int lane = threadIdx.x % kWarpSize;
  const int32_t m = static_cast<int32_t>(chunk) - runs.chunk_begin[run];
  const int32_t length = runs.lengths[run];
  const int32_t* entries = runs.sorted_entries + runs.starts[run] + m * kChunk;
  const int32_t count = min(kChunk, length - m * kChunk);
  const int64_t cols = p.columns(), dim = p.dim, own = p.cols.per_example();

  // An entry as (kind, index, coefficient): a hidden row i times c, or shared row j times its
  // column scale.
  const auto entry = [&](int32_t e, int64_t& index, bool& from_shared, acc_t& c, acc_t& bias) {
    from_shared = e >= p.n * own;
    if (from_shared) {
      index = e - p.n * own;
      c = shared.col_scale != nullptr ? static_cast<acc_t>(shared.col_scale[index]) : acc_t(1);
      bias = shared.bias[index];
    } else {
      index = e / own;
      c = grad_loss[index] * coef[index * cols + p.cols.own_column(e % own)];
      bias = c;
    }
  };
  const auto terms = [&](const auto& add) {
    for (int32_t m0 = 0; m0 < count; m0 += kWarpSize) {
      int64_t my_index = 0;
      bool my_shared = false;
      acc_t my_c = 0, unused;
      if (m0 + lane < count) entry(entries[m0 + lane], my_index, my_shared, my_c, unused);
      const int n_here = min(kWarpSize, count - m0);
      for (int q = 0; q < n_here; ++q) {
        const acc_t c = __shfl_sync(kFullMask, my_c, q);
        const int64_t index = __shfl_sync(kFullMask, my_index, q);
        if (__shfl_sync(kFullMask, static_cast<int>(my_shared), q)) {
          add(c, shared.rows + index * dim, dim % VEC == 0);
        } else {
          add(c, p.hidden_row(index), true);
        }
      }
    }
  };
  const bool single = length <= kChunk;
  const int64_t out = compact ? run : row;
  const int64_t slot = single ? 0 : runs.partial_begin[run] + m;
  sum_row_terms<VEC, acc_t>(
      dim, lane, terms,
      [&](const acc_t(&acc)[VEC], int64_t d) {
        if (single) {
          store_vec<VEC>(acc, grad_weight + out * dim + d);
        } else {
          store_vec<VEC>(acc, partial_rows + slot * dim + d);
        }
      },
      [&](acc_t value, int64_t d) {
        if (single) {
          grad_weight[out * dim + d] = static_cast<scalar_t>(value);
        } else {
          partial_rows[slot * dim + d] = value;
        }
      });
  if (grad_bias == nullptr) return;
  acc_t bias_acc = 0;
  for (int32_t q = lane; q < count; q += kWarpSize) {
    int64_t index;
    bool from_shared;
    acc_t c, bias;
    entry(entries[q], index, from_shared, c, bias);
    bias_acc += bias;
  }
  bias_acc = warp_sum(bias_acc);
  if (lane == 0) {
    if (single) {
      grad_bias[out] = static_cast<scalar_t>(bias_acc);
    } else {
      partial_bias[slot] = bias_acc;
    }
  }
}

// One warp per run of several chunks: adds the chunks' partial sums in chunk order.
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kWarpsPerBlock* kWarpSize)
    sum_partials_kernel(int64_t num_classes, int64_t dim, const Runs runs, bool compact,
                        const acc_type<scalar_t>* __restrict__ partial_rows,
                        const acc_type<scalar_t>* __restrict__ partial_bias,
                        scalar_t* __restrict__ grad_weight, scalar_t* __restrict__ grad_bias) {
  using acc_t = acc_type<scalar_t>;
  const int64_t run = global_warp();
  if (run >= *runs.num_runs) return;
  const int32_t chunks = chunks_of(runs.lengths[run]);
  const int64_t row = runs.keys[run];
  if (chunks <= 1 || row >= num_classes) return;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t first = runs.partial_begin[run];
  const int64_t out = compact ? run : row;
  const auto terms = [&](const auto& add) {
    for (int32_t m = 0; m < chunks; ++m) add(acc_t(1), partial_rows + (first + m) * dim, true);
  };
  sum_row_terms<VEC, acc_t>(
      dim, lane, terms,
      [&](const acc_t(&acc)[VEC], int64_t d) { store_vec<VEC>(acc, grad_weight + out * dim + d); },
      [&](acc_t value, int64_t d) { grad_weight[out * dim + d] = static_cast<scalar_t>(value); });
  if (grad_bias != nullptr && lane == 0) {
    acc_t bias_acc = 0;
    for (int32_t m = 0; m < chunks; ++m) bias_acc += partial_bias[first + m];
    grad_bias[out] = static_cast<scalar_t>(bias_acc);
  }
}

int end_bit_for(int64_t max_key) {
  int bits = 1;
  while ((int64_t{1} << bits) <= max_key) ++bits;
  return bits;
}

// Runs a cub device algorithm: the first call sizes its scratch memory, the second does the work.
template <typename F>
void run_cub(const at::Tensor& like, const F& f) {
  size_t bytes = 0;
  C10_CUDA_CHECK(f(nullptr, bytes));
  // Never a null pointer: cub would take it for another size query and do nothing.
  auto temp = scratch_bytes(std::max<size_t>(bytes, 1), like);
  C10_CUDA_CHECK(f(temp.data_ptr(), bytes));
}

constexpr int kThreads = 256;

inline unsigned blocks_for(int64_t items) {
  return static_cast<unsigned>((std::max<int64_t>(items, 1) + kThreads - 1) / kThreads);
}

}  // namespace

void scatter_atomic(const ScatterInputs& in, at::Tensor& grad_weight, at::Tensor& grad_bias) {
  const int64_t n = in.hidden.size(0), dim = in.hidden.size(1);
  if (n == 0) return;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(in.hidden.scalar_type(), "scatter_atomic", [&] {
    const auto problem = make_problem<scalar_t>(in.hidden, in.weight, at::Tensor(), in.target,
                                                in.negatives, in.hard, in.ignore_index);
    const int width = vector_width<scalar_t>(
        {in.hidden.const_data_ptr(), grad_weight.const_data_ptr()}, {in.hidden.stride(0), dim});
    with_vector_width<scalar_t>(width, [&](auto vec) {
      scatter_atomic_kernel<scalar_t, decltype(vec)::value>
          <<<warp_grid(n), kWarpsPerBlock * kWarpSize, 0, stream>>>(
              problem, in.coef.const_data_ptr<scalar_t>(), in.grad_loss.const_data_ptr<scalar_t>(),
              grad_weight.mutable_data_ptr<scalar_t>(),
              in.has_bias ? grad_bias.mutable_data_ptr<scalar_t>() : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> scatter_sorted(const ScatterInputs& in,
                                                              bool compact,
                                                              at::Tensor grad_weight,
                                                              at::Tensor grad_bias) {
  const auto& h = in.hidden;
  const int64_t n = h.size(0), dim = h.size(1), k = in.negatives.size(-1);
  const int64_t num_classes = in.weight.size(0);
  const bool shared = in.negatives.dim() == 1;
  const int64_t own = make_columns(in.target, in.negatives, in.hard, in.ignore_index).per_example();
  const int64_t num_entries = n * own + (shared ? k : 0);
  check_sorted_limits(num_classes, num_entries);
  const auto index_opts = in.target.options();
  if (num_entries == 0) {
    if (compact) {
      return {at::empty({0}, index_opts), at::empty({0, dim}, h.options()),
              at::empty({0}, h.options())};
    }
    return {at::empty({0}, index_opts), grad_weight, grad_bias};
  }
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const auto int_opts = index_opts.dtype(at::kInt);
  const int n_items = static_cast<int>(num_entries);
  // At most one run per touched row plus the run of entries that add nothing.
  const int64_t max_runs = std::min<int64_t>(num_entries, num_classes + 1);
  const int64_t max_chunks = max_runs + num_entries / kChunk + 1;
  // Only runs longer than a chunk have partial sums: at most 2 * num_entries / kChunk.
  const int64_t max_partials = 2 * num_entries / kChunk + 1;

  auto keys = at::empty({num_entries}, int_opts), entries = at::empty({num_entries}, int_opts);
  auto sorted_keys = at::empty_like(keys), sorted_entries = at::empty_like(entries);
  auto run_keys = at::empty({max_runs}, int_opts), run_lengths = at::zeros({max_runs}, int_opts);
  auto run_starts = at::empty({max_runs}, int_opts);
  auto chunk_counts = at::empty({max_runs}, int_opts);
  auto partial_counts = at::empty_like(chunk_counts);
  auto chunk_begin = at::empty_like(chunk_counts), partial_begin = at::empty_like(chunk_counts);
  auto chunk_run = at::empty({max_chunks}, int_opts);
  auto counters = at::zeros({2}, int_opts);  // number of runs, number of chunks
  int32_t* num_runs = counters.mutable_data_ptr<int32_t>();
  int32_t* total_chunks = num_runs + 1;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "scatter_sorted", [&] {
    using acc_t = acc_type<scalar_t>;
    const auto problem = make_problem<scalar_t>(h, in.weight, at::Tensor(), in.target,
                                                in.negatives, in.hard, in.ignore_index);
    entry_keys_kernel<scalar_t><<<blocks_for(num_entries), kThreads, 0, stream>>>(
        problem, in.coef.const_data_ptr<acc_t>(), in.grad_loss.const_data_ptr<acc_t>(),
        num_entries, keys.mutable_data_ptr<int32_t>(), entries.mutable_data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });

  // Sort the entries by row (stable: within a row, entry order), then find the runs of each row.
  const int end_bit = end_bit_for(num_classes);
  run_cub(keys, [&](void* temp, size_t& bytes) {
    return cub::DeviceRadixSort::SortPairs(
        temp, bytes, keys.const_data_ptr<int32_t>(), sorted_keys.mutable_data_ptr<int32_t>(),
        entries.const_data_ptr<int32_t>(), sorted_entries.mutable_data_ptr<int32_t>(), n_items, 0,
        end_bit, stream);
  });
  run_cub(keys, [&](void* temp, size_t& bytes) {
    return cub::DeviceRunLengthEncode::Encode(
        temp, bytes, sorted_keys.const_data_ptr<int32_t>(), run_keys.mutable_data_ptr<int32_t>(),
        run_lengths.mutable_data_ptr<int32_t>(), num_runs, n_items, stream);
  });
  const auto exclusive_sum = [&](const at::Tensor& x, at::Tensor& out) {
    run_cub(keys, [&](void* temp, size_t& bytes) {
      return cub::DeviceScan::ExclusiveSum(temp, bytes, x.const_data_ptr<int32_t>(),
                                           out.mutable_data_ptr<int32_t>(),
                                           static_cast<int>(max_runs), stream);
    });
  };
  exclusive_sum(run_lengths, run_starts);
  run_chunks_kernel<<<blocks_for(max_runs), kThreads, 0, stream>>>(
      run_lengths.const_data_ptr<int32_t>(), num_runs, max_runs,
      chunk_counts.mutable_data_ptr<int32_t>(), partial_counts.mutable_data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  exclusive_sum(chunk_counts, chunk_begin);
  exclusive_sum(partial_counts, partial_begin);
  chunk_runs_kernel<<<blocks_for(max_runs), kThreads, 0, stream>>>(
      chunk_counts.const_data_ptr<int32_t>(), chunk_begin.const_data_ptr<int32_t>(), num_runs,
      chunk_run.mutable_data_ptr<int32_t>(), total_chunks);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  at::Tensor rows = at::empty({0}, index_opts);
  if (compact) {
    // The number of touched rows sizes the outputs: the one place this path waits.
    const int64_t runs = counters[0].item<int32_t>();
    const bool has_dropped =
        runs > 0 && run_keys[runs - 1].item<int32_t>() == static_cast<int32_t>(num_classes);
    const int64_t touched = runs - (has_dropped ? 1 : 0);
    rows = run_keys.narrow(0, 0, touched).to(at::kLong);
    grad_weight = at::empty({touched, dim}, h.options());
    grad_bias = at::empty({in.has_bias ? touched : 0}, h.options());
  }

  const auto acc_dtype = h.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto partial_rows = at::empty({max_partials, dim}, h.options().dtype(acc_dtype));
  auto partial_bias = at::empty({in.has_bias ? max_partials : 0}, h.options().dtype(acc_dtype));
  const Runs runs{run_keys.const_data_ptr<int32_t>(),     run_lengths.const_data_ptr<int32_t>(),
                  run_starts.const_data_ptr<int32_t>(),   chunk_begin.const_data_ptr<int32_t>(),
                  partial_begin.const_data_ptr<int32_t>(), chunk_run.const_data_ptr<int32_t>(),
                  num_runs,                               total_chunks,
                  sorted_entries.const_data_ptr<int32_t>()};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "scatter_sorted", [&] {
    using acc_t = acc_type<scalar_t>;
    const auto problem = make_problem<scalar_t>(h, in.weight, at::Tensor(), in.target,
                                                in.negatives, in.hard, in.ignore_index);
    const SharedRows<acc_t> shared_rows{
        shared ? in.shared_rows.const_data_ptr<acc_t>() : nullptr,
        in.col_scale.defined() ? in.col_scale.const_data_ptr<float>() : nullptr,
        shared ? in.shared_bias.const_data_ptr<acc_t>() : nullptr};
    // Rows of D elements are written (gradients, partial sums): D must allow the vectors too.
    const int width = vector_width<scalar_t>({h.const_data_ptr()}, {h.stride(0), dim});
    with_vector_width<scalar_t>(width, [&](auto vec) {
      constexpr int VEC = decltype(vec)::value;
      constexpr int kBlock = kWarpsPerBlock * kWarpSize;
      sum_chunks_kernel<scalar_t, VEC><<<warp_grid(max_chunks), kBlock, 0, stream>>>(
          problem, in.coef.const_data_ptr<acc_t>(), in.grad_loss.const_data_ptr<acc_t>(),
          shared_rows, runs, compact, partial_rows.mutable_data_ptr<acc_t>(),
          in.has_bias ? partial_bias.mutable_data_ptr<acc_t>() : nullptr,
          grad_weight.mutable_data_ptr<scalar_t>(),
          in.has_bias ? grad_bias.mutable_data_ptr<scalar_t>() : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      sum_partials_kernel<scalar_t, VEC><<<warp_grid(max_runs), kBlock, 0, stream>>>(
          num_classes, dim, runs, compact, partial_rows.const_data_ptr<acc_t>(),
          in.has_bias ? partial_bias.const_data_ptr<acc_t>() : nullptr,
          grad_weight.mutable_data_ptr<scalar_t>(),
          in.has_bias ? grad_bias.mutable_data_ptr<scalar_t>() : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {rows, grad_weight, grad_bias};
}

}  // namespace cuda
}  // namespace fused_nce
