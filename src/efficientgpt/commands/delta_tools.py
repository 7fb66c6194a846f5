"""``efficientgpt merge`` and ``efficientgpt export``: turn a saved delta into a standalone model or a
Hugging Face PEFT adapter."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from efficientgpt.cli_common import Output, add_device_arg, add_json_arg, add_model_arg
from efficientgpt.errors import UserError

MERGE_EPILOG = """\
examples:
  efficientgpt merge --model embedded:tiny --delta D --out M      # M loads with AutoModelForCausalLM
  efficientgpt merge --delta runs/lora --out merged/               # base model taken from the delta

Only mergeable methods (lora, dylora, ia3, bitfit, full) fold into the weights; the others add
computation and are used with 'eval --delta'.
"""

EXPORT_EPILOG = """\
examples:
  efficientgpt export --delta D --format peft --out P   # P/adapter_config.json, P/adapter_model.safetensors

P loads with peft.PeftModel.from_pretrained(base_model, P). Formats exist for lora, dylora (as a LoRA at
its full rank), ia3 and prompt_tuning.
"""


def register(sub) -> None:
    p = sub.add_parser("merge", help="fold a delta into its base model and save a standalone HF model",
                       description="Attach a saved delta, merge it into the base weights and save the result "
                                   "with save_pretrained (safetensors) plus the tokenizer.",
                       epilog=MERGE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arg(p, default=None)
    p.add_argument("--delta", required=True, metavar="DIR", help="a saved delta or PEFT adapter directory")
    p.add_argument("--out", required=True, metavar="DIR", help="directory for the merged model")
    add_device_arg(p)
    add_json_arg(p)
    p.set_defaults(func=run_merge)

    p = sub.add_parser("export", help="write a saved delta in another format (Hugging Face PEFT)",
                       description="Convert a saved delta into a Hugging Face PEFT adapter directory.",
                       epilog=EXPORT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arg(p, default=None)
    p.add_argument("--delta", required=True, metavar="DIR", help="a saved delta ('tune --out' directory)")
    p.add_argument("--format", default="peft", choices=("peft",), help="output format (default: peft)")
    p.add_argument("--out", required=True, metavar="DIR", help="directory for the exported adapter")
    add_json_arg(p)
    p.set_defaults(func=run_export)


def base_model_spec(delta_dir: str) -> str | None:
    """The base model a delta was trained on, as recorded at save time (or by a PEFT adapter)."""
    d = Path(delta_dir)
    for name, key in (("delta_config.json", None), ("adapter_config.json", "base_model_name_or_path")):
        f = d / name
        if f.exists():
            meta = json.loads(f.read_text())
            if key:
                return meta.get(key)
            base = meta.get("base_model") or {}
            return base.get("path") or base.get("spec")
    if not d.is_dir():
        raise UserError(f"delta directory {delta_dir!r} does not exist")
    raise UserError(f"{delta_dir!r} holds no delta_config.json (an efficientgpt delta) or adapter_config.json "
                    "(a PEFT adapter)")


def attach_delta(model, delta_dir: str):
    """Attach a saved delta, or a PEFT adapter directory, to ``model``."""
    from efficientgpt.peft import core, hf_peft

    d = Path(delta_dir)
    if (d / core.CONFIG_FILE).exists() or not (d / hf_peft.CONFIG_FILE).exists():
        return core.load_delta(model, d)
    return hf_peft.import_peft(model, d)


def _load_base(args):
    from efficientgpt.models.loading import load_model
    from efficientgpt.train.distributed import pick_device

    spec = args.model or base_model_spec(args.delta)
    if not spec:
        raise UserError(f"the delta in {args.delta} does not record its base model; give --model")
    device = pick_device(getattr(args, "device", "cpu"))
    return load_model(spec, trust_remote_code=args.trust_remote_code, device=device)


def run_merge(args: argparse.Namespace) -> int:
    from efficientgpt.cache import publish_files, staging_dir
    from efficientgpt.peft import core

    out = Output(args)
    loaded = _load_base(args)
    delta = attach_delta(loaded.model, args.delta)
    if not delta.mergeable:
        raise UserError(f"method {delta.method!r} is not mergeable: it adds computation that does not fold into "
                        "the weights; use the delta with 'eval --delta' instead")
    core.merge_and_unload(loaded.model)
    target = Path(args.out)
    with staging_dir(target) as tmp:
        loaded.model.save_pretrained(tmp, safe_serialization=True)
        if loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(tmp)
        publish_files(tmp, target, last="config.json")
    out.result({"path": str(target), "method": delta.method, "base": loaded.spec,
                "parameters": sum(p.numel() for p in loaded.model.parameters())},
               human=f"merged {delta.method} delta {args.delta} into {loaded.spec} -> {target}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    from efficientgpt.peft import hf_peft

    out = Output(args)
    loaded = _load_base(args)
    delta = attach_delta(loaded.model, args.delta)
    path = hf_peft.export_peft(delta, args.out, base_model_name_or_path=loaded.path)
    out.result({"path": str(path), "format": args.format, "method": delta.method,
                "files": sorted(p.name for p in Path(path).iterdir())},
               human=f"exported {delta.method} delta {args.delta} as a PEFT adapter -> {path}")
    return 0
