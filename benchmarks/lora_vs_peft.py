"""LoRA training step and inference, efficientgpt vs Hugging Face PEFT, side by side in one run.

Model: GPT-2-small shape built from config (124M parameters, random init; timing does not depend on
the weights), batch 4 x 256 tokens, LoRA r = 8. Each variant runs in a fresh subprocess (so peak
memory is not polluted by the others) and the variants alternate over ``--repeats`` rounds; the
median step time over all measured steps is reported, with ratios to the reference in the same run.

Training variants (AdamW on the LoRA parameters, forward + backward + step):
  ours_qv      our LoRA on the q and v roles (slices of GPT-2's fused c_attn)
  ours_c_attn  our LoRA on the whole c_attn module: the same structure PEFT builds
  peft_c_attn  PEFT's LoRA with target_modules=["c_attn"] (PEFT cannot target q and v of c_attn)
Inference variants (forward, no grad): base, ours unmerged (q, v), ours merged.

Usage:
  python benchmarks/lora_vs_peft.py                    # CPU, prints the table
  python benchmarks/lora_vs_peft.py --device cuda --steps 20 --out benchmarks/records/lora_vs_peft-cuda.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys

TRAIN = ("ours_qv", "ours_c_attn", "peft_c_attn")
INFER = ("base_fwd", "ours_unmerged_fwd", "ours_merged_fwd")


def build(variant: str, device: str):
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config

    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=768, n_layer=12, n_head=12, n_positions=1024, vocab_size=50257,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = AutoModelForCausalLM.from_config(cfg).to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    if variant.startswith("peft"):
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16,
                                                           target_modules=["c_attn"]))
    elif variant != "base_fwd":
        from efficientgpt.peft import core
        from efficientgpt.peft.lora import LoraConfig

        targets = ["c_attn"] if variant == "ours_c_attn" else ["q", "v"]
        delta = core.apply(model, "lora", LoraConfig(targets=targets, rank=8, alpha=16.0))
        with torch.no_grad():
            for p in delta.parameters():
                p.normal_(0, 0.02)
        if variant == "ours_merged_fwd":
            delta.merge()
    return model


def worker(variant: str, device: str, steps: int, warmup: int, batch: int, seq: int) -> dict:
    import torch

    from efficientgpt.bench.measure import PeakMemory, time_steps

    torch.manual_seed(0)
    model = build(variant, device)
    ids = torch.randint(0, 50257, (batch, seq), device=device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if variant in TRAIN:
        model.train()
        opt = torch.optim.AdamW(trainable, lr=1e-4)

        def step():
            out = model(input_ids=ids, labels=ids)
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    else:
        model.eval()

        def step():
            with torch.no_grad():
                model(input_ids=ids)

    step()  # allocate optimizer state and caches before the memory baseline
    with PeakMemory(device) as mem:
        timing = time_steps(step, steps=steps, warmup=warmup, device=device)
    return {"variant": variant, "trainable": sum(p.numel() for p in trainable), "peak_bytes": mem.peak_bytes,
            **timing}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=3, help="measured steps per variant and round")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2, help="rounds; variants alternate within each")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--out", default=None, help="write the results JSON here")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.device, args.steps, args.warmup, args.batch, args.seq)))
        return
    runs: dict[str, list[dict]] = {v: [] for v in TRAIN + INFER}
    for r in range(args.repeats):
        order = TRAIN + INFER if r % 2 == 0 else tuple(reversed(TRAIN + INFER))
        for v in order:
            cmd = [sys.executable, __file__, "--worker", v, "--device", args.device, "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--batch", str(args.batch), "--seq", str(args.seq)]
            res = subprocess.run(cmd, capture_output=True, text=True, check=True, env=os.environ.copy())
            runs[v].append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1}: {v:<18} {runs[v][-1]['median_s'] * 1000:9.1f} ms", file=sys.stderr)
    summary = {}
    for v, rs in runs.items():
        times = [t for r in rs for t in r["times_s"]]
        summary[v] = {"median_ms": 1000 * statistics.median(times), "peak_mib": max(r["peak_bytes"] for r in rs) / 2**20,
                      "trainable": rs[0]["trainable"]}

    def ratio(a, b, key):
        return summary[a][key] / summary[b][key] if summary[b][key] else float("nan")

    ratios = {
        "train_time_ours_c_attn_over_peft": ratio("ours_c_attn", "peft_c_attn", "median_ms"),
        "train_mem_ours_c_attn_over_peft": ratio("ours_c_attn", "peft_c_attn", "peak_mib"),
        "train_time_ours_qv_over_peft": ratio("ours_qv", "peft_c_attn", "median_ms"),
        "train_mem_ours_qv_over_peft": ratio("ours_qv", "peft_c_attn", "peak_mib"),
        "infer_unmerged_over_base": ratio("ours_unmerged_fwd", "base_fwd", "median_ms"),
        "infer_merged_over_base": ratio("ours_merged_fwd", "base_fwd", "median_ms"),
    }
    import torch

    result = {"benchmark": "lora_vs_peft", "device": args.device, "batch": args.batch, "seq": args.seq,
              "steps": args.steps, "repeats": args.repeats, "torch": torch.__version__,
              "threads": torch.get_num_threads(), "machine": platform.machine(),
              "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
              "variants": summary, "ratios": ratios}
    print(f"\nLoRA r=8, GPT-2-small shape, batch {args.batch}x{args.seq}, device {args.device}")
    print(f"{'variant':<20}{'trainable':>12}{'median ms':>12}{'peak MiB':>12}")
    for v, s in summary.items():
        print(f"{v:<20}{s['trainable']:>12,}{s['median_ms']:>12.1f}{s['peak_mib']:>12.1f}")
    for k, v in ratios.items():
        print(f"{k:<36}{v:8.3f}")
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
