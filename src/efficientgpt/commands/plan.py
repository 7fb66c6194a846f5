"""``efficientgpt plan``: predict the memory and FLOPs of a training configuration before running it."""

from __future__ import annotations

import argparse

from efficientgpt.cli_common import Output, add_json_arg
from efficientgpt.config import add_arguments

EPILOG = """\
examples:
  efficientgpt plan --model llama-7b --method lora --batch 4 --seq 2048 --json
  efficientgpt plan --model llama-13b --method qlora --precision bf16 --optimizer paged_adamw8bit
  efficientgpt plan --model llama-70b --method full --devices 8 --gradient-checkpointing
  efficientgpt plan --model gpt2 --method full --precision fp32 --batch 4 --seq 256
  efficientgpt plan --model ./my-model --method lora --targets all-linear --rank 16

--model takes a preset (the published dimensions of: {presets}), a hub id or a local directory with
a config.json, or embedded[:tiny]. The report gives weights, gradients, optimizer states, kept
activations and the peak of one optimizer step on one device, then per-device peaks for 1..N
devices under DDP (replicated) and FSDP (sharded), the inference KV cache, and FLOPs per step.
The activation model counts, term by term, the tensors the transformers implementations keep for
the backward (see the efficientgpt.plan docstring and docs/training.md); --batch is the global batch.
"""


def register(sub) -> None:
    from efficientgpt.plan import PRESETS, PlanConfig

    p = sub.add_parser("plan", help="predict training memory (weights, gradients, optimizer, activations) and FLOPs",
                       description="Predict the memory and compute of fine-tuning or training a model.",
                       epilog=EPILOG.format(presets=", ".join(PRESETS)),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, metavar="SPEC",
                   help="a preset (llama-7b, llama-13b, llama-70b, gpt2, qwen2-0.5b, ...), a hub id, a local "
                        "model directory, or embedded[:tiny]")
    p.add_argument("--trust-remote-code", action="store_true", help="allow a hub config to run its own code")
    add_arguments(p, PlanConfig)
    add_json_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from efficientgpt.config import from_args
    from efficientgpt.plan import PlanConfig, load_shape, plan, render

    cfg = from_args(PlanConfig, args)
    shape = load_shape(args.model, trust_remote_code=args.trust_remote_code)
    result = plan(shape, cfg)
    Output(args).result(result, human=render(result))
    return 0
