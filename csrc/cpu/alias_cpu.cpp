// Walker/Vose alias sampler on the CPU: O(V) table construction, O(1) exact draws.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <mutex>
#include <vector>

#include "../fused_nce.h"
#include "../nce_math.h"
#include "clones.h"

namespace fused_nce {
namespace {

// Draws begin..end-1 into out. The Philox outputs of a block of draws are computed first, in a
// loop the compiler vectorizes (AVX2 where the CPU has it), then the table is read draw by draw;
// the values are those of alias_draw(table, V, philox4x32_10(i, 0, seed)).
FUSED_NCE_CLONES void draw_range(const int64_t* table, int64_t num_classes, uint64_t seed,
                                 int64_t begin, int64_t end, int64_t* out) {
  constexpr int64_t kBlock = 64;
  uint32_t r0[kBlock], r1[kBlock], r2[kBlock];
  for (int64_t b = begin; b < end; b += kBlock) {
    const int64_t m = std::min(kBlock, end - b);
#pragma omp simd
    for (int64_t i = 0; i < m; ++i) {
      const Philox128 r = philox4x32_10(static_cast<uint64_t>(b + i), 0, seed);
      r0[i] = r.x[0];
      r1[i] = r.x[1];
      r2[i] = r.x[2];
    }
    for (int64_t i = 0; i < m; ++i) {
      out[b + i] = alias_draw(table, num_classes, Philox128{{r0[i], r1[i], r2[i], 0}});
    }
  }
}

}  // namespace

at::Tensor alias_build_cpu(const at::Tensor& weights) {
  TORCH_CHECK_VALUE(weights.dim() == 1 && weights.numel() > 0, "weights must be a non-empty [V]");
  const int64_t num_classes = weights.numel();
  TORCH_CHECK_VALUE(num_classes < (int64_t{1} << 31), "at most 2^31 - 1 classes are supported");
  const auto w = weights.to(at::kDouble).contiguous();
  const double* wp = w.const_data_ptr<double>();
  double total = 0;
  for (int64_t c = 0; c < num_classes; ++c) {
    TORCH_CHECK_VALUE(std::isfinite(wp[c]) && wp[c] >= 0,
                      "weights must be finite and non-negative, got ", wp[c], " at ", c);
    total += wp[c];
  }
  TORCH_CHECK_VALUE(total > 0 && std::isfinite(total), "weights must not all be zero");

  std::vector<double> scaled(num_classes);
  std::vector<int64_t> light, heavy;
  for (int64_t c = 0; c < num_classes; ++c) {
    scaled[c] = wp[c] * static_cast<double>(num_classes) / total;
    (scaled[c] < 1.0 ? light : heavy).push_back(c);
  }
  const int64_t num_light = light.size(), num_heavy = heavy.size();
  std::vector<double> sigma_l(num_light + 1, 0.0), sigma_h(num_heavy + 1, 0.0);
  for (int64_t i = 0; i < num_light; ++i) sigma_l[i + 1] = sigma_l[i] + (1.0 - scaled[light[i]]);
  for (int64_t j = 0; j < num_heavy; ++j) sigma_h[j + 1] = sigma_h[j] + (scaled[heavy[j]] - 1.0);

  auto table = at::empty({num_classes}, weights.options().dtype(at::kLong).device(at::kCPU));
  int64_t* tp = table.mutable_data_ptr<int64_t>();
  at::parallel_for(0, num_light, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      tp[light[i]] = light_alias_entry(light[i], scaled[light[i]], sigma_l[i], heavy.data(),
                                       sigma_h.data(), num_heavy);
    }
  });
  at::parallel_for(0, num_heavy, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      tp[heavy[j]] = heavy_alias_entry(j, heavy.data(), sigma_h.data(), num_heavy, sigma_l.data(),
                                       num_light);
    }
  });
  return table;
}

at::Tensor alias_sample_cpu(const at::Tensor& table, at::IntArrayRef size,
                            std::optional<at::Generator> generator) {
  TORCH_CHECK_VALUE(table.dim() == 1 && table.numel() > 0 && table.scalar_type() == at::kLong,
                    "table must be a non-empty int64 [V] alias table");
  auto* gen = at::get_generator_or_default<at::CPUGeneratorImpl>(
      generator, at::detail::getDefaultCPUGenerator());
  uint64_t seed;
  {
    // One 64-bit draw from the generator keys a counter-based stream for this call, so draws run
    // in parallel and do not depend on the thread count.
    std::lock_guard<std::mutex> lock(gen->mutex_);
    seed = gen->random64();
  }
  auto out = at::empty(size, table.options());
  const auto tab = table.contiguous();
  const int64_t* tp = tab.const_data_ptr<int64_t>();
  int64_t* op = out.mutable_data_ptr<int64_t>();
  const int64_t num_classes = tab.numel();
  at::parallel_for(0, out.numel(), 4096, [&](int64_t begin, int64_t end) {
    draw_range(tp, num_classes, seed, begin, end, op);
  });
  return out;
}

}  // namespace fused_nce
