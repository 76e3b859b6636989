// Walker/Vose alias sampler on the CPU: O(V) table construction, O(1) exact draws.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <mutex>
#include <vector>
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#endif

#include "../fused_nce.h"
#include "../nce_math.h"
#include "clones.h"

namespace fused_nce {
namespace {

// Philox words 0..2 of counters first .. first + count - 1 (philox4x32_10(i, 0, seed)) into
// r0, r1, r2: a loop the compiler vectorizes (AVX2 in the clone).
FUSED_NCE_CLONES void philox_words(uint64_t first, int64_t count, uint64_t seed, uint32_t* r0,
                                   uint32_t* r1, uint32_t* r2) {
#pragma omp simd
  for (int64_t i = 0; i < count; ++i) {
    const Philox128 r = philox4x32_10(first + i, 0, seed);
    r0[i] = r.x[0];
    r1[i] = r.x[1];
    r2[i] = r.x[2];
  }
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FUSED_NCE_PHILOX_AVX2 1
// Low and high 32 bits of m * a in each 32-bit lane: even lanes by one unsigned multiply, odd
// lanes by another after a shift, the halves blended back into place.
__attribute__((target("avx2"))) inline void mulhilo_avx2(__m256i m, __m256i a, __m256i* lo,
                                                          __m256i* hi) {
  const __m256i even = _mm256_mul_epu32(a, m);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
  *lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  *hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

// philox_words eight counters at a time in AVX2, where the CPU has it: a round costs two
// multiplies per product and a few shifts and blends, where the compiler's vectorization of
// philox4x32_10 shuffles every product apart and back (twice the time). The rounds are
// philox4x32_10's (nce_math.h); test_cpu_draws_are_pinned holds the two to the same draws.
// `count` is a multiple of 8.
__attribute__((target("avx2"))) void philox_words_avx2(uint64_t first, int64_t count,
                                                        uint64_t seed, uint32_t* r0,
                                                        uint32_t* r1, uint32_t* r2) {
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(0xD2511F53u));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(0xCD9E8D57u));
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i sign = _mm256_set1_epi32(static_cast<int>(0x80000000u));
  for (int64_t i = 0; i < count; i += 8) {
    // Counters first + i + l: low words by a vector add, a lane whose low word wrapped carries
    // one into its high word (built in registers: eight scalar stores read back as one vector
    // would stall on store forwarding).
    const uint64_t base = first + static_cast<uint64_t>(i);
    const __m256i base_lo = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(base)));
    __m256i c0 = _mm256_add_epi32(base_lo, iota);
    const __m256i wrapped = _mm256_cmpgt_epi32(_mm256_xor_si256(base_lo, sign),
                                               _mm256_xor_si256(c0, sign));
    __m256i c1 = _mm256_sub_epi32(
        _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(base >> 32))), wrapped);
    __m256i c2 = _mm256_setzero_si256(), c3 = _mm256_setzero_si256();
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    for (int round = 0; round < 10; ++round) {
      __m256i lo0, hi0, lo1, hi1;
      mulhilo_avx2(m0, c0, &lo0, &hi0);
      mulhilo_avx2(m1, c2, &lo1, &hi1);
      c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32(static_cast<int>(k0)));
      c1 = lo1;
      c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32(static_cast<int>(k1)));
      c3 = lo0;
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(r0 + i), c0);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(r1 + i), c1);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(r2 + i), c2);
  }
}
#endif

// Draws begin..end-1 into out. The Philox words of a block of draws are computed first, then the
// table is read draw by draw; the values are those of alias_draw(table, V,
// philox4x32_10(i, 0, seed)).
void draw_range(const int64_t* table, int64_t num_classes, uint64_t seed, int64_t begin,
                int64_t end, int64_t* out) {
  constexpr int64_t kBlock = 64;
  uint32_t r0[kBlock], r1[kBlock], r2[kBlock];
#ifdef FUSED_NCE_PHILOX_AVX2
  static const bool avx2 = __builtin_cpu_supports("avx2");
#endif
  for (int64_t b = begin; b < end; b += kBlock) {
    const int64_t m = std::min(kBlock, end - b);
#ifdef FUSED_NCE_PHILOX_AVX2
    if (avx2) {
      // Whole groups of eight (words past m are computed and never read).
      philox_words_avx2(static_cast<uint64_t>(b), (m + 7) / 8 * 8, seed, r0, r1, r2);
    } else {
      philox_words(static_cast<uint64_t>(b), m, seed, r0, r1, r2);
    }
#else
    philox_words(static_cast<uint64_t>(b), m, seed, r0, r1, r2);
#endif
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
