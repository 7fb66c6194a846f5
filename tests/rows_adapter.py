"""Conformance rows of the bottleneck adapters: (d·m + m) + (m·d + d) per adapter.

Houlsby places two adapters per decoder layer (after attention and after the FFN), Pfeiffer one
(after the FFN); ``d`` is the model's hidden size and ``m`` the bottleneck.
"""

from efficientgpt.peft.adapter import HoulsbyAdapterConfig, PfeifferAdapterConfig
from rows import Row


def _per_adapter(model, cfg):
    d, m = model.config.hidden_size, cfg.bottleneck
    return (d * m + m) + (m * d + d)


ROWS = {
    "adapter_houlsby": Row(
        config=lambda family: HoulsbyAdapterConfig(bottleneck=4),
        count=lambda model, cfg: 2 * model.config.num_hidden_layers * _per_adapter(model, cfg),
    ),
    "adapter_pfeiffer": Row(
        config=lambda family: PfeifferAdapterConfig(bottleneck=4),
        count=lambda model, cfg: 1 * model.config.num_hidden_layers * _per_adapter(model, cfg),
    ),
}
