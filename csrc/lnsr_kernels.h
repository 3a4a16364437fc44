// Raw-pointer launchers of the lnsr kernels.  Free of torch headers so that the .cu file compiles
// with nvcc alone (seconds); binding.cpp turns tensors into these calls.
//
// Shapes: perturb works on h of `rows` x `hidden` elements (contiguous) and writes 2*rows*hidden
// (clean copy first).  layer_penalty takes per-layer tensors of 2*rows*hidden_j elements, the
// clean half first; `mask` (fp32, `rows` entries) or nullptr; `weights` (fp32, one per layer).
#pragma once

#include <stdint.h>

namespace lnsr {

enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };
enum NoiseKind : int { kGaussian = 0, kRelative = 1 };

struct PenaltyLayer {
  const void* y;   // [2*rows, hidden]
  void* grad;      // same shape as y (backward only)
  int64_t hidden;
  int dtype;       // DType
};

namespace cpu {
void noise(uint64_t seed, int64_t numel, float* z);
void perturb_forward(int dtype, const void* h, void* out, int64_t rows, int64_t hidden, uint64_t seed,
                     float sigma, int kind);
void perturb_backward(int dtype, const void* grad, void* grad_h, int64_t numel);
// loss = sum_j w_j * sum_r m_r ||noisy_r - clean_r||^2 / max(N, 1); count = N.
void layer_penalty_forward(const PenaltyLayer* layers, int n_layers, int64_t rows, const float* mask,
                           const float* weights, float* loss, float* count);
void layer_penalty_backward(const PenaltyLayer* layers, int n_layers, int64_t rows, const float* mask,
                            const float* weights, float grad_loss, float count, bool detach_clean);
// The streaming penalty's gradient of one layer y of (first_rows + 2 * pair_rows) x hidden elements:
// out = grad (its first grad_rows rows; nullptr = none, zeros below) plus 2 coef mask_i (noisy_i -
// clean_i) on noisy row first_rows + pair_rows + i and minus that on clean row first_rows + i (not
// if detach_clean); mask: pair_rows fp32 entries or nullptr.  y, grad and out share one dtype.
void penalty_tap_backward(int dtype, const void* y, const void* grad, void* out, const float* mask, float coef,
                          int64_t first_rows, int64_t pair_rows, int64_t grad_rows, int64_t hidden,
                          bool detach_clean);
}  // namespace cpu

namespace cuda {
// Every launcher returns a cudaError_t as int (0 = success) and runs on `stream`.
int noise(uint64_t seed, int64_t numel, float* z, void* stream);
// seed_ptr: nullptr, or a device int64 holding the seed's bits, read by the kernel instead of `seed`
// (a CUDA graph captured with it draws new noise on each replay once that memory is refilled).
int perturb_forward(int dtype, const void* h, void* out, int64_t rows, int64_t hidden, uint64_t seed,
                    const int64_t* seed_ptr, float sigma, int kind, void* stream);
int perturb_backward(int dtype, const void* grad, void* grad_h, int64_t numel, void* stream);
// Floats of scratch space layer_penalty_forward needs for its per-block partial sums.
int64_t layer_penalty_workspace(int n_layers, int64_t rows);
// weights, loss and count live on the device (fp32), read and written there (no host sync).
int layer_penalty_forward(const PenaltyLayer* layers, int n_layers, int64_t rows, const float* mask,
                          const float* weights, float* workspace, float* loss, float* count, void* stream);
// grad_loss and count are device scalars, read on the device (no host sync).
int layer_penalty_backward(const PenaltyLayer* layers, int n_layers, int64_t rows, const float* mask,
                           const float* weights, const float* grad_loss, const float* count, bool detach_clean,
                           void* stream);
// cpu::penalty_tap_backward with coef a device fp32 scalar, read on the device (no host sync).
int penalty_tap_backward(int dtype, const void* y, const void* grad, void* out, const float* mask,
                         const float* coef, int64_t first_rows, int64_t pair_rows, int64_t grad_rows, int64_t hidden,
                         bool detach_clean, void* stream);
}  // namespace cuda

}  // namespace lnsr
