// CPU kernels of the lnsr ops.  Parallel over rows with at::parallel_for; inner loops are plain
// fixed-width loops that the compiler vectorises.  Reductions use a fixed chunking that does not
// depend on the thread count, so results are bit-identical across runs and thread settings.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "lnsr_kernels.h"
#include "philox.h"

#ifndef LNSR_CPU_SLEEF
#define LNSR_CPU_SLEEF 1  // torch x86 builds export SLEEF from libtorch_cpu
#endif

namespace lnsr {
namespace cpu {
namespace {

inline float to_f(float x) { return x; }
inline float to_f(c10::Half x) { return static_cast<float>(x); }
inline float to_f(c10::BFloat16 x) { return static_cast<float>(x); }
template <typename T>
inline T from_f(float x) { return static_cast<T>(x); }  // round to nearest even, like Tensor.to()

// Work per parallel task, in elements: small enough to split BERT-sized tensors over the cores,
// large enough that the per-task overhead does not show.
constexpr int64_t kGrainElems = 16384;
// Rows per partial sum of layer_penalty: fixed, so the summation order is fixed.
constexpr int64_t kPenaltyRows = 16;

int64_t row_grain(int64_t hidden) { return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, hidden)); }

// Philox words of 8 consecutive counters c .. c+7 (an integer loop the compiler vectorises).
constexpr int kB = 8;
inline void philox_block(uint64_t seed, uint64_t c, uint32_t x[4][kB]) {
  uint32_t c0[kB], c1[kB], c2[kB], c3[kB];
  for (int l = 0; l < kB; ++l) {
    c0[l] = static_cast<uint32_t>(c + l);
    c1[l] = static_cast<uint32_t>((c + l) >> 32);
    c2[l] = 0u;
    c3[l] = 0u;
  }
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    for (int l = 0; l < kB; ++l) {
      const uint64_t pb = static_cast<uint64_t>(kPhiloxRoundB) * c2[l];
      const uint64_t pa = static_cast<uint64_t>(kPhiloxRoundA) * c0[l];
      const uint32_t n0 = static_cast<uint32_t>(pb >> 32) ^ c1[l] ^ k0;
      const uint32_t n2 = static_cast<uint32_t>(pa >> 32) ^ c3[l] ^ k1;
      c1[l] = static_cast<uint32_t>(pb);
      c3[l] = static_cast<uint32_t>(pa);
      c0[l] = n0;
      c2[l] = n2;
    }
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  for (int l = 0; l < kB; ++l) {
    x[0][l] = c0[l];
    x[1][l] = c1[l];
    x[2][l] = c2[l];
    x[3][l] = c3[l];
  }
}

// 32 normals of counters c .. c+7, in stream order, with libm (portable path).
void normals_block_scalar(uint64_t seed, uint64_t c, float* o) {
  uint32_t x[4][kB];
  philox_block(seed, c, x);
  for (int l = 0; l < kB; ++l) {
    box_muller(uint_to_uniform(x[0][l]), uint_to_uniform(x[1][l]), &o[4 * l], &o[4 * l + 1]);
    box_muller(uint_to_uniform(x[2][l]), uint_to_uniform(x[3][l]), &o[4 * l + 2], &o[4 * l + 3]);
  }
}

#if defined(__x86_64__) && defined(__GNUC__) && LNSR_CPU_SLEEF
// AVX2 path: Philox vectorised by the compiler, log/sincos from the SLEEF that libtorch_cpu exports
// (the same 1-ulp functions torch.log/sin/cos use on AVX2 CPUs), sqrt exact.  Picked at run time.
}  // namespace
}  // namespace cpu
}  // namespace lnsr
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#include <immintrin.h>
extern "C" {
typedef struct {
  __m256 x, y;
} lnsr_m256_2;
__m256 Sleef_logf8_u10(__m256);
lnsr_m256_2 Sleef_sincosf8_u10(__m256);
}
namespace lnsr {
namespace cpu {
namespace {

__m256 uniform8(const uint32_t* x) {
  __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
  // int32 view, negatives folded with ~v: v ^ (v >> 31) (arithmetic shift gives all-ones for v < 0).
  v = _mm256_xor_si256(v, _mm256_srai_epi32(v, 31));
  return _mm256_mul_ps(_mm256_cvtepi32_ps(v), _mm256_set1_ps(kUniformScale));
}

inline void box_muller8(__m256 u1, __m256 u2, __m256* n1, __m256* n2) {
  u1 = _mm256_max_ps(_mm256_set1_ps(kMinU), u1);
  const __m256 th = _mm256_mul_ps(u2, _mm256_set1_ps(kTwoPi));
  const __m256 r = _mm256_sqrt_ps(_mm256_mul_ps(_mm256_set1_ps(-2.0f), Sleef_logf8_u10(u1)));
  const lnsr_m256_2 sc = Sleef_sincosf8_u10(th);  // .x = sin, .y = cos
  *n1 = _mm256_mul_ps(r, sc.y);
  *n2 = _mm256_mul_ps(r, sc.x);
}

__attribute__((noinline)) void normals_block_avx2(uint64_t seed, uint64_t c, float* o) {
  alignas(32) uint32_t x[4][kB];
  philox_block(seed, c, x);
  __m256 n1, n2, n3, n4;
  box_muller8(uniform8(x[0]), uniform8(x[1]), &n1, &n2);
  box_muller8(uniform8(x[2]), uniform8(x[3]), &n3, &n4);
  // Interleave to stream order n1[l], n2[l], n3[l], n4[l] (4x4 transposes of each 128-bit half).
  __m256 a = _mm256_unpacklo_ps(n1, n2), b = _mm256_unpackhi_ps(n1, n2);
  __m256 c2 = _mm256_unpacklo_ps(n3, n4), d = _mm256_unpackhi_ps(n3, n4);
  __m256 e0 = _mm256_shuffle_ps(a, c2, 0x44), e1 = _mm256_shuffle_ps(a, c2, 0xEE);
  __m256 e2 = _mm256_shuffle_ps(b, d, 0x44), e3 = _mm256_shuffle_ps(b, d, 0xEE);
  // e0 = lanes (0, 4), e1 = (1, 5), e2 = (2, 6), e3 = (3, 7) as 128-bit halves.
  _mm256_storeu_ps(o + 0, _mm256_permute2f128_ps(e0, e1, 0x20));
  _mm256_storeu_ps(o + 8, _mm256_permute2f128_ps(e2, e3, 0x20));
  _mm256_storeu_ps(o + 16, _mm256_permute2f128_ps(e0, e1, 0x31));
  _mm256_storeu_ps(o + 24, _mm256_permute2f128_ps(e2, e3, 0x31));
}
#pragma GCC pop_options

bool use_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         std::getenv("LNSR_CPU_NO_AVX2") == nullptr;
  return ok;
}
#else
bool use_avx2() { return false; }
void normals_block_avx2(uint64_t seed, uint64_t c, float* o) { normals_block_scalar(seed, c, o); }
#endif

// sum (b - a)^2 over half-precision rows (layer_penalty's forward, so PenaltyStream's value): the
// scalar loop below converts element by element and stays scalar for bf16 and fp16. This AVX2 +
// F16C form does exactly its arithmetic -- eight fp32 lanes, lane l summing elements l, l+8, ...,
// a separate multiply and add (never fused, see below), the same final
// combination and scalar tail -- so it returns the same bits, only faster. Picked at run time.
#if defined(__x86_64__) && defined(__GNUC__)
}  // namespace
}  // namespace cpu
}  // namespace lnsr
// The target includes fma only because immintrin.h was first included under the noise's
// "avx2,fma" above (its intrinsics carry that target); an empty asm keeps each product a separate
// rounding, so no multiply-add can be fused.
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#include <cpuid.h>
#include <immintrin.h>
namespace lnsr {
namespace cpu {
namespace {
#define LNSR_AVX2_F16C __attribute__((target("avx2,fma,f16c")))
LNSR_AVX2_F16C inline __m256 load8_f(const c10::BFloat16* p) {  // bf16 -> fp32 is exact: the bits moved up 16
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
LNSR_AVX2_F16C inline __m256 load8_f(const c10::Half* p) {  // fp16 -> fp32 is exact
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
// (one body for both types; a macro rather than a template, whose instances would lose the target)
#define LNSR_SUM_SQ_DIFF_AVX2(T)                                                                      \
  LNSR_AVX2_F16C __attribute__((noinline)) float sum_sq_diff_avx2(const T* a, const T* b, int64_t n, \
                                                                  int64_t* done) {                    \
    __m256 acc = _mm256_setzero_ps();                                                                 \
    int64_t k = 0;                                                                                    \
    for (; k + 8 <= n; k += 8) {                                                                      \
      const __m256 d = _mm256_sub_ps(load8_f(b + k), load8_f(a + k));                                 \
      __m256 dd = _mm256_mul_ps(d, d);                                                                \
      asm("" : "+x"(dd)); /* opaque: the add below cannot be fused with the multiply */               \
      acc = _mm256_add_ps(acc, dd);                                                                   \
    }                                                                                                 \
    alignas(32) float l[8];                                                                           \
    _mm256_store_ps(l, acc);                                                                          \
    *done = k;                                                                                        \
    return ((l[0] + l[4]) + (l[1] + l[5])) + ((l[2] + l[6]) + (l[3] + l[7]));                         \
  }
LNSR_SUM_SQ_DIFF_AVX2(c10::BFloat16)
LNSR_SUM_SQ_DIFF_AVX2(c10::Half)
#undef LNSR_SUM_SQ_DIFF_AVX2
#undef LNSR_AVX2_F16C
#pragma GCC pop_options

bool use_avx2_f16c() {
  // F16C from CPUID leaf 1 (ECX bit 29): older compilers' __builtin_cpu_supports lacks "f16c"
  unsigned a = 0, b = 0, c = 0, d = 0;
  static const bool ok = __builtin_cpu_supports("avx2") && __get_cpuid(1, &a, &b, &c, &d) && (c & (1u << 29)) &&
                         std::getenv("LNSR_CPU_NO_AVX2") == nullptr;
  return ok;
}
#else
bool use_avx2_f16c() { return false; }
template <typename T>
float sum_sq_diff_avx2(const T*, const T*, int64_t, int64_t* done) {  // never called: no AVX2 here
  *done = 0;
  return 0.f;
}
#endif

// z[0:n] = elements [start, start + n) of the stream.
void fill_noise(uint64_t seed, int64_t start, int64_t n, float* z) {
  int64_t i = start;
  const int64_t end = start + n;
  // Leading partial group.
  if (i < end && (i & 3)) {
    float v[4];
    normal4(seed, static_cast<uint64_t>(i >> 2), v);
    for (int r = static_cast<int>(i & 3); r < 4 && i < end; ++r, ++i) z[i - start] = v[r];
  }
  const bool avx2 = use_avx2();
  while (end - i >= 4 * kB) {
    if (avx2)
      normals_block_avx2(seed, static_cast<uint64_t>(i >> 2), z + (i - start));
    else
      normals_block_scalar(seed, static_cast<uint64_t>(i >> 2), z + (i - start));
    i += 4 * kB;
  }
  while (i < end) {
    float v[4];
    normal4(seed, static_cast<uint64_t>(i >> 2), v);
    for (int r = 0; r < 4 && i < end; ++r, ++i) z[i - start] = v[r];
  }
}

template <typename T>
float sum_sq(const T* x, int64_t n) {
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t k = 0;
  for (; k + 8 <= n; k += 8)
    for (int l = 0; l < 8; ++l) {
      const float v = to_f(x[k + l]);
      acc[l] += v * v;
    }
  float s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
  for (; k < n; ++k) {
    const float v = to_f(x[k]);
    s += v * v;
  }
  return s;
}

// The eight-lane part of sum_sq_diff: lane l sums elements l, l+8, ...; *done = elements covered.
template <typename T>
float sum_sq_diff_lanes(const T* a, const T* b, int64_t n, int64_t* done) {
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t k = 0;
  for (; k + 8 <= n; k += 8)
    for (int l = 0; l < 8; ++l) {
      const float d = to_f(b[k + l]) - to_f(a[k + l]);
      acc[l] += d * d;
    }
  *done = k;
  return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

template <typename T>
float sum_sq_diff(const T* a, const T* b, int64_t n) {
  int64_t k = 0;
  float s;
  if constexpr (std::is_same_v<T, float>)
    s = sum_sq_diff_lanes(a, b, n, &k);
  else  // the same bits either way (see sum_sq_diff_avx2)
    s = use_avx2_f16c() ? sum_sq_diff_avx2(a, b, n, &k) : sum_sq_diff_lanes(a, b, n, &k);
  for (; k < n; ++k) {
    const float d = to_f(b[k]) - to_f(a[k]);
    s += d * d;
  }
  return s;
}

template <typename T>
void perturb_forward_impl(const T* h, T* out, int64_t rows, int64_t hidden, uint64_t seed, float sigma,
                          bool relative) {
  const int64_t n = rows * hidden;
  T* noisy = out + n;
  // Rows per noise buffer: about 4K floats (stays in L1/L2), at least one row.
  const int64_t block_rows = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, hidden));
  at::parallel_for(0, rows, row_grain(hidden), [&](int64_t r0, int64_t r1) {
    std::vector<float> z;
    for (int64_t rb = r0; rb < r1; rb += block_rows) {
      const int64_t re = std::min(r1, rb + block_rows);
      const int64_t start = rb * hidden, cnt = (re - rb) * hidden;
      z.resize(static_cast<size_t>(cnt));
      fill_noise(seed, start, cnt, z.data());
      std::memcpy(out + start, h + start, static_cast<size_t>(cnt) * sizeof(T));
      for (int64_t r = rb; r < re; ++r) {
        const T* hr = h + r * hidden;
        T* nr = noisy + r * hidden;
        const float* zr = z.data() + (r - rb) * hidden;
        float s = sigma;
        if (relative) s = sigma * std::sqrt(sum_sq(hr, hidden) / static_cast<float>(hidden));
        for (int64_t k = 0; k < hidden; ++k) nr[k] = from_f<T>(to_f(hr[k]) + s * zr[k]);
      }
    }
  });
}

template <typename T>
void perturb_backward_impl(const T* g, T* gh, int64_t n) {
  at::parallel_for(0, n, kGrainElems, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) gh[i] = from_f<T>(to_f(g[i]) + to_f(g[n + i]));
  });
}

template <typename T>
double penalty_chunk(const PenaltyLayer& L, int64_t rows, int64_t r0, int64_t r1, const float* mask) {
  const T* clean = static_cast<const T*>(L.y);
  const T* noisy = clean + rows * L.hidden;
  double acc = 0.0;
  for (int64_t r = r0; r < r1; ++r) {
    const float m = mask ? mask[r] : 1.f;
    if (m == 0.f) continue;
    acc += static_cast<double>(m * sum_sq_diff(clean + r * L.hidden, noisy + r * L.hidden, L.hidden));
  }
  return acc;
}

template <typename T>
void penalty_grad_chunk(const PenaltyLayer& L, int64_t rows, int64_t r0, int64_t r1, const float* mask,
                        float scale, bool detach_clean) {
  const T* clean = static_cast<const T*>(L.y);
  const T* noisy = clean + rows * L.hidden;
  T* g_clean = static_cast<T*>(L.grad);
  T* g_noisy = g_clean + rows * L.hidden;
  const int64_t H = L.hidden;
  for (int64_t r = r0; r < r1; ++r) {
    const float s = scale * (mask ? mask[r] : 1.f);
    const T* cr = clean + r * H;
    const T* nr = noisy + r * H;
    T* gn = g_noisy + r * H;
    T* gc = g_clean + r * H;
    if (s == 0.f) {  // masked row: zero gradient without reading it (padding may hold anything)
      std::memset(static_cast<void*>(gn), 0, static_cast<size_t>(H) * sizeof(T));
      std::memset(static_cast<void*>(gc), 0, static_cast<size_t>(H) * sizeof(T));
      continue;
    }
    for (int64_t k = 0; k < H; ++k) gn[k] = from_f<T>(s * (to_f(nr[k]) - to_f(cr[k])));
    if (detach_clean) {
      std::memset(static_cast<void*>(gc), 0, static_cast<size_t>(H) * sizeof(T));  // +0.0 in every dtype
    } else {
      for (int64_t k = 0; k < H; ++k) gc[k] = from_f<T>(-(s * (to_f(nr[k]) - to_f(cr[k]))));
    }
  }
}

// The streaming penalty's gradient of one layer (lnsr.ops.reference.penalty_tap_backward), in one
// pass: token rows < P carry the gradient from above only; clean row P+i and noisy row P+M+i get
// it plus -/+ s_i (noisy - clean), s_i = 2 coef m_i.  Padding (s_i = 0) gets nothing, whatever it holds.
template <typename T>
void tap_backward_impl(const T* y, const T* g, T* out, const float* mask, float coef2, int64_t P, int64_t M,
                       int64_t G, int64_t H, bool detach_clean) {
  // Rows without a gradient from above read a row of zeros, so that every inner loop below is
  // branch-free (the compiler vectorises it); the arithmetic is the same as element by element.
  const std::vector<T> zeros(static_cast<size_t>(H), from_f<T>(0.f));
  auto above = [&](int64_t r) { return (g != nullptr && r < G) ? g + r * H : zeros.data(); };
  at::parallel_for(0, P, row_grain(H), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* __restrict__ a = above(r);
      T* __restrict__ o = out + r * H;
      for (int64_t k = 0; k < H; ++k) o[k] = from_f<T>(to_f(a[k]));
    }
  });
  at::parallel_for(0, M, row_grain(2 * H), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const float s = coef2 * (mask ? mask[i] : 1.f);
      const int64_t c = P + i, n = P + M + i;
      // restrict: out never overlaps y or grad (binding.cpp allocates it), so the loops vectorise
      const T *__restrict__ yc = y + c * H, *__restrict__ yn = y + n * H;
      const T *__restrict__ ac = above(c), *__restrict__ an = above(n);
      T *__restrict__ oc = out + c * H, *__restrict__ on = out + n * H;
      if (s == 0.f) {  // padding (or coef 0): nothing added, whatever y holds there (NaN/Inf)
        for (int64_t k = 0; k < H; ++k) {
          on[k] = from_f<T>(to_f(an[k]) + 0.f);
          oc[k] = from_f<T>(detach_clean ? to_f(ac[k]) : to_f(ac[k]) - 0.f);
        }
      } else if (detach_clean) {
        for (int64_t k = 0; k < H; ++k) {
          on[k] = from_f<T>(to_f(an[k]) + s * (to_f(yn[k]) - to_f(yc[k])));
          oc[k] = from_f<T>(to_f(ac[k]));
        }
      } else {
        for (int64_t k = 0; k < H; ++k) {
          const float d = s * (to_f(yn[k]) - to_f(yc[k]));
          on[k] = from_f<T>(to_f(an[k]) + d);
          oc[k] = from_f<T>(to_f(ac[k]) - d);
        }
      }
    }
  });
}

template <typename F>
void by_dtype(int dtype, F&& f) {
  switch (dtype) {
    case kF32: f(float{}); break;
    case kF16: f(c10::Half{}); break;
    case kBF16: f(c10::BFloat16{}); break;
    default: break;  // binding.cpp only passes the three dtypes above
  }
}

}  // namespace

void noise(uint64_t seed, int64_t numel, float* z) {
  at::parallel_for(0, (numel + 3) / 4, kGrainElems / 4, [&](int64_t c0, int64_t c1) {
    const int64_t s = c0 * 4, e = std::min(numel, c1 * 4);
    fill_noise(seed, s, e - s, z + s);
  });
}

void perturb_forward(int dtype, const void* h, void* out, int64_t rows, int64_t hidden, uint64_t seed,
                     float sigma, int kind) {
  by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    perturb_forward_impl<T>(static_cast<const T*>(h), static_cast<T*>(out), rows, hidden, seed, sigma,
                            kind == kRelative);
  });
}

void perturb_backward(int dtype, const void* grad, void* grad_h, int64_t numel) {
  by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    perturb_backward_impl<T>(static_cast<const T*>(grad), static_cast<T*>(grad_h), numel);
  });
}

void layer_penalty_forward(const PenaltyLayer* layers, int n_layers, int64_t rows, const float* mask,
                           const float* weights, float* loss, float* count) {
  const int64_t chunks = (rows + kPenaltyRows - 1) / kPenaltyRows;
  const int64_t items = chunks * n_layers;
  std::vector<double> partial(static_cast<size_t>(items), 0.0);
  int64_t max_hidden = 1;
  for (int j = 0; j < n_layers; ++j) max_hidden = std::max(max_hidden, layers[j].hidden);
  const int64_t grain = std::max<int64_t>(1, row_grain(max_hidden) / kPenaltyRows);
  at::parallel_for(0, items, grain, [&](int64_t b, int64_t e) {
    for (int64_t it = b; it < e; ++it) {
      const PenaltyLayer& L = layers[it / chunks];
      const float w = weights[it / chunks];
      const int64_t r0 = (it % chunks) * kPenaltyRows, r1 = std::min(rows, r0 + kPenaltyRows);
      by_dtype(L.dtype, [&](auto tag) {
        partial[static_cast<size_t>(it)] = w * penalty_chunk<decltype(tag)>(L, rows, r0, r1, mask);
      });
    }
  });
  double total = 0.0;  // fixed order: layer by layer, chunk by chunk
  for (double p : partial) total += p;
  double n = static_cast<double>(rows);
  if (mask) {
    n = 0.0;
    for (int64_t r = 0; r < rows; ++r) n += mask[r];
  }
  *count = static_cast<float>(n);
  *loss = static_cast<float>(total / std::max(n, 1.0));  // empty mask -> 0, not NaN
}

void layer_penalty_backward(const PenaltyLayer* layers, int n_layers, int64_t rows, const float* mask,
                            const float* weights, float grad_loss, float count, bool detach_clean) {
  const int64_t chunks = (rows + kPenaltyRows - 1) / kPenaltyRows;
  const int64_t items = chunks * n_layers;
  int64_t max_hidden = 1;
  for (int j = 0; j < n_layers; ++j) max_hidden = std::max(max_hidden, layers[j].hidden);
  const int64_t grain = std::max<int64_t>(1, row_grain(max_hidden) / kPenaltyRows);
  const float inv_n = grad_loss / std::max(count, 1.f);
  at::parallel_for(0, items, grain, [&](int64_t b, int64_t e) {
    for (int64_t it = b; it < e; ++it) {
      const PenaltyLayer& L = layers[it / chunks];
      const int64_t r0 = (it % chunks) * kPenaltyRows, r1 = std::min(rows, r0 + kPenaltyRows);
      const float scale = 2.f * weights[it / chunks] * inv_n;
      by_dtype(L.dtype, [&](auto tag) {
        penalty_grad_chunk<decltype(tag)>(L, rows, r0, r1, mask, scale, detach_clean);
      });
    }
  });
}

void penalty_tap_backward(int dtype, const void* y, const void* grad, void* out, const float* mask, float coef,
                          int64_t first_rows, int64_t pair_rows, int64_t grad_rows, int64_t hidden,
                          bool detach_clean) {
  by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    tap_backward_impl<T>(static_cast<const T*>(y), static_cast<const T*>(grad), static_cast<T*>(out), mask,
                         2.f * coef, first_rows, pair_rows, grad_rows, hidden, detach_clean);
  });
}

}  // namespace cpu
}  // namespace lnsr
