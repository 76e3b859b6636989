// Every op's schema, declared once; kernels register per backend in cpu/ and cuda/.
#include <pybind11/pybind11.h>
#include <torch/library.h>

TORCH_LIBRARY(fused_nce, m) {
  // Fused gather + scores + stable logits + per-example loss + dloss/dscore, one pass.
  // Columns (columns.h): target [N] or [N, T], negatives [N, k] or [k] (shared), hard_negatives
  // [N, h] or None; ignore_index pads target and hard_negatives. positive_weight scales the
  // positive terms of the binary objectives (gBCE's beta; 1 otherwise). Returns the loss [N] and
  // dloss/dscore [N, T + k + h].
  m.def(
      "sampled_loss_forward(Tensor hidden, Tensor weight, Tensor? bias, Tensor target, "
      "Tensor negatives, Tensor? hard_negatives, Tensor? noise_probs, Tensor log_z, "
      "int objective, float positive_weight, bool remove_accidental_hits, int ignore_index) "
      "-> (Tensor, Tensor)");
  // The differentiable loss (autograd.cpp) over the ops below: the forward's loss reduced by
  // `reduction` (0 none [N], 1 sum, 2 mean over the examples not ignored: those with a valid
  // positive).
  m.def(
      "sampled_loss(Tensor hidden, Tensor weight, Tensor? bias, Tensor target, Tensor negatives, "
      "Tensor? hard_negatives, Tensor? noise_probs, Tensor log_z, int objective, "
      "float positive_weight, bool remove_accidental_hits, int ignore_index, bool sparse_grad, "
      "int reduction) -> Tensor");
  // grad_hidden by a second gather; grad_weight / grad_bias into the touched rows only. In every
  // backward op grad_loss is [N], or a scalar that stands for the same value for every example.
  m.def(
      "sampled_loss_backward(Tensor grad_loss, Tensor coef, Tensor hidden, Tensor weight, "
      "bool has_bias, Tensor target, Tensor negatives, Tensor? hard_negatives, int ignore_index) "
      "-> (Tensor, Tensor, Tensor)");
  // The same, with only the touched rows of weight / bias: (grad_hidden, rows, grad_weight[rows],
  // grad_bias[rows]), rows ascending; for sparse gradients.
  m.def(
      "sampled_loss_backward_rows(Tensor grad_loss, Tensor coef, Tensor hidden, Tensor weight, "
      "bool has_bias, Tensor target, Tensor negatives, Tensor? hard_negatives, int ignore_index) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  // grad_hidden alone, for a frozen output layer: no weight rows are summed or returned.
  m.def(
      "sampled_loss_backward_hidden(Tensor grad_loss, Tensor coef, Tensor hidden, Tensor weight, "
      "Tensor target, Tensor negatives, Tensor? hard_negatives, int ignore_index) -> Tensor");
  // Vocab-parallel: `weight` (and `bias`) are rows [row_start, row_start + rows) of a
  // num_classes-row embedding; indices are global and checked against num_classes, and only the
  // owned ones are read. Columns as in sampled_loss_forward. NCE / negative sampling: (this
  // shard's part of each example's loss [N], dloss/dscore [N, T + k + h], 0 where not owned).
  // Sampled softmax: (each example's largest owned logit [N], the logQ-corrected logits
  // [N, T + k + h], -inf where not owned or dropped), from which the caller forms the global
  // log-sum-exp.
  m.def(
      "shard_loss_forward(Tensor hidden, Tensor weight, Tensor? bias, Tensor target, "
      "Tensor negatives, Tensor? hard_negatives, Tensor? noise_probs, Tensor log_z, "
      "int objective, float positive_weight, bool remove_accidental_hits, int ignore_index, "
      "int row_start, int num_classes) -> (Tensor, Tensor)");
  // Backward of a shard from its coefficients (0 where not owned): (grad_hidden, this shard's part;
  // rows; grad_weight; grad_bias) with mode 0 = dense [rows, D] / [rows] gradients, 1 = touched
  // rows only (local indices, ascending), 2 = grad_hidden alone.
  m.def(
      "shard_loss_backward(Tensor grad_loss, Tensor coef, Tensor hidden, Tensor weight, "
      "bool has_bias, Tensor target, Tensor negatives, Tensor? hard_negatives, int ignore_index, "
      "int row_start, int num_classes, int mode) -> (Tensor, Tensor, Tensor, Tensor)");
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

// Retrieval: in-batch / mixed-negative softmax over column blocks and the frequency estimator.
TORCH_LIBRARY_FRAGMENT(fused_nce, m) {
  // Per-row loss lse_i - o_ii and lse_i [N] over columns [K, D] (the positive of row i is column
  // pos_offset + i), o_ij = <query_i, column_j> / temperature - log_q_j; block_size 0: automatic.
  m.def(
      "in_batch_forward(Tensor query, Tensor columns, Tensor? log_q, Tensor column_ids, "
      "Tensor temperature, int pos_offset, bool remove_accidental_hits, int block_size) "
      "-> (Tensor, Tensor)");
  // Gradients of sum_i grad_loss[i] * loss[i] in query, columns and temperature (blocks
  // recomputed from the saved lse).
  m.def(
      "in_batch_backward(Tensor grad_loss, Tensor query, Tensor columns, Tensor? log_q, "
      "Tensor column_ids, Tensor temperature, Tensor lse, int pos_offset, "
      "bool remove_accidental_hits, int block_size) -> (Tensor, Tensor, Tensor)");
  // One step of the hashed last-seen / gap-EMA / count-EMA arrays for the ids seen at `step`.
  m.def(
      "frequency_update(Tensor(a!) last_seen, Tensor(b!) gap, Tensor(c!) count, Tensor ids, "
      "Tensor step, float alpha) -> ()");
  // Per id after `step` updates: estimated steps between sightings and occurrences per step.
  m.def(
      "frequency_estimate(Tensor last_seen, Tensor gap, Tensor count, Tensor ids, Tensor step) "
      "-> (Tensor, Tensor)");
}

// The Python module only has to exist: importing it runs the registrations above.
PYBIND11_MODULE(_C, m) {
  m.doc() = "fused_nce kernels, registered as torch.ops.fused_nce";
}
