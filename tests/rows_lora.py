"""Conformance row of LoRA: r (d_in + d_out) per target, fused roles counted by their slice."""

from efficientgpt.models import arch
from efficientgpt.peft.lora import LoraConfig
from rows import Row


def _count(model, cfg):
    return sum(cfg.rank * (t.in_features + t.out_features) for t in arch.resolve(model, cfg.targets))


ROWS = {
    "lora": Row(config=lambda family: LoraConfig(targets=["q", "v", "down"], rank=4), count=_count),
}
