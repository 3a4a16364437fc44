"""The ``lnsr`` command: ``lnsr finetune``, ``lnsr tune``, ``lnsr profile``, ``lnsr bench``, ``lnsr models``."""
from __future__ import annotations

import argparse
import importlib
import sys


def _bench(argv) -> int:
    # Lazy: lnsr.benchmarks is optional (and written separately); the CLI must work without it.
    try:
        mod = importlib.import_module("lnsr.benchmarks.cli")
    except ModuleNotFoundError as exc:
        if exc.name not in ("lnsr.benchmarks", "lnsr.benchmarks.cli"):
            raise
        raise SystemExit("`lnsr bench` needs the lnsr.benchmarks module, which this installation does not have; "
                         "update lnsr (or run the scripts in bench/ from a source checkout)") from None
    if not hasattr(mod, "main"):
        raise SystemExit("lnsr.benchmarks.cli has no main(argv); update lnsr")
    return mod.main(list(argv)) or 0


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each flag's help ends with its real default, as typed (``(default: 1 2 3)``), except where
    that would mislead: a None default (the help says in words what happens, e.g. "default: the
    packaged all-MiniLM-L6-v2"), a switch (``--no-progress`` would read "default: True"; its help
    says what the default is), and help that already names its default."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (default is None or default is argparse.SUPPRESS or action.nargs == 0 or not action.option_strings
                or "default" in text.lower()):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        shown = shown.replace("%", "%%")  # the help text is %-formatted
        return f"{text} (default: {shown})" if text else f"(default: {shown})"


def build_parser() -> argparse.ArgumentParser:
    from .finetune.cli import add_finetune_args
    from .finetune.tune import add_tune_args
    from .packaged import add_models_args
    from .profile import add_profile_args

    p = argparse.ArgumentParser(prog="lnsr", description="Layerwise Noise Stability Regularization tools")
    sub = p.add_subparsers(dest="command", required=True)
    ft = sub.add_parser("finetune", help="fine-tune a GLUE task or your own CSV/TSV/JSON data over methods and seeds; "
                                         "results table and plot",
                        formatter_class=DefaultsHelpFormatter)
    add_finetune_args(ft)
    tu = sub.add_parser("tune", help="choose LNSR's options on held-out training data (grid x seeds, with vanilla "
                                     "and the lam=0 control); writes best.json",
                        formatter_class=DefaultsHelpFormatter)
    add_tune_args(tu)
    pr = sub.add_parser("profile", help="noise-stability profile: per-block output change for noise at each block",
                        formatter_class=DefaultsHelpFormatter)
    add_profile_args(pr)
    sub.add_parser("bench", help="benchmarks (arguments are passed to lnsr.benchmarks.cli)", add_help=False)
    mo = sub.add_parser("models", help="pretrained models packaged on PyPI: `lnsr models list`, `lnsr models fetch NAME`")
    add_models_args(mo)
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        return _bench(argv[1:])  # everything after `bench` belongs to the benchmarks' own parser
    args = build_parser().parse_args(argv)
    if args.command == "finetune":
        from .finetune.cli import finetune_main
        finetune_main(args)
    elif args.command == "tune":
        from .finetune.tune import tune_main
        tune_main(args)
    elif args.command == "models":
        from .packaged import models_main
        models_main(args)
    elif args.command == "profile":
        from .profile import profile_main
        profile_main(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
