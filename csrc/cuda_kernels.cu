// CUDA kernels of the lnsr ops.  No torch headers: binding.cpp passes raw pointers and the stream.
//
// - 16-byte loads/stores wherever the pointers and the row length allow (Pack<T>), scalar
//   fallbacks otherwise; int64 indexing throughout.
// - layer_penalty: every layer in one launch (a by-value pointer table), a fixed grid derived from
//   the shape only, per-block partials, then one block sums them in a fixed order: deterministic,
//   no float atomics.
// - The noise is philox.h's stream without fast-math intrinsics (the build never passes
//   --use_fast_math), so it matches the torch reference to float rounding.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdint.h>

#include "lnsr_kernels.h"
#include "philox.h"

namespace lnsr {
namespace cuda {
namespace {

template <typename T>
struct Cvt;
template <>
struct Cvt<float> {
  static __device__ __forceinline__ float to(float x) { return x; }
  static __device__ __forceinline__ float from(float x) { return x; }
};
template <>
struct Cvt<__half> {
  static __device__ __forceinline__ float to(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half from(float x) { return __float2half_rn(x); }
};
template <>
struct Cvt<__nv_bfloat16> {
  static __device__ __forceinline__ float to(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 from(float x) { return __float2bfloat16_rn(x); }
};

// 16 bytes of T: one vector load/store.
template <typename T>
struct alignas(16) Pack {
  static constexpr int N = 16 / sizeof(T);
  T v[N];
};

__host__ __device__ inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

inline int blocks_for(int64_t work, int64_t per_block) {
  int64_t b = (work + per_block - 1) / per_block;
  if (b < 1) b = 1;
  return static_cast<int>(b < (1 << 30) ? b : (1 << 30));  // grid-stride loops cover the rest
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Deterministic block sum (fixed shuffle tree, then warp 0 over the warp sums); result in thread 0.
__device__ float block_sum(float v, float* smem) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  const int nw = blockDim.x >> 5;
  v = (threadIdx.x < nw) ? smem[threadIdx.x] : 0.f;
  if (warp == 0) v = warp_sum(v);
  __syncthreads();
  return v;
}

// ------------------------------------------------------------------------------------------------
// noise
// ------------------------------------------------------------------------------------------------

__global__ void noise_kernel(uint64_t seed, int64_t numel, float* __restrict__ z) {
  const int64_t groups = (numel + 3) / 4;
  const bool vec = aligned16(z) && (numel & 3) == 0;
  for (int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; c < groups;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float v[4];
    normal4(seed, static_cast<uint64_t>(c), v);
    if (vec) {
      *reinterpret_cast<float4*>(z + 4 * c) = make_float4(v[0], v[1], v[2], v[3]);
    } else {
      for (int r = 0; r < 4; ++r)
        if (4 * c + r < numel) z[4 * c + r] = v[r];
    }
  }
}

// ------------------------------------------------------------------------------------------------
// perturb
// ------------------------------------------------------------------------------------------------

// The seed of a perturb launch: the value, or (ptr != nullptr) a device seed read by each thread, so
// that a captured CUDA graph draws new noise on each replay once the seed tensor is refilled.
struct Seed {
  uint64_t value;
  const int64_t* ptr;
  __device__ __forceinline__ uint64_t get() const { return ptr ? static_cast<uint64_t>(__ldg(ptr)) : value; }
};

// x + scale * z for one Pack whose first element is flat element `first` (a multiple of 4): its
// noise is Philox counters first/4 .. first/4 + N/4 - 1 of the stream.
template <typename T>
__device__ __forceinline__ Pack<T> noisy_pack(const Pack<T>& x, uint64_t seed, int64_t first, float scale) {
  Pack<T> y;
#pragma unroll
  for (int q = 0; q < Pack<T>::N / 4; ++q) {
    float z[4];
    normal4(seed, static_cast<uint64_t>(first / 4 + q), z);
#pragma unroll
    for (int r = 0; r < 4; ++r)
      y.v[4 * q + r] = Cvt<T>::from(Cvt<T>::to(x.v[4 * q + r]) + __fmul_rn(scale, z[r]));
  }
  return y;
}

// Gaussian, 16-byte path: each thread owns one Pack (4 or 8 elements = 1 or 2 Philox calls).
template <typename T>
__global__ void perturb_gaussian_vec(const T* __restrict__ h, T* __restrict__ out, int64_t n, Seed seed_in,
                                     float sigma) {
  const uint64_t seed = seed_in.get();
  using P = Pack<T>;
  const int64_t packs = n / P::N;
  for (int64_t p = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; p < packs;
       p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const P x = reinterpret_cast<const P*>(h)[p];
    reinterpret_cast<P*>(out)[p] = x;
    reinterpret_cast<P*>(out + n)[p] = noisy_pack(x, seed, p * P::N, sigma);
  }
}

// Gaussian, scalar path: one Philox call per thread, four elements.
template <typename T>
__global__ void perturb_gaussian_scalar(const T* __restrict__ h, T* __restrict__ out, int64_t n,
                                        Seed seed_in, float sigma) {
  const uint64_t seed = seed_in.get();
  const int64_t groups = (n + 3) / 4;
  for (int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; c < groups;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float z[4];
    normal4(seed, static_cast<uint64_t>(c), z);
    for (int r = 0; r < 4; ++r) {
      const int64_t i = 4 * c + r;
      if (i < n) {
        const T x = h[i];
        out[i] = x;
        out[n + i] = Cvt<T>::from(Cvt<T>::to(x) + __fmul_rn(sigma, z[r]));
      }
    }
  }
}

// Relative: one warp per row (rms over the row in fp32, warp-shuffle sum), then the row's noise.
// VEC: the row length is a multiple of the pack and the pointers are 16-byte aligned.
template <typename T, bool VEC>
__global__ void perturb_relative(const T* __restrict__ h, T* __restrict__ out, int64_t rows, int64_t hidden,
                                 Seed seed_in, float sigma) {
  const uint64_t seed = seed_in.get();
  using P = Pack<T>;
  const int lane = threadIdx.x & 31;
  const int64_t n = rows * hidden;
  const int64_t warp0 = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) >> 5;
  const int64_t n_warps = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  for (int64_t r = warp0; r < rows; r += n_warps) {
    const int64_t base = r * hidden;
    float ss = 0.f;
    if (VEC) {
      const P* hp = reinterpret_cast<const P*>(h + base);
      for (int64_t p = lane; p < hidden / P::N; p += 32) {
        const P x = hp[p];
#pragma unroll
        for (int k = 0; k < P::N; ++k) {
          const float v = Cvt<T>::to(x.v[k]);
          ss += v * v;
        }
      }
    } else {
      for (int64_t k = lane; k < hidden; k += 32) {
        const float v = Cvt<T>::to(h[base + k]);
        ss += v * v;
      }
    }
    ss = warp_sum(ss);
    const float s = __fmul_rn(sigma, sqrtf(__fdiv_rn(ss, static_cast<float>(hidden))));
    if (VEC) {
      const P* hp = reinterpret_cast<const P*>(h + base);
      P* cp = reinterpret_cast<P*>(out + base);
      P* np = reinterpret_cast<P*>(out + n + base);
      for (int64_t p = lane; p < hidden / P::N; p += 32) {
        const P x = hp[p];  // second read of the row: an L1/L2 hit
        cp[p] = x;
        np[p] = noisy_pack(x, seed, base + p * P::N, s);
      }
    } else {
      // Philox groups overlapping this row; a group shared with a neighbouring row is drawn twice.
      const int64_t g0 = base / 4, g1 = (base + hidden + 3) / 4;
      for (int64_t c = g0 + lane; c < g1; c += 32) {
        float z[4];
        normal4(seed, static_cast<uint64_t>(c), z);
        for (int k = 0; k < 4; ++k) {
          const int64_t i = 4 * c + k;
          if (i >= base && i < base + hidden) {
            const T x = h[i];
            out[i] = x;
            out[n + i] = Cvt<T>::from(Cvt<T>::to(x) + __fmul_rn(s, z[k]));
          }
        }
      }
    }
  }
}

// Relative, one read of h: a block per row, the row held in registers (PPT packs per thread)
// between its sum of squares and the two writes.  For wide rows (>= kRowBlockMinHidden), where the
// warp-per-row kernel above reads each row twice; rows of more than PPT_max * kThreads packs keep
// using that kernel.  Noise element i is still z[i] of the stream: only the rms's summation order
// differs (a deterministic tree).
constexpr int64_t kRowBlockMinHidden = 1024;
constexpr int kRowBlockMaxPPT = 8;

template <typename T, int PPT>
__global__ void perturb_relative_rowblock(const T* __restrict__ h, T* __restrict__ out, int64_t rows,
                                          int64_t hidden, Seed seed_in, float sigma) {
  using P = Pack<T>;
  __shared__ float smem[32];
  __shared__ float scale;
  const uint64_t seed = seed_in.get();
  const int64_t n = rows * hidden;
  const int64_t packs = hidden / P::N;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const int64_t base = r * hidden;
    const P* hp = reinterpret_cast<const P*>(h + base);
    P x[PPT];
    float ss = 0.f;
#pragma unroll
    for (int i = 0; i < PPT; ++i) {
      const int64_t p = threadIdx.x + static_cast<int64_t>(i) * blockDim.x;
      if (p < packs) {
        x[i] = hp[p];
#pragma unroll
        for (int k = 0; k < P::N; ++k) {
          const float v = Cvt<T>::to(x[i].v[k]);
          ss += v * v;
        }
      }
    }
    ss = block_sum(ss, smem);  // ends with a barrier: smem is free again
    if (threadIdx.x == 0) scale = __fmul_rn(sigma, sqrtf(__fdiv_rn(ss, static_cast<float>(hidden))));
    __syncthreads();
    const float s = scale;
    P* cp = reinterpret_cast<P*>(out + base);
    P* np = reinterpret_cast<P*>(out + n + base);
#pragma unroll
    for (int i = 0; i < PPT; ++i) {
      const int64_t p = threadIdx.x + static_cast<int64_t>(i) * blockDim.x;
      if (p < packs) {
        cp[p] = x[i];
        np[p] = noisy_pack(x[i], seed, base + p * P::N, s);
      }
    }
    __syncthreads();  // `scale` is rewritten for the next row
  }
}

template <typename T>
__global__ void perturb_backward_vec(const T* __restrict__ g, T* __restrict__ gh, int64_t n) {
  using P = Pack<T>;
  const int64_t packs = n / P::N;
  for (int64_t p = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; p < packs;
       p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const P a = reinterpret_cast<const P*>(g)[p];
    const P b = reinterpret_cast<const P*>(g + n)[p];
    P y;
#pragma unroll
    for (int k = 0; k < P::N; ++k) y.v[k] = Cvt<T>::from(Cvt<T>::to(a.v[k]) + Cvt<T>::to(b.v[k]));
    reinterpret_cast<P*>(gh)[p] = y;
  }
}

template <typename T>
__global__ void perturb_backward_scalar(const T* __restrict__ g, T* __restrict__ gh, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    gh[i] = Cvt<T>::from(Cvt<T>::to(g[i]) + Cvt<T>::to(g[n + i]));
}

// ------------------------------------------------------------------------------------------------
// layer_penalty
// ------------------------------------------------------------------------------------------------

constexpr int kMaxLayers = 32;  // layers per launch (kernel parameter space); more -> more launches

struct LayerTable {
  const void* y[kMaxLayers];
  void* grad[kMaxLayers];
  int64_t hidden[kMaxLayers];
  int mode[kMaxLayers];  // dtype * 2 + (16-byte path usable)
};

// Rows per warp of a penalty block: a function of the shape only (so the reduction order is too),
// keeping the grid at a few thousand blocks.
inline int64_t rows_per_warp(int n_layers, int64_t rows) {
  const int64_t target_blocks = 4096;
  int64_t rpw = (rows * n_layers + kWarps * target_blocks - 1) / (kWarps * target_blocks);
  return rpw < 1 ? 1 : rpw;
}
inline int64_t penalty_chunks(int n_layers, int64_t rows) {
  const int64_t per_block = kWarps * rows_per_warp(n_layers, rows);
  return (rows + per_block - 1) / per_block;
}

template <typename T, bool VEC>
__device__ float row_sq_diff(const T* __restrict__ a, const T* __restrict__ b, int64_t hidden, int lane) {
  float acc = 0.f;
  if (VEC) {
    using P = Pack<T>;
    const P* ap = reinterpret_cast<const P*>(a);
    const P* bp = reinterpret_cast<const P*>(b);
    for (int64_t p = lane; p < hidden / P::N; p += 32) {
      const P x = ap[p], y = bp[p];
#pragma unroll
      for (int k = 0; k < P::N; ++k) {
        const float d = Cvt<T>::to(y.v[k]) - Cvt<T>::to(x.v[k]);
        acc += d * d;
      }
    }
  } else {
    for (int64_t k = lane; k < hidden; k += 32) {
      const float d = Cvt<T>::to(b[k]) - Cvt<T>::to(a[k]);
      acc += d * d;
    }
  }
  return acc;
}

template <typename T, bool VEC>
__device__ float penalty_rows(const void* y, int64_t hidden, int64_t rows, int64_t r0, int64_t r1,
                              const float* __restrict__ mask, int warp, int lane) {
  const T* clean = static_cast<const T*>(y);
  const T* noisy = clean + rows * hidden;
  float acc = 0.f;
  for (int64_t r = r0 + warp; r < r1; r += kWarps) {
    const float m = mask ? mask[r] : 1.f;
    if (m == 0.f) continue;  // padding: skip its bytes entirely
    acc += m * row_sq_diff<T, VEC>(clean + r * hidden, noisy + r * hidden, hidden, lane);
  }
  return acc;
}

// Stage 1: block (chunk, layer) -> w_j * sum over its rows of m_r ||noisy_r - clean_r||^2.
// `weights` points at this launch's first layer (a device array: new weights need no new table).
__global__ void penalty_stage1(LayerTable tbl, int64_t rows, int64_t chunk_rows, const float* __restrict__ mask,
                               const float* __restrict__ weights, float* __restrict__ partial) {
  __shared__ float smem[32];
  const int j = blockIdx.y;
  const int64_t chunk = blockIdx.x;
  const int64_t r0 = chunk * chunk_rows;
  const int64_t r1 = r0 + chunk_rows < rows ? r0 + chunk_rows : rows;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  float acc = 0.f;
  const void* y = tbl.y[j];
  const int64_t H = tbl.hidden[j];
  switch (tbl.mode[j]) {
    case 2 * kF32 + 1: acc = penalty_rows<float, true>(y, H, rows, r0, r1, mask, warp, lane); break;
    case 2 * kF32: acc = penalty_rows<float, false>(y, H, rows, r0, r1, mask, warp, lane); break;
    case 2 * kF16 + 1: acc = penalty_rows<__half, true>(y, H, rows, r0, r1, mask, warp, lane); break;
    case 2 * kF16: acc = penalty_rows<__half, false>(y, H, rows, r0, r1, mask, warp, lane); break;
    case 2 * kBF16 + 1: acc = penalty_rows<__nv_bfloat16, true>(y, H, rows, r0, r1, mask, warp, lane); break;
    case 2 * kBF16: acc = penalty_rows<__nv_bfloat16, false>(y, H, rows, r0, r1, mask, warp, lane); break;
    default: break;
  }
  acc = block_sum(acc, smem);
  if (threadIdx.x == 0) partial[static_cast<int64_t>(j) * gridDim.x + chunk] = weights[j] * acc;
}

// Stage 2: one block sums the partials and the mask in a fixed order.
__global__ void penalty_stage2(const float* __restrict__ partial, int64_t n_partial, const float* __restrict__ mask,
                               int64_t rows, float* __restrict__ loss, float* __restrict__ count) {
  __shared__ float smem[32];
  float acc = 0.f;
  for (int64_t i = threadIdx.x; i < n_partial; i += blockDim.x) acc += partial[i];
  const float total = block_sum(acc, smem);
  float n = static_cast<float>(rows);
  if (mask) {
    float ms = 0.f;
    for (int64_t i = threadIdx.x; i < rows; i += blockDim.x) ms += mask[i];
    n = block_sum(ms, smem);
  }
  if (threadIdx.x == 0) {
    *count = n;
    *loss = total / fmaxf(n, 1.f);  // empty mask -> 0, not NaN
  }
}

template <typename T, bool VEC>
__device__ void penalty_grad_rows(const void* y, void* grad, int64_t hidden, int64_t rows, int64_t r0, int64_t r1,
                                  const float* __restrict__ mask, float scale, bool detach_clean, int warp,
                                  int lane) {
  const T* clean = static_cast<const T*>(y);
  const T* noisy = clean + rows * hidden;
  T* g_clean = static_cast<T*>(grad);
  T* g_noisy = g_clean + rows * hidden;
  for (int64_t r = r0 + warp; r < r1; r += kWarps) {
    const float s = scale * (mask ? mask[r] : 1.f);
    const int64_t base = r * hidden;
    if (VEC) {
      using P = Pack<T>;
      const P* cp = reinterpret_cast<const P*>(clean + base);
      const P* np = reinterpret_cast<const P*>(noisy + base);
      P* gcp = reinterpret_cast<P*>(g_clean + base);
      P* gnp = reinterpret_cast<P*>(g_noisy + base);
      for (int64_t p = lane; p < hidden / P::N; p += 32) {
        P gn, gc;
        if (s != 0.f) {
          const P x = cp[p], y2 = np[p];
#pragma unroll
          for (int k = 0; k < P::N; ++k) {
            const float g = s * (Cvt<T>::to(y2.v[k]) - Cvt<T>::to(x.v[k]));
            gn.v[k] = Cvt<T>::from(g);
            gc.v[k] = Cvt<T>::from(detach_clean ? 0.f : -g);
          }
        } else {  // masked row: zero gradient without reading the row
#pragma unroll
          for (int k = 0; k < P::N; ++k) gn.v[k] = gc.v[k] = Cvt<T>::from(0.f);
        }
        gnp[p] = gn;
        gcp[p] = gc;
      }
    } else {
      for (int64_t k = lane; k < hidden; k += 32) {
        const float g = s != 0.f ? s * (Cvt<T>::to(noisy[base + k]) - Cvt<T>::to(clean[base + k])) : 0.f;
        g_noisy[base + k] = Cvt<T>::from(g);
        g_clean[base + k] = Cvt<T>::from(detach_clean ? 0.f : -g);
      }
    }
  }
}

__global__ void penalty_backward_kernel(LayerTable tbl, int64_t rows, int64_t chunk_rows,
                                        const float* __restrict__ mask, const float* __restrict__ weights,
                                        const float* __restrict__ grad_loss, const float* __restrict__ count,
                                        bool detach_clean) {
  const int j = blockIdx.y;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * chunk_rows;
  const int64_t r1 = r0 + chunk_rows < rows ? r0 + chunk_rows : rows;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const float scale = 2.f * weights[j] * (*grad_loss / fmaxf(*count, 1.f));
  const void* y = tbl.y[j];
  void* g = tbl.grad[j];
  const int64_t H = tbl.hidden[j];
  switch (tbl.mode[j]) {
    case 2 * kF32 + 1: penalty_grad_rows<float, true>(y, g, H, rows, r0, r1, mask, scale, detach_clean, warp, lane); break;
    case 2 * kF32: penalty_grad_rows<float, false>(y, g, H, rows, r0, r1, mask, scale, detach_clean, warp, lane); break;
    case 2 * kF16 + 1: penalty_grad_rows<__half, true>(y, g, H, rows, r0, r1, mask, scale, detach_clean, warp, lane); break;
    case 2 * kF16: penalty_grad_rows<__half, false>(y, g, H, rows, r0, r1, mask, scale, detach_clean, warp, lane); break;
    case 2 * kBF16 + 1: penalty_grad_rows<__nv_bfloat16, true>(y, g, H, rows, r0, r1, mask, scale, detach_clean, warp, lane); break;
    case 2 * kBF16: penalty_grad_rows<__nv_bfloat16, false>(y, g, H, rows, r0, r1, mask, scale, detach_clean, warp, lane); break;
    default: break;
  }
}

inline int elem_size(int dtype) { return dtype == kF32 ? 4 : 2; }

LayerTable make_table(const PenaltyLayer* layers, int first, int count, int64_t rows) {
  LayerTable t{};
  for (int q = 0; q < count; ++q) {
    const PenaltyLayer& L = layers[first + q];
    const int64_t pack = 16 / elem_size(L.dtype);
    // Rows start on 16-byte boundaries when hidden is a multiple of the pack (the noisy half too,
    // since it starts rows*hidden elements in).
    const bool vec = aligned16(L.y) && (L.grad == nullptr || aligned16(L.grad)) && L.hidden % pack == 0;
    t.y[q] = L.y;
    t.grad[q] = L.grad;
    t.hidden[q] = L.hidden;
    t.mode[q] = 2 * L.dtype + (vec ? 1 : 0);
  }
  (void)rows;
  return t;
}

template <typename T>
void launch_perturb(const void* h_, void* out_, int64_t rows, int64_t hidden, Seed seed, float sigma, int kind,
                    cudaStream_t st) {
  const T* h = static_cast<const T*>(h_);
  T* out = static_cast<T*>(out_);
  const int64_t n = rows * hidden;
  constexpr int64_t pack = Pack<T>::N;
  if (kind == kGaussian) {
    if (aligned16(h) && aligned16(out) && n % pack == 0)
      perturb_gaussian_vec<T><<<blocks_for(n / pack, kThreads), kThreads, 0, st>>>(h, out, n, seed, sigma);
    else
      perturb_gaussian_scalar<T><<<blocks_for((n + 3) / 4, kThreads), kThreads, 0, st>>>(h, out, n, seed, sigma);
  } else {
    const bool vec = aligned16(h) && aligned16(out) && hidden % pack == 0;
    const int64_t ppt = (hidden / pack + kThreads - 1) / kThreads;  // packs per thread, one block per row
    if (vec && hidden >= kRowBlockMinHidden && ppt <= kRowBlockMaxPPT) {
      const int grid = blocks_for(rows, 1);
      if (ppt <= 1)
        perturb_relative_rowblock<T, 1><<<grid, kThreads, 0, st>>>(h, out, rows, hidden, seed, sigma);
      else if (ppt <= 2)
        perturb_relative_rowblock<T, 2><<<grid, kThreads, 0, st>>>(h, out, rows, hidden, seed, sigma);
      else if (ppt <= 4)
        perturb_relative_rowblock<T, 4><<<grid, kThreads, 0, st>>>(h, out, rows, hidden, seed, sigma);
      else
        perturb_relative_rowblock<T, 8><<<grid, kThreads, 0, st>>>(h, out, rows, hidden, seed, sigma);
      return;
    }
    const int blocks = blocks_for(rows, kWarps);
    if (vec)
      perturb_relative<T, true><<<blocks, kThreads, 0, st>>>(h, out, rows, hidden, seed, sigma);
    else
      perturb_relative<T, false><<<blocks, kThreads, 0, st>>>(h, out, rows, hidden, seed, sigma);
  }
}

// The streaming penalty's gradient of one layer (cpu::penalty_tap_backward): one thread per element
// of the rows above (gradient copy) and per (clean, noisy) element pair; coef is read on the device.
template <typename T>
__global__ void tap_backward_kernel(const T* __restrict__ y, const T* __restrict__ g, T* __restrict__ out,
                                    const float* __restrict__ mask, const float* __restrict__ coef, int64_t P,
                                    int64_t M, int64_t G, int64_t H, bool detach_clean) {
  const float c2 = 2.f * __ldg(coef);
  const int64_t total = (P + M) * H;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = idx / H, k = idx - r * H;
    if (r < P) {  // rows without a noisy copy: the gradient from above only
      out[idx] = Cvt<T>::from(g != nullptr && r < G ? Cvt<T>::to(g[idx]) : 0.f);
      continue;
    }
    const int64_t i = r - P, n = (P + M + i) * H + k;  // idx is the clean element
    const float s = c2 * (mask != nullptr ? mask[i] : 1.f);
    const float d = s != 0.f ? s * (Cvt<T>::to(y[n]) - Cvt<T>::to(y[idx])) : 0.f;  // padding: 0
    const float gc = g != nullptr && r < G ? Cvt<T>::to(g[idx]) : 0.f;
    const float gn = g != nullptr && P + M + i < G ? Cvt<T>::to(g[n]) : 0.f;
    out[n] = Cvt<T>::from(gn + d);
    out[idx] = Cvt<T>::from(detach_clean ? gc : gc - d);
  }
}

template <typename T>
void launch_perturb_backward(const void* g_, void* gh_, int64_t n, cudaStream_t st) {
  const T* g = static_cast<const T*>(g_);
  T* gh = static_cast<T*>(gh_);
  constexpr int64_t pack = Pack<T>::N;
  if (aligned16(g) && aligned16(gh) && n % pack == 0)
    perturb_backward_vec<T><<<blocks_for(n / pack, kThreads), kThreads, 0, st>>>(g, gh, n);
  else
    perturb_backward_scalar<T><<<blocks_for(n, kThreads), kThreads, 0, st>>>(g, gh, n);
}

}  // namespace

int noise(uint64_t seed, int64_t numel, float* z, void* stream) {
  if (numel <= 0) return 0;
  noise_kernel<<<blocks_for((numel + 3) / 4, kThreads), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      seed, numel, z);
  return static_cast<int>(cudaGetLastError());
}

int perturb_forward(int dtype, const void* h, void* out, int64_t rows, int64_t hidden, uint64_t seed_value,
                    const int64_t* seed_ptr, float sigma, int kind, void* stream) {
  if (rows <= 0 || hidden <= 0) return 0;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  const Seed seed{seed_value, seed_ptr};
  switch (dtype) {
    case kF32: launch_perturb<float>(h, out, rows, hidden, seed, sigma, kind, st); break;
    case kF16: launch_perturb<__half>(h, out, rows, hidden, seed, sigma, kind, st); break;
    case kBF16: launch_perturb<__nv_bfloat16>(h, out, rows, hidden, seed, sigma, kind, st); break;
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
  return static_cast<int>(cudaGetLastError());
}

int perturb_backward(int dtype, const void* grad, void* grad_h, int64_t numel, void* stream) {
  if (numel <= 0) return 0;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case kF32: launch_perturb_backward<float>(grad, grad_h, numel, st); break;
    case kF16: launch_perturb_backward<__half>(grad, grad_h, numel, st); break;
    case kBF16: launch_perturb_backward<__nv_bfloat16>(grad, grad_h, numel, st); break;
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
  return static_cast<int>(cudaGetLastError());
}

int64_t layer_penalty_workspace(int n_layers, int64_t rows) {
  return static_cast<int64_t>(n_layers) * penalty_chunks(n_layers, rows) + 1;
}

int layer_penalty_forward(const PenaltyLayer* layers, int n_layers, int64_t rows, const float* mask,
                          const float* weights, float* workspace, float* loss, float* count, void* stream) {
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  const int64_t chunks = penalty_chunks(n_layers, rows);
  const int64_t chunk_rows = kWarps * rows_per_warp(n_layers, rows);
  if (rows > 0) {
    for (int first = 0; first < n_layers; first += kMaxLayers) {
      const int cnt = n_layers - first < kMaxLayers ? n_layers - first : kMaxLayers;
      const LayerTable tbl = make_table(layers, first, cnt, rows);
      penalty_stage1<<<dim3(static_cast<unsigned>(chunks), cnt), kThreads, 0, st>>>(
          tbl, rows, chunk_rows, mask, weights + first, workspace + static_cast<int64_t>(first) * chunks);
    }
  }
  penalty_stage2<<<1, 1024, 0, st>>>(workspace, rows > 0 ? n_layers * chunks : 0, mask, rows, loss, count);
  return static_cast<int>(cudaGetLastError());
}

int layer_penalty_backward(const PenaltyLayer* layers, int n_layers, int64_t rows, const float* mask,
                           const float* weights, const float* grad_loss, const float* count, bool detach_clean,
                           void* stream) {
  if (rows <= 0) return 0;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  const int64_t chunks = penalty_chunks(n_layers, rows);
  const int64_t chunk_rows = kWarps * rows_per_warp(n_layers, rows);
  for (int first = 0; first < n_layers; first += kMaxLayers) {
    const int cnt = n_layers - first < kMaxLayers ? n_layers - first : kMaxLayers;
    const LayerTable tbl = make_table(layers, first, cnt, rows);
    penalty_backward_kernel<<<dim3(static_cast<unsigned>(chunks), cnt), kThreads, 0, st>>>(
        tbl, rows, chunk_rows, mask, weights + first, grad_loss, count, detach_clean);
  }
  return static_cast<int>(cudaGetLastError());
}

int penalty_tap_backward(int dtype, const void* y, const void* grad, void* out, const float* mask,
                         const float* coef, int64_t first_rows, int64_t pair_rows, int64_t grad_rows, int64_t hidden,
                         bool detach_clean, void* stream) {
  const int64_t work = (first_rows + pair_rows) * hidden;
  if (work <= 0) return 0;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  const int blocks = blocks_for(work, kThreads);
#define LNSR_TAP(T)                                                                                        \
  tap_backward_kernel<T><<<blocks, kThreads, 0, st>>>(static_cast<const T*>(y), static_cast<const T*>(grad), \
                                                      static_cast<T*>(out), mask, coef, first_rows, pair_rows, \
                                                      grad_rows, hidden, detach_clean)
  switch (dtype) {
    case kF32: LNSR_TAP(float); break;
    case kF16: LNSR_TAP(__half); break;
    case kBF16: LNSR_TAP(__nv_bfloat16); break;
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
#undef LNSR_TAP
  return static_cast<int>(cudaGetLastError());
}

}  // namespace cuda
}  // namespace lnsr
