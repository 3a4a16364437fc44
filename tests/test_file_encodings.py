"""Data files that are not UTF-8 (`--encoding`), UTF-16 with a byte-order mark, and binary files: a
one-line error naming the file, the line (or byte offset) and the fix, never a traceback, and
nothing written before it."""
import os
import subprocess
import sys

import pytest

from lnsr.cli import main
from lnsr.data import load_file_task
from lnsr.data.files import read_table

ROWS = [("le café est bon", "yes"), ("à bientôt", "no"), ("naïve idée", "yes"), ("garçon", "no"),
        ("crème brûlée", "yes"), ("où est-il", "no")]


def write_text(path, text, encoding, bom=b""):
    path.write_bytes(bom + text.encode(encoding))
    return str(path)


def csv_text(rows=ROWS):
    return "sentence,label\n" + "".join(f"{s},{y}\n" for s, y in rows)


def jsonl_text(rows=ROWS):
    return "".join(f'{{"sentence": "{s}", "label": "{y}"}}\n' for s, y in rows)


def _exit(**kw) -> str:
    with pytest.raises(SystemExit) as exc:
        load_file_task(**kw)
    msg = str(exc.value.code)
    assert "\n" not in msg and "Traceback" not in msg, msg  # one line
    return msg


@pytest.mark.parametrize("ext, text", [(".csv", csv_text()), (".jsonl", jsonl_text())])
def test_latin1_fails_with_file_line_and_fix_then_reads_with_encoding(tmp_path, ext, text):
    path = write_text(tmp_path / f"lat{ext}", text, "latin-1")
    msg = _exit(train_file=path)
    line = 2 if ext == ".csv" else 1  # the first "é": row 1 of the CSV (line 2), line 1 of the JSON Lines
    offset = text.encode("latin-1").index("é".encode("latin-1"))
    assert msg.startswith(f"{path}:{line}: not valid utf-8 text (byte 0xe9 at byte offset {offset})"), msg
    assert "--encoding latin-1" in msg, msg
    task = load_file_task(train_file=path, encoding="latin-1")
    assert [a for a, _b, _y in task.train] == [s for s, _ in ROWS]
    assert task.spec.labels == ("no", "yes") and task.source["encoding"] == "latin-1"


def test_encoding_reaches_every_file_and_utf8_configs_stay_as_they_were(tmp_path):
    train = write_text(tmp_path / "train.csv", csv_text(), "latin-1")
    val = write_text(tmp_path / "val.csv", csv_text(ROWS[:2]), "latin-1")
    shifted = write_text(tmp_path / "shifted.tsv", csv_text(ROWS[2:]).replace(",", "\t"), "cp1252")
    test = write_text(tmp_path / "test.jsonl", jsonl_text(ROWS[:3]), "latin-1")
    task = load_file_task(train_file=train, validation_file=val, eval_files={"shifted": shifted},
                          test_file=test, encoding="latin-1")
    assert task.validation[0][0] == "le café est bon" and task.eval_sets["shifted"][0][0] == "naïve idée"
    assert [r[0] for r in task.test] == [s for s, _ in ROWS[:3]]
    # a validation file in another encoding than the one given: its own line is named
    bad_val = write_text(tmp_path / "val8.csv", csv_text(ROWS[:2]), "utf-8")
    good = write_text(tmp_path / "good.csv", csv_text(), "utf-8")
    assert _exit(train_file=good, validation_file=write_text(tmp_path / "v.csv", csv_text(), "latin-1")).startswith(
        f"{tmp_path / 'v.csv'}:2: not valid utf-8 text")
    assert "encoding" not in load_file_task(train_file=good, validation_file=bad_val).source  # UTF-8: unchanged
    assert "unknown encoding" in _exit(train_file=good, encoding="no-such-codec")


@pytest.mark.parametrize("ext", [".csv", ".json", ".jsonl"])
def test_utf16_with_a_bom_is_read_as_utf16(tmp_path, ext):
    text = {".csv": csv_text(), ".jsonl": jsonl_text(),
            ".json": "[" + ",".join(jsonl_text().splitlines()) + "]"}[ext]
    for enc in ("utf-16", "utf-32"):  # Python writes the byte-order mark
        path = write_text(tmp_path / f"{enc}{ext}", text, enc)
        task = load_file_task(train_file=path)
        assert [a for a, _b, _y in task.train] == [s for s, _ in ROWS], (enc, ext)
    path = write_text(tmp_path / f"be{ext}", text, "utf-16-be", bom=b"\xfe\xff")
    assert load_file_task(train_file=path).train[0][0] == "le café est bon"


def test_utf16_without_a_bom_names_the_fix(tmp_path):
    path = write_text(tmp_path / "nobom.csv", csv_text(), "utf-16-le")
    msg = _exit(train_file=path)
    assert msg.startswith(f"{path}:1: NUL byte at byte offset 1"), msg
    assert "--encoding utf-16" in msg
    assert load_file_task(train_file=path, encoding="utf-16-le").train[0][0] == "le café est bon"


def test_binary_garbage_is_one_clear_line(tmp_path):
    path = tmp_path / "data.csv"
    path.write_bytes(b"PK\x03\x04" + bytes(range(256)) * 8)  # a zip (e.g. .xlsx) renamed to .csv
    for encoding in ("utf-8", "latin-1"):
        msg = _exit(train_file=str(path), encoding=encoding)
        assert msg.startswith(f"{path}:1: NUL byte at byte offset 4: this is not a text file"), msg
    # no NUL byte, invalid UTF-8: the byte and its line
    path.write_bytes(b"sentence,label\nok,1\n" + bytes(range(0x80, 0x100)))
    assert _exit(train_file=str(path)).startswith(f"{path}:3: not valid utf-8 text (byte 0x80 at byte offset 20)")
    path.write_bytes(b"\x00\x01")  # the reader itself, not only load_file_task
    with pytest.raises(SystemExit, match=r"data.csv:1: NUL byte at byte offset 0"):
        read_table(str(path))


def _cli(argv) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    msg = str(exc.value.code)
    assert "\n" not in msg, msg
    return msg


@pytest.mark.parametrize("command", ["finetune", "tune"])
def test_cli_names_file_line_and_fix_and_writes_nothing(tmp_path, command):
    train = write_text(tmp_path / "train.csv", csv_text(), "latin-1")
    val = write_text(tmp_path / "val.csv", csv_text(ROWS[:3]), "latin-1")
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_bytes(bytes(range(256)))
    out = tmp_path / "out"
    base = [command, "--model", str(tmp_path / "no-model"), "--output-dir", str(out)]
    base += ["--validation-file", val] if command == "finetune" else []
    msg = _cli(base + ["--train-file", train])
    assert msg.startswith(f"{train}:2: not valid utf-8 text") and "--encoding latin-1" in msg, msg
    assert _cli(base + ["--train-file", str(garbage)]).startswith(f"{garbage}:1: NUL byte at byte offset 0")
    assert not out.exists()


@pytest.mark.parametrize("command", ["finetune", "tune"])
def test_cli_encoding_option_reads_the_files(tmp_path, command, capsys):
    """--encoding latin-1 gets past reading: --summary-only then trains nothing and writes nothing."""
    train = write_text(tmp_path / "train.csv", csv_text(ROWS * 2), "latin-1")
    val = write_text(tmp_path / "val.csv", csv_text(ROWS[:4]), "latin-1")
    out = tmp_path / "out"
    argv = [command, "--train-file", train, "--encoding", "latin-1", "--summary-only", "--seeds", "1", "2",
            "--model", str(tmp_path / "no-model"), "--output-dir", str(out)]
    argv += ["--validation-file", val, "--method", "vanilla"] if command == "finetune" else ["--holdout", "0.25"]
    try:
        main(argv)
    except SystemExit as exc:  # lnsr/finetune/runner.py's prepare_tasks must pass encoding=args.encoding
        pytest.fail(f"--encoding latin-1 did not reach the file reader: {exc}")
    err = capsys.readouterr().err
    expect = "] 12 train / 4 eval (validation)" if command == "finetune" else "] 9 train / 3 eval (holdout0.25"
    assert expect in err, err
    assert _cli(argv[:4] + ["klingon"] + argv[5:]).startswith("--encoding 'klingon': unknown encoding")
    assert not out.exists()


def test_no_traceback_from_the_command_line(tmp_path):
    """What a user sees: exactly one line on stderr, exit status 1."""
    train = write_text(tmp_path / "train.csv", csv_text(), "latin-1")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "lnsr.cli", "finetune", "--train-file", train, "--validation-file",
                           train, "--output-dir", str(out)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1 and lines[0].startswith(f"{train}:2: not valid utf-8 text"), proc.stderr
    assert not out.exists()
