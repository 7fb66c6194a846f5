"""Bottleneck adapters (Houlsby and Pfeiffer placements): identity at init, a slow reference of the
adapter function and its placement, closed-form counts, training, and the documented refusals."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from adaptation import adapt_to_descending
from conftest import FAMILIES
from efficientgpt.errors import ConfigError, UserError
from efficientgpt.models import arch
from efficientgpt.models.tiny import tiny_model
from efficientgpt.peft import core
from efficientgpt.peft.adapter import HoulsbyAdapterConfig, PfeifferAdapterConfig

IDS = torch.randint(2, 128, (2, 10), generator=torch.Generator().manual_seed(3))
METHODS = {"adapter_houlsby": HoulsbyAdapterConfig, "adapter_pfeiffer": PfeifferAdapterConfig}
ROLES = {"adapter_houlsby": ("o", "down"), "adapter_pfeiffer": ("down",)}
REF_ACT = {"relu": torch.relu, "gelu": lambda z: F.gelu(z), "silu": lambda z: z * torch.sigmoid(z)}


def _randomise(delta, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in delta.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g))


def _adapter_weights(delta, name):
    a = delta.modules[core.target_key(name)]
    return a.down.weight, a.down.bias, a.up.weight, a.up.bias


def _reference(h, wd, bd, wu, bu, act):
    """h + W_up f(W_down h + b_down) + b_up, written out."""
    z = torch.einsum("...d,md->...m", h, wd) + bd  # (..., m); OPT's FFN sees (B*T, d)
    return h + torch.einsum("...m,dm->...d", REF_ACT[act](z), wu) + bu  # (..., d)


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("family", FAMILIES)
def test_identity_at_init(method, family):
    model = tiny_model(family)
    with torch.no_grad():
        base = model(IDS).logits
    torch.manual_seed(0)
    delta = core.apply(model, method, METHODS[method](bottleneck=8))
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, base, atol=0, rtol=0)
    # Exact identity comes from a zero up-projection; the down-projection is a small random map.
    for name, p in delta.modules.named_parameters():
        if ".up." in name or name.endswith("down.bias"):
            assert torch.count_nonzero(p) == 0, name
        else:
            assert 0 < p.abs().max() <= 2 * delta.config.init_scale, name


@pytest.mark.parametrize(("method", "family", "act"), [
    ("adapter_houlsby", "gpt2", "gelu"), ("adapter_houlsby", "llama", "silu"),
    ("adapter_houlsby", "gpt_neox", "relu"), ("adapter_pfeiffer", "opt", "relu"),
    ("adapter_pfeiffer", "qwen2", "gelu"),
])
def test_adapter_matches_slow_reference(method, family, act):
    """Each hooked sublayer output h becomes h + W_up f(W_down h), and nothing else changes."""
    model = tiny_model(family)
    ref_model = copy.deepcopy(model)
    targets = {r: arch.resolve(model, [r]) for r in ("o", "down")}
    seen: dict[str, dict[str, torch.Tensor]] = {"raw": {}, "adapted": {}}

    def capture(kind, name):
        def hook(mod, args, out):
            seen[kind][name] = out.detach()
        return hook

    for ts in targets.values():  # registered before the delta's hooks: sees the raw output
        for t in ts:
            t.module.register_forward_hook(capture("raw", t.name))
    delta = core.apply(model, method, METHODS[method](bottleneck=5, activation=act))
    _randomise(delta)
    for ts in targets.values():  # registered after: sees what the block receives
        for t in ts:
            t.module.register_forward_hook(capture("adapted", t.name))
    with torch.no_grad():
        logits = model(IDS).logits

    adapted_roles = ROLES[method]
    for role, ts in targets.items():
        for t in ts:
            raw, out = seen["raw"][t.name], seen["adapted"][t.name]
            if role in adapted_roles:
                want = _reference(raw, *_adapter_weights(delta, t.name), act)
                torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-5)
                assert (out - raw).abs().max() > 1e-3
            else:
                assert torch.equal(out, raw), f"{t.name} must not be adapted by {method}"

    # The whole model: an independent copy with the reference written as plain hooks gives the same logits.
    for role in adapted_roles:
        for t, t_ref in zip(targets[role], arch.resolve(ref_model, [role]), strict=True):
            w = [x.detach().clone() for x in _adapter_weights(delta, t.name)]
            t_ref.module.register_forward_hook(lambda mod, args, out, w=w: _reference(out, *w, act))
    with torch.no_grad():
        torch.testing.assert_close(logits, ref_model(IDS).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("method", "per_layer"), [("adapter_houlsby", 2), ("adapter_pfeiffer", 1)])
def test_parameter_count_closed_form(method, per_layer):
    for family, cfg, layers in (
        ("gpt2", METHODS[method](bottleneck=6), 2),
        ("llama", METHODS[method](bottleneck=3, layers=[1]), 1),
        ("opt", METHODS[method](), 2),  # m = 32 // 16 = 2 from the default reduction factor
    ):
        model = tiny_model(family)
        delta = core.apply(model, method, cfg)
        d = 32
        m = cfg.bottleneck or d // 16
        per_adapter = (d * m + m) + (m * d + d)
        assert core.count_parameters(model)["trainable"] == per_layer * layers * per_adapter
        assert delta.describe()["trainable_parameters"] == per_layer * layers * per_adapter


def test_layers_restrict_placement():
    model = tiny_model("llama")
    delta = core.apply(model, "adapter_houlsby", HoulsbyAdapterConfig(bottleneck=4, layers=[1]))
    assert delta.targets() == ["model.layers.1.mlp.down_proj", "model.layers.1.self_attn.o_proj"]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_training_lowers_the_loss_and_moves_only_adapters(method, ascending_base):
    """Adapting the ascending-sequence model to descending sequences: the adapters alone lower the
    held-out loss, and no base weight moves."""
    model = copy.deepcopy(ascending_base)
    torch.manual_seed(0)
    delta = core.apply(model, method, METHODS[method](bottleneck=8))
    before, after = adapt_to_descending(model)
    assert after < before - 0.1, (before, after)
    assert all(torch.count_nonzero(p) > 0 for n, p in delta.modules.named_parameters() if ".up." in n)


def test_dropout_follows_train_and_eval_mode():
    model = tiny_model("gpt2")
    delta = core.apply(model, "adapter_pfeiffer", PfeifferAdapterConfig(bottleneck=4, dropout=0.5))
    _randomise(delta)
    model.eval()
    with torch.no_grad():
        a, b = model(IDS).logits, model(IDS).logits
        torch.testing.assert_close(a, b, atol=0, rtol=0)
        model.train()
        torch.manual_seed(0)
        c = model(IDS).logits
    assert (c - a).abs().max() > 1e-4  # dropout acts in training mode only


@pytest.mark.parametrize("method", sorted(METHODS))
def test_bottleneck_out_of_range_is_refused(method):
    model = tiny_model("llama")  # hidden size 32
    with pytest.raises(ConfigError, match=r"bottleneck = 33 is larger than the hidden size 32.*"
                                          r"an adapter bottleneck larger than the hidden size"):
        core.apply(model, method, METHODS[method](bottleneck=33))
    assert not core.deltas(model) and not hasattr(model, core.DELTA_ROOT)  # nothing left behind
    core.apply(model, method, METHODS[method](bottleneck=32))  # equal to d is allowed
    for bad, match in (
        (dict(bottleneck=0), r"bottleneck = 0 is out of range: must be >= 1"),
        (dict(init_scale=0.0), r"init_scale = 0.0 is out of range: must be > 0"),
        (dict(dropout=1.0), r"dropout = 1.0 must be < 1"),
        (dict(activation="tanh"), r"activation = 'tanh' is not allowed; choose one of relu, gelu, silu"),
    ):
        with pytest.raises(ConfigError, match=match):
            core.apply(tiny_model("llama"), method, METHODS[method](**bad))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_not_mergeable(method):
    model = tiny_model("opt")
    delta = core.apply(model, method, METHODS[method](bottleneck=4))
    with pytest.raises(UserError, match=f"{method} is not mergeable"):
        delta.merge()
    with pytest.raises(UserError, match="cannot merge"):
        core.merge_and_unload(model)


def test_defaults_follow_the_papers():
    assert HoulsbyAdapterConfig().activation == "gelu"  # the official adapter-bert code
    assert PfeifferAdapterConfig().activation == "relu"  # AdapterFusion
    cfg = HoulsbyAdapterConfig()
    assert cfg.bottleneck_for(768) == 48 and cfg.bottleneck_for(8) == 1
