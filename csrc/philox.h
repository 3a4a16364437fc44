// The lnsr noise stream (docs/design.md §2), shared by host (C++) and device (CUDA) code.
//
// Element i of the perturbed tensor (flat row-major index) takes output r = i % 4 of
// normal4(seed, i / 4): Philox4x32-10 keyed by the 64-bit seed with counter (c_lo, c_hi, 0, 0),
// the four words -> uniforms as Triton's tl.rand -> two Box-Muller pairs (cos, sin), exactly as
// lnsr.ops.reference.noise.  All math is fp32 without fast-math intrinsics, so host and device
// agree with the reference to float rounding (~1e-6 relative).
#pragma once

#include <math.h>
#include <stdint.h>

#if defined(__CUDACC__)
#define LNSR_HD __host__ __device__ __forceinline__
#else
#define LNSR_HD inline
#endif

namespace lnsr {

constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;
constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;
constexpr float kUniformScale = 4.6566127342e-10f;  // tl.uint_to_uniform_float, 32-bit
constexpr float kTwoPi = 6.283185307179586f;
constexpr float kMinU = 1.0e-7f;

LNSR_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// Philox4x32-10 with the round structure of Triton's philox_impl.
LNSR_HD void philox4x32_10(uint64_t seed, uint64_t counter, uint32_t out[4]) {
  uint32_t c0 = static_cast<uint32_t>(counter);
  uint32_t c1 = static_cast<uint32_t>(counter >> 32);
  uint32_t c2 = 0u, c3 = 0u;
  uint32_t k0 = static_cast<uint32_t>(seed);
  uint32_t k1 = static_cast<uint32_t>(seed >> 32);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint32_t a = c0, c = c2;
    c0 = mulhi32(kPhiloxRoundB, c) ^ c1 ^ k0;
    c2 = mulhi32(kPhiloxRoundA, a) ^ c3 ^ k1;
    c1 = kPhiloxRoundB * c;
    c3 = kPhiloxRoundA * a;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  out[0] = c0;
  out[1] = c1;
  out[2] = c2;
  out[3] = c3;
}

// tl.uint_to_uniform_float: reinterpret as int32, fold negatives with ~x, scale in fp32.
LNSR_HD float uint_to_uniform(uint32_t x) {
  int32_t v = static_cast<int32_t>(x);
  if (v < 0) v = ~v;
  return static_cast<float>(v) * kUniformScale;
}

// sinf and cosf of one angle: same results as the separate calls, about half the work.
LNSR_HD void sincos_f32(float x, float* s, float* c) {
#if defined(__CUDA_ARCH__) || (defined(__GLIBC__) && defined(_GNU_SOURCE))
  sincosf(x, s, c);
#else
  *s = sinf(x);
  *c = cosf(x);
#endif
}

LNSR_HD void box_muller(float u1, float u2, float* n1, float* n2) {
  u1 = fmaxf(kMinU, u1);
  const float th = u2 * kTwoPi;
  const float r = sqrtf(-2.0f * logf(u1));
  float s, c;
  sincos_f32(th, &s, &c);
  *n1 = r * c;
  *n2 = r * s;
}

// The four normals (n1, n2, n3, n4) of counter c: elements 4c .. 4c+3 of the stream.
LNSR_HD void normal4(uint64_t seed, uint64_t c, float z[4]) {
  uint32_t x[4];
  philox4x32_10(seed, c, x);
  box_muller(uint_to_uniform(x[0]), uint_to_uniform(x[1]), &z[0], &z[1]);
  box_muller(uint_to_uniform(x[2]), uint_to_uniform(x[3]), &z[2], &z[3]);
}

}  // namespace lnsr
