"""Tiny random-initialised Hugging Face models for the tests (no hub, no weights)."""
import torch
import transformers as tf

VOCAB = 97


def build(family: str, *, layers: int = 3, dropout: float = 0.0, hidden: int = 32, seed: int = 0):
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=4,
                  intermediate_size=2 * hidden, max_position_embeddings=64)
    if family == "bert":
        cfg = tf.BertConfig(**common, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
        return tf.BertForSequenceClassification(cfg)
    if family == "roberta":
        cfg = tf.RobertaConfig(**{**common, "max_position_embeddings": 80}, hidden_dropout_prob=dropout,
                               attention_probs_dropout_prob=dropout, pad_token_id=1)
        return tf.RobertaForSequenceClassification(cfg)
    if family == "mpnet":  # relative position bias computed once per forward with the batch size
        cfg = tf.MPNetConfig(**{**common, "max_position_embeddings": 80}, hidden_dropout_prob=dropout,
                             attention_probs_dropout_prob=dropout, pad_token_id=1)  # 32 buckets: transformers hard-codes them
        return tf.MPNetForSequenceClassification(cfg)
    if family == "distilbert":
        cfg = tf.DistilBertConfig(vocab_size=VOCAB, n_layers=layers, dim=hidden, n_heads=4, hidden_dim=2 * hidden,
                                  max_position_embeddings=64, dropout=dropout, attention_dropout=dropout,
                                  seq_classif_dropout=dropout)
        return tf.DistilBertForSequenceClassification(cfg)
    if family == "gpt2":
        cfg = tf.GPT2Config(vocab_size=VOCAB, n_layer=layers, n_embd=hidden, n_head=4, n_positions=64,
                            resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
        return tf.GPT2LMHeadModel(cfg)
    if family in ("llama", "mistral", "qwen2"):
        cls_cfg, cls_model = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
                              "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
                              "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM)}[family]
        cfg = cls_cfg(**common, num_key_value_heads=2, attention_dropout=dropout)
        return cls_model(cfg)
    raise ValueError(family)


def is_decoder(family: str) -> bool:
    return family in ("gpt2", "llama", "mistral", "qwen2")


def batch(family: str, *, b: int = 3, t: int = 9, seed: int = 1, pad: bool = True):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    if pad and b > 1:
        mask[1, t - 3:] = 0  # right padding in one row
    out = {"input_ids": ids, "attention_mask": mask}
    if is_decoder(family):
        labels = ids.clone()
        labels[mask == 0] = -100
        out["labels"] = labels
    else:
        out["labels"] = torch.randint(0, 2, (b,), generator=g)
    return out


def ragged_rows(n, t=10, seed=0):
    """Classification rows of lengths t, t-1, t-2, ... for Trainer tests: the collator pads, the mask matters."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        length = t - (i % 3)
        ids = torch.randint(3, VOCAB, (length,), generator=g).tolist()
        rows.append({"input_ids": ids, "attention_mask": [1] * length, "labels": int(i % 2)})
    return rows


def pad_collate(rows):
    """Right-pad ``ragged_rows`` to the longest row (pad id 0, mask 0)."""
    t = max(len(r["input_ids"]) for r in rows)
    return {"input_ids": torch.tensor([r["input_ids"] + [0] * (t - len(r["input_ids"])) for r in rows]),
            "attention_mask": torch.tensor([r["attention_mask"] + [0] * (t - len(r["attention_mask"])) for r in rows]),
            "labels": torch.tensor([r["labels"] for r in rows])}


def lnsr_steps(target, model, inputs, steps, *, before_step=None, after_step=None, **options):
    """``steps`` SGD steps (lr 0.1) of ``target`` (``model`` or a compiled wrapper of it) with
    ``lnsr.LNSR(target, **options)`` attached, torch seeded 0 first; ``[(task loss, penalty)]`` per step.
    ``before_step()`` / ``after_step()`` run around each step (a CUDA-graph step marker, a graph count)."""
    import lnsr

    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    vals = []
    with lnsr.LNSR(target, **options) as reg:
        torch.manual_seed(0)
        for _ in range(steps):
            if before_step is not None:
                before_step()
            out = target(**inputs)
            loss = out.loss + reg.loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            vals.append((out.loss.item(), reg.penalty.item()))
            if after_step is not None:
                after_step()
    return vals
