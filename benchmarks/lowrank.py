"""Low-rank decomposition: perplexity against the kept-parameter ratio, and real CPU decode speed at 0.5.

Quality: ``svd``, ``asvd`` and ``svd_llm`` (``efficientgpt.compress.lowrank``) at each ``--ratios``
(fraction of the decoder's linear weights kept) and each ``--allocations`` (uniform: every layer
keeps the ratio; global: one budget, greedy on normalised singular-value energy), applied to a fresh
copy of ``--model`` through the one compression pipeline (``efficientgpt.pipeline.compress``):
calibration on ``--calib-samples`` windows of embedded prose (train split), perplexity on the
validation split of ``--data``. The table lists perplexity per ratio, with the dense model's on top
and the achieved ratio (measured on the factored weights) in the JSON.

Speed: GPT-2 small built from config (n_embd 768, 12 layers, 12 heads, MLP 3072, vocab 50257, tied
head; 124M parameters, random weights: decode time depends on the shapes only), dense against plain
SVD at ratio 0.5 (uniform). Greedy decoding at batch 1 with the KV cache, ``--new-tokens`` tokens after
a ``--prompt``-token prompt (``min_new_tokens`` forces the full length); the two variants alternate
over ``--runs`` rounds after one warm-up each, and the median tokens/s is reported with the file size
(fp32 safetensors). The embeddings and the LM head are not factored, so the whole-model parameter
ratio is well above 0.5; the speed ratio is reported next to both parameter ratios.

Usage:
  python benchmarks/lowrank.py --model embedded:tiny --speed-small --runs 2     # minutes, to check it works
  python benchmarks/lowrank.py --out benchmarks/records/lowrank-cpu.json         # embedded default + GPT-2 small
  python benchmarks/lowrank.py --no-quality --threads 4                          # decode speed only
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import time

from _common import (
    build_gpt2,
    csv,
    decode_caption,
    environment,
    file_bytes,
    print_head,
    random_prompt,
    time_decode,
    tokens_per_s,
    write_json,
)

METHODS = ("svd", "asvd", "svd_llm")


def quality(args) -> dict:
    import torch

    from efficientgpt import pipeline, registry
    from efficientgpt.compress.calibration import CalibrationConfig
    from efficientgpt.models.loading import load_model

    torch.manual_seed(0)
    loaded = load_model(args.model, progress=False)
    base = loaded.model
    calib = CalibrationConfig(calib_samples=args.calib_samples)
    runs, dense_ppl = [], None
    for method in args.methods:
        spec = registry.get(method)
        for allocation in args.allocations:
            for ratio in args.ratios:
                t0 = time.perf_counter()
                s = pipeline.compress(args.model, method, spec.config_cls(ratio=ratio, allocation=allocation),
                                      calibration=calib, eval_data=args.data, eval_tokens=args.eval_tokens or None,
                                      progress=False, loaded=dataclasses.replace(loaded, model=copy.deepcopy(base)))
                dense_ppl = s["eval"]["ppl_before"]
                runs.append({"method": method, "allocation": allocation, "ratio": ratio,
                             "achieved_ratio": s["achieved"]["ratio"], "ppl": s["eval"]["ppl_after"],
                             "parameters": s["size_after"]["parameters"], "bytes": s["size_after"]["bytes"],
                             "mean_rank": s["achieved"].get("mean_rank"), "compress_s": s["compress_s"],
                             "wall_s": time.perf_counter() - t0})
                print(f"  {method:8} {allocation:8} ratio {ratio:<4g} achieved {runs[-1]['achieved_ratio']:.4f} "
                      f"ppl {runs[-1]['ppl']:.3f}", flush=True)
    return {"model": loaded.describe(), "data": args.data, "eval_tokens": args.eval_tokens,
            "calib_samples": args.calib_samples, "dense_ppl": dense_ppl,
            "dense_parameters": sum(p.numel() for p in base.parameters()), "runs": runs}


def speed(args) -> dict:
    from efficientgpt.compress import lowrank

    dense = build_gpt2(args.speed_small)
    factored = copy.deepcopy(dense)
    res = lowrank.apply_svd(factored, lowrank.SVDConfig(ratio=0.5))
    variants = {"dense": dense, "svd-0.5": factored}
    times = time_decode(variants, random_prompt(dense.config.vocab_size, args.prompt), args.new_tokens, args.runs)
    rows = {}
    for v, m in variants.items():
        rows[v] = {"parameters": sum(p.numel() for p in m.parameters()), "file_bytes": file_bytes(m),
                   "tokens_per_s": tokens_per_s(times[v], args.new_tokens), "times_s": times[v]}
    d, f = rows["dense"], rows["svd-0.5"]
    return {
        "model": "gpt2-small-shape" if not args.speed_small else "gpt2-small-shape (--speed-small: tiny)",
        "achieved": res.achieved, "variants": rows,
        "param_ratio": f["parameters"] / d["parameters"],
        "matrix_param_ratio": res.achieved["ratio"],
        "file_ratio": f["file_bytes"] / d["file_bytes"],
        "speed_ratio": f["tokens_per_s"] / d["tokens_per_s"],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="embedded", help="model for the quality sweep (default: embedded)")
    p.add_argument("--data", default="embedded:prose", help="perplexity data (validation split)")
    p.add_argument("--methods", default=",".join(METHODS), type=csv, help="comma list of svd, asvd, svd_llm")
    p.add_argument("--ratios", default="0.9,0.8,0.7,0.6,0.5", type=lambda s: [float(x) for x in csv(s)],
                   help="kept-parameter ratios (default: 0.9,0.8,0.7,0.6,0.5)")
    p.add_argument("--allocations", default="uniform,global", type=csv, help="comma list of uniform, global")
    p.add_argument("--calib-samples", type=int, default=32, help="calibration windows (default: 32)")
    p.add_argument("--eval-tokens", type=int, default=65536, help="validation tokens scored (0: all)")
    p.add_argument("--no-quality", action="store_true", help="skip the perplexity sweep")
    p.add_argument("--no-speed", action="store_true", help="skip the decode-speed measurement")
    p.add_argument("--speed-small", action="store_true", help="tiny GPT-2 shapes for the speed part (a quick check)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt", type=int, default=16, help="prompt length in tokens")
    p.add_argument("--runs", type=int, default=5, help="timed decode rounds (median reported)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)

    import torch

    import efficientgpt.compress.lowrank  # noqa: F401 - registers svd, asvd, svd_llm

    if args.threads:
        torch.set_num_threads(args.threads)
    result = {"benchmark": "lowrank", "settings": vars(args), "environment": environment()}
    if not args.no_quality:
        q = result["quality"] = quality(args)
        cols = [(m, a) for m in args.methods for a in args.allocations]
        print(f"\nperplexity on {args.data} (validation, {args.eval_tokens or 'all'} tokens) of {args.model}; "
              f"dense {q['dense_ppl']:.3f}; ratio = kept fraction of the decoder's linear weights")
        head = f"{'ratio':>6} " + " ".join(f"{m + '/' + a:>16}" for m, a in cols)
        print_head(head)
        for ratio in args.ratios:
            cells = []
            for m, a in cols:
                run = next(r for r in q["runs"] if (r["method"], r["allocation"], r["ratio"]) == (m, a, ratio))
                cells.append(f"{run['ppl']:>16.3f}")
            print(f"{ratio:>6g} " + " ".join(cells))
    if not args.no_speed:
        s = result["speed"] = speed(args)
        print("\n" + decode_caption(args, s["model"]))
        head = f"{'variant':10} {'params':>12} {'file MB':>8} {'tok/s':>8}"
        print_head(head)
        for v, r in s["variants"].items():
            print(f"{v:10} {r['parameters']:>12,} {r['file_bytes'] / 2**20:>8.1f} {r['tokens_per_s']:>8.1f}")
        print(f"speed ratio {s['speed_ratio']:.3f} vs parameter ratio {s['param_ratio']:.3f} (whole model), "
              f"{s['matrix_param_ratio']:.3f} (factored matrices); file ratio {s['file_ratio']:.3f}")
    if args.out:
        write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
