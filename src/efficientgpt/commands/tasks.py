"""``efficientgpt tasks``: list the task suite (and the benchmarks ``task:`` specs can load)."""

from __future__ import annotations

import argparse

from efficientgpt.cli_common import Output, add_json_arg

EPILOG = """\
examples:
  efficientgpt tasks
  efficientgpt tasks --role target --json
  efficientgpt tune --model embedded:tiny --method lora --data task:code_or_prose --steps 60 --out D
  efficientgpt eval --model embedded:tiny --delta D --data task:code_or_prose --json

Data specs: task:NAME (a task), task:NAME@16 (16 training examples, a fixed seeded subset),
task:source / task:target / task:all (mixtures), task:glue/sst2 and the other benchmarks below
(through the datasets library), task:hf:DIR (a local benchmark directory in the hub layout);
append ?k=K&seed=S&eval=N for K shots, few-shot seed S and N evaluation examples per task.
Choice tasks are scored by rank classification (lowest length-normalised NLL), generation tasks by
exact match of greedy decoding.
"""


def register(sub) -> None:
    p = sub.add_parser("tasks", help="list the task suite (name, format, role, split sizes)",
                       description="List the generated tasks of the suite and the loadable benchmarks.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--role", default=None, choices=("source", "target"), help="only tasks of this role")
    add_json_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from efficientgpt.data import tasks, tasks_real

    rows = [t.describe() for t in tasks.TASKS.values() if args.role is None or t.role == args.role]
    benchmarks = [b.describe() for b in tasks_real.BENCHMARKS.values()] if args.role is None else []
    result = {"tasks": rows, "count": len(rows),
              "source": [t.name for t in tasks.source_tasks()], "target": [t.name for t in tasks.target_tasks()],
              "benchmarks": benchmarks, "suite_seed": tasks.SUITE_SEED, "suite_version": tasks.SUITE_VERSION}
    lines = [f"{'name':<18} {'format':<11} {'role':<7} {'train':>6} {'val':>5} {'test':>5}  description"]
    for r in rows:
        s = r["splits"]
        lines.append(f"{r['name']:<18} {r['format']:<11} {r['role']:<7} {s['train']:>6} {s['validation']:>5} "
                     f"{s['test']:>5}  {r['description']}")
    if benchmarks:
        lines.append("\nbenchmarks (task:NAME through datasets, or task:hf:DIR for a local copy):")
        lines += [f"  {b['name']:<18} {b['hub']:<22} {b['description']}" for b in benchmarks]
    Output(args).result(result, human="\n".join(lines))
    return 0
