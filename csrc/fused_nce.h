// Host entry points of every op; the schemas live in ops.cpp, one backend per folder.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/Generator.h>

#include <optional>

namespace fused_nce {

// Per-example loss [N] (float32, float64 for float64 inputs) and dloss/dscore [N, T + k + h] for
// each column (columns.h: T positives, k negatives, [N, k] per example or [k] shared, h hard).
std::tuple<at::Tensor, at::Tensor> sampled_loss_forward_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& target, const at::Tensor& negatives,
    const std::optional<at::Tensor>& hard_negatives, const std::optional<at::Tensor>& noise_probs,
    const at::Tensor& log_z, int64_t objective, double positive_weight,
    bool remove_accidental_hits, int64_t ignore_index);

// Gradients of sum_i grad_loss[i] * loss[i] for hidden [N, D], weight [V, D] and bias [V] (an
// empty tensor when has_bias is false). Only rows of weight that appear as a target or negative
// are written; the others are zero.
std::tuple<at::Tensor, at::Tensor, at::Tensor> sampled_loss_backward_cpu(
    const at::Tensor& grad_loss, const at::Tensor& coef, const at::Tensor& hidden,
    const at::Tensor& weight, bool has_bias, const at::Tensor& target,
    const at::Tensor& negatives, const std::optional<at::Tensor>& hard_negatives,
    int64_t ignore_index);

// The same gradients with only the touched rows of weight / bias: (grad_hidden, rows [U] ascending,
// grad_weight [U, D], grad_bias [U] or empty).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sampled_loss_backward_rows_cpu(
    const at::Tensor& grad_loss, const at::Tensor& coef, const at::Tensor& hidden,
    const at::Tensor& weight, bool has_bias, const at::Tensor& target,
    const at::Tensor& negatives, const std::optional<at::Tensor>& hard_negatives,
    int64_t ignore_index);

// grad_hidden alone (a frozen output layer): the first output of the ops above.
at::Tensor sampled_loss_backward_hidden_cpu(const at::Tensor& grad_loss, const at::Tensor& coef,
                                            const at::Tensor& hidden, const at::Tensor& weight,
                                            const at::Tensor& target,
                                            const at::Tensor& negatives,
                                            const std::optional<at::Tensor>& hard_negatives,
                                            int64_t ignore_index);

// Walker/Vose alias table of non-negative weights [V]: int64 [V], see alias_draw in nce_math.h.
at::Tensor alias_build_cpu(const at::Tensor& weights);

// `size` draws from an alias table, with replacement.
at::Tensor alias_sample_cpu(const at::Tensor& table, at::IntArrayRef size,
                            std::optional<at::Generator> generator);

// The same ops on CUDA (csrc/cuda/), same semantics; index errors are device-side asserts.
std::tuple<at::Tensor, at::Tensor> sampled_loss_forward_cuda(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& target, const at::Tensor& negatives,
    const std::optional<at::Tensor>& hard_negatives, const std::optional<at::Tensor>& noise_probs,
    const at::Tensor& log_z, int64_t objective, double positive_weight,
    bool remove_accidental_hits, int64_t ignore_index);
std::tuple<at::Tensor, at::Tensor, at::Tensor> sampled_loss_backward_cuda(
    const at::Tensor& grad_loss, const at::Tensor& coef, const at::Tensor& hidden,
    const at::Tensor& weight, bool has_bias, const at::Tensor& target,
    const at::Tensor& negatives, const std::optional<at::Tensor>& hard_negatives,
    int64_t ignore_index);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sampled_loss_backward_rows_cuda(
    const at::Tensor& grad_loss, const at::Tensor& coef, const at::Tensor& hidden,
    const at::Tensor& weight, bool has_bias, const at::Tensor& target,
    const at::Tensor& negatives, const std::optional<at::Tensor>& hard_negatives,
    int64_t ignore_index);
at::Tensor sampled_loss_backward_hidden_cuda(const at::Tensor& grad_loss, const at::Tensor& coef,
                                             const at::Tensor& hidden, const at::Tensor& weight,
                                             const at::Tensor& target,
                                             const at::Tensor& negatives,
                                             const std::optional<at::Tensor>& hard_negatives,
                                             int64_t ignore_index);
at::Tensor alias_build_cuda(const at::Tensor& weights);
at::Tensor alias_sample_cuda(const at::Tensor& table, at::IntArrayRef size,
                             std::optional<at::Generator> generator);

// ---- Retrieval (cpu/in_batch_cpu.cpp, cuda/in_batch_cuda.cu); schemas in ops.cpp.
std::tuple<at::Tensor, at::Tensor> in_batch_forward_cpu(
    const at::Tensor& query, const at::Tensor& columns, const std::optional<at::Tensor>& log_q,
    const at::Tensor& column_ids, const at::Tensor& temperature, int64_t pos_offset,
    bool remove_accidental_hits, int64_t block_size);
std::tuple<at::Tensor, at::Tensor, at::Tensor> in_batch_backward_cpu(
    const at::Tensor& grad_loss, const at::Tensor& query, const at::Tensor& columns,
    const std::optional<at::Tensor>& log_q, const at::Tensor& column_ids,
    const at::Tensor& temperature, const at::Tensor& lse, int64_t pos_offset,
    bool remove_accidental_hits, int64_t block_size);
void frequency_update_cpu(at::Tensor& last_seen, at::Tensor& gap, at::Tensor& count,
                          const at::Tensor& ids, const at::Tensor& step, double alpha);
std::tuple<at::Tensor, at::Tensor> frequency_estimate_cpu(
    const at::Tensor& last_seen, const at::Tensor& gap, const at::Tensor& count,
    const at::Tensor& ids, const at::Tensor& step);
std::tuple<at::Tensor, at::Tensor> in_batch_forward_cuda(
    const at::Tensor& query, const at::Tensor& columns, const std::optional<at::Tensor>& log_q,
    const at::Tensor& column_ids, const at::Tensor& temperature, int64_t pos_offset,
    bool remove_accidental_hits, int64_t block_size);
std::tuple<at::Tensor, at::Tensor, at::Tensor> in_batch_backward_cuda(
    const at::Tensor& grad_loss, const at::Tensor& query, const at::Tensor& columns,
    const std::optional<at::Tensor>& log_q, const at::Tensor& column_ids,
    const at::Tensor& temperature, const at::Tensor& lse, int64_t pos_offset,
    bool remove_accidental_hits, int64_t block_size);
void frequency_update_cuda(at::Tensor& last_seen, at::Tensor& gap, at::Tensor& count,
                           const at::Tensor& ids, const at::Tensor& step, double alpha);
std::tuple<at::Tensor, at::Tensor> frequency_estimate_cuda(
    const at::Tensor& last_seen, const at::Tensor& gap, const at::Tensor& count,
    const at::Tensor& ids, const at::Tensor& step);
// Shared by both backends: argument checks and the automatic column block.
void check_in_batch_inputs(const at::Tensor& query, const at::Tensor& columns,
                           const std::optional<at::Tensor>& log_q, const at::Tensor& column_ids,
                           const at::Tensor& temperature, int64_t pos_offset, int64_t block_size);
void check_frequency_state(const at::Tensor& last_seen, const at::Tensor& gap,
                           const at::Tensor& count, const at::Tensor& ids,
                           const at::Tensor& step);
int64_t in_batch_block_size(int64_t rows, int64_t columns, int64_t requested);

// Vocab-parallel forward over one shard of W (ops.cpp: shard_loss_forward); the backward is one
// composite for every backend (shard.cpp).
std::tuple<at::Tensor, at::Tensor> shard_loss_forward_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& target, const at::Tensor& negatives,
    const std::optional<at::Tensor>& hard_negatives, const std::optional<at::Tensor>& noise_probs,
    const at::Tensor& log_z, int64_t objective, double positive_weight,
    bool remove_accidental_hits, int64_t ignore_index, int64_t row_start, int64_t num_classes);
std::tuple<at::Tensor, at::Tensor> shard_loss_forward_cuda(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& target, const at::Tensor& negatives,
    const std::optional<at::Tensor>& hard_negatives, const std::optional<at::Tensor>& noise_probs,
    const at::Tensor& log_z, int64_t objective, double positive_weight,
    bool remove_accidental_hits, int64_t ignore_index, int64_t row_start, int64_t num_classes);

// Fused row optimizers (csrc/cpu/optim_cpu.cpp, csrc/cuda/optim_cuda.cu): update param [V, ...] and
// its float32 (float64) state in place at the strictly ascending `rows` [U] with grad [U, ...], or
// at every row with grad [V, ...] when rows is None. Rules in optim_math.h.
void row_sgd_step_cpu(const at::Tensor& param, const std::optional<at::Tensor>& rows,
                      const at::Tensor& grad, double lr, double weight_decay);
void row_adagrad_step_cpu(const at::Tensor& param, const at::Tensor& state_sum,
                          const std::optional<at::Tensor>& rows, const at::Tensor& grad,
                          double lr, double eps, bool rowwise);
void row_adam_step_cpu(const at::Tensor& param, const at::Tensor& exp_avg,
                       const at::Tensor& exp_avg_sq, const std::optional<at::Tensor>& rows,
                       const at::Tensor& grad, double step_size, double beta1, double beta2,
                       double eps);
void row_sgd_step_cuda(const at::Tensor& param, const std::optional<at::Tensor>& rows,
                       const at::Tensor& grad, double lr, double weight_decay);
void row_adagrad_step_cuda(const at::Tensor& param, const at::Tensor& state_sum,
                           const std::optional<at::Tensor>& rows, const at::Tensor& grad,
                           double lr, double eps, bool rowwise);
void row_adam_step_cuda(const at::Tensor& param, const at::Tensor& exp_avg,
                        const at::Tensor& exp_avg_sq, const std::optional<at::Tensor>& rows,
                        const at::Tensor& grad, double step_size, double beta1, double beta2,
                        double eps);

}  // namespace fused_nce
