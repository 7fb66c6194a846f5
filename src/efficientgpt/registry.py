"""The one list of methods: the CLI, the conformance tests, the benchmark and the survey all read it.

A method module declares a :class:`MethodSpec` and calls :func:`register` at import time; the module
is listed once in :data:`METHOD_MODULES`. Nothing else needs to know the method exists.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import Any

from efficientgpt.errors import UserError, closest

#: The method families. ``peft`` methods add or wrap trainable modules on a frozen model; the
#: compression families rewrite weights or shapes; ``training`` methods change how a model trains.
FAMILIES = ("peft", "prune", "lowrank", "quant", "distill", "attention", "training")

#: Modules that register methods, imported on first use of the registry.
METHOD_MODULES: tuple[str, ...] = (
    "efficientgpt.peft.lora",
    "efficientgpt.peft.dylora",
    "efficientgpt.peft.ia3",
    "efficientgpt.peft.tfew",
    "efficientgpt.peft.bitfit",
    "efficientgpt.peft.prompt_tuning",
    "efficientgpt.peft.prefix_tuning",
    "efficientgpt.peft.llama_adapter",
    "efficientgpt.peft.compacter",
    "efficientgpt.peft.pst",
    "efficientgpt.peft.s4",
    "efficientgpt.peft.attempt",
    "efficientgpt.compress.prune",
    "efficientgpt.compress.sparsegpt",
    "efficientgpt.compress.quant",
    "efficientgpt.compress.lowrank",
    "efficientgpt.compress.structured",
    "efficientgpt.compress.attention",
    "efficientgpt.peft.adapter",
    "efficientgpt.peft.full",
)


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """Everything the rest of the package needs to know about one method."""

    name: str
    """Registry key and CLI name, e.g. ``lora``."""
    family: str
    """One of :data:`FAMILIES`."""
    config_cls: type
    """Dataclass holding the method's hyperparameters (with per-field help and validation)."""
    apply: Callable[..., Any]
    """``apply(model, config) -> handle``: attaches or runs the method on a causal LM."""
    paper: str
    """Id of the method's paper in the survey data (``efficientgpt survey show ID``)."""
    summary: str
    """One line for ``efficientgpt methods``."""
    mergeable: bool = False
    """True when the delta folds into the base weights (merged logits equal unmerged)."""
    calibration: bool = False
    """True when the method needs calibration data (``apply(model, config, windows=...)``)."""
    task_data: bool = False
    """True when the method trains only on task data (``task:NAME``), never on plain text."""

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"method {self.name!r}: family {self.family!r} is not one of {FAMILIES}")

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "family": self.family,
            "paper": self.paper,
            "summary": self.summary,
            "mergeable": self.mergeable,
            "config": self.config_cls.__name__,
        }


_REGISTRY: dict[str, MethodSpec] = {}
_loaded = False


def register(spec: MethodSpec) -> MethodSpec:
    if spec.name in _REGISTRY and _REGISTRY[spec.name] is not spec:
        raise ValueError(f"method {spec.name!r} is registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def _load() -> None:
    global _loaded
    if not _loaded:
        for module in METHOD_MODULES:
            importlib.import_module(module)
        _loaded = True


def methods(family: str | None = None) -> list[MethodSpec]:
    """Registered methods, sorted by family then name; only ``family`` if given."""
    _load()
    if family is not None and family not in FAMILIES:
        raise UserError(f"unknown method family {family!r}; known families: {', '.join(FAMILIES)}")
    specs = [s for s in _REGISTRY.values() if family is None or s.family == family]
    return sorted(specs, key=lambda s: (FAMILIES.index(s.family), s.name))


def get(name: str) -> MethodSpec:
    """The spec registered as ``name``; an unknown name lists the registered ones."""
    _load()
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(s.name for s in methods()) or "(none registered)"
        raise UserError(f"unknown method {name!r}{closest(name, list(_REGISTRY))}; registered methods: {known}") from None
