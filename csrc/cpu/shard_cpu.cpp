// Vocab-parallel forward on the CPU: the fused sampled loss over one shard of W. Each example's
// owned columns (columns.h: positives, negatives, hard negatives) are read in place (global
// index minus row_start); the others are neither read nor addressed. Per-term math from
// nce_math.h, as in nce_cpu.cpp.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <limits>
#include <vector>

#include "../checks.h"
#include "../fused_nce.h"
#include "../nce_math.h"
#include "../shard.h"
#include "rows.h"

namespace fused_nce {

std::tuple<at::Tensor, at::Tensor> shard_loss_forward_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& target, const at::Tensor& negatives,
    const std::optional<at::Tensor>& hard_negatives, const std::optional<at::Tensor>& noise_probs,
    const at::Tensor& log_z, int64_t objective, double positive_weight,
    bool remove_accidental_hits, int64_t ignore_index, int64_t row_start, int64_t num_classes) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  check_shapes(hidden, weight, bias, target, negatives, hard_negatives);
  check_shard(weight, row_start, num_classes);
  check_shard_noise(noise_probs, log_z, objective, num_classes);
  const bool uses_noise = objective != kNegativeSampling;
  const bool softmax = objective == kSampledSoftmax;
  const ForwardInputs in = prepare_forward(hidden, weight, bias, target, negatives, noise_probs,
                                           uses_noise, hard_negatives);
  const at::Tensor &h = in.h, &w = in.w, &b = in.b, &tgt = in.tgt, &neg = in.neg, &q = in.q;
  const at::Tensor &stat = in.values, &coef = in.coef;
  constexpr const char* kBound = "num_classes, over all shards";
  check_class_indices(tgt, num_classes, "target", true, ignore_index, kBound);
  check_class_indices(neg, num_classes, "negatives", false, 0, kBound);
  if (in.hard.defined()) {
    check_class_indices(in.hard, num_classes, "hard_negatives", true, ignore_index, kBound);
  }
  const Columns columns = make_columns(tgt, neg, in.hard, ignore_index);
  const int64_t n_examples = h.size(0), dim = h.size(1), cols = columns.count(), rows = w.size(0);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(),
                                  "shard_loss_forward_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
    const acc_t log_z_value = static_cast<acc_t>(log_z.item<double>());
    // The shift uses the global k: every rank sees all k negatives, owned or not.
    const acc_t shift = binary_shift(objective, log_z_value, columns.k);
    const acc_t weight_of_positive = static_cast<acc_t>(positive_weight);
    const scalar_t* hp = h.const_data_ptr<scalar_t>();
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    const scalar_t* bp = b.defined() ? b.const_data_ptr<scalar_t>() : nullptr;
    const float* qp = uses_noise ? q.const_data_ptr<float>() : nullptr;
    acc_t* statp = stat.mutable_data_ptr<acc_t>();
    acc_t* coefp = coef.mutable_data_ptr<acc_t>();
    const int64_t h_stride = h.stride(0), w_stride = w.stride(0);
    // What an entry that this shard does not hold leaves behind: no loss, no gradient (binary);
    // a logit of -inf (softmax).
    const acc_t absent = softmax ? kNegInf : acc_t(0);

    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, cols * dim));
    at::parallel_for(0, n_examples, grain, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> h_row(dim);
      for (int64_t i = begin; i < end; ++i) {
        acc_t* s = coefp + i * cols;
        if (columns.valid_positives(i) == 0) {
          statp[i] = absent;
          std::fill(s, s + cols, absent);
          continue;
        }
        load_row(hp + i * h_stride, h_row.data(), dim);
        acc_t partial = softmax ? kNegInf : acc_t(0);
        for (int64_t j = 0; j < cols; ++j) {
          const int64_t c = columns.class_of(i, j);
          if (columns.dropped(i, j, c, remove_accidental_hits) || !owns(c, row_start, rows)) {
            s[j] = absent;
            continue;
          }
          const int64_t r = c - row_start;
          const scalar_t* w_row = wp + r * w_stride;
          const acc_t score =
              dot(h_row.data(), w_row, dim) + (bp ? static_cast<acc_t>(bp[r]) : acc_t(0));
          // A hard negative was not drawn from q: no log q.
          const bool drawn = columns.positive(j) || columns.sampled(j);
          const acc_t log_q = uses_noise && drawn ? log_noise_prob<acc_t>(qp[c]) : acc_t(0);
          if (softmax) {
            s[j] = score - log_q;
            if (s[j] > partial) partial = s[j];
          } else {
            const bool positive = columns.positive(j);
            const Term<acc_t> term =
                binary_term(positive, binary_logit(objective, score, log_q, shift));
            const acc_t term_weight = positive ? weight_of_positive : acc_t(1);
            partial += term_weight * term.loss;
            s[j] = term_weight * term.grad;
          }
        }
        statp[i] = partial;
      }
    });
  });
  return {stat, coef};
}

TORCH_LIBRARY_IMPL(fused_nce, CPU, m) {
  m.impl("shard_loss_forward", &shard_loss_forward_cpu);
}

}  // namespace fused_nce
