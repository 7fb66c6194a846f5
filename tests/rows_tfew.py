"""Conformance row of T-Few: (IA)^3's vectors (one scale per output feature of k and v, one per input
feature of the FFN down projection, in every layer); T-Few's losses add no parameters."""

from efficientgpt.models import arch
from efficientgpt.peft.tfew import TFewConfig
from rows import Row


def _count(model, cfg):
    assert cfg.targets == ["k", "v", "down"] and cfg.feedforward == ["down"]
    _, kv_heads, head_dim = arch.head_dims(model)
    down = arch.block_module(model, 0, "down")
    d_ff = down.weight.shape[0] if arch.is_conv1d(down) else down.weight.shape[1]  # input width of W_2
    return arch.num_layers(model) * (2 * kv_heads * head_dim + d_ff)


ROWS = {
    "tfew": Row(config=lambda family: TFewConfig(), count=_count),
}
