"""The conformance matrix: every registered method over every tiny model family.

Rows come from the registry (``efficientgpt.registry.methods()``), so a newly registered method is
checked without editing this file; ``CHECKS`` lists the generic checks each method must pass. The
family-level checks below run whether or not any method is registered: they are the contract every
method builds on (each family builds, resolves its roles, trains one step and generates with the KV
cache).
"""

from __future__ import annotations

import pytest
import torch

from conftest import FAMILIES
from efficientgpt import registry
from efficientgpt.models import arch
from efficientgpt.models.tiny import tiny_model
from efficientgpt.train.losses import causal_lm_loss

METHODS = [s.name for s in registry.methods()]


@pytest.mark.parametrize("family", FAMILIES)
def test_family_contract(family):
    model = tiny_model(family, seed=1)
    assert {"q", "k", "v", "o", "up", "down"} <= set(arch.available_roles(model))
    ids = torch.randint(2, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    model.train()
    loss, n = causal_lm_loss(model, {"input_ids": ids})
    (loss / n).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.eval()
    with torch.no_grad():
        full = model(ids).logits[:, -1]
        out = model(ids[:, :-1], use_cache=True)
        step = model(ids[:, -1:], past_key_values=out.past_key_values, use_cache=True).logits[:, -1]
    torch.testing.assert_close(step, full, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_method_attaches(method, family):
    spec = registry.get(method)
    model = tiny_model(family)
    config = spec.config_cls()
    spec.apply(model, config)
