"""Perplexity vs sparsity for magnitude, Wanda and SparseGPT (unstructured and 2:4); Wanda, SparseGPT, GPTQ wall time.

Quality: every (method, sparsity) point runs the one compression pipeline (``efficientgpt.pipeline.compress``)
on a fresh copy of the model (the embedded default unless ``--model``), calibrated on embedded prose, and
scored by perplexity on the held-out prose validation split. 2:4 is one point per method (50 % sparsity).

Speed: Wanda and SparseGPT (50 % unstructured) and GPTQ (4 bits, its default group size: one scale per
output channel) on a GPT-2-small-shaped model built from config (124M parameters, random init: the work
does not depend on the weights), each on a fresh copy of the same model with the same ``--time-samples``
random windows of ``--time-seq-len`` tokens; the wall time of the compression call (calibration forward
passes included) and the ratios SparseGPT / Wanda and GPTQ / Wanda. SparseGPT and GPTQ share the
column-by-column OBS update with the inverse-Hessian Cholesky factor, so GPTQ's time is the natural
yardstick for SparseGPT's.

Usage:
  python benchmarks/pruning.py                                   # embedded default (pretrained on first use)
  python benchmarks/pruning.py --model embedded:tiny --out benchmarks/records/pruning-tiny.json
  python benchmarks/pruning.py --no-timing --sparsities 0.5       # one point per method, no timing
  python benchmarks/pruning.py --no-quality --device cuda          # the timing alone, on a GPU
"""

from __future__ import annotations

import argparse
import copy
import platform
import time

from _common import gpt2_config, write_json

METHODS = ("magnitude", "wanda", "sparsegpt")
SPARSITIES = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


def quality(args) -> dict:
    import torch

    import efficientgpt.compress.prune  # noqa: F401 - registers magnitude and wanda
    import efficientgpt.compress.sparsegpt  # noqa: F401 - registers sparsegpt
    from efficientgpt import pipeline, registry
    from efficientgpt.compress.calibration import CalibrationConfig
    from efficientgpt.models.loading import LoadedModel, load_model

    base = load_model(args.model, device=args.device, progress=True)
    calib = CalibrationConfig(calib_samples=args.calib_samples, calib_seq_len=args.calib_seq_len)
    points = [(m, str(s)) for m in args.methods for s in args.sparsities]
    if not args.no_2_4:
        points += [(m, "2:4") for m in args.methods]
    rows = []
    ppl_dense = None
    for method, spec in points:
        spec_obj = registry.get(method)
        config = spec_obj.config_cls(sparsity=spec)
        loaded = LoadedModel(copy.deepcopy(base.model), base.tokenizer, base.spec, base.path)
        torch.manual_seed(0)
        s = pipeline.compress(args.model, method, config, calibration=calib, eval_tokens=args.eval_tokens,
                              progress=False, loaded=loaded)
        ppl_dense = s["eval"]["ppl_before"]
        rows.append({"method": method, "sparsity": spec, "pattern": s["achieved"]["pattern"],
                     "achieved_sparsity": s["achieved"]["sparsity"], "ppl": s["eval"]["ppl_after"],
                     "compress_s": s["compress_s"]})
        print(f"  {method:9s} {spec:>4s}: sparsity {s['achieved']['sparsity']:.4f}  ppl {s['eval']['ppl_after']:.3f}"
              f"  ({s['compress_s']:.1f} s)", flush=True)
        del loaded
    return {"model": base.describe(), "ppl_dense": ppl_dense, "calibration": calib.to_dict(),
            "eval_tokens": args.eval_tokens, "rows": rows}


def timing(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from efficientgpt.compress.prune import WandaConfig, apply_wanda
    from efficientgpt.compress.quant import GPTQConfig, apply_gptq
    from efficientgpt.compress.sparsegpt import SparseGPTConfig
    from efficientgpt.compress.sparsegpt import apply as apply_sparsegpt

    methods = (("wanda", apply_wanda, WandaConfig(sparsity="0.5")),
               ("sparsegpt", apply_sparsegpt, SparseGPTConfig(sparsity="0.5")),
               ("gptq", apply_gptq, GPTQConfig(bits=4)))
    torch.manual_seed(0)
    cfg = gpt2_config()
    if str(args.device).startswith("cuda"):  # warm-up: CUDA context, cuBLAS/cuSOLVER handles, kernels
        small = AutoModelForCausalLM.from_config(gpt2_config(n_layer=1)).to(args.device)
        for _, fn, config in methods:
            fn(copy.deepcopy(small), config, windows=torch.randint(0, cfg.vocab_size, (2, 64)))
        del small
    base = AutoModelForCausalLM.from_config(cfg).to(args.device).eval()
    params = sum(p.numel() for p in base.parameters())
    windows = torch.randint(0, cfg.vocab_size, (args.time_samples, args.time_seq_len),
                            generator=torch.Generator().manual_seed(0))
    out = {"model": f"gpt2-small shape, random init ({params / 1e6:.1f}M parameters)",
           "windows": list(windows.shape), "device": str(args.device)}
    for name, fn, config in methods:
        model = copy.deepcopy(base)
        if str(args.device).startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        res = fn(model, config, windows=windows)
        if str(args.device).startswith("cuda"):
            torch.cuda.synchronize()
        out[f"{name}_s"] = time.perf_counter() - t0
        if "sparsity" in res.achieved:
            out[f"{name}_sparsity"] = res.achieved["sparsity"]
            what = f"sparsity {res.achieved['sparsity']:.4f}"
        else:
            out[f"{name}_bits_per_weight"] = res.achieved["bits_per_weight"]
            what = f"{res.achieved['bits']} bits, {res.achieved['bits_per_weight']:.3f} bits/weight"
        print(f"  {name:9s}: {out[f'{name}_s']:.2f} s ({what})", flush=True)
        del model
    out["sparsegpt_over_wanda"] = out["sparsegpt_s"] / out["wanda_s"]
    out["gptq_over_wanda"] = out["gptq_s"] / out["wanda_s"]
    return out


def table(q: dict) -> str:
    cols = [str(s) for s in sorted({float(r["sparsity"]) for r in q["rows"] if ":" not in r["sparsity"]})]
    has_24 = any(r["sparsity"] == "2:4" for r in q["rows"])
    head = "| method | " + " | ".join(cols) + (" | 2:4 |" if has_24 else " |")
    lines = [f"dense perplexity: {q['ppl_dense']:.3f}", "", head, "|" + "---|" * (len(cols) + 1 + has_24)]
    for m in dict.fromkeys(r["method"] for r in q["rows"]):
        by = {r["sparsity"]: r["ppl"] for r in q["rows"] if r["method"] == m}
        cells = [f"{by[c]:.3f}" if c in by else "" for c in cols] + ([f"{by.get('2:4', float('nan')):.3f}"]
                                                                     if has_24 else [])
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="embedded", help="model spec (default: the embedded default)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma list (default: %(default)s)")
    p.add_argument("--sparsities", default=",".join(map(str, SPARSITIES)), help="comma list (default: %(default)s)")
    p.add_argument("--no-2-4", action="store_true", help="skip the 2:4 points")
    p.add_argument("--calib-samples", type=int, default=32, help="calibration windows (default: %(default)s)")
    p.add_argument("--calib-seq-len", type=int, default=None, help="tokens per window (default: the context)")
    p.add_argument("--eval-tokens", type=int, default=65536, help="validation tokens scored (default: %(default)s)")
    p.add_argument("--no-quality", action="store_true", help="skip the perplexity vs sparsity table")
    p.add_argument("--no-timing", action="store_true", help="skip the Wanda / SparseGPT / GPTQ timing")
    p.add_argument("--time-samples", type=int, default=8, help="timing calibration windows (default: %(default)s)")
    p.add_argument("--time-seq-len", type=int, default=256, help="timing window length (default: %(default)s)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="write the results JSON here")
    args = p.parse_args()
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    args.sparsities = [float(s) for s in args.sparsities.split(",") if s.strip()]

    import torch

    result = {"benchmark": "pruning", "environment": {"torch": torch.__version__, "device": args.device,
                                                      "threads": torch.get_num_threads(),
                                                      "platform": platform.platform(),
                                                      "gpu": torch.cuda.get_device_name()
                                                      if str(args.device).startswith("cuda") else None}}
    if not args.no_quality:
        print(f"perplexity vs sparsity on {args.model}", flush=True)
        result["quality"] = quality(args)
        print(table(result["quality"]))
    if not args.no_timing:
        print("wall time to compress, GPT-2-small shape", flush=True)
        result["timing"] = timing(args)
        t = result["timing"]
        print(f"wall time vs Wanda ({t['wanda_s']:.2f} s, windows {t['windows']}): "
              f"SparseGPT {t['sparsegpt_over_wanda']:.1f}x ({t['sparsegpt_s']:.2f} s), "
              f"GPTQ {t['gptq_over_wanda']:.1f}x ({t['gptq_s']:.2f} s)")
    if args.out:
        write_json(args.out, result)


if __name__ == "__main__":
    main()
