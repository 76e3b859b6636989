// Row arithmetic shared by the CPU loss kernels (nce_cpu.cpp, shard_cpu.cpp): float32 rows get the
// AVX2 / FMA clones defined in nce_cpu.cpp, every other dtype a pragma-vectorized loop.
#pragma once

#include <cstdint>
#include <type_traits>

namespace fused_nce {

// Accumulation type of a row dtype: float64 for float64, float32 otherwise.
template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

float dot_f32(const float* a, const float* b, int64_t n);

template <typename acc_t, typename scalar_t>
inline acc_t dot(const acc_t* a, const scalar_t* b, int64_t n) {
  if constexpr (std::is_same_v<acc_t, float> && std::is_same_v<scalar_t, float>) {
    return dot_f32(a, b, n);
  } else {
    acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t d = 0; d < n; ++d) sum += a[d] * static_cast<acc_t>(b[d]);
    return sum;
  }
}

template <typename acc_t, typename scalar_t>
inline void load_row(const scalar_t* x, acc_t* y, int64_t n) {
#pragma omp simd
  for (int64_t d = 0; d < n; ++d) y[d] = static_cast<acc_t>(x[d]);
}

}  // namespace fused_nce
