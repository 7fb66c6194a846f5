"""Conformance row of LLaMA-Adapter: per adapted layer a K x C prompt and one gate per head
(L · (K·C + heads)); every family is supported (prompt keys/values from its own k/v projections)."""

from efficientgpt.peft.llama_adapter import LlamaAdapterConfig
from rows import Row


def _count(model, cfg):
    c = model.config
    return cfg.adapter_layers * (cfg.adapter_len * c.hidden_size + c.num_attention_heads)


ROWS = {
    # the gate g_l starts at zero: the model is unchanged at initialisation (paper §3.2)
    "llama_adapter": Row(config=lambda family: LlamaAdapterConfig(adapter_len=3, adapter_layers=1), count=_count),
}
