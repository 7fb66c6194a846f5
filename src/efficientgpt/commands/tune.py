"""``efficientgpt tune``: attach a registered method and train it with the shared Trainer."""

from __future__ import annotations

import argparse
import dataclasses

from efficientgpt.cli_common import (
    Output,
    add_data_arg,
    add_device_arg,
    add_json_arg,
    add_model_arg,
    add_out_arg,
    methods_wanted,
)
from efficientgpt.config import add_arguments
from efficientgpt.train.config import TrainConfig

EPILOG = """\
examples:
  efficientgpt tune --model embedded:tiny --method lora --targets q,v --rank 4 --steps 30 --out D --json
  efficientgpt tune --method ia3 --data embedded:code --steps 200 --out runs/ia3
  efficientgpt tune --method dylora --rank 8 --mode frozen --out runs/dylora
  efficientgpt tune --method lora --out D --resume          # continue a killed run from its checkpoint
  torchrun --nproc_per_node 2 -m efficientgpt tune --method lora --out D
  efficientgpt tune --model embedded:tiny --method lora --quantize nf4 --steps 10 --out Q --json   # QLoRA
  efficientgpt tune --method full --optimizer adamw8bit --bf16 --gradient-checkpointing --out F8
  torchrun --nproc_per_node 2 -m efficientgpt tune --model embedded:tiny --method full --fsdp --steps 5 --out F

The default job adapts the embedded prose model to the embedded code domain. The delta is saved in
--out (delta_config.json + delta.safetensors) with the run's checkpoints, metrics.jsonl and
result.json; use it with 'eval --delta', 'merge --delta' and 'export --delta'.

Memory options (docs/training.md): --bf16, --gradient-checkpointing, --grad-accum, --optimizer
adamw8bit|paged_adamw|paged_adamw8bit (bitsandbytes), --quantize nf4 (QLoRA: NF4 base under the
method; a QLoRA delta loads onto the unquantized base with 'eval --delta' and 'merge'), --fsdp
(under torchrun: shard parameters, gradients and optimizer states). 'efficientgpt plan' predicts
the memory of a configuration before it runs.
"""


def register(sub) -> None:
    p = sub.add_parser("tune", help="fine-tune a model with a registered method (lora, ia3, ...)",
                       description="Attach a parameter-efficient method to a causal LM and train it.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", required=True, help="registered method name (see 'efficientgpt methods')")
    add_model_arg(p)
    add_data_arg(p, default="embedded:code")
    add_out_arg(p, required=True, help="run directory: the delta, checkpoints, metrics.jsonl, result.json")
    p.add_argument("--resume", action="store_true", help="resume from the newest checkpoint in --out")
    p.add_argument("--eval-tokens", type=int, default=65536,
                   help="validation tokens scored before and after training (0: all; default: %(default)s)")
    add_device_arg(p)
    add_json_arg(p)
    p.add_argument("--quantize", choices=("none", "nf4"), default="none",
                   help="store the base model's decoder linear layers in 4-bit NormalFloat before attaching the "
                        "method (QLoRA; needs bitsandbytes; default: %(default)s)")
    p.add_argument("--quantize-compute-dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="dtype of the matrix products with NF4 weights (auto: bfloat16 on CUDA, the model's "
                        "dtype elsewhere)")
    train = p.add_argument_group("training options")
    add_arguments(train, TrainConfig, skip=("save_trainable_only", "progress"),
                  defaults={"steps": 100, "warmup_steps": "min(10, steps/10)", "seq_len": "min(128, context)"})
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    if methods_wanted():
        from efficientgpt.commands.methodflags import add_method_flags

        add_method_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from efficientgpt import pipeline
    from efficientgpt.commands.methodflags import method_config
    from efficientgpt.train import distributed

    config = method_config(args.method, args)
    dist = distributed.init(args.device)
    out = Output(args, rank=dist.rank)
    train = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
             if getattr(args, f.name, None) is not None}
    train["progress"] = not args.no_progress and not out.quiet
    summary = pipeline.tune(args.model, args.method, config, data=args.data, out=args.out, train=train,
                            resume=args.resume, eval_tokens=args.eval_tokens or None, device=args.device,
                            trust_remote_code=args.trust_remote_code, log=out.info, quantize=args.quantize,
                            quantize_compute_dtype=args.quantize_compute_dtype)
    if dist.is_main:
        summary = {k: v for k, v in summary.items() if k not in ("delta", "loaded")}
        e, counts, result = summary["eval"], summary["parameters"], summary["train"]
        out.result(summary, human=(
            f"saved {args.method} delta to {args.out}\n"
            f"  trainable      {counts['trainable']:,} ({counts['trainable_pct']:.3f}%), "
            f"{summary['delta_bytes']:,} bytes\n"
            f"  validation     loss {e['loss_before']:.4f} -> {e['loss_after']:.4f} on {args.data}\n"
            f"  step time      {result['step_time_s'] * 1000:.1f} ms, {result['tokens_per_s']:,.0f} tokens/s"))
    return 0
