"""Conformance row of prompt tuning: the soft prompt P_e is n x e (e: the token-embedding width)."""

from efficientgpt.peft.prompt_tuning import PromptTuningConfig
from rows import Row


def _count(model, cfg):
    return cfg.num_virtual_tokens * model.get_input_embeddings().weight.shape[1]


ROWS = {
    # virtual tokens change the outputs from the start (paper §2): no identity at initialisation
    "prompt_tuning": Row(config=lambda family: PromptTuningConfig(num_virtual_tokens=3), count=_count,
                         identity_at_init=False),
}
