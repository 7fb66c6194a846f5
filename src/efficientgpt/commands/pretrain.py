"""``efficientgpt pretrain``: pretrain the embedded default (or its tiny preset) on the prose corpus."""

from __future__ import annotations

import argparse
import dataclasses

from efficientgpt.cli_common import Output, add_device_arg, add_json_arg, add_out_arg
from efficientgpt.errors import UserError

EPILOG = """\
examples:
  efficientgpt pretrain                               # the default preset, cached for later use
  efficientgpt pretrain --model embedded:tiny --json  # seconds; JSON has "path"
  efficientgpt pretrain --model embedded:tiny --out DIR --steps 200
  torchrun --nproc_per_node 2 -m efficientgpt pretrain --model embedded:tiny --out DIR --json

Without --out the model is saved into the cache ($EFFICIENTGPT_CACHE, default ~/.cache/efficientgpt)
and reused by every later --model embedded[:tiny]; --force retrains it. With --out it is trained into
DIR; a run killed mid-way resumes from DIR.work/checkpoints with --resume.
"""


def register(sub) -> None:
    p = sub.add_parser("pretrain", help="pretrain the embedded default model on the stdlib prose corpus",
                       description="Pretrain an embedded preset with the shared Trainer and save it "
                                   "(save_pretrained, safetensors) with its tokenizer.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="embedded", metavar="SPEC",
                   help="the preset to pretrain: 'embedded' (default) or 'embedded:tiny'")
    add_out_arg(p, help="directory to save the model to (default: the cache)")
    p.add_argument("--steps", type=int, default=None, help="override the preset's optimizer steps")
    p.add_argument("--resume", action="store_true", help="resume from the newest checkpoint of this --out")
    p.add_argument("--force", action="store_true", help="retrain even if the cached model exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_device_arg(p)
    add_json_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from efficientgpt.models import embedded
    from efficientgpt.models.loading import is_embedded
    from efficientgpt.train import distributed

    if not is_embedded(args.model):
        raise UserError(f"pretrain trains an embedded preset; got --model {args.model!r}. "
                        "Use embedded or embedded:tiny (fine-tune other models with 'tune')")
    preset = embedded.preset_of(args.model)
    if args.steps is not None:
        preset = dataclasses.replace(preset, steps=args.steps)
        preset.validate()
    dist = distributed.init(args.device)
    out = Output(args, rank=dist.rank)
    progress = not args.no_progress
    if args.out is None and not args.force and args.steps is None and dist.world == 1:
        path = embedded.cached_path(preset)
        if (path / "config.json").exists():
            out.result({"path": str(path), "preset": preset.name, "cached": True},
                       human=f"embedded:{preset.name} is cached at {path} (--force retrains it)")
            return 0
    target = args.out or str(embedded.cached_path(preset))
    out.info(f"pretraining embedded:{preset.name} ({preset.steps} steps, {dist.world} process(es)) -> {target}")
    metrics = embedded.pretrain(preset, target, progress=progress, resume=args.resume, dist=dist)
    metrics["cached"] = False
    out.result(metrics, human=(
        f"saved {target}\n"
        f"  parameters          {metrics['parameters']:,}\n"
        f"  validation ppl      prose {metrics.get('val_ppl_prose', float('nan')):.2f}   "
        f"code {metrics.get('val_ppl_code', float('nan')):.2f}\n"
        f"  wall time           {metrics['wall_s']:.1f} s"))
    return 0
