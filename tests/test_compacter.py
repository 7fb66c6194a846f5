"""Compacter, Compacter++ and the PHM adapter: the PHM weight against torch.kron, the adapters against a
slow reference in the model, the sharing of the slow weights A_i (one tensor, gradient from every layer),
closed-form counts, the divisibility errors, save/load, and a short training run."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from adaptation import adapt_to_descending
from conftest import FAMILIES
from efficientgpt.errors import ConfigError, UserError
from efficientgpt.models import arch
from efficientgpt.models.tiny import tiny_model
from efficientgpt.peft import core
from efficientgpt.peft.compacter import RULE_KEY, CompacterConfig, PHMAdapterConfig, PHMLinear
from efficientgpt.train.losses import causal_lm_loss

IDS = torch.randint(2, 128, (2, 10), generator=torch.Generator().manual_seed(3))
METHODS = {"compacter": CompacterConfig, "compacter_pp": CompacterConfig, "phm_adapter": PHMAdapterConfig}
ROLES = {"compacter": ("o", "down"), "compacter_pp": ("down",), "phm_adapter": ("o", "down")}
REF_ACT = {
    "relu": torch.relu,
    "silu": lambda z: z * torch.sigmoid(z),
    "gelu": lambda z: 0.5 * z * (1 + torch.erf(z / math.sqrt(2))),
    "gelu_tanh": lambda z: 0.5 * z * (1 + torch.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3))),
}


def _randomise(delta, seed=0, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in delta.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=g))


def _kron_weight(A, layer):
    """W = Σ_i A_i ⊗ B_i with B_i = s_i t_iᵀ (or the stored B_i), built with torch.kron."""
    B = [layer.s[i] @ layer.t[i].T for i in range(layer.n)] if layer.factorized else list(layer.B)
    return sum(torch.kron(A[i], B[i]) for i in range(layer.n))


def _phm_ref(x, A, layer):
    return x @ _kron_weight(A, layer).T + layer.bias


def _adapter_ref(h, adapter, A_down, A_up, act):
    """h + U f(D h), every PHM layer a dense matrix from torch.kron."""
    return h + _phm_ref(REF_ACT[act](_phm_ref(h, A_down, adapter.down)), A_up, adapter.up)


def _rules(delta, adapter):
    shared = delta.shared_rule()
    return (shared, shared) if shared is not None else (adapter.down.A, adapter.up.A)


@pytest.mark.parametrize("factorized", [True, False])
def test_phm_weight_is_the_sum_of_kronecker_products(factorized):
    torch.manual_seed(0)
    n, d_in, d_out = 4, 12, 8
    layer = PHMLinear(d_in, d_out, n=n, rank=2, factorized=factorized, own_rule=True, init_range=0.5,
                      zero_output_factor=False)
    with torch.no_grad():
        layer.bias.normal_()
    want = _kron_weight(layer.A, layer)
    assert want.shape == (d_out, d_in)
    torch.testing.assert_close(layer.weight(), want, atol=1e-6, rtol=1e-5)
    if factorized:  # rank r: B_i = s_i t_iᵀ has rank <= r
        assert all(torch.linalg.matrix_rank(layer.fast_weights()[i]) <= 2 for i in range(n))
    x = torch.randn(3, 5, d_in)
    # The structured forward (no W materialised) equals the dense product with the Kronecker sum.
    torch.testing.assert_close(layer(x), x @ want.T + layer.bias, atol=1e-5, rtol=1e-5)
    # A shared rule passed in is used when the layer has none of its own.
    shared = PHMLinear(d_in, d_out, n=n, rank=2, factorized=factorized, own_rule=False, init_range=0.5,
                       zero_output_factor=False)
    A = torch.randn(n, n, n)
    torch.testing.assert_close(shared(x, A), _phm_ref(x, A, shared), atol=1e-5, rtol=1e-5)


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
    # Exact identity comes from the up-projection's zero output-side fast weights (s, or B unfactorised);
    # everything else is non-zero so that training starts.
    for name, p in delta.modules.named_parameters():
        if name.endswith(("up.s", "up.B", ".bias")):
            assert torch.count_nonzero(p) == 0, name
        elif name.endswith(".A"):
            assert 0 < p.std() < 1e-3, name  # N(0, 1e-4²) as in the official code
        else:
            assert torch.count_nonzero(p) == p.numel(), name


@pytest.mark.parametrize(("method", "family", "act"), [
    ("compacter", "gpt2", "gelu_tanh"), ("compacter", "llama", "silu"), ("compacter_pp", "opt", "relu"),
    ("compacter_pp", "gpt_neox", "gelu"), ("phm_adapter", "qwen2", "gelu_tanh"),
])
def test_adapters_match_slow_reference(method, family, act):
    """Each hooked sublayer output h becomes h + U f(D h) with U, D = Σ A_i ⊗ B_i, nothing else changes."""
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
    delta = core.apply(model, method, METHODS[method](bottleneck=8, phm_rank=2, activation=act))
    _randomise(delta)
    for ts in targets.values():  # registered after: sees what the block receives
        for t in ts:
            t.module.register_forward_hook(capture("adapted", t.name))
    with torch.no_grad():
        logits = model(IDS).logits

    for role, ts in targets.items():
        for t in ts:
            raw, out = seen["raw"][t.name], seen["adapted"][t.name]
            if role in ROLES[method]:
                adapter = delta.modules[core.target_key(t.name)]
                want = _adapter_ref(raw, adapter, *_rules(delta, adapter), act)
                torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
                assert (out - raw).abs().max() > 1e-3
            else:
                assert torch.equal(out, raw), f"{t.name} must not be adapted by {method}"

    # The whole model: an independent copy with the reference written as plain hooks gives the same logits.
    for role in ROLES[method]:
        for t, t_ref in zip(targets[role], arch.resolve(ref_model, [role]), strict=True):
            adapter = delta.modules[core.target_key(t.name)]
            rules = _rules(delta, adapter)
            t_ref.module.register_forward_hook(
                lambda mod, args, out, a=adapter, r=rules: _adapter_ref(out, a, *r, act))
    with torch.no_grad():
        torch.testing.assert_close(logits, ref_model(IDS).logits, atol=1e-5, rtol=1e-5)


def test_compacter_pp_adapts_the_ffn_only():
    model = tiny_model("llama")
    pp = core.apply(model, "compacter_pp", CompacterConfig(bottleneck=4))
    assert pp.targets() == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    full = core.apply(tiny_model("llama"), "compacter", CompacterConfig(bottleneck=4, layers=[1]))
    assert full.targets() == ["model.layers.1.mlp.down_proj", "model.layers.1.self_attn.o_proj"]


def test_slow_weights_are_one_tensor_that_every_layer_trains():
    """The shared A_i are a single tensor used by the down- and up-projection of every adapter: its
    gradient is the sum of the gradients of per-layer copies of A in a reference model, each non-zero."""
    model = tiny_model("gpt2")
    ref_model = copy.deepcopy(model)
    delta = core.apply(model, "compacter", CompacterConfig(bottleneck=8))
    _randomise(delta)
    A = delta.shared_rule()
    rules = [p for n, p in delta.modules.named_parameters() if n.endswith(".A")]
    assert len(rules) == 1 and rules[0] is A and A.shape == (4, 4, 4)
    assert [k for k in delta.state_dict() if k.endswith(".A")] == [f"{RULE_KEY}.A"]

    copies = []
    for t, t_ref in zip(delta._targets, arch.resolve(ref_model, ["o", "down"]), strict=True):
        assert t.name == t_ref.name
        adapter = delta.modules[core.target_key(t.name)]
        a_down = A.detach().clone().requires_grad_(True)
        a_up = A.detach().clone().requires_grad_(True)
        copies += [a_down, a_up]
        t_ref.module.register_forward_hook(
            lambda mod, args, out, ad=adapter, r=(a_down, a_up): _adapter_ref(out, ad, *r, "gelu_tanh"))
    for m in (model, ref_model):
        loss, n = causal_lm_loss(m, {"input_ids": IDS})
        (loss / n).backward()
    assert len(copies) == 8  # 2 layers x 2 adapters x (down, up)
    assert all(c.grad.abs().max() > 1e-6 for c in copies)
    torch.testing.assert_close(A.grad, sum(c.grad for c in copies), atol=1e-6, rtol=1e-4)

    # One step moves the one tensor that every PHM layer reads.
    before = A.detach().clone()
    torch.optim.SGD(delta.parameters(), lr=0.1).step()
    assert not torch.equal(A, before)


def test_unshared_rules_belong_to_each_phm_layer():
    model = tiny_model("opt")
    delta = core.apply(model, "compacter", CompacterConfig(bottleneck=8, shared_phm_rule=False))
    assert delta.shared_rule() is None and RULE_KEY not in delta.modules
    rules = [p for n, p in delta.modules.named_parameters() if n.endswith(".A")]
    assert len(rules) == 8 and len({id(p) for p in rules}) == 8


@pytest.mark.parametrize(("method", "kwargs", "family", "layers"), [
    ("compacter", dict(bottleneck=8), "gpt2", 2),
    ("compacter", dict(bottleneck=16, phm_rank=3, layers=[0]), "llama", 1),
    ("compacter", dict(phm_dim=2), "opt", 2),  # m = 2·⌊32 / (32·2)⌋ -> max(2, 0) = 2
    ("compacter", dict(bottleneck=8, shared_phm_rule=False), "qwen2", 2),
    ("compacter_pp", dict(bottleneck=8, phm_dim=8), "gpt_neox", 2),
    ("phm_adapter", dict(bottleneck=8), "llama", 2),
    ("phm_adapter", dict(bottleneck=16, phm_dim=2, shared_phm_rule=True), "gpt2", 2),
])
def test_parameter_count_closed_form(method, kwargs, family, layers):
    """N·(fast(d→m) + fast(m→d) + m + d [+ 2n³]) [+ n³]: fast = r(k + d) factorised, kd/n full rank."""
    cfg = METHODS[method](**kwargs)
    model = tiny_model(family)
    delta = core.apply(model, method, cfg)
    d, n, r = 32, cfg.phm_dim, cfg.phm_rank
    m = cfg.bottleneck or max(n, n * (d // (32 * n)))
    fast = 2 * r * (d + m) if cfg.factorized_phm else 2 * d * m // n
    per_adapter = fast + m + d + (0 if cfg.shared_phm_rule else 2 * n**3)
    adapters = len(ROLES[method]) * layers
    want = adapters * per_adapter + (n**3 if cfg.shared_phm_rule else 0)
    assert core.count_parameters(model)["trainable"] == want
    assert delta.describe()["trainable_parameters"] == want


def test_compacter_is_linear_in_the_dimensions():
    """Compacter's fast weights grow as r(k + d) per PHM layer where a dense adapter grows as k·d."""
    counts = {}
    for hidden in (32, 64):
        model = tiny_model("llama", hidden=hidden, heads=4)
        core.apply(model, "compacter_pp", CompacterConfig(bottleneck=8, phm_dim=4))
        counts[hidden] = core.count_parameters(model)["trainable"]
    # Doubling d adds, per adapter, 2r·Δd (fast weights) + Δd (up bias) = 3·32, over 2 layers.
    assert counts[64] - counts[32] == 2 * (2 * 1 * 32 + 32)


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(bottleneck=6), r"phm_dim = 4: a PHM n that does not divide the dimensions \(bottleneck m = 6\).*"
                         r"Allowed n here: 1, 2, 3, 6"),
    (dict(bottleneck=6, phm_dim=3), r"phm_dim = 3: a PHM n that does not divide the dimensions \(hidden size "
                                    r"d = 32 of model\.layers\.0\.\w+\.\w+ and bottleneck m = 6\).*n to divide "
                                    r"both d and m.*Allowed n here: 1, 2$"),
    (dict(bottleneck=8, phm_dim=8, phm_rank=2), r"phm_rank = 2 exceeds min\(d, m\) / n = 1"),
    (dict(bottleneck=36), r"bottleneck = 36 is larger than the hidden size 32"),
    (dict(phm_dim=0), r"phm_dim = 0 is out of range: must be >= 1"),
    (dict(phm_init_range=0.0), r"phm_init_range = 0.0 is out of range: must be > 0"),
    (dict(activation="tanh"), r"activation = 'tanh' is not allowed; choose one of relu, gelu, silu, gelu_tanh"),
])
def test_bad_configs_are_refused_clearly(kwargs, match):
    model = tiny_model("llama")  # hidden size 32
    with pytest.raises(ConfigError, match=match):
        core.apply(model, "compacter", CompacterConfig(**kwargs))
    assert not core.deltas(model) and not hasattr(model, core.DELTA_ROOT)  # nothing left behind
    core.apply(model, "compacter", CompacterConfig(bottleneck=6, phm_dim=2))  # n = 2 divides 32 and 6


@pytest.mark.parametrize("method", sorted(METHODS))
def test_save_load_round_trip(method, tmp_path):
    model = tiny_model("qwen2")
    delta = core.apply(model, method, METHODS[method](bottleneck=8, phm_rank=1, dropout=0.1))
    _randomise(delta, scale=0.2)
    with torch.no_grad():
        tuned = model(IDS).logits
    core.save_delta(delta, tmp_path / "d")
    fresh = tiny_model("qwen2")
    loaded = core.load_delta(fresh, tmp_path / "d")
    assert loaded.method == method and loaded.config == delta.config
    with torch.no_grad():
        torch.testing.assert_close(fresh(IDS).logits, tuned, atol=0, rtol=0)
    # A shared rule stays one tensor after loading.
    if delta.config.shared_phm_rule:
        assert sum(n.endswith(".A") for n, _ in loaded.modules.named_parameters()) == 1


def test_dropout_follows_the_model_mode():
    model = tiny_model("gpt2")  # in eval mode when the delta is attached
    delta = core.apply(model, "compacter_pp", CompacterConfig(bottleneck=4, dropout=0.5))
    _randomise(delta)
    with torch.no_grad():
        a, b = model(IDS).logits, model(IDS).logits
        torch.testing.assert_close(a, b, atol=0, rtol=0)
        model.train()
        torch.manual_seed(0)
        c = model(IDS).logits
    assert (c - a).abs().max() > 1e-4  # dropout acts in training mode only


@pytest.mark.parametrize("method", sorted(METHODS))
def test_not_mergeable(method):
    model = tiny_model("opt")
    delta = core.apply(model, method, METHODS[method](bottleneck=4))
    with pytest.raises(UserError, match=f"{method} is not mergeable"):
        delta.merge()
    with pytest.raises(UserError, match="cannot merge"):
        core.merge_and_unload(model)


def test_defaults_follow_the_official_configs():
    cfg = CompacterConfig()
    assert (cfg.phm_dim, cfg.phm_rank, cfg.factorized_phm, cfg.shared_phm_rule) == (4, 1, True, True)
    assert cfg.activation == "gelu_tanh" and cfg.phm_init_range == 1e-4  # gelu_new, compacter.json
    assert cfg.bottleneck_for(768) == 24 and cfg.bottleneck_for(256) == 8 and cfg.bottleneck_for(32) == 4
    phm = PHMAdapterConfig()
    assert (phm.factorized_phm, phm.shared_phm_rule) == (False, False)  # phm_adapters.json
    z = torch.linspace(-4, 4, 101)
    torch.testing.assert_close(F.gelu(z, approximate="tanh"), REF_ACT["gelu_tanh"](z))


@pytest.mark.parametrize("method", ["compacter", "compacter_pp"])
def test_training_lowers_the_loss_and_moves_only_the_delta(method, ascending_base):
    """Adapting the ascending-sequence model to descending sequences: the Compacter layers alone lower
    the held-out loss, no base weight moves, and the shared A_i train."""
    model = copy.deepcopy(ascending_base)
    torch.manual_seed(0)
    delta = core.apply(model, method, CompacterConfig(bottleneck=8))
    A0 = delta.shared_rule().detach().clone()
    before, after = adapt_to_descending(model)
    assert after < before - 0.1, (before, after)
    assert (delta.shared_rule() - A0).abs().max() > 1e-3
    assert all(torch.count_nonzero(p) > 0 for n, p in delta.modules.named_parameters() if n.endswith("up.s"))
