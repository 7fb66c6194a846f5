"""``efficientgpt run`` (also ``efficientgpt`` with no arguments): the main job, the default benchmark.

Pretrains the embedded default model if it is not cached, then runs every registered method on it
side by side (:mod:`efficientgpt.bench.runner`): PEFT methods adapt it to the code domain, compression
methods are calibrated and scored on held-out prose, next to the untouched base model and full
fine-tuning. Results go to ``bench-results/`` under the current directory (``--out`` to change): one
JSON per run, ``report.md`` and PNG plots; the table is printed at the end. ``--model embedded:tiny``
runs the quick preset on the tiny model. It takes every option of ``efficientgpt bench``.
"""

from __future__ import annotations

import argparse

from efficientgpt.commands.bench import DEFAULT_OUT, add_bench_args, run_bench_command

EPILOG = f"""\
examples:
  efficientgpt                                  # the default bench on the embedded default -> {DEFAULT_OUT}/
  efficientgpt run --model embedded:tiny --json # the quick preset on the tiny model
  efficientgpt run --out R --with-peft          # also HF PEFT's LoRA, (IA)^3, prompt and prefix tuning

Rerunning skips the runs whose results are in the output directory (--force reruns them); an
interrupted run resumes. 'efficientgpt bench --help' describes every option.
"""


def register(sub) -> None:
    p = sub.add_parser("run", help="the main job: benchmark every registered method on the embedded default",
                       description="The main job (what 'efficientgpt' with no arguments runs): pretrain the "
                                   "embedded default if it is not cached, then benchmark every registered "
                                   "method on it side by side and write the results directory.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_bench_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if getattr(args, "model", None) == "embedded:tiny":
        args.quick = True  # the tiny model is the quick preset's model
    return run_bench_command(args)
