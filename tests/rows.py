"""The row type of the conformance matrix (see ``test_conformance.py``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any


@dataclasses.dataclass
class Row:
    config: Callable[[str], Any]
    """family -> a small config of the method for the tiny model of that family."""
    count: Callable[[Any, Any], int]
    """(model, config) -> trainable parameters by the method's closed form (computed from shapes)."""
    identity_at_init: bool = True
    """The paper initialises the delta so the model's outputs are unchanged."""
    unsupported: dict[str, str] = dataclasses.field(default_factory=dict)
    """family -> regex of the clear error raised at attach time."""
    merge_unsupported: dict[str, str] = dataclasses.field(default_factory=dict)
    """family -> regex of the clear error raised by merge() (a mergeable method that cannot merge there)."""
