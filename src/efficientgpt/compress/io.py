"""Saving and loading compressed models.

Pruned and GQA-converted models are ordinary Hugging Face models (zeros in the weights, or a smaller
config) and are saved with ``save_pretrained``. Methods that change a module's *type* (low-rank
factors, packed quantized weights) record each rewritten module in ``efficientgpt_compression.json``;
:func:`load_compressed` rebuilds the model from its config, re-applies those rewrites with empty
tensors (each rewrite kind registers a builder in :data:`REBUILDERS`), then loads the safetensors
weights. :func:`efficientgpt.models.loading.load_model` does this automatically when the manifest is
present, so ``--model DIR`` works for every compressed model.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from efficientgpt.cache import publish_files, staging_dir
from efficientgpt.errors import UserError

MANIFEST = "efficientgpt_compression.json"

#: kind -> builder(original_module, spec) -> replacement module with empty tensors of the right shapes
REBUILDERS: dict[str, Callable[[nn.Module, dict[str, Any]], nn.Module]] = {}


def register_rebuilder(kind: str):
    def deco(fn):
        REBUILDERS[kind] = fn
        return fn

    return deco


def set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def save_compressed(model: nn.Module, tokenizer, directory: str | Path, report: dict[str, Any],
                    modules: dict[str, dict[str, Any]] | None = None) -> Path:
    """Save ``model`` (+ tokenizer) and the compression manifest; files appear complete or not at all."""
    directory = Path(directory)
    manifest = {"format": "efficientgpt-compressed", "version": 1, "report": report, "modules": modules or {}}
    with staging_dir(directory) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")
        publish_files(tmp, directory, last="config.json")
    return directory


def read_manifest(directory: str | Path) -> dict[str, Any] | None:
    path = Path(directory) / MANIFEST
    return json.loads(path.read_text()) if path.exists() else None


def load_compressed(directory: str | Path, manifest: dict[str, Any], dtype=None):
    """Rebuild a model whose modules were rewritten (see the module docstring)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    import efficientgpt.registry as registry

    registry.methods()  # import method modules: they register their rebuilders
    directory = Path(directory)
    config = AutoConfig.from_pretrained(directory)
    # Built on the CPU with ordinary initialisation, then overwritten: simple and exact (rotary
    # buffers and tied weights come out right); it costs one initialisation of the model.
    model = AutoModelForCausalLM.from_config(config)
    for path, spec in manifest["modules"].items():
        kind = spec.get("kind")
        if kind not in REBUILDERS:
            raise UserError(f"{directory / MANIFEST}: module {path} uses rewrite {kind!r}, unknown here "
                            f"(known: {', '.join(sorted(REBUILDERS))})")
        set_module(model, path, REBUILDERS[kind](model.get_submodule(path), spec))
    state = {}
    for f in sorted(directory.glob("*.safetensors")):
        state.update(load_file(f))
    state = _undo_save_renames(model, state)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Tied weights (lm_head = embeddings) are stored once; re-tie instead of reporting them missing.
    model.tie_weights()
    missing = [k for k in missing if not _is_tied(model, k)]
    non_persistent = {n for n, _ in model.named_buffers()} - set(model.state_dict())
    missing = [k for k in missing if k not in non_persistent]
    if missing or unexpected:
        raise UserError(f"{directory}: weights do not match the compressed structure (missing {missing[:4]}, "
                        f"unexpected {unexpected[:4]})")
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def _is_tied(model: nn.Module, key: str) -> bool:
    try:
        out = model.get_output_embeddings()
        return key.startswith("lm_head") and out is not None and out.weight is model.get_input_embeddings().weight
    except AttributeError:
        return False


def _undo_save_renames(model: nn.Module, state: dict) -> dict:
    """``save_pretrained`` writes some keys under legacy names (GPT-NeoX ``lm_head`` -> ``embed_out``);
    map them back to the module paths of the model being rebuilt."""
    import re

    try:
        from transformers.conversion_mapping import WeightRenaming, get_model_conversion_mapping
    except ImportError:
        return state
    own = set(model.state_dict())
    rules = [(s, t) for r in get_model_conversion_mapping(model) if isinstance(r, WeightRenaming)
             for s, t in zip(r.source_patterns, r.target_patterns)]
    out = {}
    for k, v in state.items():
        if k not in own:
            for s, t in rules:
                new = re.sub(s, t, k)
                if new in own:
                    k = new
                    break
        out[k] = v
    return out
