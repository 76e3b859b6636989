// Vocab-parallel forward on CUDA, the mirror of cpu/shard_cpu.cpp: one warp per example walks its
// columns (columns.h: positives, negatives, hard negatives); an owned class's row is read in
// place (global index minus row_start) with the dot product spread over the lanes, any other
// class is neither read nor addressed. Indices are checked against the global V in the kernel
// (device-side assert; a bad index is never used as an address), so nothing waits for the device.
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
  int64_t n, dim, rows, row_start, num_classes, objective;
  int64_t hidden_stride, weight_stride;
  double positive_weight;
  bool remove_accidental_hits;
};

template <typename scalar_t>
__global__ void __launch_bounds__(kWarpsPerBlock* kWarpSize)
    shard_forward_kernel(const scalar_t* __restrict__ hidden, const scalar_t* __restrict__ weight,
                         const scalar_t* __restrict__ bias, const Columns columns,
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
  const int64_t cols = columns.count();
  acc_t* s = coef + i * cols;
  const bool ignored = columns.valid_positives(i) == 0;
  const auto valid = [&](int64_t c) {
    const bool ok = c >= 0 && c < a.num_classes;
    CUDA_KERNEL_ASSERT(ok && "fused_nce: class index outside [0, num_classes)");
    return ok;
  };
  const acc_t shift = binary_shift(a.objective, log_z[0], columns.k);
  const scalar_t* h = hidden + i * a.hidden_stride;
  acc_t partial = softmax ? kNegInf : acc_t(0);
  // Warp-uniform loop: every lane evaluates the same column, so the warp reduction is safe.
  for (int64_t j = 0; j < cols; ++j) {
    const int64_t c = columns.class_of(i, j);
    const bool ok = columns.padding(j, c) || valid(c);
    if (ignored || !ok || columns.dropped(i, j, c, a.remove_accidental_hits) ||
        !owns(c, a.row_start, a.rows)) {
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
    // A hard negative was not drawn from q: no log q.
    const bool drawn = columns.positive(j) || columns.sampled(j);
    const acc_t log_q =
        noise_probs != nullptr && drawn ? log_noise_prob<acc_t>(noise_probs[c]) : acc_t(0);
    acc_t value;
    if (softmax) {
      value = score - log_q;
      partial = value > partial ? value : partial;
    } else {
      const bool positive = columns.positive(j);
      const Term<acc_t> term =
          binary_term(positive, binary_logit(a.objective, score, log_q, shift));
      const acc_t term_weight = positive ? static_cast<acc_t>(a.positive_weight) : acc_t(1);
      partial += term_weight * term.loss;
      value = term_weight * term.grad;
    }
    if (lane == 0) s[j] = value;
  }
  if (lane == 0) stat[i] = ignored ? absent : partial;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> shard_loss_forward_cuda(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& target, const at::Tensor& negatives,
    const std::optional<at::Tensor>& hard_negatives, const std::optional<at::Tensor>& noise_probs,
    const at::Tensor& log_z, int64_t objective, double positive_weight,
    bool remove_accidental_hits, int64_t ignore_index, int64_t row_start, int64_t num_classes) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  check_shapes(hidden, weight, bias, target, negatives, hard_negatives);
  check_shard(weight, row_start, num_classes);
  check_shard_noise(noise_probs, log_z, objective, num_classes);
  for (const auto* t : {&weight, &target, &negatives}) {
    TORCH_CHECK_VALUE(t->device() == hidden.device(), "every input must be on ", hidden.device());
  }
  if (hard_negatives.has_value()) {
    TORCH_CHECK_VALUE(hard_negatives->device() == hidden.device(), "every input must be on ",
                      hidden.device());
  }
  const c10::cuda::CUDAGuard guard(hidden.device());
  const bool uses_noise = objective != kNegativeSampling;
  const ForwardInputs in = prepare_forward(hidden, weight, bias, target, negatives, noise_probs,
                                           uses_noise, hard_negatives);
  const at::Tensor &h = in.h, &w = in.w, &b = in.b, &tgt = in.tgt, &neg = in.neg, &q = in.q;
  const at::ScalarType acc_dtype = in.acc_dtype;
  const at::Tensor &stat = in.values, &coef = in.coef;
  const int64_t n = h.size(0);
  const auto lz = log_z.to(h.device(), acc_dtype).reshape({1}).contiguous();
  if (n == 0) return {stat, coef};
  const ShardArgs args{n,         h.size(1),   w.size(0),   row_start,
                       num_classes, objective, h.stride(0), w.stride(0),
                       positive_weight, remove_accidental_hits};
  const Columns columns = make_columns(tgt, neg, in.hard, ignore_index);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(),
                                  "shard_loss_forward_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    shard_forward_kernel<scalar_t><<<warp_grid(n), kWarpsPerBlock * kWarpSize, 0, stream>>>(
        h.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
        b.defined() ? b.const_data_ptr<scalar_t>() : nullptr, columns,
        uses_noise ? q.const_data_ptr<float>() : nullptr, lz.const_data_ptr<acc_t>(), args,
        stat.mutable_data_ptr<acc_t>(), coef.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {stat, coef};
}

TORCH_LIBRARY_IMPL(fused_nce, CUDA, m) {
  m.impl("shard_loss_forward", &shard_loss_forward_cuda);
}

}  // namespace fused_nce
