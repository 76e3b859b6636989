// In-batch (and mixed-negative) softmax on CUDA, mirroring cpu/in_batch_cpu.cpp: per block of
// columns, a GEMM (ATen) gives the scores in float32 (float64 for float64), a warp per row folds
// them into the row's online log-sum-exp (forward) or turns them in place into the score gradient
// (backward), and two GEMMs scatter it. The temperature is read on the device, so nothing syncs.
// Also the frequency estimator's update (sorted buckets, one thread per distinct bucket) and
// lookup.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "../fused_nce.h"
#include "../in_batch_math.h"
#include "cuda_common.cuh"

namespace fused_nce {
namespace {

using cuda::kWarpSize;

template <typename acc_t>
__device__ __forceinline__ OnlineLse<acc_t> warp_lse(OnlineLse<acc_t> state) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    const OnlineLse<acc_t> other{__shfl_xor_sync(cuda::kFullMask, state.max, offset),
                                 __shfl_xor_sync(cuda::kFullMask, state.sum, offset)};
    state = online_lse_merge(state, other);
  }
  return state;
}

// One warp per row: folds the row's scores of this block into (row_max, row_sum) and records the
// positive's logit when the block holds it.
template <typename acc_t>
__global__ void forward_block_kernel(const acc_t* __restrict__ scores, int64_t rows, int64_t count,
                                     int64_t begin, const acc_t* __restrict__ log_q,
                                     const int64_t* __restrict__ ids,
                                     const acc_t* __restrict__ temperature, int64_t pos_offset,
                                     bool remove_hits, acc_t* __restrict__ row_max,
                                     acc_t* __restrict__ row_sum, acc_t* __restrict__ positive) {
  const int64_t i = cuda::global_warp();
  if (i >= rows) return;  // the whole warp leaves together
  const int lane = threadIdx.x % kWarpSize;
  const acc_t inv_t = acc_t(1) / *temperature;
  const int64_t pos = pos_offset + i, row_id = ids[pos];
  const acc_t* row = scores + i * count;
  OnlineLse<acc_t> state = online_lse_init<acc_t>();
  for (int64_t j = lane; j < count; j += kWarpSize) {
    const int64_t col = begin + j;
    if (in_batch_dropped(remove_hits, col, pos, ids[col], row_id)) continue;
    const acc_t o = in_batch_logit(row[j], inv_t, log_q ? log_q[col] : acc_t(0));
    state = online_lse_add(state, o);
    if (col == pos) positive[i] = o;
  }
  state = warp_lse(state);
  if (lane == 0) {
    state = online_lse_merge(OnlineLse<acc_t>{row_max[i], row_sum[i]}, state);
    row_max[i] = state.max;
    row_sum[i] = state.sum;
  }
}

// One warp per row: scores become dloss/dscore in place; score_dot[i] += sum_j ds_ij * s_ij.
template <typename acc_t>
__global__ void backward_block_kernel(acc_t* __restrict__ scores, int64_t rows, int64_t count,
                                      int64_t begin, const acc_t* __restrict__ log_q,
                                      const int64_t* __restrict__ ids,
                                      const acc_t* __restrict__ temperature, int64_t pos_offset,
                                      bool remove_hits, const acc_t* __restrict__ lse,
                                      const acc_t* __restrict__ grad_loss,
                                      acc_t* __restrict__ score_dot) {
  const int64_t i = cuda::global_warp();
  if (i >= rows) return;
  const int lane = threadIdx.x % kWarpSize;
  const acc_t inv_t = acc_t(1) / *temperature;
  const int64_t pos = pos_offset + i, row_id = ids[pos];
  const acc_t row_lse = lse[i], g = grad_loss[i];
  acc_t* row = scores + i * count;
  acc_t dot = 0;
  for (int64_t j = lane; j < count; j += kWarpSize) {
    const int64_t col = begin + j;
    if (in_batch_dropped(remove_hits, col, pos, ids[col], row_id)) {
      row[j] = 0;
      continue;
    }
    const acc_t s = row[j];
    const acc_t o = in_batch_logit(s, inv_t, log_q ? log_q[col] : acc_t(0));
    const acc_t ds = in_batch_score_grad(o, row_lse, col == pos, g, inv_t);
    row[j] = ds;
    dot += ds * s;
  }
  dot = cuda::warp_sum(dot);
  if (lane == 0) score_dot[i] += dot;  // one writer per row: deterministic
}

// keys[a * n + e]: the flat bucket (array a) of id e.
__global__ void frequency_keys_kernel(const int64_t* __restrict__ ids, int64_t count,
                                      int64_t arrays, int64_t buckets, int64_t* __restrict__ keys) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= count * arrays) return;
  const int64_t a = e / count;
  keys[e] = a * buckets + frequency_bucket(ids[e % count], a, buckets);
}

// One thread per distinct bucket of the step (from a sort), with its number of occurrences: no
// two threads touch a bucket, so no atomics and the same result whatever the order of the ids.
__global__ void frequency_update_kernel(int64_t* __restrict__ last_seen, float* __restrict__ gap,
                                        float* __restrict__ counts,
                                        const int64_t* __restrict__ distinct,
                                        const int64_t* __restrict__ occurrences, int64_t num,
                                        const int64_t* __restrict__ step, float alpha) {
  const int64_t u = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (u >= num) return;
  const int64_t b = distinct[u], t = *step;
  if (last_seen[b] == t) return;  // a repeated call for the same step leaves the state alone
  gap[b] = frequency_gap_update(gap[b], last_seen[b], t, alpha);
  counts[b] = frequency_count_update(counts[b], occurrences[u], alpha);
  last_seen[b] = t;
}

__global__ void frequency_estimate_kernel(const int64_t* __restrict__ last_seen,
                                          const float* __restrict__ gap,
                                          const float* __restrict__ counts,
                                          const int64_t* __restrict__ ids, int64_t count,
                                          int64_t arrays, int64_t buckets,
                                          const int64_t* __restrict__ step,
                                          float* __restrict__ out_gap,
                                          float* __restrict__ out_rate) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= count) return;
  const int64_t t = *step;
  float longest = 0, rate = INFINITY;
  for (int64_t a = 0; a < arrays; ++a) {
    const int64_t b = a * buckets + frequency_bucket(ids[e], a, buckets);
    longest = fmaxf(longest, frequency_bucket_gap(gap[b], last_seen[b], t));
    rate = fminf(rate, frequency_bucket_rate(gap[b], counts[b], last_seen[b], t));
  }
  out_gap[e] = longest;
  out_rate[e] = rate;
}

constexpr int kThreads = 256;

unsigned blocks_for(int64_t items) {
  return static_cast<unsigned>((items + kThreads - 1) / kThreads);
}

struct Columns {
  at::Tensor q, cols, ids, log_q, temperature;
};

Columns prepare(const at::Tensor& query, const at::Tensor& columns,
                const std::optional<at::Tensor>& log_q, const at::Tensor& column_ids,
                const at::Tensor& temperature, at::ScalarType acc) {
  TORCH_CHECK_VALUE(query.is_cuda() && columns.device() == query.device() &&
                        column_ids.device() == query.device() &&
                        temperature.device() == query.device() &&
                        (!log_q.has_value() || log_q->device() == query.device()),
                    "every tensor must be on query's device");
  return Columns{query.to(acc).contiguous(), columns.contiguous(), column_ids.contiguous(),
                 log_q.has_value() ? log_q->to(acc).contiguous() : at::Tensor(),
                 temperature.to(acc).reshape({}).contiguous()};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> in_batch_forward_cuda(
    const at::Tensor& query, const at::Tensor& columns, const std::optional<at::Tensor>& log_q,
    const at::Tensor& column_ids, const at::Tensor& temperature, int64_t pos_offset,
    bool remove_accidental_hits, int64_t block_size) {
  check_in_batch_inputs(query, columns, log_q, column_ids, temperature, pos_offset, block_size);
  const c10::cuda::CUDAGuard guard(query.device());
  const auto acc = query.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const Columns c = prepare(query, columns, log_q, column_ids, temperature, acc);
  const int64_t n = query.size(0), k = columns.size(0);
  at::Tensor row_max = at::full({n}, -std::numeric_limits<double>::infinity(), c.q.options());
  at::Tensor row_sum = at::zeros({n}, c.q.options());
  at::Tensor positive = at::zeros({n}, c.q.options());
  if (n == 0) return {positive, row_sum};
  const int64_t block = in_batch_block_size(n, k, block_size);
  at::Tensor buffer = at::empty({n * block}, c.q.options());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  for (int64_t begin = 0; begin < k; begin += block) {
    const int64_t count = std::min(block, k - begin);
    at::Tensor scores = buffer.narrow(0, 0, n * count).view({n, count});
    at::mm_out(scores, c.q, c.cols.narrow(0, begin, count).to(acc).t());
    AT_DISPATCH_FLOATING_TYPES(acc, "in_batch_forward_cuda", [&] {
      forward_block_kernel<scalar_t><<<cuda::warp_grid(n), cuda::kWarpsPerBlock * kWarpSize, 0,
                                       stream>>>(
          scores.const_data_ptr<scalar_t>(), n, count, begin,
          c.log_q.defined() ? c.log_q.const_data_ptr<scalar_t>() : nullptr,
          c.ids.const_data_ptr<int64_t>(), c.temperature.const_data_ptr<scalar_t>(), pos_offset,
          remove_accidental_hits, row_max.mutable_data_ptr<scalar_t>(),
          row_sum.mutable_data_ptr<scalar_t>(), positive.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  at::Tensor lse = row_max + row_sum.log();
  return {lse - positive, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> in_batch_backward_cuda(
    const at::Tensor& grad_loss, const at::Tensor& query, const at::Tensor& columns,
    const std::optional<at::Tensor>& log_q, const at::Tensor& column_ids,
    const at::Tensor& temperature, const at::Tensor& lse, int64_t pos_offset,
    bool remove_accidental_hits, int64_t block_size) {
  check_in_batch_inputs(query, columns, log_q, column_ids, temperature, pos_offset, block_size);
  TORCH_CHECK_VALUE(grad_loss.dim() == 1 && grad_loss.size(0) == query.size(0) &&
                        lse.dim() == 1 && lse.size(0) == query.size(0),
                    "grad_loss and lse must be [N] = [", query.size(0), "]");
  const c10::cuda::CUDAGuard guard(query.device());
  const auto acc = query.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const Columns c = prepare(query, columns, log_q, column_ids, temperature, acc);
  const int64_t n = query.size(0), k = columns.size(0), dim = query.size(1);
  const at::Tensor g = grad_loss.to(acc).contiguous();
  const at::Tensor e = lse.to(acc).contiguous();
  at::Tensor grad_q = at::zeros({n, dim}, c.q.options());
  at::Tensor grad_cols = at::zeros({k, dim}, c.q.options());
  at::Tensor score_dot = at::zeros({n}, c.q.options());
  if (n > 0) {
    const int64_t block = in_batch_block_size(n, k, block_size);
    at::Tensor buffer = at::empty({n * block}, c.q.options());
    const auto stream = c10::cuda::getCurrentCUDAStream();
    for (int64_t begin = 0; begin < k; begin += block) {
      const int64_t count = std::min(block, k - begin);
      at::Tensor scores = buffer.narrow(0, 0, n * count).view({n, count});
      const at::Tensor block_cols = c.cols.narrow(0, begin, count).to(acc);
      at::mm_out(scores, c.q, block_cols.t());
      AT_DISPATCH_FLOATING_TYPES(acc, "in_batch_backward_cuda", [&] {
        backward_block_kernel<scalar_t><<<cuda::warp_grid(n), cuda::kWarpsPerBlock * kWarpSize, 0,
                                          stream>>>(
            scores.mutable_data_ptr<scalar_t>(), n, count, begin,
            c.log_q.defined() ? c.log_q.const_data_ptr<scalar_t>() : nullptr,
            c.ids.const_data_ptr<int64_t>(), c.temperature.const_data_ptr<scalar_t>(), pos_offset,
            remove_accidental_hits, e.const_data_ptr<scalar_t>(), g.const_data_ptr<scalar_t>(),
            score_dot.mutable_data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
      grad_q.addmm_(scores, block_cols);
      at::Tensor out = grad_cols.narrow(0, begin, count);
      at::mm_out(out, scores.t(), c.q);
    }
  }
  // dloss/dT = -(1/T) sum_ij ds_ij s_ij (see the CPU kernel), kept on the device.
  at::Tensor grad_t = -score_dot.sum() / c.temperature;
  return {grad_q.to(query.scalar_type()), grad_cols.to(columns.scalar_type()), grad_t};
}

static void check_same_device(const at::Tensor& last_seen, const at::Tensor& gap,
                       const at::Tensor& count, const at::Tensor& ids, const at::Tensor& step) {
  TORCH_CHECK_VALUE(gap.device() == last_seen.device() && count.device() == last_seen.device() &&
                        ids.device() == last_seen.device() && step.device() == last_seen.device(),
                    "ids and step must be on the estimator's device");
}

void frequency_update_cuda(at::Tensor& last_seen, at::Tensor& gap, at::Tensor& count,
                           const at::Tensor& ids, const at::Tensor& step, double alpha) {
  check_frequency_state(last_seen, gap, count, ids, step);
  check_same_device(last_seen, gap, count, ids, step);
  const c10::cuda::CUDAGuard guard(last_seen.device());
  const at::Tensor flat = ids.contiguous().view(-1);
  const int64_t n = flat.numel(), arrays = last_seen.size(0), buckets = last_seen.size(1);
  if (n == 0) return;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor keys = at::empty({arrays * n}, flat.options());
  frequency_keys_kernel<<<blocks_for(arrays * n), kThreads, 0, stream>>>(
      flat.const_data_ptr<int64_t>(), n, arrays, buckets, keys.mutable_data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // Sort and run-length: one entry per distinct bucket (the output size costs one sync).
  const auto runs = at::unique_consecutive(std::get<0>(at::sort(keys)), false, true);
  const at::Tensor distinct = std::get<0>(runs).contiguous();
  const at::Tensor occurrences = std::get<2>(runs).contiguous();
  const int64_t num = distinct.numel();
  frequency_update_kernel<<<blocks_for(num), kThreads, 0, stream>>>(
      last_seen.mutable_data_ptr<int64_t>(), gap.mutable_data_ptr<float>(),
      count.mutable_data_ptr<float>(), distinct.const_data_ptr<int64_t>(),
      occurrences.const_data_ptr<int64_t>(), num, step.const_data_ptr<int64_t>(),
      static_cast<float>(alpha));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> frequency_estimate_cuda(const at::Tensor& last_seen,
                                                           const at::Tensor& gap,
                                                           const at::Tensor& count,
                                                           const at::Tensor& ids,
                                                           const at::Tensor& step) {
  check_frequency_state(last_seen, gap, count, ids, step);
  check_same_device(last_seen, gap, count, ids, step);
  const c10::cuda::CUDAGuard guard(last_seen.device());
  const at::Tensor in = ids.contiguous();
  at::Tensor out_gap = at::empty(ids.sizes(), gap.options());
  at::Tensor out_rate = at::empty(ids.sizes(), gap.options());
  const int64_t n = in.numel();
  if (n == 0) return {out_gap, out_rate};
  frequency_estimate_kernel<<<blocks_for(n), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      last_seen.const_data_ptr<int64_t>(), gap.const_data_ptr<float>(),
      count.const_data_ptr<float>(), in.const_data_ptr<int64_t>(), n, last_seen.size(0),
      last_seen.size(1), step.const_data_ptr<int64_t>(), out_gap.mutable_data_ptr<float>(),
      out_rate.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out_gap, out_rate};
}

TORCH_LIBRARY_IMPL(fused_nce, CUDA, m) {
  m.impl("in_batch_forward", &in_batch_forward_cuda);
  m.impl("in_batch_backward", &in_batch_backward_cuda);
  m.impl("frequency_update", &frequency_update_cuda);
  m.impl("frequency_estimate", &frequency_estimate_cuda);
}

}  // namespace fused_nce
