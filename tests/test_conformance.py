"""The conformance matrix: every registered method over every tiny model family.

Each method contributes one row (a ``ROWS`` entry in a ``tests/rows_<method>.py`` file): a small test
config per family, the closed-form count of its trainable parameters, and whether the paper makes it
the identity at initialisation. The generic checks below run for every (method, family) pair; a
method registered without a row fails ``test_every_registered_peft_method_has_a_row``.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch

from conftest import FAMILIES
from efficientgpt import registry
from efficientgpt.models import arch
from efficientgpt.models.tiny import tiny_model
from efficientgpt.peft import core
from efficientgpt.train.losses import causal_lm_loss
from rows import Row

ROWS: dict[str, Row] = {}
for _f in sorted(Path(__file__).parent.glob("rows_*.py")):
    ROWS.update(importlib.import_module(_f.stem).ROWS)

IDS = torch.randint(2, 128, (2, 12), generator=torch.Generator().manual_seed(0))


def test_every_registered_peft_method_has_a_row():
    missing = [s.name for s in registry.methods("peft") if s.name not in ROWS]
    assert not missing, f"methods without a conformance row: {missing}"


@pytest.mark.parametrize("family", FAMILIES)
def test_family_contract(family):
    """What every method builds on: roles resolve, one step trains, KV-cache decoding is exact."""
    model = tiny_model(family, seed=1)
    assert {"q", "k", "v", "o", "up", "down"} <= set(arch.available_roles(model))
    model.train()
    loss, n = causal_lm_loss(model, {"input_ids": IDS})
    (loss / n).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.eval()
    with torch.no_grad():
        full = model(IDS).logits[:, -1]
        out = model(IDS[:, :-1], use_cache=True)
        step = model(IDS[:, -1:], past_key_values=out.past_key_values, use_cache=True).logits[:, -1]
    torch.testing.assert_close(step, full, atol=1e-5, rtol=1e-4)


def _attach(method: str, family: str, seed: int = 0):
    row = ROWS[method]
    model = tiny_model(family, seed=seed)
    if family in row.unsupported:
        with pytest.raises(Exception, match=row.unsupported[family]):
            core.apply(model, method, row.config(family))
        pytest.skip(f"{method} refuses {family} at attach time, as documented")
    with torch.no_grad():
        base = model(IDS).logits
    torch.manual_seed(seed)
    delta = core.apply(model, method, row.config(family))
    return model, delta, base


def _perturb(delta, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in delta.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g).to(p.dtype))


MATRIX = [(m, f) for m in sorted(ROWS) for f in FAMILIES]


@pytest.mark.parametrize(("method", "family"), MATRIX)
def test_identity_at_init_and_parameter_count(method, family):
    model, delta, base = _attach(method, family)
    row = ROWS[method]
    if row.identity_at_init:
        with torch.no_grad():
            torch.testing.assert_close(model(IDS).logits, base, atol=1e-6, rtol=0)
    counts = core.count_parameters(model)
    assert counts["trainable"] == row.count(model, delta.config), counts


@pytest.mark.parametrize(("method", "family"), MATRIX)
def test_one_step_changes_only_trainable_parameters(method, family):
    model, delta, _ = _attach(method, family)
    _perturb(delta)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(trainable, lr=0.1)
    model.train()
    delta.on_step_begin(0)
    loss, n = causal_lm_loss(model, {"input_ids": IDS})
    (loss / n).backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert changed and not (changed & frozen), sorted(changed & frozen)[:5]


@pytest.mark.parametrize(("method", "family"), MATRIX)
def test_merge_unmerge_save_load_and_generation(method, family, tmp_path):
    model, delta, base = _attach(method, family)
    _perturb(delta)
    model.eval()
    with torch.no_grad():
        tuned = model(IDS).logits
        assert (tuned - base).abs().max() > 1e-4  # the perturbed delta changes the outputs
        with core.disable(model):
            torch.testing.assert_close(model(IDS).logits, base, atol=1e-6, rtol=0)
        if registry.get(method).mergeable and family not in ROWS[method].merge_unsupported:
            weights = {n: p.detach().clone() for n, p in model.named_parameters()}
            delta.merge()
            torch.testing.assert_close(model(IDS).logits, tuned, atol=1e-5, rtol=0)
            delta.unmerge()
            for n, p in model.named_parameters():
                torch.testing.assert_close(p, weights[n], atol=1e-6, rtol=0, msg=n)
        core.save_delta(delta, tmp_path / "d")
        torch.testing.assert_close(model(IDS).logits, tuned, atol=1e-6, rtol=0)  # saving changes nothing
        fresh = tiny_model(family, seed=0)
        core.load_delta(fresh, tmp_path / "d")
        torch.testing.assert_close(fresh(IDS).logits, tuned, atol=1e-6, rtol=0)
        prompt = IDS[:1, :5]
        cached = fresh.generate(prompt, max_new_tokens=5, do_sample=False, use_cache=True, pad_token_id=1)
        uncached = fresh.generate(prompt, max_new_tokens=5, do_sample=False, use_cache=False, pad_token_id=1)
        assert torch.equal(cached, uncached)
        core.remove(fresh)
        torch.testing.assert_close(fresh(IDS).logits, base, atol=1e-6, rtol=0)
