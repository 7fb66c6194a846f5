"""Conformance row of (IA)^3: one scale per output feature of k and v, one per input feature of the FFN
down projection, in every layer (the paper's l_k, l_v, l_ff)."""

from efficientgpt.models import arch
from efficientgpt.peft.ia3 import IA3Config
from rows import Row


def _count(model, cfg):
    assert cfg.targets == ["k", "v", "down"] and cfg.feedforward == ["down"]
    _, kv_heads, head_dim = arch.head_dims(model)
    d_ff = arch.block_module(model, 0, "down")
    d_ff = d_ff.weight.shape[0] if arch.is_conv1d(d_ff) else d_ff.weight.shape[1]  # input width of W_2
    return arch.num_layers(model) * (2 * kv_heads * head_dim + d_ff)


ROWS = {
    "ia3": Row(config=lambda family: IA3Config(), count=_count),
}
