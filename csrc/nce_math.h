// The math every backend shares: stable logits, per-example loss and its gradient, and the
// counter-based random numbers behind the alias sampler. Host and device compile the same code,
// so the CPU and CUDA paths cannot drift apart.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define FUSED_NCE_HD __host__ __device__ __forceinline__
#else
#define FUSED_NCE_HD inline
#endif

namespace fused_nce {

// Values of the `objective` argument of the ops; python/fused_nce/_ops.py mirrors them.
enum Objective : int64_t {
  kNce = 0,
  kNegativeSampling = 1,
  kSampledSoftmax = 2,
};

// Smallest positive float32: a zero noise probability becomes a very unlikely class, not -inf.
constexpr float kTinyProb = 1.401298464324817e-45f;

FUSED_NCE_HD float clamp_noise_prob(float q) { return q > kTinyProb ? q : kTinyProb; }

template <typename T>
FUSED_NCE_HD T log_noise_prob(float q) {
  using std::log;
  return log(T(clamp_noise_prob(q)));
}

// NCE / negative sampling logit of a class: d = s - log_z - log(k q) for NCE, d = s otherwise.
// `shift` is log_z + log(k) for NCE (see binary_shift), `log_q` is unused by negative sampling.
template <typename T>
FUSED_NCE_HD T binary_shift(int64_t objective, T log_z, int64_t k) {
  using std::log;
  return objective == kNce ? log_z + log(T(k)) : T(0);
}

template <typename T>
FUSED_NCE_HD T binary_logit(int64_t objective, T score, T log_q, T shift) {
  return objective == kNce ? score - shift - log_q : score;
}

// One term of the NCE / negative sampling loss and its derivative in the score: the target
// (positive) contributes softplus(-d), a negative softplus(d).
template <typename T>
struct Term {
  T loss;
  T grad;
};

// The binary term from its transcendental parts: x = -d (target) or d (negative), e = exp(-|x|),
// u = 1 + e as rounded and log_u = log(u). softplus(x) = max(x, 0) + log1p(e) and sigmoid(x) =
// 1 / u or e / u, both from the one e <= 1 (never exp of a positive). log1p(e) is
// log(u) * e / (u - 1): as accurate as log1p (the rounding of u cancels; Goldberg 1991,
// Theorem 4) for a log and a division. The CPU computes the parts of a block of examples at once
// with vector exp / log (nce_cpu.cpp); binary_term computes them one at a time.
template <typename T>
FUSED_NCE_HD Term<T> binary_term_from_parts(bool positive, T x, T e, T u, T log_u) {
  const T log1p_e = u == T(1) ? e : log_u * (e / (u - T(1)));
  const T loss = (x > T(0) ? x : T(0)) + log1p_e;
  const T sig = x >= T(0) ? T(1) / u : e / u;
  return Term<T>{loss, positive ? -sig : sig};
}

template <typename T>
FUSED_NCE_HD Term<T> binary_term(bool positive, T d) {
  using std::exp;
  using std::fabs;
  using std::log;
  const T x = positive ? -d : d;
  const T e = exp(-fabs(x));
  const T u = T(1) + e;
  return binary_term_from_parts(positive, x, e, u, log(u));
}

// Sampled softmax: logQ-corrected logit o = s - log q (o = s for a hard negative); with lse =
// logsumexp over the example's logits and P its valid positives, the loss is
// lse - (1/|P|) sum_{t in P} o(t) (TensorFlow's soft labels) and dloss/ds = softmax(o) - label,
// label = 1/|P| at a positive and 0 elsewhere, from the probability softmax(o) = exp(o - lse).
template <typename T>
FUSED_NCE_HD T softmax_grad(T label, T prob) {
  return prob - label;
}

// Philox4x32-10 (Salmon et al., SC'11): 128 random bits per (counter, key), stateless, so each
// draw can be computed independently on any thread and reproduced from (seed, offset, index).
struct Philox128 {
  uint32_t x[4];
};

FUSED_NCE_HD uint32_t mulhilo32(uint32_t a, uint32_t b, uint32_t* hi) {
  const uint64_t product = static_cast<uint64_t>(a) * b;
  *hi = static_cast<uint32_t>(product >> 32);
  return static_cast<uint32_t>(product);
}

// The 128-bit counter is (counter, subsequence), as in curand_init(seed, subsequence, offset).
FUSED_NCE_HD Philox128 philox4x32_10(uint64_t counter, uint64_t subsequence, uint64_t seed) {
  uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32);
  uint32_t c2 = static_cast<uint32_t>(subsequence), c3 = static_cast<uint32_t>(subsequence >> 32);
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, hi1;
    const uint32_t lo0 = mulhilo32(0xD2511F53u, c0, &hi0);
    const uint32_t lo1 = mulhilo32(0xCD9E8D57u, c2, &hi1);
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return Philox128{{c0, c1, c2, c3}};
}

// ---- Alias table construction (Hubschle-Schneider & Sanders, "Parallel Weighted Random
// Sampling"): every entry is computed independently from prefix sums, so the same code builds the
// table sequentially on the CPU and in parallel on the GPU.
// With p = w V / sum(w), light classes (p < 1) and heavy classes (p >= 1) are each listed in index
// order; sigma_l[i] is the sum of the deficits 1 - p of the lights before light i and sigma_h[j]
// the sum of the surpluses p - 1 of the heavies before heavy j (both arrays end with the total).
// Light i is topped up by heavy j = max{j : sigma_h[j] <= sigma_l[i]}. A heavy that runs out in
// the middle of a light keeps that overshoot as its own bucket's deficit, which the next heavy
// fills: each bucket is filled by a single alias and every class keeps exactly its mass.

FUSED_NCE_HD int64_t pack_alias_entry(double keep, int64_t alias) {
  const double scaled = keep * 4294967296.0;
  const uint64_t threshold =
      scaled >= 4294967295.0 ? 0xFFFFFFFFull : (scaled > 0 ? static_cast<uint64_t>(scaled) : 0);
  return static_cast<int64_t>((static_cast<uint64_t>(alias) << 32) | threshold);
}

// First index in a sorted a[0..n) whose value is > x (upper) or >= x (lower).
FUSED_NCE_HD int64_t search_sorted(const double* a, int64_t n, double x, bool upper) {
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (upper ? a[mid] <= x : a[mid] < x) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

FUSED_NCE_HD int64_t light_alias_entry(int64_t self, double p, double sigma_l,
                                       const int64_t* heavy, const double* sigma_h,
                                       int64_t num_heavy) {
  // Rounding can leave every p just below 1 (e.g. V equal weights): then each bucket is full.
  if (num_heavy == 0) return pack_alias_entry(1.0, self);
  const int64_t j = search_sorted(sigma_h, num_heavy, sigma_l, /*upper=*/true) - 1;
  return pack_alias_entry(p, heavy[j > 0 ? j : 0]);
}

FUSED_NCE_HD int64_t heavy_alias_entry(int64_t j, const int64_t* heavy, const double* sigma_h,
                                       int64_t num_heavy, const double* sigma_l,
                                       int64_t num_light) {
  if (j == num_heavy - 1) return pack_alias_entry(1.0, heavy[j]);
  // The light where heavy j runs out ends at the start of the first light it does not fill.
  const int64_t next = search_sorted(sigma_l, num_light, sigma_h[j + 1], /*upper=*/false);
  const double overshoot = sigma_l[next] - sigma_h[j + 1];
  const double keep = 1.0 - overshoot;
  return pack_alias_entry(keep < 0 ? 0.0 : keep, heavy[j + 1]);
}

// Alias table entry: bits 63..32 hold the alias class, bits 31..0 the acceptance threshold
// scaled to 2^32 (a full bucket has alias == itself). One 8-byte load per draw.
FUSED_NCE_HD int64_t alias_draw(const int64_t* table, int64_t num_classes, Philox128 r) {
  const uint64_t bits = (static_cast<uint64_t>(r.x[1]) << 32) | r.x[0];
  // Multiply-high maps 64 random bits to [0, V) with bias below V / 2^64.
#if defined(__CUDA_ARCH__)
  const int64_t bucket = static_cast<int64_t>(__umul64hi(bits, static_cast<uint64_t>(num_classes)));
#else
  const int64_t bucket = static_cast<int64_t>(
      (static_cast<unsigned __int128>(bits) * static_cast<uint64_t>(num_classes)) >> 64);
#endif
  const uint64_t entry = static_cast<uint64_t>(table[bucket]);
  const uint32_t threshold = static_cast<uint32_t>(entry);
  const int64_t alias = static_cast<int64_t>(entry >> 32);
  // A select, not a branch: the comparison is a coin flip that a CPU would mispredict.
  const int64_t keep = -static_cast<int64_t>(r.x[2] < threshold);
  return alias ^ ((alias ^ bucket) & keep);
}

}  // namespace fused_nce
