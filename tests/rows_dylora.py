"""Conformance row of DyLoRA: r_max (d_in + d_out) per target, every component trainable.

All ``r_max`` components are trainable parameters; a training step gives gradient to only some of
them, but the count is of what the optimizer holds.
"""

from efficientgpt.models import arch
from efficientgpt.peft.dylora import DyLoraConfig
from rows import Row


def _count(model, cfg):
    return sum(cfg.rank * (t.in_features + t.out_features) for t in arch.resolve(model, cfg.targets))


ROWS = {
    "dylora": Row(config=lambda family: DyLoraConfig(targets=["q", "v"], rank=4), count=_count,
                  identity_at_init=True),
}
