"""Structured pruning: real CPU decode speed and file size of pruned models against the dense one.

Models, built from config (random weights: decode time does not depend on their values):
  gpt2   GPT-2 small: n_embd 768, 12 layers, 12 heads, MLP 3072, vocab 50257 (tied head), 124M.
         Only the MLP is pruned (GPT-2's config cannot express fewer heads of the same size).
  llama  Llama-shaped, similar size: hidden 768, 12 layers, 12 heads (MHA), SwiGLU 2048, vocab 32000
         (untied head), 134M. Heads and MLP channels are pruned; LlamaConfig needs the head count to
         divide 768, so ratio 0.3 removes 4 of 12 heads (the nearest expressible count to 3.6).

Variants: dense, and ``efficientgpt.compress.structured`` at each ``--ratios`` (magnitude importance;
the speed depends on the shapes only). For each: greedy decoding at batch 1 with the KV cache,
``--new-tokens`` tokens after a ``--prompt``-token prompt (``min_new_tokens`` forces the full length);
the variants alternate over ``--runs`` rounds after one warm-up each, and the median tokens/s is
reported. File size is the safetensors written by ``save_pretrained`` (fp32). The table shows the
speed ratio to dense next to the parameter ratios (all parameters, and the decoder blocks alone:
embeddings and the LM head are not pruned).

Usage:
  python benchmarks/structured.py                          # both models, ratios 0.3 and 0.5
  python benchmarks/structured.py --small --runs 2         # seconds: tiny shapes, to check it works
  python benchmarks/structured.py --threads 4 --out benchmarks/records/structured-cpu.json
"""

from __future__ import annotations

import argparse
import copy

from _common import (
    build_gpt2,
    decode_caption,
    environment,
    file_bytes,
    print_head,
    random_prompt,
    time_decode,
    tokens_per_s,
    write_json,
)


def build(name: str, small: bool):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    if name == "gpt2":
        return build_gpt2(small)
    if name != "llama":
        raise SystemExit(f"unknown model {name!r}; choose gpt2 or llama")
    h, layers, heads = (128, 2, 4) if small else (768, 12, 12)
    cfg = LlamaConfig(hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=heads, intermediate_size=2048 * h // 768,
                      vocab_size=2048 if small else 32000, max_position_embeddings=1024,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


def block_parameters(model) -> int:
    from efficientgpt.models import arch

    return sum(p.numel() for p in arch.blocks(model).parameters())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="gpt2,llama", help="comma list of gpt2, llama (default: both)")
    p.add_argument("--ratios", default="0.3,0.5", help="structured pruning ratios (default: 0.3,0.5)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt", type=int, default=16, help="prompt length in tokens")
    p.add_argument("--runs", type=int, default=5, help="timed rounds (median reported)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--small", action="store_true", help="tiny shapes, for a quick check that the script works")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)

    import torch

    from efficientgpt.compress import structured

    if args.threads:
        torch.set_num_threads(args.threads)
    ratios = [float(r) for r in args.ratios.split(",") if r.strip()]
    rows = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        dense = build(name, args.small)
        variants = {"dense": (dense, None)}
        for r in ratios:
            m = copy.deepcopy(dense)
            res = structured.apply(m, structured.StructuredConfig(ratio=r, importance="magnitude",
                                                                  prune_heads=name != "gpt2"))
            variants[f"structured-{r:g}"] = (m, res.achieved)
        times = time_decode({v: m for v, (m, _) in variants.items()},
                            random_prompt(dense.config.vocab_size, args.prompt), args.new_tokens, args.runs,
                            label=f"{name} ")
        base = None
        for v, (m, achieved) in variants.items():
            tps = tokens_per_s(times[v], args.new_tokens)
            row = {
                "model": name, "variant": v, "parameters": sum(p.numel() for p in m.parameters()),
                "block_parameters": block_parameters(m), "file_bytes": file_bytes(m), "tokens_per_s": tps,
                "times_s": times[v], "heads": m.config.num_attention_heads,
                "mlp": achieved["mlp_channels_after"] if achieved else None, "achieved": achieved,
            }
            base = base or row
            row["param_ratio"] = row["parameters"] / base["parameters"]
            row["block_param_ratio"] = row["block_parameters"] / base["block_parameters"]
            row["file_ratio"] = row["file_bytes"] / base["file_bytes"]
            row["speed_ratio"] = tps / base["tokens_per_s"]
            rows.append(row)
        del variants, dense

    print(decode_caption(args))
    head = f"{'model':6} {'variant':16} {'heads':>5} {'params':>12} {'p.ratio':>7} {'blk.ratio':>9} " \
           f"{'file MB':>8} {'tok/s':>8} {'speed x':>7}"
    print_head(head)
    for r in rows:
        print(f"{r['model']:6} {r['variant']:16} {r['heads']:>5} {r['parameters']:>12,} {r['param_ratio']:>7.3f} "
              f"{r['block_param_ratio']:>9.3f} {r['file_bytes'] / 2**20:>8.1f} {r['tokens_per_s']:>8.1f} "
              f"{r['speed_ratio']:>7.2f}")
    if args.out:
        result = {
            "benchmark": "structured", "settings": vars(args), "environment": environment(), "rows": rows,
        }
        write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
