"""The ``lnsr finetune`` command: its arguments, their checks and the loop over tasks (``finetune_main``).

``lnsr tune`` (``tune.py``) shares the arguments and checks; one run and the seed loop are ``runner.py``.
"""
from __future__ import annotations

from ..data.glue import TASKS, get_task
from ..methods import METHODS, parse_method_spec
from .report import write_summary


def add_finetune_args(p, tune: bool = False) -> None:
    """The arguments of ``lnsr finetune`` (``tune=True``: those of ``lnsr tune``, which has no --method)."""
    from ..config import add_lnsr_flags

    g = p.add_argument_group("task and data (a GLUE task, or your own files)")
    g.add_argument("--task", nargs="+", default=None, metavar="TASK",
                   help=f"GLUE task(s): {', '.join(TASKS)}; give --task or --train-file")
    g.add_argument("--data-dir", default=None,
                   help="local GLUE-format folder (the GLUE root or the task's folder, original TSV layout); "
                        "default: the Hugging Face hub via `datasets`")
    g.add_argument("--train-file", default=None,
                   help="your training data: .csv, .tsv, .json or .jsonl (instead of --task)")
    g.add_argument("--validation-file", default=None, help="scored every epoch (same columns as --train-file)")
    g.add_argument("--test-file", default=None,
                   help="scored at the end as the set 'test'; without a label column, predictions are written "
                        "to <run>-test_predictions.tsv")
    g.add_argument("--eval-file", action="append", default=None, metavar="NAME=PATH",
                   help="an extra evaluation set (repeatable; same columns as the validation file), scored at the "
                        "end of every run: in-domain test sets, shifted data, ...")
    g.add_argument("--encoding", default="utf-8", metavar="CODEC",
                   help="text encoding of the --train-file, --validation-file, --test-file and --eval-file files, "
                        "for files not in UTF-8: a Python codec name (latin-1, cp1252, utf-16, ...); a UTF-16/32 "
                        "byte-order mark is honoured")
    g.add_argument("--eval-sets-each-epoch", action="store_true",
                   help="score the --eval-file / --test-file sets after every epoch, not only the last")
    g.add_argument("--text-columns", default=None, metavar="A[,B]",
                   help="one or two text columns (default: sentence1,sentence2, else the first one or two "
                        "non-label string columns)")
    g.add_argument("--label-column", default=None, help="the label column (default: label)")
    g.add_argument("--problem", choices=("auto", "classification", "regression"), default="auto",
                   help="auto: float labels are regression, int/bool/string labels classification")
    g.add_argument("--metrics", default=None, metavar="M1[,M2...]",
                   help="metrics for --train-file data, the first is the main one (default: accuracy,f1_macro"
                        "[,f1 for two labels] or pearson,spearman; mcc on request)")
    g.add_argument("--task-name", default=None, help="name of a --train-file task in outputs (default: the file's "
                                                      "stem, or its folder's name for train.csv)")
    g.add_argument("--max-train-samples", type=int, default=None, metavar="N",
                   help="a fixed random subset of N training examples, the same for every method and seed (quick "
                        "runs; default: all of train)")
    g.add_argument("--max-eval-samples", type=int, default=None, metavar="N",
                   help="the first N evaluation examples (default: all)")
    holdout = ("hold out FRAC of train (fixed split) and evaluate on it instead of dev: for choosing "
               "hyper-parameters without touching dev (validation/eval/test files are then not read)")
    # lnsr tune sets a holdout default (0.2) that the formatter shows; finetune's None needs words
    g.add_argument("--holdout", type=float, default=None, metavar="FRAC",
                   help=holdout if tune else holdout + "; default: none, evaluate on dev (GLUE) or --validation-file")
    g = p.add_argument_group("model and methods")
    g.add_argument("--model", default=None,
                   help="Hugging Face encoder: hub name, local path, or a packaged model's short name (`lnsr models "
                        "list`: mpnet-base); default: the packaged all-MiniLM-L6-v2")
    if not tune:
        g.add_argument("--method", nargs="+", default=["vanilla", "lnsr"], metavar="SPEC",
                       help=f"methods ({', '.join(METHODS)}); NAME or NAME:key=value,... overrides an option for "
                            f"that method only (e.g. lnsr:lam=0.003); lnsr:@best.json takes the options `lnsr tune` "
                            f"chose")
    g.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3],
                   help="one run of every method per seed; a seed gives every method the same head "
                        "initialisation and data order")
    g = p.add_argument_group("LNSR options (method lnsr)")
    add_lnsr_flags(g)  # --sigma --noise --inject-at --lam ...: names, types, defaults and help from LNSRConfig
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=3, help="training epochs")
    g.add_argument("--lr", type=float, default=2e-5, help="peak learning rate (AdamW, after warm-up)")
    g.add_argument("--batch-size", type=int, default=16, help="training batch size")
    g.add_argument("--eval-batch-size", type=int, default=64, help="evaluation batch size")
    g.add_argument("--max-length", type=int, default=128, help="truncation length; batches are padded dynamically")
    g.add_argument("--schedule", default="linear",
                   help="transformers.get_scheduler name: linear, cosine, constant_with_warmup, ...")
    g.add_argument("--warmup-ratio", type=float, default=0.1, help="share of the training steps spent warming up")
    g.add_argument("--weight-decay", type=float, default=0.01,
                   help="AdamW weight decay (not on biases and LayerNorm weights)")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping; 0 turns it off")
    prec = g.add_mutually_exclusive_group()
    prec.add_argument("--bf16", dest="precision", action="store_const", const="bf16",
                      help="bf16 autocast (CPU with AVX-512 BF16/AMX, or CUDA; it warns on a CPU without "
                           "them, where bf16 is ~15x slower than fp32); the LNSR penalty stays fp32 "
                           "(default: neither, fp32 throughout)")
    prec.add_argument("--fp16", dest="precision", action="store_const", const="fp16",
                      help="fp16 autocast with a GradScaler (CUDA only; default: fp32)")
    p.set_defaults(precision="fp32")
    g = p.add_argument_group("output")
    g.add_argument("--output-dir", default="runs/finetune",
                   help="results go to OUTPUT_DIR/<task>/<method>/seed<k>.json; finished runs are skipped")
    g.add_argument("--save-model", action="store_true",
                   help="save each final model to OUTPUT_DIR/<task>/<method>/seed<k>-model (for lnsr profile)")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own choice)")
    g.add_argument("--checkpoint-every", type=int, default=500, metavar="N",
                   help="also checkpoint every N training steps (0: at epoch ends only); a killed run restarts "
                        "from its last checkpoint when the same command is run again")
    g.add_argument("--no-checkpoints", dest="checkpoints", action="store_false",
                   help="write no checkpoints, a killed run starts over (default: checkpoints are written)")
    g.add_argument("--overwrite", action="store_true",
                   help="re-run runs whose record in OUTPUT_DIR is from other options or other data (changed file "
                        "content included); each earlier record is kept as superseded-seed<k>.<time>.json beside it. "
                        "Without it such a command stops before training and names what differs")
    g.add_argument("--summary-only", action="store_true",
                   help="train nothing: summarise the finished runs of these methods and seeds")
    g.add_argument("--no-progress", dest="progress", action="store_false",
                   help="do not show tqdm progress bars (default: shown)")


def method_defaults(args) -> dict:
    """The shared LNSR flags (``--lam``, ``--sigma``, ...) as method options."""
    from ..config import flag_values

    return flag_values(args)


def check_common_args(args) -> None:
    """Argument errors that need no data: raised before anything is read or trained."""
    import torch

    if args.epochs < 1 or args.batch_size < 1:
        raise SystemExit("--epochs and --batch-size must be >= 1")
    if args.checkpoint_every < 0:
        raise SystemExit("--checkpoint-every must be >= 0 (0: checkpoints at epoch ends only)")
    if args.train_file and args.task:
        raise SystemExit("give either --task (GLUE) or --train-file (your own data), not both")
    if not args.train_file and not args.task:
        raise SystemExit("give --task (a GLUE task) or --train-file (your own CSV/TSV/JSON/JSONL data)")
    if args.task:
        for t in args.task:
            get_task(t)  # unknown tasks fail before anything runs
        own = [f for f in ("validation_file", "test_file", "text_columns", "label_column", "metrics", "task_name")
               if getattr(args, f)]
        if own:
            raise SystemExit(f"--{own[0].replace('_', '-')} is for --train-file data; GLUE tasks have fixed files "
                             f"and columns")
    if args.threads:
        torch.set_num_threads(args.threads)


def parse_methods(specs, args) -> list:
    methods = [parse_method_spec(m, method_defaults(args)) for m in specs]
    labels = [m[0] for m in methods]
    if len(set(labels)) != len(labels):
        raise SystemExit(f"--method lists the same method twice: {labels}")
    return methods


def finetune_main(args) -> dict:
    """Run ``lnsr finetune`` from parsed arguments; returns ``{task: summary}``."""
    import os
    import sys

    from .runner import plan_job, prepare_tasks, run_task

    check_common_args(args)
    methods = parse_methods(args.method, args)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    out = {}
    preps = prepare_tasks(args, log)  # every file is read and checked before the first run trains
    job = plan_job(preps, args, methods, log)  # and every record in the way found (SystemExit)
    for prep in preps:
        results = run_task(prep, args, methods, log=log, job=job)
        if not results:
            log(f"[{prep.spec.name}] no finished runs to summarise")
            continue
        out[prep.spec.name] = write_summary(prep.spec.name, results, prep.spec.metrics,
                                            os.path.join(args.output_dir, prep.spec.name), log=log)
        reused = job.reused_text(prep.spec.name)
        if reused:
            print(reused)  # with the table: which of its rows come from earlier commands
    return out
