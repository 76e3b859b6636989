// The differentiable loss op `sampled_loss`: autograd in C++ over the forward / backward ops, so a
// training step pays for no Python autograd Function (its context, saved-tensor and GC bookkeeping
// cost more than the kernels at small shapes). Every backend shares it; torch.compile traces
// through it into the forward and backward ops and their fake kernels, so sizes are read as
// SymInts (a plain size() would pin a dynamic batch size to the value traced first).
#include <ATen/ATen.h>
#include <ATen/FunctionalTensorWrapper.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/csrc/dynamo/compiled_autograd.h>
#include <torch/library.h>
#include <torch/version.h>

#include <algorithm>
#include <array>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>

namespace fused_nce {
namespace {

using torch::autograd::variable_list;
using OptTensor = std::optional<at::Tensor>;
namespace compiled_autograd = torch::dynamo::autograd;

using ForwardSig = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const OptTensor&, const at::Tensor&, const at::Tensor&,
    const OptTensor&, const OptTensor&, const at::Tensor&, int64_t, double, bool, int64_t);
using BackwardSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, bool,
    const at::Tensor&, const at::Tensor&, const OptTensor&, int64_t);
using BackwardRowsSig = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, bool,
    const at::Tensor&, const at::Tensor&, const OptTensor&, int64_t);
using BackwardHiddenSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                     const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                     const OptTensor&, int64_t);

template <typename Sig>
c10::TypedOperatorHandle<Sig> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// The op's arguments but the differentiable ones, as they travel from the loss op to its
// forward and backward.
struct CallArgs {
  const at::Tensor& target;
  const at::Tensor& negatives;
  const OptTensor& hard_negatives;
  const OptTensor& noise_probs;
  int64_t objective;
  double positive_weight;
  bool remove_accidental_hits;
  int64_t ignore_index;
};

std::tuple<at::Tensor, at::Tensor> call_forward(const at::Tensor& hidden, const at::Tensor& weight,
                                                const OptTensor& bias, const at::Tensor& log_z,
                                                const CallArgs& a) {
  static const auto op = find_op<ForwardSig>("fused_nce::sampled_loss_forward");
  return op.call(hidden, weight, bias, a.target, a.negatives, a.hard_negatives, a.noise_probs,
                 log_z, a.objective, a.positive_weight, a.remove_accidental_hits, a.ignore_index);
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

// The number of examples not ignored (with at least one valid positive in target [N] or
// [N, T]), at least 1, counted on the host.
int64_t kept_on_host(const at::Tensor& target, int64_t ignore_index) {
  const auto values = target.contiguous();
  const int64_t* tp = values.const_data_ptr<int64_t>();
  const int64_t n = values.size(0), positives = values.dim() == 2 ? values.size(1) : 1;
  int64_t kept = 0;
  for (int64_t i = 0; i < n; ++i) {
    bool any = false;
    for (int64_t t = 0; t < positives; ++t) any = any || tp[i * positives + t] != ignore_index;
    kept += any;
  }
  return std::max<int64_t>(kept, 1);
}

// The same count as a 0-dim tensor of `dtype` on target's device (no host sync).
at::Tensor kept_on_device(const at::Tensor& target, int64_t ignore_index, at::ScalarType dtype) {
  auto valid = target.ne(ignore_index);
  if (target.dim() == 2) valid = valid.any(1);
  return valid.sum(dtype).clamp_min_(1);
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
                         : kept_on_device(target, ignore_index, loss.scalar_type());
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

// The op's arguments that its backward reads.
struct LossArgs {
  bool has_bias = false;
  bool sparse_grad = false;
  int64_t objective = 0;
  int64_t ignore_index = 0;
  int64_t reduction = kMean;
};

// What the loss's backward reads: those arguments, the forward's inputs and coefficients, and the
// example count of the mean. hard_negatives is undefined when the call had none.
struct SavedLoss : LossArgs {
  at::Tensor hidden, weight, target, negatives, hard_negatives, coef, count;

  OptTensor hard() const {
    return hard_negatives.defined() ? OptTensor(hard_negatives) : OptTensor();
  }
};

// The inputs with a gradient edge, in the node's edge order.
enum Input : size_t { kHidden = 0, kWeight = 1, kBias = 2, kLogZ = 3, kNumInputs = 4 };
using NeedsGrad = std::array<bool, kNumInputs>;

// grad / count for the mean. Two plain CPU scalars of one dtype are divided here, as the division
// op would (same dtype, same rounding), without its dispatch and TensorIterator set-up. Anything
// else goes through the op: a negative or zero view of the gradient (its flags are resolved by the
// dispatcher, not stored in its data), a device tensor, a traced one.
at::Tensor mean_grad(const at::Tensor& grad, const at::Tensor& count) {
  if (grad.dim() != 0 || grad.scalar_type() != count.scalar_type() || grad.is_neg() ||
      grad._is_zerotensor() || !readable_on_host(grad) || !readable_on_host(count)) {
    return grad / count;
  }
  at::Tensor out = at::empty({}, grad.options());
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "fused_nce_mean_grad", [&] {
    *out.mutable_data_ptr<scalar_t>() =
        *grad.const_data_ptr<scalar_t>() / *count.const_data_ptr<scalar_t>();
  });
  return out;
}

// The gradients of hidden, weight, bias and log_z (undefined where not needed) from dloss.
variable_list loss_gradients(at::Tensor grad_loss, const SavedLoss& s, const NeedsGrad& needs) {
  // An undefined gradient stands for zeros: so do the inputs' (undefined, as torch's own nodes
  // return them).
  if (!grad_loss.defined()) return variable_list(kNumInputs);
  static const auto backward_dense = find_op<BackwardSig>("fused_nce::sampled_loss_backward");
  static const auto backward_rows =
      find_op<BackwardRowsSig>("fused_nce::sampled_loss_backward_rows");
  static const auto backward_hidden =
      find_op<BackwardHiddenSig>("fused_nce::sampled_loss_backward_hidden");
  // The ops below have no gradient of their own: skip the Autograd dispatch key (a boxed
  // fallback that inspects every argument) and call their kernels directly.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  // dloss/dloss_i: [N], or under a reduction one scalar for every example (the backward ops
  // take either).
  if (s.reduction == kMean) grad_loss = mean_grad(grad_loss, s.count);
  const bool needs_weight = needs[kWeight] || (s.has_bias && needs[kBias]);
  at::Tensor grad_hidden, grad_weight, grad_bias, grad_log_z;
  if (needs_weight) {
    if (s.sparse_grad) {
      auto [gh, rows, weight_rows, bias_rows] =
          backward_rows.call(grad_loss, s.coef, s.hidden, s.weight, s.has_bias, s.target,
                             s.negatives, s.hard(), s.ignore_index);
      grad_hidden = gh;
      grad_weight = rows_to_sparse(rows, weight_rows, s.weight.sym_sizes());
      if (s.has_bias) {
        grad_bias = rows_to_sparse(rows, bias_rows, s.weight.sym_sizes().slice(0, 1));
      }
    } else {
      std::tie(grad_hidden, grad_weight, grad_bias) =
          backward_dense.call(grad_loss, s.coef, s.hidden, s.weight, s.has_bias, s.target,
                              s.negatives, s.hard(), s.ignore_index);
      if (!s.has_bias) grad_bias = at::Tensor();
    }
  } else if (needs[kHidden]) {
    // A frozen output layer: grad_hidden alone, no weight rows at all.
    grad_hidden = backward_hidden.call(grad_loss, s.coef, s.hidden, s.weight, s.target,
                                       s.negatives, s.hard(), s.ignore_index);
  }
  if (s.objective == 0 && needs[kLogZ]) {
    // NCE's d = s - log_z - log(k q): dloss/dlog_z = -sum_ij dloss/ds_ij. Summed per example,
    // then by a scan (after a leading zero, for an empty batch): both add in one order whatever
    // the thread count, where sum() over everything splits a long sum across threads.
    const auto per_example =
        ((grad_loss.dim() == 0 ? grad_loss : grad_loss.unsqueeze(1)) * s.coef).sum(1);
    grad_log_z = -at::pad(per_example, {1, 0}).cumsum(0).select(0, -1);
  }
  return {grad_hidden, grad_weight, grad_bias, grad_log_z};
}

// The graph node of the loss: the gradients of its four edges (hidden, weight, bias, log_z). A
// plain Node, as torch's own backward nodes are, not a torch::autograd::Function: no context, no
// IValue map of saved values and no checks over the op's twelve arguments on every call; at
// small shapes that bookkeeping cost more than the kernels.
struct SampledLossBackward : public torch::autograd::Node {
  std::string name() const override { return "SampledLossBackward"; }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto* saved : saved_variables()) saved->reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    variable_list result;
    {
      at::AutoGradMode no_grad(false);
      // Only the gradients this backward was asked for (task_should_compute_output is false for
      // an input left out of autograd.grad(loss, inputs) or backward(inputs=...)).
      result = loss_gradients(grads[0], unpacked(),
                              {task_should_compute_output(kHidden),
                               task_should_compute_output(kWeight),
                               task_should_compute_output(kBias),
                               task_should_compute_output(kLogZ)});
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

  // Compiled autograd (torch._dynamo.compiled_autograd): the values that specialize a traced
  // backward, and the backward as a call in its graph.
  void compiled_args(compiled_autograd::CompiledNodeArgs& args) const override {
    for (const auto* saved : saved_variables()) args.collect(*saved, /*is_output=*/false);
    args.collect(args_.has_bias);
    args.collect(args_.sparse_grad);
    args.collect(args_.objective);
    args.collect(args_.ignore_index);
    args.collect(args_.reduction);
  }

  variable_list apply_with_saved(const variable_list& grads,
                                 compiled_autograd::SwapSavedVariables& saved) override {
    for (auto* variable : saved_variables()) saved.before(*variable);
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 7)
    // Since torch 2.7 the graph is first captured with placeholder tensors (sizes unknown), so
    // the backward goes in as one opaque call, traced later with real shapes.
    const SavedLoss s = unpacked();
    compiled_autograd::PackedArgs packed;
    packed.pack(s.has_bias);
    packed.pack(s.sparse_grad);
    packed.pack(s.objective);
    packed.pack(s.ignore_index);
    packed.pack(s.reduction);
    for (const auto* t : {&s.hidden, &s.weight, &s.target, &s.negatives, &s.coef}) packed.pack(*t);
    packed.pack(s.hard_negatives.defined());
    if (s.hard_negatives.defined()) packed.pack(s.hard_negatives);
    if (s.reduction == kMean) packed.pack(s.count);
    std::vector<bool> needs;
    for (size_t i = 0; i < kNumInputs; ++i) needs.push_back(task_should_compute_output(i));
    packed.pack(needs);
    const auto& args = packed.vec();
    std::vector<at::TypePtr> schema;
    for (const auto& value : args) {
      schema.push_back(value.isTensor() ? at::TensorType::get() : value.type());
    }
    const auto& py = compiled_autograd::getPyCompilerInterface();
    // Bound once per process: the schema above is the same for every call of one reduction.
    static std::mutex bind_mutex;
    static std::string names[3];
    std::string fn_name;
    {
      std::lock_guard<std::mutex> lock(bind_mutex);
      std::string& bound = names[s.reduction];
      if (bound.empty()) {
        bound = py->bind_function(saved.get_py_compiler(),
                                  name() + std::to_string(s.reduction), apply_functional, schema);
      }
      fn_name = bound;
    }
    using Metadata = std::vector<std::optional<torch::autograd::InputMetadata>>;
    const auto output_metadata = compiled_autograd::IValuePacker<Metadata>::pack(
        compiled_autograd::get_input_metadata(next_edges()));
    variable_list result = py->call_function(saved.get_py_compiler(), "apply_functional",
                                             fn_name, grads, args, output_metadata);
#else
    // Before torch 2.7 the graph is captured by running the backward on proxies.
    variable_list result = apply(variable_list(grads));
#endif
    for (auto* variable : saved_variables()) saved.after(*variable);
    return result;
  }

  torch::autograd::SavedVariable hidden_, weight_, target_, negatives_, hard_negatives_, coef_,
      count_;
  LossArgs args_;

 private:
  std::array<torch::autograd::SavedVariable*, 7> saved_variables() {
    return {&hidden_, &weight_, &target_, &negatives_, &hard_negatives_, &coef_, &count_};
  }
  std::array<const torch::autograd::SavedVariable*, 7> saved_variables() const {
    return {&hidden_, &weight_, &target_, &negatives_, &hard_negatives_, &coef_, &count_};
  }

  SavedLoss unpacked() const {
    return {args_,
            hidden_.unpack(),
            weight_.unpack(),
            target_.unpack(),
            negatives_.unpack(),
            hard_negatives_.unpack(),
            coef_.unpack(),
            count_.unpack()};
  }

#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 7)
  // The backward as compiled autograd calls it: the values packed by apply_with_saved.
  static variable_list apply_functional(const variable_list& grads,
                                        const std::vector<c10::IValue>& args) {
    compiled_autograd::PackedArgs packed(args);
    SavedLoss s;
    s.has_bias = packed.unpack<bool>();
    s.sparse_grad = packed.unpack<bool>();
    s.objective = packed.unpack<int64_t>();
    s.ignore_index = packed.unpack<int64_t>();
    s.reduction = packed.unpack<int64_t>();
    for (auto* t : {&s.hidden, &s.weight, &s.target, &s.negatives, &s.coef}) {
      *t = packed.unpack<at::Tensor>();
    }
    if (packed.unpack<bool>()) s.hard_negatives = packed.unpack<at::Tensor>();
    if (s.reduction == kMean) s.count = packed.unpack<at::Tensor>();
    const auto needs = packed.unpack<std::vector<bool>>();
    at::AutoGradMode no_grad(false);
    return loss_gradients(grads[0], s, {needs[0], needs[1], needs[2], needs[3]});
  }
#endif
};

// A new node, held as the torch built against holds graph nodes (shared_ptr in torch 2.11,
// intrusive_ptr in 2.13).
template <typename T>
auto make_node() {
  using NodePtr = decltype(torch::autograd::Edge::function);
  if constexpr (std::is_same_v<NodePtr, std::shared_ptr<torch::autograd::Node>>) {
    // deleteNode (found through T's base, torch::autograd::Node) frees a long chain of nodes
    // without recursing; torch 2.13 has no such function, so it is named only here.
    return std::shared_ptr<T>(new T(), [](T* node) { deleteNode(node); });
  } else {
    return c10::make_intrusive<T>();
  }
}

// Below autograd (inference mode, or inside another op): the forward alone.
at::Tensor sampled_loss_forward_only(const at::Tensor& hidden, const at::Tensor& weight,
                                     const OptTensor& bias, const at::Tensor& target,
                                     const at::Tensor& negatives, const OptTensor& hard_negatives,
                                     const OptTensor& noise_probs, const at::Tensor& log_z,
                                     int64_t objective, double positive_weight,
                                     bool remove_accidental_hits, int64_t ignore_index,
                                     bool sparse_grad, int64_t reduction) {
  at::Tensor count;
  const CallArgs args{target,    negatives,       hard_negatives,         noise_probs,
                      objective, positive_weight, remove_accidental_hits, ignore_index};
  return reduce(std::get<0>(call_forward(hidden, weight, bias, log_z, args)), target, ignore_index,
                reduction, &count);
}

at::Tensor sampled_loss_autograd(const at::Tensor& hidden, const at::Tensor& weight,
                                 const OptTensor& bias, const at::Tensor& target,
                                 const at::Tensor& negatives, const OptTensor& hard_negatives,
                                 const OptTensor& noise_probs, const at::Tensor& log_z,
                                 int64_t objective, double positive_weight,
                                 bool remove_accidental_hits, int64_t ignore_index,
                                 bool sparse_grad, int64_t reduction) {
  const auto any_of_inputs = [&](const auto& test) {
    return test(hidden) || test(weight) || (bias.has_value() && bias->defined() && test(*bias)) ||
           test(log_z);
  };
  TORCH_CHECK_NOT_IMPLEMENTED(
      !any_of_inputs([](const at::Tensor& t) { return t._fw_grad(/*level=*/0).defined(); }),
      "fused_nce's sampled losses are differentiable in reverse mode only: forward-mode AD (a "
      "jvp) is not implemented");
  const bool needs_node = at::GradMode::is_enabled() &&
                          any_of_inputs([](const at::Tensor& t) { return t.requires_grad(); });
  if (!needs_node) {
    // Nothing to differentiate (no_grad, or frozen inputs): the forward alone, no graph node.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return sampled_loss_forward_only(hidden, weight, bias, target, negatives, hard_negatives,
                                     noise_probs, log_z, objective, positive_weight,
                                     remove_accidental_hits, ignore_index, sparse_grad, reduction);
  }
  at::Tensor reduced, coef, count;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    at::Tensor loss;
    const CallArgs args{target,    negatives,       hard_negatives,         noise_probs,
                        objective, positive_weight, remove_accidental_hits, ignore_index};
    std::tie(loss, coef) = call_forward(hidden, weight, bias, log_z, args);
    reduced = reduce(loss, target, ignore_index, reduction, &count);
  }
  auto node = make_node<SampledLossBackward>();
  node->set_next_edges(torch::autograd::collect_next_edges(hidden, weight, bias, log_z));
  node->hidden_ = torch::autograd::SavedVariable(hidden, /*is_output=*/false);
  node->weight_ = torch::autograd::SavedVariable(weight, false);
  node->target_ = torch::autograd::SavedVariable(target, false);
  node->negatives_ = torch::autograd::SavedVariable(negatives, false);
  node->hard_negatives_ = torch::autograd::SavedVariable(
      hard_negatives.has_value() ? *hard_negatives : at::Tensor(), false);
  node->coef_ = torch::autograd::SavedVariable(coef, false);
  node->count_ = torch::autograd::SavedVariable(count, false);
  node->args_ = {bias.has_value() && bias->defined(), sparse_grad, objective, ignore_index,
                 reduction};
  torch::autograd::set_history(reduced, node);
  return reduced;
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_nce, Autograd, m) {
  m.impl("sampled_loss", &sampled_loss_autograd);
}

TORCH_LIBRARY_IMPL(fused_nce, CompositeExplicitAutograd, m) {
  m.impl("sampled_loss", &sampled_loss_forward_only);
}

}  // namespace fused_nce
