"""Parameter-efficient tuning: the delta protocol (:mod:`.core`) and one module per method."""

from efficientgpt.peft.core import (
    Delta,
    apply,
    count_parameters,
    deltas,
    disable,
    load_delta,
    remove,
    save_delta,
    set_active,
)

__all__ = ["Delta", "apply", "count_parameters", "deltas", "disable", "load_delta", "remove", "save_delta",
           "set_active"]
