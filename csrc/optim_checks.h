// Argument checks of the row-optimizer ops, shared by every backend. The row indices themselves
// are checked by each backend: on the host for the CPU, in the kernels (device-side assert) on
// CUDA.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

namespace fused_nce {

// The dtype of the optimizer state: float32 for float32 / bfloat16 / float16 parameters.
inline at::ScalarType optim_state_dtype(at::ScalarType param_dtype) {
  return param_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

// V rows of D elements each (D = 1 for a 1-D parameter), U of them updated.
struct RowShape {
  int64_t num_rows, dim, num_updates;
};

// Checks param [V, ...], rows [U] (int64) with grad [U, ...], or no rows with grad [V, ...].
inline RowShape check_row_update(
    const at::Tensor& param, const std::optional<at::Tensor>& rows, const at::Tensor& grad) {
  TORCH_CHECK_VALUE(param.dim() >= 1, "param must have at least one dimension (rows)");
  TORCH_CHECK_VALUE(param.is_contiguous(), "param must be contiguous");
  const auto dtype = param.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 ||
                       dtype == at::kHalf,
                   "param must be float32, float64, bfloat16 or float16, got ", dtype);
  TORCH_CHECK_TYPE(grad.scalar_type() == dtype, "grad must have param's dtype ", dtype, ", got ",
                   grad.scalar_type());
  TORCH_CHECK_VALUE(grad.device() == param.device(), "grad must be on param's device");
  const int64_t num_rows = param.size(0);
  const int64_t dim = num_rows == 0 ? 0 : param.numel() / num_rows;
  int64_t num_updates = num_rows;
  if (rows.has_value()) {
    TORCH_CHECK_TYPE(rows->scalar_type() == at::kLong, "rows must be int64");
    TORCH_CHECK_VALUE(rows->dim() == 1, "rows must be [U]");
    TORCH_CHECK_VALUE(rows->device() == param.device(), "rows must be on param's device");
    num_updates = rows->size(0);
  }
  TORCH_CHECK_VALUE(grad.dim() == param.dim() && grad.size(0) == num_updates &&
                        grad.sizes().slice(1) == param.sizes().slice(1),
                    "grad must be [", num_updates, ", ", param.sizes().slice(1), "...], got ",
                    grad.sizes());
  return {num_rows, dim, num_updates};
}

// Optimizer state: `shape` (the parameter's, or [V] for row-wise state), the state dtype,
// contiguous, on the parameter's device.
inline void check_state(const char* name, const at::Tensor& state, const at::Tensor& param,
                        at::IntArrayRef shape) {
  TORCH_CHECK_TYPE(state.scalar_type() == optim_state_dtype(param.scalar_type()), name,
                   " must be ", optim_state_dtype(param.scalar_type()), " for a ",
                   param.scalar_type(), " param, got ", state.scalar_type());
  TORCH_CHECK_VALUE(state.sizes() == shape, name, " must have shape ", shape, ", got ",
                    state.sizes());
  TORCH_CHECK_VALUE(state.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK_VALUE(state.device() == param.device(), name, " must be on param's device");
}

}  // namespace fused_nce
