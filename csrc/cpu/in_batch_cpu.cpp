// In-batch (and mixed-negative) softmax on the CPU, one block of columns at a time: a GEMM gives
// the block's scores, a fused pass turns them into logits and folds them into each row's online
// log-sum-exp (forward) or into the score gradient (backward, recomputed), and two more GEMMs
// scatter that gradient. Memory beyond the inputs and gradients: one [N, block] score buffer.
// Also the frequency estimator's update and lookup.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "../fused_nce.h"
#include "../in_batch_math.h"
#include "rows.h"

namespace fused_nce {

void check_in_batch_inputs(const at::Tensor& query, const at::Tensor& columns,
                           const std::optional<at::Tensor>& log_q, const at::Tensor& column_ids,
                           const at::Tensor& temperature, int64_t pos_offset, int64_t block_size) {
  TORCH_CHECK_VALUE(query.dim() == 2, "query must be [N, D], got ", query.sizes());
  TORCH_CHECK_VALUE(columns.dim() == 2 && columns.size(1) == query.size(1),
                    "columns must be [K, D] with D = ", query.size(1), ", got ", columns.sizes());
  TORCH_CHECK_TYPE(columns.scalar_type() == query.scalar_type(), "columns (",
                   columns.scalar_type(), ") and query (", query.scalar_type(),
                   ") must share a dtype");
  TORCH_CHECK_TYPE(column_ids.scalar_type() == at::kLong, "column_ids must be int64, got ",
                   column_ids.scalar_type());
  TORCH_CHECK_VALUE(column_ids.dim() == 1 && column_ids.size(0) == columns.size(0),
                    "column_ids must be [K] = [", columns.size(0), "], got ", column_ids.sizes());
  if (log_q.has_value()) {
    TORCH_CHECK_VALUE(log_q->dim() == 1 && log_q->size(0) == columns.size(0),
                      "log_q must be [K] = [", columns.size(0), "], got ", log_q->sizes());
    TORCH_CHECK_TYPE(log_q->is_floating_point(), "log_q must be floating point");
  }
  TORCH_CHECK_VALUE(temperature.numel() == 1, "temperature must hold one value");
  TORCH_CHECK_VALUE(pos_offset >= 0 && pos_offset + query.size(0) <= columns.size(0),
                    "the positives (columns pos_offset .. pos_offset + N) must lie in [0, K)");
  TORCH_CHECK_VALUE(block_size >= 0, "block_size must be non-negative");
}

int64_t in_batch_block_size(int64_t rows, int64_t columns, int64_t requested) {
  if (requested > 0) return std::min(requested, std::max<int64_t>(columns, 1));
  // About 4M scores (16 MB in float32) per block: large enough for efficient GEMMs, small
  // against the [N, K] matrix it replaces.
  const int64_t block = std::clamp<int64_t>((int64_t{1} << 22) / std::max<int64_t>(rows, 1),
                                            128, 8192);
  return std::min(block, std::max<int64_t>(columns, 1));
}

namespace {

template <typename acc_t>
struct InBatchView {
  const acc_t* log_q;  // nullptr: no correction
  const int64_t* ids;
  int64_t pos_offset;
  bool remove_hits;
  acc_t inv_temperature;
};

// Folds one row's block of scores [begin, begin + count) into its online log-sum-exp.
template <typename acc_t>
void forward_row(const acc_t* scores, int64_t row, int64_t begin, int64_t count,
                 const InBatchView<acc_t>& v, OnlineLse<acc_t>& state, acc_t& positive) {
  const int64_t pos = v.pos_offset + row, row_id = v.ids[pos];
  acc_t block_max = -std::numeric_limits<acc_t>::infinity();
  for (int64_t j = 0; j < count; ++j) {
    const int64_t col = begin + j;
    if (in_batch_dropped(v.remove_hits, col, pos, v.ids[col], row_id)) continue;
    const acc_t o = in_batch_logit(scores[j], v.inv_temperature, v.log_q ? v.log_q[col] : acc_t(0));
    block_max = std::max(block_max, o);
    if (col == pos) positive = o;
  }
  if (block_max == -std::numeric_limits<acc_t>::infinity()) return;
  acc_t sum = 0;
  for (int64_t j = 0; j < count; ++j) {
    const int64_t col = begin + j;
    if (in_batch_dropped(v.remove_hits, col, pos, v.ids[col], row_id)) continue;
    sum += std::exp(in_batch_logit(scores[j], v.inv_temperature,
                                   v.log_q ? v.log_q[col] : acc_t(0)) - block_max);
  }
  state = online_lse_merge(state, OnlineLse<acc_t>{block_max, sum});
}

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor> forward_impl(const at::Tensor& query, const at::Tensor& columns,
                                                const std::optional<at::Tensor>& log_q,
                                                const at::Tensor& column_ids, double temperature,
                                                int64_t pos_offset, bool remove_hits,
                                                int64_t block_size) {
  using acc_t = acc_type<scalar_t>;
  const auto acc = c10::CppTypeToScalarType<acc_t>::value;
  const int64_t n = query.size(0), k = columns.size(0);
  const at::Tensor q = query.to(acc).contiguous();
  const at::Tensor cols = columns.contiguous();
  const at::Tensor ids = column_ids.contiguous();
  const at::Tensor lq = log_q.has_value() ? log_q->to(acc).contiguous() : at::Tensor();
  const InBatchView<acc_t> v{lq.defined() ? lq.const_data_ptr<acc_t>() : nullptr,
                             ids.const_data_ptr<int64_t>(), pos_offset, remove_hits,
                             static_cast<acc_t>(1.0 / temperature)};
  std::vector<OnlineLse<acc_t>> state(n, online_lse_init<acc_t>());
  std::vector<acc_t> positive(n, 0);
  const int64_t block = in_batch_block_size(n, k, block_size);
  at::Tensor buffer = at::empty({n * block}, q.options());
  for (int64_t begin = 0; begin < k; begin += block) {
    const int64_t count = std::min(block, k - begin);
    at::Tensor scores = buffer.narrow(0, 0, n * count).view({n, count});
    at::mm_out(scores, q, cols.narrow(0, begin, count).to(acc).t());
    const acc_t* sp = scores.const_data_ptr<acc_t>();
    at::parallel_for(0, n, std::max<int64_t>(1, 16384 / count), [&](int64_t r0, int64_t r1) {
      for (int64_t i = r0; i < r1; ++i) {
        forward_row(sp + i * count, i, begin, count, v, state[i], positive[i]);
      }
    });
  }
  at::Tensor loss = at::empty({n}, q.options());
  at::Tensor lse = at::empty({n}, q.options());
  acc_t* lp = loss.mutable_data_ptr<acc_t>();
  acc_t* ep = lse.mutable_data_ptr<acc_t>();
  for (int64_t i = 0; i < n; ++i) {
    ep[i] = online_lse_value(state[i]);
    lp[i] = ep[i] - positive[i];
  }
  return {loss, lse};
}

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_impl(
    const at::Tensor& grad_loss, const at::Tensor& query, const at::Tensor& columns,
    const std::optional<at::Tensor>& log_q, const at::Tensor& column_ids, double temperature,
    const at::Tensor& lse, int64_t pos_offset, bool remove_hits, int64_t block_size) {
  using acc_t = acc_type<scalar_t>;
  const auto acc = c10::CppTypeToScalarType<acc_t>::value;
  const int64_t n = query.size(0), k = columns.size(0);
  const at::Tensor q = query.to(acc).contiguous();
  const at::Tensor cols = columns.contiguous();
  const at::Tensor ids = column_ids.contiguous();
  const at::Tensor lq = log_q.has_value() ? log_q->to(acc).contiguous() : at::Tensor();
  const at::Tensor g = grad_loss.to(acc).contiguous();
  const at::Tensor e = lse.to(acc).contiguous();
  const acc_t* gp = g.const_data_ptr<acc_t>();
  const acc_t* ep = e.const_data_ptr<acc_t>();
  const InBatchView<acc_t> v{lq.defined() ? lq.const_data_ptr<acc_t>() : nullptr,
                             ids.const_data_ptr<int64_t>(), pos_offset, remove_hits,
                             static_cast<acc_t>(1.0 / temperature)};
  at::Tensor grad_q = at::zeros({n, q.size(1)}, q.options());
  at::Tensor grad_cols = at::empty({k, q.size(1)}, q.options());
  // Per row: sum_j dloss/ds_ij * s_ij, from which the temperature's gradient follows.
  std::vector<acc_t> score_dot(n, 0);
  const int64_t block = in_batch_block_size(n, k, block_size);
  at::Tensor buffer = at::empty({n * block}, q.options());
  for (int64_t begin = 0; begin < k; begin += block) {
    const int64_t count = std::min(block, k - begin);
    at::Tensor scores = buffer.narrow(0, 0, n * count).view({n, count});
    const at::Tensor block_cols = cols.narrow(0, begin, count).to(acc);
    at::mm_out(scores, q, block_cols.t());
    acc_t* sp = scores.mutable_data_ptr<acc_t>();
    at::parallel_for(0, n, std::max<int64_t>(1, 16384 / count), [&](int64_t r0, int64_t r1) {
      for (int64_t i = r0; i < r1; ++i) {
        const int64_t pos = pos_offset + i, row_id = v.ids[pos];
        acc_t* row = sp + i * count;
        acc_t dot = 0;
        for (int64_t j = 0; j < count; ++j) {
          const int64_t col = begin + j;
          if (in_batch_dropped(remove_hits, col, pos, v.ids[col], row_id)) {
            row[j] = 0;
            continue;
          }
          const acc_t s = row[j];
          const acc_t o = in_batch_logit(s, v.inv_temperature, v.log_q ? v.log_q[col] : acc_t(0));
          row[j] = in_batch_score_grad(o, ep[i], col == pos, gp[i], v.inv_temperature);
          dot += row[j] * s;
        }
        score_dot[i] += dot;
      }
    });
    grad_q.addmm_(scores, block_cols);
    at::Tensor out = grad_cols.narrow(0, begin, count);
    at::mm_out(out, scores.t(), q);
  }
  // o = s / T - log q: dloss/dT = sum_ij dloss/do_ij * (-s_ij / T^2) = -(1/T) sum_ij ds_ij s_ij.
  double total = 0;
  for (int64_t i = 0; i < n; ++i) total += static_cast<double>(score_dot[i]);
  at::Tensor grad_t = at::full({}, -total / temperature, q.options());
  return {grad_q.to(query.scalar_type()), grad_cols.to(columns.scalar_type()), grad_t};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> in_batch_forward_cpu(
    const at::Tensor& query, const at::Tensor& columns, const std::optional<at::Tensor>& log_q,
    const at::Tensor& column_ids, const at::Tensor& temperature, int64_t pos_offset,
    bool remove_accidental_hits, int64_t block_size) {
  check_in_batch_inputs(query, columns, log_q, column_ids, temperature, pos_offset, block_size);
  const double t = temperature.item<double>();
  TORCH_CHECK_VALUE(t > 0, "temperature must be positive, got ", t);
  std::tuple<at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(), "in_batch_forward",
                                  [&] {
                                    out = forward_impl<scalar_t>(query, columns, log_q, column_ids,
                                                                 t, pos_offset,
                                                                 remove_accidental_hits,
                                                                 block_size);
                                  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> in_batch_backward_cpu(
    const at::Tensor& grad_loss, const at::Tensor& query, const at::Tensor& columns,
    const std::optional<at::Tensor>& log_q, const at::Tensor& column_ids,
    const at::Tensor& temperature, const at::Tensor& lse, int64_t pos_offset,
    bool remove_accidental_hits, int64_t block_size) {
  check_in_batch_inputs(query, columns, log_q, column_ids, temperature, pos_offset, block_size);
  TORCH_CHECK_VALUE(grad_loss.dim() == 1 && grad_loss.size(0) == query.size(0) &&
                        lse.dim() == 1 && lse.size(0) == query.size(0),
                    "grad_loss and lse must be [N] = [", query.size(0), "]");
  const double t = temperature.item<double>();
  TORCH_CHECK_VALUE(t > 0, "temperature must be positive, got ", t);
  std::tuple<at::Tensor, at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(),
                                  "in_batch_backward", [&] {
                                    out = backward_impl<scalar_t>(grad_loss, query, columns, log_q,
                                                                  column_ids, t, lse, pos_offset,
                                                                  remove_accidental_hits,
                                                                  block_size);
                                  });
  return out;
}

void check_frequency_state(const at::Tensor& last_seen, const at::Tensor& gap,
                           const at::Tensor& count, const at::Tensor& ids,
                           const at::Tensor& step) {
  TORCH_CHECK_TYPE(last_seen.scalar_type() == at::kLong && gap.scalar_type() == at::kFloat &&
                       count.scalar_type() == at::kFloat,
                   "last_seen must be int64, gap and count float32");
  TORCH_CHECK_VALUE(last_seen.dim() == 2 && gap.sizes() == last_seen.sizes() &&
                        count.sizes() == last_seen.sizes() && last_seen.size(1) > 0 &&
                        last_seen.is_contiguous() && gap.is_contiguous() && count.is_contiguous(),
                    "last_seen, gap and count must be contiguous [arrays, buckets] of one shape");
  TORCH_CHECK_TYPE(ids.scalar_type() == at::kLong, "ids must be int64, got ", ids.scalar_type());
  TORCH_CHECK_VALUE(step.numel() == 1 && step.scalar_type() == at::kLong,
                    "step must be one int64 value");
}

void frequency_update_cpu(at::Tensor& last_seen, at::Tensor& gap, at::Tensor& count,
                          const at::Tensor& ids, const at::Tensor& step, double alpha) {
  check_frequency_state(last_seen, gap, count, ids, step);
  const int64_t t = step.item<int64_t>(), arrays = last_seen.size(0), buckets = last_seen.size(1);
  const at::Tensor flat = ids.contiguous().view(-1);
  const int64_t* ip = flat.const_data_ptr<int64_t>();
  const int64_t n = flat.numel();
  int64_t* lp = last_seen.mutable_data_ptr<int64_t>();
  float* gp = gap.mutable_data_ptr<float>();
  float* cp = count.mutable_data_ptr<float>();
  const float a = static_cast<float>(alpha);
  // Arrays are independent. Within one, the step's buckets are sorted and each distinct bucket
  // is updated once with its number of occurrences: the result does not depend on id order.
  at::parallel_for(0, arrays, 1, [&](int64_t a0, int64_t a1) {
    std::vector<int64_t> hit(n);
    for (int64_t arr = a0; arr < a1; ++arr) {
      for (int64_t e = 0; e < n; ++e) hit[e] = frequency_bucket(ip[e], arr, buckets);
      std::sort(hit.begin(), hit.end());
      for (int64_t e = 0; e < n;) {
        int64_t run = e + 1;
        while (run < n && hit[run] == hit[e]) ++run;
        const int64_t b = arr * buckets + hit[e];
        if (lp[b] != t) {  // a repeated call for the same step leaves the state alone
          gp[b] = frequency_gap_update(gp[b], lp[b], t, a);
          cp[b] = frequency_count_update(cp[b], run - e, a);
          lp[b] = t;
        }
        e = run;
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> frequency_estimate_cpu(const at::Tensor& last_seen,
                                                          const at::Tensor& gap,
                                                          const at::Tensor& count,
                                                          const at::Tensor& ids,
                                                          const at::Tensor& step) {
  check_frequency_state(last_seen, gap, count, ids, step);
  const int64_t t = step.item<int64_t>(), arrays = last_seen.size(0), buckets = last_seen.size(1);
  const at::Tensor in = ids.contiguous();
  at::Tensor out_gap = at::empty(ids.sizes(), gap.options());
  at::Tensor out_rate = at::empty(ids.sizes(), gap.options());
  const int64_t* ip = in.const_data_ptr<int64_t>();
  const int64_t* lp = last_seen.const_data_ptr<int64_t>();
  const float* gp = gap.const_data_ptr<float>();
  const float* cp = count.const_data_ptr<float>();
  float* og = out_gap.mutable_data_ptr<float>();
  float* orate = out_rate.mutable_data_ptr<float>();
  at::parallel_for(0, in.numel(), 4096, [&](int64_t e0, int64_t e1) {
    for (int64_t e = e0; e < e1; ++e) {
      // Collisions only shorten a bucket's gaps and add to its counts: the longest gap and the
      // smallest rate over the arrays are the least polluted (count-min).
      float longest = 0, rate = std::numeric_limits<float>::infinity();
      for (int64_t arr = 0; arr < arrays; ++arr) {
        const int64_t b = arr * buckets + frequency_bucket(ip[e], arr, buckets);
        longest = std::max(longest, frequency_bucket_gap(gp[b], lp[b], t));
        rate = std::min(rate, frequency_bucket_rate(gp[b], cp[b], lp[b], t));
      }
      og[e] = longest;
      orate[e] = rate;
    }
  });
  return {out_gap, out_rate};
}

TORCH_LIBRARY_IMPL(fused_nce, CPU, m) {
  m.impl("in_batch_forward", &in_batch_forward_cpu);
  m.impl("in_batch_backward", &in_batch_backward_cpu);
  m.impl("frequency_update", &frequency_update_cpu);
  m.impl("frequency_estimate", &frequency_estimate_cpu);
}

}  // namespace fused_nce
