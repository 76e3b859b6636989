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

// Widest vector (16, 8 or 4 bytes, else one element) such that every row stays aligned: every base
// pointer and every row stride (in elements) must be a multiple of it. The kernels read the last
// dim % VEC elements of a row one at a time, so D need not be a multiple of VEC.
template <typename T>
int vector_width(std::initializer_list<const void*> bases, std::initializer_list<int64_t> strides) {
  for (int bytes = 16; bytes > static_cast<int>(sizeof(T)); bytes /= 2) {
    bool aligned = true;
    for (const void* p : bases) aligned = aligned && reinterpret_cast<uintptr_t>(p) % bytes == 0;
    for (const int64_t s : strides) aligned = aligned && (s * sizeof(T)) % bytes == 0;
    if (aligned) return bytes / static_cast<int>(sizeof(T));
  }
  return 1;
}

// Calls f(std::integral_constant<int, VEC>) with VEC = the vector width chosen above.
template <typename T, typename F>
void with_vector_width(int width, const F& f) {
  constexpr int k16 = 16 / sizeof(T), k8 = 8 / sizeof(T), k4 = 4 / sizeof(T);
  if (width >= k16) {
    f(std::integral_constant<int, k16>{});
  } else if constexpr (k8 > 1) {
    if (width >= k8) {
      f(std::integral_constant<int, k8>{});
    } else if constexpr (k4 > 1) {
      if (width >= k4) {
        f(std::integral_constant<int, k4>{});
      } else {
        f(std::integral_constant<int, 1>{});
      }
    } else {
      f(std::integral_constant<int, 1>{});
    }
  } else {
    f(std::integral_constant<int, 1>{});
  }
}

// A lane's share of a row of D elements: vectors lane, lane + 32, ... held in registers, up to
// kTileVecs of them per pass (D up to 32 * kTileVecs * VEC per pass; longer rows take more passes).
constexpr int kTileVecs = 4;

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
