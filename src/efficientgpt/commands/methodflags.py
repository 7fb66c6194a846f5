"""Command-line flags generated from the registered methods' config dataclasses.

Every field of every method config becomes one ``--flag`` (``rank`` -> ``--rank``); a field that
several methods share is one flag whose help names them. A field whose name is taken by the training
config gets a ``--method-`` prefix. :func:`method_config` builds the chosen method's config and
refuses flags that belong only to other methods.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing

from efficientgpt import registry
from efficientgpt.config import _csv
from efficientgpt.errors import UserError

RESERVED = {"calib_data", "calib_split", "calib_samples", "calib_seq_len", "calib_seed", "calib_batch",
            "eval_tokens", "steps", "batch_size", "grad_accum", "seq_len", "lr", "weight_decay", "beta1", "beta2", "warmup_steps",
            "min_lr_ratio", "max_grad_norm", "bf16", "gradient_checkpointing", "eval_every", "eval_batches",
            "log_every", "save_every", "keep_checkpoints", "save_trainable_only", "seed", "progress", "model",
            "data", "out", "json", "method", "device", "resume", "delta", "split", "format", "force"}


def dest(field_name: str) -> str:
    return f"method_{field_name}" if field_name in RESERVED else field_name


def add_method_flags(parser: argparse.ArgumentParser, family: str | tuple[str, ...] | None = "peft") -> None:
    families = (family,) if isinstance(family, str) or family is None else family
    specs = [s for f in families for s in registry.methods(f)]
    owners: dict[str, list[str]] = {}
    fields: dict[str, dataclasses.Field] = {}
    hints: dict[str, type] = {}
    for spec in specs:
        th = typing.get_type_hints(spec.config_cls)
        for f in dataclasses.fields(spec.config_cls):
            if not f.metadata.get("cli", True):
                continue
            owners.setdefault(f.name, []).append(spec.name)
            fields.setdefault(f.name, f)
            hints.setdefault(f.name, th[f.name])
    group = parser.add_argument_group("method options (defaults are each method's own)")
    for name, f in fields.items():
        hint = hints[name]
        who = ", ".join(owners[name]) if len(owners[name]) < len(specs) else "all methods"
        help_text = f"[{who}] {f.metadata.get('help', '')}"
        if f.default is not dataclasses.MISSING and f.default is not None and len(owners[name]) == 1:
            help_text += f" (default: {f.default})"
        flag = "--" + dest(name).replace("_", "-")
        if hint is bool:
            group.add_argument(flag, dest=dest(name), action=argparse.BooleanOptionalAction, default=None,
                               help=help_text)
            continue
        origin = typing.get_origin(hint)
        args = typing.get_args(hint)
        is_list = origin in (list, tuple) or any(typing.get_origin(a) in (list, tuple) for a in args)
        if is_list:
            group.add_argument(flag, dest=dest(name), type=_csv, default=None, help=help_text, metavar="A,B")
            continue
        scalar = next((a for a in (args or (hint,)) if a in (int, float, str)), str)
        group.add_argument(flag, dest=dest(name), type=scalar, default=None, help=help_text,
                           metavar=name.upper())


def method_config(method: str, args: argparse.Namespace):
    """The config of ``method`` from the parsed flags; flags of other methods are refused."""
    spec = registry.get(method)
    own = {f.name for f in dataclasses.fields(spec.config_cls)}
    foreign = []
    for other in registry.methods():
        for f in dataclasses.fields(other.config_cls):
            if f.name not in own and getattr(args, dest(f.name), None) is not None:
                foreign.append("--" + dest(f.name).replace("_", "-"))
    if foreign:
        raise UserError(f"{', '.join(sorted(set(foreign)))} do(es) not apply to method {method!r}; its options: "
                        + ", ".join("--" + dest(n).replace("_", "-") for n in sorted(own)))
    kwargs = {}
    for f in dataclasses.fields(spec.config_cls):
        value = getattr(args, dest(f.name), None)
        if value is not None:
            kwargs[f.name] = value
    if "targets" in kwargs and isinstance(kwargs["targets"], str):
        kwargs["targets"] = _csv(kwargs["targets"])
    if "layers" in kwargs and kwargs["layers"] is not None:
        try:
            kwargs["layers"] = [int(x) for x in kwargs["layers"]]
        except ValueError:
            raise UserError(f"--layers takes integers, got {','.join(kwargs['layers'])}") from None
    config = spec.config_cls(**kwargs)
    config.validate()
    return config
