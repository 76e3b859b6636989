// The update rules of the fused row optimizers, one element at a time. The CPU and CUDA kernels
// both call these, so the two backends compute the same arithmetic in the same order.
#pragma once

#include <cmath>

#include "nce_math.h"  // FUSED_NCE_HD

namespace fused_nce {

// SGD with L2 weight decay, as torch.optim.SGD: g' = g + wd * p; p -= lr * g'.
template <typename T>
FUSED_NCE_HD T sgd_update(T p, T g, T lr, T weight_decay) {
  return p - lr * (g + weight_decay * p);
}

// Adagrad, as torch.optim.Adagrad: sum += g^2; p -= lr * g / (sqrt(sum) + eps); `sum` in place.
template <typename T>
FUSED_NCE_HD T adagrad_update(T p, T g, T& sum, T lr, T eps) {
  using std::sqrt;
  sum += g * g;
  // A division, not a product with a reciprocal: it rounds as torch's rule does.
  return p - lr * (g / (sqrt(sum) + eps));
}

// Row-wise Adagrad: one accumulator per row, sum += mean over the row of g^2 (the caller reduces
// and updates it), then every element of the row shares the denominator.
template <typename T>
FUSED_NCE_HD T adagrad_row_update(T p, T g, T row_sum, T lr, T eps) {
  using std::sqrt;
  return p - lr * (g / (sqrt(row_sum) + eps));
}

// Adam as torch.optim.SparseAdam writes it: m += (1 - b1)(g - m); v += (1 - b2)(g^2 - v);
// p -= step_size * m / (sqrt(v) + eps), step_size = lr sqrt(1 - b2^t) / (1 - b1^t).
// torch.optim.Adam is the same rule with eps scaled by sqrt(1 - b2^t): the caller passes that eps
// for dense gradients. m and v in place.
template <typename T>
FUSED_NCE_HD T adam_update(T p, T g, T& m, T& v, T step_size, T beta1, T beta2, T eps) {
  using std::sqrt;
  m += (g - m) * (T(1) - beta1);
  v += (g * g - v) * (T(1) - beta2);
  return p - step_size * (m / (sqrt(v) + eps));
}

}  // namespace fused_nce
