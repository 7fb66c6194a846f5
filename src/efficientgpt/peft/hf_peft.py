"""Interoperability with Hugging Face PEFT's adapter files.

A PEFT adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` whose keys are
the module paths prefixed by ``base_model.model.``. This module does the file handling; each method
module that has a PEFT counterpart provides the conversion of its own tensors:

* ``peft_export(delta) -> (adapter_config: dict, tensors: {module-path key: tensor})``
* ``peft_import(model, adapter_config, tensors, name) -> Delta``

Methods with a PEFT format: LoRA (and DyLoRA, exported at its full rank as a LoRA), (IA)^3 and prompt
tuning. Pickled ``adapter_model.bin`` files are refused: only safetensors are read.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from efficientgpt.cache import atomic_dir
from efficientgpt.errors import UserError
from efficientgpt.peft.core import Delta

PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

#: peft_type -> the module implementing the method here.
PEFT_TYPES = {
    "LORA": "efficientgpt.peft.lora",
    "IA3": "efficientgpt.peft.ia3",
    "PROMPT_TUNING": "efficientgpt.peft.prompt_tuning",
}


def export_peft(delta: Delta, directory: str | Path, base_model_name_or_path: str | None = None) -> Path:
    """Write ``delta`` as a PEFT adapter directory (atomically) that ``PeftModel.from_pretrained`` loads."""
    module = importlib.import_module(type(delta).__module__)
    fn = getattr(module, "peft_export", None)
    if fn is None:
        raise UserError(f"method {delta.method!r} has no Hugging Face PEFT format; methods with one: "
                        "lora, dylora (as LoRA at full rank), ia3, prompt_tuning")
    delta.prepare_for_saving()
    config, tensors = fn(delta)
    config = {"base_model_name_or_path": base_model_name_or_path, "inference_mode": True, **config}
    directory = Path(directory)
    with atomic_dir(directory) as tmp:
        # Prompt-learning adapters keep PEFT's bare key; module weights carry the model prefix.
        save_file({(k if k == "prompt_embeddings" else PREFIX + k): v.detach().contiguous().cpu()
                   for k, v in tensors.items()}, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return directory


def read_peft(directory: str | Path) -> tuple[dict[str, Any], dict]:
    directory = Path(directory)
    cfg_path = directory / CONFIG_FILE
    if not cfg_path.exists():
        raise UserError(f"{str(directory)!r} is not a PEFT adapter directory: it has no {CONFIG_FILE}")
    weights = directory / WEIGHTS_FILE
    if not weights.exists():
        if (directory / "adapter_model.bin").exists():
            raise UserError(f"{directory} holds only adapter_model.bin (a pickle); efficientgpt loads "
                            "safetensors only: re-save it with safe_serialization=True")
        raise UserError(f"{directory} has no {WEIGHTS_FILE}")
    config = json.loads(cfg_path.read_text())
    tensors = {(k[len(PREFIX):] if k.startswith(PREFIX) else k): v for k, v in load_file(weights).items()}
    return config, tensors


def import_peft(model, directory: str | Path, name: str = "default") -> Delta:
    """Attach the PEFT adapter in ``directory`` to ``model`` as one of our deltas."""
    config, tensors = read_peft(directory)
    peft_type = config.get("peft_type")
    if peft_type not in PEFT_TYPES:
        raise UserError(f"PEFT adapter type {peft_type!r} cannot be imported; supported: {', '.join(PEFT_TYPES)}")
    module = importlib.import_module(PEFT_TYPES[peft_type])
    return module.peft_import(model, config, tensors, name)
