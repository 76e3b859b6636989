// Large CPU gradients made on every step and dropped at the next zero_grad() (the dense [V, D]
// weight gradient, the [U, D] rows of a sparse one): their memory is kept when the tensor dies and
// handed to the next one of about the same size. A fresh mapping costs a page fault and the
// kernel's zeroing of every page before the kernel writes the gradient anyway; writing memory
// already mapped costs only the write.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace fused_nce {

// Buffers of at least this many bytes are reused. glibc hands out smaller blocks from its heap,
// which recycles them already; larger ones (its dynamic mmap threshold stops at 32 MiB) are fresh
// mappings every time.
constexpr int64_t kReusedBufferBytes = int64_t{32} << 20;

// An uninitialized contiguous CPU tensor, transparent huge pages asked for where it spans whole
// ones; at least kReusedBufferBytes large, its memory comes from (and returns to) the spares.
at::Tensor empty_reused(at::IntArrayRef sizes, const at::TensorOptions& options);

// Unmaps the spare buffers not in use; returns their bytes.
int64_t release_reused_buffers();

// The bytes held in spare buffers not in use.
int64_t reused_buffer_bytes();

}  // namespace fused_nce
