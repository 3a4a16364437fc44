"""Compile every Triton kernel variant of lnsr.kernels for a GPU target without a GPU (sm_90 by
default): catches code that the interpreter accepts but the compiler rejects, and reports how many
16-byte vector loads/stores the PTX has (the alignment hints at work).  Prints "ok" last.

    python -m lnsr.kernels.aot_check [--arch 90]

Run it in a process without TRITON_INTERPRET (the real compiler must define the kernels); tests
run it in a subprocess (tests/test_triton.py).
"""
import functools
import os
import sys
import time

VEC = {}


def comp(fn, sig, consts, div16=(), *, target):
    """Compile one variant of kernel ``fn`` for ``target``; print its PTX's load/store widths."""
    import triton
    from triton.compiler import ASTSource

    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in div16}
    sig = {**sig, **{k: "constexpr" for k in consts}}
    t = time.time()
    ptx = triton.compile(ASTSource(fn, sig, consts, attrs), target=target, options={"num_warps": 8}).asm["ptx"]
    VEC[(fn.__name__, tuple(sorted(consts.items())), sig.get("ref_ptr", sig.get("h_ptr")))] = ptx.count("ld.global.v4")
    print(fn.__name__, consts, f"{time.time() - t:.1f}s", "v4 loads:", ptx.count("ld.global.v4"),
          "v2:", ptx.count("ld.global.v2"), "scalar ld:", ptx.count("ld.global.b") + ptx.count("ld.global.u"),
          "st.v4:", ptx.count("st.global.v4"), "local:", ptx.count(".local"))
    return ptx


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("run without TRITON_INTERPRET=1: the compiler, not the interpreter, must define the kernels")
    from triton.backends.compiler import GPUTarget

    from lnsr.kernels import _triton as K

    arch = int(argv[argv.index("--arch") + 1]) if "--arch" in argv else 90
    comp_ = functools.partial(comp, target=GPUTarget("cuda", arch, 32))
    for dt in ["fp16", "fp32"]:
        comp_(K._flat_kernel, {"h_ptr": f"*{dt}", "out_ptr": f"*{dt}", "n": "i32", "seed": "i64", "sigma": "fp32"}, {"MODE": 1, "BLOCK": 4096, "SEED_PTR": False}, div16=["h_ptr","out_ptr","n"])
        comp_(K._relative_kernel, {"h_ptr": f"*{dt}", "out_ptr": f"*{dt}", "n": "i32", "M": "i32", "H": "i32", "seed": "i64", "sigma": "fp32"}, {"ROWS": 4, "BLOCK_H": 1024, "SINGLE": True, "ALIGNED": True, "SEED_PTR": False}, div16=["h_ptr","out_ptr","n","M","H"])
        comp_(K._relative_kernel, {"h_ptr": f"*{dt}", "out_ptr": f"*{dt}", "n": "i64", "M": "i32", "H": "i32", "seed": "i64", "sigma": "fp32"}, {"ROWS": 1, "BLOCK_H": 4096, "SINGLE": False, "ALIGNED": False, "SEED_PTR": False}, div16=["h_ptr","out_ptr"])
        comp_(K._perturb_bwd_kernel, {"g_ptr": f"*{dt}", "out_ptr": f"*{dt}", "n": "i32"}, {"BLOCK": 4096}, div16=["g_ptr","out_ptr","n"])
        comp_(K._penalty_fwd_kernel, {"ref_ptr": f"*{dt}", "delta_ptr": "*i64", "hid_ptr": "*i64", "H_arg": "i32", "w_ptr": "*fp32", "mask_ptr": "*fp32", "partial_ptr": "*fp32", "M": "i32", "n_row_blocks": "i32"}, {"HAS_MASK": True, "ROWS": 4, "BLOCK_H": 1024, "DELTA_DIV": 16, "UNIFORM_H": True}, div16=["ref_ptr","delta_ptr","hid_ptr","H_arg","w_ptr","mask_ptr","partial_ptr","M"])
        comp_(K._penalty_fwd_kernel, {"ref_ptr": f"*{dt}", "delta_ptr": "*i64", "hid_ptr": "*i64", "H_arg": "i32", "w_ptr": "*fp32", "mask_ptr": "*fp32", "partial_ptr": "*fp32", "M": "i32", "n_row_blocks": "i32"}, {"HAS_MASK": False, "ROWS": 4, "BLOCK_H": 1024, "DELTA_DIV": 1, "UNIFORM_H": False}, div16=["ref_ptr"])
        comp_(K._penalty_bwd_kernel, {"ref_ptr": f"*{dt}", "delta_ptr": "*i64", "gref_ptr": f"*{dt}", "gdelta_ptr": "*i64", "hid_ptr": "*i64", "H_arg": "i32", "w_ptr": "*fp32", "mask_ptr": "*fp32", "gout_ptr": "*fp32", "count_ptr": "*fp32", "M": "i32", "n_row_blocks": "i32"}, {"HAS_MASK": True, "DETACH": False, "ROWS": 4, "BLOCK_H": 1024, "DELTA_DIV": 16, "UNIFORM_H": True}, div16=["ref_ptr","gref_ptr","H_arg","M"])
    for has_mask in (True, False):
        comp_(K._penalty_final_kernel, {"partial_ptr": "*fp32", "n_partials": "i32", "mask_ptr": "*fp32", "M": "i32", "m_float": "fp32", "loss_ptr": "*fp32", "count_ptr": "*fp32"}, {"HAS_MASK": has_mask, "BLOCK": 1024})
    comp_(K._flat_kernel, {"h_ptr": "*fp32", "out_ptr": "*fp32", "n": "i32", "seed": "i64", "sigma": "fp32"}, {"MODE": 0, "BLOCK": 4096, "SEED_PTR": False}, div16=["out_ptr"])
    comp_(K._flat_kernel, {"h_ptr": "*bf16", "out_ptr": "*bf16", "n": "i32", "seed": "i64", "sigma": "fp32"}, {"MODE": 1, "BLOCK": 4096, "SEED_PTR": False}, div16=["h_ptr","out_ptr","n"])

    # the device-seed variants (lnsr_triton::perturb_seeded): the seed read through a pointer
    comp_(K._flat_kernel, {"h_ptr": "*bf16", "out_ptr": "*bf16", "n": "i32", "seed": "*i64", "sigma": "fp32"}, {"MODE": 1, "BLOCK": 4096, "SEED_PTR": True}, div16=["h_ptr","out_ptr","n"])
    comp_(K._relative_kernel, {"h_ptr": "*bf16", "out_ptr": "*bf16", "n": "i32", "M": "i32", "H": "i32", "seed": "*i64", "sigma": "fp32"}, {"ROWS": 4, "BLOCK_H": 1024, "SINGLE": True, "ALIGNED": True, "SEED_PTR": True}, div16=["h_ptr","out_ptr","n","M","H"])

    # The aligned penalty kernels must use 16-byte loads (element offsets + multiple_of hint).
    bad = [k for k, v in VEC.items() if k[0].startswith("_penalty_") and ("DELTA_DIV", 16) in k[1] and v == 0]
    if bad:
        raise SystemExit(f"no vector loads in {bad}")
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
