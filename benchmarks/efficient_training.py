"""Peak training memory and step time of the efficient-training options, with the planner's prediction.

Model: GPT-2-small shape built from config (124M parameters, random init: memory and time do not
depend on the weights; dropout 0, as when fine-tuning). Variants, each in a fresh subprocess (one
optimizer step's peak above the memory held after building the model and the optimizer, then the
median time of ``--steps`` steps; see :func:`efficientgpt.plan.measure_step`):

  full              full fine-tuning, float32, torch AdamW
  full+bf16         + bf16 autocast
  full+bf16+ckpt    + gradient checkpointing
  full+bf16+ckpt+8bit  + bitsandbytes 8-bit AdamW
  lora              LoRA r=8 on q, v (frozen float32 base), bf16 autocast
  qlora             the same LoRA over an NF4 base (bitsandbytes Linear4bit)

Ratios are to ``full`` in the same run. The planner (``efficientgpt plan``) predicts the same quantity
(its ``first_step_above_baseline``); both are printed. On CUDA the peak is the allocator's
``max_memory_allocated``; on CPU the sampled resident set size, with glibc returning freed blocks
(``MALLOC_MMAP_THRESHOLD_``). The default batch is 4 x 256 on CUDA and 2 x 128 on CPU (a 124M-parameter
step takes seconds on a few CPU cores).

Usage:
  python benchmarks/efficient_training.py --device cpu --out benchmarks/records/efficient_training-cpu.json
  python benchmarks/efficient_training.py --device cuda --out benchmarks/records/efficient_training-cuda.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys

VARIANTS = {
    "full": {"method": "full", "precision": "fp32"},
    "full+bf16": {"method": "full", "precision": "bf16-mixed"},
    "full+bf16+ckpt": {"method": "full", "precision": "bf16-mixed", "gradient_checkpointing": True},
    "full+bf16+ckpt+8bit": {"method": "full", "precision": "bf16-mixed", "gradient_checkpointing": True,
                            "optimizer": "adamw8bit"},
    "lora": {"method": "lora", "precision": "bf16-mixed"},
    "qlora": {"method": "qlora", "precision": "bf16-mixed"},
}


def gpt2_small() -> dict:
    from transformers import GPT2Config

    return GPT2Config(n_embd=768, n_layer=12, n_head=12, n_positions=1024, vocab_size=50257, resid_pdrop=0.0,
                      embd_pdrop=0.0, attn_pdrop=0.0).to_dict()


def predict(variant: dict, batch: int, seq: int, device: str) -> int:
    from transformers import AutoConfig

    from efficientgpt import plan

    shape = plan.shape_from_config(AutoConfig.for_model(**gpt2_small()), name="gpt2-small (random init)")
    cfg = plan.PlanConfig(method=variant["method"], batch=batch, seq=seq, precision=variant["precision"],
                          optimizer=variant.get("optimizer", "adamw"),
                          gradient_checkpointing=variant.get("gradient_checkpointing", False), device=device)
    return int(plan.plan(shape, cfg)["memory"]["first_step_above_baseline"])


def run_variant(name: str, batch: int, seq: int, device: str, steps: int) -> dict:
    spec = {"config": gpt2_small(), "batch": batch, "seq": seq, "device": device, "time_steps": steps,
            "threads": os.cpu_count() if device == "cpu" else 1, **VARIANTS[name]}
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    proc = subprocess.run([sys.executable, "-m", "efficientgpt.plan", "--measure", json.dumps(spec)],
                          capture_output=True, text=True, env=env)
    if proc.returncode:
        return {"variant": name, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    measured = json.loads(proc.stdout.strip().splitlines()[-1])
    predicted = predict(VARIANTS[name], batch, seq, "cuda" if device.startswith("cuda") else "cpu")
    return {"variant": name, **VARIANTS[name], "peak_bytes": measured["peak_bytes"],
            "predicted_bytes": predicted, "predicted_over_measured": predicted / measured["peak_bytes"],
            "step_time_s": measured["step_time"]["median_s"], "gpu": measured.get("gpu")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="timed steps per variant (default: 10 CUDA, 2 CPU)")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--out", default=None, help="write the results JSON here")
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    batch = args.batch or (4 if cuda else 2)
    seq = args.seq or (256 if cuda else 128)
    steps = args.steps or (10 if cuda else 2)
    rows = []
    for name in args.variants.split(","):
        row = run_variant(name, batch, seq, args.device, steps)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    ref = next((r for r in rows if r["variant"] == "full" and "error" not in r), None)
    for r in rows:
        if ref and "error" not in r:
            r["memory_ratio"] = r["peak_bytes"] / ref["peak_bytes"]
            r["time_ratio"] = r["step_time_s"] / ref["step_time_s"]
    import torch

    result = {"benchmark": "efficient_training", "model": "gpt2-small shape (124M, random init)", "batch": batch,
              "seq": seq, "device": args.device, "torch": torch.__version__, "python": platform.python_version(),
              "cpu_threads": os.cpu_count(), "rows": rows}
    print(f"{'variant':<22} {'peak MiB':>10} {'predicted':>10} {'pred/meas':>9} {'mem ratio':>9} "
          f"{'step ms':>9} {'time ratio':>10}")
    for r in rows:
        if "error" in r:
            print(f"{r['variant']:<22} error: {r['error']}")
            continue
        print(f"{r['variant']:<22} {r['peak_bytes'] / 2**20:>10.1f} {r['predicted_bytes'] / 2**20:>10.1f} "
              f"{r['predicted_over_measured']:>9.3f} {r.get('memory_ratio', float('nan')):>9.3f} "
              f"{r['step_time_s'] * 1000:>9.1f} {r.get('time_ratio', float('nan')):>10.3f}")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
