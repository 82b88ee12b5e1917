// LoRA kernels for lowrank.kernels.cupy_gpu (T = float or __half, float accumulation).
//
//   shrink   h[n, j]   = s_a sum_k (x ⊙ m)[n, k] A_a[j, k]                   (N, r)
//   expand   out[n, o] = beta out[n, o] + (s_a sum_j h[n, j] V_a[o, j]) ⊙ m[n, o] + b[o]
//   gemv     y[n, o]   = x[n] · W[o] + s_a h[n] · B_a[o] + b[o]             small N only
//
// a = idx[n] is row n's adapter (-1: the base alone; idx null: one adapter). V is B (D_out, r)
// for the forward, or A read transposed (so = 1, sj = D_in) for dx = (dh A) ⊙ m. Block sizes
// arrive as -D macros from kernels/config.py so tests can shrink them; index math: common.cu.
#include "common.cu"

// grid (ceil(N / SHRINK_ROWS), ceil(r / SHRINK_RANKS)), block SHRINK_THREADS.
// vec: rows of x, mask and A allow 4-element loads (D_in % 4 == 0, bases aligned to 4 elements).
template <typename T>
__device__ void shrink(const T* x, const T* mask, const T* A, const long long* idx, long long a_stride,
                       float scaling, const float* scal, T* h, int N, int D_in, int r, int vec) {
  __shared__ float part[SHRINK_THREADS / 32][SHRINK_ROWS * SHRINK_RANKS];
  const int n0 = shrink_row(blockIdx.x, 0), j0 = shrink_rank(blockIdx.y, 0);
  const T* Ar[SHRINK_ROWS];                       // row i's adapter, null for base-only rows
  float acc[SHRINK_ROWS][SHRINK_RANKS];
#pragma unroll
  for (int i = 0; i < SHRINK_ROWS; ++i) {
    const int a = n0 + i < N ? adapter_of(idx, n0 + i) : -1;
    Ar[i] = a >= 0 ? A + a * a_stride : nullptr;
#pragma unroll
    for (int jj = 0; jj < SHRINK_RANKS; ++jj) acc[i][jj] = 0.f;
  }
  if (vec) {                                      // 4-element loads of x, mask and A
    constexpr int V = 4;
    for (int k = stride_k0(threadIdx.x, V); k < D_in; k += stride_step(SHRINK_THREADS, V)) {
      float xv[SHRINK_ROWS][V];
#pragma unroll
      for (int i = 0; i < SHRINK_ROWS; ++i) {
        if (!Ar[i]) continue;
        const long long p = (long long)(n0 + i) * D_in + k;
        vload4(x + p, xv[i]);
        if (mask) {
          float mv[V];
          vload4(mask + p, mv);
#pragma unroll
          for (int v = 0; v < V; ++v) xv[i][v] *= mv[v];
        }
      }
#pragma unroll
      for (int jj = 0; jj < SHRINK_RANKS; ++jj) {
        if (j0 + jj >= r) break;
        float av[V];
        const T* last = nullptr;                  // rows sharing an adapter share the load
#pragma unroll
        for (int i = 0; i < SHRINK_ROWS; ++i) {
          if (!Ar[i]) continue;
          if (Ar[i] != last) {
            vload4(Ar[i] + (long long)(j0 + jj) * D_in + k, av);
            last = Ar[i];
          }
#pragma unroll
          for (int v = 0; v < V; ++v) acc[i][jj] += xv[i][v] * av[v];
        }
      }
    }
  } else {
    for (int k = stride_k0(threadIdx.x, 1); k < D_in; k += stride_step(SHRINK_THREADS, 1)) {
#pragma unroll
      for (int i = 0; i < SHRINK_ROWS; ++i) {
        if (!Ar[i]) continue;
        const long long p = (long long)(n0 + i) * D_in + k;
        const float xv = mask ? ld(x, p) * ld(mask, p) : ld(x, p);
#pragma unroll
        for (int jj = 0; jj < SHRINK_RANKS; ++jj)
          if (j0 + jj < r) acc[i][jj] += xv * ld(Ar[i], (long long)(j0 + jj) * D_in + k);
      }
    }
  }
  const int warp = threadIdx.x / 32, lane = lane_of(threadIdx.x);
#pragma unroll
  for (int i = 0; i < SHRINK_ROWS; ++i)
#pragma unroll
    for (int jj = 0; jj < SHRINK_RANKS; ++jj) {
      const float v = warp_sum(acc[i][jj]);
      if (lane == 0) part[warp][i * SHRINK_RANKS + jj] = v;
    }
  __syncthreads();
  for (int t = threadIdx.x; t < SHRINK_ROWS * SHRINK_RANKS; t += SHRINK_THREADS) {
    const int n = shrink_row(blockIdx.x, t), j = shrink_rank(blockIdx.y, t);
    if (n >= N || j >= r) continue;
    const int a = adapter_of(idx, n);
    float v = 0.f;
    for (int w = 0; w < SHRINK_THREADS / 32; ++w) v += part[w][t];
    st(h, (long long)n * r + j, a >= 0 ? scaling_of(scal, scaling, a) * v : 0.f);
  }
}

// grid (ceil(D_out / EXPAND_THREADS), ceil(N / EXPAND_ROWS)), block EXPAND_THREADS; thread = output o.
// V_a[o, j0:j0+16] is held in registers and reused by every row of the block with adapter a
// (all rows for one adapter or sorted SGMV rows: V is read once per block, not once per row).
template <typename T>
__device__ void expand(const T* h, const T* V, long long so, long long sj, const long long* idx, long long v_stride,
                       float scaling, const float* scal, const T* mask, const T* bias, T* out,
                       int N, int D_out, int r, int beta) {
  constexpr int J = 16;
  const int o = expand_col(blockIdx.x, threadIdx.x);
  if (o >= D_out) return;
  int arow[EXPAND_ROWS];
  float acc[EXPAND_ROWS];
#pragma unroll
  for (int i = 0; i < EXPAND_ROWS; ++i) {
    const int n = expand_row(blockIdx.y, i);
    arow[i] = n < N ? adapter_of(idx, n) : -1;
    acc[i] = 0.f;
  }
  for (int j0 = 0; j0 < r; j0 += J) {
    float v[J];
    int loaded = -1;
#pragma unroll
    for (int i = 0; i < EXPAND_ROWS; ++i) {
      const int a = arow[i];
      if (a < 0) continue;
      if (a != loaded) {
        const T* Vo = V + a * v_stride + o * so;
#pragma unroll
        for (int jj = 0; jj < J; ++jj) v[jj] = j0 + jj < r ? ld(Vo, (j0 + jj) * sj) : 0.f;
        loaded = a;
      }
      const T* hn = h + (long long)expand_row(blockIdx.y, i) * r;
#pragma unroll
      for (int jj = 0; jj < J; ++jj)
        if (j0 + jj < r) acc[i] += ld(hn, j0 + jj) * v[jj];
    }
  }
  const float b = bias ? ld(bias, o) : 0.f;
#pragma unroll
  for (int i = 0; i < EXPAND_ROWS; ++i) {
    const int n = expand_row(blockIdx.y, i);
    if (n >= N) break;
    const long long p = (long long)n * D_out + o;
    float t = arow[i] >= 0 ? scaling_of(scal, scaling, arow[i]) * acc[i] : 0.f;
    if (mask) t *= ld(mask, p);
    st(out, p, (beta ? ld(out, p) : 0.f) + t + b);
  }
}

// grid ceil(D_out / GEMV_WARPS), block 32 * GEMV_WARPS; one warp per output o.
// vec: rows of x and W are 16-byte aligned (D_in % Vec<T>::n == 0, aligned bases).
template <typename T>
__device__ void gemv(const T* x, const T* W, const T* h, const T* B, const long long* idx, long long b_stride,
                     float scaling, const float* scal, const T* bias, T* y, int N, int D_in, int D_out, int r,
                     int vec) {
  constexpr int V = Vec<T>::n;
  const int o = gemv_col(blockIdx.x, threadIdx.x), lane = lane_of(threadIdx.x);
  if (o >= D_out) return;                         // the whole warp leaves together
  const T* Wo = W + (long long)o * D_in;
  for (int n0 = 0; n0 < N; n0 += GEMV_ROWS) {
    float acc[GEMV_ROWS];
#pragma unroll
    for (int i = 0; i < GEMV_ROWS; ++i) acc[i] = 0.f;
    if (vec) {
#pragma unroll 4
      for (int k = stride_k0(lane, V); k < D_in; k += stride_step(32, V)) {
        float w[V], xv[V];
        vload(Wo + k, w);
#pragma unroll
        for (int i = 0; i < GEMV_ROWS; ++i) {
          if (n0 + i >= N) break;
          vload(x + (long long)(n0 + i) * D_in + k, xv);
#pragma unroll
          for (int v = 0; v < V; ++v) acc[i] += w[v] * xv[v];
        }
      }
    } else {
      for (int k = stride_k0(lane, 1); k < D_in; k += stride_step(32, 1)) {
        const float w = ld(Wo, k);
#pragma unroll
        for (int i = 0; i < GEMV_ROWS; ++i)
          if (n0 + i < N) acc[i] += w * ld(x, (long long)(n0 + i) * D_in + k);
      }
    }
#pragma unroll
    for (int i = 0; i < GEMV_ROWS; ++i) {
      const int n = n0 + i;
      const int a = (h && n < N) ? adapter_of(idx, n) : -1;
      if (a >= 0) {                               // the LoRA term, split over the lanes
        const T* Bo = B + a * b_stride + (long long)o * r;
        float t = 0.f;
        for (int j = lane; j < r; j += 32) t += ld(h, (long long)n * r + j) * ld(Bo, j);
        acc[i] += scaling_of(scal, scaling, a) * t;
      }
      acc[i] = warp_sum(acc[i]);
      if (lane == 0 && n < N) st(y, (long long)n * D_out + o, acc[i] + (bias ? ld(bias, o) : 0.f));
    }
  }
}

#define LORA_KERNELS(T, S)                                                                               \
  extern "C" __global__ void __launch_bounds__(SHRINK_THREADS) lora_shrink_##S(                          \
      const T* x, const T* mask, const T* A, const long long* idx, long long a_stride, float scaling,     \
      const float* scal, T* h, int N, int D_in, int r, int vec) {                                         \
    shrink<T>(x, mask, A, idx, a_stride, scaling, scal, h, N, D_in, r, vec);                              \
  }                                                                                                       \
  extern "C" __global__ void __launch_bounds__(EXPAND_THREADS) lora_expand_##S(                          \
      const T* h, const T* V, long long so, long long sj, const long long* idx, long long v_stride,       \
      float scaling, const float* scal, const T* mask, const T* bias, T* out, int N, int D_out, int r,    \
      int beta) {                                                                                         \
    expand<T>(h, V, so, sj, idx, v_stride, scaling, scal, mask, bias, out, N, D_out, r, beta);           \
  }                                                                                                       \
  extern "C" __global__ void __launch_bounds__(32 * GEMV_WARPS) lora_gemv_##S(                           \
      const T* x, const T* W, const T* h, const T* B, const long long* idx, long long b_stride,          \
      float scaling, const float* scal, const T* bias, T* y, int N, int D_in, int D_out, int r, int vec) { \
    gemv<T>(x, W, h, B, idx, b_stride, scaling, scal, bias, y, N, D_in, D_out, r, vec);                   \
  }

LORA_KERNELS(float, f32)
LORA_KERNELS(__half, f16)
