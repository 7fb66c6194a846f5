"""Subcommands of the ``efficientgpt`` tool: each module exposes ``register(subparsers)``."""
