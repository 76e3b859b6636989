// Alias sampler on CUDA. The table is built on the device from prefix sums (nce_math.h: every
// entry is independent, so no per-class host loop) without a single host sync: the weights are
// checked by device-side asserts and lights / heavies are partitioned by a scan, so a CUDA graph
// can capture the build. Draws use Philox keyed by torch's CUDA generator (seed and offset, as
// ATen's random kernels do), so torch.manual_seed reproduces them and a graph captures them too.
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

// Every weight finite and non-negative, and their sum positive: device-side asserts (the Python
// layer checks on the host first wherever it may read values).
__global__ void check_weights_kernel(const double* __restrict__ w, int64_t num_classes,
                                     const double* __restrict__ total) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= num_classes) return;
  CUDA_KERNEL_ASSERT(isfinite(w[c]) && w[c] >= 0 &&
                     "fused_nce: weights must be finite and non-negative");
  if (c == 0) {
    CUDA_KERNEL_ASSERT(*total > 0 && isfinite(*total) && "fused_nce: weights must not all be zero");
  }
}

// Lists the heavies in index order, and the prefix sums of both kinds in list order, from the
// exclusive counts of lights before each class and the prefix sums of deficits / surpluses over
// all classes (zeros for the other kind, so the sums equal those over each list). counts[0] and
// counts[1] get the numbers of lights and heavies, and each list's prefix sums end with the total.
__global__ void partition_kernel(const double* __restrict__ scaled,
                                 const int64_t* __restrict__ lights_before,
                                 const double* __restrict__ deficit_sums,
                                 const double* __restrict__ surplus_sums, int64_t num_classes,
                                 double* __restrict__ sigma_l,
                                 int64_t* __restrict__ heavy, double* __restrict__ sigma_h,
                                 int64_t* __restrict__ counts) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= num_classes) return;
  const bool is_light = scaled[c] < 1.0;
  const int64_t lights = lights_before[c], heavies = c - lights;
  if (is_light) {
    sigma_l[lights] = deficit_sums[c];
  } else {
    heavy[heavies] = c;
    sigma_h[heavies] = surplus_sums[c];
  }
  if (c == num_classes - 1) {
    const int64_t num_light = lights + (is_light ? 1 : 0), num_heavy = num_classes - num_light;
    counts[0] = num_light;
    counts[1] = num_heavy;
    sigma_l[num_light] = deficit_sums[num_classes];
    sigma_h[num_heavy] = surplus_sums[num_classes];
  }
}

__global__ void alias_entries_kernel(const double* __restrict__ scaled,
                                     const int64_t* __restrict__ lights_before,
                                     const int64_t* __restrict__ heavy,
                                     const double* __restrict__ sigma_l,
                                     const double* __restrict__ sigma_h,
                                     const int64_t* __restrict__ counts, int64_t num_classes,
                                     int64_t* __restrict__ table) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= num_classes) return;
  const int64_t num_light = counts[0], num_heavy = counts[1];
  const int64_t i = lights_before[c];
  if (scaled[c] < 1.0) {
    table[c] = light_alias_entry(c, scaled[c], sigma_l[i], heavy, sigma_h, num_heavy);
  } else {
    table[c] = heavy_alias_entry(c - i, heavy, sigma_h, num_heavy, sigma_l, num_light);
  }
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
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const auto w = weights.to(at::kDouble).contiguous();
  const auto total = w.sum();
  check_weights_kernel<<<blocks_for(num_classes), kThreads, 0, stream>>>(
      w.const_data_ptr<double>(), num_classes, total.const_data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  // Same scaling as the CPU: p = w V / sum(w); lights (p < 1) and heavies in index order.
  const auto scaled = w.mul(static_cast<double>(num_classes)).div(total).contiguous();
  const auto is_light = scaled.lt(1.0);
  const auto lights_before =
      prefix_sums(is_light.to(at::kLong)).narrow(0, 0, num_classes).contiguous();
  const auto zero = at::zeros({}, scaled.options());
  const auto deficit_sums = prefix_sums(at::where(is_light, 1.0 - scaled, zero)).contiguous();
  const auto surplus_sums = prefix_sums(at::where(is_light, zero, scaled - 1.0)).contiguous();
  auto heavy = at::empty({num_classes}, w.options().dtype(at::kLong));
  auto counts = at::empty({2}, heavy.options());
  auto sigma_l = at::empty({num_classes + 1}, w.options()), sigma_h = at::empty_like(sigma_l);
  partition_kernel<<<blocks_for(num_classes), kThreads, 0, stream>>>(
      scaled.const_data_ptr<double>(), lights_before.const_data_ptr<int64_t>(),
      deficit_sums.const_data_ptr<double>(), surplus_sums.const_data_ptr<double>(), num_classes,
      sigma_l.mutable_data_ptr<double>(),
      heavy.mutable_data_ptr<int64_t>(), sigma_h.mutable_data_ptr<double>(),
      counts.mutable_data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  auto table = at::empty({num_classes}, w.options().dtype(at::kLong));
  alias_entries_kernel<<<blocks_for(num_classes), kThreads, 0, stream>>>(
      scaled.const_data_ptr<double>(), lights_before.const_data_ptr<int64_t>(),
      heavy.const_data_ptr<int64_t>(), sigma_l.const_data_ptr<double>(),
      sigma_h.const_data_ptr<double>(), counts.const_data_ptr<int64_t>(), num_classes,
      table.mutable_data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
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
