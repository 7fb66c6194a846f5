"""The registry: specs, lookups and errors."""

from __future__ import annotations

import dataclasses

import pytest

from efficientgpt import registry
from efficientgpt.errors import UserError


@dataclasses.dataclass
class _Cfg:
    r: int = 1


def test_register_lookup_and_listing(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", {})
    monkeypatch.setattr(registry, "_loaded", True)
    spec = registry.register(registry.MethodSpec("toy", "peft", _Cfg, lambda m, c: m, "lora", "a toy"))
    assert registry.get("toy") is spec
    assert [s.name for s in registry.methods("peft")] == ["toy"]
    assert registry.methods("prune") == []
    assert spec.describe()["config"] == "_Cfg"
    with pytest.raises(ValueError, match="registered twice"):
        registry.register(registry.MethodSpec("toy", "peft", _Cfg, lambda m, c: m, "lora", "again"))


def test_unknown_names_list_what_exists(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", {})
    monkeypatch.setattr(registry, "_loaded", True)
    registry.register(registry.MethodSpec("lora_toy", "peft", _Cfg, lambda m, c: m, "lora", "x"))
    with pytest.raises(UserError, match=r"unknown method 'lora_tyo' \(did you mean 'lora_toy'\?\); registered methods: lora_toy"):
        registry.get("lora_tyo")
    with pytest.raises(UserError, match="unknown method family 'nope'"):
        registry.methods("nope")
    with pytest.raises(ValueError, match="family 'bogus'"):
        registry.MethodSpec("x", "bogus", _Cfg, lambda m, c: m, "p", "s")
