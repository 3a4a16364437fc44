"""README.md and docs/results.md say what the run files say: the answer table is regenerated from the
committed run records and compared, README stays a five-minute read, and no committed run record
holds an absolute path of the machine that made it."""
from __future__ import annotations

import glob
import importlib.util
import json
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def _study():
    spec = importlib.util.spec_from_file_location("study", os.path.join(ROOT, "bench", "study", "study.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _block(path, begin, end):
    text = open(path).read()
    assert begin in text and end in text, f"{path} lacks {begin}"
    return text.split(begin, 1)[1].split(end, 1)[0].strip()


@pytest.mark.parametrize("doc", ["README.md", "docs/results.md"])
def test_answer_table_is_regenerated_from_the_run_files(doc):
    study = _study()
    table = study.answer_table(os.path.join(ROOT, "docs", "runs", "study"))
    assert table.count("\n") >= 3, "the committed run files give no complete regime"
    assert _block(os.path.join(ROOT, doc), *study.ANSWER) == table.strip(), (
        f"{doc}'s answer table differs from the run files: run `bench/study/study.sh summary`")


def test_readme_is_a_five_minute_read():
    lines = open(os.path.join(ROOT, "README.md")).read().splitlines()
    assert len(lines) <= 220, f"README.md has {len(lines)} lines: move detail to docs/guide.md"


def test_run_records_hold_no_machine_paths():
    """Committed records hold paths as the user typed them and packaged models by short name, never
    the absolute paths of the machine that made them (bench/tools/relative_paths.py rewrote the old)."""
    needles = ("/work/", "/root/", "/home/", "/tmp/", os.path.expanduser("~") + "/")
    bad = []
    for path in glob.glob(os.path.join(ROOT, "docs", "runs", "**", "*"), recursive=True):
        if not path.endswith((".json", ".csv", ".md", ".txt")) or not os.path.isfile(path):
            continue
        text = open(path, encoding="utf-8").read()
        bad += [(os.path.relpath(path, ROOT), n) for n in needles if n in text]
    assert not bad, f"{len(bad)} records with machine paths, e.g. {bad[:3]}: run bench/tools/relative_paths.py"
