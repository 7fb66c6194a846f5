"""Small random models of every supported family, built from configs (no downloads).

Used by the tests and the conformance matrix: each family keeps its distinctive features at toy size
(GPT-2's fused ``Conv1D`` attention, Llama/Qwen2 grouped-query attention, OPT's learned positions,
GPT-NeoX's per-head interleaved ``query_key_value``, Qwen2's q/k/v biases).
"""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    OPTConfig,
    PretrainedConfig,
    Qwen2Config,
)

from efficientgpt.errors import UserError

TINY_FAMILIES = ("gpt2", "llama", "opt", "gpt_neox", "qwen2")


def tiny_config(
    family: str,
    vocab_size: int = 128,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int | None = None,
    intermediate: int | None = None,
    max_positions: int = 64,
) -> PretrainedConfig:
    """A toy config of ``family``; ``kv_heads`` defaults to ``heads // 2`` where the family has GQA."""
    inter = intermediate or 2 * hidden
    common = dict(vocab_size=vocab_size, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    if family == "gpt2":
        return GPT2Config(
            n_embd=hidden, n_layer=layers, n_head=heads, n_inner=inter, n_positions=max_positions,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common,
        )
    if family in ("llama", "qwen2"):
        cls = LlamaConfig if family == "llama" else Qwen2Config
        return cls(
            hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=kv_heads or max(1, heads // 2),
            max_position_embeddings=max_positions, tie_word_embeddings=False, **common,
        )
    if family == "opt":
        return OPTConfig(
            hidden_size=hidden, ffn_dim=inter, num_hidden_layers=layers, num_attention_heads=heads,
            max_position_embeddings=max_positions, word_embed_proj_dim=hidden, dropout=0.0,
            attention_dropout=0.0, **common,
        )
    if family == "gpt_neox":
        return GPTNeoXConfig(
            hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
            num_attention_heads=heads, max_position_embeddings=max_positions,
            hidden_dropout=0.0, attention_dropout=0.0, tie_word_embeddings=False, **common,
        )
    raise UserError(f"unknown tiny family {family!r}; choose one of {', '.join(TINY_FAMILIES)}")


def tiny_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32, **config_kwargs):
    """A randomly initialised causal LM of ``family`` (seeded), in eval mode."""
    config = tiny_config(family, **config_kwargs)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()
