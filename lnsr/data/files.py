"""A user's own data: CSV, TSV, JSON or JSON Lines files read through ``datasets``.

``--train-file`` (and ``--validation-file``, ``--test-file``, ``--eval-file NAME=PATH``) become a
:class:`~lnsr.data.glue.TaskSpec` plus examples ``(text_a, text_b_or_None, label)``, the shape
the GLUE readers give, so the runner does not know where its data came from.

Columns are guessed the way Hugging Face's ``run_glue.py`` does (``sentence1``/``sentence2``,
else the first one or two non-label string columns; the label column ``label``). Integer, boolean
and string labels make a classification task, their values mapped to ids in sorted order (saved as
the model's ``id2label``); float labels make a regression task. Every bad file gives a clear error
before any training, in one line naming the file and the line (or byte offset). Files are UTF-8
unless ``encoding`` says otherwise; a UTF-16/32 byte-order mark is honoured.
"""
from __future__ import annotations

import codecs
import csv
import json
import math
import os
import re
from dataclasses import dataclass, field

from .glue import TaskSpec

FORMATS = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".json": "json", ".jsonl": "json", ".ndjson": "json"}
CLASSIFICATION_METRICS = ("accuracy", "f1_macro")
REGRESSION_METRICS = ("pearson", "spearman")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
DEFAULT_ENCODING = "utf-8"
# UTF-32 before UTF-16: the UTF-32 LE mark FF FE 00 00 starts with the UTF-16 LE one
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))
_ENCODING_FIX = ("pass the file's encoding with --encoding (e.g. --encoding latin-1 or cp1252 for Western "
                 "European text, --encoding utf-16), or re-save the file as UTF-8")


def check_encoding(encoding: str) -> str:
    """Python's name of ``encoding``; a SystemExit for a name Python does not know."""
    try:
        return codecs.lookup(encoding).name
    except (LookupError, TypeError):
        raise SystemExit(f"--encoding {encoding!r}: unknown encoding; use a Python codec name such as utf-8, "
                         f"latin-1, cp1252 or utf-16") from None


def _binary(path: str, at: int | None, line: int | None) -> SystemExit:
    where = f"{path}:{line}" if line is not None else path
    offset = f" at byte offset {at}" if at is not None else ""
    return SystemExit(f"{where}: NUL byte{offset}: this is not a text file (a spreadsheet, archive or "
                      f"other binary file? save it as .csv/.tsv/.json/.jsonl text); UTF-16 text without a "
                      f"byte-order mark? pass --encoding utf-16")


def decode_file(path: str, encoding: str = DEFAULT_ENCODING) -> tuple[str, str]:
    """The text of a data file and the codec that read it: ``encoding``, except that UTF-8 (the
    default) gives way to a UTF-16/32 byte-order mark and skips a UTF-8 one. Undecodable bytes and
    binary content are a one-line SystemExit naming the file, the line and the byte offset."""
    codec = check_encoding(encoding)
    with open(path, "rb") as f:
        data = f.read()
    if codec == "utf-8":
        codec = next((name for bom, name in _BOMS if data.startswith(bom)), "utf-8-sig")
    # line numbers by counting b"\n" hold only where "\n" is that byte (ASCII-compatible codecs, not
    # UTF-16/32 or EBCDIC); utf-8-sig would prefix a BOM to the probe
    lines = "a\n".encode("utf-8" if codec == "utf-8-sig" else codec) == b"a\n"

    def line_of(offset):
        return data[:offset].count(b"\n") + 1 if lines else None

    try:
        text = data.decode(codec)
    except UnicodeDecodeError as exc:
        nul = data.find(b"\x00")
        if nul >= 0 and lines:  # NUL bytes in an ASCII-compatible codec: binary, not mis-encoded text
            raise _binary(path, nul, line_of(nul)) from None
        line = line_of(exc.start)
        where = f"{path}:{line}" if line is not None else path
        bad = data[exc.start:exc.start + 1].hex()
        raise SystemExit(f"{where}: not valid {encoding} text (byte 0x{bad} at byte offset {exc.start}); "
                         f"{_ENCODING_FIX}") from None
    nul = text.find("\x00")
    if nul >= 0:  # in an ASCII-compatible codec the byte 0x00 is only ever U+0000
        raise _binary(path, data.find(b"\x00") if lines else None, text[:nul].count("\n") + 1)
    return text, codec


def file_format(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    if ext not in FORMATS:
        raise SystemExit(f"{path}: unknown file type {ext or '(no extension)'!r}: use .csv, .tsv, .json or .jsonl "
                         f"(JSON Lines: one object per line)")
    return FORMATS[ext]


@dataclass
class Table:
    path: str
    columns: list
    rows: list                       # dicts
    string_columns: set = field(default_factory=set)
    first_line: int = 2              # file line of rows[0] (CSV/TSV with a header: 2; JSON Lines: 1)
    encoding: str = DEFAULT_ENCODING

    def where(self, i: int) -> str:
        fmt = file_format(self.path)
        if fmt == "json" and self._is_array():
            return f"{self.path}: record {i + 1}"
        return f"{self.path}:{i + self.first_line}"

    def _is_array(self) -> bool:
        return decode_file(self.path, self.encoding)[0].lstrip().startswith("[")


def _locate_bad_row(path: str, fmt: str, text: str) -> str | None:
    """File and line of the first row that cannot be read, from the file's decoded ``text``
    (datasets/pandas/arrow errors rarely say where)."""
    if fmt == "json":
        if text.lstrip().startswith("["):
            try:
                json.loads(text)
            except json.JSONDecodeError as exc:
                return f"{path}:{exc.lineno}: not valid JSON ({exc.msg})"
            return None
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                return f"{path}:{n}: not a JSON object ({exc.msg}); JSON Lines needs one object per line"
            if not isinstance(obj, dict):
                return f"{path}:{n}: a JSON Lines row must be an object with named fields, got {type(obj).__name__}"
        return None
    delim = "\t" if fmt == "tsv" else ","
    quoting = csv.QUOTE_NONE if fmt == "tsv" else csv.QUOTE_MINIMAL
    reader = csv.reader(text.splitlines(), delimiter=delim, quoting=quoting)
    width = None
    for n, row in enumerate(reader, 1):
        if width is None:
            width = len(row)
        elif row and len(row) != width:
            return f"{path}:{n}: {len(row)} fields where the header has {width}"
    return None


def _has_no_records(fmt: str, text: str) -> bool:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if fmt == "json":
        return not lines or "".join(lines).replace(" ", "") == "[]"
    return len(lines) <= 1  # a header alone


def read_table(path: str, encoding: str = DEFAULT_ENCODING) -> Table:
    """All rows of one data file via ``datasets.load_dataset`` (``csv`` or ``json``).

    The file is decoded here first (``decode_file``): a wrong encoding or a binary file stops with
    one line naming where. A file that is not UTF-8 is handed to ``datasets`` as a UTF-8 copy in a
    temporary folder (its JSON reader mishandles UTF-16), with its cache there too."""
    if not os.path.isfile(path):
        raise SystemExit(f"{path}: no such file")
    fmt = file_format(path)
    if os.path.getsize(path) == 0:
        raise SystemExit(f"{path} is empty: a data file needs a header (CSV/TSV) or records (JSON)")
    text, codec = decode_file(path, encoding)
    if not text.strip():
        raise SystemExit(f"{path} holds only white space: a data file needs a header (CSV/TSV) or records (JSON)")
    try:
        import datasets
    except ImportError:
        raise SystemExit("reading --train-file and friends needs the `datasets` package: "
                         "`pip install datasets` (or lnsr[finetune])") from None
    kwargs = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if fmt == "tsv" else {}
    builder = "json" if fmt == "json" else "csv"
    datasets.disable_progress_bars()
    level = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity_error()
    datasets.logging.disable_propagation()  # its parse-error log lines repeat what our error says better
    tmp = None
    try:
        source, extra = os.path.realpath(path), {}
        if codec not in ("utf-8", "utf-8-sig"):
            import tempfile
            tmp = tempfile.TemporaryDirectory(prefix="lnsr-data-")
            source = os.path.join(tmp.name, "data" + os.path.splitext(path)[1].lower())
            with open(source, "w", encoding="utf-8", newline="") as f:
                f.write(text)
            extra = {"cache_dir": os.path.join(tmp.name, "cache")}
        ds = datasets.load_dataset(builder, data_files={"data": source}, split="data", **kwargs, **extra)
        rows = ds.to_list()  # read before a temporary copy goes
    except Exception as exc:  # pandas / arrow parse errors: find the row ourselves
        if _has_no_records(fmt, text):
            raise SystemExit(f"{path} holds no rows (a header alone, or an empty JSON list)") from None
        where = _locate_bad_row(path, fmt, text)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SystemExit(f"{where or path}: unreadable ({reason}); check the file's format "
                         f"({'tab-separated, no quoting' if fmt == 'tsv' else fmt.upper()})") from None
    finally:
        datasets.logging.set_verbosity(level)
        datasets.logging.enable_propagation()
        if tmp is not None:
            tmp.cleanup()
    if len(rows) == 0:
        raise SystemExit(f"{path} holds no rows (a header alone, or an empty JSON list)")
    strings = {name for name, feat in ds.features.items()
               if getattr(feat, "dtype", None) in ("string", "large_string")}
    return Table(path, list(ds.column_names), rows, strings, first_line=1 if fmt == "json" else 2,
                 encoding=encoding)


def guess_text_columns(table: Table, label_column: str) -> list:
    """``run_glue.py``'s rule: ``sentence1``/``sentence2`` when present, else the first one or two
    non-label string columns."""
    cols = [c for c in table.columns if c != label_column]
    if "sentence1" in cols and "sentence2" in cols:
        return ["sentence1", "sentence2"]
    strings = [c for c in cols if c in table.string_columns]
    if not strings:
        raise SystemExit(f"{table.path}: no text column found (string columns other than the label "
                         f"{label_column!r}); columns found: {table.columns}; pass --text-columns")
    return strings[:2]


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


@dataclass
class FileTask:
    """A task made from the user's files: the spec and the examples of each split."""
    spec: TaskSpec
    train: list
    validation: list | None
    eval_sets: dict                  # name -> examples (labelled)
    test: list | None                # labelled test set (evaluated as "test"), else None
    test_unlabelled: list | None     # (text_a, text_b, None) rows for predictions
    text_columns: list
    label_column: str
    source: dict                     # the files, for the run's config

    @property
    def id2label(self) -> dict | None:
        return None if self.spec.labels is None else dict(enumerate(self.spec.labels))


def _label_kind(values) -> str:
    if all(isinstance(v, bool) for v in values):
        return "bool"
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return "int"
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return "float"
    return "str"


def _label_name(v) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def _examples(table: Table, text_columns, label_column, *, labels, regression: bool, need_label: bool) -> list:
    """``(a, b, label)`` rows; ``labels`` (class names in id order) maps classification labels."""
    missing = [c for c in list(text_columns) + ([label_column] if need_label else []) if c not in table.columns]
    if missing:
        raise SystemExit(f"{table.path}: missing column(s) {missing}; columns found: {table.columns}; "
                         f"pass --text-columns / --label-column")
    index = {name: i for i, name in enumerate(labels or ())}
    out = []
    for i, row in enumerate(table.rows):
        texts = []
        for c in text_columns:
            v = row[c]
            if _missing(v):
                raise SystemExit(f"{table.where(i)}: text column {c!r} is empty")
            texts.append(str(v))
        a, b = texts[0], (texts[1] if len(texts) > 1 else None)
        if not need_label:
            out.append((a, b, None))
            continue
        v = row[label_column]
        if _missing(v):
            raise SystemExit(f"{table.where(i)}: label ({label_column!r}) is missing or NaN; remove the row or "
                             f"fill in its label")
        if regression:
            try:
                y = float(v)
            except (TypeError, ValueError):
                raise SystemExit(f"{table.where(i)}: label {v!r} is not a number (regression); for class labels "
                                 f"drop --problem regression") from None
            if not math.isfinite(y):
                raise SystemExit(f"{table.where(i)}: label {v!r} is not finite")
        else:
            name = _label_name(v)
            if name not in index:
                raise SystemExit(f"{table.where(i)}: label {v!r} does not occur in the training file, whose labels "
                                 f"are {list(labels)}")
            y = index[name]
        out.append((a, b, y))
    return out


def parse_eval_files(specs) -> dict:
    """``NAME=PATH`` items of ``--eval-file`` -> ``{name: path}`` (names unique, path existing)."""
    out = {}
    for item in specs or ():
        name, eq, path = item.partition("=")
        name = name.strip()
        if not eq or not name or not path:
            raise SystemExit(f"--eval-file {item!r}: expected NAME=PATH (e.g. shifted=data/reviews_2024.csv)")
        if not _NAME.match(name) or name in ("validation", "dev"):
            raise SystemExit(f"--eval-file {item!r}: NAME must be letters, digits, '_', '-', '.', and not "
                             f"'validation'/'dev' (that is --validation-file)")
        if name in out:
            raise SystemExit(f"--eval-file names {name!r} twice")
        if not os.path.isfile(path):
            raise SystemExit(f"--eval-file {name}={path}: no such file")
        out[name] = path
    return out


def default_task_name(train_file: str) -> str:
    stem = os.path.splitext(os.path.basename(train_file))[0]
    if stem.lower() in ("train", "training", "data"):
        parent = os.path.basename(os.path.dirname(os.path.realpath(train_file)))
        stem = parent or stem
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", stem) or "data"


def load_file_task(*, train_file: str, validation_file: str | None = None, test_file: str | None = None,
                   eval_files: dict | None = None, text_columns=None, label_column: str | None = None,
                   problem: str = "auto", metrics=None, name: str | None = None,
                   read_validation: bool = True, read_extra: bool = True,
                   encoding: str = DEFAULT_ENCODING) -> FileTask:
    """Read and check every file; raise SystemExit with the file (and line) at the first problem.

    ``read_validation=False`` / ``read_extra=False`` leave those files unopened (``lnsr tune`` never
    looks at validation, evaluation or test data). ``encoding`` (``--encoding``) reads every file."""
    if problem not in ("auto", "classification", "regression"):
        raise SystemExit(f"--problem must be auto, classification or regression, got {problem!r}")
    check_encoding(encoding)  # an unknown name fails before any file is opened
    train = read_table(train_file, encoding)
    label_column = label_column or "label"
    if label_column not in train.columns:
        raise SystemExit(f"{train_file}: no label column {label_column!r}; columns found: {train.columns}; "
                         f"pass --label-column")
    if text_columns:
        text_columns = list(text_columns)
        if not 1 <= len(text_columns) <= 2:
            raise SystemExit(f"--text-columns takes one or two columns, got {text_columns}")
        if label_column in text_columns:
            raise SystemExit(f"--text-columns {text_columns} includes the label column {label_column!r}")
    else:
        text_columns = guess_text_columns(train, label_column)

    values = [r[label_column] for r in train.rows]
    for i, v in enumerate(values):
        if _missing(v):
            raise SystemExit(f"{train.where(i)}: label ({label_column!r}) is missing or NaN; remove the row or "
                             f"fill in its label")
    kind = _label_kind(values)
    regression = problem == "regression" or (problem == "auto" and kind == "float")
    labels = None
    if not regression:
        distinct = {_label_name(v): v for v in values}
        if kind in ("int", "float"):
            labels = tuple(_label_name(v) for v in sorted(set(distinct.values())))
        elif kind == "bool":
            labels = tuple(n for n in ("false", "true") if n in distinct)
        else:
            labels = tuple(sorted(distinct))
        if len(labels) < 2:
            raise SystemExit(f"{train_file}: only one label value ({labels[0]!r}) in column {label_column!r}: "
                             f"classification needs at least two classes (a numeric target? pass --problem "
                             f"regression)")
    if metrics:
        metrics = tuple(metrics)
    elif regression:
        metrics = REGRESSION_METRICS
    else:
        metrics = CLASSIFICATION_METRICS + (("f1",) if len(labels) == 2 else ())
    from .metrics import METRIC_FUNCS
    bad = [m for m in metrics if m not in METRIC_FUNCS]
    if bad:
        raise SystemExit(f"--metrics: unknown metric(s) {bad}; choose from {', '.join(METRIC_FUNCS)}")
    if regression and any(m not in REGRESSION_METRICS for m in metrics):
        raise SystemExit(f"--metrics {list(metrics)}: a regression task takes {', '.join(REGRESSION_METRICS)}")
    if not regression and any(m in REGRESSION_METRICS for m in metrics):
        raise SystemExit(f"--metrics {list(metrics)}: pearson/spearman need a regression task (--problem regression)")
    if "f1" in metrics and labels is not None and len(labels) != 2:
        raise SystemExit(f"--metrics f1 is the positive class's F1 of a two-label task; with {len(labels)} labels "
                         f"use f1_macro")

    spec = TaskSpec(name=name or default_task_name(train_file), folder="", text_a=text_columns[0],
                    text_b=text_columns[1] if len(text_columns) > 1 else None, label=label_column,
                    labels=labels, metrics=metrics)
    ex = dict(labels=labels, regression=regression)
    train_ex = _examples(train, text_columns, label_column, need_label=True, **ex)
    validation = None
    if validation_file and read_validation:
        validation = _examples(read_table(validation_file, encoding), text_columns, label_column, need_label=True,
                               **ex)
    eval_sets, test, test_unlabelled = {}, None, None
    if read_extra:
        for set_name, path in (eval_files or {}).items():
            eval_sets[set_name] = _examples(read_table(path, encoding), text_columns, label_column, need_label=True,
                                            **ex)
        if test_file:
            table = read_table(test_file, encoding)
            if label_column in table.columns:
                test = _examples(table, text_columns, label_column, need_label=True, **ex)
            else:  # unlabelled (run_glue's test split): predictions only
                test_unlabelled = _examples(table, text_columns, label_column, need_label=False, **ex)
    source = {"train_file": os.path.realpath(train_file), "text_columns": list(text_columns),
              "label_column": label_column, "problem": "regression" if regression else "classification"}
    if check_encoding(encoding) != "utf-8":  # recorded only when not the default: UTF-8 runs keep their configs
        source["encoding"] = encoding
    return FileTask(spec, train_ex, validation, eval_sets, test, test_unlabelled, list(text_columns),
                    label_column, source)

