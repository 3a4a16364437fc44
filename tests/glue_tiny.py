"""Tiny GLUE-format folders, a tiny word-level tokenizer and a tiny random BERT saved to disk
(no hub, no real data): what `lnsr finetune` / `lnsr profile` tests read."""
import os
import random

import torch
import transformers as tf

WORDS = ("the a cat dog sat ran on mat log red blue big small fast slow and not is was it he she "
         "they saw ate food park home").split()
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def sentence(rng, n=None):
    return " ".join(rng.choice(WORDS) for _ in range(n or rng.randint(3, 9)))


def save_tiny_bert(path, *, layers=2, hidden=32, dropout=0.1, seed=0):
    """A random BertModel plus a BertTokenizerFast over WORDS, saved as a Hugging Face folder."""
    os.makedirs(path, exist_ok=True)
    vocab = os.path.join(path, "vocab.txt")
    with open(vocab, "w") as f:
        f.write("\n".join(SPECIAL + WORDS) + "\n")
    tok = tf.BertTokenizerFast(vocab_file=vocab, do_lower_case=True)
    tok.save_pretrained(path)
    torch.manual_seed(seed)
    cfg = tf.BertConfig(vocab_size=len(SPECIAL) + len(WORDS), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=4, intermediate_size=2 * hidden, max_position_embeddings=64,
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    tf.BertModel(cfg).save_pretrained(path)
    return str(path)


# Per task: folder, dev file name, header (None = no header), row writer.
def _rows(task, rng, n):
    out = []
    for i in range(n):
        a, b = sentence(rng), sentence(rng)
        y = rng.randint(0, 1)
        if task == "mrpc":
            out.append([str(y), str(1000 + i), str(2000 + i), a, b])
        elif task == "rte":
            out.append([str(i), a, b, ["entailment", "not_entailment"][y]])
        elif task == "qnli":
            out.append([str(i), a, b, ["entailment", "not_entailment"][y]])
        elif task == "wnli":
            out.append([str(i), a, b, str(y)])
        elif task == "sst2":
            out.append([a + " ", str(y)])  # GLUE's SST-2 rows end with a space before the tab
        elif task == "cola":
            out.append(["gj04", str(y), "" if y else "*", a])
        elif task == "qqp":
            out.append([str(i), str(2 * i), str(2 * i + 1), a, b, str(y)])
        elif task == "stsb":
            out.append([str(i), "main-captions", "MSRvid", "2012test", str(i), "none", "none", a, b,
                        f"{rng.uniform(0, 5):.3f}"])
        elif task == "mnli":
            lab = ["entailment", "neutral", "contradiction"][rng.randint(0, 2)]
            out.append([str(i), "1", f"{i}e", "fiction", "(x)", "(y)", "(ROOT x)", "(ROOT y)", a, b, lab, lab])
    return out


HEADERS = {
    "mrpc": ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"],
    "rte": ["index", "sentence1", "sentence2", "label"],
    "qnli": ["index", "question", "sentence", "label"],
    "wnli": ["index", "sentence1", "sentence2", "label"],
    "sst2": ["sentence", "label"],
    "cola": None,
    "qqp": ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
    "stsb": ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2",
             "score"],
    "mnli": ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
             "sentence1_parse", "sentence2_parse", "sentence1", "sentence2", "label1", "gold_label"],
}
FOLDERS = {"mrpc": "MRPC", "rte": "RTE", "qnli": "QNLI", "wnli": "WNLI", "sst2": "SST-2", "cola": "CoLA",
           "qqp": "QQP", "stsb": "STS-B", "mnli": "MNLI"}


def write_glue(root, task, *, n_train=24, n_dev=12, seed=0, header=None):
    """``root/<Folder>/train.tsv`` and the dev file in GLUE's layout; returns the task folder."""
    rng = random.Random(seed)
    d = os.path.join(root, FOLDERS[task])
    os.makedirs(d, exist_ok=True)
    head = HEADERS[task] if header is None else header
    dev = "dev_matched.tsv" if task == "mnli" else "dev.tsv"
    for name, n in (("train.tsv", n_train), (dev, n_dev)):
        lines = ([] if head is None else ["\t".join(head)]) + ["\t".join(r) for r in _rows(task, rng, n)]
        bom = "\ufeff" if task == "mrpc" else ""  # the GLUE-built MRPC files start with a BOM
        with open(os.path.join(d, name), "w", encoding="utf-8") as f:
            f.write(bom + "\n".join(lines) + "\n")
    return d
