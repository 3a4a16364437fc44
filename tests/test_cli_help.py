"""`lnsr finetune/tune/profile --help` show every flag's real default, in words where it is not a value."""
import argparse
import re

import pytest

from lnsr.cli import DefaultsHelpFormatter, build_parser

COMMANDS = ("finetune", "tune", "profile")


def _subparser(command):
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


def _help(command) -> str:
    return _subparser(command).format_help()


def _entry(text: str, flag: str) -> str:
    """The help entry of ``flag``: its line and the indented continuation lines, joined."""
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if re.match(rf"\s+{re.escape(flag)}\b", ln))
    out = [lines[start]]
    for ln in lines[start + 1:]:
        if not ln.startswith("   "):  # the next flag (two spaces) or group header; wrapped text is deeper
            break
        out.append(ln)
    return " ".join(" ".join(out).split())


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_no_misleading_defaults(command):
    text = " ".join(_help(command).split())  # argparse wraps lines: compare with single spaces
    assert "(default: None)" not in text
    assert "(default: True)" not in text and "(default: False)" not in text
    assert "default: [" not in text  # lists are shown as typed (1 2 3), not as Python lists


@pytest.mark.parametrize("command", COMMANDS)
def test_every_flag_has_help(command):
    """A flag without help gets no line of its own, so its default is never shown."""
    missing = [a.option_strings[0] for a in _subparser(command)._actions if a.option_strings and not a.help]
    assert missing == []


@pytest.mark.parametrize("command, flag, default", [
    ("finetune", "--seeds", "(default: 1 2 3)"), ("tune", "--seeds", "(default: 1 2 3)"),
    ("finetune", "--epochs", "(default: 3)"), ("tune", "--epochs", "(default: 3)"),
    ("finetune", "--lr", "(default: 2e-05)"), ("tune", "--lr", "(default: 2e-05)"),
    ("finetune", "--batch-size", "(default: 16)"), ("tune", "--batch-size", "(default: 16)"),
    ("profile", "--batch-size", "(default: 32)"),
    ("finetune", "--method", "(default: vanilla lnsr)"),
    ("finetune", "--encoding", "(default: utf-8)"), ("tune", "--encoding", "(default: utf-8)"),
    ("finetune", "--model", "default: the packaged all-MiniLM-L6-v2"),
    ("profile", "--model", "default: the packaged all-MiniLM-L6-v2"),
    ("finetune", "--holdout", "default: none, evaluate on dev"), ("tune", "--holdout", "(default: 0.2)"),
    ("finetune", "--output-dir", "(default: runs/finetune)"), ("tune", "--output-dir", "(default: runs/tune)"),
    ("tune", "--grid", "(default: lam=0.001,0.003,0.01)"),
    ("finetune", "--no-progress", "(default: shown)"), ("finetune", "--no-checkpoints", "(default: checkpoints are"),
    ("profile", "--device", "(default: cuda when available)"),
])
def test_flag_shows_its_real_default(command, flag, default):
    entry = _entry(_help(command), flag)
    assert default in entry, entry
    assert entry.count("default") == 1, entry  # said once: help that names its default gets no second one


def test_the_defaults_shown_are_the_parsed_ones():
    """The words match what a command gets without the flag."""
    ft = build_parser().parse_args(["finetune", "--task", "mrpc"])
    assert (ft.seeds, ft.epochs, ft.lr, ft.batch_size, ft.encoding) == ([1, 2, 3], 3, 2e-5, 16, "utf-8")
    assert ft.progress is True and ft.checkpoints is True and ft.holdout is None and ft.model is None
    tu = build_parser().parse_args(["tune", "--task", "mrpc"])
    assert (tu.holdout, tu.output_dir, tu.grid) == (0.2, "runs/tune", ["lam=0.001,0.003,0.01"])


def test_formatter_rules():
    p = argparse.ArgumentParser(formatter_class=DefaultsHelpFormatter)
    p.add_argument("--a", default=None, help="A")
    p.add_argument("--b", default=5, help="B")
    p.add_argument("--c", action="store_true", help="C")
    p.add_argument("--no-d", dest="d", action="store_false", help="D")
    p.add_argument("--e", default=0.5, help="E (default: half)")
    p.add_argument("--f", default="100%", help="F")
    text = " ".join(p.format_help().split())
    assert "A --b B" in text and "B (default: 5)" in text and "C --no-d" in text and "D --e" in text
    assert "E (default: half) --f" in text and "F (default: 100%)" in text
