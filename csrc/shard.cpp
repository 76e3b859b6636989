// The backward of a shard of W, for every backend: the single-device backward kernels run on
// shard-local indices. Entries this shard does not own have a zero coefficient (the forward wrote
// them so), which every backward kernel skips without reading the row; their index is only
// clamped into the shard so that nothing could address outside it. Shared negatives are first
// narrowed to the owned ones, so nothing outside the shard is gathered either.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "checks.h"
#include "shard.h"

namespace fused_nce {
namespace {

enum ShardGradMode : int64_t { kDenseGrad = 0, kRowsGrad = 1, kHiddenGrad = 2 };

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> shard_loss_backward(
    const at::Tensor& grad_loss, const at::Tensor& coef, const at::Tensor& hidden,
    const at::Tensor& weight, bool has_bias, const at::Tensor& target,
    const at::Tensor& negatives, const std::optional<at::Tensor>& hard_negatives,
    int64_t ignore_index, int64_t row_start, int64_t num_classes, int64_t mode) {
  check_shapes(hidden, weight, std::nullopt, target, negatives, hard_negatives);
  check_shard(weight, row_start, num_classes);
  TORCH_CHECK_VALUE(mode >= kDenseGrad && mode <= kHiddenGrad, "unknown mode ", mode);
  const int64_t rows = weight.size(0), dim = weight.size(1), k = negatives.size(-1);
  const int64_t positives = num_positives(target);
  const int64_t cols = positives + k + num_hard(hard_negatives);
  TORCH_CHECK_VALUE(coef.dim() == 2 && coef.size(0) == hidden.size(0) && coef.size(1) == cols,
                    "coef must be [N, T + k + h]");
  const auto index_opts = target.options();
  if (rows == 0) {
    // A shard without rows holds no part of any score.
    return {at::zeros_like(hidden), at::empty({0}, index_opts), at::empty({0, dim}, weight.options()),
            at::empty({0}, weight.options())};
  }
  const auto local = [&](const at::Tensor& idx) {
    return (idx - row_start).clamp(0, rows - 1);
  };
  // Ignored examples and padding have zero coefficients: after the remap no local index can be
  // -1, so the kernels see no padding and skip those entries for their zero coefficient.
  constexpr int64_t kNoIgnore = -1;
  const auto local_target = local(target);
  std::optional<at::Tensor> local_hard;
  if (hard_negatives.has_value()) local_hard = local(*hard_negatives);
  at::Tensor local_neg, local_coef = coef;
  if (negatives.dim() == 1) {
    const auto owned = ((negatives >= row_start) & (negatives < row_start + rows)).nonzero().view(-1);
    local_neg = negatives.index_select(0, owned) - row_start;
    local_coef = at::cat({coef.narrow(1, 0, positives), coef.index_select(1, owned + positives),
                          coef.narrow(1, positives + k, cols - positives - k)},
                         1);
  } else {
    local_neg = local(negatives);
  }
  static const auto backward = c10::Dispatcher::singleton()
      .findSchemaOrThrow("fused_nce::sampled_loss_backward", "")
      .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
          const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, bool,
          const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, int64_t)>();
  static const auto backward_rows = c10::Dispatcher::singleton()
      .findSchemaOrThrow("fused_nce::sampled_loss_backward_rows", "")
      .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
          const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, bool,
          const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, int64_t)>();
  static const auto backward_hidden = c10::Dispatcher::singleton()
      .findSchemaOrThrow("fused_nce::sampled_loss_backward_hidden", "")
      .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                        const at::Tensor&, const at::Tensor&, const at::Tensor&,
                        const std::optional<at::Tensor>&, int64_t)>();
  if (mode == kHiddenGrad) {
    auto gh = backward_hidden.call(grad_loss, local_coef, hidden, weight, local_target, local_neg,
                                   local_hard, kNoIgnore);
    return {gh, at::empty({0}, index_opts), at::empty({0, dim}, weight.options()),
            at::empty({0}, weight.options())};
  }
  if (mode == kRowsGrad) {
    return backward_rows.call(grad_loss, local_coef, hidden, weight, has_bias, local_target,
                              local_neg, local_hard, kNoIgnore);
  }
  auto [gh, gw, gb] = backward.call(grad_loss, local_coef, hidden, weight, has_bias, local_target,
                                    local_neg, local_hard, kNoIgnore);
  return {gh, at::empty({0}, index_opts), gw, gb};
}

}  // namespace

// CompositeExplicitAutograd: the ops it calls dispatch to the tensors' backend.
TORCH_LIBRARY_IMPL(fused_nce, CompositeExplicitAutograd, m) {
  m.impl("shard_loss_backward", &shard_loss_backward);
}

}  // namespace fused_nce
