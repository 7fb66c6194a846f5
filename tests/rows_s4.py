"""Conformance row of the S4 design-space composite on the 2-layer tiny models: layer 0 gets Houlsby
adapters and LoRA, layer 1 prefix tuning, BitFit and LoRA (the S4 preset's G1 and G4 strategies), with
sizes fixed by ``options`` so the count is the sum of the children's closed forms, from the model config:

* Houlsby adapters: 2 per layer, ``(d·m + m) + (m·d + d)`` each;
* LoRA on q and v: ``r · ((d + heads·hd) + (d + kv·hd))`` per layer;
* prefix tuning trained directly: ``n · 2 · kv·hd`` per layer;
* BitFit on every linear bias of the layer (q, k, v, o, the MLP's up and down, and gate where the MLP
  is gated) plus the two LayerNorm biases where the family has LayerNorm (never the final norm: it
  belongs to no layer).

Prefix tuning changes the outputs from the start, so the composite is not the identity at init.
"""

from efficientgpt.peft.s4 import S4Config
from rows import Row

M, R, N = 4, 2, 3
GATED = {"llama", "qwen2"}
LAYER_NORM = {"gpt2", "opt", "gpt_neox"}


def _config(family):
    return S4Config(preset=None, groups=[
        {"layers": [0], "strategies": ["adapter_houlsby", "lora"]},
        {"layers": [1], "strategies": ["prefix_tuning", "bitfit", "lora"]},
    ], options={"adapter_houlsby": {"bottleneck": M}, "lora": {"rank": R}, "prefix_tuning": {"num_virtual_tokens": N}})


def _count(model, cfg):
    c = model.config
    family = c.model_type
    d, heads = c.hidden_size, c.num_attention_heads
    kv = getattr(c, "num_key_value_heads", None) or heads
    hd = d // heads
    inter = getattr(c, "intermediate_size", None) or getattr(c, "ffn_dim", None) or getattr(c, "n_inner", None) or 4 * d
    adapters = 2 * ((d * M + M) + (M * d + d))
    lora = R * ((d + heads * hd) + (d + kv * hd))
    prefix = N * 2 * kv * hd
    bitfit = heads * hd + 2 * kv * hd + d + inter + d + (inter if family in GATED else 0)
    bitfit += 2 * d if family in LAYER_NORM else 0
    return (adapters + lora) + (prefix + bitfit + lora)


ROWS = {
    "s4": Row(config=_config, count=_count, identity_at_init=False),
}
