"""Conformance row of prefix tuning with the reparametrisation P = MLP(P') (Li & Liang, Eq. 5):
P' is n x d, the MLP is Linear(d, h) -> tanh -> Linear(h, L * 2 * kv_heads * head_dim), biases included."""

from efficientgpt.peft.prefix_tuning import PrefixTuningConfig
from rows import Row


def _count(model, cfg):
    c = model.config
    d, layers, heads = c.hidden_size, c.num_hidden_layers, c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or heads
    width = layers * 2 * kv_heads * (d // heads)
    h = cfg.hidden
    return cfg.num_virtual_tokens * d + (d * h + h) + (h * width + width)


ROWS = {
    # the prefix changes the outputs from the start (paper §4.2): no identity at initialisation
    "prefix_tuning": Row(config=lambda family: PrefixTuningConfig(num_virtual_tokens=3, hidden=16), count=_count,
                         identity_at_init=False),
}
