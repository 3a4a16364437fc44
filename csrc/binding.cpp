// The one torch-facing file: registers the lnsr ops with TORCH_LIBRARY, turns tensors into the
// raw-pointer launchers of cpu_kernels.cpp and cuda_kernels.cu, and gives perturb and
// layer_penalty their autograd in C++ (a forward + backward never enters Python).  The fake
// (meta) implementations are registered from Python (lnsr/ops/backend.py, register_op_extras).
//
// Built with -DLNSR_WITH_CUDA=1 when the CUDA kernels are compiled in (csrc/build_ext.py).
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/core/Device.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/library.h>

#include <string_view>
#include <vector>

#include "lnsr_kernels.h"

#ifndef LNSR_WITH_CUDA
#define LNSR_WITH_CUDA 0
#endif
// The TORCH_CUDA_ARCH_LIST of the build as one preprocessing number (setup.py: arch_token, e.g.
// 0_8.0_9.0_PTX): a quoted string would not survive the shell quoting of every build tool.  Python
// checks it against the device's compute capability (lnsr/ops/extension.py).
#ifndef LNSR_CUDA_ARCHS
#define LNSR_CUDA_ARCHS 0_
#endif
#define LNSR_STR2(x) #x
#define LNSR_STR(x) LNSR_STR2(x)
#if LNSR_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#endif

namespace {

int dtype_code(const at::Tensor& t, const char* what) {
  switch (t.scalar_type()) {
    case at::kFloat: return lnsr::kF32;
    case at::kHalf: return lnsr::kF16;
    case at::kBFloat16: return lnsr::kBF16;
    default: TORCH_CHECK(false, "lnsr: ", what, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
  return -1;
}

// Seeds are unsigned 64-bit; the schema carries them as int64 bit patterns.
uint64_t seed_bits(int64_t seed) { return static_cast<uint64_t>(seed); }

// perturb_seeded's seed: a one-element int64 tensor on h's device holding the seed's bits.
void check_device_seed(const at::Tensor& seed, const at::Tensor& h) {
  TORCH_CHECK(seed.scalar_type() == at::kLong && seed.numel() == 1 && seed.device() == h.device(),
              "lnsr::perturb_seeded: seed must be a one-element int64 tensor on ", h.device(),
              " (the seed's 64 bits), got a ", seed.scalar_type(), " tensor of shape ", seed.sizes(), " on ",
              seed.device());
}

int noise_kind(std::string_view kind) {
  if (kind == "gaussian") return lnsr::kGaussian;
  if (kind == "relative") return lnsr::kRelative;
  TORCH_CHECK(false, "lnsr::perturb: kind must be 'gaussian' or 'relative' ('manifold' is composed in Python), got '",
              std::string(kind), "'");
  return -1;
}

int64_t last_dim(const at::Tensor& t) { return t.dim() == 0 ? 1 : t.size(-1); }

std::vector<int64_t> doubled_shape(const at::Tensor& h) {
  std::vector<int64_t> s(h.sizes().begin(), h.sizes().end());
  s[0] *= 2;
  return s;
}

struct PenaltyArgs {
  std::vector<at::Tensor> ys;  // contiguous
  c10::optional<at::Tensor> mask;  // fp32 contiguous
  at::Tensor weights;  // fp32 contiguous, one per layer, on the device of ys
  std::vector<lnsr::PenaltyLayer> layers;
  int64_t rows = 0;
};

PenaltyArgs penalty_args(const at::TensorList& ys_in, const c10::optional<at::Tensor>& mask_in,
                         const at::Tensor& weights) {
  TORCH_CHECK(!ys_in.empty(), "lnsr::layer_penalty: ys is empty");
  TORCH_CHECK(weights.dim() == 1 && weights.numel() == static_cast<int64_t>(ys_in.size()),
              "lnsr::layer_penalty: weights must be a 1-d tensor with one entry per tensor in ys, got shape ",
              weights.sizes(), " for ", ys_in.size(), " tensors");
  PenaltyArgs a;
  const at::Tensor& first = ys_in[0];
  TORCH_CHECK(first.dim() >= 2 && first.size(0) % 2 == 0, "lnsr::layer_penalty: ys[0] must be [2B, ..., H]");
  const int64_t h0 = last_dim(first);
  a.rows = h0 > 0 ? first.numel() / h0 / 2 : 0;
  for (size_t j = 0; j < ys_in.size(); ++j) {
    const at::Tensor& y = ys_in[j];
    TORCH_CHECK(y.device() == first.device(), "lnsr::layer_penalty: ys on different devices");
    TORCH_CHECK(y.dim() == first.dim() && y.sizes().slice(0, y.dim() - 1) == first.sizes().slice(0, first.dim() - 1),
                "lnsr::layer_penalty: ys[", j, "] has shape ", y.sizes(), ", token dims differ from ys[0] ",
                first.sizes());
    a.ys.push_back(y.contiguous());
    a.layers.push_back({a.ys.back().const_data_ptr(), nullptr, last_dim(y), dtype_code(y, "ys")});
  }
  a.weights = weights.to(first.device(), at::kFloat).contiguous();
  if (mask_in.has_value() && mask_in->defined()) {
    TORCH_CHECK(mask_in->numel() == a.rows, "lnsr::layer_penalty: mask has ", mask_in->numel(),
                " entries for ", a.rows, " tokens");
    TORCH_CHECK(mask_in->device() == first.device(), "lnsr::layer_penalty: mask is on ", mask_in->device(),
                ", ys on ", first.device());
    a.mask = mask_in->to(at::kFloat).contiguous();
  }
  return a;
}

// penalty_tap_backward's operands, checked once, made contiguous, grad in y's dtype, mask fp32;
// rows are token rows (batch rows times the token dims).
struct TapArgs {
  at::Tensor y, grad, mask;  // grad / mask undefined when absent
  int dtype = 0;             // of y (and of grad, converted)
  int64_t first_rows = 0, pair_rows = 0, grad_rows = 0, hidden = 0;
};

TapArgs tap_args(const c10::optional<at::Tensor>& grad, const at::Tensor& coef, const at::Tensor& y, int64_t first,
                 const c10::optional<at::Tensor>& mask) {
  TORCH_CHECK(y.dim() >= 2, "lnsr::penalty_tap_backward: y must be [first + 2m, ..., H], got shape ", y.sizes());
  TORCH_CHECK(first >= 0 && first <= y.size(0) && (y.size(0) - first) % 2 == 0,
              "lnsr::penalty_tap_backward: y's ", y.size(0), " rows are not first (", first, ") + 2m");
  TORCH_CHECK(coef.numel() == 1 && coef.device() == y.device(),
              "lnsr::penalty_tap_backward: coef must be a one-element tensor on ", y.device());
  TapArgs a;
  a.dtype = dtype_code(y, "y");
  a.y = y.contiguous();
  a.hidden = last_dim(y);
  const int64_t tokens = y.size(0) > 0 && a.hidden > 0 ? y.numel() / (y.size(0) * a.hidden) : 0;
  a.first_rows = first * tokens;
  a.pair_rows = (y.size(0) - first) / 2 * tokens;
  if (grad.has_value() && grad->defined()) {
    TORCH_CHECK(grad->dim() == y.dim() && grad->size(0) <= y.size(0) &&
                    grad->sizes().slice(1) == y.sizes().slice(1) && grad->device() == y.device(),
                "lnsr::penalty_tap_backward: grad has shape ", grad->sizes(), " on ", grad->device(),
                "; it must be y's leading rows ", y.sizes(), " on ", y.device());
    a.grad = grad->to(y.scalar_type()).contiguous();
    a.grad_rows = grad->size(0) * tokens;
  }
  if (mask.has_value() && mask->defined()) {
    TORCH_CHECK(mask->numel() == a.pair_rows && mask->device() == y.device(),
                "lnsr::penalty_tap_backward: mask has ", mask->numel(), " entries on ", mask->device(), " for ",
                a.pair_rows, " noisy tokens on ", y.device());
    a.mask = mask->to(at::kFloat).contiguous();
  }
  return a;
}

const float* mask_ptr(const PenaltyArgs& a) { return a.mask.has_value() ? a.mask->const_data_ptr<float>() : nullptr; }
const float* weights_ptr(const PenaltyArgs& a) { return a.weights.const_data_ptr<float>(); }

// ---------------------------------------------------------------------------------------------
// CPU
// ---------------------------------------------------------------------------------------------

at::Tensor noise_cpu(int64_t numel, int64_t seed) {
  TORCH_CHECK(numel >= 0, "lnsr::noise: numel must be >= 0");
  at::Tensor z = at::empty({numel}, at::TensorOptions().dtype(at::kFloat));
  lnsr::cpu::noise(seed_bits(seed), numel, z.mutable_data_ptr<float>());
  return z;
}

at::Tensor perturb_cpu(const at::Tensor& h_in, int64_t seed, double sigma, std::string_view kind) {
  TORCH_CHECK(h_in.dim() >= 2, "lnsr::perturb: h must be [B, ..., H]");
  const int dt = dtype_code(h_in, "h");
  const int k = noise_kind(kind);
  at::Tensor h = h_in.contiguous();
  at::Tensor out = at::empty(doubled_shape(h), h.options());
  const int64_t H = last_dim(h);
  if (h.numel() > 0)
    lnsr::cpu::perturb_forward(dt, h.const_data_ptr(), out.mutable_data_ptr(), h.numel() / H, H, seed_bits(seed),
                               static_cast<float>(sigma), k);
  return out;
}

// On the CPU the device seed is read on the host (no graph to capture there).
at::Tensor perturb_seeded_cpu(const at::Tensor& h, const at::Tensor& seed, double sigma, std::string_view kind) {
  check_device_seed(seed, h);
  return perturb_cpu(h, seed.item<int64_t>(), sigma, kind);
}

at::Tensor perturb_backward_cpu(const at::Tensor& g_in) {
  TORCH_CHECK(g_in.dim() >= 2 && g_in.size(0) % 2 == 0, "lnsr::perturb_backward: grad must be [2B, ..., H]");
  const int dt = dtype_code(g_in, "grad");
  at::Tensor g = g_in.contiguous();
  std::vector<int64_t> s(g.sizes().begin(), g.sizes().end());
  s[0] /= 2;
  at::Tensor gh = at::empty(s, g.options());
  lnsr::cpu::perturb_backward(dt, g.const_data_ptr(), gh.mutable_data_ptr(), gh.numel());
  return gh;
}

std::tuple<at::Tensor, at::Tensor> layer_penalty_cpu(at::TensorList ys, const c10::optional<at::Tensor>& mask,
                                                     const at::Tensor& weights, bool detach_clean) {
  (void)detach_clean;  // backward only
  PenaltyArgs a = penalty_args(ys, mask, weights);
  at::Tensor loss = at::empty({}, at::TensorOptions().dtype(at::kFloat));
  at::Tensor count = at::empty({}, at::TensorOptions().dtype(at::kFloat));
  lnsr::cpu::layer_penalty_forward(a.layers.data(), static_cast<int>(a.layers.size()), a.rows, mask_ptr(a),
                                   weights_ptr(a), loss.mutable_data_ptr<float>(), count.mutable_data_ptr<float>());
  return {loss, count};
}

std::vector<at::Tensor> layer_penalty_backward_cpu(const at::Tensor& grad, const at::Tensor& count,
                                                   at::TensorList ys, const c10::optional<at::Tensor>& mask,
                                                   const at::Tensor& weights, bool detach_clean) {
  PenaltyArgs a = penalty_args(ys, mask, weights);
  std::vector<at::Tensor> grads;
  for (size_t j = 0; j < a.ys.size(); ++j) {
    grads.push_back(at::empty_like(a.ys[j], at::MemoryFormat::Contiguous));
    a.layers[j].grad = grads.back().mutable_data_ptr();
  }
  lnsr::cpu::layer_penalty_backward(a.layers.data(), static_cast<int>(a.layers.size()), a.rows, mask_ptr(a),
                                    weights_ptr(a), grad.item<float>(), count.item<float>(), detach_clean);
  return grads;
}

at::Tensor penalty_tap_backward_cpu(const c10::optional<at::Tensor>& grad, const at::Tensor& coef, const at::Tensor& y,
                                    int64_t first, const c10::optional<at::Tensor>& mask, bool detach_clean) {
  TapArgs a = tap_args(grad, coef, y, first, mask);
  at::Tensor out = at::empty_like(a.y, at::MemoryFormat::Contiguous);
  if (a.y.numel() > 0)
    lnsr::cpu::penalty_tap_backward(a.dtype, a.y.const_data_ptr(),
                                    a.grad.defined() ? a.grad.const_data_ptr() : nullptr, out.mutable_data_ptr(),
                                    a.mask.defined() ? a.mask.const_data_ptr<float>() : nullptr,
                                    coef.item<float>(), a.first_rows, a.pair_rows, a.grad_rows, a.hidden,
                                    detach_clean);
  return out;
}

// ---------------------------------------------------------------------------------------------
// CUDA
// ---------------------------------------------------------------------------------------------
#if LNSR_WITH_CUDA

void check_cuda(int err, const char* what) {
  TORCH_CHECK(err == 0, "lnsr::", what, ": CUDA kernel launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
}

void* stream_of(const at::Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.get_device()).stream(); }

at::Tensor noise_cuda(int64_t numel, int64_t seed, c10::Device device) {
  TORCH_CHECK(numel >= 0, "lnsr::noise: numel must be >= 0");
  c10::cuda::CUDAGuard guard(device);
  at::Tensor z = at::empty({numel}, at::TensorOptions().dtype(at::kFloat).device(device));
  check_cuda(lnsr::cuda::noise(seed_bits(seed), numel, z.mutable_data_ptr<float>(), stream_of(z)), "noise");
  return z;
}

// seed_ptr: nullptr (use `seed`) or perturb_seeded's device seed, read by the kernel.
at::Tensor perturb_cuda_impl(const at::Tensor& h_in, int64_t seed, const int64_t* seed_ptr, double sigma,
                             std::string_view kind) {
  TORCH_CHECK(h_in.dim() >= 2, "lnsr::perturb: h must be [B, ..., H]");
  const int dt = dtype_code(h_in, "h");
  const int k = noise_kind(kind);
  c10::cuda::CUDAGuard guard(h_in.device());
  at::Tensor h = h_in.contiguous();
  at::Tensor out = at::empty(doubled_shape(h), h.options());
  const int64_t H = last_dim(h);
  if (h.numel() > 0)
    check_cuda(lnsr::cuda::perturb_forward(dt, h.const_data_ptr(), out.mutable_data_ptr(), h.numel() / H, H,
                                           seed_bits(seed), seed_ptr, static_cast<float>(sigma), k, stream_of(h)),
               "perturb");
  return out;
}

at::Tensor perturb_cuda(const at::Tensor& h, int64_t seed, double sigma, std::string_view kind) {
  return perturb_cuda_impl(h, seed, nullptr, sigma, kind);
}

at::Tensor perturb_seeded_cuda(const at::Tensor& h, const at::Tensor& seed, double sigma, std::string_view kind) {
  check_device_seed(seed, h);
  const at::Tensor s = seed.contiguous();  // one element: already contiguous, kept alive by the caller
  return perturb_cuda_impl(h, 0, s.const_data_ptr<int64_t>(), sigma, kind);
}

at::Tensor perturb_backward_cuda(const at::Tensor& g_in) {
  TORCH_CHECK(g_in.dim() >= 2 && g_in.size(0) % 2 == 0, "lnsr::perturb_backward: grad must be [2B, ..., H]");
  const int dt = dtype_code(g_in, "grad");
  c10::cuda::CUDAGuard guard(g_in.device());
  at::Tensor g = g_in.contiguous();
  std::vector<int64_t> s(g.sizes().begin(), g.sizes().end());
  s[0] /= 2;
  at::Tensor gh = at::empty(s, g.options());
  check_cuda(lnsr::cuda::perturb_backward(dt, g.const_data_ptr(), gh.mutable_data_ptr(), gh.numel(), stream_of(g)),
             "perturb_backward");
  return gh;
}

std::tuple<at::Tensor, at::Tensor> layer_penalty_cuda(at::TensorList ys, const c10::optional<at::Tensor>& mask,
                                                      const at::Tensor& weights, bool detach_clean) {
  (void)detach_clean;
  TORCH_CHECK(!ys.empty(), "lnsr::layer_penalty: ys is empty");
  c10::cuda::CUDAGuard guard(ys[0].device());
  PenaltyArgs a = penalty_args(ys, mask, weights);
  const auto opts = at::TensorOptions().dtype(at::kFloat).device(ys[0].device());
  const int n = static_cast<int>(a.layers.size());
  at::Tensor ws = at::empty({lnsr::cuda::layer_penalty_workspace(n, a.rows)}, opts);
  at::Tensor loss = at::empty({}, opts);
  at::Tensor count = at::empty({}, opts);
  check_cuda(lnsr::cuda::layer_penalty_forward(a.layers.data(), n, a.rows, mask_ptr(a), weights_ptr(a),
                                               ws.mutable_data_ptr<float>(), loss.mutable_data_ptr<float>(),
                                               count.mutable_data_ptr<float>(), stream_of(ws)),
             "layer_penalty");
  return {loss, count};
}

std::vector<at::Tensor> layer_penalty_backward_cuda(const at::Tensor& grad, const at::Tensor& count,
                                                    at::TensorList ys, const c10::optional<at::Tensor>& mask,
                                                    const at::Tensor& weights, bool detach_clean) {
  TORCH_CHECK(!ys.empty(), "lnsr::layer_penalty_backward: ys is empty");
  c10::cuda::CUDAGuard guard(ys[0].device());
  PenaltyArgs a = penalty_args(ys, mask, weights);
  at::Tensor g = grad.to(ys[0].device(), at::kFloat).contiguous();
  at::Tensor c = count.to(ys[0].device(), at::kFloat).contiguous();
  std::vector<at::Tensor> grads;
  for (size_t j = 0; j < a.ys.size(); ++j) {
    grads.push_back(at::empty_like(a.ys[j], at::MemoryFormat::Contiguous));
    a.layers[j].grad = grads.back().mutable_data_ptr();
  }
  check_cuda(lnsr::cuda::layer_penalty_backward(a.layers.data(), static_cast<int>(a.layers.size()), a.rows,
                                                mask_ptr(a), weights_ptr(a), g.const_data_ptr<float>(),
                                                c.const_data_ptr<float>(), detach_clean, stream_of(g)),
             "layer_penalty_backward");
  return grads;
}

at::Tensor penalty_tap_backward_cuda(const c10::optional<at::Tensor>& grad, const at::Tensor& coef,
                                     const at::Tensor& y, int64_t first, const c10::optional<at::Tensor>& mask,
                                     bool detach_clean) {
  c10::cuda::CUDAGuard guard(y.device());
  TapArgs a = tap_args(grad, coef, y, first, mask);
  at::Tensor c = coef.to(at::kFloat).contiguous();
  at::Tensor out = at::empty_like(a.y, at::MemoryFormat::Contiguous);
  check_cuda(lnsr::cuda::penalty_tap_backward(a.dtype, a.y.const_data_ptr(),
                                              a.grad.defined() ? a.grad.const_data_ptr() : nullptr,
                                              out.mutable_data_ptr(),
                                              a.mask.defined() ? a.mask.const_data_ptr<float>() : nullptr,
                                              c.const_data_ptr<float>(), a.first_rows, a.pair_rows, a.grad_rows,
                                              a.hidden, detach_clean, stream_of(out)),
             "penalty_tap_backward");
  return out;
}

#endif  // LNSR_WITH_CUDA

// noise has no tensor argument, so it cannot dispatch on one: one implementation routes by device.
at::Tensor noise_any(int64_t numel, int64_t seed, c10::Device device) {
  if (device.is_cpu()) return noise_cpu(numel, seed);
#if LNSR_WITH_CUDA
  if (device.is_cuda()) return noise_cuda(numel, seed, device);
#endif
  TORCH_CHECK(false, "lnsr::noise: no kernel for device ", device, LNSR_WITH_CUDA ? "" : " (built without CUDA)");
  return {};
}

// ---------------------------------------------------------------------------------------------
// Autograd (the Autograd dispatch key): the ops are called again below autograd, so one C++
// function serves CPU and CUDA; the backward calls the backward ops the same way.
// ---------------------------------------------------------------------------------------------

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor call_perturb(const at::Tensor& h, int64_t seed, double sigma, std::string_view kind) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lnsr::perturb", "")
                       .typed<at::Tensor(const at::Tensor&, int64_t, double, std::string_view)>();
  return op.call(h, seed, sigma, kind);
}

at::Tensor call_perturb_seeded(const at::Tensor& h, const at::Tensor& seed, double sigma, std::string_view kind) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lnsr::perturb_seeded", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, double, std::string_view)>();
  return op.call(h, seed, sigma, kind);
}

at::Tensor call_perturb_backward(const at::Tensor& grad) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lnsr::perturb_backward", "")
                       .typed<at::Tensor(const at::Tensor&)>();
  return op.call(grad);
}

std::tuple<at::Tensor, at::Tensor> call_layer_penalty(at::TensorList ys, const c10::optional<at::Tensor>& mask,
                                                      const at::Tensor& weights, bool detach_clean) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lnsr::layer_penalty", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(at::TensorList, const c10::optional<at::Tensor>&,
                                                                 const at::Tensor&, bool)>();
  return op.call(ys, mask, weights, detach_clean);
}

std::vector<at::Tensor> call_layer_penalty_backward(const at::Tensor& grad, const at::Tensor& count, at::TensorList ys,
                                                    const c10::optional<at::Tensor>& mask, const at::Tensor& weights,
                                                    bool detach_clean) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lnsr::layer_penalty_backward", "")
                       .typed<std::vector<at::Tensor>(const at::Tensor&, const at::Tensor&, at::TensorList,
                                                      const c10::optional<at::Tensor>&, const at::Tensor&, bool)>();
  return op.call(grad, count, ys, mask, weights, detach_clean);
}

struct PerturbFunction : public torch::autograd::Function<PerturbFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& h, int64_t seed, double sigma,
                            std::string_view kind) {
    at::AutoDispatchBelowADInplaceOrView below;
    return call_perturb(h, seed, sigma, kind);
  }
  // eps is detached for every kind (docs/design.md §1): the gradient is g[:B] + g[B:]
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return {call_perturb_backward(grads[0]), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

struct PerturbSeededFunction : public torch::autograd::Function<PerturbSeededFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& h, const at::Tensor& seed, double sigma,
                            std::string_view kind) {
    at::AutoDispatchBelowADInplaceOrView below;
    return call_perturb_seeded(h, seed, sigma, kind);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return {call_perturb_backward(grads[0]), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

struct PenaltyFunction : public torch::autograd::Function<PenaltyFunction> {
  static variable_list forward(AutogradContext* ctx, at::TensorList ys, const c10::optional<at::Tensor>& mask,
                               const at::Tensor& weights, bool detach_clean) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [loss, count] = call_layer_penalty(ys, mask, weights, detach_clean);
    const bool has_mask = mask.has_value() && mask->defined();
    // Only the inputs (alive anyway: the model keeps them for its own backward) and two tiny
    // tensors; no activation of the penalty is stored.
    variable_list saved{count, weights, has_mask ? *mask : count};
    saved.insert(saved.end(), ys.begin(), ys.end());
    ctx->save_for_backward(saved);
    ctx->saved_data["has_mask"] = has_mask;
    ctx->saved_data["detach_clean"] = detach_clean;
    ctx->mark_non_differentiable({count});
    return {loss, count};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list saved = ctx->get_saved_variables();
    std::vector<at::Tensor> ys(saved.begin() + 3, saved.end());
    c10::optional<at::Tensor> mask;
    if (ctx->saved_data["has_mask"].toBool()) mask = saved[2];
    at::Tensor grad = grads[0].defined() ? grads[0] : at::zeros_like(saved[0]);
    std::vector<at::Tensor> gys =
        call_layer_penalty_backward(grad, saved[0], ys, mask, saved[1], ctx->saved_data["detach_clean"].toBool());
    variable_list out(gys.begin(), gys.end());
    out.resize(gys.size() + 3);  // mask, weights, detach_clean: no gradient
    return out;
  }
};

at::Tensor call_penalty_tap_backward(const c10::optional<at::Tensor>& grad, const at::Tensor& coef, const at::Tensor& y,
                                     int64_t first, const c10::optional<at::Tensor>& mask, bool detach_clean) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lnsr::penalty_tap_backward", "")
                       .typed<at::Tensor(const c10::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&, int64_t,
                                         const c10::optional<at::Tensor>&, bool)>();
  return op.call(grad, coef, y, first, mask, detach_clean);
}

// The streaming penalty's tap (lnsr.ops.PenaltyStream.tap; the Python _PenaltyTap is the same
// function for the torch and Triton backends and under torch.compile): y[:keep] for the rest of the
// model and a zero fp32 scalar through which the penalty's gradient dP * w_j / N arrives; the
// backward is one penalty_tap_backward, so neither direction of a tap enters Python.
struct PenaltyTapFunction : public torch::autograd::Function<PenaltyTapFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& y, const c10::optional<at::Tensor>& mask,
                               int64_t first, int64_t keep, bool detach_clean) {
    const bool has_mask = mask.has_value() && mask->defined();
    ctx->save_for_backward({y, has_mask ? *mask : at::Tensor()});
    ctx->saved_data["first"] = first;
    ctx->saved_data["detach_clean"] = detach_clean;
    ctx->set_materialize_grads(false);  // an unused output costs nothing: no zeros are made for it
    return {y.slice(0, 0, keep), at::zeros({}, y.options().dtype(at::kFloat))};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list saved = ctx->get_saved_variables();
    const at::Tensor& y = saved[0];
    at::Tensor gy;
    if (grads[0].defined() || grads[1].defined()) {
      c10::optional<at::Tensor> grad, mask;
      if (grads[0].defined()) grad = grads[0];
      if (saved[1].defined()) mask = saved[1];
      at::Tensor coef = grads[1].defined() ? grads[1] : at::zeros({}, y.options().dtype(at::kFloat));
      gy = call_penalty_tap_backward(grad, coef, y, ctx->saved_data["first"].toInt(), mask,
                                     ctx->saved_data["detach_clean"].toBool());
    }
    return {gy, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// The stream's loss (PenaltyStream.loss): the value, computed once without a graph, plus
// sum_j (w_j / N) * coef_j over the taps' zero scalars -- one node instead of stack, mul, sum and
// add; its backward hands tap j the scalar dP * w_j / N (the same products as the Python form).
struct StreamLossFunction : public torch::autograd::Function<StreamLossFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& value, const at::Tensor& count,
                            const at::Tensor& weights, at::TensorList coefs) {
    TORCH_CHECK(weights.numel() == static_cast<int64_t>(coefs.size()), "lnsr._C.penalty_stream_loss: ",
                weights.numel(), " weights for ", coefs.size(), " taps");
    ctx->save_for_backward({weights.div(count.to(weights.device()).clamp_min(1.0))});
    return value.clone();  // value + sum_j scale_j * 0
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor scale = ctx->get_saved_variables()[0];
    variable_list out{at::Tensor(), at::Tensor(), at::Tensor()};
    if (grads[0].defined()) {
      for (at::Tensor& g : at::mul(scale, grads[0]).unbind(0)) out.push_back(std::move(g));
    } else {
      out.resize(3 + scale.numel());
    }
    return out;
  }
};

// lnsr._C.penalty_tap(y, mask or None, first, keep, detach_clean) -> (y[:keep], coef): called from
// Python without the dispatcher (a view-returning op would need alias annotations and
// functionalization); plain tensors only -- PenaltyStream sends subclasses and traced code to the
// Python tap.
PyObject* py_penalty_tap(PyObject* /*self*/, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject *py_y = nullptr, *py_mask = nullptr;
  long long first = 0, keep = 0;
  int detach_clean = 0;
  if (!PyArg_ParseTuple(args, "OOLLp", &py_y, &py_mask, &first, &keep, &detach_clean)) return nullptr;
  TORCH_CHECK_TYPE(THPVariable_CheckExact(py_y) && (py_mask == Py_None || THPVariable_CheckExact(py_mask)),
                   "lnsr._C.penalty_tap: y and mask must be plain torch.Tensor (mask may be None)");
  const at::Tensor& y = THPVariable_Unpack(py_y);
  TORCH_CHECK(y.dim() >= 2 && first >= 0 && first < y.size(0) && (y.size(0) - first) % 2 == 0 && keep > 0 &&
                  keep <= y.size(0),
              "lnsr._C.penalty_tap: y must be [first + 2m, ..., H] with 0 < keep <= its rows, got ", y.sizes(),
              ", first=", first, ", keep=", keep);
  c10::optional<at::Tensor> mask;
  if (py_mask != Py_None) mask = THPVariable_Unpack(py_mask);
  variable_list out = PenaltyTapFunction::apply(y, mask, static_cast<int64_t>(first), static_cast<int64_t>(keep),
                                                static_cast<bool>(detach_clean));
  PyObject* tuple = PyTuple_New(2);
  if (tuple == nullptr) return nullptr;
  PyTuple_SET_ITEM(tuple, 0, THPVariable_Wrap(std::move(out[0])));  // steals the new references
  PyTuple_SET_ITEM(tuple, 1, THPVariable_Wrap(std::move(out[1])));
  return tuple;
  END_HANDLE_TH_ERRORS
}

// lnsr._C.penalty_stream_loss(value, count, weights, coefs) -> the stream's loss (StreamLossFunction).
PyObject* py_penalty_stream_loss(PyObject* /*self*/, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject *py_value = nullptr, *py_count = nullptr, *py_weights = nullptr, *py_coefs = nullptr;
  if (!PyArg_ParseTuple(args, "OOOO", &py_value, &py_count, &py_weights, &py_coefs)) return nullptr;
  TORCH_CHECK_TYPE(THPVariable_CheckExact(py_value) && THPVariable_CheckExact(py_count) &&
                       THPVariable_CheckExact(py_weights) && PyList_Check(py_coefs),
                   "lnsr._C.penalty_stream_loss: value, count, weights must be plain tensors and coefs a list");
  std::vector<at::Tensor> coefs;
  coefs.reserve(PyList_GET_SIZE(py_coefs));
  for (Py_ssize_t j = 0; j < PyList_GET_SIZE(py_coefs); ++j) {
    PyObject* c = PyList_GET_ITEM(py_coefs, j);
    TORCH_CHECK_TYPE(THPVariable_CheckExact(c), "lnsr._C.penalty_stream_loss: coefs[", j, "] is not a tensor");
    coefs.push_back(THPVariable_Unpack(c));
  }
  return THPVariable_Wrap(StreamLossFunction::apply(THPVariable_Unpack(py_value), THPVariable_Unpack(py_count),
                                                    THPVariable_Unpack(py_weights), at::TensorList(coefs)));
  END_HANDLE_TH_ERRORS
}

PyMethodDef module_methods[] = {
    {"penalty_tap", py_penalty_tap, METH_VARARGS,
     "penalty_tap(y, mask, first, keep, detach_clean) -> (y[:keep], coef): PenaltyStream's tap in C++"},
    {"penalty_stream_loss", py_penalty_stream_loss, METH_VARARGS,
     "penalty_stream_loss(value, count, weights, coefs) -> loss: PenaltyStream.loss's node in C++"},
    {nullptr, nullptr, 0, nullptr}};

at::Tensor perturb_autograd(const at::Tensor& h, int64_t seed, double sigma, std::string_view kind) {
  return PerturbFunction::apply(h, seed, sigma, kind);
}

at::Tensor perturb_seeded_autograd(const at::Tensor& h, const at::Tensor& seed, double sigma, std::string_view kind) {
  return PerturbSeededFunction::apply(h, seed, sigma, kind);
}

std::tuple<at::Tensor, at::Tensor> layer_penalty_autograd(at::TensorList ys, const c10::optional<at::Tensor>& mask,
                                                          const at::Tensor& weights, bool detach_clean) {
  variable_list out = PenaltyFunction::apply(ys, mask, weights, detach_clean);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY(lnsr, m) {
  m.def("noise(int numel, int seed, Device device) -> Tensor");
  m.def("perturb(Tensor h, int seed, float sigma, str kind) -> Tensor");
  m.def("perturb_backward(Tensor grad) -> Tensor");
  m.def("perturb_seeded(Tensor h, Tensor seed, float sigma, str kind) -> Tensor");
  // The schema of lnsr.ops.backend.OP_SCHEMAS, shared with the Triton ops (tests compare them).
  m.def("layer_penalty(Tensor[] ys, Tensor? mask, Tensor weights, bool detach_clean) -> (Tensor, Tensor)");
  m.def("layer_penalty_backward(Tensor grad, Tensor count, Tensor[] ys, Tensor? mask, Tensor weights, "
        "bool detach_clean) -> Tensor[]");
  // The streaming penalty's per-layer backward (lnsr.ops.PenaltyStream; the Triton op has this schema).
  m.def("penalty_tap_backward(Tensor? grad, Tensor coef, Tensor y, int first, Tensor? mask, bool detach_clean) "
        "-> Tensor");
  m.impl("noise", c10::DispatchKey::CompositeExplicitAutograd, TORCH_FN(noise_any));
}

TORCH_LIBRARY_IMPL(lnsr, CPU, m) {
  m.impl("perturb", TORCH_FN(perturb_cpu));
  m.impl("perturb_seeded", TORCH_FN(perturb_seeded_cpu));
  m.impl("perturb_backward", TORCH_FN(perturb_backward_cpu));
  m.impl("layer_penalty", TORCH_FN(layer_penalty_cpu));
  m.impl("layer_penalty_backward", TORCH_FN(layer_penalty_backward_cpu));
  m.impl("penalty_tap_backward", TORCH_FN(penalty_tap_backward_cpu));
}

TORCH_LIBRARY_IMPL(lnsr, Autograd, m) {
  m.impl("perturb", TORCH_FN(perturb_autograd));
  m.impl("perturb_seeded", TORCH_FN(perturb_seeded_autograd));
  m.impl("layer_penalty", TORCH_FN(layer_penalty_autograd));
}

#if LNSR_WITH_CUDA
TORCH_LIBRARY_IMPL(lnsr, CUDA, m) {
  m.impl("perturb", TORCH_FN(perturb_cuda));
  m.impl("perturb_seeded", TORCH_FN(perturb_seeded_cuda));
  m.impl("perturb_backward", TORCH_FN(perturb_backward_cuda));
  m.impl("layer_penalty", TORCH_FN(layer_penalty_cuda));
  m.impl("layer_penalty_backward", TORCH_FN(layer_penalty_backward_cuda));
  m.impl("penalty_tap_backward", TORCH_FN(penalty_tap_backward_cuda));
}
#endif

// A plain Python module (no pybind11: faster to compile); importing it runs the registrations above.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", "lnsr compiled kernels (ops under torch.ops.lnsr)",
                                   -1, module_methods, nullptr, nullptr, nullptr, nullptr};
  PyObject* mod = PyModule_Create(&def);
  if (mod == nullptr) return nullptr;
  PyModule_AddIntConstant(mod, "WITH_CUDA", LNSR_WITH_CUDA);
#if LNSR_WITH_CUDA
  PyModule_AddIntConstant(mod, "CUDA_VERSION", CUDART_VERSION);
  PyModule_AddStringConstant(mod, "CUDA_ARCHS", LNSR_STR(LNSR_CUDA_ARCHS));
#endif
  return mod;
}
