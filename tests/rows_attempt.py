"""Conformance row of ATTEMPT: k target prompts (k x n x e), the attention module's W_down (r x e) and
W_up (e x r), and its layer norm's weight and bias (e each); the source prompts are frozen."""

from efficientgpt.peft.attempt import AttemptConfig
from rows import Row


def _count(model, cfg):
    e = model.get_input_embeddings().weight.shape[1]
    k = len(cfg.target_tasks) if cfg.target_tasks else 1
    return k * cfg.num_virtual_tokens * e + 2 * cfg.attn_hidden * e + 2 * e


ROWS = {
    # the mixed prompt changes the outputs from the start (paper §3.2): no identity at initialisation;
    # train_sources gives two (not yet trained) source prompts without files
    "attempt": Row(config=lambda family: AttemptConfig(num_virtual_tokens=3, attn_hidden=8, train_sources=1,
                                                       source_tasks=["copy_words", "sort_words"]),
                   count=_count, identity_at_init=False),
}
