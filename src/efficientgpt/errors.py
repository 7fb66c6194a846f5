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
    """A 'did you mean' hint for ``name`` among ``choices`` (empty string when nothing is close).

    Case is ignored. The nearest choice by edit distance (a swap of two neighbouring letters counts
    as one edit) wins, and among equally near ones a choice with the same letters, so the typo
    'ICRL' suggests 'ICLR' rather than 'ICML'; far-off names fall back to difflib's similarity.
    """
    import difflib

    if not choices:
        return ""
    low = name.lower()
    dist, _, _, best = min((_edit_distance(low, c.lower()), sorted(low) != sorted(c.lower()), i, c)
                           for i, c in enumerate(choices))
    if dist <= max(1, len(name) // 3):
        return f" (did you mean {best!r}?)"
    near = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean {near[0]!r}?)" if near else ""


def _edit_distance(a: str, b: str) -> int:
    """Optimal-string-alignment distance: insertions, deletions, substitutions, adjacent swaps."""
    prev2: list[int] = []
    prev = list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        cur = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] != b[j - 1]))
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                cur[j] = min(cur[j], prev2[j - 2] + 1)
        prev2, prev = prev, cur
    return prev[-1]
