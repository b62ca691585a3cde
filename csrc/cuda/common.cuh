// Shared device helpers of the CUDA kernels: dtype conversions and launch geometry.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "launchers.h"

namespace lowrank_optim::cuda {

// Reduced precision computes in float (ATen's opmath type) and rounds to nearest-even on store.
// Conversions go through these functions only: torch's build defines __CUDA_NO_HALF_CONVERSIONS__ and
// __CUDA_NO_BFLOAT16_CONVERSIONS__, which remove the implicit casts. Host-callable too, for scalars
// that the reference rounds to the tensor's dtype before the kernel sees them.
template <typename T>
struct Acc {
  using type = T;
};
template <>
struct Acc<__half> {
  using type = float;
};
template <>
struct Acc<__nv_bfloat16> {
  using type = float;
};

__host__ __device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__host__ __device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }
__host__ __device__ __forceinline__ float to_acc(float x) { return x; }
__host__ __device__ __forceinline__ double to_acc(double x) { return x; }

template <typename T>
__host__ __device__ __forceinline__ T from_acc(typename Acc<T>::type x) {
  return static_cast<T>(x);
}
template <>
__host__ __device__ __forceinline__ __half from_acc<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__host__ __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

constexpr int kThreads = 256;

// Grid-stride loops: enough blocks to fill every SM several times over, never more than the work needs.
inline int grid_size(int64_t work_items) {
  int device = 0;
  int sms = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  const int64_t needed = (work_items + kThreads - 1) / kThreads;
  const int64_t cap = static_cast<int64_t>(sms > 0 ? sms : 1) * 8;
  return static_cast<int>(needed < cap ? (needed > 0 ? needed : 1) : cap);
}

// Calls `body` with a value of the C++ element type matching `element_type`.
template <typename Body>
cudaError_t dispatch_element(ElementType element_type, Body&& body) {
  switch (element_type) {
    case ElementType::kFloat32:
      return body(float{});
    case ElementType::kFloat64:
      return body(double{});
    case ElementType::kFloat16:
      return body(__half{});
    case ElementType::kBFloat16:
      return body(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

template <typename Body>
cudaError_t dispatch_index(IndexType index_type, Body&& body) {
  return index_type == IndexType::kInt32 ? body(int32_t{}) : body(int64_t{});
}

}  // namespace lowrank_optim::cuda
