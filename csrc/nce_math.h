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

template <typename T>
FUSED_NCE_HD T softplus(T x) {
  using std::exp;
  using std::fabs;
  using std::log1p;
  // log(1 + e^x) = max(x, 0) + log(1 + e^-|x|): never exponentiates a positive number.
  return (x > T(0) ? x : T(0)) + log1p(exp(-fabs(x)));
}

template <typename T>
FUSED_NCE_HD T sigmoid(T x) {
  using std::exp;
  if (x >= T(0)) return T(1) / (T(1) + exp(-x));
  const T e = exp(x);
  return e / (T(1) + e);
}

template <typename T>
FUSED_NCE_HD T log_noise_prob(float q) {
  using std::log;
  return log(T(q > kTinyProb ? q : kTinyProb));
}

// One example of the sampled losses. On entry `s[0]` is the target's score and `s[1..k]` the
// negatives' scores, `log_q[j]` the log noise probability of the same classes (unused by negative
// sampling) and `dropped[j]` marks accidental hits to drop (`dropped[0]` is ignored). On exit
// `s[j]` holds dloss/ds[j]. Returns the loss. `log_z` is used by NCE only.
template <typename T>
FUSED_NCE_HD T example_loss_and_grad(int64_t objective, int64_t k, T* s, const T* log_q,
                                     const bool* dropped, T log_z) {
  using std::exp;
  using std::log;
  if (objective == kSampledSoftmax) {
    // logQ-corrected logits o = s - log q; loss = logsumexp(o) - o[0].
    T max_logit = s[0] - log_q[0];
    for (int64_t j = 0; j <= k; ++j) {
      if (j > 0 && dropped[j]) continue;
      s[j] -= log_q[j];
      if (s[j] > max_logit) max_logit = s[j];
    }
    T sum = T(0);
    for (int64_t j = 0; j <= k; ++j) {
      if (j == 0 || !dropped[j]) sum += exp(s[j] - max_logit);
    }
    const T lse = max_logit + log(sum);
    const T loss = lse - s[0];
    for (int64_t j = 0; j <= k; ++j) {
      s[j] = (j > 0 && dropped[j]) ? T(0) : exp(s[j] - lse) - T(j == 0);
    }
    return loss;
  }
  // NCE: d = s - log_z - log(k q); negative sampling: d = s.
  const bool nce = objective == kNce;
  const T shift = nce ? log_z + log(T(k)) : T(0);
  T loss = T(0);
  for (int64_t j = 0; j <= k; ++j) {
    if (j > 0 && dropped[j]) {
      s[j] = T(0);
      continue;
    }
    const T d = s[j] - shift - (nce ? log_q[j] : T(0));
    if (j == 0) {
      loss += softplus(-d);
      s[j] = -sigmoid(-d);
    } else {
      loss += softplus(d);
      s[j] = sigmoid(d);
    }
  }
  return loss;
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

FUSED_NCE_HD Philox128 philox4x32_10(uint64_t counter, uint64_t offset, uint64_t seed) {
  uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32);
  uint32_t c2 = static_cast<uint32_t>(offset), c3 = static_cast<uint32_t>(offset >> 32);
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
  return r.x[2] < threshold ? bucket : static_cast<int64_t>(entry >> 32);
}

}  // namespace fused_nce
