"""Weight-only quantization: perplexity against bits for RTN and GPTQ, and real CPU decode speed and file size.

Quality: ``rtn`` and ``gptq`` (``efficientgpt.compress.quant``) at each ``--bits`` and each ``--group-sizes``
(0: one scale per output channel; 32: one scale per 32 input columns), applied to a fresh copy of ``--model``
through the one compression pipeline (``efficientgpt.pipeline.compress``): GPTQ is calibrated on
``--calib-samples`` windows of embedded prose (train split), RTN needs no data; perplexity on the validation
split of ``--data``. Each method keeps its own default grid (RTN symmetric, the int8-kernel convention; GPTQ
asymmetric min-max, as in its reference code) unless ``--grid`` sets one for both. The table has the dense
model on top, then per point the bits per quantized weight (codes, scales and zero points over the weights
of the quantized layers) and the bytes of the compressed model's safetensors files with their ratio to the
dense model's. Embeddings and the LM head are not quantized, and 3-bit codes sit in 4-bit slots, so 3 bits
take as many bytes as 4.

Speed: GPT-2 small built from config (n_embd 768, 12 layers, 12 heads, MLP 3072, vocab 50257, tied head;
124M parameters, random weights: decode time depends on the shapes only), dense float32 against RTN int8
(per channel) and RTN int4 (``--int4-group-size``, 32 by default; 0 for per channel), weight-only. Greedy
decoding at batch 1 with the KV cache, ``--new-tokens`` tokens after a ``--prompt``-token prompt
(``min_new_tokens`` forces the full length); the variants alternate over ``--runs`` rounds after one warm-up
each, and the median tokens/s is reported with the file size (safetensors written by ``save_pretrained``).
The speed ratio to dense sits next to the byte ratio, with the inference path each variant ran (the note
``efficientgpt.compress.quant`` reports: on the CPU in float32 the packed weights are dequantized on the fly,
and that is what the speed measures, not an integer kernel). ``--dtype bfloat16`` runs every variant in bfloat16, where per-channel
int8 goes through torch's int8 weight-only kernel (``torch._weight_int8pack_mm``) and int4 through its packed
int4 kernel (``torch._weight_int4pack_mm_for_cpu``).

Usage:
  python benchmarks/quant.py --model embedded:tiny --bits 4 --speed-small --runs 2    # < 1 min, to check it works
  python benchmarks/quant.py --out benchmarks/records/quant-cpu.json                  # embedded default + GPT-2 small
  python benchmarks/quant.py --no-quality --threads 4                                 # decode speed only
  python benchmarks/quant.py --no-quality --dtype bfloat16                            # the int8 and int4 kernels
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import tempfile
import time
from pathlib import Path

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

METHODS = ("rtn", "gptq")
GRIDS = {"method": None, "symmetric": True, "asymmetric": False}


def quality(args) -> dict:
    import torch

    from efficientgpt import pipeline, registry
    from efficientgpt.compress.calibration import CalibrationConfig
    from efficientgpt.models.loading import load_model

    torch.manual_seed(0)
    loaded = load_model(args.model, progress=False)
    base = loaded.model
    dense_bytes = file_bytes(base)
    dense_bits = 8 * next(base.parameters()).element_size()
    calib = CalibrationConfig(calib_samples=args.calib_samples)
    runs, dense_ppl = [], None
    for method in args.methods:
        spec = registry.get(method)
        for group_size in args.group_sizes:
            for bits in args.bits:
                grid = {} if GRIDS[args.grid] is None else {"symmetric": GRIDS[args.grid]}
                config = spec.config_cls(bits=bits, group_size=group_size, **grid)
                t0 = time.perf_counter()
                with tempfile.TemporaryDirectory() as d:
                    s = pipeline.compress(args.model, method, config, out=Path(d) / "model", calibration=calib,
                                          eval_data=args.data, eval_tokens=args.eval_tokens or None, progress=False,
                                          loaded=dataclasses.replace(loaded, model=copy.deepcopy(base)))
                dense_ppl = s["eval"]["ppl_before"]
                a = s["achieved"]
                runs.append({"method": method, "bits": bits, "group_size": group_size, "symmetric": a["symmetric"],
                             "bits_per_weight": a["bits_per_weight"], "layer_bytes_before": a["layer_bytes_before"],
                             "layer_bytes_after": a["layer_bytes_after"], "layer_ratio": a["layer_ratio"],
                             "file_bytes": s["files_bytes"], "file_ratio": s["files_bytes"] / dense_bytes,
                             "ppl": s["eval"]["ppl_after"], "inference": s["notes"][0], "notes": s["notes"],
                             "compress_s": s["compress_s"], "wall_s": time.perf_counter() - t0})
                r = runs[-1]
                print(f"  {method:4} {bits} bits group {group_size:<3} {r['bits_per_weight']:6.3f} bits/weight "
                      f"file {r['file_ratio']:.3f}x  ppl {r['ppl']:.3f}  ({r['compress_s']:.1f} s)", flush=True)
    return {"model": loaded.describe(), "data": args.data, "eval_tokens": args.eval_tokens,
            "calibration": calib.to_dict(), "grid": args.grid, "dense_ppl": dense_ppl, "dense_bits": dense_bits,
            "dense_file_bytes": dense_bytes, "runs": runs}


def speed(args) -> dict:
    import torch

    from efficientgpt.compress.quant import RTNConfig, apply_rtn

    dtype = getattr(torch, args.dtype)
    dense = build_gpt2(args.speed_small).to(dtype)
    variants, info = {"dense": dense}, {"dense": {"inference": f"dense {args.dtype} nn.Linear/Conv1D weights"}}
    for name, bits, group_size in (("int8", 8, 0), ("int4", 4, args.int4_group_size)):
        m = copy.deepcopy(dense)
        res = apply_rtn(m, RTNConfig(bits=bits, group_size=group_size))
        variants[name] = m
        info[name] = {"method": "rtn", "bits": bits, "group_size": group_size,
                      **{k: res.achieved[k] for k in ("bits_per_weight", "layer_bytes_before", "layer_bytes_after",
                                                      "layer_ratio")},
                      "inference": res.notes[0]}
    times = time_decode(variants, random_prompt(dense.config.vocab_size, args.prompt), args.new_tokens, args.runs)
    rows = {}
    for v, m in variants.items():
        rows[v] = {**info[v], "file_bytes": file_bytes(m), "tokens_per_s": tokens_per_s(times[v], args.new_tokens),
                   "times_s": times[v]}
    for r in rows.values():
        r["file_ratio"] = r["file_bytes"] / rows["dense"]["file_bytes"]
        r["speed_ratio"] = r["tokens_per_s"] / rows["dense"]["tokens_per_s"]
    return {"model": "gpt2-small-shape" if not args.speed_small else "gpt2-small-shape (--speed-small: tiny)",
            "dtype": args.dtype, "variants": rows, "inference": {v: r["inference"] for v, r in rows.items()}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="embedded", help="model for the quality sweep (default: embedded)")
    p.add_argument("--data", default="embedded:prose", help="perplexity data (validation split)")
    p.add_argument("--methods", default=",".join(METHODS), type=csv, help="comma list of rtn, gptq")
    p.add_argument("--bits", default="8,4,3", type=lambda s: [int(x) for x in csv(s)],
                   help="bits per weight (default: 8,4,3; 2 is supported too)")
    p.add_argument("--group-sizes", default="0,32", type=lambda s: [int(x) for x in csv(s)],
                   help="input columns per scale, 0 for one scale per output channel (default: 0,32)")
    p.add_argument("--grid", default="method", choices=tuple(GRIDS),
                   help="method: each method's default grid (RTN symmetric, GPTQ asymmetric); or one for both")
    p.add_argument("--calib-samples", type=int, default=32, help="GPTQ calibration windows (default: 32)")
    p.add_argument("--eval-tokens", type=int, default=65536, help="validation tokens scored (0: all)")
    p.add_argument("--no-quality", action="store_true", help="skip the perplexity sweep")
    p.add_argument("--no-speed", action="store_true", help="skip the decode-speed measurement")
    p.add_argument("--speed-small", action="store_true", help="tiny GPT-2 shapes for the speed part (a quick check)")
    p.add_argument("--int4-group-size", type=int, default=32, help="group size of the int4 speed variant (0: per "
                   "channel; default: 32)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="speed part's weights and "
                   "activations (default: float32)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt", type=int, default=16, help="prompt length in tokens")
    p.add_argument("--runs", type=int, default=5, help="timed decode rounds (median reported)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)

    import torch
    import transformers

    import efficientgpt.compress.quant  # noqa: F401 - registers rtn and gptq

    transformers.utils.logging.disable_progress_bar()  # one bar per saved model would bury the table
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {"benchmark": "quant", "settings": vars(args), "environment": environment()}
    if not args.no_quality:
        q = result["quality"] = quality(args)
        print(f"\nperplexity on {args.data} (validation, {args.eval_tokens or 'all'} tokens) of {args.model}; "
              f"GPTQ calibrated on {args.calib_samples} windows; group 0 = one scale per output channel")
        head = f"{'method':6} {'bits':>4} {'group':>5} {'grid':5} {'bits/w':>7} {'file bytes':>12} {'file x':>7} " \
               f"{'ppl':>9}"
        print_head(head)
        print(f"{'dense':6} {q['dense_bits']:>4} {'-':>5} {'-':5} {q['dense_bits']:>7.3f} "
              f"{q['dense_file_bytes']:>12,} {1:>7.3f} "
              f"{q['dense_ppl']:>9.3f}")
        for r in q["runs"]:
            grid = "sym" if r["symmetric"] else "asym"
            print(f"{r['method']:6} {r['bits']:>4} {r['group_size']:>5} {grid:5} {r['bits_per_weight']:>7.3f} "
                  f"{r['file_bytes']:>12,} {r['file_ratio']:>7.3f} {r['ppl']:>9.3f}")
        for note in dict.fromkeys(r["inference"] for r in q["runs"]):
            print(f"inference: {note}")
    if not args.no_speed:
        s = result["speed"] = speed(args)
        print("\n" + decode_caption(args, f"{s['model']}, {s['dtype']}"))
        head = f"{'variant':8} {'bits/w':>7} {'file MB':>8} {'file x':>7} {'tok/s':>8} {'speed x':>7}"
        print_head(head)
        for v, r in s["variants"].items():
            bpw = r.get("bits_per_weight", 16.0 if s["dtype"] == "bfloat16" else 32.0)
            print(f"{v:8} {bpw:>7.3f} {r['file_bytes'] / 2**20:>8.1f} {r['file_ratio']:>7.3f} "
                  f"{r['tokens_per_s']:>8.1f} {r['speed_ratio']:>7.3f}")
        for v, note in s["inference"].items():
            print(f"inference, {v}: {note}")
    if args.out:
        write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
