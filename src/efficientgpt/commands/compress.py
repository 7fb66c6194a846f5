"""``efficientgpt compress``: post-training pruning, low-rank decomposition and quantization."""

from __future__ import annotations

import argparse

from efficientgpt.cli_common import (
    Output,
    add_data_arg,
    add_device_arg,
    add_json_arg,
    add_model_arg,
    methods_wanted,
)
from efficientgpt.compress.calibration import CalibrationConfig
from efficientgpt.config import add_arguments, from_args

FAMILIES = ("prune", "lowrank", "quant", "attention")

EPILOG = """\
examples:
  efficientgpt compress --model embedded:tiny --method magnitude --sparsity 0.5 --out C --json
  efficientgpt compress --model embedded:tiny --method wanda --sparsity 0.5 --out C --json
  efficientgpt compress --model embedded:tiny --method sparsegpt --sparsity 2:4 --out C --json
  efficientgpt compress --model embedded:tiny --method svd_llm --ratio 0.5 --out C --json
  efficientgpt compress --model embedded:tiny --method gptq --bits 4 --group-size 32 --out C --json
  efficientgpt eval --model C --data embedded:prose --json

Calibrated methods draw --calib-samples windows from --calib-data (embedded prose by default);
perplexity before and after is measured on the validation split of --data. The compressed model in
--out loads back with --model C.
"""


def register(sub) -> None:
    p = sub.add_parser("compress", help="prune, factorise or quantize a model (magnitude, wanda, gptq, ...)",
                       description="Compress a causal LM with a registered compression method and save it.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", required=True, help="registered compression method (see 'efficientgpt methods')")
    add_model_arg(p)
    add_data_arg(p, default="embedded:prose")
    p.add_argument("--out", required=True, metavar="DIR", help="directory for the compressed model")
    p.add_argument("--eval-tokens", type=int, default=65536,
                   help="validation tokens scored before and after (0: all; default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_device_arg(p)
    add_json_arg(p)
    add_arguments(p.add_argument_group("calibration options"), CalibrationConfig)
    if methods_wanted():
        from efficientgpt.commands.methodflags import add_method_flags

        add_method_flags(p, family=FAMILIES)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from efficientgpt import pipeline
    from efficientgpt.commands.methodflags import method_config

    out = Output(args)
    config = method_config(args.method, args)
    calib = from_args(CalibrationConfig, args)
    s = pipeline.compress(args.model, args.method, config, out=args.out, calibration=calib, eval_data=args.data,
                          eval_tokens=args.eval_tokens or None, device=args.device,
                          trust_remote_code=args.trust_remote_code, progress=not (args.no_progress or out.json),
                          log=out.info)
    s = {k: v for k, v in s.items() if k != "loaded"}
    e = s["eval"]
    achieved = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in s["achieved"].items())
    out.result(s, human=(
        f"{args.method}: {achieved}\n"
        f"  parameters  {s['size_before']['parameters']:,} -> {s['size_after']['parameters']:,} "
        f"(nonzero {s['size_after']['nonzero_parameters']:,})\n"
        f"  bytes       {s['size_before']['bytes']:,} -> {s['size_after']['bytes']:,} in memory, "
        f"{s.get('files_bytes', 0):,} on disk\n"
        f"  perplexity  {e['ppl_before']:.3f} -> {e['ppl_after']:.3f} on {args.data} (validation)\n"
        f"  saved       {args.out}"))
    return 0
