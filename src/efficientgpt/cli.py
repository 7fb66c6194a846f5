"""The ``efficientgpt`` command-line tool.

Every subcommand shares one vocabulary (see :mod:`efficientgpt.cli_common`): ``--model`` (a hub id, a
local directory, ``embedded`` or ``embedded:tiny``), ``--data`` (``embedded:prose``, ``embedded:code``,
a text file, ``hf:NAME[/CONFIG]``, ``task:NAME``), ``--out DIR`` and ``--json``. With ``--json`` a
command prints exactly one JSON object on stdout and its human-readable output on stderr.

Subcommands live in the modules listed in :data:`COMMAND_MODULES`; each exposes
``register(subparsers)``. Method-specific subcommands read :mod:`efficientgpt.registry`, so a new
method appears here without touching this file. With no arguments the tool runs the main job on the
embedded default.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from efficientgpt import __version__
from efficientgpt.errors import UserError

#: Modules that contribute subcommands, in the order ``--help`` lists them.
COMMAND_MODULES = (
    "efficientgpt.commands.main_job",
    "efficientgpt.commands.bench",
    "efficientgpt.commands.pretrain",
    "efficientgpt.commands.evaluate",
    "efficientgpt.commands.tasks",
    "efficientgpt.commands.tune",
    "efficientgpt.commands.plan",
    "efficientgpt.commands.compress",
    "efficientgpt.commands.distill",
    "efficientgpt.commands.delta_tools",
    "efficientgpt.commands.methods",
    "efficientgpt.survey.cli",
)

EPILOG = """\
examples:
  efficientgpt                                   # the main job: the default bench on the embedded default
  efficientgpt bench --quick --out R --json      # every registered method, a few minutes on 2 cores
  efficientgpt pretrain --model embedded:tiny --json
  efficientgpt eval --model embedded --data embedded:code
  efficientgpt methods --json
  efficientgpt tasks --json
  efficientgpt plan --model llama-7b --method lora --batch 4 --seq 2048
  torchrun --nproc_per_node 2 -m efficientgpt pretrain --model embedded:tiny --out DIR

Run 'efficientgpt COMMAND --help' for a command's options.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="efficientgpt",
        description="Efficient adaptation, compression and training of GPT-style causal LMs.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"efficientgpt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from efficientgpt import cli_common

    # Per-method flags import every method (and torch); build them only when the command uses them.
    cli_common.want_methods(bool(argv) and argv[0] in cli_common.METHOD_COMMANDS)
    parser = build_parser()
    if not argv:
        argv = ["run"]
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        code = args.func(args)
    except UserError as err:
        print(f"efficientgpt {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("efficientgpt: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`efficientgpt survey list | head`): stop quietly, as other Unix
        # tools do, and point stdout at /dev/null so the interpreter's final flush cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, the status a shell reports for a tool killed by a closed pipe
    finally:
        _shutdown_distributed()
    return int(code or 0)


def _shutdown_distributed() -> None:
    if "WORLD_SIZE" not in os.environ:
        return
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - shutting down must never mask the command's own error
        pass
