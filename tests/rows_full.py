"""Conformance row of full fine-tuning: every base parameter trains, a tied weight counted once."""

from efficientgpt.peft.full import FullConfig
from rows import Row


def _count(model, cfg):
    # model.parameters() yields a tied weight (GPT-2's embedding = LM head) once; the delta adds none.
    return sum(p.numel() for p in model.parameters())


ROWS = {
    "full": Row(config=lambda family: FullConfig(), count=_count),
}
