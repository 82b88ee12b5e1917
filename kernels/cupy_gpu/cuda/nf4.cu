// NF4 (QLoRA) kernels for lowrank.kernels.cupy_gpu (T = float or __half, float accumulation).
//
//   element e of W (row-major, flattened) = NF4[q(e)] * absmax[e / blocksize]
//   q(e) = packed[e / 2] >> 4 for even e (the high nibble), packed[e / 2] & 15 for odd e
//
//   dequant  W[e] for every e                                   one byte (two elements) per thread
//   gemv     y[n, o] = sum_i x[n, i] W[o, i] + b[o]               one warp per output o, small N only
#include "common.cu"

__device__ const float NF4[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};

__device__ __forceinline__ int nf4_code(const unsigned char* packed, long long e) {
  return (packed[e >> 1] >> nibble_shift(e)) & 15;
}

// grid ceil(ceil(numel / 2) / NF4_THREADS), block NF4_THREADS
template <typename T>
__device__ void dequant(const unsigned char* packed, const float* absmax, T* W, long long numel, int blocksize) {
  __shared__ float code[16];
  if (threadIdx.x < 16) code[threadIdx.x] = NF4[threadIdx.x];
  __syncthreads();
  const long long e = dequant_elem(blockIdx.x, threadIdx.x);
  if (e >= numel) return;
  const unsigned int q = packed[e >> 1];
  st(W, e, code[(q >> nibble_shift(e)) & 15] * absmax[e / blocksize]);
  if (e + 1 < numel) st(W, e + 1, code[(q >> nibble_shift(e + 1)) & 15] * absmax[(e + 1) / blocksize]);
}

// grid ceil(D_out / GEMV_WARPS), block 32 * GEMV_WARPS.
// vec: D_in % 8 == 0 and blocksize % 8 == 0, so 8 elements = 4 aligned bytes share one absmax.
template <typename T>
__device__ void gemv(const T* x, const unsigned char* packed, const float* absmax, const T* bias, T* y,
                     int N, int D_in, int D_out, int blocksize, int vec) {
  __shared__ float code[16];
  if (threadIdx.x < 16) code[threadIdx.x] = NF4[threadIdx.x];
  __syncthreads();
  const int o = gemv_col(blockIdx.x, threadIdx.x), lane = lane_of(threadIdx.x);
  if (o >= D_out) return;                         // the whole warp leaves together
  const long long row = (long long)o * D_in;
  for (int n0 = 0; n0 < N; n0 += GEMV_ROWS) {
    float acc[GEMV_ROWS];
#pragma unroll
    for (int i = 0; i < GEMV_ROWS; ++i) acc[i] = 0.f;
    if (vec) {
#pragma unroll 4
      for (int k = stride_k0(lane, 8); k < D_in; k += stride_step(32, 8)) {
        const unsigned int u = *reinterpret_cast<const unsigned int*>(packed + ((row + k) >> 1));
        const float s = absmax[(row + k) / blocksize];
        float w[8];
#pragma unroll
        for (int t = 0; t < 4; ++t) {             // byte t (little-endian) holds elements 2t, 2t+1
          const unsigned int q = (u >> (8 * t)) & 255u;
          w[2 * t] = code[(q >> nibble_shift(2 * t)) & 15] * s;
          w[2 * t + 1] = code[(q >> nibble_shift(2 * t + 1)) & 15] * s;
        }
#pragma unroll
        for (int i = 0; i < GEMV_ROWS; ++i) {
          if (n0 + i >= N) break;
          const T* xn = x + (long long)(n0 + i) * D_in + k;
#pragma unroll
          for (int v = 0; v < 8; ++v) acc[i] += w[v] * ld(xn, v);
        }
      }
    } else {
      for (int k = stride_k0(lane, 1); k < D_in; k += stride_step(32, 1)) {
        const float w = code[nf4_code(packed, row + k)] * absmax[(row + k) / blocksize];
#pragma unroll
        for (int i = 0; i < GEMV_ROWS; ++i)
          if (n0 + i < N) acc[i] += w * ld(x, (long long)(n0 + i) * D_in + k);
      }
    }
#pragma unroll
    for (int i = 0; i < GEMV_ROWS; ++i) {
      acc[i] = warp_sum(acc[i]);
      if (lane == 0 && n0 + i < N) st(y, (long long)(n0 + i) * D_out + o, acc[i] + (bias ? ld(bias, o) : 0.f));
    }
  }
}

#define NF4_KERNELS(T, S)                                                                                \
  extern "C" __global__ void __launch_bounds__(NF4_THREADS) nf4_dequant_##S(                             \
      const unsigned char* packed, const float* absmax, T* W, long long numel, int blocksize) {          \
    dequant<T>(packed, absmax, W, numel, blocksize);                                                     \
  }                                                                                                       \
  extern "C" __global__ void __launch_bounds__(32 * GEMV_WARPS) nf4_gemv_##S(                            \
      const T* x, const unsigned char* packed, const float* absmax, const T* bias, T* y, int N, int D_in, \
      int D_out, int blocksize, int vec) {                                                                \
    gemv<T>(x, packed, absmax, bias, y, N, D_in, D_out, blocksize, vec);                                 \
  }

NF4_KERNELS(float, f32)
NF4_KERNELS(__half, f16)
