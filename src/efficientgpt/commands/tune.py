"""``efficientgpt tune``: attach a registered method and train it with the shared Trainer."""

from __future__ import annotations

import argparse
import json
import time

from efficientgpt.cli_common import (
    Output,
    add_data_arg,
    add_device_arg,
    add_json_arg,
    add_model_arg,
    add_out_arg,
    methods_wanted,
)
from efficientgpt.config import add_arguments, from_args

EPILOG = """\
examples:
  efficientgpt tune --model embedded:tiny --method lora --targets q,v --rank 4 --steps 30 --out D --json
  efficientgpt tune --method ia3 --data embedded:code --steps 200 --out runs/ia3
  efficientgpt tune --method dylora --rank 8 --mode frozen --out runs/dylora
  efficientgpt tune --method lora --out D --resume          # continue a killed run from its checkpoint
  torchrun --nproc_per_node 2 -m efficientgpt tune --method lora --out D

The default job adapts the embedded prose model to the embedded code domain. The delta is saved in
--out (delta_config.json + delta.safetensors) with the run's checkpoints, metrics.jsonl and
result.json; use it with 'eval --delta', 'merge --delta' and 'export --delta'.
"""


def register(sub) -> None:
    from efficientgpt.train.config import TrainConfig

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
    train = p.add_argument_group("training options")
    add_arguments(train, TrainConfig, skip=("save_trainable_only", "progress"),
                  defaults={"steps": 100, "warmup_steps": "min(10, steps/10)", "seq_len": "min(128, context)"})
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    if methods_wanted():
        from efficientgpt.commands.methodflags import add_method_flags

        add_method_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from efficientgpt.commands.methodflags import method_config
    from efficientgpt.data import sources, tokens
    from efficientgpt.eval.perplexity import default_seq_len, perplexity
    from efficientgpt.models.loading import load_model
    from efficientgpt.peft import core
    from efficientgpt.registry import get
    from efficientgpt.train import distributed
    from efficientgpt.train.config import TrainConfig
    from efficientgpt.train.trainer import Trainer

    spec = get(args.method)
    config = method_config(args.method, args)
    dist = distributed.init(args.device)
    out = Output(args, rank=dist.rank)
    t0 = time.perf_counter()
    loaded = load_model(args.model, trust_remote_code=args.trust_remote_code, device=dist.device,
                        progress=dist.is_main)
    model, tok = loaded.model, loaded.tokenizer
    context = default_seq_len(model)
    steps = args.steps or 100
    train_cfg = from_args(
        TrainConfig, args, steps=steps, warmup_steps=min(10, steps // 10), seq_len=min(128, context),
        save_trainable_only=True, progress=not args.no_progress and not out.quiet,
    )
    train_text = sources.load_text(args.data, "train")
    val_text = sources.load_text(args.data, "validation")
    train_ids, val_ids = tokens.encode(tok, train_text), tokens.encode(tok, val_text)
    eval_tokens = args.eval_tokens or None

    def evaluate(m) -> float:
        return perplexity(m, val_ids, train_cfg.seq_len, batch_size=16, max_tokens=eval_tokens).loss

    before = evaluate(model) if dist.is_main else None
    torch.manual_seed(train_cfg.seed)
    delta = spec.apply(model, config)
    counts = core.count_parameters(model)
    out.info(f"{args.method} on {args.model}: {counts['trainable']:,} trainable of {counts['total']:,} "
             f"parameters ({counts['trainable_pct']:.3f}%)")
    sampler = tokens.WindowSampler(train_ids, train_cfg.seq_len, train_cfg.batch_size, seed=train_cfg.seed,
                                   rank=dist.rank, world=dist.world)
    trainer = Trainer(
        model, train_cfg, sampler, out_dir=args.out, eval_fn=evaluate if dist.is_main else None,
        fingerprint={"data": train_text.fingerprint, "method": args.method,
                     "method_config": json.loads(json.dumps(config.to_dict(), default=str)),
                     "base": delta.base_fingerprint},
        dist=dist, step_callbacks=[delta.on_step_begin],
    )
    result = trainer.train(resume=args.resume)
    summary = {
        "path": args.out,
        "method": args.method,
        "config": config.to_dict(),
        "model": loaded.describe(),
        "data": train_text.describe(),
        "parameters": counts,
        "train": result.to_dict(),
    }
    if dist.is_main:
        summary["delta_bytes"] = sum(t.numel() * t.element_size() for t in delta.state_dict().values())
        core.save_delta(delta, args.out, extra={"base_model": {"spec": args.model, "path": loaded.path}})
        summary["eval"] = {"split": "validation", "tokens": eval_tokens, "loss_before": before,
                           "loss_after": result.eval_loss,
                           "ppl_before": _exp(before), "ppl_after": _exp(result.eval_loss)}
        summary["wall_s"] = time.perf_counter() - t0
        from efficientgpt.cache import atomic_write_json

        atomic_write_json(f"{args.out}/result.json", json.loads(json.dumps(summary, default=str)))
    distributed.barrier()
    if dist.is_main:
        e = summary["eval"]
        out.result(summary, human=(
            f"saved {args.method} delta to {args.out}\n"
            f"  trainable      {counts['trainable']:,} ({counts['trainable_pct']:.3f}%), "
            f"{summary['delta_bytes']:,} bytes\n"
            f"  validation ppl {e['ppl_before']:.3f} -> {e['ppl_after']:.3f} on {args.data}\n"
            f"  step time      {result.step_time_s * 1000:.1f} ms, {result.tokens_per_s:,.0f} tokens/s"))
    return 0


def _exp(x):
    import math

    return math.exp(x) if x is not None and x < 700 else None
