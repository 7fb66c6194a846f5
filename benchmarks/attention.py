"""Attention backends side by side: speed and memory against context length; KV-cache bytes per policy.

Backends: ``eager`` (explicit softmax(QKᵀ/√d)V, materialising the T x T scores) and ``sdpa``
(``torch.nn.functional.scaled_dot_product_attention``), plus ``flash_attention_2/3/4`` where the
FlashAttention package is installed and the device is CUDA (``efficientgpt.compress.attention.
set_attention_backend``; every backend runs the same weights). The model is built from a config with
random weights (speed and memory depend on the shapes only): GPT-2 small (768 wide, 12 layers, 12
heads, MLP 3072, vocab 50257) or a Llama of the same size (``--arch llama``: SwiGLU 2048, RoPE,
``--kv-heads`` key/value heads), ``--small`` for toy shapes (a quick check).

For each context length T (``--lengths``):

* train: one forward + backward of a batch ``(--batch, T)`` with the LM loss; median seconds over
  ``--runs`` after one warm-up, and the peak memory above the level before the step (CUDA: allocator
  peak, exact; CPU: sampled resident set size, approximate);
* decode: greedy single-token steps with the KV cache after a T-token prefill (the prefill is not
  timed): median seconds per token over ``--new-tokens`` steps, and the peak memory of the decode.

The backends alternate within each length (in reversed order every other length) so drift on a shared
machine hits them alike; the table prints each backend's numbers and the ratio to eager side by side.
CPU peaks are approximate: memory the allocator reuses from an earlier step does not show in the
resident set size, so small peaks read as 0; trust CUDA's for memory ratios. The KV section lists the closed
form ``2 · layers · kv_heads · head_dim · bytes`` per token for MHA, GQA and MQA shapes of the model and
the bytes a full cache and a StreamingLLM sink cache (``--sink`` + ``--window``) hold after the longest
length, measured on the cache tensors.

Usage:
  python benchmarks/attention.py --small --lengths 64,128 --runs 2             # seconds, to check it works
  python benchmarks/attention.py --device cuda --out benchmarks/records/attention-cuda.json
  python benchmarks/attention.py --arch llama --lengths 128,512,2048 --threads 2 \\
      --out benchmarks/records/attention-cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

from _common import print_head, write_json


def build(arch: str, small: bool, max_len: int, kv_heads: int | None, dtype, device):
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    h, layers, heads, vocab = (128, 2, 4, 2048) if small else (768, 12, 12, 50257)
    if arch == "gpt2":
        cfg = GPT2Config(n_embd=h, n_layer=layers, n_head=heads, n_inner=4 * h, n_positions=max_len,
                         vocab_size=vocab, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                         eos_token_id=0)
    else:
        cfg = LlamaConfig(hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads,
                          num_key_value_heads=kv_heads or heads, intermediate_size=(8 * h) // 3,
                          max_position_embeddings=max_len, vocab_size=vocab, bos_token_id=0, eos_token_id=0,
                          tie_word_embeddings=True)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, dtype=dtype).to(device)


def _median_and_peak(fn, runs: int, device) -> tuple[float, int]:
    import torch

    from efficientgpt.bench.measure import PeakMemory

    fn()  # warm-up (kernels, allocator)
    times, peaks = [], []
    for _ in range(runs):
        with PeakMemory(device) as mem:
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
        peaks.append(mem.peak_bytes)
    return statistics.median(times), max(peaks)


def train_step(model, ids):
    def fn():
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        model.zero_grad(set_to_none=True)

    return fn


def _cache_io(model) -> tuple[str, str]:
    """The cache keyword and output field of this transformers version (``cache`` from 5.2x,
    ``past_key_values`` before)."""
    import inspect

    return ("cache", "cache") if "cache" in inspect.signature(model.forward).parameters else \
        ("past_key_values", "past_key_values")


def decode_steps(model, ids, new_tokens: int):
    import torch

    kw, field = _cache_io(model)

    def fn():
        with torch.inference_mode():
            out = model(input_ids=ids, use_cache=True)
            cache, nxt = getattr(out, field), out.logits[:, -1:].argmax(-1)
            if ids.device.type == "cuda":
                torch.cuda.synchronize(ids.device)
            t0 = time.perf_counter()
            for _ in range(new_tokens):
                out = model(input_ids=nxt, use_cache=True, **{kw: cache})
                cache, nxt = getattr(out, field), out.logits[:, -1:].argmax(-1)
            if ids.device.type == "cuda":
                torch.cuda.synchronize(ids.device)
            fn.decode_s = (time.perf_counter() - t0) / new_tokens

    return fn


def run_backends(args, model, backends: list[str]) -> list[dict]:
    import torch

    from efficientgpt.bench.measure import PeakMemory
    from efficientgpt.compress.attention import set_attention_backend

    device = next(model.parameters()).device
    rows = []
    for T in args.lengths:
        ids = torch.randint(0, model.config.vocab_size, (args.batch, T), device=device,
                            generator=torch.Generator(device=device).manual_seed(T))
        row = {"length": T, "backends": {}}
        # Alternate the order per length: on CPU a backend run after another reuses the heap it grew.
        for b in (backends if len(rows) % 2 == 0 else backends[::-1]):
            set_attention_backend(model, b)
            model.train()
            fb_s, fb_mem = _median_and_peak(train_step(model, ids), args.runs, device)
            model.eval()
            fn = decode_steps(model, ids[:1], args.new_tokens)
            dec = []
            fn()  # warm-up
            with PeakMemory(device) as mem:
                for _ in range(args.runs):
                    fn()
                    dec.append(fn.decode_s)
            row["backends"][b] = {"train_s": fb_s, "train_peak_bytes": fb_mem,
                                  "train_tokens_per_s": args.batch * T / fb_s,
                                  "decode_s_per_token": statistics.median(dec), "decode_peak_bytes": mem.peak_bytes}
            print(f"  T={T:<5} {b:18} train {fb_s * 1e3:9.1f} ms  peak {fb_mem / 2**20:8.1f} MiB   decode "
                  f"{statistics.median(dec) * 1e3:7.2f} ms/token  peak {mem.peak_bytes / 2**20:8.1f} MiB", flush=True)
        row["backends"] = {b: row["backends"][b] for b in backends}
        base = row["backends"]["eager"]
        for r in row["backends"].values():
            r["train_speedup_vs_eager"] = base["train_s"] / r["train_s"]
            r["train_memory_ratio_vs_eager"] = r["train_peak_bytes"] / base["train_peak_bytes"] \
                if base["train_peak_bytes"] > 0 else None
            r["decode_speedup_vs_eager"] = base["decode_s_per_token"] / r["decode_s_per_token"]
        rows.append(row)
    return rows


def kv_section(args, model) -> dict:
    import torch

    from efficientgpt.compress.attention import SinkCache, cache_nbytes, kv_cache_bytes
    from efficientgpt.models import arch

    heads, kv, hd = arch.head_dims(model)
    layers = model.config.num_hidden_layers
    dtype = next(model.parameters()).dtype
    elem = torch.empty((), dtype=dtype).element_size()
    shapes = {"mha": heads, "gqa": max(1, heads // 4) if heads % 4 == 0 else 1, "mqa": 1}
    per_token = {k: 2 * layers * g * hd * elem for k, g in shapes.items()}
    T = max(args.lengths)
    device = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (1, T), device=device, generator=torch.Generator(device=device).manual_seed(1))
    model.eval()
    kw, field = _cache_io(model)
    with torch.inference_mode():
        full = getattr(model(input_ids=ids, use_cache=True), field)
        full_bytes = cache_nbytes(full)
        sink = SinkCache(model, window=args.window, sink=args.sink)
        model(input_ids=ids, use_cache=True, **{kw: sink})
        sink_bytes = cache_nbytes(sink)
    return {"dtype": str(dtype), "heads": heads, "kv_heads": kv, "head_dim": hd, "layers": layers,
            "bytes_per_token": per_token, "closed_form_this_model": kv_cache_bytes(model, 1),
            "tokens": T, "full_cache_bytes": full_bytes, "full_cache_closed_form": kv_cache_bytes(model, T),
            "sink_cache_bytes": sink_bytes, "sink_cache_closed_form": kv_cache_bytes(model, min(T, args.sink + args.window)),
            "sink": args.sink, "window": args.window}


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", choices=("gpt2", "llama"), default="gpt2", help="model shape (default: gpt2)")
    p.add_argument("--small", action="store_true", help="toy shapes (128 wide, 2 layers): a quick check")
    p.add_argument("--kv-heads", type=int, default=None, help="llama: key/value heads (default: all heads)")
    p.add_argument("--lengths", type=_ints, default=[128, 256, 512, 1024, 2048], help="context lengths")
    p.add_argument("--batch", type=int, default=1, help="sequences per training step (default: 1)")
    p.add_argument("--new-tokens", type=int, default=32, help="decode steps timed per run (default: 32)")
    p.add_argument("--runs", type=int, default=3, help="timed runs per measurement (median; default: 3)")
    p.add_argument("--backends", default=None,
                   help="comma list (default: eager, sdpa and every installed FlashAttention usable here)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="parameter dtype (default: bfloat16 on CUDA, float32 on CPU; FlashAttention needs 16-bit)")
    p.add_argument("--sink", type=int, default=4, help="KV section: attention-sink tokens (default: 4)")
    p.add_argument("--window", type=int, default=252, help="KV section: recent-window tokens (default: 252)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)

    import torch

    from efficientgpt.compress.attention import available_backends

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    model = build(args.arch, args.small, max(args.lengths) + args.new_tokens + 1, args.kv_heads, dtype, device)
    avail = available_backends(model)
    if args.backends:
        backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    else:
        backends = ["eager", "sdpa"] + [b for b in avail if b.startswith("flash") and avail[b] is None]
    if "eager" not in backends:
        backends = ["eager"] + backends
    env = {"torch": torch.__version__, "device": str(device), "dtype": str(dtype), "threads": torch.get_num_threads(),
           "platform": platform.platform(), "processor": platform.processor()}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    import transformers

    env["transformers"] = transformers.__version__
    params = sum(p.numel() for p in model.parameters())
    print(f"{args.arch}{' (small)' if args.small else ''}: {params:,} parameters, {dtype}, {device}; batch {args.batch}; "
          f"backends {', '.join(backends)}; not available: "
          + "; ".join(f"{b} ({why})" for b, why in avail.items() if why and b not in backends))
    rows = run_backends(args, model, backends)
    print(f"\nratios to eager (speedup = eager time / backend time; memory = backend peak / eager peak); "
          f"{env.get('gpu', env['processor'] or 'cpu')}, torch {torch.__version__}")
    head = f"{'T':>6} " + " ".join(f"{b + ' ' + what:>26}" for b in backends[1:] for what in
                                    ("train x", "train mem", "decode x"))
    print_head(head)
    for row in rows:
        cells = []
        for b in backends[1:]:
            r = row["backends"][b]
            mem = r["train_memory_ratio_vs_eager"]
            cells += [f"{r['train_speedup_vs_eager']:>26.2f}", f"{mem:>26.2f}" if mem is not None else f"{'n/a':>26}",
                      f"{r['decode_speedup_vs_eager']:>26.2f}"]
        print(f"{row['length']:>6} " + " ".join(cells))
    try:
        kv = kv_section(args, model)
    except Exception as err:  # keep the backend results if this transformers version lacks a cache API
        kv = {"error": f"{type(err).__name__}: {err}"}
        print(f"\nKV section failed: {kv['error']}")
    else:
        print(f"\nKV cache per token ({kv['dtype']}): " + ", ".join(f"{k} {v:,} B" for k, v in kv["bytes_per_token"].items())
              + f"; after {kv['tokens']} tokens: full cache {kv['full_cache_bytes']:,} B (closed form "
              f"{kv['full_cache_closed_form']:,}), sink cache {kv['sink'] }+{kv['window']} {kv['sink_cache_bytes']:,} B "
              f"(closed form {kv['sink_cache_closed_form']:,})")
    result = {"benchmark": "attention", "settings": {k: v for k, v in vars(args).items()}, "environment": env,
              "model": {"arch": args.arch, "small": args.small, "parameters": params,
                        "config": json.loads(model.config.to_json_string())},
              "available": avail, "backends": backends, "rows": rows, "kv": kv}
    if args.out:
        write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
