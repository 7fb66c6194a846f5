"""The shared vocabulary of every subcommand and the one way results are printed.

``add_model_arg``/``add_data_arg``/``add_out_arg``/``add_json_arg`` give every command the same flags
with the same help. :class:`Output` routes human text to stdout, or to stderr under ``--json``, where
stdout carries exactly one JSON object: the job's result.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

MODEL_HELP = (
    "model to use: a Hugging Face hub id (e.g. gpt2), a local directory saved with save_pretrained, "
    "'embedded' (the embedded default, pretrained on first use and cached) or 'embedded:tiny' "
    "(a seconds-to-train preset). Default: %(default)s"
)
DATA_HELP = (
    "data to use: 'embedded:prose' (stdlib documentation and docstrings), 'embedded:code' (stdlib "
    "source), a text file path, 'hf:NAME[/CONFIG]' (a datasets dataset or a local directory in the "
    "hub layout, e.g. hf:wikitext/wikitext-2-raw-v1), or 'task:NAME' (the task suite). "
    "Default: %(default)s"
)


def add_model_arg(p: argparse.ArgumentParser, default: str = "embedded") -> None:
    p.add_argument("--model", default=default, metavar="SPEC", help=MODEL_HELP)
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow a hub model to run its own Python code (off unless given)",
    )


def add_data_arg(p: argparse.ArgumentParser, default: str = "embedded:prose", flag: str = "--data") -> None:
    p.add_argument(flag, default=default, metavar="SPEC", help=DATA_HELP, dest=flag.lstrip("-").replace("-", "_"))


def add_out_arg(p: argparse.ArgumentParser, required: bool = False, help: str | None = None) -> None:
    p.add_argument("--out", required=required, metavar="DIR", help=help or "directory to write results to")


def add_json_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object with the results on stdout (human output goes to stderr)",
    )


def add_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="'cpu', 'cuda', 'cuda:N' or 'auto' (default: auto)")


#: Commands whose parsers carry one flag per method-config field (building them imports every method).
METHOD_COMMANDS = ("tune", "compress")
_methods_wanted = False


def methods_wanted() -> bool:
    """Whether this invocation's parser needs the per-method flags (set by ``cli.main``)."""
    return _methods_wanted


def want_methods(value: bool) -> None:
    global _methods_wanted
    _methods_wanted = value


class Output:
    """Human text and the JSON result of one command, kept apart so scripts can parse stdout."""

    def __init__(self, args: argparse.Namespace, rank: int = 0):
        self.json = bool(getattr(args, "json", False))
        self.quiet = rank != 0

    @property
    def human(self):
        return sys.stderr if self.json else sys.stdout

    def info(self, msg: str = "") -> None:
        if not self.quiet:
            print(msg, file=self.human, flush=True)

    def result(self, result: dict[str, Any], human: str | None = None) -> None:
        """Print the job's result: JSON on stdout under ``--json``, else ``human`` (or key: value lines)."""
        if self.quiet:
            return
        if self.json:
            print(json.dumps(_jsonable(result), sort_keys=False), flush=True)
        else:
            print(human if human is not None else format_kv(result), flush=True)


def format_kv(d: dict[str, Any], indent: str = "") -> str:
    lines = []
    for k, v in d.items():
        if isinstance(v, dict):
            lines.append(f"{indent}{k}:")
            lines.append(format_kv(v, indent + "  "))
        elif isinstance(v, float):
            lines.append(f"{indent}{k}: {v:.6g}")
        else:
            lines.append(f"{indent}{k}: {v}")
    return "\n".join(lines)


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if hasattr(x, "item") and callable(x.item):
        return x.item()
    if hasattr(x, "__fspath__"):
        return str(x)
    return x
