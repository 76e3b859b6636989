// Fused sampled losses on CUDA. Forward: one warp per example gathers its positive and negative
// rows of W in place with vector loads (never an [N, k, D] tensor), reduces the T + k + h dot
// products and turns them into the loss and dloss/dscore in the same kernel (nce_math.h, shared
// with the CPU).
// Backward: grad_hidden by a second gather; grad_weight / grad_bias into the touched rows only
// (nce_scatter_cuda.cu). Shared negatives go through GEMMs whose low-precision operands are
// written by one fused pass. Indices are checked in the kernels (device-side assert, and a bad
// index is never dereferenced), so nothing waits for the device.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>
#include <torch/version.h>

#include <limits>

#include "../checks.h"
#include "../fused_nce.h"
#include "../nce_math.h"
#include "nce_cuda.cuh"

namespace fused_nce {
using namespace cuda;
namespace {

// ---- Forward ----

struct LossOptions {
  int64_t objective;
  double positive_weight;  // the binary objectives' positive terms (gBCE's beta; 1 otherwise)
  bool remove_accidental_hits;
};

// 4 blocks of 256 threads per SM: at most 64 registers a thread, enough warps in flight to hide
// the latency of the gathers.
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kWarpsPerBlock* kWarpSize, 4)
    forward_kernel(const Problem<scalar_t> p, const float* __restrict__ noise_probs,
                   const acc_type<scalar_t>* __restrict__ log_z,
                   const acc_type<scalar_t>* __restrict__ shared_scores, const LossOptions opt,
                   acc_type<scalar_t>* __restrict__ loss, acc_type<scalar_t>* __restrict__ coef) {
  using acc_t = acc_type<scalar_t>;
  // Rows gathered at once: more independent loads in flight per lane.
  constexpr int kRows = 4;
  const int64_t i = global_warp();
  if (i >= p.n) return;
  const int lane = threadIdx.x % kWarpSize;
  const Columns& c = p.cols;
  const int64_t cols = c.count();
  acc_t* s = coef + i * cols;
  const int64_t num_valid = c.valid_positives(i);
  if (num_valid == 0) {
    // Negatives are checked for every example, ignored ones too, as on the CPU.
    for (int64_t j = c.num_positives + lane; j < cols; j += kWarpSize) {
      const int64_t cls = c.class_of(i, j);
      if (!c.from_gemm(j) && !c.padding(j, cls)) p.valid(cls);
    }
    for (int64_t j = lane; j < cols; j += kWarpSize) s[j] = 0;
    if (lane == 0) loss[i] = 0;
    return;
  }

  // Scores s[j] = <h_i, W[c_j]> + b[c_j] of the columns the example gathers itself (with shared
  // negatives: its positives and hard negatives); padding is not gathered.
  const scalar_t* h = p.hidden_row(i);
  const int64_t gathered = c.per_example();
  const int64_t num_vecs = p.dim / VEC;
  for (int64_t j0 = 0; j0 < gathered; j0 += kRows) {
    int64_t row[kRows];
    acc_t dot[kRows];
#pragma unroll
    for (int u = 0; u < kRows; ++u) {
      const int64_t m = j0 + u;
      const int64_t j = m < gathered ? c.own_column(m) : 0;
      const int64_t cls = m < gathered ? c.class_of(i, j) : -1;
      row[u] = (m < gathered && !c.padding(j, cls) && p.valid(cls)) ? cls : -1;
      dot[u] = 0;
    }
#pragma unroll 2
    for (int64_t v = lane; v < num_vecs; v += kWarpSize) {
      acc_t hv[VEC];
      load_vec<VEC>(h + v * VEC, hv);
#pragma unroll
      for (int u = 0; u < kRows; ++u) {
        if (row[u] < 0) continue;
        acc_t wv[VEC];
        load_vec<VEC>(p.weight_row(row[u]) + v * VEC, wv);
#pragma unroll
        for (int e = 0; e < VEC; ++e) dot[u] += hv[e] * wv[e];
      }
    }
    // The last dim % VEC elements, one per lane.
    const int64_t d = num_vecs * VEC + lane;
    if (d < p.dim) {
      const acc_t hd = static_cast<acc_t>(h[d]);
#pragma unroll
      for (int u = 0; u < kRows; ++u) {
        if (row[u] >= 0) dot[u] += hd * static_cast<acc_t>(p.weight_row(row[u])[d]);
      }
    }
#pragma unroll
    for (int u = 0; u < kRows; ++u) dot[u] = warp_sum(dot[u]);
    if (lane == 0) {
#pragma unroll
      for (int u = 0; u < kRows; ++u) {
        if (j0 + u >= gathered) break;
        const acc_t b = (p.bias != nullptr && row[u] >= 0) ? static_cast<acc_t>(p.bias[row[u]]) : 0;
        s[c.own_column(j0 + u)] = dot[u] + b;
      }
    }
  }
  if (c.shared) {
    // The GEMM gave <h_i, W[n_j]>; the bias is added here rather than in a pass of its own.
    for (int64_t j = lane; j < c.k; j += kWarpSize) {
      const int64_t cls = c.negatives[j];
      const acc_t b = (p.bias != nullptr && p.valid(cls)) ? static_cast<acc_t>(p.bias[cls]) : 0;
      s[c.num_positives + j] = shared_scores[i * c.k + j] + b;
    }
  }
  __syncwarp();

  // Logits, loss and dloss/dscore: lane l takes columns l, l + 32, ... (the CPU's
  // block_loss_and_grad, nce_cpu.cpp, is the same nce_math.h terms, 16 examples at a time).
  const auto dropped = [&](int64_t j) {
    return c.dropped(i, j, c.class_of(i, j), opt.remove_accidental_hits);
  };
  // log q of a positive or sampled negative (a hard negative was not drawn from q: 0).
  const auto log_q = [&](int64_t j) {
    if (noise_probs == nullptr || !(c.positive(j) || c.sampled(j))) return acc_t(0);
    const int64_t cls = c.class_of(i, j);
    return (cls >= 0 && cls < p.num_classes) ? log_noise_prob<acc_t>(noise_probs[cls]) : acc_t(0);
  };
  const bool softmax = opt.objective == kSampledSoftmax;
  // A kept positive's label: 1 / |P| for the softmax, the positive term's weight otherwise.
  const acc_t positive_label =
      softmax ? acc_t(1) / static_cast<acc_t>(num_valid) : static_cast<acc_t>(opt.positive_weight);
  const auto label = [&](int64_t j) { return c.positive(j) ? positive_label : acc_t(0); };
  acc_t example_loss;
  if (softmax) {
    acc_t max_logit = -std::numeric_limits<acc_t>::infinity();
    acc_t positive_logits = 0;
    for (int64_t j = lane; j < cols; j += kWarpSize) {
      if (dropped(j)) continue;
      s[j] -= log_q(j);
      if (s[j] > max_logit) max_logit = s[j];
      positive_logits += label(j) * s[j];
    }
    max_logit = warp_max(max_logit);
    positive_logits = warp_sum(positive_logits);
    __syncwarp();
    acc_t sum = 0;
    for (int64_t j = lane; j < cols; j += kWarpSize) {
      if (!dropped(j)) sum += std::exp(s[j] - max_logit);
    }
    const acc_t lse = max_logit + std::log(warp_sum(sum));
    __syncwarp();
    for (int64_t j = lane; j < cols; j += kWarpSize) {
      s[j] = dropped(j) ? acc_t(0) : softmax_grad(label(j), std::exp(s[j] - lse));
    }
    example_loss = lse - positive_logits;
  } else {
    const acc_t shift = binary_shift(opt.objective, log_z[0], c.k);
    acc_t partial = 0;
    for (int64_t j = lane; j < cols; j += kWarpSize) {
      if (dropped(j)) {
        s[j] = 0;
        continue;
      }
      const acc_t logit = binary_logit(opt.objective, s[j], log_q(j), shift);
      const bool positive = c.positive(j);
      const Term<acc_t> term = binary_term(positive, logit);
      const acc_t weight = positive ? positive_label : acc_t(1);
      partial += weight * term.loss;
      s[j] = weight * term.grad;
    }
    example_loss = warp_sum(partial);
  }
  if (lane == 0) loss[i] = example_loss;
}

// ---- Shared negatives: GEMMs ----

// x @ y with a float32 result (float64 for float64). float32 means float32 here: TF32 is off
// whatever torch.backends.cuda.matmul.allow_tf32 / set_float32_matmul_precision say, as in the
// per-example kernels. float16 / bfloat16 operands go to the tensor cores as they are.
at::Tensor matmul_acc(const at::Tensor& x, const at::Tensor& y) {
  const auto dtype = y.scalar_type();
  if (dtype == at::kFloat) {
    const at::NoTF32Guard no_tf32;
    return at::mm(x, y);
  }
  if (dtype == at::kDouble) return at::mm(x, y);
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 8)
  return at::mm(x, y, at::kFloat);
#else
  const at::NoTF32Guard no_tf32;
  return at::mm(x.to(at::kFloat), y.to(at::kFloat));
#endif
}

// Columns of the [N, k] negative coefficients handled by one block of the passes below, and the
// rows one block walks through.
constexpr int kTileRows = 64;

// Row tiles on x (up to 2^31 - 1 blocks: any N), column tiles on y (up to 65535: k < 2M).
inline dim3 coef_tile_grid(int64_t n, int64_t k) {
  return dim3(static_cast<unsigned>((n + kTileRows - 1) / kTileRows),
              static_cast<unsigned>((k + kWarpSize - 1) / kWarpSize));
}

// Magnitudes are non-negative floats, whose bit patterns order like the values: an integer
// atomicMax is an exact, order-independent float max.
__device__ __forceinline__ void atomic_max_magnitude(float* address, float value) {
  atomicMax(reinterpret_cast<int*>(address), __float_as_int(value));
}

// The negatives' coefficients are columns first .. first + k - 1 of coef [N, cols].
struct NegativeColumns {
  int64_t cols, first;
};

// float16 only (its range is narrow): the largest |grad_loss[i] * coef[i, first + j]| of every
// row and column of the negatives' coefficients. Block = 32 columns x kTileRows rows; a warp takes
// rows warp, warp + 8, ...
__global__ void coef_scales_kernel(const float* __restrict__ coef,
                                   const float* __restrict__ grad_loss, int64_t n, int64_t k,
                                   NegativeColumns layout, float* __restrict__ row_max,
                                   float* __restrict__ col_max) {
  __shared__ float block_col_max[kWarpsPerBlock][kWarpSize];
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int64_t j = static_cast<int64_t>(blockIdx.y) * kWarpSize + lane;
  const int64_t i_end = std::min<int64_t>(n, (static_cast<int64_t>(blockIdx.x) + 1) * kTileRows);
  float my_col_max = 0;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kTileRows + warp; i < i_end;
       i += kWarpsPerBlock) {
    const float v = j < k ? fabsf(grad_loss[i] * coef[i * layout.cols + layout.first + j]) : 0.f;
    my_col_max = fmaxf(my_col_max, v);
    const float tile_row_max = warp_max(v);
    if (lane == 0) atomic_max_magnitude(row_max + i, tile_row_max);
  }
  block_col_max[warp][lane] = my_col_max;
  __syncthreads();
  if (warp == 0 && j < k) {
    float m = 0;
#pragma unroll
    for (int w = 0; w < kWarpsPerBlock; ++w) m = fmaxf(m, block_col_max[w][lane]);
    atomic_max_magnitude(col_max + j, m);
  }
}

// The GEMM operands, in one pass over the coefficients: c_rows[i, j] = grad_loss[i] * coef[i,
// first + j] / row_scale[i] and c_cols[i, j] = the same / col_scale[j], in the GEMM dtype. Without
// scales (null) the value is only cast, and c_cols may be null (then it equals c_rows).
template <typename acc_t, typename gemm_t>
__global__ void gemm_operands_kernel(const acc_t* __restrict__ coef,
                                     const acc_t* __restrict__ grad_loss, int64_t n, int64_t k,
                                     NegativeColumns layout, const float* __restrict__ row_scale,
                                     const float* __restrict__ col_scale,
                                     gemm_t* __restrict__ c_rows, gemm_t* __restrict__ c_cols) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int64_t j = static_cast<int64_t>(blockIdx.y) * kWarpSize + lane;
  if (j >= k) return;
  const int64_t i_end = std::min<int64_t>(n, (static_cast<int64_t>(blockIdx.x) + 1) * kTileRows);
  const float inv_col = col_scale != nullptr ? 1.f / col_scale[j] : 1.f;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kTileRows + warp; i < i_end;
       i += kWarpsPerBlock) {
    const acc_t v = grad_loss[i] * coef[i * layout.cols + layout.first + j];
    if (row_scale == nullptr) {
      c_rows[i * k + j] = static_cast<gemm_t>(v);
    } else {
      c_rows[i * k + j] = static_cast<gemm_t>(static_cast<float>(v) / row_scale[i]);
      c_cols[i * k + j] = static_cast<gemm_t>(static_cast<float>(v) * inv_col);
    }
  }
}

// dL/dH from the negatives, dL/dW_n and dL/db_n with shared negatives:
//   hidden_part = diag(row_scale) (C_rows W_n)    [N, D]
//   rows        = diag(col_scale) (C_cols^T H)     [k, D]
//   bias        = coef_neg^T grad_loss                 [k]
// where C = diag(grad_loss) coef_neg. float16 coefficients are scaled per row and per column so
// that small ones keep their precision instead of flushing to zero; bfloat16 has float32's range
// and is only cast. Scales are undefined tensors when they are 1.
struct SharedGrads {
  at::Tensor hidden_part, row_scale, rows, col_scale, bias;
};

SharedGrads shared_negative_grads(const at::Tensor& coef, const at::Tensor& grad_loss,
                                  const at::Tensor& h, const at::Tensor& w, const at::Tensor& neg,
                                  int64_t first, bool weight_grads) {
  SharedGrads g;
  const int64_t n = h.size(0), k = neg.size(0);
  const NegativeColumns layout{coef.size(1), first};
  const auto acc_dtype = coef.scalar_type();
  const auto gemm_dtype = h.scalar_type();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid = coef_tile_grid(n, k), block(kWarpsPerBlock * kWarpSize);
  // An empty operand needs no scaling (its GEMM is zeros).
  const bool scaled = gemm_dtype == at::kHalf && n > 0 && k > 0;
  auto c_rows = at::empty({n, k}, h.options());
  at::Tensor c_cols;
  if (scaled) {
    const auto f32 = coef.options().dtype(at::kFloat);
    g.row_scale = at::zeros({n}, f32);
    g.col_scale = at::zeros({k}, f32);
    coef_scales_kernel<<<grid, block, 0, stream>>>(
        coef.const_data_ptr<float>(), grad_loss.const_data_ptr<float>(), n, k, layout,
        g.row_scale.mutable_data_ptr<float>(), g.col_scale.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    // An all-zero row or column divides by the smallest normal float instead of by zero.
    g.row_scale.clamp_min_(std::numeric_limits<float>::min());
    g.col_scale.clamp_min_(std::numeric_limits<float>::min());
    c_cols = at::empty({n, k}, h.options());
  }
  if (n > 0 && k > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gemm_dtype, "gemm_operands", [&] {
      using acc_t = acc_type<scalar_t>;
      gemm_operands_kernel<acc_t, scalar_t><<<grid, block, 0, stream>>>(
          coef.const_data_ptr<acc_t>(), grad_loss.const_data_ptr<acc_t>(), n, k, layout,
          scaled ? g.row_scale.const_data_ptr<float>() : nullptr,
          scaled ? g.col_scale.const_data_ptr<float>() : nullptr,
          c_rows.mutable_data_ptr<scalar_t>(),
          scaled ? c_cols.mutable_data_ptr<scalar_t>() : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  // Empty operands need no kernel: mm of an empty inner dimension is zeros.
  g.hidden_part = matmul_acc(c_rows, w.index_select(0, neg)).contiguous();
  if (weight_grads) {
    g.rows = matmul_acc((scaled ? c_cols : c_rows).t(), h).contiguous();
    // A float32 GEMV over the unscaled coefficients: deterministic, and exact in float32.
    const at::NoTF32Guard no_tf32;
    g.bias = at::mv(coef.narrow(1, first, k).t(), grad_loss).contiguous();
  }
  return g;
}

void check_device(const at::Tensor& hidden, const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device() == hidden.device(), name, " is on ", t.device(),
                    " but hidden is on ", hidden.device());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> sampled_loss_forward_cuda(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& target, const at::Tensor& negatives,
    const std::optional<at::Tensor>& hard_negatives, const std::optional<at::Tensor>& noise_probs,
    const at::Tensor& log_z, int64_t objective, double positive_weight,
    bool remove_accidental_hits, int64_t ignore_index) {
  // The GEMMs below are part of the kernel: an enclosing autocast region must not recast them.
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  check_shapes(hidden, weight, bias, target, negatives, hard_negatives);
  check_loss_args(weight, noise_probs, log_z, objective);
  for (const auto* t : {&weight, &target, &negatives}) check_device(hidden, *t, "an input");
  if (bias.has_value()) check_device(hidden, *bias, "bias");
  if (hard_negatives.has_value()) check_device(hidden, *hard_negatives, "hard_negatives");
  const c10::cuda::CUDAGuard guard(hidden.device());
  const bool uses_noise = objective != kNegativeSampling;

  const ForwardInputs in = prepare_forward(hidden, weight, bias, target, negatives, noise_probs,
                                           uses_noise, hard_negatives);
  const at::Tensor &h = in.h, &w = in.w, &b = in.b, &tgt = in.tgt, &neg = in.neg, &q = in.q;
  const at::ScalarType acc_dtype = in.acc_dtype;
  const at::Tensor &loss = in.values, &coef = in.coef;
  const int64_t n = h.size(0), k = neg.size(-1);
  const auto lz = log_z.to(h.device(), acc_dtype).reshape({1}).contiguous();
  if (n == 0) return {loss, coef};

  // Shared negatives: one [N, D] x [D, k] GEMM gives every negative's <h_i, W[n_j]>.
  at::Tensor shared_scores;
  if (neg.dim() == 1) shared_scores = matmul_acc(h, w.index_select(0, neg).t()).contiguous();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(),
                                  "sampled_loss_forward_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    const auto problem = make_problem<scalar_t>(h, w, b, tgt, neg, in.hard, ignore_index);
    with_vector_width<scalar_t>(problem_vector_width<scalar_t>(h, w), [&](auto vec) {
      forward_kernel<scalar_t, decltype(vec)::value>
          <<<warp_grid(n), kWarpsPerBlock * kWarpSize, 0, stream>>>(
              problem, uses_noise ? q.const_data_ptr<float>() : nullptr,
              lz.const_data_ptr<acc_t>(),
              shared_scores.defined() ? shared_scores.const_data_ptr<acc_t>() : nullptr,
              LossOptions{objective, positive_weight, remove_accidental_hits},
              loss.mutable_data_ptr<acc_t>(),
              coef.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {loss, coef};
}

// ---- Backward ----

namespace {

// grad_hidden[i] = sum_j grad_loss[i] coef[i, j] W[c_j] (+ the shared negatives' GEMM row, times
// its row scale); each coefficient and class is read once per register tile (for_each_column).
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kWarpsPerBlock* kWarpSize)
    grad_hidden_kernel(const Problem<scalar_t> p, const acc_type<scalar_t>* __restrict__ coef,
                       const acc_type<scalar_t>* __restrict__ grad_loss,
                       const acc_type<scalar_t>* __restrict__ from_shared,
                       const float* __restrict__ row_scale, scalar_t* __restrict__ grad_hidden) {
  using acc_t = acc_type<scalar_t>;
  const int64_t i = global_warp();
  if (i >= p.n) return;
  const int lane = threadIdx.x % kWarpSize;
  const bool ignored = p.ignored(i);
  const acc_t g = grad_loss[i];
  const int64_t gathered = ignored ? 0 : p.cols.per_example();
  const acc_t shared_factor = row_scale != nullptr ? static_cast<acc_t>(row_scale[i]) : acc_t(1);
  const auto terms = [&](const auto& add) {
    if (from_shared != nullptr) add(shared_factor, from_shared + i * p.dim, p.dim % VEC == 0);
    for_each_column(p, i, gathered, g, coef, lane,
                    [&](acc_t c, int64_t row) { add(c, p.weight_row(row), true); });
  };
  scalar_t* out = grad_hidden + i * p.dim;
  sum_row_terms<VEC, acc_t>(
      p.dim, lane, terms, [&](const acc_t(&acc)[VEC], int64_t d) { store_vec<VEC>(acc, out + d); },
      [&](acc_t value, int64_t d) { out[d] = static_cast<scalar_t>(value); });
}

// What a backward computes besides grad_hidden: the dense [V, D] / [V] gradients, only the touched
// rows (ascending), or nothing (a frozen output layer).
enum class WeightGrad { kDense, kRows, kNone };

struct Gradients {
  at::Tensor hidden, rows, weight, bias;
};

bool stream_is_capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
  return status != cudaStreamCaptureStatusNone;
}

Gradients backward_cuda(const at::Tensor& grad_loss, const at::Tensor& coef,
                        const at::Tensor& hidden, const at::Tensor& weight, bool has_bias,
                        const at::Tensor& target, const at::Tensor& negatives,
                        const std::optional<at::Tensor>& hard_negatives, int64_t ignore_index,
                        WeightGrad mode) {
  // The GEMMs below are part of the kernel: an enclosing autocast region must not recast them.
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  check_shapes(hidden, weight, std::nullopt, target, negatives, hard_negatives);
  for (const auto* t : {&weight, &target, &negatives, &grad_loss, &coef}) {
    check_device(hidden, *t, "an input");
  }
  if (hard_negatives.has_value()) check_device(hidden, *hard_negatives, "hard_negatives");
  const int64_t n = hidden.size(0), dim = hidden.size(1), k = negatives.size(-1);
  const int64_t num_classes = weight.size(0);
  const int64_t positives = num_positives(target), hard_count = num_hard(hard_negatives);
  const int64_t cols = positives + k + hard_count;
  TORCH_CHECK_VALUE((grad_loss.dim() == 1 && grad_loss.size(0) == n) || grad_loss.dim() == 0,
                    "grad_loss must be [N] or a scalar (the same for every example)");
  TORCH_CHECK_VALUE(coef.dim() == 2 && coef.size(0) == n && coef.size(1) == cols,
                    "coef must be [N, T + k + h]");
  const c10::cuda::CUDAGuard guard(hidden.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  TORCH_CHECK(mode != WeightGrad::kRows || !stream_is_capturing(stream),
              "sparse_grad=True cannot run inside a CUDA graph capture: the number of touched "
              "rows sizes its output and is known only on the device. Capture the step with "
              "sparse_grad=False (a dense gradient), or run it eagerly");
  const auto acc_dtype = hidden.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto h = rows_of(hidden);
  const auto w = rows_of(weight);
  const auto tgt = target.contiguous();
  const auto neg = negatives.contiguous();
  const auto hard = hard_negatives.has_value() ? hard_negatives->contiguous() : at::Tensor();
  // The kernels scale coef[i, :] by grad_loss[i] as they read it: no [N, T + k + h] temporary.
  const auto cf = coef.to(acc_dtype).contiguous();
  const auto gl = grad_loss.to(acc_dtype).expand({n}).contiguous();
  const bool shared = neg.dim() == 1;
  const bool atomic = mode == WeightGrad::kDense && !shared &&
                      !at::globalContext().deterministicAlgorithms() &&
                      (h.scalar_type() == at::kFloat || h.scalar_type() == at::kDouble);
  if (mode != WeightGrad::kNone && !atomic) {
    const int64_t own = make_columns(tgt, neg, hard, ignore_index).per_example();
    check_sorted_limits(num_classes, n * own + (shared ? k : 0));
  }

  Gradients g;
  g.hidden = at::empty({n, dim}, h.options());
  if (mode == WeightGrad::kDense) {
    g.rows = at::empty({0}, tgt.options());
    g.weight = at::zeros({num_classes, dim}, w.options());
    g.bias = at::zeros({has_bias ? num_classes : 0}, w.options());
  }
  if (n == 0 && (!shared || mode == WeightGrad::kNone || k == 0)) {
    if (mode == WeightGrad::kRows) {
      g.rows = at::empty({0}, tgt.options());
      g.weight = at::empty({0, dim}, w.options());
      g.bias = at::empty({0}, w.options());
    }
    return g;
  }

  // Shared negatives: dL/dH = C_neg W_n and dL/dW_n = C_neg^T H are two GEMMs.
  SharedGrads sg;
  if (shared) sg = shared_negative_grads(cf, gl, h, w, neg, positives, mode != WeightGrad::kNone);

  if (n > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(),
                                    "sampled_loss_backward_cuda", [&] {
      using acc_t = acc_type<scalar_t>;
      const auto problem = make_problem<scalar_t>(h, w, at::Tensor(), tgt, neg, hard, ignore_index);
      // grad_hidden rows are written with the same vectors: D must allow them too.
      with_vector_width<scalar_t>(problem_vector_width<scalar_t>(h, w, dim), [&](auto vec) {
        grad_hidden_kernel<scalar_t, decltype(vec)::value>
            <<<warp_grid(n), kWarpsPerBlock * kWarpSize, 0, stream>>>(
                problem, cf.const_data_ptr<acc_t>(), gl.const_data_ptr<acc_t>(),
                shared ? sg.hidden_part.const_data_ptr<acc_t>() : nullptr,
                sg.row_scale.defined() ? sg.row_scale.const_data_ptr<float>() : nullptr,
                g.hidden.mutable_data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
  if (mode == WeightGrad::kNone) return g;

  const ScatterInputs in{h,  w,       tgt,          neg,         hard,    cf,
                         gl, sg.rows, sg.col_scale, sg.bias, ignore_index, has_bias};
  if (atomic) {
    scatter_atomic(in, g.weight, g.bias);
  } else {
    std::tie(g.rows, g.weight, g.bias) =
        scatter_sorted(in, mode == WeightGrad::kRows, g.weight, g.bias);
  }
  return g;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> sampled_loss_backward_cuda(
    const at::Tensor& grad_loss, const at::Tensor& coef, const at::Tensor& hidden,
    const at::Tensor& weight, bool has_bias, const at::Tensor& target,
    const at::Tensor& negatives, const std::optional<at::Tensor>& hard_negatives,
    int64_t ignore_index) {
  auto g = backward_cuda(grad_loss, coef, hidden, weight, has_bias, target, negatives,
                         hard_negatives, ignore_index, WeightGrad::kDense);
  return {g.hidden, g.weight, g.bias};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sampled_loss_backward_rows_cuda(
    const at::Tensor& grad_loss, const at::Tensor& coef, const at::Tensor& hidden,
    const at::Tensor& weight, bool has_bias, const at::Tensor& target,
    const at::Tensor& negatives, const std::optional<at::Tensor>& hard_negatives,
    int64_t ignore_index) {
  auto g = backward_cuda(grad_loss, coef, hidden, weight, has_bias, target, negatives,
                         hard_negatives, ignore_index, WeightGrad::kRows);
  return {g.hidden, g.rows, g.weight, g.bias};
}

at::Tensor sampled_loss_backward_hidden_cuda(const at::Tensor& grad_loss, const at::Tensor& coef,
                                             const at::Tensor& hidden, const at::Tensor& weight,
                                             const at::Tensor& target,
                                             const at::Tensor& negatives,
                                             const std::optional<at::Tensor>& hard_negatives,
                                             int64_t ignore_index) {
  return backward_cuda(grad_loss, coef, hidden, weight, false, target, negatives, hard_negatives,
                       ignore_index, WeightGrad::kNone)
      .hidden;
}

TORCH_LIBRARY_IMPL(fused_nce, CUDA, m) {
  m.impl("sampled_loss_forward", &sampled_loss_forward_cuda);
  m.impl("sampled_loss_backward", &sampled_loss_backward_cuda);
  m.impl("sampled_loss_backward_rows", &sampled_loss_backward_rows_cuda);
  m.impl("sampled_loss_backward_hidden", &sampled_loss_backward_hidden_cuda);
  m.impl("alias_build", &alias_build_cuda);
  m.impl("alias_sample", &alias_sample_cuda);
}

}  // namespace fused_nce
