// Fused sampled losses on CUDA. Forward: one warp per example gathers the target and negative rows
// of W in place with 16-byte loads (never an [N, k, D] tensor), reduces the 1 + k dot products and
// turns them into the loss and dloss/dscore in the same kernel (nce_math.h, shared with the CPU).
// Backward: grad_hidden by a second gather; grad_weight / grad_bias into the touched rows only,
// by float atomics, or (bfloat16 / float16, deterministic mode, sparse rows) by sorting the
// entries by row and summing each row in one warp, in a fixed order.
// Shared negatives go through GEMMs. Indices are checked in the kernels (device-side assert, and
// a bad index is never dereferenced), so nothing waits for the device.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>
#include <torch/version.h>

#include <cub/cub.cuh>

#include <limits>

#include "../checks.h"
#include "../fused_nce.h"
#include "../nce_math.h"
#include "cuda_common.cuh"

namespace fused_nce {
using namespace cuda;
namespace {

// Everything a kernel needs to know about one call. `negatives` is [N, k] or, when shared, [k].
// `coef` is [N, 1 + k]: scores, then dloss/dscore (forward), or those scaled by grad_loss
// (backward).
template <typename scalar_t>
struct Problem {
  using acc_t = acc_type<scalar_t>;
  const scalar_t* hidden;
  const scalar_t* weight;
  const scalar_t* bias;  // null without bias
  const int64_t* target;
  const int64_t* negatives;
  int64_t n, dim, k, num_classes, ignore_index;
  bool shared;

  __device__ __forceinline__ int64_t columns() const { return 1 + k; }
  // Class of column j of example i: 0 is the target, 1..k the negatives.
  __device__ __forceinline__ int64_t column_class(int64_t i, int64_t j) const {
    if (j == 0) return target[i];
    return shared ? negatives[j - 1] : negatives[i * k + j - 1];
  }
  __device__ __forceinline__ bool ignored(int64_t i) const { return target[i] == ignore_index; }
  // A class index out of range is reported and then never used as an address.
  __device__ __forceinline__ bool valid(int64_t c) const {
    const bool ok = c >= 0 && c < num_classes;
    CUDA_KERNEL_ASSERT(ok && "fused_nce: class index outside [0, V)");
    return ok;
  }
};

template <typename scalar_t>
Problem<scalar_t> make_problem(const at::Tensor& h, const at::Tensor& w, const at::Tensor& b,
                               const at::Tensor& tgt, const at::Tensor& neg,
                               int64_t ignore_index) {
  return Problem<scalar_t>{h.const_data_ptr<scalar_t>(),
                           w.const_data_ptr<scalar_t>(),
                           b.defined() ? b.const_data_ptr<scalar_t>() : nullptr,
                           tgt.const_data_ptr<int64_t>(),
                           neg.const_data_ptr<int64_t>(),
                           h.size(0),
                           h.size(1),
                           neg.size(-1),
                           w.size(0),
                           ignore_index,
                           neg.dim() == 1};
}

// ---- Forward ----

struct LossOptions {
  int64_t objective;
  bool remove_accidental_hits;
};

template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kWarpsPerBlock* kWarpSize)
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
  const int64_t cols = p.columns();
  acc_t* s = coef + i * cols;
  const int64_t t = p.target[i];
  if (p.ignored(i)) {
    for (int64_t j = lane; j < cols; j += kWarpSize) s[j] = 0;
    if (lane == 0) loss[i] = 0;
    return;
  }

  // Scores s[j] = <h_i, W[c_j]> + b[c_j]; with shared negatives only the target's is gathered.
  const scalar_t* h = p.hidden + i * p.dim;
  const int64_t gathered = p.shared ? 1 : cols;
  const int64_t num_vecs = p.dim / VEC;
  for (int64_t j0 = 0; j0 < gathered; j0 += kRows) {
    int64_t row[kRows];
    acc_t dot[kRows];
#pragma unroll
    for (int u = 0; u < kRows; ++u) {
      const int64_t j = j0 + u;
      const int64_t c = j < gathered ? p.column_class(i, j) : -1;
      row[u] = (j < gathered && p.valid(c)) ? c : -1;
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
        load_vec<VEC>(p.weight + row[u] * p.dim + v * VEC, wv);
#pragma unroll
        for (int e = 0; e < VEC; ++e) dot[u] += hv[e] * wv[e];
      }
    }
#pragma unroll
    for (int u = 0; u < kRows; ++u) dot[u] = warp_sum(dot[u]);
    if (lane == 0) {
#pragma unroll
      for (int u = 0; u < kRows; ++u) {
        if (j0 + u >= gathered) break;
        const acc_t b = (p.bias != nullptr && row[u] >= 0) ? static_cast<acc_t>(p.bias[row[u]]) : 0;
        s[j0 + u] = dot[u] + b;
      }
    }
  }
  if (p.shared) {
    for (int64_t j = 1 + lane; j < cols; j += kWarpSize) s[j] = shared_scores[i * p.k + j - 1];
  }
  __syncwarp();

  // Logits, loss and dloss/dscore: lane l takes columns l, l + 32, ... (example_loss_and_grad
  // in nce_math.h is the same math, one column after the other).
  const auto dropped = [&](int64_t j) {
    return j > 0 && opt.remove_accidental_hits && p.column_class(i, j) == t;
  };
  const auto log_q = [&](int64_t j) {
    if (noise_probs == nullptr) return acc_t(0);
    const int64_t c = p.column_class(i, j);
    return (c >= 0 && c < p.num_classes) ? log_noise_prob<acc_t>(noise_probs[c]) : acc_t(0);
  };
  acc_t example_loss;
  if (opt.objective == kSampledSoftmax) {
    acc_t max_logit = -std::numeric_limits<acc_t>::infinity();
    for (int64_t j = lane; j < cols; j += kWarpSize) {
      s[j] -= log_q(j);
      if (!dropped(j) && s[j] > max_logit) max_logit = s[j];
    }
    max_logit = warp_max(max_logit);
    __syncwarp();
    const acc_t target_logit = s[0];
    acc_t sum = 0;
    for (int64_t j = lane; j < cols; j += kWarpSize) {
      if (!dropped(j)) sum += std::exp(s[j] - max_logit);
    }
    const acc_t lse = max_logit + std::log(warp_sum(sum));
    __syncwarp();
    for (int64_t j = lane; j < cols; j += kWarpSize) {
      s[j] = dropped(j) ? acc_t(0) : softmax_grad(j == 0, s[j], lse);
    }
    example_loss = lse - target_logit;
  } else {
    const acc_t shift = binary_shift(opt.objective, log_z[0], p.k);
    acc_t partial = 0;
    for (int64_t j = lane; j < cols; j += kWarpSize) {
      if (dropped(j)) {
        s[j] = 0;
        continue;
      }
      const Term<acc_t> term = binary_term(j == 0, binary_logit(opt.objective, s[j], log_q(j), shift));
      partial += term.loss;
      s[j] = term.grad;
    }
    example_loss = warp_sum(partial);
  }
  if (lane == 0) loss[i] = example_loss;
}

// x @ y accumulated in float32 (float64 for float64). For float16 / bfloat16 y, x (float32
// coefficients) must be cast to y's dtype for the tensor cores: each row of x is first divided by
// its largest magnitude, so small coefficients keep their relative precision instead of flushing
// to zero, and the product's rows are scaled back.
at::Tensor matmul_acc(const at::Tensor& x, const at::Tensor& y) {
  const auto dtype = y.scalar_type();
  if (dtype == at::kFloat || dtype == at::kDouble) return at::mm(x.to(dtype), y);
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 8)
  if (x.scalar_type() == dtype) return at::mm(x, y, at::kFloat);
  const auto scale = x.abs().amax(1, /*keepdim=*/true).clamp_min(std::numeric_limits<float>::min());
  return at::mm(x.div(scale).to(dtype), y, at::kFloat).mul_(scale);
#else
  return at::mm(x.to(at::kFloat), y.to(at::kFloat));
#endif
}

void check_device(const at::Tensor& hidden, const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device() == hidden.device(), name, " is on ", t.device(),
                    " but hidden is on ", hidden.device());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> sampled_loss_forward_cuda(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& target, const at::Tensor& negatives,
    const std::optional<at::Tensor>& noise_probs, const at::Tensor& log_z, int64_t objective,
    bool remove_accidental_hits, int64_t ignore_index) {
  // The GEMMs below are part of the kernel: an enclosing autocast region must not recast them.
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  check_shapes(hidden, weight, bias, target, negatives);
  check_loss_args(weight, noise_probs, log_z, objective);
  for (const auto* t : {&weight, &target, &negatives}) check_device(hidden, *t, "an input");
  if (bias.has_value()) check_device(hidden, *bias, "bias");
  const c10::cuda::CUDAGuard guard(hidden.device());
  const bool uses_noise = objective != kNegativeSampling;

  const auto h = hidden.contiguous();
  const auto w = weight.contiguous();
  const auto b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const auto tgt = target.contiguous();
  const auto neg = negatives.contiguous();
  const auto q = uses_noise ? noise_probs->to(h.device(), at::kFloat).contiguous() : at::Tensor();
  const int64_t n = h.size(0), k = neg.size(-1);
  const auto acc_dtype = h.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto lz = log_z.to(h.device(), acc_dtype).reshape({1}).contiguous();
  auto loss = at::empty({n}, h.options().dtype(acc_dtype));
  auto coef = at::empty({n, 1 + k}, h.options().dtype(acc_dtype));
  if (n == 0) return {loss, coef};

  // Shared negatives: one [N, D] x [D, k] GEMM gives every negative score.
  at::Tensor shared_scores;
  if (neg.dim() == 1) {
    shared_scores = matmul_acc(h, w.index_select(0, neg).t());
    if (b.defined()) shared_scores.add_(b.index_select(0, neg).to(acc_dtype));
    shared_scores = shared_scores.contiguous();
  }
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(),
                                  "sampled_loss_forward_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    const auto problem = make_problem<scalar_t>(h, w, b, tgt, neg, ignore_index);
    const int width = vector_width<scalar_t>(h.size(1), {h.const_data_ptr(), w.const_data_ptr()});
    with_vector_width<scalar_t>(width, [&](auto vec) {
      forward_kernel<scalar_t, decltype(vec)::value>
          <<<warp_grid(n), kWarpsPerBlock * kWarpSize, 0, stream>>>(
              problem, uses_noise ? q.const_data_ptr<float>() : nullptr,
              lz.const_data_ptr<acc_t>(),
              shared_scores.defined() ? shared_scores.const_data_ptr<acc_t>() : nullptr,
              LossOptions{objective, remove_accidental_hits}, loss.mutable_data_ptr<acc_t>(),
              coef.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {loss, coef};
}

// ---- Backward ----

namespace {

// grad_hidden[i] = sum_j c_ij W[c_j] (+ the shared negatives' GEMM rows, precomputed).
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kWarpsPerBlock* kWarpSize)
    grad_hidden_kernel(const Problem<scalar_t> p, const acc_type<scalar_t>* __restrict__ scaled,
                       const acc_type<scalar_t>* __restrict__ from_shared,
                       scalar_t* __restrict__ grad_hidden) {
  using acc_t = acc_type<scalar_t>;
  const int64_t i = global_warp();
  if (i >= p.n) return;
  const int lane = threadIdx.x % kWarpSize;
  const acc_t* c = scaled + i * p.columns();
  const bool ignored = p.ignored(i);
  const int64_t gathered = p.shared ? 1 : p.columns();
  for (int64_t v = lane; v < p.dim / VEC; v += kWarpSize) {
    acc_t acc[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) acc[e] = from_shared ? from_shared[i * p.dim + v * VEC + e] : 0;
    for (int64_t j = 0; j < gathered && !ignored; ++j) {
      const acc_t cj = c[j];
      const int64_t row = p.column_class(i, j);
      if (cj == 0 || !p.valid(row)) continue;
      acc_t wv[VEC];
      load_vec<VEC>(p.weight + row * p.dim + v * VEC, wv);
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc[e] += cj * wv[e];
    }
    store_vec<VEC>(acc, grad_hidden + i * p.dim + v * VEC);
  }
}

// grad_weight[c_j] += c_ij h_i by atomics (float32 / float64 only: no rounding per addition).
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kWarpsPerBlock* kWarpSize)
    scatter_atomic_kernel(const Problem<scalar_t> p, const scalar_t* __restrict__ scaled,
                          scalar_t* __restrict__ grad_weight, scalar_t* __restrict__ grad_bias) {
  const int64_t i = global_warp();
  if (i >= p.n || p.ignored(i)) return;
  const int lane = threadIdx.x % kWarpSize;
  const scalar_t* c = scaled + i * p.columns();
  for (int64_t v = lane; v < p.dim / VEC; v += kWarpSize) {
    scalar_t hv[VEC];
    load_vec<VEC>(p.hidden + i * p.dim + v * VEC, hv);
    for (int64_t j = 0; j < p.columns(); ++j) {
      const int64_t row = p.column_class(i, j);
      if (c[j] == 0 || !p.valid(row)) continue;
#pragma unroll
      for (int e = 0; e < VEC; ++e) atomicAdd(grad_weight + row * p.dim + v * VEC + e, c[j] * hv[e]);
    }
  }
  if (grad_bias == nullptr) return;
  for (int64_t j = lane; j < p.columns(); j += kWarpSize) {
    const int64_t row = p.column_class(i, j);
    if (c[j] != 0 && p.valid(row)) atomicAdd(grad_bias + row, c[j]);
  }
}

// Entries are (example, column) pairs, e = i * (1 + k) + j; with shared negatives e < N are the
// targets and N + j the shared negative j (its gradient row comes from a GEMM). Key = the row an
// entry adds to, or V for entries that add nothing (ignored examples, dropped hits, bad indices).
template <typename scalar_t>
__global__ void entry_keys_kernel(const Problem<scalar_t> p,
                                  const acc_type<scalar_t>* __restrict__ scaled,
                                  int64_t num_entries, int32_t* __restrict__ keys,
                                  int32_t* __restrict__ entries) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= num_entries) return;
  int64_t row;
  if (p.shared && e >= p.n) {
    row = p.negatives[e - p.n];
  } else {
    const int64_t i = p.shared ? e : e / p.columns(), j = p.shared ? 0 : e % p.columns();
    row = (p.ignored(i) || scaled[i * p.columns() + j] == 0) ? p.num_classes : p.column_class(i, j);
  }
  if (row != p.num_classes && !p.valid(row)) row = p.num_classes;
  keys[e] = static_cast<int32_t>(row);
  entries[e] = static_cast<int32_t>(e);
}

// One warp per run of equal keys (one row): sums the row's entries in sorted (= entry) order, so
// the result does not depend on scheduling. Writes row r to out[r] (dense) or out[run] (compact).
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kWarpsPerBlock* kWarpSize)
    sum_rows_kernel(const Problem<scalar_t> p, const acc_type<scalar_t>* __restrict__ scaled,
                    const acc_type<scalar_t>* __restrict__ shared_rows,
                    const acc_type<scalar_t>* __restrict__ shared_bias,
                    const int32_t* __restrict__ run_keys, const int32_t* __restrict__ run_lengths,
                    const int32_t* __restrict__ run_starts, const int32_t* __restrict__ num_runs,
                    const int32_t* __restrict__ sorted_entries, bool compact,
                    scalar_t* __restrict__ grad_weight, scalar_t* __restrict__ grad_bias) {
  using acc_t = acc_type<scalar_t>;
  const int64_t run = global_warp();
  if (run >= *num_runs) return;
  const int64_t row = run_keys[run];
  if (row >= p.num_classes) return;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t out = compact ? run : row;
  const int32_t* entries = sorted_entries + run_starts[run];
  const int32_t count = run_lengths[run];
  const int64_t cols = p.columns();
  for (int64_t v = lane; v < p.dim / VEC; v += kWarpSize) {
    acc_t acc[VEC] = {};
    for (int32_t m = 0; m < count; ++m) {
      const int64_t e = entries[m];
      if (p.shared && e >= p.n) {
        const acc_t* g = shared_rows + (e - p.n) * p.dim + v * VEC;
#pragma unroll
        for (int x = 0; x < VEC; ++x) acc[x] += g[x];
        continue;
      }
      const int64_t i = p.shared ? e : e / cols;
      const acc_t c = scaled[p.shared ? e * cols : e];
      acc_t hv[VEC];
      load_vec<VEC>(p.hidden + i * p.dim + v * VEC, hv);
#pragma unroll
      for (int x = 0; x < VEC; ++x) acc[x] += c * hv[x];
    }
    store_vec<VEC>(acc, grad_weight + out * p.dim + v * VEC);
  }
  if (grad_bias == nullptr) return;
  acc_t bias_acc = 0;
  for (int32_t m = lane; m < count; m += kWarpSize) {
    const int64_t e = entries[m];
    bias_acc += (p.shared && e >= p.n) ? shared_bias[e - p.n] : scaled[p.shared ? e * cols : e];
  }
  bias_acc = warp_sum(bias_acc);
  if (lane == 0) grad_bias[out] = static_cast<scalar_t>(bias_acc);
}

int end_bit_for(int64_t max_key) {
  int bits = 1;
  while ((int64_t{1} << bits) <= max_key) ++bits;
  return bits;
}

// Both backward ops: dense [V, D] / [V] gradients, or (compact) only the touched rows, ascending.
struct Gradients {
  at::Tensor hidden, rows, weight, bias;
};

Gradients backward_cuda(const at::Tensor& grad_loss, const at::Tensor& coef,
                        const at::Tensor& hidden, const at::Tensor& weight, bool has_bias,
                        const at::Tensor& target, const at::Tensor& negatives,
                        int64_t ignore_index, bool compact) {
  // The GEMMs below are part of the kernel: an enclosing autocast region must not recast them.
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  check_shapes(hidden, weight, std::nullopt, target, negatives);
  for (const auto* t : {&weight, &target, &negatives, &grad_loss, &coef}) {
    check_device(hidden, *t, "an input");
  }
  const int64_t n = hidden.size(0), dim = hidden.size(1), k = negatives.size(-1);
  const int64_t num_classes = weight.size(0);
  TORCH_CHECK_VALUE(grad_loss.dim() == 1 && grad_loss.size(0) == n, "grad_loss must be [N]");
  TORCH_CHECK_VALUE(coef.dim() == 2 && coef.size(0) == n && coef.size(1) == 1 + k,
                    "coef must be [N, 1 + k]");
  const c10::cuda::CUDAGuard guard(hidden.device());
  const auto acc_dtype = hidden.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto h = hidden.contiguous();
  const auto w = weight.contiguous();
  const auto tgt = target.contiguous();
  const auto neg = negatives.contiguous();
  const bool shared = neg.dim() == 1;
  // Per-entry coefficients grad_loss[i] * dloss_i/ds_ij, [N, 1 + k].
  const auto scaled = (coef.to(acc_dtype) * grad_loss.to(acc_dtype).unsqueeze(1)).contiguous();
  const int64_t num_entries = shared ? n + k : n * (1 + k);

  Gradients g;
  g.hidden = at::empty_like(h);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const bool atomic = !compact && !shared && !at::globalContext().deterministicAlgorithms() &&
                      (h.scalar_type() == at::kFloat || h.scalar_type() == at::kDouble);
  // The sorted path keys rows and entries with int32.
  TORCH_CHECK_VALUE(atomic || (num_classes < std::numeric_limits<int32_t>::max() &&
                               num_entries < std::numeric_limits<int32_t>::max()),
                    "at most 2^31 - 2 classes and entries (N * (1 + k)) are supported on CUDA "
                    "with float16 / bfloat16, shared negatives or deterministic algorithms");
  if (!compact) {
    g.rows = at::empty({0}, tgt.options());
    g.weight = at::zeros_like(w);
    g.bias = at::zeros({has_bias ? num_classes : 0}, w.options());
  }
  if (num_entries == 0 || (n == 0 && !shared)) {
    if (compact) {
      g.rows = at::empty({0}, tgt.options());
      g.weight = at::empty({0, dim}, w.options());
      g.bias = at::empty({0}, w.options());
    }
    return g;
  }

  // Shared negatives: dL/dH = C_neg W_n and dL/dW_n = C_neg^T H are two GEMMs.
  at::Tensor from_shared, shared_rows, shared_bias;
  if (shared) {
    const auto c_neg = scaled.narrow(1, 1, k);
    from_shared = matmul_acc(c_neg, w.index_select(0, neg)).contiguous();
    shared_rows = matmul_acc(c_neg.t(), h).contiguous();
    shared_bias = c_neg.sum(0).contiguous();
  }

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(),
                                  "sampled_loss_backward_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    const auto problem = make_problem<scalar_t>(h, w, at::Tensor(), tgt, neg, ignore_index);
    const int width = vector_width<scalar_t>(
        dim, {h.const_data_ptr(), w.const_data_ptr(), g.hidden.const_data_ptr()});
    with_vector_width<scalar_t>(width, [&](auto vec) {
      constexpr int VEC = decltype(vec)::value;
      if (n > 0) {
        grad_hidden_kernel<scalar_t, VEC><<<warp_grid(n), kWarpsPerBlock * kWarpSize, 0, stream>>>(
            problem, scaled.const_data_ptr<acc_t>(),
            shared ? from_shared.const_data_ptr<acc_t>() : nullptr,
            g.hidden.mutable_data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      if (atomic) {
        if constexpr (std::is_same_v<scalar_t, acc_t>) {
          scatter_atomic_kernel<scalar_t, VEC>
              <<<warp_grid(n), kWarpsPerBlock * kWarpSize, 0, stream>>>(
                  problem, scaled.const_data_ptr<scalar_t>(), g.weight.mutable_data_ptr<scalar_t>(),
                  has_bias ? g.bias.mutable_data_ptr<scalar_t>() : nullptr);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
        return;
      }

      // Sort the entries by row, then one warp sums each row in entry order.
      const auto int_opts = tgt.options().dtype(at::kInt);
      auto keys = at::empty({num_entries}, int_opts), entries = at::empty({num_entries}, int_opts);
      auto sorted_keys = at::empty_like(keys), sorted_entries = at::empty_like(entries);
      auto run_keys = at::empty_like(keys), run_starts = at::empty_like(keys);
      auto run_lengths = at::zeros_like(keys), num_runs = at::zeros({1}, int_opts);
      constexpr int kThreads = 256;
      entry_keys_kernel<scalar_t>
          <<<(num_entries + kThreads - 1) / kThreads, kThreads, 0, stream>>>(
              problem, scaled.const_data_ptr<acc_t>(), num_entries, keys.mutable_data_ptr<int32_t>(),
              entries.mutable_data_ptr<int32_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const int n_items = static_cast<int>(num_entries);
      size_t bytes = 0;
      C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(
          nullptr, bytes, keys.const_data_ptr<int32_t>(), sorted_keys.mutable_data_ptr<int32_t>(),
          entries.const_data_ptr<int32_t>(), sorted_entries.mutable_data_ptr<int32_t>(), n_items,
          0, end_bit_for(num_classes), stream));
      auto temp = scratch_bytes(bytes, keys);
      C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(
          temp.data_ptr(), bytes, keys.const_data_ptr<int32_t>(),
          sorted_keys.mutable_data_ptr<int32_t>(), entries.const_data_ptr<int32_t>(),
          sorted_entries.mutable_data_ptr<int32_t>(), n_items, 0, end_bit_for(num_classes),
          stream));
      bytes = 0;
      C10_CUDA_CHECK(cub::DeviceRunLengthEncode::Encode(
          nullptr, bytes, sorted_keys.const_data_ptr<int32_t>(), run_keys.mutable_data_ptr<int32_t>(),
          run_lengths.mutable_data_ptr<int32_t>(), num_runs.mutable_data_ptr<int32_t>(), n_items,
          stream));
      temp = scratch_bytes(bytes, keys);
      C10_CUDA_CHECK(cub::DeviceRunLengthEncode::Encode(
          temp.data_ptr(), bytes, sorted_keys.const_data_ptr<int32_t>(),
          run_keys.mutable_data_ptr<int32_t>(), run_lengths.mutable_data_ptr<int32_t>(),
          num_runs.mutable_data_ptr<int32_t>(), n_items, stream));
      bytes = 0;
      C10_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(nullptr, bytes,
                                                   run_lengths.const_data_ptr<int32_t>(),
                                                   run_starts.mutable_data_ptr<int32_t>(), n_items,
                                                   stream));
      temp = scratch_bytes(bytes, keys);
      C10_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(temp.data_ptr(), bytes,
                                                   run_lengths.const_data_ptr<int32_t>(),
                                                   run_starts.mutable_data_ptr<int32_t>(), n_items,
                                                   stream));

      if (compact) {
        // The number of touched rows sizes the outputs: the one place this path waits.
        const int64_t runs = num_runs.item<int32_t>();
        const bool has_dropped =
            runs > 0 && run_keys[runs - 1].item<int32_t>() == static_cast<int32_t>(num_classes);
        const int64_t touched = runs - (has_dropped ? 1 : 0);
        g.rows = run_keys.narrow(0, 0, touched).to(at::kLong);
        g.weight = at::empty({touched, dim}, w.options());
        g.bias = at::empty({has_bias ? touched : 0}, w.options());
      }
      sum_rows_kernel<scalar_t, VEC>
          <<<warp_grid(num_entries), kWarpsPerBlock * kWarpSize, 0, stream>>>(
              problem, scaled.const_data_ptr<acc_t>(),
              shared ? shared_rows.const_data_ptr<acc_t>() : nullptr,
              shared ? shared_bias.const_data_ptr<acc_t>() : nullptr,
              run_keys.const_data_ptr<int32_t>(), run_lengths.const_data_ptr<int32_t>(),
              run_starts.const_data_ptr<int32_t>(), num_runs.const_data_ptr<int32_t>(),
              sorted_entries.const_data_ptr<int32_t>(), compact,
              g.weight.mutable_data_ptr<scalar_t>(),
              has_bias ? g.bias.mutable_data_ptr<scalar_t>() : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return g;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> sampled_loss_backward_cuda(
    const at::Tensor& grad_loss, const at::Tensor& coef, const at::Tensor& hidden,
    const at::Tensor& weight, bool has_bias, const at::Tensor& target,
    const at::Tensor& negatives, int64_t ignore_index) {
  auto g = backward_cuda(grad_loss, coef, hidden, weight, has_bias, target, negatives,
                         ignore_index, /*compact=*/false);
  return {g.hidden, g.weight, g.bias};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sampled_loss_backward_rows_cuda(
    const at::Tensor& grad_loss, const at::Tensor& coef, const at::Tensor& hidden,
    const at::Tensor& weight, bool has_bias, const at::Tensor& target,
    const at::Tensor& negatives, int64_t ignore_index) {
  auto g = backward_cuda(grad_loss, coef, hidden, weight, has_bias, target, negatives,
                         ignore_index, /*compact=*/true);
  return {g.hidden, g.rows, g.weight, g.bias};
}

TORCH_LIBRARY_IMPL(fused_nce, CUDA, m) {
  m.impl("sampled_loss_forward", &sampled_loss_forward_cuda);
  m.impl("sampled_loss_backward", &sampled_loss_backward_cuda);
  m.impl("sampled_loss_backward_rows", &sampled_loss_backward_rows_cuda);
  m.impl("alias_build", &alias_build_cuda);
  m.impl("alias_sample", &alias_sample_cuda);
}

}  // namespace fused_nce
