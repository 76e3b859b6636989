// The differentiable loss op `sampled_loss`: autograd in C++ over the forward / backward ops, so a
// training step pays for no Python autograd Function (its context, saved-tensor and GC bookkeeping
// cost more than the kernels at small shapes). Every backend shares it; torch.compile traces
// through it into the forward and backward ops and their fake kernels, so sizes are read as
// SymInts (a plain size() would pin a dynamic batch size to the value traced first).
#include <ATen/ATen.h>
#include <ATen/FunctionalTensorWrapper.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>

namespace fused_nce {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<at::Tensor>;

using ForwardSig = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const OptTensor&, const at::Tensor&, const at::Tensor&,
    const OptTensor&, const at::Tensor&, int64_t, bool, int64_t);
using BackwardSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, bool,
    const at::Tensor&, const at::Tensor&, int64_t);
using BackwardRowsSig = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, bool,
    const at::Tensor&, const at::Tensor&, int64_t);
using BackwardHiddenSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                     const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                     int64_t);

template <typename Sig>
c10::TypedOperatorHandle<Sig> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

std::tuple<at::Tensor, at::Tensor> call_forward(const at::Tensor& hidden, const at::Tensor& weight,
                                                const OptTensor& bias, const at::Tensor& target,
                                                const at::Tensor& negatives,
                                                const OptTensor& noise_probs,
                                                const at::Tensor& log_z, int64_t objective,
                                                bool remove_accidental_hits, int64_t ignore_index) {
  static const auto op = find_op<ForwardSig>("fused_nce::sampled_loss_forward");
  return op.call(hidden, weight, bias, target, negatives, noise_probs, log_z, objective,
                 remove_accidental_hits, ignore_index);
}

// A coalesced COO tensor of `size` whose only non-zero rows are `values` at the strictly ascending
// `rows` (as the rows op returns them: checking the invariants again would cost a pass).
at::Tensor rows_to_sparse(const at::Tensor& rows, const at::Tensor& values,
                          c10::SymIntArrayRef size) {
  return at::_sparse_coo_tensor_unsafe_symint(rows.unsqueeze(0), values, size,
                                       values.options().layout(at::kSparse),
                                       /*is_coalesced=*/true);
}

// Reductions of the `reduction` argument; python/fused_nce/_ops.py mirrors them.
enum Reduction : int64_t { kNone = 0, kSum = 1, kMean = 2 };

// Whether a tensor's values can be read here: an ordinary CPU tensor, not a fake or functional
// one traced by torch.compile. Values on a device are never read on the host.
bool readable_on_host(const at::Tensor& t) {
  return t.is_cpu() && t.has_storage() && !t.unsafeGetTensorImpl()->is_python_dispatch() &&
         !at::functionalization::impl::isFunctionalTensor(t);
}

// The number of examples not ignored, at least 1, counted on the host.
int64_t kept_on_host(const at::Tensor& target, int64_t ignore_index) {
  const auto values = target.contiguous();
  const int64_t* tp = values.const_data_ptr<int64_t>();
  int64_t kept = 0;
  for (int64_t i = 0, n = values.numel(); i < n; ++i) kept += tp[i] != ignore_index;
  return std::max<int64_t>(kept, 1);
}

// The per-example loss reduced; the mean divides by the number of examples not ignored (at least
// 1), returned in `count` for the backward as a 0-dim tensor of the loss dtype (neither division
// by it casts). A readable float32 loss is summed here in float64, in one pass, and a readable
// target counted in one pass: no sum, count or division ops, and the same order whatever the
// thread count.
at::Tensor reduce(const at::Tensor& loss, const at::Tensor& target, int64_t ignore_index,
                  int64_t reduction, at::Tensor* count) {
  TORCH_CHECK_VALUE(reduction >= kNone && reduction <= kMean, "unknown reduction ", reduction);
  if (reduction == kNone) return loss;
  const bool host_target = readable_on_host(target);
  const double kept = reduction == kMean && host_target
                          ? static_cast<double>(kept_on_host(target, ignore_index))
                          : 1.0;
  if (reduction == kMean) {
    *count = host_target ? at::scalar_tensor(kept, loss.options())
                         : target.ne(ignore_index).sum(loss.scalar_type()).clamp_min_(1);
  }
  if (loss.scalar_type() == at::kFloat && readable_on_host(loss) && host_target) {
    const auto values = loss.contiguous();
    const float* lp = values.const_data_ptr<float>();
    double total = 0;
    for (int64_t i = 0, n = values.numel(); i < n; ++i) total += lp[i];
    return at::scalar_tensor(total / kept, loss.options());
  }
  return reduction == kSum ? loss.sum() : loss.sum() / *count;
}

// The loss reduced by `reduction` (kMean: over the examples not ignored); differentiable in hidden,
// weight, bias and log_z. With sparse_grad the gradients of weight and bias are coalesced sparse
// COO tensors holding only the touched rows.
class SampledLoss : public torch::autograd::Function<SampledLoss> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& hidden,
                            const at::Tensor& weight, const OptTensor& bias,
                            const at::Tensor& target, const at::Tensor& negatives,
                            const OptTensor& noise_probs, const at::Tensor& log_z,
                            int64_t objective, bool remove_accidental_hits, int64_t ignore_index,
                            bool sparse_grad, int64_t reduction) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [loss, coef] = call_forward(hidden, weight, bias, target, negatives, noise_probs, log_z,
                                     objective, remove_accidental_hits, ignore_index);
    const bool has_bias = bias.has_value() && bias->defined();
    const bool has_noise = noise_probs.has_value() && noise_probs->defined();
    at::Tensor count;
    const at::Tensor reduced = reduce(loss, target, ignore_index, reduction, &count);
    ctx->save_for_backward({hidden, weight, target, negatives, coef, count});
    ctx->saved_data["has_bias"] = has_bias;
    // needs_input_grad counts the tensor inputs present: hidden, weight, [bias], target,
    // negatives, [noise_probs], log_z.
    ctx->saved_data["log_z_input"] = int64_t{4} + has_bias + has_noise;
    ctx->saved_data["objective"] = objective;
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->saved_data["sparse_grad"] = sparse_grad;
    ctx->saved_data["reduction"] = reduction;
    return reduced;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list result;
    {
      at::AutoGradMode no_grad(false);
      result = gradients(ctx, grads);
    }
    if (at::GradMode::is_enabled()) {
      // Under create_graph: once differentiable. The gradients require grad (they depend on
      // hidden and weight), and differentiating them again raises instead of giving zero.
      for (auto& g : result) {
        if (g.defined()) g = g.detach().requires_grad_();
      }
      result = torch::autograd::DelayedError(
                   "fused_nce's sampled losses are once differentiable: their gradients cannot be "
                   "differentiated again",
                   static_cast<int64_t>(result.size()))
                   .apply(std::move(result));
    }
    return result;
  }

 private:
  static variable_list gradients(AutogradContext* ctx, const variable_list& grads) {
    static const auto backward_dense = find_op<BackwardSig>("fused_nce::sampled_loss_backward");
    static const auto backward_rows =
        find_op<BackwardRowsSig>("fused_nce::sampled_loss_backward_rows");
    static const auto backward_hidden =
        find_op<BackwardHiddenSig>("fused_nce::sampled_loss_backward_hidden");
    // The ops below have no gradient of their own: skip the Autograd dispatch key (a boxed
    // fallback that inspects every argument) and call their kernels directly.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &hidden = saved[0], &weight = saved[1], &target = saved[2],
                     &negatives = saved[3], &coef = saved[4], &count = saved[5];
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const int64_t ignore_index = ctx->saved_data["ignore_index"].toInt();
    const int64_t reduction = ctx->saved_data["reduction"].toInt();
    // dloss/dloss_i: [N], or under a reduction one scalar for every example (the backward ops
    // take either).
    at::Tensor grad_loss = grads[0];
    if (reduction == kMean) grad_loss = grad_loss / count;
    const bool needs_hidden = ctx->needs_input_grad(0);
    const bool needs_weight = ctx->needs_input_grad(1) || (has_bias && ctx->needs_input_grad(2));
    at::Tensor grad_hidden, grad_weight, grad_bias, grad_log_z;
    if (needs_weight) {
      if (ctx->saved_data["sparse_grad"].toBool()) {
        auto [gh, rows, weight_rows, bias_rows] = backward_rows.call(
            grad_loss, coef, hidden, weight, has_bias, target, negatives, ignore_index);
        grad_hidden = gh;
        grad_weight = rows_to_sparse(rows, weight_rows, weight.sym_sizes());
        if (has_bias) grad_bias = rows_to_sparse(rows, bias_rows, weight.sym_sizes().slice(0, 1));
      } else {
        std::tie(grad_hidden, grad_weight, grad_bias) = backward_dense.call(
            grad_loss, coef, hidden, weight, has_bias, target, negatives, ignore_index);
        if (!has_bias) grad_bias = at::Tensor();
      }
    } else if (needs_hidden) {
      // A frozen output layer: grad_hidden alone, no weight rows at all.
      grad_hidden = backward_hidden.call(grad_loss, coef, hidden, weight, target, negatives,
                                         ignore_index);
    }
    if (ctx->saved_data["objective"].toInt() == 0 &&
        ctx->needs_input_grad(ctx->saved_data["log_z_input"].toInt())) {
      // NCE's d = s - log_z - log(k q): dloss/dlog_z = -sum_ij dloss/ds_ij. Summed per example,
      // then by a scan (after a leading zero, for an empty batch): both add in one order whatever
      // the thread count, where sum() over everything splits a long sum across threads.
      const auto per_example =
          ((grad_loss.dim() == 0 ? grad_loss : grad_loss.unsqueeze(1)) * coef).sum(1);
      grad_log_z = -at::pad(per_example, {1, 0}).cumsum(0).select(0, -1);
    }
    return {grad_hidden, grad_weight, grad_bias, at::Tensor(), at::Tensor(), at::Tensor(),
            grad_log_z, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// Below autograd (inference mode, or inside another op): the forward alone.
at::Tensor sampled_loss_forward_only(const at::Tensor& hidden, const at::Tensor& weight,
                                     const OptTensor& bias, const at::Tensor& target,
                                     const at::Tensor& negatives, const OptTensor& noise_probs,
                                     const at::Tensor& log_z, int64_t objective,
                                     bool remove_accidental_hits, int64_t ignore_index,
                                     bool sparse_grad, int64_t reduction) {
  at::Tensor count;
  return reduce(std::get<0>(call_forward(hidden, weight, bias, target, negatives, noise_probs,
                                         log_z, objective, remove_accidental_hits, ignore_index)),
                target, ignore_index, reduction, &count);
}

at::Tensor sampled_loss_autograd(const at::Tensor& hidden, const at::Tensor& weight,
                                 const OptTensor& bias, const at::Tensor& target,
                                 const at::Tensor& negatives, const OptTensor& noise_probs,
                                 const at::Tensor& log_z, int64_t objective,
                                 bool remove_accidental_hits, int64_t ignore_index,
                                 bool sparse_grad, int64_t reduction) {
  // Whether Function::apply has anything to do: a gradient to record, or a forward-mode tangent
  // (which it rejects with a clear error).
  const auto any_of_inputs = [&](const auto& test) {
    return test(hidden) || test(weight) || (bias.has_value() && bias->defined() && test(*bias)) ||
           test(log_z);
  };
  const bool needs_function =
      (at::GradMode::is_enabled() &&
       any_of_inputs([](const at::Tensor& t) { return t.requires_grad(); })) ||
      any_of_inputs([](const at::Tensor& t) { return t._fw_grad(/*level=*/0).defined(); });
  if (!needs_function) {
    // Nothing to differentiate (no_grad, or frozen inputs): the forward alone, without the
    // graph node and saved tensors that Function::apply would make anyway.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return sampled_loss_forward_only(hidden, weight, bias, target, negatives, noise_probs, log_z,
                                     objective, remove_accidental_hits, ignore_index, sparse_grad,
                                     reduction);
  }
  return SampledLoss::apply(hidden, weight, bias, target, negatives, noise_probs, log_z, objective,
                            remove_accidental_hits, ignore_index, sparse_grad, reduction);
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_nce, Autograd, m) {
  m.impl("sampled_loss", &sampled_loss_autograd);
}

TORCH_LIBRARY_IMPL(fused_nce, CompositeExplicitAutograd, m) {
  m.impl("sampled_loss", &sampled_loss_forward_only);
}

}  // namespace fused_nce
