"""Helpers shared by the CPU decode-speed benchmarks (``lowrank.py``, ``structured.py``, ``quant.py``).

A model built from config with random weights (decode time depends on the shapes only), its size on disk
as ``save_pretrained`` writes it, and greedy decoding at batch 1 with the KV cache, timed with the
variants alternating so that drift on a shared machine hits them alike.
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path


def gpt2_config(small: bool = False, **overrides):
    """GPT-2 small (n_embd 768, 12 layers, 12 heads, MLP 3072, vocab 50257, tied head; 124M), or toy shapes."""
    from transformers import GPT2Config

    h, layers, heads, vocab = (128, 2, 4, 2048) if small else (768, 12, 12, 50257)
    kwargs = {"n_embd": h, "n_layer": layers, "n_head": heads, "n_inner": 4 * h, "n_positions": 1024,
              "vocab_size": vocab, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
              "bos_token_id": 0, "eos_token_id": 0}
    return GPT2Config(**{**kwargs, **overrides})


def build_gpt2(small: bool = False):
    """A GPT-2-shaped model from :func:`gpt2_config`, random weights (seed 0), in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(gpt2_config(small)).eval()


def file_bytes(model) -> int:
    """Bytes of the safetensors files ``save_pretrained`` writes for ``model``."""
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        return sum(f.stat().st_size for f in Path(d).glob("*.safetensors"))


def decode_seconds(model, prompt, new_tokens: int) -> float:
    """Wall time of greedy ``generate`` with the KV cache; ``min_new_tokens`` forces the full length."""
    import torch

    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             use_cache=True, pad_token_id=0)
        dt = time.perf_counter() - t0
    assert out.shape[1] == prompt.shape[1] + new_tokens
    return dt


def random_prompt(vocab_size: int, length: int):
    import torch

    return torch.randint(0, vocab_size, (1, length), generator=torch.Generator().manual_seed(0))


def time_decode(variants: dict, prompt, new_tokens: int, runs: int, label: str = "") -> dict[str, list[float]]:
    """Seconds per ``generate`` call for each model of ``variants``: one warm-up each, then ``runs`` rounds
    with the variants alternating (drift on a shared machine hits all alike). Progress goes to stderr."""
    for m in variants.values():
        decode_seconds(m, prompt, new_tokens)  # warm-up
    times: dict[str, list[float]] = {v: [] for v in variants}
    for run in range(runs):
        for v, m in variants.items():
            times[v].append(decode_seconds(m, prompt, new_tokens))
            print(f"  {label}{v} run {run + 1}/{runs}: {new_tokens / times[v][-1]:.1f} tok/s", file=sys.stderr,
                  flush=True)
    return times


def tokens_per_s(times: list[float], new_tokens: int) -> float:
    """Median decode speed over the timed rounds."""
    return new_tokens / statistics.median(times)


def environment() -> dict:
    import torch

    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "platform": platform.platform(),
            "processor": platform.processor()}


def print_head(head: str) -> None:
    """A table's header line and a rule as long as it."""
    print(head)
    print("-" * len(head))


def decode_caption(args, *details: str) -> str:
    """The line above a decode-speed table: the decode settings of ``args``, ``details``, torch and threads."""
    import torch

    parts = [f"decode at batch 1, greedy, KV cache: {args.new_tokens} new tokens after {args.prompt}",
             f"median of {args.runs}", *details,
             f"torch {torch.__version__}, {torch.get_num_threads()} threads"]
    return "; ".join(parts)


def csv(text: str) -> list[str]:
    """``"a, b,"`` -> ``["a", "b"]`` (comma-separated command-line lists)."""
    return [x.strip() for x in text.split(",") if x.strip()]


def write_json(path: str | Path, result: dict) -> None:
    """Write a benchmark's result as indented JSON (the parent directory is created) and say so."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {path}")
