"""What is specific to the Triton backend (lnsr.kernels); the op contract it shares with every
backend is tested in test_backend_contract.py.

Here: the kernels' own paths (rows too wide for registers, the M = 1 / H = 1 constexprs), the
torch.library ops (opcheck), dispatch and the interpreter's rules, compiling for a GPU without one.
On CPU the kernels run under TRITON_INTERPRET=1 (set before anything defines a kernel); tests
marked ``gpu`` need CUDA and cover large shapes and the int64-indexing path.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

triton = pytest.importorskip("triton")

import lnsr  # noqa: E402
from lnsr import kernels  # noqa: E402
from lnsr.ops import dispatch, reference  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
BE = kernels.backend()
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=1e-5),
       torch.bfloat16: dict(rtol=1.6e-2, atol=1e-5)}


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _mask(shape, seed, *, zero_row=True):
    m = (torch.rand(shape, generator=_gen(seed)) > 0.3).long()
    if zero_row and shape[0] > 1:
        m[0] = 0  # a sequence that is all padding
    return m.to(DEV)


# ------------------------------------------------------------------------------------- kernel paths

@pytest.mark.parametrize("hid", [16388, 16391])  # rows too wide for registers: the two-pass path
def test_perturb_relative_wide_rows(hid):
    h = torch.randn(2, hid, generator=_gen(hid)).to(DEV)
    out = BE.perturb(h, 99, sigma=0.05, kind="relative", mask=None, n_anchors=64)
    torch.testing.assert_close(out, reference.perturb(h, 99, sigma=0.05, kind="relative"), rtol=1e-5, atol=1e-5)


def _ys(n_layers, shape, dtype, seed, hids=None):
    g = _gen(seed)
    hids = hids or [shape[-1]] * n_layers
    return [torch.randn((*shape[:-1], hd), generator=g).to(DEV, dtype).requires_grad_(True) for hd in hids]


@pytest.mark.parametrize("hid", [1, 4])
def test_layer_penalty_single_token(hid):  # M = 1 and H = 1 become constexprs inside Triton
    ys = _ys(2, (2, 1, hid), torch.float32, 5)
    for mask in (None, torch.ones(1, 1, device=DEV)):
        out, ref = BE.layer_penalty(ys, mask=mask), reference.layer_penalty(ys, mask=mask)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        for a, b in zip(torch.autograd.grad(out, ys), torch.autograd.grad(ref, ys)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------- host tables (CUDA-graph safe calls)

def test_host_tables_are_cached_between_calls():
    """The second call with the same layers builds no table on the host (no host-to-device copy):
    the pointer deltas, hidden sizes, layer indices and float weights come from the caches.  Other
    tensors of the same shapes (other addresses) still get their own, correct tables."""
    from lnsr.kernels import _triton as impl
    from lnsr.ops import backend as B

    hids = [16, 16, 8, 16]
    ys = _ys(4, (4, 6, 16), torch.float32, 11, hids=hids)
    ys[2] = ys[2].detach().to(torch.bfloat16).requires_grad_()  # two dtype groups: a layer-index table too
    mask = _mask((2, 6), 12)
    weights = [1.0, 0.5, 2.0, 0.25]

    with torch.no_grad():  # the forward: tables of the inputs only
        first = BE.layer_penalty(ys, mask=mask, weights=weights)
        before, w_before = impl.table_cache_info(), B.weights_tensor(weights, 4, DEV)
        second = BE.layer_penalty(ys, mask=mask, weights=weights)
        after = impl.table_cache_info()
    assert after["misses"] == before["misses"], (before, after)
    assert after["hits"] >= before["hits"] + 5  # per dtype group: deltas and hids; one index table
    assert B.weights_tensor(weights, 4, DEV) is w_before
    assert torch.equal(first, second)

    # forward + backward as in a training loop (each step's gradients freed before the next): the
    # backward's table of gradient addresses is a hit whenever the allocator hands out the same memory
    seen, misses = [], []
    for _ in range(5):
        loss = BE.layer_penalty(ys, mask=mask, weights=weights)
        grads = torch.autograd.grad(loss, ys)
        seen.append(tuple(g.data_ptr() for g in grads))
        misses.append(impl.table_cache_info()["misses"])
        del loss, grads
    if len(set(seen[1:])) == 1:
        assert misses[-1] == misses[1], misses

    others = [y.detach().clone().mul_(1.5).requires_grad_() for y in ys]  # same shapes, other memory
    out = BE.layer_penalty(others, mask=mask, weights=weights)
    ref = reference.layer_penalty(others, mask=mask, weights=weights)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(torch.autograd.grad(out, others), torch.autograd.grad(ref, others)):
        torch.testing.assert_close(a, b, rtol=1.6e-2, atol=1e-5)


@pytest.mark.gpu
def test_cuda_graph_capture_of_penalty_forward_and_backward():
    """After one eager call, the ops' forward and backward are captured in a CUDA graph (no
    host-to-device copy inside) and its replays follow new values of the static inputs."""
    ops = torch.ops.lnsr_triton
    ys = [torch.randn(8, 32, 64, device="cuda") for _ in range(3)]
    mask = _mask((4, 32), 3).to("cuda")
    w = torch.tensor([1.0, 0.5, 2.0], device="cuda")
    one = torch.ones((), device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up: compiles the kernels, fills the table caches
        loss, count = ops.layer_penalty(ys, mask, w, False)
        ops.layer_penalty_backward(one, count, ys, mask, w, False)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss, count = ops.layer_penalty(ys, mask, w, False)
        grads = ops.layer_penalty_backward(one, count, ys, mask, w, False)
    for step in range(3):
        for y in ys:
            y.normal_()
        graph.replay()
        torch.cuda.synchronize()
        xs = [y.clone().requires_grad_() for y in ys]
        ref = reference.layer_penalty(xs, mask=mask, weights=[1.0, 0.5, 2.0])
        torch.testing.assert_close(loss, ref.detach(), rtol=1e-5, atol=1e-6)
        for a, b in zip(grads, torch.autograd.grad(ref, xs)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
def test_reduce_overhead_compile_captures_the_penalty():
    """torch.compile(mode="reduce-overhead") runs the Triton penalty inside CUDA graphs (no
    cudagraph skip), forward and backward equal to eager over several steps."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    ys = [torch.randn(8, 32, 64, device="cuda", requires_grad=True) for _ in range(3)]
    mask = _mask((4, 32), 4).to("cuda")

    def penalty(a, b, c):
        return BE.layer_penalty([a, b, c], mask=mask, weights=[1.0, 0.5, 2.0])

    fn = torch.compile(penalty, mode="reduce-overhead", fullgraph=True)
    for step in range(4):
        with torch.no_grad():
            for y in ys:
                y.normal_()
        loss = fn(*ys)
        grads = torch.autograd.grad(loss, ys)
        xs = [y.detach().clone().requires_grad_() for y in ys]
        ref = penalty(*xs)
        torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
        for a, b in zip(grads, torch.autograd.grad(ref, xs)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])


# ------------------------------------------------------------------------------------- torch.library

def test_ops_registered_and_opcheck():
    from lnsr.kernels import _triton as impl

    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    h = torch.randn(2, 3, 8, device=DEV, requires_grad=True)
    for kind in ("gaussian", "relative"):
        torch.library.opcheck(impl.perturb_op, (h, -7, 0.1, kind), test_utils=utils)
    ys = [torch.randn(4, 3, 8, device=DEV, requires_grad=True) for _ in range(2)]
    w = torch.tensor([1.0, 0.5], device=DEV)
    torch.library.opcheck(impl.layer_penalty_op, (ys, None, w, False), test_utils=utils)
    torch.library.opcheck(impl.layer_penalty_op, (ys, torch.ones(2, 3, device=DEV), w, True), test_utils=utils)
    torch.library.opcheck(impl.noise_op, (10, 5, torch.device(DEV)), test_utils=("test_schema", "test_faketensor"))
    # the streaming penalty's per-layer backward (no autograd of its own: it is a backward)
    y, g, c = torch.randn(5, 3, 8, device=DEV), torch.randn(3, 3, 8, device=DEV), torch.tensor(0.3, device=DEV)
    for args in ((g, c, y, 1, torch.ones(2, 3, device=DEV), False), (None, c, y, 1, None, True)):
        torch.library.opcheck(impl.penalty_tap_backward_op, args, test_utils=("test_schema", "test_faketensor"))


def test_ops_reject_what_they_cannot_compute():
    with pytest.raises(ValueError, match="kind must be"):
        torch.ops.lnsr_triton.perturb(torch.zeros(2, 3, device=DEV), 0, 0.1, "manifold")
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        torch.ops.lnsr_triton.perturb(torch.zeros(2, 3, dtype=torch.float64, device=DEV), 0, 0.1, "gaussian")
    y = torch.zeros(4, 3, device=DEV)
    with pytest.raises(ValueError, match="mask"):
        torch.ops.lnsr_triton.layer_penalty([y], torch.ones(5, device=DEV), torch.ones(1, device=DEV), False)
    with pytest.raises(ValueError, match="weights"):
        torch.ops.lnsr_triton.layer_penalty([y], None, torch.ones(2, device=DEV), False)
    with pytest.raises(ValueError, match="token dims"):  # the kernels share one row geometry
        torch.ops.lnsr_triton.layer_penalty([y, torch.zeros(2, 3, device=DEV)], None, torch.ones(2, device=DEV), False)


# ------------------------------------------------------------------------------------- dispatch

def test_lnsr_backend_env_overrides_auto(monkeypatch):
    monkeypatch.setenv("LNSR_BACKEND", "triton")
    assert dispatch.resolve_backend("auto", DEV).name == "triton"
    h = torch.randn(2, 3, 8, device=DEV)
    torch.testing.assert_close(lnsr.ops.perturb(h, 3, sigma=0.1), reference.perturb(h, 3, sigma=0.1))
    monkeypatch.setenv("LNSR_BACKEND", "torch")
    assert dispatch.resolve_backend("auto", DEV).name == "torch"


def test_unavailable_explicit_backend_raises(monkeypatch):
    def missing():
        raise ImportError("No module named 'triton'")

    original = dispatch._LOADERS["triton"]  # lnsr/ops/backends/triton.py's loader
    dispatch.register_loader("triton", missing)
    try:
        with pytest.raises(RuntimeError, match="pip install triton"):
            dispatch.resolve_backend("triton", DEV)
        monkeypatch.setenv("LNSR_BACKEND", "triton")
        with pytest.raises(RuntimeError, match="triton"):
            lnsr.ops.perturb(torch.randn(2, 3, device=DEV), 1, sigma=0.1)
        monkeypatch.delenv("LNSR_BACKEND")
        assert dispatch.resolve_backend("auto", DEV).name != "triton"  # auto skips what is missing
    finally:
        dispatch.register_loader("triton", original)
    assert dispatch.resolve_backend("triton", DEV).name == "triton"


def test_triton_older_than_the_pin_is_refused(monkeypatch):
    """Below triton 3.4 tl.randn4x draws another stream past 2**32 counters: the backend does not
    load (auto then skips it) and the reason names the version to install."""
    assert kernels.backend().name == "triton"  # the installed one is at or above the pin
    monkeypatch.setattr(triton, "__version__", "3.3.1")
    with pytest.raises(ImportError, match=r"triton 3\.3\.1 is too old.*triton>=3\.4"):
        kernels.backend()
    monkeypatch.setattr(triton, "__version__", "3.4.0+git1234")
    assert kernels.backend().name == "triton"


def test_cpu_without_interpreter_is_unsupported(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not BE.supports(torch.device("cpu"))


# ------------------------------------------------------------------------------------- GPU only

gpu = pytest.mark.gpu


@gpu
@pytest.mark.parametrize("kind", reference.NOISE_KINDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_perturb_large(kind, dtype):
    h = torch.randn(8, 2048, 4096, device="cuda", dtype=dtype, requires_grad=True)
    mask = _mask((8, 2048), 1)
    kw = dict(sigma=0.05, kind=kind, mask=mask, n_anchors=64)
    out, ref = BE.perturb(h, 2**63 + 11, **kw), reference.perturb(h, 2**63 + 11, **kw)
    torch.testing.assert_close(out, ref, **TOL[dtype])
    g = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, h, g)[0], torch.autograd.grad(ref, h, g)[0], **TOL[dtype])


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_layer_penalty_large(dtype):
    ys = [torch.randn(16, 2048, 1024, device="cuda", dtype=dtype, requires_grad=True) for _ in range(12)]
    mask = _mask((8, 2048), 2)
    kw = dict(mask=mask, weights=[0.5 + j for j in range(12)], detach_clean=False)
    out, ref = BE.layer_penalty(ys, **kw), reference.layer_penalty(ys, **kw)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-6)
    for a, b in zip(torch.autograd.grad(out, ys), torch.autograd.grad(ref, ys)):
        torch.testing.assert_close(a, b, **TOL[dtype])
    again = BE.layer_penalty(ys, **kw)
    assert torch.equal(out, again)


def _reference_noise_range(seed, start, stop, device):
    """z[start:stop] of the reference stream (start % 4 == 0) without materialising z[0:start]."""
    counter = torch.arange(start // 4, (stop + 3) // 4, dtype=torch.int64, device=device)
    i1, i2, i3, i4 = reference.philox4x32(seed, counter)
    n1, n2 = reference._box_muller(reference._uniform(i1), reference._uniform(i2))
    n3, n4 = reference._box_muller(reference._uniform(i3), reference._uniform(i4))
    return torch.stack([n1, n2, n3, n4], dim=-1).reshape(-1)[: stop - start]


@gpu
def test_gpu_int64_indexing():
    free, _ = torch.cuda.mem_get_info()
    if free < 24 * 2**30:
        pytest.skip("needs 24 GiB of free GPU memory")
    hid = 4096
    rows = 2**31 // hid + 3  # numel >= 2**31: offsets past int32
    h = torch.zeros(1, rows, hid, device="cuda", dtype=torch.float16)
    n = h.numel()
    for kind in ("gaussian", "relative"):
        if kind == "relative":
            h[0, -1] = 1.0  # rms 1 on the last row
        out = BE.perturb(h, 77, sigma=0.5, kind=kind, mask=None, n_anchors=64)
        z = _reference_noise_range(77, n - hid, n, "cuda")
        want = (h[0, -1].float() + 0.5 * z).half()
        torch.testing.assert_close(out[1, -1], want, rtol=2e-3, atol=1e-3)
        del out
    # layer_penalty: y of 2*numel with a known answer at the far end.
    y = torch.zeros(2, rows, hid, device="cuda", dtype=torch.float16, requires_grad=True)
    with torch.no_grad():
        y[1, -1] = 2.0  # the noisy copy of the last token moves by 2 in every coordinate
    out = BE.layer_penalty([y], mask=None, weights=[1.0])
    torch.testing.assert_close(out, torch.tensor(4.0 * hid / rows, device="cuda"), rtol=1e-4, atol=0)
    (g,) = torch.autograd.grad(out, [y])
    assert torch.count_nonzero(g[:, :-1]) == 0
    torch.testing.assert_close(g[1, -1].float(), torch.full((hid,), 4.0 / rows, device="cuda"), rtol=2e-3, atol=0)


def test_kernels_compile_for_sm90_without_a_gpu():
    """The interpreter accepts code the compiler rejects: compile every variant for sm_90 (ptxas)."""
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia.compiler")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-m", "lnsr.kernels.aot_check"], env=env, capture_output=True, text=True,
                         timeout=300)
    if res.returncode and "ptxas" in res.stderr and "not found" in res.stderr:
        pytest.skip("no ptxas in this Triton install")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert res.stdout.strip().endswith("ok")
