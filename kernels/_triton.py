"""Triton kernels of ``perturb`` and ``layer_penalty`` and their ``torch.library`` ops (issue 3).

Import this module only after deciding on ``TRITON_INTERPRET``: ``triton.jit`` picks the
interpreter (CPU tensors) or the compiler (CUDA tensors) when a kernel is decorated.

Noise (DESIGN §2): element ``i`` of ``h`` (flat, row-major) takes output ``i % 4`` of
``tl.randn4x(seed, i // 4)``; a block that starts at a multiple of 4 gets its values with one
Philox call per 4 elements, laid out by ``interleave(interleave(n1, n3), interleave(n2, n4))``.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import triton
import triton.language as tl
from triton.runtime import driver  # noqa: F401  (fails early when the Triton install is broken)

from lnsr.ops import reference

INTERPRETED = bool(triton.knobs.runtime.interpret) if hasattr(triton, "knobs") else False

# Flat kernels: element modes.
_MODE_NOISE, _MODE_GAUSSIAN, _MODE_ADD = 0, 1, 2
# Rows wider than this are reduced in a second pass over the row (rms needs the whole row
# before the first store); at or below it a row stays in registers and h is read once.
_MAX_SINGLE_PASS_H = 16384


def _signed64(seed: int) -> int:
    """Seeds live in [0, 2**64); torch.library ints are int64, so pass the same 64 bits signed."""
    return seed - 2**64 if seed >= 2**63 else seed


def _unsigned64(seed: int) -> int:
    return seed + 2**64 if seed < 0 else seed


def _tile(device: torch.device) -> int:
    # Every program instance costs milliseconds in the interpreter: few big ones there; on a GPU,
    # tiles of 4K elements (16 per thread at 8 warps) keep enough loads in flight.
    return 1 << 16 if device.type != "cuda" else 4096


def _warps(block: int) -> int:
    return max(4, min(16, block // 512))


# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------

@triton.jit
def _noise_block(seed, start, BLOCK: tl.constexpr):
    """z[start : start + BLOCK] of the stream (start a multiple of 4): one Philox call per 4."""
    c = start // 4 + tl.arange(0, BLOCK // 4).to(tl.int64)
    n1, n2, n3, n4 = tl.randn4x(seed, c)
    return tl.interleave(tl.interleave(n1, n3), tl.interleave(n2, n4))


@triton.jit
def _noise_at(seed, idx):
    """z[idx] for arbitrary int64 indices (4 Philox outputs per element: only for unaligned rows)."""
    n1, n2, n3, n4 = tl.randn4x(seed, idx // 4)
    r = idx % 4
    return tl.where(r == 0, n1, tl.where(r == 1, n2, tl.where(r == 2, n3, n4)))


@triton.jit(do_not_specialize=["seed"])  # a new seed every step must not mean a new compile
def _flat_kernel(h_ptr, eps_ptr, out_ptr, n, seed, sigma, MODE: tl.constexpr, BLOCK: tl.constexpr):
    """MODE 0: out[i] = z[i] (fp32).  MODE 1: out = cat([h, h + sigma*z]).  MODE 2: out = cat([h, h + eps])."""
    start = tl.program_id(0).to(tl.int64) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    inb = offs < n
    if MODE == 0:
        tl.store(out_ptr + offs, _noise_block(seed, start, BLOCK), mask=inb)
    else:
        x = tl.load(h_ptr + offs, mask=inb)
        if MODE == 1:
            eps = sigma * _noise_block(seed, start, BLOCK)
        else:
            eps = tl.load(eps_ptr + offs, mask=inb)
        tl.store(out_ptr + offs, x, mask=inb)
        tl.store(out_ptr + n + offs, (x.to(tl.float32) + eps).to(x.dtype), mask=inb)


@triton.jit(do_not_specialize=["seed"])
def _relative_kernel(h_ptr, out_ptr, n, M, H, seed, sigma, ROWS: tl.constexpr, BLOCK_H: tl.constexpr,
                     SINGLE: tl.constexpr, ALIGNED: tl.constexpr):
    """out = cat([h, h + sigma*rms(row)*z]) over a [ROWS, BLOCK_H] tile of the [M, H] view of h."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    row_ok = rows < M
    row_start = rows * H
    cols = tl.arange(0, BLOCK_H)
    if SINGLE:  # the whole row in registers: h read once
        offs = row_start[:, None] + cols[None, :]
        ok = row_ok[:, None] & (cols < H)[None, :]
        x = tl.load(h_ptr + offs, mask=ok, other=0.0)
        xf = x.to(tl.float32)
        s = sigma * tl.sqrt_rn(tl.sum(xf * xf, axis=1) / H)
        if ALIGNED:  # H % 4 == 0: every row starts a Philox counter
            c = (row_start // 4)[:, None] + tl.arange(0, BLOCK_H // 4).to(tl.int64)[None, :]
            n1, n2, n3, n4 = tl.randn4x(seed, c)
            z = tl.interleave(tl.interleave(n1, n3), tl.interleave(n2, n4))
        else:
            z = _noise_at(seed, offs)
        tl.store(out_ptr + offs, x, mask=ok)
        tl.store(out_ptr + n + offs, (xf + s[:, None] * z).to(x.dtype), mask=ok)
    else:  # very wide rows: sum of squares first, then a second (cache-friendly) read
        acc = tl.zeros([ROWS, BLOCK_H], dtype=tl.float32)
        for k0 in range(0, H, BLOCK_H):
            offs = row_start[:, None] + (k0 + cols)[None, :]
            ok = row_ok[:, None] & ((k0 + cols) < H)[None, :]
            xf = tl.load(h_ptr + offs, mask=ok, other=0.0).to(tl.float32)
            acc += xf * xf
        s = sigma * tl.sqrt_rn(tl.sum(acc, axis=1) / H)
        for k0 in range(0, H, BLOCK_H):
            offs = row_start[:, None] + (k0 + cols)[None, :]
            ok = row_ok[:, None] & ((k0 + cols) < H)[None, :]
            x = tl.load(h_ptr + offs, mask=ok, other=0.0)
            if ALIGNED:
                c = ((row_start + k0) // 4)[:, None] + tl.arange(0, BLOCK_H // 4).to(tl.int64)[None, :]
                n1, n2, n3, n4 = tl.randn4x(seed, c)
                z = tl.interleave(tl.interleave(n1, n3), tl.interleave(n2, n4))
            else:
                z = _noise_at(seed, offs)
            tl.store(out_ptr + offs, x, mask=ok)
            tl.store(out_ptr + n + offs, (x.to(tl.float32) + s[:, None] * z).to(x.dtype), mask=ok)


@triton.jit
def _perturb_bwd_kernel(g_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """grad_h = g[:B] + g[B:] (fp32 sum)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n
    a = tl.load(g_ptr + offs, mask=inb)
    b = tl.load(g_ptr + n + offs, mask=inb)
    tl.store(out_ptr + offs, (a.to(tl.float32) + b.to(tl.float32)).to(a.dtype), mask=inb)


@triton.jit
def _layer_base(ref_ptr, delta_ptr, hid_ptr, H_arg, j, DELTA_DIV: tl.constexpr, UNIFORM_H: tl.constexpr):
    """Layer j's data pointer and hidden size from the tables.

    The table holds element offsets from ``ref_ptr`` (a real pointer argument, which Triton knows
    to be 16-byte aligned) rather than raw addresses: with ``multiple_of`` the compiler can then
    prove the alignment of every layer's rows and emit 16-byte vector loads; a pointer made from
    an integer carries no alignment at all.
    """
    delta = tl.load(delta_ptr + j)
    if DELTA_DIV > 1:
        delta = tl.multiple_of(delta, DELTA_DIV)
    if UNIFORM_H:  # the usual case: a kernel argument, so Triton specialises its divisibility
        H = H_arg
    else:
        H = tl.load(hid_ptr + j)
    return ref_ptr + delta, H


@triton.jit
def _penalty_fwd_kernel(ref_ptr, delta_ptr, hid_ptr, H_arg, w_ptr, mask_ptr, partial_ptr, M, n_row_blocks,
                        HAS_MASK: tl.constexpr, ROWS: tl.constexpr, BLOCK_H: tl.constexpr,
                        DELTA_DIV: tl.constexpr, UNIFORM_H: tl.constexpr):
    """Stage 1: program (layer j, row block) writes w_j * sum_rows m * ||noisy - clean||^2.

    All layers in one launch (a pointer table, as in apex's multi_tensor_apply); the layers share
    the M = B*T token rows of each half, so program -> (layer, row block) is arithmetic.
    """
    pid = tl.program_id(0)
    j = pid // n_row_blocks
    rows = (pid % n_row_blocks).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    base, H = _layer_base(ref_ptr, delta_ptr, hid_ptr, H_arg, j, DELTA_DIV, UNIFORM_H)
    w = tl.load(w_ptr + j)
    row_ok = rows < M
    noisy_rows = rows + M  # int64: M * H alone would be an int32 product and overflow past 2**31
    cols = tl.arange(0, BLOCK_H)
    acc = tl.zeros([ROWS, BLOCK_H], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_H):
        offs = rows[:, None] * H + (k0 + cols)[None, :]
        noffs = noisy_rows[:, None] * H + (k0 + cols)[None, :]
        ok = row_ok[:, None] & ((k0 + cols) < H)[None, :]
        c = tl.load(base + offs, mask=ok, other=0.0).to(tl.float32)
        d = tl.load(base + noffs, mask=ok, other=0.0).to(tl.float32) - c
        acc += d * d
    sq = tl.sum(acc, axis=1)
    if HAS_MASK:
        sq = sq * tl.load(mask_ptr + rows, mask=row_ok, other=0.0)
    tl.store(partial_ptr + pid, w * tl.sum(sq, axis=0))


@triton.jit
def _penalty_final_kernel(partial_ptr, n_partials, mask_ptr, M, inv_m, loss_ptr, scale_ptr,
                          HAS_MASK: tl.constexpr, BLOCK: tl.constexpr):
    """Stage 2 (one program, fixed order): loss = sum(partials) * scale, scale = 1/max(N, 1)."""
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(0, n_partials, BLOCK):
        acc += tl.load(partial_ptr + i + offs, mask=(i + offs) < n_partials, other=0.0)
    total = tl.sum(acc, axis=0)
    if HAS_MASK:
        macc = tl.zeros([BLOCK], dtype=tl.float32)
        for i in range(0, M, BLOCK):
            macc += tl.load(mask_ptr + i + offs, mask=(i + offs) < M, other=0.0)
        scale = 1.0 / tl.maximum(tl.sum(macc, axis=0), 1.0)  # empty mask -> 0, not NaN
    else:
        scale = inv_m  # (from the host: an int argument equal to 1 would be a constexpr here)
    tl.store(loss_ptr, total * scale)
    tl.store(scale_ptr, scale)


@triton.jit
def _penalty_bwd_kernel(ref_ptr, delta_ptr, gref_ptr, gdelta_ptr, hid_ptr, H_arg, w_ptr, mask_ptr, gout_ptr,
                        scale_ptr, M, n_row_blocks, HAS_MASK: tl.constexpr, DETACH: tl.constexpr,
                        ROWS: tl.constexpr, BLOCK_H: tl.constexpr, DELTA_DIV: tl.constexpr,
                        UNIFORM_H: tl.constexpr):
    """grad_noisy = 2 w_j m/N (noisy - clean) g, grad_clean = -grad_noisy (0 with detach_clean),
    recomputed from y: both halves of the gradient in one pass, all layers in one launch."""
    pid = tl.program_id(0)
    j = pid // n_row_blocks
    rows = (pid % n_row_blocks).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    base, H = _layer_base(ref_ptr, delta_ptr, hid_ptr, H_arg, j, DELTA_DIV, UNIFORM_H)
    gbase, H = _layer_base(gref_ptr, gdelta_ptr, hid_ptr, H_arg, j, DELTA_DIV, UNIFORM_H)
    coef = 2.0 * tl.load(w_ptr + j) * tl.load(scale_ptr) * tl.load(gout_ptr)
    row_ok = rows < M
    if HAS_MASK:
        rcoef = coef * tl.load(mask_ptr + rows, mask=row_ok, other=0.0)
    else:
        rcoef = coef + tl.zeros([ROWS], dtype=tl.float32)
    noisy_rows = rows + M  # int64: M * H alone would be an int32 product and overflow past 2**31
    cols = tl.arange(0, BLOCK_H)
    for k0 in range(0, H, BLOCK_H):
        offs = rows[:, None] * H + (k0 + cols)[None, :]
        noffs = noisy_rows[:, None] * H + (k0 + cols)[None, :]
        ok = row_ok[:, None] & ((k0 + cols) < H)[None, :]
        c = tl.load(base + offs, mask=ok, other=0.0)
        d = tl.load(base + noffs, mask=ok, other=0.0).to(tl.float32) - c.to(tl.float32)
        gn = rcoef[:, None] * d
        tl.store(gbase + noffs, gn.to(c.dtype), mask=ok)
        if DETACH:
            tl.store(gbase + offs, tl.zeros_like(gn).to(c.dtype), mask=ok)
        else:
            tl.store(gbase + offs, (-gn).to(c.dtype), mask=ok)


# ---------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------

def _flat_launch(h, eps, out, n, seed, sigma, mode):
    block = _tile(out.device)
    _flat_kernel[(triton.cdiv(n, block),)](h, eps, out, n, seed, sigma, MODE=mode, BLOCK=block,
                                           num_warps=_warps(block))


def noise(numel: int, seed: int, device) -> torch.Tensor:
    """z[0:numel] of the lnsr stream for ``seed`` in fp32, generated by the Triton kernel."""
    seed = reference.check_seed(seed)
    out = torch.empty(numel, dtype=torch.float32, device=device)
    if numel:
        _flat_launch(out, out, out, numel, _signed64(seed), 0.0, _MODE_NOISE)
    return out


def _perturb_impl(h: torch.Tensor, seed: int, sigma: float, kind: str, mask, n_anchors: int) -> torch.Tensor:
    h = h.contiguous()
    n = h.numel()
    out = torch.empty((2 * h.shape[0], *h.shape[1:]), dtype=h.dtype, device=h.device)
    if n == 0:
        return out
    if kind == "gaussian":
        _flat_launch(h, h, out, n, seed, sigma, _MODE_GAUSSIAN)
    elif kind == "relative":
        hid = h.shape[-1]
        m = n // hid
        single = hid <= _MAX_SINGLE_PASS_H
        block_h = triton.next_power_of_2(hid) if single else 4096
        rows = max(1, min(triton.next_power_of_2(m), _tile(h.device) // block_h))
        _relative_kernel[(triton.cdiv(m, rows),)](h, out, n, m, hid, seed, sigma, ROWS=rows, BLOCK_H=block_h,
                                                   SINGLE=single, ALIGNED=(hid % 4 == 0 and block_h >= 4),
                                                   num_warps=_warps(rows * block_h))
    elif kind == "manifold":
        # Anchors: the reference's own sampler (CPU generator, shared by every backend).  The
        # coefficients come from the same stream; the rest is one GEMM and one fused add.
        hid = h.shape[-1]
        useed = _unsigned64(seed)
        anchors = reference.manifold_anchors(mask, h.shape, useed, n_anchors, h.device)
        a = anchors.numel()
        if a == 0:
            out[: h.shape[0]].copy_(h)
            out[h.shape[0]:].copy_(h)
            return out
        h2 = h.view(-1, hid)
        rows = h2.index_select(0, anchors).float()
        centred = rows - rows.mean(dim=0, keepdim=True)
        coef = noise(h2.shape[0] * a, useed, h.device).view(-1, a)
        eps = torch.mm(coef, centred).mul_(sigma / math.sqrt(a))
        _flat_launch(h, eps, out, n, seed, 0.0, _MODE_ADD)
    else:
        raise ValueError(f"unknown noise kind {kind!r}; choose one of {', '.join(reference.NOISE_KINDS)}")
    return out


def _perturb_bwd_impl(g: torch.Tensor) -> torch.Tensor:
    g = g.contiguous()
    b = g.shape[0] // 2
    out = torch.empty((b, *g.shape[1:]), dtype=g.dtype, device=g.device)
    n = out.numel()
    if n:
        block = _tile(g.device)
        _perturb_bwd_kernel[(triton.cdiv(n, block),)](g, out, n, BLOCK=block, num_warps=_warps(block))
    return out


def _penalty_geometry(ys, device):
    m = ys[0].numel() // ys[0].shape[-1] // 2   # token rows per half, shared by all layers
    hmax = max(y.shape[-1] for y in ys)
    block_h = min(triton.next_power_of_2(hmax), 4096)
    rows = max(1, min(triton.next_power_of_2(max(m, 1)), _tile(device) // block_h))
    return m, block_h, rows, triton.cdiv(m, rows)


def _deltas(ts):
    """Element offsets of each tensor's data from ts[0]'s (int64, on the device) and the largest
    power of two (<= 16) dividing all of them, for the kernels' alignment hint."""
    esize = ts[0].element_size()
    base = ts[0].data_ptr()
    deltas = []
    for t in ts:
        diff = t.data_ptr() - base
        if diff % esize:  # never for torch allocations of one dtype; keep the hint honest anyway
            raise RuntimeError("layer_penalty: tensors of one dtype are not element-aligned to each other")
        deltas.append(diff // esize)
    div = 16
    while div > 1 and any(d % div for d in deltas):
        div //= 2
    table = torch.tensor(deltas, dtype=torch.int64).to(ts[0].device, non_blocking=True)
    return table, div


def _group_args(sub):
    device = sub[0].device
    hids = [y.shape[-1] for y in sub]
    uniform = len(set(hids)) == 1
    hid = torch.tensor(hids, dtype=torch.int64).to(device, non_blocking=True)
    return hid, hids[0], uniform


def _groups(ys):
    # One launch per dtype (normally exactly one): a table's pointers share an element type.
    groups = {}
    for j, y in enumerate(ys):
        groups.setdefault(y.dtype, []).append(j)
    return list(groups.values())


def _penalty_impl(ys: list[torch.Tensor], mask, weights: torch.Tensor):
    ys = [y.contiguous() for y in ys]
    device = ys[0].device
    m, block_h, rows, nrb = _penalty_geometry(ys, device)
    # Two allocations, not views of one: a custom op's outputs may not alias each other.
    loss = torch.zeros((), dtype=torch.float32, device=device)
    scale = torch.zeros(1, dtype=torch.float32, device=device)
    has_mask = mask is not None
    maskf = mask.to(torch.float32).contiguous() if has_mask else scale
    if m == 0:
        return loss, scale
    weights = weights.to(device=device, dtype=torch.float32).contiguous()
    partials = torch.empty(len(ys) * nrb, dtype=torch.float32, device=device)
    start = 0
    for idx in _groups(ys):
        sub = [ys[j] for j in idx]
        deltas, div = _deltas(sub)
        hid, h0, uniform = _group_args(sub)
        w = weights if len(idx) == len(ys) else weights[torch.tensor(idx, device=device)]
        _penalty_fwd_kernel[(len(sub) * nrb,)](sub[0], deltas, hid, h0, w, maskf, partials[start:], m, nrb,
                                               HAS_MASK=has_mask, ROWS=rows, BLOCK_H=block_h, DELTA_DIV=div,
                                               UNIFORM_H=uniform, num_warps=_warps(rows * block_h))
        start += len(sub) * nrb
    # Stage 2: a fixed-order sum of the partials (no atomics): bit-identical across runs.
    _penalty_final_kernel[(1,)](partials, partials.numel(), maskf, m, 1.0 / m, loss, scale, HAS_MASK=has_mask,
                                BLOCK=1024, num_warps=4)
    return loss, scale


def _penalty_bwd_impl(gout, ys, mask, scale, weights, detach_clean):
    ys = [y.contiguous() for y in ys]
    device = ys[0].device
    grads = [torch.empty_like(y) for y in ys]
    m, block_h, rows, nrb = _penalty_geometry(ys, device)
    if m == 0:
        return [g.zero_() for g in grads]
    has_mask = mask is not None
    maskf = mask.to(torch.float32).contiguous() if has_mask else scale
    gout = gout.to(torch.float32).reshape(1).contiguous()
    weights = weights.to(device=device, dtype=torch.float32).contiguous()
    for idx in _groups(ys):
        sub, gsub = [ys[j] for j in idx], [grads[j] for j in idx]
        deltas, div = _deltas(sub)
        gdeltas, gdiv = _deltas(gsub)
        hid, h0, uniform = _group_args(sub)
        w = weights if len(idx) == len(ys) else weights[torch.tensor(idx, device=device)]
        _penalty_bwd_kernel[(len(sub) * nrb,)](sub[0], deltas, gsub[0], gdeltas, hid, h0, w, maskf, gout, scale,
                                               m, nrb, HAS_MASK=has_mask, DETACH=bool(detach_clean), ROWS=rows,
                                               BLOCK_H=block_h, DELTA_DIV=min(div, gdiv), UNIFORM_H=uniform,
                                               num_warps=_warps(rows * block_h))
    return grads


# ---------------------------------------------------------------------------------------------
# torch.library ops (torch.compile and opcheck see these; fake impls give shapes)
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("lnsr_triton::perturb", mutates_args=())
def perturb_op(h: torch.Tensor, seed: int, sigma: float, kind: str, mask: torch.Tensor | None,
               n_anchors: int) -> torch.Tensor:
    """cat([h, h + eps]); ``seed`` is the 64-bit seed as a signed int64."""
    return _perturb_impl(h, seed, sigma, kind, mask, n_anchors)


@perturb_op.register_fake
def _(h, seed, sigma, kind, mask, n_anchors):
    return h.new_empty((2 * h.shape[0], *h.shape[1:]))


@torch.library.custom_op("lnsr_triton::perturb_backward", mutates_args=())
def perturb_backward_op(grad: torch.Tensor) -> torch.Tensor:
    return _perturb_bwd_impl(grad)


@perturb_backward_op.register_fake
def _(grad):
    return grad.new_empty((grad.shape[0] // 2, *grad.shape[1:]))


def _perturb_setup(ctx, inputs, output):
    pass


def _perturb_backward(ctx, grad):
    return perturb_backward_op(grad), None, None, None, None, None


perturb_op.register_autograd(_perturb_backward, setup_context=_perturb_setup)


@torch.library.custom_op("lnsr_triton::layer_penalty", mutates_args=())
def layer_penalty_op(ys: list[torch.Tensor], mask: torch.Tensor | None, weights: torch.Tensor,
                     detach_clean: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(penalty, 1/N): fp32 scalar and fp32 [1].  ``weights`` is an fp32 tensor (one per layer) so
    that changing weights (``gain`` normalisation) does not recompile a compiled graph;
    ``detach_clean`` only matters to the backward."""
    return _penalty_impl(ys, mask, weights)


@layer_penalty_op.register_fake
def _(ys, mask, weights, detach_clean):
    return ys[0].new_empty((), dtype=torch.float32), ys[0].new_empty((1,), dtype=torch.float32)


@torch.library.custom_op("lnsr_triton::layer_penalty_backward", mutates_args=())
def layer_penalty_backward_op(grad: torch.Tensor, ys: list[torch.Tensor], mask: torch.Tensor | None,
                              scale: torch.Tensor, weights: torch.Tensor, detach_clean: bool) -> list[torch.Tensor]:
    return _penalty_bwd_impl(grad, ys, mask, scale, weights, detach_clean)


@layer_penalty_backward_op.register_fake
def _(grad, ys, mask, scale, weights, detach_clean):
    return [torch.empty_like(y) for y in ys]


def _penalty_setup(ctx, inputs, output):
    ys, mask, weights, detach_clean = inputs
    ctx.n_ys, ctx.detach_clean = len(ys), detach_clean
    ctx.has_mask = mask is not None
    # Only the inputs (which the model keeps alive anyway) and two tiny tensors: no activations.
    ctx.save_for_backward(*ys, mask if mask is not None else output[1], output[1], weights)


def _penalty_backward(ctx, grad, _grad_scale):
    saved = ctx.saved_tensors
    ys = list(saved[: ctx.n_ys])
    mask = saved[ctx.n_ys] if ctx.has_mask else None
    scale, weights = saved[ctx.n_ys + 1], saved[ctx.n_ys + 2]
    grads = layer_penalty_backward_op(grad, ys, mask, scale, weights, ctx.detach_clean)
    return grads, None, None, None


layer_penalty_op.register_autograd(_penalty_backward, setup_context=_penalty_setup)
