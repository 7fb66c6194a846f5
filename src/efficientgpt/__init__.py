"""efficientgpt: efficient adaptation, compression and training of GPT-style causal language models.

The pipeline is the same for every job: load a causal LM (:mod:`efficientgpt.models`), load data
(:mod:`efficientgpt.data`), apply registered methods (:mod:`efficientgpt.registry`), train with the one
:class:`~efficientgpt.train.Trainer` or calibrate, evaluate (:mod:`efficientgpt.eval`), record.
"""

__version__ = "0.1.0"
