"""Conformance row of BitFit: one bias entry per output feature of every linear target (a fused role by
its slice), plus the LayerNorm biases (two per block and the final norm) where the family has
LayerNorm rather than RMSNorm."""

from torch import nn

from efficientgpt.models import arch
from efficientgpt.peft.bitfit import BitFitConfig
from rows import Row


def _count(model, cfg):
    linear = sum(t.out_features for t in arch.resolve(model, cfg.targets))
    norm = arch.model_module(model, "final_norm")
    norms = (2 * arch.num_layers(model) + 1) * model.config.hidden_size if isinstance(norm, nn.LayerNorm) else 0
    return linear + norms


ROWS = {
    "bitfit": Row(config=lambda family: BitFitConfig(), count=_count,
                  merge_unsupported={"qwen2": r"has no bias and the qwen2 config has no flag"}),
}
