// Included by lora.cu and nf4.cu (a header: named .cu so setup.cfg's package_data ships it).
// Shared helpers for lowrank's CUDA kernels: loads/stores of float or __half with float
// arithmetic, 16-byte vector loads, the warp sum and the per-row adapter lookup.
#ifndef LOWRANK_COMMON_CU
#define LOWRANK_COMMON_CU
#include <cuda_fp16.h>

// The GEMV kernels of both files (N <= GEMV_ROWS rows): GEMV_WARPS warps per block, one per
// output; cupy_gpu passes the values of kernels/config.py with -D.
#ifndef GEMV_ROWS
#define GEMV_ROWS 4
#endif
#ifndef GEMV_WARPS
#define GEMV_WARPS 8
#endif

__device__ __forceinline__ float ld(const float* p, long long i) { return p[i]; }
__device__ __forceinline__ float ld(const __half* p, long long i) { return __half2float(p[i]); }
__device__ __forceinline__ void st(float* p, long long i, float v) { p[i] = v; }
__device__ __forceinline__ void st(__half* p, long long i, float v) { p[i] = __float2half_rn(v); }

// Elements per 16-byte vector: 4 floats or 8 halves.
template <typename T> struct Vec { static constexpr int n = 16 / sizeof(T); };

// One 16-byte load widened to float (p must be 16-byte aligned).
__device__ __forceinline__ void vload(const float* p, float* v) {
  const float4 u = *reinterpret_cast<const float4*>(p);
  v[0] = u.x; v[1] = u.y; v[2] = u.z; v[3] = u.w;
}
__device__ __forceinline__ void vload(const __half* p, float* v) {
  const uint4 u = *reinterpret_cast<const uint4*>(p);
  const __half2* q = reinterpret_cast<const __half2*>(&u);
#pragma unroll
  for (int t = 0; t < 4; ++t) {
    const float2 f = __half22float2(q[t]);
    v[2 * t] = f.x; v[2 * t + 1] = f.y;
  }
}

// Four elements widened to float: 16 bytes of float, 8 bytes of __half (p aligned to that).
__device__ __forceinline__ void vload4(const float* p, float* v) { vload(p, v); }
__device__ __forceinline__ void vload4(const __half* p, float* v) {
  const uint2 u = *reinterpret_cast<const uint2*>(p);
  const __half2* q = reinterpret_cast<const __half2*>(&u);
  const float2 a = __half22float2(q[0]), b = __half22float2(q[1]);
  v[0] = a.x; v[1] = a.y; v[2] = b.x; v[3] = b.y;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Adapter of row n: idx[n] (-1 = base model only), or 0 when there is one adapter (idx null).
__device__ __forceinline__ int adapter_of(const long long* idx, int n) { return idx ? (int)idx[n] : 0; }

// Scaling of adapter a: scal[a] for a stack, else the single adapter's scaling.
__device__ __forceinline__ float scaling_of(const float* scal, float scaling, int a) { return scal ? scal[a] : scaling; }

#endif  // LOWRANK_COMMON_CU
