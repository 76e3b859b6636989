// What the CUDA kernels share: warp reductions, 16-byte vector loads, launch helpers and scratch
// memory from torch's caching allocator. Only headers that need no cuBLAS / cuSPARSE.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>

#include <cstdint>
#include <type_traits>

namespace fused_nce {
namespace cuda {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xFFFFFFFFu;
// Warps per block of the warp-per-item kernels.
constexpr int kWarpsPerBlock = 8;

// float32 accumulation for every input dtype but float64.
template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

template <typename T>
__device__ __forceinline__ T warp_sum(T value) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    value += __shfl_xor_sync(kFullMask, value, offset);
  }
  return value;
}

template <typename T>
__device__ __forceinline__ T warp_max(T value) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    const T other = __shfl_xor_sync(kFullMask, value, offset);
    value = other > value ? other : value;
  }
  return value;
}

// VEC consecutive elements, loaded or stored as one access (16 bytes when VEC * sizeof(T) == 16).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Packed {
  T v[VEC];
};

template <int VEC, typename acc_t, typename T>
__device__ __forceinline__ void load_vec(const T* __restrict__ p, acc_t (&out)[VEC]) {
  const Packed<T, VEC> x = *reinterpret_cast<const Packed<T, VEC>*>(p);
#pragma unroll
  for (int v = 0; v < VEC; ++v) out[v] = static_cast<acc_t>(x.v[v]);
}

template <int VEC, typename acc_t, typename T>
__device__ __forceinline__ void store_vec(const acc_t (&in)[VEC], T* __restrict__ p) {
  Packed<T, VEC> x;
#pragma unroll
  for (int v = 0; v < VEC; ++v) x.v[v] = static_cast<T>(in[v]);
  *reinterpret_cast<Packed<T, VEC>*>(p) = x;
}

// Widest vector for rows of `dim` elements of T starting at every given pointer: 16 bytes when
// every row stays 16-byte aligned, else one element at a time.
template <typename T>
int vector_width(int64_t dim, std::initializer_list<const void*> bases) {
  constexpr int kWide = 16 / sizeof(T);
  bool aligned = dim % kWide == 0;
  for (const void* p : bases) aligned = aligned && reinterpret_cast<uintptr_t>(p) % 16 == 0;
  return aligned ? kWide : 1;
}

// Calls f(std::integral_constant<int, VEC>) with VEC = the vector width chosen above.
template <typename T, typename F>
void with_vector_width(int width, const F& f) {
  constexpr int kWide = 16 / sizeof(T);
  if (width == kWide) {
    f(std::integral_constant<int, kWide>{});
  } else {
    f(std::integral_constant<int, 1>{});
  }
}

// Blocks of kWarpsPerBlock warps, one warp per item.
inline dim3 warp_grid(int64_t items) {
  return dim3(static_cast<unsigned>((items + kWarpsPerBlock - 1) / kWarpsPerBlock));
}

__device__ __forceinline__ int64_t global_warp() {
  return (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarpSize;
}

// Scratch bytes (cub temporary storage), from torch's caching allocator on the current stream.
inline at::Tensor scratch_bytes(size_t bytes, const at::Tensor& like) {
  return at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
}

}  // namespace cuda
}  // namespace fused_nce
