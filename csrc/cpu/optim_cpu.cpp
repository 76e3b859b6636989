// Fused row optimizers on the CPU: one parallel pass over the rows present in the gradient reads
// each row's gradient, parameter and state once and writes the parameter and state in place.
// Rows are unique (a coalesced gradient; checked here), so threads never share a row.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "../fused_nce.h"
#include "../optim_checks.h"
#include "../optim_math.h"

namespace fused_nce {
namespace {

template <typename scalar_t>
using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// Checks every row index before any memory is touched: in [0, V) and strictly ascending, which
// also makes them unique.
void check_rows(const at::Tensor& rows, int64_t num_rows) {
  const int64_t* r = rows.const_data_ptr<int64_t>();
  const int64_t n = rows.numel();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK_INDEX(r[i] >= 0 && r[i] < num_rows, "row index ", r[i], " at ", i,
                      " is outside [0, ", num_rows, ")");
    TORCH_CHECK_VALUE(i == 0 || r[i] > r[i - 1],
                      "rows must be strictly ascending (a coalesced gradient), got ", r[i - 1],
                      " before ", r[i]);
  }
}

// Calls f(u, row) for every update u in parallel, row = rows[u] (or u for a dense gradient).
template <typename F>
void for_each_row(const std::optional<at::Tensor>& rows, int64_t num_rows, int64_t num_updates,
                  int64_t dim, const F& f) {
  const int64_t* r = nullptr;
  at::Tensor rows_c;
  if (rows.has_value()) {
    rows_c = rows->contiguous();
    check_rows(rows_c, num_rows);
    r = rows_c.const_data_ptr<int64_t>();
  }
  // About 16k elements per task: enough work to amortize scheduling, small enough to balance.
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(dim, 1));
  at::parallel_for(0, num_updates, grain, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) f(u, r ? r[u] : u);
  });
}

// One row of each rule. Separate functions with __restrict__ rows so the compiler vectorizes the
// loops (this file is built with -fno-math-errno, which lets sqrt vectorize too).
template <typename scalar_t, typename acc>
void sgd_row(scalar_t* __restrict__ p, const scalar_t* __restrict__ g, int64_t dim, acc lr,
             acc weight_decay) {
  for (int64_t j = 0; j < dim; ++j) {
    p[j] = static_cast<scalar_t>(
        sgd_update<acc>(static_cast<acc>(p[j]), static_cast<acc>(g[j]), lr, weight_decay));
  }
}

template <typename scalar_t, typename acc>
void adagrad_row(scalar_t* __restrict__ p, acc* __restrict__ sum, const scalar_t* __restrict__ g,
                 int64_t dim, acc lr, acc eps) {
  for (int64_t j = 0; j < dim; ++j) {
    p[j] = static_cast<scalar_t>(
        adagrad_update<acc>(static_cast<acc>(p[j]), static_cast<acc>(g[j]), sum[j], lr, eps));
  }
}

template <typename scalar_t, typename acc>
void adagrad_rowwise_row(scalar_t* __restrict__ p, acc* __restrict__ row_sum,
                         const scalar_t* __restrict__ g, int64_t dim, acc lr, acc eps) {
  acc square_sum = 0;
  for (int64_t j = 0; j < dim; ++j) {
    const acc gj = static_cast<acc>(g[j]);
    square_sum += gj * gj;
  }
  *row_sum += square_sum / static_cast<acc>(dim);
  const acc s = *row_sum;
  for (int64_t j = 0; j < dim; ++j) {
    p[j] = static_cast<scalar_t>(
        adagrad_row_update<acc>(static_cast<acc>(p[j]), static_cast<acc>(g[j]), s, lr, eps));
  }
}

template <typename scalar_t, typename acc>
void adam_row(scalar_t* __restrict__ p, acc* __restrict__ m, acc* __restrict__ v,
              const scalar_t* __restrict__ g, int64_t dim, acc step_size, acc beta1, acc beta2,
              acc eps) {
  for (int64_t j = 0; j < dim; ++j) {
    p[j] = static_cast<scalar_t>(adam_update<acc>(static_cast<acc>(p[j]), static_cast<acc>(g[j]),
                                                  m[j], v[j], step_size, beta1, beta2, eps));
  }
}

}  // namespace

void row_sgd_step_cpu(const at::Tensor& param, const std::optional<at::Tensor>& rows,
                      const at::Tensor& grad, double lr, double weight_decay) {
  const RowShape shape = check_row_update(param, rows, grad);
  const int64_t num_rows = shape.num_rows, dim = shape.dim, num_updates = shape.num_updates;
  const auto g = grad.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, param.scalar_type(), "row_sgd_step",
                                  [&] {
    using acc = acc_t<scalar_t>;
    scalar_t* p = param.mutable_data_ptr<scalar_t>();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const acc lr_ = static_cast<acc>(lr), wd = static_cast<acc>(weight_decay);
    for_each_row(rows, num_rows, num_updates, dim, [&](int64_t u, int64_t row) {
      sgd_row(p + row * dim, gp + u * dim, dim, lr_, wd);
    });
  });
}

void row_adagrad_step_cpu(const at::Tensor& param, const at::Tensor& state_sum,
                          const std::optional<at::Tensor>& rows, const at::Tensor& grad,
                          double lr, double eps, bool rowwise) {
  const RowShape shape = check_row_update(param, rows, grad);
  const int64_t num_rows = shape.num_rows, dim = shape.dim, num_updates = shape.num_updates;
  if (rowwise) {
    check_state("state_sum", state_sum, param, {num_rows});
  } else {
    check_state("state_sum", state_sum, param, param.sizes());
  }
  const auto g = grad.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, param.scalar_type(),
                                  "row_adagrad_step", [&] {
    using acc = acc_t<scalar_t>;
    scalar_t* p = param.mutable_data_ptr<scalar_t>();
    acc* s = state_sum.mutable_data_ptr<acc>();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const acc lr_ = static_cast<acc>(lr), eps_ = static_cast<acc>(eps);
    for_each_row(rows, num_rows, num_updates, dim, [&](int64_t u, int64_t row) {
      if (rowwise) {
        adagrad_rowwise_row(p + row * dim, s + row, gp + u * dim, dim, lr_, eps_);
      } else {
        adagrad_row(p + row * dim, s + row * dim, gp + u * dim, dim, lr_, eps_);
      }
    });
  });
}

void row_adam_step_cpu(const at::Tensor& param, const at::Tensor& exp_avg,
                       const at::Tensor& exp_avg_sq, const std::optional<at::Tensor>& rows,
                       const at::Tensor& grad, double step_size, double beta1, double beta2,
                       double eps) {
  const RowShape shape = check_row_update(param, rows, grad);
  const int64_t num_rows = shape.num_rows, dim = shape.dim, num_updates = shape.num_updates;
  check_state("exp_avg", exp_avg, param, param.sizes());
  check_state("exp_avg_sq", exp_avg_sq, param, param.sizes());
  const auto g = grad.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, param.scalar_type(), "row_adam_step",
                                  [&] {
    using acc = acc_t<scalar_t>;
    scalar_t* p = param.mutable_data_ptr<scalar_t>();
    acc* m = exp_avg.mutable_data_ptr<acc>();
    acc* v = exp_avg_sq.mutable_data_ptr<acc>();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const acc step_size_ = static_cast<acc>(step_size), b1 = static_cast<acc>(beta1),
              b2 = static_cast<acc>(beta2), eps_ = static_cast<acc>(eps);
    for_each_row(rows, num_rows, num_updates, dim, [&](int64_t u, int64_t row) {
      adam_row(p + row * dim, m + row * dim, v + row * dim, gp + u * dim, dim, step_size_, b1,
               b2, eps_);
    });
  });
}

TORCH_LIBRARY_IMPL(fused_nce, CPU, m) {
  m.impl("row_sgd_step", &row_sgd_step_cpu);
  m.impl("row_adagrad_step", &row_adagrad_step_cpu);
  m.impl("row_adam_step", &row_adam_step_cpu);
}

}  // namespace fused_nce
