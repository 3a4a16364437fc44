"""Triton kernels of the lnsr ops and their ``torch.library`` ops ``lnsr_triton::*`` (issue 3).

The ops have the schema of ``lnsr.ops.backend.OP_SCHEMAS`` (the same as lnsr._C's); their fake
implementations and autograd are registered there, once for both compiled backends.

Import this module only after deciding on ``TRITON_INTERPRET``: ``triton.jit`` picks the
interpreter (CPU tensors) or the compiler (CUDA tensors) when a kernel is decorated.

Noise (docs/design.md §2): element ``i`` of ``h`` (flat, row-major) takes output ``i % 4`` of
``tl.randn4x(seed, i // 4)``; a block that starts at a multiple of 4 gets its values with one
Philox call per 4 elements, laid out by ``interleave(interleave(n1, n3), interleave(n2, n4))``.
"""
from __future__ import annotations

import collections
import math

import torch
import triton
import triton.language as tl
from triton.runtime import driver  # noqa: F401  (fails early when the Triton install is broken)

from lnsr.ops.backend import KERNEL_DTYPES, OP_SCHEMAS, register_op_extras

INTERPRETED = bool(triton.knobs.runtime.interpret) if hasattr(triton, "knobs") else False

# Flat kernels: element modes.
_MODE_NOISE, _MODE_GAUSSIAN = 0, 1
# Rows wider than this are reduced in a second pass over the row (rms needs the whole row
# before the first store); at or below it a row stays in registers and h is read once.
_MAX_SINGLE_PASS_H = 16384


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


@triton.jit
def _load_seed(seed, SEED_PTR: tl.constexpr):
    """The seed's 64 bits: the int64 argument, or (SEED_PTR) read from the device seed it points to."""
    if SEED_PTR:
        return tl.load(seed)
    else:
        return seed


@triton.jit(do_not_specialize=["seed"])  # a new seed every step must not mean a new compile
def _flat_kernel(h_ptr, out_ptr, n, seed, sigma, MODE: tl.constexpr, BLOCK: tl.constexpr,
                 SEED_PTR: tl.constexpr = False):
    """MODE 0: out[i] = z[i] (fp32).  MODE 1: out = cat([h, h + sigma*z])."""
    seed = _load_seed(seed, SEED_PTR)
    start = tl.program_id(0).to(tl.int64) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    inb = offs < n
    if MODE == 0:
        tl.store(out_ptr + offs, _noise_block(seed, start, BLOCK), mask=inb)
    else:
        x = tl.load(h_ptr + offs, mask=inb)
        eps = sigma * _noise_block(seed, start, BLOCK)
        tl.store(out_ptr + offs, x, mask=inb)
        tl.store(out_ptr + n + offs, (x.to(tl.float32) + eps).to(x.dtype), mask=inb)


@triton.jit(do_not_specialize=["seed"])
def _relative_kernel(h_ptr, out_ptr, n, M, H, seed, sigma, ROWS: tl.constexpr, BLOCK_H: tl.constexpr,
                     SINGLE: tl.constexpr, ALIGNED: tl.constexpr, SEED_PTR: tl.constexpr = False):
    """out = cat([h, h + sigma*rms(row)*z]) over a [ROWS, BLOCK_H] tile of the [M, H] view of h."""
    seed = _load_seed(seed, SEED_PTR)
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
    if HAS_MASK:  # masked rows contribute nothing, even non-finite ones (padding may hold anything)
        m = tl.load(mask_ptr + rows, mask=row_ok, other=0.0)
        sq = tl.where(m != 0, sq * m, 0.0)
    tl.store(partial_ptr + pid, w * tl.sum(sq, axis=0))


@triton.jit
def _penalty_final_kernel(partial_ptr, n_partials, mask_ptr, M, m_float, loss_ptr, count_ptr,
                          HAS_MASK: tl.constexpr, BLOCK: tl.constexpr):
    """Stage 2 (one program, fixed order): loss = sum(partials) / max(N, 1), count = N."""
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(0, n_partials, BLOCK):
        acc += tl.load(partial_ptr + i + offs, mask=(i + offs) < n_partials, other=0.0)
    total = tl.sum(acc, axis=0)
    if HAS_MASK:
        macc = tl.zeros([BLOCK], dtype=tl.float32)
        for i in range(0, M, BLOCK):
            macc += tl.load(mask_ptr + i + offs, mask=(i + offs) < M, other=0.0)
        count = tl.sum(macc, axis=0)
    else:
        count = m_float  # (from the host: an int argument equal to 1 would be a constexpr here)
    tl.store(loss_ptr, total / tl.maximum(count, 1.0))  # empty mask -> 0, not NaN
    tl.store(count_ptr, count)


@triton.jit
def _penalty_bwd_kernel(ref_ptr, delta_ptr, gref_ptr, gdelta_ptr, hid_ptr, H_arg, w_ptr, mask_ptr, gout_ptr,
                        count_ptr, M, n_row_blocks, HAS_MASK: tl.constexpr, DETACH: tl.constexpr,
                        ROWS: tl.constexpr, BLOCK_H: tl.constexpr, DELTA_DIV: tl.constexpr,
                        UNIFORM_H: tl.constexpr):
    """grad_noisy = 2 w_j m/N (noisy - clean) g, grad_clean = -grad_noisy (0 with detach_clean),
    recomputed from y: both halves of the gradient in one pass, all layers in one launch."""
    pid = tl.program_id(0)
    j = pid // n_row_blocks
    rows = (pid % n_row_blocks).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    base, H = _layer_base(ref_ptr, delta_ptr, hid_ptr, H_arg, j, DELTA_DIV, UNIFORM_H)
    gbase, H = _layer_base(gref_ptr, gdelta_ptr, hid_ptr, H_arg, j, DELTA_DIV, UNIFORM_H)
    coef = 2.0 * tl.load(w_ptr + j) * (tl.load(gout_ptr) / tl.maximum(tl.load(count_ptr), 1.0))
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
        gn = tl.where(rcoef[:, None] != 0, rcoef[:, None] * d, 0.0)  # masked rows: 0, even when non-finite
        tl.store(gbase + noffs, gn.to(c.dtype), mask=ok)
        if DETACH:
            tl.store(gbase + offs, tl.zeros_like(gn).to(c.dtype), mask=ok)
        else:
            tl.store(gbase + offs, (-gn).to(c.dtype), mask=ok)


@triton.jit
def _tap_bwd_kernel(y_ptr, g_ptr, out_ptr, mask_ptr, coef_ptr, P, M, G, H, HAS_MASK: tl.constexpr,
                    HAS_GRAD: tl.constexpr, DETACH: tl.constexpr, ROWS: tl.constexpr, BLOCK_H: tl.constexpr):
    """The streaming penalty's gradient of one layer (lnsr.ops.reference.penalty_tap_backward) on
    token rows: clean rows P..P+M, noisy rows P+M..P+2M, the gradient from above on rows < G.
    out = g + 2c m (noisy - clean) on a noisy row, g - (the same) on its clean row, in one pass."""
    i = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    row_ok = i < M
    c2 = 2.0 * tl.load(coef_ptr)
    if HAS_MASK:
        s = c2 * tl.load(mask_ptr + i, mask=row_ok, other=0.0)
    else:
        s = c2 + tl.zeros([ROWS], dtype=tl.float32)
    crow = P + i
    nrow = P + M + i
    cols = tl.arange(0, BLOCK_H)
    for k0 in range(0, H, BLOCK_H):
        col_ok = (k0 + cols) < H
        ok = row_ok[:, None] & col_ok[None, :]
        coffs = crow[:, None] * H + (k0 + cols)[None, :]
        noffs = nrow[:, None] * H + (k0 + cols)[None, :]
        yc = tl.load(y_ptr + coffs, mask=ok, other=0.0)
        yn = tl.load(y_ptr + noffs, mask=ok, other=0.0)
        d = tl.where(s[:, None] != 0, s[:, None] * (yn.to(tl.float32) - yc.to(tl.float32)), 0.0)  # padding: 0
        if HAS_GRAD:
            gc = tl.load(g_ptr + coffs, mask=ok & (crow < G)[:, None], other=0.0).to(tl.float32)
            gn = tl.load(g_ptr + noffs, mask=ok & (nrow < G)[:, None], other=0.0).to(tl.float32)
        else:
            gc = tl.zeros([ROWS, BLOCK_H], dtype=tl.float32)
            gn = tl.zeros([ROWS, BLOCK_H], dtype=tl.float32)
        tl.store(out_ptr + noffs, (gn + d).to(yc.dtype), mask=ok)
        if DETACH:
            tl.store(out_ptr + coffs, gc.to(yc.dtype), mask=ok)
        else:
            tl.store(out_ptr + coffs, (gc - d).to(yc.dtype), mask=ok)


# ---------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------

def _flat_launch(h, out, n, seed, sigma, mode):
    block = _tile(out.device)
    _flat_kernel[(triton.cdiv(n, block),)](h, out, n, seed, sigma, MODE=mode, BLOCK=block, num_warps=_warps(block),
                                           SEED_PTR=isinstance(seed, torch.Tensor))


def _check_dtype(t: torch.Tensor, what: str) -> None:
    # The op may be called directly (opcheck, torch.ops): a clear error, as lnsr._C gives.
    if t.dtype not in KERNEL_DTYPES:
        raise TypeError(f"lnsr_triton: {what} must be float32, float16 or bfloat16, got {t.dtype}")


def _noise_impl(numel: int, seed: int, device) -> torch.Tensor:
    if numel < 0:
        raise ValueError(f"lnsr_triton::noise: numel must be >= 0, got {numel}")
    out = torch.empty(numel, dtype=torch.float32, device=device)
    if numel:
        _flat_launch(out, out, numel, seed, 0.0, _MODE_NOISE)
    return out


def _perturb_impl(h: torch.Tensor, seed, sigma: float, kind: str) -> torch.Tensor:
    # seed: the int64 bits, or (lnsr_triton::perturb_seeded) a device seed the kernels read
    if h.dim() < 2:
        raise ValueError(f"lnsr_triton::perturb: h must be [B, ..., H], got {tuple(h.shape)}")
    _check_dtype(h, "h")
    if kind not in ("gaussian", "relative"):
        raise ValueError(f"lnsr_triton::perturb: kind must be 'gaussian' or 'relative' ('manifold' is composed in "
                         f"Python, lnsr.ops.backend), got {kind!r}")
    h = h.contiguous()
    n = h.numel()
    out = torch.empty((2 * h.shape[0], *h.shape[1:]), dtype=h.dtype, device=h.device)
    if n == 0:
        return out
    if kind == "gaussian":
        _flat_launch(h, out, n, seed, sigma, _MODE_GAUSSIAN)
    else:  # relative
        hid = h.shape[-1]
        m = n // hid
        single = hid <= _MAX_SINGLE_PASS_H
        block_h = triton.next_power_of_2(hid) if single else 4096
        rows = max(1, min(triton.next_power_of_2(m), _tile(h.device) // block_h))
        _relative_kernel[(triton.cdiv(m, rows),)](h, out, n, m, hid, seed, sigma, ROWS=rows, BLOCK_H=block_h,
                                                   SINGLE=single, ALIGNED=(hid % 4 == 0 and block_h >= 4),
                                                   SEED_PTR=isinstance(seed, torch.Tensor),
                                                   num_warps=_warps(rows * block_h))
    return out


def _perturb_seeded_impl(h: torch.Tensor, seed: torch.Tensor, sigma: float, kind: str) -> torch.Tensor:
    if seed.dtype != torch.int64 or seed.numel() != 1 or seed.device != h.device:
        raise ValueError(f"lnsr_triton::perturb_seeded: seed must be a one-element int64 tensor on {h.device} (the "
                         f"seed's 64 bits), got a {seed.dtype} tensor of shape {tuple(seed.shape)} on {seed.device}")
    return _perturb_impl(h, seed.reshape(1), sigma, kind)


def _perturb_bwd_impl(g: torch.Tensor) -> torch.Tensor:
    g = g.contiguous()
    b = g.shape[0] // 2
    out = torch.empty((b, *g.shape[1:]), dtype=g.dtype, device=g.device)
    n = out.numel()
    if n:
        block = _tile(g.device)
        _perturb_bwd_kernel[(triton.cdiv(n, block),)](g, out, n, BLOCK=block, num_warps=_warps(block))
    return out


# Small int64 tables the kernels read (pointer deltas, hidden sizes, layer indices), cached per
# (device, values): the values are the layer count, the shapes and, for the pointer deltas, the
# tensors' relative addresses, which repeat from step to step (the caching allocator, and always
# under a CUDA graph's static pool).  A hit costs no host-to-device copy, so a warmed-up step can be
# captured in a CUDA graph, where such copies are forbidden.  LRU-bounded: addresses do change.
_TABLES: "collections.OrderedDict[tuple, torch.Tensor]" = collections.OrderedDict()
_TABLES_MAX = 512
_TABLE_STATS = {"hits": 0, "misses": 0}


def table_cache_info() -> dict:
    """``{"hits", "misses", "size"}`` of the device-table cache (for tests and benchmarks)."""
    return {**_TABLE_STATS, "size": len(_TABLES)}


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _device_table(values, device: torch.device) -> torch.Tensor:
    """``torch.tensor(values, int64)`` on ``device``, from the cache when it was built before."""
    key = (device.type, device.index, tuple(values))
    table = _TABLES.get(key)
    if table is not None:
        _TABLES.move_to_end(key)
        _TABLE_STATS["hits"] += 1
        return table
    _TABLE_STATS["misses"] += 1
    if _capturing(device):
        # First seen during a capture (addresses of the graph's own pool): scalar fills can be
        # captured, a host-to-device copy cannot.  Not cached: the memory belongs to the graph.
        table = torch.empty(len(values), dtype=torch.int64, device=device)
        for j, v in enumerate(values):
            table[j].fill_(v)
        return table
    table = torch.tensor(list(values), dtype=torch.int64).to(device, non_blocking=True)
    _TABLES[key] = table
    if len(_TABLES) > _TABLES_MAX:
        _TABLES.popitem(last=False)
    return table


def _penalty_geometry(ys, device):
    m = math.prod(ys[0].shape[:-1]) // 2   # token rows per half, shared by all layers
    hmax = max(1, max(y.shape[-1] for y in ys))
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
    return _device_table(deltas, ts[0].device), div


def _group_args(sub):
    device = sub[0].device
    hids = [y.shape[-1] for y in sub]
    uniform = len(set(hids)) == 1
    return _device_table(hids, device), hids[0], uniform


def _groups(ys):
    # One launch per dtype (normally exactly one): a table's pointers share an element type.
    groups = {}
    for j, y in enumerate(ys):
        groups.setdefault(y.dtype, []).append(j)
    return list(groups.values())


def _check_penalty_args(ys, mask, weights):
    # The kernels assume layers that share the token dims of ys[0] (one row geometry for all).
    if not ys:
        raise ValueError("lnsr_triton::layer_penalty: ys is empty")
    first = ys[0]
    if first.dim() < 2 or first.shape[0] % 2:
        raise ValueError(f"lnsr_triton::layer_penalty: ys[0] must be [2B, ..., H], got {tuple(first.shape)}")
    for j, y in enumerate(ys):
        _check_dtype(y, f"ys[{j}]")
        if y.shape[:-1] != first.shape[:-1] or y.device != first.device:
            raise ValueError(f"lnsr_triton::layer_penalty: ys[{j}] has shape {tuple(y.shape)} on {y.device}, token "
                             f"dims differ from ys[0] {tuple(first.shape)} on {first.device}")
    if mask is not None and mask.numel() != math.prod(first.shape[:-1]) // 2:
        raise ValueError(f"lnsr_triton::layer_penalty: mask has {mask.numel()} entries for "
                         f"{math.prod(first.shape[:-1]) // 2} tokens")
    if weights.dim() != 1 or weights.numel() != len(ys):
        raise ValueError(f"lnsr_triton::layer_penalty: weights must be a 1-d tensor with one entry per tensor in "
                         f"ys, got shape {tuple(weights.shape)} for {len(ys)} tensors")


def _penalty_impl(ys: list[torch.Tensor], mask, weights: torch.Tensor, detach_clean: bool):
    del detach_clean  # backward only
    _check_penalty_args(ys, mask, weights)
    ys = [y.contiguous() for y in ys]
    device = ys[0].device
    m, block_h, rows, nrb = _penalty_geometry(ys, device)
    # Two allocations, not views of one: a custom op's outputs may not alias each other.
    loss = torch.zeros((), dtype=torch.float32, device=device)
    count = torch.zeros((), dtype=torch.float32, device=device)
    has_mask = mask is not None
    maskf = mask.to(device=device, dtype=torch.float32).contiguous() if has_mask else count
    if m == 0:
        return loss, count
    weights = weights.to(device=device, dtype=torch.float32).contiguous()
    partials = torch.empty(len(ys) * nrb, dtype=torch.float32, device=device)
    start = 0
    for idx in _groups(ys):
        sub = [ys[j] for j in idx]
        deltas, div = _deltas(sub)
        hid, h0, uniform = _group_args(sub)
        w = weights if len(idx) == len(ys) else weights[_device_table(idx, device)]
        _penalty_fwd_kernel[(len(sub) * nrb,)](sub[0], deltas, hid, h0, w, maskf, partials[start:], m, nrb,
                                               HAS_MASK=has_mask, ROWS=rows, BLOCK_H=block_h, DELTA_DIV=div,
                                               UNIFORM_H=uniform, num_warps=_warps(rows * block_h))
        start += len(sub) * nrb
    # Stage 2: a fixed-order sum of the partials (no atomics): bit-identical across runs.
    _penalty_final_kernel[(1,)](partials, partials.numel(), maskf, m, float(m), loss, count, HAS_MASK=has_mask,
                                BLOCK=1024, num_warps=4)
    return loss, count


def _penalty_bwd_impl(gout, count, ys, mask, weights, detach_clean):
    _check_penalty_args(ys, mask, weights)
    ys = [y.contiguous() for y in ys]
    device = ys[0].device
    grads = [torch.empty_like(y) for y in ys]
    m, block_h, rows, nrb = _penalty_geometry(ys, device)
    if m == 0:
        return [g.zero_() for g in grads]
    has_mask = mask is not None
    count = count.to(device=device, dtype=torch.float32).contiguous()
    maskf = mask.to(device=device, dtype=torch.float32).contiguous() if has_mask else count
    gout = gout.to(device=device, dtype=torch.float32).reshape(1).contiguous()
    weights = weights.to(device=device, dtype=torch.float32).contiguous()
    for idx in _groups(ys):
        sub, gsub = [ys[j] for j in idx], [grads[j] for j in idx]
        deltas, div = _deltas(sub)
        gdeltas, gdiv = _deltas(gsub)
        hid, h0, uniform = _group_args(sub)
        w = weights if len(idx) == len(ys) else weights[_device_table(idx, device)]
        _penalty_bwd_kernel[(len(sub) * nrb,)](sub[0], deltas, gsub[0], gdeltas, hid, h0, w, maskf, gout, count,
                                               m, nrb, HAS_MASK=has_mask, DETACH=bool(detach_clean), ROWS=rows,
                                               BLOCK_H=block_h, DELTA_DIV=min(div, gdiv), UNIFORM_H=uniform,
                                               num_warps=_warps(rows * block_h))
    return grads


def _tap_bwd_impl(grad: torch.Tensor | None, coef: torch.Tensor, y: torch.Tensor, first: int,
                  mask: torch.Tensor | None, detach_clean: bool) -> torch.Tensor:
    _check_dtype(y, "y")
    y = y.contiguous()
    hid = y.shape[-1]
    tokens = y.numel() // max(1, y.shape[0] * hid)  # token rows per batch row
    pairs = (y.shape[0] - first) // 2
    out = torch.empty_like(y)
    if first:  # rows without a noisy copy: the gradient from above only
        out[:first].zero_()
        if grad is not None:
            out[:min(first, grad.shape[0])].copy_(grad[:first])
    m_rows = pairs * tokens
    if m_rows and hid:
        g = grad.to(y.dtype).contiguous() if grad is not None else y  # y: a placeholder, never read
        msk = mask.to(device=y.device, dtype=torch.float32).contiguous() if mask is not None else y
        block_h = min(triton.next_power_of_2(hid), 4096)
        rows = max(1, min(triton.next_power_of_2(m_rows), _tile(y.device) // block_h))
        _tap_bwd_kernel[(triton.cdiv(m_rows, rows),)](
            y, g, out, msk, coef.to(device=y.device, dtype=torch.float32).reshape(()), first * tokens, m_rows,
            (grad.shape[0] if grad is not None else 0) * tokens, hid, HAS_MASK=mask is not None,
            HAS_GRAD=grad is not None, DETACH=bool(detach_clean), ROWS=rows, BLOCK_H=block_h,
            num_warps=_warps(rows * block_h))
    return out


# ---------------------------------------------------------------------------------------------
# torch.library ops: the schema of lnsr.ops.backend.OP_SCHEMAS (torch.compile and opcheck see
# these); fake implementations and autograd come from lnsr.ops.backend.register_op_extras
# ---------------------------------------------------------------------------------------------

def _op(name, fn):
    return torch.library.custom_op(f"lnsr_triton::{name}", fn, mutates_args=(), schema=OP_SCHEMAS[name])


noise_op = _op("noise", _noise_impl)
perturb_op = _op("perturb", _perturb_impl)
perturb_seeded_op = _op("perturb_seeded", _perturb_seeded_impl)
perturb_backward_op = _op("perturb_backward", _perturb_bwd_impl)
layer_penalty_op = _op("layer_penalty", _penalty_impl)
layer_penalty_backward_op = _op("layer_penalty_backward", _penalty_bwd_impl)
penalty_tap_backward_op = _op("penalty_tap_backward", _tap_bwd_impl)
register_op_extras("lnsr_triton")
