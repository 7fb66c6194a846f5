"""PST: the mask against a brute-force top-k of an independently computed importance, the
straight-through gradients against their closed form, the cubic schedule, exact sparsity after
merging, the parameter count, configuration errors, and a short training run that reaches the
requested sparsity while lowering the loss."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from adaptation import adapt_to_descending, descending_loss
from conftest import FAMILIES
from efficientgpt.errors import ConfigError
from efficientgpt.models import arch
from efficientgpt.models.tiny import tiny_model
from efficientgpt.peft import core
from efficientgpt.peft.pst import PstConfig, pruned_count, sparsity_at, topk_mask

IDS = torch.randint(2, 128, (2, 10), generator=torch.Generator().manual_seed(4))


def _randomise(delta, seed=0, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in delta.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=g))


def _ref_weight(t: arch.Target) -> torch.Tensor:
    """The target's frozen weight in (d_out, d_in) orientation, read independently of the delta."""
    w = t.module.weight.detach().clone()
    if type(t.module).__name__ == "Conv1D":
        w = w.T  # GPT-2 stores (d_in, d_out)
    return w if t.out_index is None else w[t.out_index]


def _ref_terms(delta, t, cfg):
    """W' = W + βUV and S = |W'| + α1 AB + α2 (R 1ᵀ + 1 Cᵀ), written out element by element."""
    f = delta.modules[delta.key_of(t)]
    U, V, A, B, R, C = (getattr(f, n).detach() for n in "UVABRC")
    w = _ref_weight(t)
    upd = w + cfg.beta * torch.einsum("ik,kj->ij", U, V)
    s = upd.abs() + cfg.alpha1 * torch.einsum("ik,kj->ij", A, B) + cfg.alpha2 * (R.view(-1, 1) + C.view(1, -1))
    return w, upd, s


def _brute_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the round(s·n) smallest scores; ties go in row-major order (Python's sort is stable)."""
    flat = scores.reshape(-1).tolist()
    n_pruned = round(sparsity * len(flat))
    order = sorted(range(len(flat)), key=lambda i: (flat[i], i))
    mask = torch.ones(len(flat))
    mask[order[:n_pruned]] = 0
    return mask.view_as(scores)


# ---- the mask -----------------------------------------------------------------------------------------
def test_topk_mask_with_ties_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 4, (7, 9), generator=g).float()  # 63 entries on 4 values: many ties
    for s in (0.0, 0.1, 0.29, 0.5, 0.77, 0.99):
        got = topk_mask(scores, pruned_count(s, scores.numel()))
        torch.testing.assert_close(got, _brute_mask(scores, s), atol=0, rtol=0)
    assert pruned_count(0.29, 100) == 29  # int(0.29 * 100) would give 28


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "llama"])
def test_mask_keeps_exactly_the_top_k_of_the_combined_importance(family):
    model = tiny_model(family)
    cfg = PstConfig(targets=["q", "v", "up"], rank=3, update_rank=2, sparsity=0.6, alpha1=0.7, alpha2=0.4,
                    beta=0.5, schedule_steps=20)
    delta = core.apply(model, "pst", cfg)
    _randomise(delta)
    delta.on_step_begin(12)  # mid-ramp: s(12) = 0.6 - 0.6 (1 - 10/12)³
    s_now = 0.6 - 0.6 * (1 - 10 / 12) ** 3
    assert delta.sparsity == pytest.approx(s_now, abs=1e-12)
    for t in arch.resolve(model, cfg.targets):
        _, _, s = _ref_terms(delta, t, cfg)
        want = _brute_mask(s, s_now)
        torch.testing.assert_close(delta.mask(t), want, atol=0, rtol=0)
        assert int((want == 0).sum()) == round(s_now * s.numel())


# ---- the forward pass and the straight-through gradients ----------------------------------------------
@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "qwen2"])
def test_layer_output_is_the_masked_updated_weight(family):
    """Each hooked module computes (M ⊙ W') x + b for its targeted rows and W x + b elsewhere."""
    model = tiny_model(family)
    cfg = PstConfig(targets=["q", "v", "down"], rank=2, update_rank=2, sparsity=0.5, schedule_steps=10)
    delta = core.apply(model, "pst", cfg)
    _randomise(delta, seed=1)
    delta.on_step_begin(10)
    seen = {}
    targets = arch.resolve(model, cfg.targets)
    for t in {t.name: t for t in targets}.values():
        t.module.register_forward_hook(lambda m, a, o, name=t.name: seen.__setitem__(name, (a[0], o)))
    with torch.no_grad():
        model(IDS)
        for name in {t.name for t in targets}:
            mine = [t for t in targets if t.name == name]
            module = mine[0].module
            w = _ref_weight(arch.Target(name, module, None, None)).clone()  # (d_out, d_in), whole module
            for t in mine:
                _, upd, s = _ref_terms(delta, t, cfg)
                eff = _brute_mask(s, 0.5) * upd
                if t.out_index is None:
                    w = eff
                else:
                    w[t.out_index] = eff
            x, out = seen[name]
            torch.testing.assert_close(out, F.linear(x, w, module.bias), atol=1e-5, rtol=1e-5)


def test_straight_through_gradients_equal_the_closed_form():
    model = tiny_model("llama")
    cfg = PstConfig(targets=["down"], layers=[0], rank=3, update_rank=2, sparsity=0.5, alpha1=0.8, alpha2=0.6,
                    beta=0.7, schedule_steps=10)
    delta = core.apply(model, "pst", cfg)
    _randomise(delta, seed=2)
    delta.on_step_begin(10)
    (t,) = arch.resolve(model, cfg.targets, cfg.layers)
    f = delta.modules[delta.key_of(t)]
    G = torch.randn(t.out_features, t.in_features, generator=torch.Generator().manual_seed(5))
    (delta.effective_weight(t) * G).sum().backward()  # ∂L/∂(M ⊙ W') = G

    U, V, A, B = (getattr(f, n).detach() for n in "UVAB")
    _, upd, s = _ref_terms(delta, t, cfg)
    M = _brute_mask(s, 0.5)
    dS = G * upd  # straight-through: ∂L/∂S = ∂L/∂M = G ⊙ W'
    dW = G * M + dS * torch.sign(upd)  # W' enters M ⊙ W' and, through |W'|, the importance
    want = {
        "A": cfg.alpha1 * dS @ B.T, "B": cfg.alpha1 * A.T @ dS,
        "R": cfg.alpha2 * dS.sum(1), "C": cfg.alpha2 * dS.sum(0),
        "U": cfg.beta * dW @ V.T, "V": cfg.beta * U.T @ dW,
    }
    for name, g in want.items():
        grad = getattr(f, name).grad
        assert grad.abs().max() > 1e-3, name
        torch.testing.assert_close(grad, g, atol=1e-5, rtol=1e-4, msg=name)
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith(core.DELTA_ROOT))


# ---- the schedule ---------------------------------------------------------------------------------
def test_schedule_is_the_cubic_closed_form():
    cfg = PstConfig(sparsity=0.9, initial_sparsity=0.1, schedule_steps=100, initial_warmup=0.1, final_warmup=0.3)
    cubic = {25: 0.9 - 0.8 * 0.75**3, 40: 0.9 - 0.8 * 0.5**3, 55: 0.9 - 0.8 * 0.25**3}
    for step, want in {0: 0.1, 10: 0.1, **cubic, 70: 0.9, 71: 0.9, 100: 0.9, 500: 0.9}.items():
        assert sparsity_at(step, cfg) == pytest.approx(want, abs=1e-12), step
    # The ramp rises monotonically from s_i to s_f.
    values = [sparsity_at(i, cfg) for i in range(101)]
    assert all(b >= a for a, b in zip(values, values[1:]))
    no_warmup = PstConfig(sparsity=0.5, schedule_steps=8, initial_warmup=0.0, final_warmup=0.0)
    assert [sparsity_at(i, no_warmup) for i in (0, 4, 8)] == pytest.approx([0.0, 0.5 - 0.5 / 8, 0.5])


def test_schedule_is_a_pure_function_of_the_step():
    model = tiny_model("opt")
    cfg = PstConfig(targets=["up"], rank=2, update_rank=2, sparsity=0.7, schedule_steps=10)
    delta = core.apply(model, "pst", cfg)
    _randomise(delta)
    delta.on_step_begin(5)
    first = {k: v["pruned"] for k, v in delta.sparsity_report().items()}
    delta.on_step_begin(9)
    delta.on_step_begin(5)  # going back gives the same masks: nothing is accumulated
    assert {k: v["pruned"] for k, v in delta.sparsity_report().items()} == first
    assert delta.sparsity == pytest.approx(sparsity_at(5, cfg))


# ---- merging: a sparse model of exactly the requested sparsity ----------------------------------------
@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "opt"])
def test_merge_gives_exact_sparsity_and_unmerge_restores(family):
    model = tiny_model(family)
    cfg = PstConfig(targets=["q", "k", "o", "down"], rank=2, update_rank=2, sparsity=0.6, schedule_steps=10)
    delta = core.apply(model, "pst", cfg)
    _randomise(delta, seed=3)
    delta.on_step_begin(10)
    model.eval()
    with torch.no_grad():
        unmerged = model(IDS).logits
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    delta.merge()
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, unmerged, atol=1e-5, rtol=0)
    for t in arch.resolve(model, cfg.targets):
        w = _ref_weight(t)
        assert int((w == 0).sum()) == round(0.6 * w.numel()), t.name
    assert all(v["pruned"] == round(0.6 * v["numel"]) for v in delta.sparsity_report().values())
    # Untargeted roles of a fused projection keep their weights (GPT-2 / GPT-NeoX v rows).
    if family in ("gpt2", "gpt_neox"):
        (v,) = arch.resolve(model, ["v"], [0])
        assert torch.equal(_ref_weight(v), before[f"{v.name}.weight"].T[v.out_index]
                           if family == "gpt2" else before[f"{v.name}.weight"][v.out_index])
    delta.on_step_begin(10)  # a merged delta re-folds at the step's sparsity
    delta.unmerge()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


# ---- parameters and configuration ---------------------------------------------------------------------
@pytest.mark.parametrize(("kwargs", "per_unit"), [
    (dict(rank=4, update_rank=3), 4 + 3 + 1),
    (dict(rank=0, update_rank=3), 3 + 1),
    (dict(rank=2, update_rank=0, structured=False), 2),
    (dict(rank=8, update_rank=8), 17),  # the released code's defaults
])
def test_trainable_count_is_the_closed_form(kwargs, per_unit):
    model = tiny_model("llama")  # hidden 32, intermediate 64, GQA: k/v project 32 -> 16
    delta = core.apply(model, "pst", PstConfig(**kwargs))  # all-linear by default
    d = 32
    per_layer = {"q": (d, d), "k": (d, 16), "v": (d, 16), "o": (d, d), "gate": (d, 64), "up": (d, 64),
                 "down": (64, d)}
    want = 2 * sum(per_unit * (i + o) for i, o in per_layer.values())
    assert core.count_parameters(model)["trainable"] == want
    assert delta.describe()["trainable_parameters"] == want


@pytest.mark.parametrize("family", FAMILIES)
def test_identity_at_init(family):
    model = tiny_model(family)
    with torch.no_grad():
        base = model(IDS).logits
    core.apply(model, "pst", PstConfig())
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, base, atol=0, rtol=0)


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(sparsity=1.0), r"sparsity = 1.0: sparsity outside \[0, 1\)"),
    (dict(sparsity=-0.1), r"sparsity = -0.1: sparsity outside \[0, 1\)"),
    (dict(initial_sparsity=1.5), r"initial_sparsity = 1.5: sparsity outside \[0, 1\)"),
    (dict(sparsity=0.3, initial_sparsity=0.5), r"initial_sparsity = 0.5 is larger than the target sparsity"),
    (dict(initial_warmup=0.6, final_warmup=0.5), r"initial_warmup \+ final_warmup = 0.6 \+ 0.5 exceeds 1"),
    (dict(rank=0, update_rank=0, structured=False), r"trains nothing"),
    (dict(schedule_steps=0), r"schedule_steps = 0 is out of range: must be >= 1"),
    (dict(rank=-1), r"rank = -1 is out of range: must be >= 0"),
])
def test_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        core.apply(tiny_model("llama"), "pst", PstConfig(**kwargs))


# ---- training -------------------------------------------------------------------------------------


def test_training_reaches_the_sparsity_and_lowers_the_loss(ascending_base, tmp_path):
    """Adapting to descending sequences while pruning half of every linear map: the loss falls, the
    masks end at exactly half, the base weights never move, and the merged model is that sparse model."""
    model = copy.deepcopy(ascending_base)
    steps = 30
    torch.manual_seed(0)
    cfg = PstConfig(rank=4, update_rank=4, sparsity=0.5, schedule_steps=steps)
    delta = core.apply(model, "pst", cfg)
    before, after = adapt_to_descending(model, steps=steps, step_callbacks=[delta.on_step_begin])
    assert after < before - 0.1, (before, after)
    assert delta.step == steps - 1 and delta.sparsity == 0.5  # final_warmup: the last steps ran at s_f
    report = delta.sparsity_report()
    assert len(report) == 14 and all(v["pruned"] == round(0.5 * v["numel"]) for v in report.values())

    core.save_delta(delta, tmp_path / "pst")
    with torch.no_grad():
        tuned = model(IDS).logits
        fresh = copy.deepcopy(ascending_base)
        loaded = core.load_delta(fresh, tmp_path / "pst")
        assert loaded.step == steps - 1
        torch.testing.assert_close(fresh(IDS).logits, tuned, atol=0, rtol=0)

        core.merge_and_unload(model)
        torch.testing.assert_close(model(IDS).logits, tuned, atol=1e-5, rtol=0)
        assert descending_loss(model) == pytest.approx(after, abs=1e-5)
    for t in arch.resolve(model, cfg.targets):
        w = t.module.weight
        assert int((w == 0).sum()) == round(0.5 * w.numel()), t.name
