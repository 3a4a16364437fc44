"""Examples to model inputs: tokenised without padding (``encode``), padded per batch (``collate``)."""
from __future__ import annotations

import torch


def encode(tokenizer, examples, max_length: int) -> list[dict]:
    """Tokenised examples without padding (padding happens per batch)."""
    if not examples:
        return []
    a = [e[0] for e in examples]
    b = [e[1] for e in examples]
    enc = tokenizer(a, b if b[0] is not None else None, truncation=True, max_length=max_length)
    keys = [k for k in ("input_ids", "token_type_ids", "attention_mask") if k in enc]
    return [{k: enc[k][i] for k in keys} | {"labels": examples[i][2]} for i in range(len(examples))]


def collate(features: list[dict], pad_id: int, regression: bool, padding_side: str = "right") -> dict:
    """Pad to the longest example of the batch (dynamic padding)."""
    n = max(len(f["input_ids"]) for f in features)
    out = {}
    for key, fill in (("input_ids", pad_id), ("token_type_ids", 0), ("attention_mask", 0)):
        if key not in features[0]:
            continue
        rows = []
        for f in features:
            pad = [fill] * (n - len(f[key]))
            rows.append(pad + list(f[key]) if padding_side == "left" else list(f[key]) + pad)
        out[key] = torch.tensor(rows, dtype=torch.long)
    if features[0]["labels"] is not None:
        out["labels"] = torch.tensor([f["labels"] for f in features],
                                     dtype=torch.float32 if regression else torch.long)
    return out
