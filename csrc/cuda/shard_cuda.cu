// Vocab-parallel forward on CUDA, the mirror of cpu/shard_cpu.cpp: one warp per example walks its
// target and negatives; an owned class's row is read in place (global index minus row_start) with
// the dot product spread over the lanes, any other class is neither read nor addressed. Indices
// are checked against the global V in the kernel (device-side assert; a bad index is never used
// as an address), so nothing waits for the device.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <limits>

#include "../checks.h"
#include "../fused_nce.h"
#include "../nce_math.h"
#include "../shard.h"
#include "cuda_common.cuh"

namespace fused_nce {
using namespace cuda;
namespace {

struct ShardArgs {
  int64_t n, dim, k, rows, row_start, num_classes, ignore_index, objective;
  int64_t hidden_stride, weight_stride;
  bool shared, remove_accidental_hits;
};

template <typename scalar_t>
__global__ void __launch_bounds__(kWarpsPerBlock* kWarpSize)
    shard_forward_kernel(const scalar_t* __restrict__ hidden, const scalar_t* __restrict__ weight,
                         const scalar_t* __restrict__ bias, const int64_t* __restrict__ target,
                         const int64_t* __restrict__ negatives,
                         const float* __restrict__ noise_probs,
                         const acc_type<scalar_t>* __restrict__ log_z, const ShardArgs a,
                         acc_type<scalar_t>* __restrict__ stat,
                         acc_type<scalar_t>* __restrict__ coef) {
  using acc_t = acc_type<scalar_t>;
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  const int64_t i = global_warp();
  if (i >= a.n) return;
  const int lane = threadIdx.x % kWarpSize;
  const bool softmax = a.objective == kSampledSoftmax;
  const acc_t absent = softmax ? kNegInf : acc_t(0);
  const int64_t cols = 1 + a.k;
  acc_t* s = coef + i * cols;
  const int64_t t = target[i];
  const bool ignored = t == a.ignore_index;
  const auto valid = [&](int64_t c) {
    const bool ok = c >= 0 && c < a.num_classes;
    CUDA_KERNEL_ASSERT(ok && "fused_nce: class index outside [0, num_classes)");
    return ok;
  };
  const acc_t shift = binary_shift(a.objective, log_z[0], a.k);
  const scalar_t* h = hidden + i * a.hidden_stride;
  acc_t partial = softmax ? kNegInf : acc_t(0);
  // Warp-uniform loop: every lane evaluates the same column, so the warp reduction is safe.
  for (int64_t j = 0; j < cols; ++j) {
    const int64_t c = j == 0 ? t : (a.shared ? negatives[j - 1] : negatives[i * a.k + j - 1]);
    const bool ok = (j == 0 && ignored) || valid(c);
    const bool dropped = j > 0 && a.remove_accidental_hits && c == t;
    if (ignored || !ok || dropped || !owns(c, a.row_start, a.rows)) {
      if (lane == 0) s[j] = absent;
      continue;
    }
    const int64_t r = c - a.row_start;
    const scalar_t* w = weight + r * a.weight_stride;
    acc_t dot = 0;
    for (int64_t d = lane; d < a.dim; d += kWarpSize) {
      dot += static_cast<acc_t>(h[d]) * static_cast<acc_t>(w[d]);
    }
    dot = warp_sum(dot);
    const acc_t score = dot + (bias != nullptr ? static_cast<acc_t>(bias[r]) : acc_t(0));
    const acc_t log_q = noise_probs != nullptr ? log_noise_prob<acc_t>(noise_probs[c]) : acc_t(0);
    acc_t value;
    if (softmax) {
      value = score - log_q;
      partial = value > partial ? value : partial;
    } else {
      const Term<acc_t> term = binary_term(j == 0, binary_logit(a.objective, score, log_q, shift));
      partial += term.loss;
      value = term.grad;
    }
    if (lane == 0) s[j] = value;
  }
  if (lane == 0) stat[i] = ignored ? absent : partial;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> shard_loss_forward_cuda(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& target, const at::Tensor& negatives,
    const std::optional<at::Tensor>& noise_probs, const at::Tensor& log_z, int64_t objective,
    bool remove_accidental_hits, int64_t ignore_index, int64_t row_start, int64_t num_classes) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  check_shapes(hidden, weight, bias, target, negatives);
  check_shard(weight, row_start, num_classes);
  check_shard_noise(noise_probs, log_z, objective, num_classes);
  for (const auto* t : {&weight, &target, &negatives}) {
    TORCH_CHECK_VALUE(t->device() == hidden.device(), "every input must be on ", hidden.device());
  }
  const c10::cuda::CUDAGuard guard(hidden.device());
  const bool uses_noise = objective != kNegativeSampling;
  const ForwardInputs in = prepare_forward(hidden, weight, bias, target, negatives, noise_probs,
                                           uses_noise);
  const at::Tensor &h = in.h, &w = in.w, &b = in.b, &tgt = in.tgt, &neg = in.neg, &q = in.q;
  const at::ScalarType acc_dtype = in.acc_dtype;
  const at::Tensor &stat = in.values, &coef = in.coef;
  const int64_t n = h.size(0), k = neg.size(-1);
  const auto lz = log_z.to(h.device(), acc_dtype).reshape({1}).contiguous();
  if (n == 0) return {stat, coef};
  const ShardArgs args{n,           h.size(1),    k,           w.size(0),     row_start,
                       num_classes, ignore_index, objective,   h.stride(0),   w.stride(0),
                       neg.dim() == 1, remove_accidental_hits};
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(),
                                  "shard_loss_forward_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    shard_forward_kernel<scalar_t><<<warp_grid(n), kWarpsPerBlock * kWarpSize, 0, stream>>>(
        h.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
        b.defined() ? b.const_data_ptr<scalar_t>() : nullptr, tgt.const_data_ptr<int64_t>(),
        neg.const_data_ptr<int64_t>(), uses_noise ? q.const_data_ptr<float>() : nullptr,
        lz.const_data_ptr<acc_t>(), args, stat.mutable_data_ptr<acc_t>(),
        coef.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {stat, coef};
}

TORCH_LIBRARY_IMPL(fused_nce, CUDA, m) {
  m.impl("shard_loss_forward", &shard_loss_forward_cuda);
}

}  // namespace fused_nce
