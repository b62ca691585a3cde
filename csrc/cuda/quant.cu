// CUDA kernels of the blockwise 8-bit state ops (math: lowrank_optim/ops/quant.py): quantize_blockwise_,
// dequantize_blockwise and blockwise_adam_. One thread block per quantization block (grid-stride over the
// blocks), its maximum by a warp-shuffle and shared-memory reduction; the map's tables (values padded to
// 256 with NaN, thresholds padded to 255 with +inf) are built in shared memory by each thread block.
// Rounding follows csrc/cpu/quant.cpp: every operation is an explicitly rounded intrinsic (__fmul_rn,
// __fdiv_rn, __fsqrt_rn: correctly rounded whatever -prec-div/-prec-sqrt say), the two multiply-adds of
// the moment update are fmas as in cuda/adam.cu, and the file is built with -fmad=false.
#include <cstdint>

#include "common.cuh"

namespace lowrank_optim::cuda {
namespace {

constexpr int kMaxMapLength = 256;
constexpr int kThresholds = kMaxMapLength - 1;
constexpr int kMaxBlockThreads = 256;
constexpr int kWarp = 32;

// |x| as its bits: an unsigned maximum of these is max |x| with NaN propagation (every NaN lies above
// +inf), in any order; see csrc/cpu/quant.cpp.
__device__ __forceinline__ uint32_t magnitude_bits(float x) { return __float_as_uint(x) & 0x7fffffffu; }

__device__ __forceinline__ float divisor_of(float absmax) { return absmax > 0.0f ? absmax : 1.0f; }

__device__ __forceinline__ uint32_t warp_max(uint32_t value) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) value = max(value, __shfl_xor_sync(0xffffffffu, value, offset));
  return value;
}

// The maxima of two values over the thread block (blockDim.x a multiple of 32), returned to every thread.
// `scratch`: 2 x 32 values of shared memory. Ends with a barrier, so `scratch` may be reused at once.
__device__ __forceinline__ void block_max2(uint32_t& a, uint32_t& b, uint32_t* scratch) {
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, warps = blockDim.x / kWarp;
  a = warp_max(a);
  b = warp_max(b);
  if (lane == 0) {
    scratch[warp] = a;
    scratch[kWarp + warp] = b;
  }
  __syncthreads();
  a = warp_max(lane < warps ? scratch[lane] : 0u);
  b = warp_max(lane < warps ? scratch[kWarp + lane] : 0u);
  __syncthreads();
}

// The number of thresholds t with !(x <= t), clamped to the last code (a NaN passes every test): the
// branchless 8-step binary search of csrc/cpu/quant.cpp over the 255 padded thresholds.
__device__ __forceinline__ int code_of(float x, const float* thresholds, int last) {
  int position = 0;
#pragma unroll
  for (int step = 128; step >= 1; step /= 2) position += (!(x <= thresholds[position + step - 1])) ? step : 0;
  return min(position, last);
}

// A map's tables in shared memory, built by the whole thread block (followed by a barrier).
__device__ __forceinline__ void load_tables(const float* __restrict__ code_map, int length, float* values,
                                            float* thresholds) {
  const float nan = __int_as_float(0x7fc00000), inf = __int_as_float(0x7f800000);
  for (int k = threadIdx.x; k < kMaxMapLength; k += blockDim.x) {
    if (values != nullptr) values[k] = k < length ? code_map[k] : nan;
    if (k < kThresholds && thresholds != nullptr) {
      thresholds[k] = k + 1 < length ? __fmul_rn(__fadd_rn(code_map[k], code_map[k + 1]), 0.5f) : inf;
    }
  }
  __syncthreads();
}

struct Span {
  int64_t offset, count;
};

// Block `block` of a rows x n tensor with `per_row` blocks per row.
__device__ __forceinline__ Span block_span(int64_t block, int64_t n, int64_t per_row, int block_size) {
  const int64_t row = block / per_row;
  const int64_t start = (block - row * per_row) * block_size;
  const int64_t count = n - start < block_size ? n - start : block_size;
  return {row * n + start, count};
}

__global__ void quantize_kernel(const float* __restrict__ x, const float* __restrict__ code_map, int length,
                                int64_t blocks, int64_t n, int64_t per_row, int block_size, uint8_t* __restrict__ codes,
                                float* __restrict__ absmax) {
  __shared__ float thresholds[kThresholds];
  __shared__ uint32_t scratch[2 * kWarp];
  load_tables(code_map, length, nullptr, thresholds);
  for (int64_t block = blockIdx.x; block < blocks; block += gridDim.x) {
    const Span s = block_span(block, n, per_row, block_size);
    uint32_t maximum = 0, unused = 0;
    for (int64_t i = threadIdx.x; i < s.count; i += blockDim.x) maximum = max(maximum, magnitude_bits(x[s.offset + i]));
    block_max2(maximum, unused, scratch);
    const float block_absmax = __uint_as_float(maximum);
    if (threadIdx.x == 0) absmax[block] = block_absmax;
    const float divisor = divisor_of(block_absmax);
    for (int64_t i = threadIdx.x; i < s.count; i += blockDim.x) {
      codes[s.offset + i] = static_cast<uint8_t>(code_of(__fdiv_rn(x[s.offset + i], divisor), thresholds, length - 1));
    }
  }
}

__global__ void dequantize_kernel(const uint8_t* __restrict__ codes, const float* __restrict__ absmax,
                                  const float* __restrict__ code_map, int length, int64_t blocks, int64_t n,
                                  int64_t per_row, int block_size, float* __restrict__ out) {
  __shared__ float values[kMaxMapLength];
  load_tables(code_map, length, values, nullptr);
  for (int64_t block = blockIdx.x; block < blocks; block += gridDim.x) {
    const Span s = block_span(block, n, per_row, block_size);
    const float scale = absmax[block];
    for (int64_t i = threadIdx.x; i < s.count; i += blockDim.x) out[s.offset + i] = __fmul_rn(values[codes[s.offset + i]], scale);
  }
}

struct AdamScalars {
  float beta1, one_minus_beta1, beta2, one_minus_beta2, eps;
};

// Per block: dequantize, update (as cuda/adam.cu: M·b1 then fma(R, 1-b1, ·); V·b2 then fma((1-b2)·R, R, ·)),
// write N, keep the updated moments in shared memory (`buffers`: 2 x block_size floats) while the new
// maxima are reduced, then quantize them back. `skip` (nullable, a device bool): when set, the state is
// kept and N is zero, decided here so that the host never waits for the flag.
__global__ void blockwise_adam_kernel(const float* __restrict__ lowrank, uint8_t* __restrict__ exp_avg,
                                      float* __restrict__ exp_avg_absmax, uint8_t* __restrict__ exp_avg_sq,
                                      float* __restrict__ exp_avg_sq_absmax, float* __restrict__ normalized,
                                      const float* __restrict__ signed_map, int signed_length,
                                      const float* __restrict__ unsigned_map, int unsigned_length, int64_t blocks,
                                      int64_t n, int64_t per_row, int block_size, AdamScalars c,
                                      const bool* __restrict__ skip) {
  __shared__ float signed_values[kMaxMapLength], unsigned_values[kMaxMapLength];
  __shared__ float signed_thresholds[kThresholds], unsigned_thresholds[kThresholds];
  __shared__ uint32_t scratch[2 * kWarp];
  extern __shared__ float buffers[];
  float* m = buffers;
  float* v = buffers + block_size;
  if (skip != nullptr && *skip) {  // the same for every thread of the block: no barrier is left waiting
    for (int64_t block = blockIdx.x; block < blocks; block += gridDim.x) {
      const Span s = block_span(block, n, per_row, block_size);
      for (int64_t i = threadIdx.x; i < s.count; i += blockDim.x) normalized[s.offset + i] = 0.0f;
    }
    return;
  }
  load_tables(signed_map, signed_length, signed_values, signed_thresholds);
  load_tables(unsigned_map, unsigned_length, unsigned_values, unsigned_thresholds);
  for (int64_t block = blockIdx.x; block < blocks; block += gridDim.x) {
    const Span s = block_span(block, n, per_row, block_size);
    // Every thread reads the old maxima before block_max2's barriers; thread 0 overwrites them after.
    const float am = exp_avg_absmax[block], av = exp_avg_sq_absmax[block];
    uint32_t m_max = 0, v_max = 0;
    for (int64_t i = threadIdx.x; i < s.count; i += blockDim.x) {
      const int64_t e = s.offset + i;
      const float r = lowrank[e];
      const float m_decayed = __fmul_rn(__fmul_rn(signed_values[exp_avg[e]], am), c.beta1);
      const float v_decayed = __fmul_rn(__fmul_rn(unsigned_values[exp_avg_sq[e]], av), c.beta2);
      const float mi = __fmaf_rn(r, c.one_minus_beta1, m_decayed);
      const float vi = __fmaf_rn(__fmul_rn(c.one_minus_beta2, r), r, v_decayed);
      m[i] = mi;
      v[i] = vi;
      normalized[e] = __fdiv_rn(mi, __fadd_rn(__fsqrt_rn(vi), c.eps));
      m_max = max(m_max, magnitude_bits(mi));
      v_max = max(v_max, magnitude_bits(vi));
    }
    block_max2(m_max, v_max, scratch);  // its barriers also make m and v visible to the whole block
    const float new_am = __uint_as_float(m_max), new_av = __uint_as_float(v_max);
    if (threadIdx.x == 0) {
      exp_avg_absmax[block] = new_am;
      exp_avg_sq_absmax[block] = new_av;
    }
    const float m_divisor = divisor_of(new_am), v_divisor = divisor_of(new_av);
    for (int64_t i = threadIdx.x; i < s.count; i += blockDim.x) {
      const int64_t e = s.offset + i;
      exp_avg[e] = static_cast<uint8_t>(code_of(__fdiv_rn(m[i], m_divisor), signed_thresholds, signed_length - 1));
      exp_avg_sq[e] = static_cast<uint8_t>(code_of(__fdiv_rn(v[i], v_divisor), unsigned_thresholds, unsigned_length - 1));
    }
    __syncthreads();  // m and v are rewritten by the next block
  }
}

// Threads per quantization block: the block size rounded up to a whole number of warps, at most 256
// (each thread then strides over up to 16 elements of a 4096-element block).
int block_threads(int block_size) {
  int threads = kWarp;
  while (threads < block_size && threads < kMaxBlockThreads) threads *= 2;
  return threads;
}

// One thread block per quantization block, grid-stride beyond a few waves of the device.
int block_grid(int64_t blocks, int threads) {
  int device = 0, sms = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  const int64_t cap = static_cast<int64_t>(sms > 0 ? sms : 1) * (2048 / threads) * 4;
  return static_cast<int>(blocks < cap ? blocks : cap);
}

}  // namespace

cudaError_t quantize_blockwise(const float* x, const float* code_map, int map_length, int64_t rows, int64_t n,
                               int block_size, uint8_t* codes, float* absmax, cudaStream_t stream) {
  const int64_t per_row = (n + block_size - 1) / block_size;
  const int64_t blocks = rows * per_row;
  if (blocks == 0) return cudaSuccess;
  const int threads = block_threads(block_size);
  quantize_kernel<<<block_grid(blocks, threads), threads, 0, stream>>>(x, code_map, map_length, blocks, n, per_row,
                                                                      block_size, codes, absmax);
  return cudaGetLastError();
}

cudaError_t dequantize_blockwise(const uint8_t* codes, const float* absmax, const float* code_map, int map_length,
                                 int64_t rows, int64_t n, int block_size, float* out, cudaStream_t stream) {
  const int64_t per_row = (n + block_size - 1) / block_size;
  const int64_t blocks = rows * per_row;
  if (blocks == 0) return cudaSuccess;
  const int threads = block_threads(block_size);
  dequantize_kernel<<<block_grid(blocks, threads), threads, 0, stream>>>(codes, absmax, code_map, map_length, blocks, n,
                                                                        per_row, block_size, out);
  return cudaGetLastError();
}

cudaError_t blockwise_adam(const float* lowrank, uint8_t* exp_avg, float* exp_avg_absmax, uint8_t* exp_avg_sq,
                           float* exp_avg_sq_absmax, float* normalized, const float* signed_map, int signed_length,
                           const float* unsigned_map, int unsigned_length, int64_t rows, int64_t n, int block_size,
                           double beta1, double beta2, double eps, const bool* skip, cudaStream_t stream) {
  const int64_t per_row = (n + block_size - 1) / block_size;
  const int64_t blocks = rows * per_row;
  if (blocks == 0) return cudaSuccess;
  // lowrank_adam_'s fp32 coefficients: 1 - beta formed in double, then rounded (cuda/adam.cu).
  const AdamScalars c{static_cast<float>(beta1), static_cast<float>(1.0 - beta1), static_cast<float>(beta2),
                      static_cast<float>(1.0 - beta2), static_cast<float>(eps)};
  const int threads = block_threads(block_size);
  // 2 x 4096 floats at most (32 KiB) plus 4 KiB of static tables: under the default 48 KiB.
  const size_t buffer_bytes = 2 * static_cast<size_t>(block_size) * sizeof(float);
  blockwise_adam_kernel<<<block_grid(blocks, threads), threads, buffer_bytes, stream>>>(
      lowrank, exp_avg, exp_avg_absmax, exp_avg_sq, exp_avg_sq_absmax, normalized, signed_map, signed_length,
      unsigned_map, unsigned_length, blocks, n, per_row, block_size, c, skip);
  return cudaGetLastError();
}

}  // namespace lowrank_optim::cuda
