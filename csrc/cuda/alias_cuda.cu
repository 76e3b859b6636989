// Alias sampler on CUDA. The table is built on the device from prefix sums (nce_math.h: every
// entry is independent, so no per-class host loop), and draws use Philox keyed by torch's CUDA
// generator (seed and offset, as ATen's random kernels do), so torch.manual_seed reproduces them
// and a CUDA graph can capture them.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <ATen/cuda/PhiloxUtils.cuh>
#include <torch/library.h>

#include <limits>
#include <mutex>

#include "../fused_nce.h"
#include "../nce_math.h"
#include "cuda_common.cuh"

namespace fused_nce {
namespace {

constexpr int kThreads = 256;

inline unsigned blocks_for(int64_t items) {
  return static_cast<unsigned>((items + kThreads - 1) / kThreads);
}

__global__ void light_entries_kernel(const double* __restrict__ scaled,
                                     const int64_t* __restrict__ light,
                                     const double* __restrict__ sigma_l,
                                     const int64_t* __restrict__ heavy,
                                     const double* __restrict__ sigma_h, int64_t num_light,
                                     int64_t num_heavy, int64_t* __restrict__ table) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= num_light) return;
  const int64_t c = light[i];
  table[c] = light_alias_entry(c, scaled[c], sigma_l[i], heavy, sigma_h, num_heavy);
}

__global__ void heavy_entries_kernel(const int64_t* __restrict__ heavy,
                                     const double* __restrict__ sigma_h,
                                     const double* __restrict__ sigma_l, int64_t num_heavy,
                                     int64_t num_light, int64_t* __restrict__ table) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= num_heavy) return;
  table[heavy[j]] = heavy_alias_entry(j, heavy, sigma_h, num_heavy, sigma_l, num_light);
}

__global__ void alias_sample_kernel(const int64_t* __restrict__ table, int64_t num_classes,
                                    int64_t count, at::PhiloxCudaState philox,
                                    int64_t* __restrict__ out) {
  // Read inside the kernel: under graph capture the offset lives on the device.
  const auto seed_offset = at::cuda::philox::unpack(philox);
  const uint64_t seed = std::get<0>(seed_offset), offset = std::get<1>(seed_offset);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
       i += stride) {
    out[i] = alias_draw(table, num_classes, philox4x32_10(offset / 4, i, seed));
  }
}

// Prefix sums [0, x0, x0 + x1, ...] of a 1-D double tensor: n + 1 values.
at::Tensor prefix_sums(const at::Tensor& x) {
  return at::cat({at::zeros({1}, x.options()), at::cumsum(x, 0)});
}

}  // namespace

at::Tensor alias_build_cuda(const at::Tensor& weights) {
  TORCH_CHECK_VALUE(weights.dim() == 1 && weights.numel() > 0, "weights must be a non-empty [V]");
  const int64_t num_classes = weights.numel();
  TORCH_CHECK_VALUE(num_classes < (int64_t{1} << 31), "at most 2^31 - 1 classes are supported");
  const c10::cuda::CUDAGuard guard(weights.device());
  const auto w = weights.to(at::kDouble).contiguous();
  // A table is built once per noise distribution: one sync for the checks is cheap here.
  const auto total_t = w.sum();
  const auto stats = at::stack({(w < 0).logical_or(w.isnan()).any().to(at::kDouble),
                                (~w.isfinite()).any().to(at::kDouble), total_t})
                         .cpu();
  const double* st = stats.const_data_ptr<double>();
  TORCH_CHECK_VALUE(st[0] == 0 && st[1] == 0, "weights must be finite and non-negative");
  TORCH_CHECK_VALUE(st[2] > 0 && std::isfinite(st[2]), "weights must not all be zero");

  // Same scaling as the CPU: p = w V / sum(w); lights (p < 1) and heavies in index order.
  const auto scaled = w.mul(static_cast<double>(num_classes)).div(total_t).contiguous();
  const auto is_light = scaled.lt(1.0);
  const auto light = at::nonzero(is_light).squeeze(1).contiguous();
  const auto heavy = at::nonzero(is_light.logical_not()).squeeze(1).contiguous();
  const auto sigma_l = prefix_sums(1.0 - scaled.index_select(0, light)).contiguous();
  const auto sigma_h = prefix_sums(scaled.index_select(0, heavy) - 1.0).contiguous();
  const int64_t num_light = light.numel(), num_heavy = heavy.numel();

  auto table = at::empty({num_classes}, w.options().dtype(at::kLong));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  if (num_light > 0) {
    light_entries_kernel<<<blocks_for(num_light), kThreads, 0, stream>>>(
        scaled.const_data_ptr<double>(), light.const_data_ptr<int64_t>(),
        sigma_l.const_data_ptr<double>(), heavy.const_data_ptr<int64_t>(),
        sigma_h.const_data_ptr<double>(), num_light, num_heavy, table.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (num_heavy > 0) {
    heavy_entries_kernel<<<blocks_for(num_heavy), kThreads, 0, stream>>>(
        heavy.const_data_ptr<int64_t>(), sigma_h.const_data_ptr<double>(),
        sigma_l.const_data_ptr<double>(), num_heavy, num_light, table.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return table;
}

at::Tensor alias_sample_cuda(const at::Tensor& table, at::IntArrayRef size,
                             std::optional<at::Generator> generator) {
  TORCH_CHECK_VALUE(table.dim() == 1 && table.numel() > 0 && table.scalar_type() == at::kLong,
                    "table must be a non-empty int64 [V] alias table");
  const c10::cuda::CUDAGuard guard(table.device());
  auto out = at::empty(size, table.options());
  const int64_t count = out.numel();
  if (count == 0) return out;
  const auto tab = table.contiguous();
  auto* gen = at::get_generator_or_default<at::CUDAGeneratorImpl>(
      generator, at::cuda::detail::getDefaultCUDAGenerator(table.device().index()));
  at::PhiloxCudaState philox;
  {
    // Each call reserves 4 offsets; draw i is Philox(counter offset / 4, subsequence i, seed),
    // the layout of curand_init(seed, i, offset) in ATen's kernels, so no other op that draws
    // from this generator reuses these bits.
    std::lock_guard<std::mutex> lock(gen->mutex_);
    philox = gen->philox_cuda_state(4);
  }
  const unsigned blocks = std::min<int64_t>(blocks_for(count), 65536);
  alias_sample_kernel<<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      tab.const_data_ptr<int64_t>(), tab.numel(), count, philox, out.mutable_data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace fused_nce
