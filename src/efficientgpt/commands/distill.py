"""``efficientgpt distill``: train a smaller student to match a teacher with the shared Trainer."""

from __future__ import annotations

import argparse
import dataclasses

from efficientgpt.cli_common import MODEL_HELP, Output, add_data_arg, add_device_arg, add_json_arg, add_out_arg
from efficientgpt.config import add_arguments
from efficientgpt.train.config import TrainConfig

EPILOG = """\
examples:
  efficientgpt distill --teacher embedded:tiny --student drop-layers:2 --loss fkl --steps 50 --out S --json
  efficientgpt distill --teacher embedded --student width:0.5 --loss skl --skew 0.1 --out S
  efficientgpt distill --teacher embedded --student drop-layers:2 --loss hidden --layer-map 0:1,1:3 --out S
  efficientgpt distill --teacher embedded --student drop-layers:2 --loss rkl --on-policy 0.5 --out S
  efficientgpt distill --teacher embedded --student keep-layers:0,3 --cache-teacher --teacher-topk 64 \\
      --epoch-steps 50 --steps 200 --out S
  efficientgpt eval --model S --data embedded:prose --json

Students: 'drop-layers:k' keeps every k-th layer counting down from the last (the last layer is always
kept), 'keep-layers:i,j,...' keeps the listed layers, 'width:r' removes the fraction r of attention-head
groups and MLP channels by structured pruning; all three start from the teacher's weights. Any other
spec is a model (hub id, directory, embedded[:tiny]) sharing the teacher's tokenizer.

Objectives: fkl = alpha * tau^2 * KL(p_T || p_S) + (1 - alpha) * CE (Hinton et al.), rkl = reverse KL
(MiniLLM), skl / srkl = skew KL (DistiLLM), hidden / attn_out = MSE of block / attention outputs
(with a learned projection when the widths differ). --on-policy makes that fraction of steps train on
the student's own samples (GKD). The student is saved in --out with its tokenizer (load it with
--model S), beside the run's checkpoints, metrics.jsonl and result.json.
"""


def register(sub) -> None:
    from efficientgpt.compress.distill import DistillConfig

    p = sub.add_parser("distill", help="distil a teacher into a smaller student (KD, skew KL, on-policy)",
                       description="Knowledge distillation of a causal LM into a smaller student.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="embedded", metavar="SPEC", help=MODEL_HELP)
    p.add_argument("--student", default="drop-layers:2", metavar="SPEC",
                   help="the student: drop-layers:K, keep-layers:I,J,..., width:R, or a model spec with the "
                        "teacher's tokenizer (default: %(default)s)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow a hub model to run its own Python code (off unless given)")
    add_data_arg(p, default="embedded:prose")
    add_out_arg(p, required=True, help="run directory: the student model, checkpoints, metrics.jsonl, result.json")
    p.add_argument("--resume", action="store_true", help="resume from the newest checkpoint in --out")
    p.add_argument("--eval-tokens", type=int, default=65536,
                   help="validation tokens scored for teacher and student (0: all; default: %(default)s)")
    add_device_arg(p)
    add_json_arg(p)
    add_arguments(p.add_argument_group("distillation options"), DistillConfig)
    train = p.add_argument_group("training options")
    add_arguments(train, TrainConfig, skip=("save_trainable_only", "progress"),
                  defaults={"steps": 100, "warmup_steps": "min(10, steps/10)", "seq_len": "min(128, context)"})
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from efficientgpt.compress.distill import DistillConfig, distill
    from efficientgpt.config import from_args
    from efficientgpt.train import distributed

    config = from_args(DistillConfig, args)
    dist = distributed.init(args.device)
    out = Output(args, rank=dist.rank)
    train = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
             if getattr(args, f.name, None) is not None}
    train["progress"] = not args.no_progress and not out.quiet and not out.json
    s = distill(args.teacher, args.student, config, data=args.data, out=args.out, train=train, resume=args.resume,
                eval_tokens=args.eval_tokens or None, device=args.device, trust_remote_code=args.trust_remote_code,
                log=out.info, progress=not out.json)
    if dist.is_main:
        s = {k: v for k, v in s.items() if k not in ("student_model", "distiller")}
        e, n = s["eval"], s["parameters"]
        out.result(s, human=(
            f"saved the {args.student} student to {args.out}\n"
            f"  parameters     teacher {n['teacher']:,}, student {n['student']:,} "
            f"({n['student'] / n['teacher']:.1%})\n"
            f"  train loss     {s['losses']['train_first']:.4f} -> {s['losses']['train_final']:.4f} "
            f"({config.loss}, {s['train']['steps']} steps)\n"
            f"  perplexity     teacher {e['ppl_teacher']:.3f}; student {e['ppl_before']:.3f} -> "
            f"{e['ppl_after']:.3f} on {args.data} (validation)"))
    return 0
