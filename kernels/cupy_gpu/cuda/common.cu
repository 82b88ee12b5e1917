// Included by lora.cu and nf4.cu (a header: named .cu so setup.cfg's package_data ships it).
// Shared helpers for lowrank's CUDA kernels: loads/stores of float or __half with float
// arithmetic, 16-byte vector loads, the warp sum and the per-row adapter lookup.
#ifndef LOWRANK_COMMON_CU
#define LOWRANK_COMMON_CU
#include <cuda_fp16.h>

// Block sizes have one source, kernels/config.py: cupy_gpu/launch.py defines() passes them as -D
// options (SHRINK_* and EXPAND_* for lora.cu, GEMV_* for both GEMV kernels, NF4_THREADS for nf4.cu).
#if !defined(SHRINK_ROWS) || !defined(SHRINK_RANKS) || !defined(SHRINK_THREADS) || !defined(EXPAND_ROWS) || \
    !defined(EXPAND_THREADS) || !defined(GEMV_ROWS) || !defined(GEMV_WARPS) || !defined(NF4_THREADS)
#error "lowrank's CUDA sources take their block sizes as -D options: compile with cupy_gpu/launch.py defines()"
#endif

// Launch geometry: what each thread owns, in the grids of launch.py (b: blockIdx.x or .y, t: threadIdx.x,
// i: a row within the block). The kernels index through these; each is one expression on ints >= 0,
// which Python reads alike once / is //, so tests/test_cupy_kernels.py evaluates these very lines,
// without a GPU, and checks that every output is written exactly once.
__device__ __forceinline__ int shrink_row(int b, int t) { return b * SHRINK_ROWS + t / SHRINK_RANKS; }
__device__ __forceinline__ int shrink_rank(int b, int t) { return b * SHRINK_RANKS + t % SHRINK_RANKS; }
__device__ __forceinline__ int expand_col(int b, int t) { return b * EXPAND_THREADS + t; }
__device__ __forceinline__ int expand_row(int b, int i) { return b * EXPAND_ROWS + i; }
__device__ __forceinline__ int gemv_col(int b, int t) { return b * GEMV_WARPS + t / 32; }
__device__ __forceinline__ int lane_of(int t) { return t % 32; }
__device__ __forceinline__ long long dequant_elem(long long b, int t) { return 2 * (b * NF4_THREADS + t); }
// NF4 element e sits in byte e / 2: the high nibble for even e, the low one for odd e.
__device__ __forceinline__ int nibble_shift(long long e) { return 4 * (1 - (e & 1)); }
// Block-stride loops over k < D: thread t of T loads V elements at k = t V, then every T V.
__device__ __forceinline__ int stride_k0(int t, int V) { return t * V; }
__device__ __forceinline__ int stride_step(int T, int V) { return T * V; }

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
