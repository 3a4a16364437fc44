"""Finding the blocks of a model and the module whose call starts its forward (docs/design.md §3)."""
from __future__ import annotations

from collections import Counter

import torch
from torch import nn

# model_type -> attribute path of the block list, relative to the model's base model
# (``model.base_model`` for Hugging Face models: BertModel, GPT2Model, LlamaModel, ...).
BLOCKS_BY_MODEL_TYPE = {
    "bert": "encoder.layer",
    "roberta": "encoder.layer",
    "xlm-roberta": "encoder.layer",
    "camembert": "encoder.layer",
    "electra": "encoder.layer",
    "ernie": "encoder.layer",
    "deberta": "encoder.layer",
    "deberta-v2": "encoder.layer",
    "mpnet": "encoder.layer",
    "distilbert": "transformer.layer",
    "gpt2": "h",
    "gpt_neo": "h",
    "gptj": "h",
    "llama": "layers",
    "mistral": "layers",
    "mixtral": "layers",
    "qwen2": "layers",
    "qwen3": "layers",
    "gemma": "layers",
    "gemma2": "layers",
    "phi3": "layers",
}


def unwrap(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """``(entry, inner)`` of a possibly wrapped model.

    ``inner`` is the plain model whose blocks are hooked.  ``entry`` is the module whose
    ``__call__`` runs when the user calls the (wrapped) model, so that forward hooks placed on it
    fire: DDP and ``torch.compile`` call their inner module, while a PEFT ``PeftModel`` calls its
    tuner (``LoraModel``), which calls ``inner.forward`` directly, bypassing ``inner``'s hooks.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"LNSR needs a torch.nn.Module, got {type(model).__name__}")
    entry = model
    for _ in range(8):
        if hasattr(entry, "_orig_mod") and isinstance(entry._orig_mod, nn.Module):  # torch.compile
            entry = entry._orig_mod
        elif isinstance(entry, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            entry = entry.module
        elif type(entry).__name__.startswith("PeftModel") and hasattr(entry, "base_model"):
            entry = entry.base_model  # the tuner (LoraModel, ...): it is what PeftModel calls
        else:
            break
    inner = entry
    # PEFT tuners keep the transformers model in ``.model`` and call its ``forward`` directly.
    if type(inner).__module__.startswith("peft.") and isinstance(getattr(inner, "model", None), nn.Module):
        inner = inner.model
    return entry, inner


def _resolve_path(root: nn.Module, path: str):
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _largest_uniform_modulelist(model: nn.Module):
    """Fallback: the largest ``nn.ModuleList`` whose members all share one class."""
    best, best_name = None, None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            classes = Counter(type(m) for m in mod)
            if len(classes) == 1 and (best is None or len(mod) > len(best)):
                best, best_name = mod, name
    return best, best_name


def find_blocks(model: nn.Module, blocks=None) -> tuple[list[nn.Module], str]:
    """The ordered list of blocks and a description of where they were found."""
    if blocks is not None:
        if isinstance(blocks, str):
            found = _resolve_path(model, blocks)
            if found is None:
                raise ValueError(f"blocks={blocks!r}: the model has no attribute path {blocks!r}")
            blocks, where = found, f"blocks={blocks!r}"
        else:
            where = "blocks= argument"
        if isinstance(blocks, nn.Module) and not isinstance(blocks, (nn.ModuleList, nn.Sequential)):
            raise TypeError("blocks must be a list / nn.ModuleList of modules or an attribute path string")
        blocks = list(blocks)
        if not blocks or not all(isinstance(b, nn.Module) for b in blocks):
            raise TypeError("blocks must be a non-empty sequence of nn.Module (the model's blocks, bottom first)")
        owned = {id(m) for m in model.modules()}
        if not all(id(b) in owned for b in blocks):
            raise ValueError("blocks= contains modules that are not part of the model")
        return blocks, where
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type in BLOCKS_BY_MODEL_TYPE:
        base = getattr(model, "base_model", model)
        for root in (base, model):
            found = _resolve_path(root, BLOCKS_BY_MODEL_TYPE[model_type])
            if isinstance(found, nn.ModuleList) and len(found):
                return list(found), f"{model_type}: {BLOCKS_BY_MODEL_TYPE[model_type]}"
    found, name = _largest_uniform_modulelist(model)
    if found is None:
        raise ValueError(
            f"LNSR found no blocks in {type(model).__name__} (model_type={model_type!r}): it has no "
            f"nn.ModuleList of same-class modules. Pass blocks=<list of the model's transformer blocks, "
            f"bottom first> or an attribute path such as blocks='encoder.layer'")
    return list(found), f"fallback: largest ModuleList {name!r}"


def block_batch_arg(args, kwargs):
    """The hidden-state tensor a block receives (first positional, or ``hidden_states=``)."""
    if args and isinstance(args[0], torch.Tensor):
        return args[0], ("args", 0)
    for key in ("hidden_states", "x", "hidden_state", "inputs"):
        if isinstance(kwargs.get(key), torch.Tensor):
            return kwargs[key], ("kwargs", key)
    return None, None


def replace_block_input(args, kwargs, fn, *, who: str = "block"):
    """``(args, kwargs)`` of a block call with its hidden state ``h`` replaced by ``fn(h)``: the one
    way every hook here swaps a block's input (the regulariser, the two-pass definition, the
    profile, SMART).  Raises a TypeError naming ``who`` when the call carries no hidden state."""
    h, where = block_batch_arg(args, kwargs)
    if h is None:
        raise TypeError(f"{who} received no hidden-state tensor as its first argument or as hidden_states=; "
                        f"pass blocks= with modules that take one")
    new = fn(h)
    if where[0] == "args":
        return (new, *args[1:]), kwargs
    return args, {**kwargs, where[1]: new}


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing of a transformers model (what LNSR's recomputation
    handling is tested with).  transformers 5 renamed ``gradient_checkpointing_enable`` to
    ``activation_checkpointing_enable`` and will drop the old name; this calls whichever exists."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        raise TypeError(f"{type(model).__name__} has neither activation_checkpointing_enable nor "
                        "gradient_checkpointing_enable; wrap its blocks in torch.utils.checkpoint yourself")
