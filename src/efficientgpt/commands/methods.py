"""``efficientgpt methods``: list the registered methods."""

from __future__ import annotations

import argparse

from efficientgpt.cli_common import Output, add_json_arg


def register(sub) -> None:
    p = sub.add_parser(
        "methods",
        help="list the registered methods (name, family, paper)",
        description="List every registered method with its family and the survey id of its paper.",
        epilog="examples:\n  efficientgpt methods\n  efficientgpt methods --family peft --json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--family", default=None, help="only this family (peft, prune, lowrank, quant, ...)")
    add_json_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from efficientgpt import registry

    specs = registry.methods(args.family)
    rows = [s.describe() for s in specs]
    lines = [f"{'name':<20} {'family':<10} {'paper':<24} summary"]
    lines += [f"{r['name']:<20} {r['family']:<10} {r['paper']:<24} {r['summary']}" for r in rows]
    if not rows:
        lines.append("(no methods registered)")
    Output(args).result({"methods": rows, "count": len(rows)}, human="\n".join(lines))
    return 0
