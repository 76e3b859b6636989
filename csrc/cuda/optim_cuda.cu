// Fused row optimizers on CUDA. SGD, Adagrad and Adam are element-wise once the row is known: a
// flat grid-stride loop over the U x D gradient elements, VEC at a time (16 bytes of state, the
// parameter and gradient in matching vectors), finds each element's row in `rows` and updates the
// parameter and state in place, with float32 math for bfloat16 / float16. Row-wise Adagrad needs a
// reduction over the row first: one warp per row. Rows are checked in the kernels (device-side
// assert: in [0, V) and strictly ascending, hence unique) and a bad one is never dereferenced, so
// nothing waits for the device.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>

#include "../fused_nce.h"
#include "../optim_checks.h"
#include "../optim_math.h"
#include "cuda_common.cuh"

namespace fused_nce {
using namespace cuda;
namespace {

constexpr int kThreads = 256;

// The parameter row of update u, or -1 (after a device-side assert) when rows[u] is bad.
__device__ __forceinline__ int64_t update_row(const int64_t* __restrict__ rows, int64_t u,
                                              int64_t num_rows) {
  if (rows == nullptr) return u;
  const int64_t row = rows[u];
  const bool ok = row >= 0 && row < num_rows && (u == 0 || rows[u - 1] < row);
  CUDA_KERNEL_ASSERT(ok && "fused_nce: rows must be in [0, V) and strictly ascending");
  return ok ? row : -1;
}

template <typename acc_t>
struct SgdRule {
  acc_t lr, weight_decay;
  template <int VEC>
  __device__ __forceinline__ void operator()(int64_t /*offset*/, acc_t (&p)[VEC],
                                             const acc_t (&g)[VEC]) const {
#pragma unroll
    for (int v = 0; v < VEC; ++v) p[v] = sgd_update(p[v], g[v], lr, weight_decay);
  }
};

template <typename acc_t>
struct AdagradRule {
  acc_t* __restrict__ sum;
  acc_t lr, eps;
  template <int VEC>
  __device__ __forceinline__ void operator()(int64_t offset, acc_t (&p)[VEC],
                                             const acc_t (&g)[VEC]) const {
    acc_t s[VEC];
    load_vec<VEC>(sum + offset, s);
#pragma unroll
    for (int v = 0; v < VEC; ++v) p[v] = adagrad_update(p[v], g[v], s[v], lr, eps);
    store_vec<VEC>(s, sum + offset);
  }
};

template <typename acc_t>
struct AdamRule {
  acc_t* __restrict__ exp_avg;
  acc_t* __restrict__ exp_avg_sq;
  acc_t step_size, beta1, beta2, eps;
  template <int VEC>
  __device__ __forceinline__ void operator()(int64_t offset, acc_t (&p)[VEC],
                                             const acc_t (&g)[VEC]) const {
    acc_t m[VEC], v2[VEC];
    load_vec<VEC>(exp_avg + offset, m);
    load_vec<VEC>(exp_avg_sq + offset, v2);
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      p[v] = adam_update(p[v], g[v], m[v], v2[v], step_size, beta1, beta2, eps);
    }
    store_vec<VEC>(m, exp_avg + offset);
    store_vec<VEC>(v2, exp_avg_sq + offset);
  }
};

// Element-wise rules: thread i updates elements [i VEC, (i + 1) VEC) of the U x D gradient.
template <typename scalar_t, int VEC, typename Rule>
__global__ void row_update_kernel(Rule rule, scalar_t* __restrict__ param,
                                  const scalar_t* __restrict__ grad,
                                  const int64_t* __restrict__ rows, int64_t num_rows, int64_t dim,
                                  int64_t num_vectors) {
  using acc_t = acc_type<scalar_t>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < num_vectors;
       i += stride) {
    const int64_t e = i * VEC;
    const int64_t u = e / dim;
    const int64_t row = update_row(rows, u, num_rows);
    if (row < 0) continue;
    const int64_t offset = row * dim + (e - u * dim);
    acc_t p[VEC], g[VEC];
    load_vec<VEC>(param + offset, p);
    load_vec<VEC>(grad + e, g);
    rule(offset, p, g);
    store_vec<VEC>(p, param + offset);
  }
}

// Row-wise Adagrad: one warp per row sums g^2 over the row, updates the row's accumulator, then
// scales the row by the shared denominator.
template <typename scalar_t, int VEC>
__global__ void adagrad_rowwise_kernel(scalar_t* __restrict__ param, acc_type<scalar_t>* sum,
                                       const scalar_t* __restrict__ grad,
                                       const int64_t* __restrict__ rows, int64_t num_rows,
                                       int64_t dim, int64_t num_updates, acc_type<scalar_t> lr,
                                       acc_type<scalar_t> eps) {
  using acc_t = acc_type<scalar_t>;
  const int64_t u = global_warp();
  if (u >= num_updates) return;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t row = update_row(rows, u, num_rows);
  if (row < 0) return;
  const scalar_t* g_row = grad + u * dim;
  scalar_t* p_row = param + row * dim;
  acc_t square_sum = 0;
  for (int64_t j = lane * VEC; j < dim; j += kWarpSize * VEC) {
    acc_t g[VEC];
    load_vec<VEC>(g_row + j, g);
#pragma unroll
    for (int v = 0; v < VEC; ++v) square_sum += g[v] * g[v];
  }
  square_sum = warp_sum(square_sum);
  // Lane 0 reads the accumulator and hands it to the warp before it writes the new value, so no
  // lane can read the updated one.
  acc_t previous = lane == 0 ? sum[row] : acc_t(0);
  previous = __shfl_sync(kFullMask, previous, 0);
  const acc_t row_sum = previous + square_sum / static_cast<acc_t>(dim);
  if (lane == 0) sum[row] = row_sum;
  for (int64_t j = lane * VEC; j < dim; j += kWarpSize * VEC) {
    acc_t g[VEC], p[VEC];
    load_vec<VEC>(g_row + j, g);
    load_vec<VEC>(p_row + j, p);
#pragma unroll
    for (int v = 0; v < VEC; ++v) p[v] = adagrad_row_update(p[v], g[v], row_sum, lr, eps);
    store_vec<VEC>(p, p_row + j);
  }
}

// VEC elements per access: 16 bytes of float32 (float64) state, when every row of every operand
// stays aligned to its vector; else one element at a time.
template <typename scalar_t>
int row_vector_width(int64_t dim, std::initializer_list<const void*> params,
                     std::initializer_list<const void*> states) {
  constexpr int kWide = 16 / sizeof(acc_type<scalar_t>);
  bool aligned = dim % kWide == 0;
  for (const void* p : params) {
    aligned = aligned && reinterpret_cast<uintptr_t>(p) % (kWide * sizeof(scalar_t)) == 0;
  }
  for (const void* p : states) aligned = aligned && reinterpret_cast<uintptr_t>(p) % 16 == 0;
  return aligned ? kWide : 1;
}

template <typename scalar_t, typename Rule>
void launch_row_update(const Rule& rule, const at::Tensor& param, const at::Tensor& grad,
                       const int64_t* rows, int64_t num_rows, int64_t dim, int64_t num_updates,
                       std::initializer_list<const void*> states) {
  const int64_t elements = num_updates * dim;
  if (elements == 0) return;
  scalar_t* p = param.mutable_data_ptr<scalar_t>();
  const scalar_t* g = grad.const_data_ptr<scalar_t>();
  constexpr int kWide = 16 / sizeof(acc_type<scalar_t>);
  const int width = row_vector_width<scalar_t>(dim, {p, g}, states);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  auto launch = [&](auto vec) {
    constexpr int VEC = decltype(vec)::value;
    const int64_t num_vectors = elements / VEC;
    // Grid-stride beyond 2^20 blocks: plenty to fill any GPU.
    const int64_t blocks = std::min<int64_t>((num_vectors + kThreads - 1) / kThreads, 1 << 20);
    row_update_kernel<scalar_t, VEC><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        rule, p, g, rows, num_rows, dim, num_vectors);
  };
  if (width == kWide) {
    launch(std::integral_constant<int, kWide>{});
  } else {
    launch(std::integral_constant<int, 1>{});
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

const int64_t* rows_ptr(const std::optional<at::Tensor>& rows, at::Tensor& holder) {
  if (!rows.has_value()) return nullptr;
  holder = rows->contiguous();
  return holder.const_data_ptr<int64_t>();
}

}  // namespace

void row_sgd_step_cuda(const at::Tensor& param, const std::optional<at::Tensor>& rows,
                       const at::Tensor& grad, double lr, double weight_decay) {
  const RowShape shape = check_row_update(param, rows, grad);
  const int64_t num_rows = shape.num_rows, dim = shape.dim, num_updates = shape.num_updates;
  const c10::cuda::CUDAGuard guard(param.device());
  const auto g = grad.contiguous();
  at::Tensor rows_c;
  const int64_t* r = rows_ptr(rows, rows_c);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, param.scalar_type(), "row_sgd_step",
                                  [&] {
    using acc_t = acc_type<scalar_t>;
    const SgdRule<acc_t> rule{static_cast<acc_t>(lr), static_cast<acc_t>(weight_decay)};
    launch_row_update<scalar_t>(rule, param, g, r, num_rows, dim, num_updates, {});
  });
}

void row_adagrad_step_cuda(const at::Tensor& param, const at::Tensor& state_sum,
                           const std::optional<at::Tensor>& rows, const at::Tensor& grad,
                           double lr, double eps, bool rowwise) {
  const RowShape shape = check_row_update(param, rows, grad);
  const int64_t num_rows = shape.num_rows, dim = shape.dim, num_updates = shape.num_updates;
  if (rowwise) {
    check_state("state_sum", state_sum, param, {num_rows});
  } else {
    check_state("state_sum", state_sum, param, param.sizes());
  }
  const c10::cuda::CUDAGuard guard(param.device());
  const auto g = grad.contiguous();
  at::Tensor rows_c;
  const int64_t* r = rows_ptr(rows, rows_c);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, param.scalar_type(),
                                  "row_adagrad_step", [&] {
    using acc_t = acc_type<scalar_t>;
    acc_t* s = state_sum.mutable_data_ptr<acc_t>();
    if (!rowwise) {
      const AdagradRule<acc_t> rule{s, static_cast<acc_t>(lr), static_cast<acc_t>(eps)};
      launch_row_update<scalar_t>(rule, param, g, r, num_rows, dim, num_updates, {s});
      return;
    }
    if (num_updates == 0 || dim == 0) return;
    scalar_t* p = param.mutable_data_ptr<scalar_t>();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const int width = row_vector_width<scalar_t>(dim, {p, gp}, {});
    const auto stream = c10::cuda::getCurrentCUDAStream();
    auto launch = [&](auto vec) {
      constexpr int VEC = decltype(vec)::value;
      adagrad_rowwise_kernel<scalar_t, VEC>
          <<<warp_grid(num_updates), kWarpsPerBlock * kWarpSize, 0, stream>>>(
              p, s, gp, r, num_rows, dim, num_updates, static_cast<acc_t>(lr),
              static_cast<acc_t>(eps));
    };
    constexpr int kWide = 16 / sizeof(acc_t);
    if (width == kWide) {
      launch(std::integral_constant<int, kWide>{});
    } else {
      launch(std::integral_constant<int, 1>{});
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void row_adam_step_cuda(const at::Tensor& param, const at::Tensor& exp_avg,
                        const at::Tensor& exp_avg_sq, const std::optional<at::Tensor>& rows,
                        const at::Tensor& grad, double step_size, double beta1, double beta2,
                        double eps) {
  const RowShape shape = check_row_update(param, rows, grad);
  const int64_t num_rows = shape.num_rows, dim = shape.dim, num_updates = shape.num_updates;
  check_state("exp_avg", exp_avg, param, param.sizes());
  check_state("exp_avg_sq", exp_avg_sq, param, param.sizes());
  const c10::cuda::CUDAGuard guard(param.device());
  const auto g = grad.contiguous();
  at::Tensor rows_c;
  const int64_t* r = rows_ptr(rows, rows_c);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, param.scalar_type(), "row_adam_step",
                                  [&] {
    using acc_t = acc_type<scalar_t>;
    acc_t* m = exp_avg.mutable_data_ptr<acc_t>();
    acc_t* v = exp_avg_sq.mutable_data_ptr<acc_t>();
    const AdamRule<acc_t> rule{m, v, static_cast<acc_t>(step_size), static_cast<acc_t>(beta1),
                               static_cast<acc_t>(beta2), static_cast<acc_t>(eps)};
    launch_row_update<scalar_t>(rule, param, g, r, num_rows, dim, num_updates, {m, v});
  });
}

TORCH_LIBRARY_IMPL(fused_nce, CUDA, m) {
  m.impl("row_sgd_step", &row_sgd_step_cuda);
  m.impl("row_adagrad_step", &row_adagrad_step_cuda);
  m.impl("row_adam_step", &row_adam_step_cuda);
}

}  // namespace fused_nce
