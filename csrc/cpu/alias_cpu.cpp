// Walker/Vose alias sampler on the CPU: O(V) table construction, O(1) exact draws.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <mutex>
#include <vector>

#include "../fused_nce.h"
#include "../nce_math.h"

namespace fused_nce {

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

  // Bucket c keeps class c with probability scaled[c] and hands the rest to alias[c].
  std::vector<double> scaled(num_classes);
  std::vector<int64_t> small, large;
  for (int64_t c = 0; c < num_classes; ++c) {
    scaled[c] = wp[c] * static_cast<double>(num_classes) / total;
    (scaled[c] < 1.0 ? small : large).push_back(c);
  }
  auto table = at::empty({num_classes}, weights.options().dtype(at::kLong).device(at::kCPU));
  int64_t* tp = table.mutable_data_ptr<int64_t>();
  const auto set_entry = [&](int64_t c, double keep, int64_t alias) {
    const double scaled_keep = std::ldexp(keep, 32);
    const uint64_t threshold =
        scaled_keep >= 4294967295.0 ? 0xFFFFFFFFull : static_cast<uint64_t>(scaled_keep);
    tp[c] = static_cast<int64_t>((static_cast<uint64_t>(alias) << 32) | threshold);
  };
  int64_t last_large = -1;
  while (!small.empty() && !large.empty()) {
    const int64_t s = small.back(), l = large.back();
    small.pop_back();
    large.pop_back();
    set_entry(s, scaled[s], l);
    last_large = l;
    scaled[l] = (scaled[l] + scaled[s]) - 1.0;
    (scaled[l] < 1.0 ? small : large).push_back(l);
  }
  // What is left is full up to rounding; a zero-weight class must still never be drawn.
  for (const int64_t c : large) set_entry(c, 1.0, c);
  for (const int64_t c : small) {
    if (wp[c] > 0 || last_large < 0) {
      set_entry(c, 1.0, c);
    } else {
      set_entry(c, 0.0, last_large);
    }
  }
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
    for (int64_t i = begin; i < end; ++i) {
      op[i] = alias_draw(tp, num_classes, philox4x32_10(i, 0, seed));
    }
  });
  return out;
}

}  // namespace fused_nce
