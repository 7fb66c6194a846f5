"""Evaluation: perplexity with the standard protocol (:mod:`efficientgpt.eval.perplexity`)."""
