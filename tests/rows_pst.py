"""Conformance row of PST: per target matrix, (r + r_w + 1)(d_in + d_out) trainable numbers.

``A B`` (low-rank importance, rank r) and ``U V`` (weight update, rank r_w) hold r (d_in + d_out) and
r_w (d_in + d_out); the row and column scores ``R``, ``C`` hold d_out + d_in. A fused role counts its
own slice of output features. The schedule starts at sparsity 0 with ``V = 0``: identity at init.
"""

from efficientgpt.models import arch
from efficientgpt.peft.pst import PstConfig
from rows import Row


def _count(model, cfg):
    per_unit = cfg.rank + cfg.update_rank + (1 if cfg.structured else 0)
    return sum(per_unit * (t.in_features + t.out_features) for t in arch.resolve(model, cfg.targets))


ROWS = {
    "pst": Row(config=lambda family: PstConfig(targets=["q", "v", "down"], rank=2, update_rank=3, sparsity=0.5,
                                               schedule_steps=10),
               count=_count, identity_at_init=True),
}
