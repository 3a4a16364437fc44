"""GLUE tasks: their files, columns, labels and metrics; readers for a local GLUE-format folder
(the original TSV layout of GLUE's ``download_glue_data.py``) and for the Hugging Face hub.

An example is ``(text_a, text_b_or_None, label)``; labels are ints (classification) or floats
(STS-B regression), numbered as the hub's ``glue`` dataset numbers them, so that a model trained on
one source evaluates on the other.
"""
from __future__ import annotations

import csv
import os
import random
import sys
from dataclasses import dataclass

csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # QQP/MNLI have long fields


@dataclass(frozen=True)
class TaskSpec:
    name: str
    folder: str                 # folder name in the GLUE download
    text_a: str                 # column names in the TSV (or positions for header-less CoLA)
    text_b: str | None
    label: str
    labels: tuple | None        # label strings in id order; None for regression
    metrics: tuple              # metric names, the first is the main one
    dev_file: str = "dev.tsv"
    header: bool = True
    n_columns: int | None = None   # header-less files: the number of fields per row
    hub_a: str = ""             # column names in the hub dataset
    hub_b: str | None = None
    hub_dev: str = "validation"

    @property
    def num_labels(self) -> int:
        return 1 if self.labels is None else len(self.labels)

    @property
    def is_regression(self) -> bool:
        return self.labels is None


TASKS = {
    # CoLA's train/dev files have no header: source, label, original label, sentence.
    "cola": TaskSpec("cola", "CoLA", "3", None, "1", ("0", "1"), ("mcc", "accuracy"), header=False, n_columns=4,
                     hub_a="sentence"),
    "sst2": TaskSpec("sst2", "SST-2", "sentence", None, "label", ("0", "1"), ("accuracy",), hub_a="sentence"),
    "mrpc": TaskSpec("mrpc", "MRPC", "#1 String", "#2 String", "Quality", ("0", "1"), ("f1", "accuracy"),
                     hub_a="sentence1", hub_b="sentence2"),
    "qqp": TaskSpec("qqp", "QQP", "question1", "question2", "is_duplicate", ("0", "1"), ("f1", "accuracy"),
                    hub_a="question1", hub_b="question2"),
    "stsb": TaskSpec("stsb", "STS-B", "sentence1", "sentence2", "score", None, ("pearson", "spearman"),
                     hub_a="sentence1", hub_b="sentence2"),
    "mnli": TaskSpec("mnli", "MNLI", "sentence1", "sentence2", "gold_label", ("entailment", "neutral", "contradiction"),
                     ("accuracy",), dev_file="dev_matched.tsv", hub_a="premise", hub_b="hypothesis",
                     hub_dev="validation_matched"),
    "qnli": TaskSpec("qnli", "QNLI", "question", "sentence", "label", ("entailment", "not_entailment"), ("accuracy",),
                     hub_a="question", hub_b="sentence"),
    "rte": TaskSpec("rte", "RTE", "sentence1", "sentence2", "label", ("entailment", "not_entailment"), ("accuracy",),
                    hub_a="sentence1", hub_b="sentence2"),
    "wnli": TaskSpec("wnli", "WNLI", "sentence1", "sentence2", "label", ("0", "1"), ("accuracy",),
                     hub_a="sentence1", hub_b="sentence2"),
}
ALIASES = {"sst-2": "sst2", "sts-b": "stsb", "mnli-m": "mnli", "mnli_matched": "mnli"}


def get_task(name: str) -> TaskSpec:
    key = ALIASES.get(name.lower(), name.lower())
    if key not in TASKS:
        raise SystemExit(f"unknown task {name!r}: choose one of {', '.join(TASKS)}")
    return TASKS[key]


def find_task_dir(spec: TaskSpec, data_dir: str) -> str:
    """``data_dir`` may be the GLUE root (holding ``MRPC/``) or the task's folder itself."""
    if not os.path.isdir(data_dir):
        raise SystemExit(f"--data-dir {data_dir!r} does not exist: pass a GLUE-format folder (the GLUE root holding "
                         f"{spec.folder}/, or {spec.folder}/ itself, with train.tsv and {spec.dev_file})")
    for cand in (os.path.join(data_dir, spec.folder), os.path.join(data_dir, spec.name), data_dir):
        if os.path.isfile(os.path.join(cand, "train.tsv")):
            # recorded in each run's config as typed (normalised), so records hold no machine's absolute path
            return os.path.normpath(cand)
    raise SystemExit(f"no train.tsv for {spec.name} under {data_dir!r}: expected {os.path.join(data_dir, spec.folder)}"
                     f"/train.tsv or {os.path.join(data_dir, 'train.tsv')} (original GLUE TSV layout); "
                     f"point --data-dir at the GLUE root or at the {spec.folder} folder")


def _parse_label(spec: TaskSpec, raw: str, where: str):
    raw = raw.strip()
    if spec.is_regression:
        try:
            return float(raw)
        except ValueError:
            raise SystemExit(f"{where}: label {raw!r} of {spec.name} is not a number") from None
    if raw in spec.labels:
        return spec.labels.index(raw)
    raise SystemExit(f"{where}: label {raw!r} is not one of {spec.name}'s labels {list(spec.labels)}; is this the "
                     f"right task / file?")


def read_tsv(spec: TaskSpec, path: str) -> list[tuple]:
    """Examples of one GLUE TSV file; a wrong column layout raises SystemExit naming the columns."""
    if not os.path.isfile(path):
        raise SystemExit(f"{path} not found: a GLUE-format {spec.folder} folder needs train.tsv and {spec.dev_file}")
    # utf-8-sig: the GLUE-built MRPC files start with a BOM; quoting off: sentences contain quotes.
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    if not rows:
        raise SystemExit(f"{path} is empty")
    if spec.header:
        head = [h.strip() for h in rows[0]]
        need = [c for c in (spec.text_a, spec.text_b, spec.label) if c is not None]
        missing = [c for c in need if c not in head]
        if missing:
            raise SystemExit(f"{path}: wrong column layout for {spec.name}: missing column(s) {missing}; the header "
                             f"has {head}, GLUE's {spec.folder} files need {need} (tab-separated, original GLUE "
                             f"layout; is --task right?)")
        ia, il = head.index(spec.text_a), head.index(spec.label)
        ib = head.index(spec.text_b) if spec.text_b else None
        body, first_line = rows[1:], 2
    else:
        ia, il, ib = int(spec.text_a), int(spec.label), None
        if len(rows[0]) != spec.n_columns:
            raise SystemExit(f"{path}: wrong column layout for {spec.name}: expected {spec.n_columns} tab-separated "
                             f"fields without a header (source, label, original label, sentence), got "
                             f"{len(rows[0])}: {rows[0][:4]}")
        body, first_line = rows, 1
    need_n = max(i for i in (ia, ib, il) if i is not None) + 1
    out, skipped = [], 0
    for n, r in enumerate(body, first_line):
        if len(r) < need_n:
            skipped += 1  # a few GLUE rows (QQP) are truncated; the GLUE processors skip them too
            continue
        label = _parse_label(spec, r[il], f"{path}:{n}")
        out.append((r[ia].strip(), None if ib is None else r[ib].strip(), label))
    if skipped > max(10, len(body) // 100):
        raise SystemExit(f"{path}: {skipped} of {len(body)} rows have fewer than {need_n} fields: wrong column layout "
                         f"or not tab-separated with quoting off")
    if not out:
        raise SystemExit(f"{path} holds no examples")
    return out


def read_eval_file(spec: TaskSpec, path: str, encoding: str = "utf-8") -> list[tuple]:
    """An extra evaluation set of a GLUE task (``--eval-file NAME=PATH``): its extension decides the
    format, as for ``--train-file`` — a .tsv is GLUE's own layout, a .csv/.json/.jsonl file is read
    as a table whose columns have GLUE's names (header-less CoLA: ``sentence`` and ``label``)."""
    from .files import file_format, read_table

    if file_format(path) == "tsv":
        return read_tsv(spec, path)
    table = read_table(path, encoding)
    text_a, text_b, label = ((spec.text_a, spec.text_b, spec.label) if spec.header
                             else ("sentence", None, "label"))
    need = [c for c in (text_a, text_b, label) if c is not None]
    missing = [c for c in need if c not in table.columns]
    if missing:
        raise SystemExit(f"{path}: missing column(s) {missing} for {spec.name}; the file has {table.columns} "
                         f"(an --eval-file of a GLUE task needs the columns {need})")
    out = []
    for i, row in enumerate(table.rows):
        out.append((str(row[text_a]).strip(), None if text_b is None else str(row[text_b]).strip(),
                    _parse_label(spec, str(row[label]), table.where(i))))
    if not out:
        raise SystemExit(f"{path} holds no examples")
    return out


def load_local(spec: TaskSpec, data_dir: str, dev: bool = True) -> tuple[list, list, str]:
    d = find_task_dir(spec, data_dir)
    return (read_tsv(spec, os.path.join(d, "train.tsv")),
            read_tsv(spec, os.path.join(d, spec.dev_file)) if dev else [], d)


def load_hub(spec: TaskSpec) -> tuple[list, list, str]:
    try:
        import datasets
    except ImportError:
        raise SystemExit("loading GLUE from the hub needs the `datasets` package: `pip install datasets` "
                         "(or lnsr[finetune]), or pass --data-dir with a local GLUE-format folder") from None
    try:
        ds = datasets.load_dataset("nyu-mll/glue", spec.name)
    except Exception as exc:  # offline, no such config, hub error: all mean the same to the user
        raise SystemExit(f"could not load GLUE {spec.name} from the Hugging Face hub ({type(exc).__name__}: {exc}); "
                         f"offline? pass --data-dir with a local GLUE-format folder") from None

    def conv(split):
        return [(r[spec.hub_a], r[spec.hub_b] if spec.hub_b else None,
                 float(r["label"]) if spec.is_regression else int(r["label"])) for r in ds[split]]

    return conv("train"), conv(spec.hub_dev), "hub:nyu-mll/glue"


def load_task(spec: TaskSpec, data_dir: str | None, dev: bool = True):
    """``(train, dev, source)``: from ``data_dir`` when given, else from the hub; ``dev=False`` leaves
    the dev file unread (choosing hyper-parameters on held-out training data)."""
    return load_local(spec, data_dir, dev) if data_dir else load_hub(spec)


def split_holdout(train: list, frac: float, seed: int = 0) -> tuple[list, list]:
    """A fixed random ``frac`` of the training split, held out (for choosing hyper-parameters off dev)."""
    if not 0 < frac < 1:
        raise SystemExit(f"--holdout must be in (0, 1), got {frac}")
    idx = list(range(len(train)))
    random.Random(seed).shuffle(idx)
    n = max(1, int(round(frac * len(train))))
    held = set(idx[:n])
    return [ex for i, ex in enumerate(train) if i not in held], [train[i] for i in sorted(held)]
