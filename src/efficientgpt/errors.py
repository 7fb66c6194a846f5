"""Errors that reach the user.

A :class:`UserError` is bad input the user can fix (a wrong path, an unknown name, an out-of-range
value). Its message names the bad value and what is allowed. The CLI prints it without a traceback
and exits with status 1; library callers catch it like any ``ValueError``.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input: the message names the bad value and what is allowed."""


class ConfigError(UserError):
    """A configuration field holds a value outside its allowed range."""


def closest(name: str, choices: list[str] | tuple[str, ...]) -> str:
    """A 'did you mean' hint for ``name`` among ``choices`` (empty string when nothing is close)."""
    import difflib

    near = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean {near[0]!r}?)" if near else ""
