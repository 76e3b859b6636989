// Every op's schema, declared once; kernels register per backend in cpu/ and cuda/.
#include <pybind11/pybind11.h>
#include <torch/library.h>

TORCH_LIBRARY(fused_nce, m) {
  // Fused gather + scores + stable logits + per-example loss + dloss/dscore, one pass.
  m.def(
      "sampled_loss_forward(Tensor hidden, Tensor weight, Tensor? bias, Tensor target, "
      "Tensor negatives, Tensor? noise_probs, Tensor log_z, int objective, "
      "bool remove_accidental_hits, int ignore_index) -> (Tensor, Tensor)");
  // grad_hidden by a second gather; grad_weight / grad_bias into the touched rows only.
  m.def(
      "sampled_loss_backward(Tensor grad_loss, Tensor coef, Tensor hidden, Tensor weight, "
      "bool has_bias, Tensor target, Tensor negatives, int ignore_index) -> (Tensor, Tensor, Tensor)");
  // The same, with only the touched rows of weight / bias: (grad_hidden, rows, grad_weight[rows],
  // grad_bias[rows]), rows ascending; for sparse gradients.
  m.def(
      "sampled_loss_backward_rows(Tensor grad_loss, Tensor coef, Tensor hidden, Tensor weight, "
      "bool has_bias, Tensor target, Tensor negatives, int ignore_index) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  // Walker/Vose alias table from non-negative weights.
  m.def("alias_build(Tensor weights) -> Tensor");
  // O(1) draws from an alias table, randomness from the generator (default one when None).
  m.def("alias_sample(Tensor table, SymInt[] size, Generator? generator=None) -> Tensor",
        {at::Tag::nondeterministic_seeded});

  // Fused row optimizers: update the parameter and its state in place at `rows` (strictly
  // ascending, as in a coalesced sparse gradient; grad [U, ...]), or at every row when rows is
  // None (grad [V, ...]). State is float32 (float64 for float64 parameters).
  m.def("row_sgd_step(Tensor(a!) param, Tensor? rows, Tensor grad, float lr, "
        "float weight_decay) -> ()");
  // state_sum is param's shape, or [V] when rowwise (one accumulator per row).
  m.def("row_adagrad_step(Tensor(a!) param, Tensor(b!) state_sum, Tensor? rows, Tensor grad, "
        "float lr, float eps, bool rowwise) -> ()");
  // step_size = lr sqrt(1 - beta2^t) / (1 - beta1^t); see adam_update in optim_math.h.
  m.def("row_adam_step(Tensor(a!) param, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, Tensor? rows, "
        "Tensor grad, float step_size, float beta1, float beta2, float eps) -> ()");
}

// The Python module only has to exist: importing it runs the registrations above.
PYBIND11_MODULE(_C, m) {
  m.doc() = "fused_nce kernels, registered as torch.ops.fused_nce";
}
