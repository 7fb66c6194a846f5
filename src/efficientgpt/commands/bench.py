"""``efficientgpt bench``: every registered method side by side; ``efficientgpt bench report``: render results."""

from __future__ import annotations

import argparse
import sys
import time

from efficientgpt.bench.runner import DEFAULT_TASKS
from efficientgpt.cli_common import Output, add_device_arg, add_json_arg
from efficientgpt.errors import UserError

DEFAULT_OUT = "bench-results"

EPILOG = """\
examples:
  efficientgpt bench --quick                       # the whole registry on embedded:tiny, a few minutes
  efficientgpt bench                               # the default run on the embedded default -> bench-results/
  efficientgpt bench --methods lora,ia3 --with-peft --out R --json
  efficientgpt bench --suite compress --model embedded:tiny --out R
  efficientgpt bench report --results benchmarks/results --readme README.md
  efficientgpt bench report --results benchmarks/results --readme README.md --check

Each run writes OUT/<run>.json as soon as it ends; rerunning skips runs whose results exist (same
settings) unless --force, so an interrupted bench resumes. A method that fails is recorded as failed
and the bench goes on. OUT/report.md and the PNG plots are rendered from the JSON files.
"""


def add_bench_args(p: argparse.ArgumentParser, out_default: str | None = DEFAULT_OUT) -> None:
    """The options of a bench run (shared with the main job)."""
    sel = p.add_argument_group("what to run")
    sel.add_argument("--suite", default="all", choices=("all", "peft", "compress"),
                     help="which families: all registered methods (default), peft (incl. full fine-tuning), "
                          "or compress (prune, lowrank, quant, attention)")
    sel.add_argument("--methods", default=None, metavar="A,B,...",
                     help="only these registered methods (the untouched base model always runs)")
    sel.add_argument("--with-peft", action="store_true",
                     help="also run Hugging Face PEFT's implementation of lora, ia3, prompt_tuning, prefix_tuning "
                          "(and llama_adapter) and report ours/PEFT ratios")
    sel.add_argument("--quick", action="store_true",
                     help="the quick preset: embedded:tiny (unless --model), 30 steps, small evaluation; the whole "
                          "registry in a few minutes on 2 CPU cores")
    sel.add_argument("--force", action="store_true", help="rerun runs whose results already exist")
    setup = p.add_argument_group("shared settings")
    setup.add_argument("--model", default=None, metavar="SPEC",
                       help="base model: a hub id, a local directory, embedded (default) or embedded:tiny "
                            "(default with --quick)")
    setup.add_argument("--data", default="embedded:code", metavar="SPEC",
                       help="data the PEFT methods adapt to and are scored on (default: %(default)s)")
    setup.add_argument("--compress-data", default="embedded:prose", metavar="SPEC",
                       help="data compression methods calibrate on and are scored on (default: %(default)s)")
    setup.add_argument("--tasks", default=None, metavar="A,B,...|none",
                       help="also run every PEFT method on these suite tasks, as task:NAME data (default: "
                            f"{','.join(DEFAULT_TASKS)}; 'none' for none; 'efficientgpt tasks' lists them)")
    setup.add_argument("--steps", type=int, default=None, help="optimizer steps per PEFT method (default 120; 30 quick)")
    setup.add_argument("--batch-size", type=int, default=None, help="sequences per step (default 8)")
    setup.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default min(128, context))")
    setup.add_argument("--lr", type=float, default=None,
                       help="one learning rate for every method (default: each method's conventional rate)")
    setup.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    setup.add_argument("--eval-tokens", type=int, default=None,
                       help="validation tokens per evaluation (default 16384; 4096 quick)")
    setup.add_argument("--calib-samples", type=int, default=None,
                       help="calibration windows for calibrated compression (default 32; 8 quick)")
    setup.add_argument("--latency-tokens", type=int, default=None,
                       help="tokens generated to time decoding (default 32; 16 quick; 0 skips)")
    add_device_arg(setup)
    outp = p.add_argument_group("output")
    outp.add_argument("--out", default=out_default, metavar="DIR",
                      help="results directory: one JSON per run, report.md, PNG plots (default: %(default)s)")
    outp.add_argument("--keep-artifacts", action="store_true",
                      help="keep each run's delta or compressed model under OUT/artifacts")
    outp.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_json_arg(outp)


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmark every registered method side by side (quality, size, speed)",
                       description="Run every registered method (or a suite, or --methods) on the same base "
                                   "model, data, token budget and seed; write one JSON per run, a Markdown "
                                   "report and PNG plots; print the table.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_bench_args(p)
    p.set_defaults(func=run)
    bsub = p.add_subparsers(dest="bench_command", metavar="report")
    r = bsub.add_parser("report", help="render report.md, the plots and the README section from a results directory",
                        description="Render OUT/report.md and the PNG plots from the run files of a results "
                                    "directory, and (with --readme) the README section between "
                                    "<!-- bench-results:start --> and <!-- bench-results:end -->.")
    r.add_argument("--results", default="benchmarks/results", metavar="DIR",
                   help="results directory (default: %(default)s)")
    r.add_argument("--readme", default=None, metavar="FILE", help="also regenerate the results section of FILE")
    r.add_argument("--check", action="store_true",
                   help="write nothing; exit 1 if report.md or the README section is stale")
    r.add_argument("--no-plots", action="store_true", help="do not redraw the PNG plots")
    add_json_arg(r)
    r.set_defaults(func=run_report)


def bench_config(args: argparse.Namespace):
    from efficientgpt.bench.runner import QUICK, BenchConfig

    values = dict(QUICK) if args.quick else {}
    values["quick"] = bool(args.quick)
    for name in ("model", "steps", "batch_size", "seq_len", "lr", "eval_tokens", "calib_samples", "latency_tokens"):
        if getattr(args, name, None) is not None:
            values[name] = getattr(args, name)
    if args.tasks is not None:
        values["tasks"] = [] if args.tasks.strip() == "none" else [t.strip() for t in args.tasks.split(",") if t.strip()]
    cfg = BenchConfig(data=args.data, compress_data=args.compress_data, seed=args.seed, device=args.device,
                      with_peft=args.with_peft, keep_artifacts=args.keep_artifacts, progress=not args.no_progress,
                      **values)
    cfg.validate()
    return cfg


def methods_arg(value: str | None) -> list[str] | None:
    if value is None:
        return None
    names = [m.strip() for m in value.split(",") if m.strip()]
    if not names:
        raise UserError("--methods is empty; give registered method names separated by commas")
    return names


def run(args: argparse.Namespace) -> int:
    if getattr(args, "bench_command", None) == "report":
        return run_report(args)
    return run_bench_command(args)


def run_bench_command(args: argparse.Namespace) -> int:
    from efficientgpt.bench import report, runner
    from efficientgpt.train import distributed

    cfg = bench_config(args)
    dist = distributed.init(cfg.device)
    out = Output(args, rank=dist.rank)
    methods = methods_arg(args.methods)
    runner.plan(cfg, args.suite, methods)  # unknown names fail here, before the model loads
    t0 = time.perf_counter()
    out.info(f"bench: {cfg.model} -> {args.out} (suite {args.suite if not methods else ','.join(methods)}"
             f"{', quick' if cfg.quick else ''}{', with HF PEFT' if cfg.with_peft else ''})")

    def log(msg: str) -> None:
        if dist.is_main:
            from tqdm.auto import tqdm

            tqdm.write(msg, file=out.human if not out.json else sys.stderr)

    outcomes = runner.run_bench(cfg, args.out, suite=args.suite, methods=methods, force=args.force, log=log)
    wall = time.perf_counter() - t0
    if not dist.is_main:
        return 0
    rendered = report.write(args.out)
    runs, _ = report.load_runs(args.out)
    names = {o.name for o in outcomes}
    shown = [r for r in runs if r["name"] in names]
    result = {
        "out": str(args.out), "report": rendered["report"], "plots": rendered["plots"], "wall_s": wall,
        "runs": [{"name": o.name, "method": o.record["method"], "family": o.record["family"],
                  "kind": o.record["kind"], "status": o.record["status"],
                  "error": (o.record.get("error") or {}).get("message"), "reused": o.reused,
                  "path": str(o.path), "metrics": o.record["metrics"]} for o in outcomes],
        "peft_ratios": {theirs["name"]: report.ratios(ours, theirs) for theirs, ours in report.peft_pairs(shown)},
    }
    failed = [o.name for o in outcomes if o.record["status"] == "failed"]
    human = report.text_tables(shown) + (
        f"\n{len(outcomes)} runs ({sum(o.reused for o in outcomes)} reused"
        f"{', failed: ' + ', '.join(failed) if failed else ''}) in {wall:.1f} s; report: {rendered['report']}")
    out.result(result, human=human)
    return 0


def run_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from efficientgpt.bench import report

    out = Output(args)
    if not Path(args.results).is_dir():
        raise UserError(f"results directory {args.results!r} does not exist; run 'efficientgpt bench --out DIR' first")
    if args.check:
        stale = report.check(args.results, args.readme)
        out.result({"stale": stale, "ok": not stale},
                   human="\n".join(stale) + "\nregenerate with: efficientgpt bench report --results "
                         f"{args.results}{' --readme ' + args.readme if args.readme else ''}" if stale
                   else "report and README section are up to date")
        return 1 if stale else 0
    written = report.write(args.results, args.readme, plots=not args.no_plots)
    for w in written["warnings"]:
        out.info(f"warning: {w}")
    out.result(written, human=f"wrote {written['report']}" + "".join(f"\nwrote {p}" for p in written["plots"])
               + (f"\n{'updated' if written.get('readme_changed') else 'unchanged'} {written['readme']}"
                  if args.readme else ""))
    return 0
