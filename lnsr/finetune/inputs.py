"""What a run reads, by content: the sha256 of each data file and of the model's files.

A run's config names its files by path; the same path can hold other data later (a dev file cut
to 50 rows, a replaced train.csv, re-fetched weights). The hashes go into the run's config
(``config["inputs"]``), so that a finished run is reused only when what it read is unchanged.

Hashes are cached per ``(path, size, mtime_ns)`` for the life of the process: one ``lnsr finetune``
hashes a 438 MB model once (1-2 s), not once per run.
"""
from __future__ import annotations

import fnmatch
import hashlib
import os

# the files of a Hugging Face model folder that decide a run's result: the architecture, the weights
# (also sharded ones) and the tokenizer; README, .git, training_args.json etc. do not
MODEL_PATTERNS = ("config.json", "*.safetensors", "*.bin", "tokenizer.json", "tokenizer_config.json",
                  "special_tokens_map.json", "vocab.txt", "vocab.json", "merges.txt", "*.model")

_CACHE: dict[tuple, str] = {}


def _digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return "sha256:" + h.hexdigest()


def file_sha256(path: str) -> str:
    """``sha256:<hex>`` of the file's bytes, computed once per (path, size, mtime_ns)."""
    real = os.path.realpath(path)
    st = os.stat(real)
    key = (real, st.st_size, st.st_mtime_ns)
    if key not in _CACHE:
        _CACHE[key] = _digest(real)
    return _CACHE[key]


def model_files(folder: str) -> list[str]:
    """The files of a local model folder that :data:`MODEL_PATTERNS` names, sorted by name."""
    names = sorted(n for n in os.listdir(folder) if os.path.isfile(os.path.join(folder, n))
                   and any(fnmatch.fnmatch(n, p) for p in MODEL_PATTERNS))
    return [os.path.join(folder, n) for n in names]


def model_sha256(folder: str) -> str | None:
    """One ``sha256:`` over the model folder's files (each file's name and hash); None for anything
    that is not a local folder (a hub name: its files are not known before it is loaded)."""
    if not os.path.isdir(folder):
        return None
    files = model_files(folder)
    if not files:
        return None
    h = hashlib.sha256()
    for path in files:
        h.update(f"{os.path.basename(path)}\0{file_sha256(path)}\n".encode())
    return "sha256:" + h.hexdigest()


def input_hashes(files: dict, model_folder: str | None) -> dict:
    """``{name: "sha256:..."}`` of every data file read (``files``: name -> path) and, as ``model``,
    of the local model folder."""
    out = {name: file_sha256(path) for name, path in files.items()}
    digest = model_sha256(model_folder) if model_folder else None
    if digest:
        out["model"] = digest
    return out
