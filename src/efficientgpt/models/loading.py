"""Load any Hugging Face causal LM by hub id or local directory, or the embedded default.

Weights load from safetensors only (``use_safetensors=True``; a checkpoint shipped only as pickled
``.bin`` files is refused). ``trust_remote_code`` stays off unless the caller sets it. Where the hub
cannot be reached, a hub id loads from the local Hugging Face cache without network retries
(``efficientgpt.hub``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from efficientgpt import hub
from efficientgpt.errors import UserError

EMBEDDED_PREFIX = "embedded"


@dataclasses.dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    spec: str
    path: str

    def describe(self) -> dict[str, Any]:
        return describe_model(self.model, self.spec, self.path)


def describe_model(model, spec: str, path: str | None = None) -> dict[str, Any]:
    cfg = model.config.to_dict()
    blob = json.dumps({k: v for k, v in cfg.items() if k not in ("transformers_version", "_name_or_path")},
                      sort_keys=True, default=str)
    return {
        "spec": spec,
        "path": path,
        "model_type": model.config.model_type,
        "parameters": sum(p.numel() for p in model.parameters()),
        "config_sha256": hashlib.sha256(blob.encode()).hexdigest(),
    }


def is_embedded(spec: str) -> bool:
    return spec == EMBEDDED_PREFIX or spec.startswith(EMBEDDED_PREFIX + ":")


def resolve_model_path(spec: str, progress: bool = True) -> str:
    """A local directory or hub id for ``spec``; embedded specs are pretrained on first use."""
    if is_embedded(spec):
        from efficientgpt.models.embedded import ensure_embedded, preset_of

        return str(ensure_embedded(preset_of(spec), progress=progress))
    path = Path(os.path.expanduser(spec))
    if path.is_dir():
        if not (path / "config.json").exists():
            raise UserError(
                f"model directory {str(path)!r} has no config.json; expected a directory written by "
                "save_pretrained (config.json + model.safetensors), a hub id, or embedded[:tiny]"
            )
        return str(path)
    if path.exists():
        raise UserError(f"model {spec!r} is a file; expected a model directory, a hub id, or embedded[:tiny]")
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise UserError(f"model directory {spec!r} does not exist; expected a model directory, a hub id, "
                        "or embedded[:tiny]")
    return spec


def load_model(spec: str, trust_remote_code: bool = False, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None, progress: bool = True, tokenizer: bool = True) -> LoadedModel:
    """Load a causal LM and its tokenizer (see the module docstring for what ``spec`` may be)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(spec, progress=progress)
    where = "local directory" if os.path.isdir(path) else "hub id"
    kwargs = {"trust_remote_code": trust_remote_code, "use_safetensors": True}
    if not os.path.isdir(path):
        try:
            path = hub.source_for(path)
        except hub.NotCachedError as err:
            raise UserError(f"could not load model {spec!r} (hub id): {err}. Expected a cached hub id, a "
                            "directory written by save_pretrained with safetensors weights, or embedded[:tiny]"
                            ) from None
    if dtype is not None:
        kwargs["dtype"] = dtype
    from efficientgpt.compress.io import load_compressed, read_manifest

    manifest = read_manifest(path) if os.path.isdir(path) else None
    try:
        if manifest is not None and manifest.get("modules"):
            model = load_compressed(path, manifest, dtype=dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(
            f"could not load model {spec!r} ({where}): {first}. Expected a hub id reachable from this "
            "machine, a directory written by save_pretrained with safetensors weights, or embedded[:tiny]"
        ) from None
    tok = None
    if tokenizer:
        try:
            tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as err:
            raise UserError(f"model {spec!r} has no loadable tokenizer at {path}: {err}") from None
    model.to(device).eval()
    return LoadedModel(model=model, tokenizer=tok, spec=spec, path=path)
