"""Low-rank decomposition (svd, asvd, svd_llm): closed forms, budgets, every family end to end, the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from efficientgpt.compress import lowrank
from efficientgpt.compress.calibration import InputStats
from efficientgpt.compress.io import save_compressed
from efficientgpt.compress.lowrank import ASVDConfig, LowRankLinear, SVDConfig, SVDLLMConfig
from efficientgpt.errors import ConfigError, UserError
from efficientgpt.models import arch
from efficientgpt.models.loading import load_model
from efficientgpt.models.tiny import tiny_model

FAMILIES = ("gpt2", "llama", "opt", "gpt_neox", "qwen2")
APPLY = {"svd": lowrank.apply_svd, "asvd": lowrank.apply_asvd, "svd_llm": lowrank.apply_svd_llm}
CONFIGS = {"svd": SVDConfig, "asvd": ASVDConfig, "svd_llm": SVDLLMConfig}


def _apply(method, model, config, windows):
    if method == "svd":
        return APPLY[method](model, config)
    return APPLY[method](model, config, windows=windows)


def _windows(n=8, t=16, vocab=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, t), generator=g)


def _correlated(d_in, n, seed=0):
    """``X`` (d_in x n) with strongly correlated, unevenly scaled features."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d_in, d_in, generator=g, dtype=torch.float64) * torch.logspace(0, -2, d_in, dtype=torch.float64)
    return mix @ torch.randn(d_in, n, generator=g, dtype=torch.float64) + 0.5


# ---- the math against closed forms -------------------------------------------------------------


@pytest.mark.parametrize("conv1d", [False, True])
def test_full_rank_svd_reproduces_the_layer(conv1d):
    torch.manual_seed(0)
    d_in, d_out = 20, 12
    layer = Conv1D(d_out, d_in) if conv1d else nn.Linear(d_in, d_out)
    nn.init.normal_(layer.weight)
    nn.init.normal_(layer.bias)
    W = arch.linear_weight(layer)  # (d_out, d_in)
    A, B, _ = lowrank.factorize(W, min(d_in, d_out))
    new = LowRankLinear(d_in, d_out, min(d_in, d_out))
    with torch.no_grad():
        new.A.weight.copy_(A)
        new.B.weight.copy_(B)
        new.B.bias.copy_(layer.bias)
    x = torch.randn(3, 5, d_in)
    assert torch.allclose(new(x), layer(x), atol=1e-5)
    assert (new.in_features, new.out_features, new.rank) == (d_in, d_out, 12)


def test_truncation_error_is_the_norm_of_the_dropped_singular_values():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(24, 40, generator=g, dtype=torch.float64)
    sigma = torch.linalg.svdvals(W)
    for r in (1, 5, 17, 23):
        A, B, _ = lowrank.factorize(W, r)
        assert A.shape == (r, 40) and B.shape == (24, r)
        err = torch.linalg.matrix_norm(W - B @ A)
        assert err.item() == pytest.approx(sigma[r:].norm().item(), rel=1e-10)
        # Σ^{1/2} on both sides: the factors carry equal shares of each singular value.
        assert torch.allclose(A.norm(dim=1), sigma[:r].sqrt(), rtol=1e-10)
        assert torch.allclose(B.norm(dim=0), sigma[:r].sqrt(), rtol=1e-10)


def test_svd_llm_truncation_loss_is_the_norm_of_the_dropped_singular_values_of_WS():
    d_in, d_out, n = 16, 10, 200
    X = _correlated(d_in, n)  # (d_in, n)
    W = torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    S_ref = torch.linalg.cholesky(X @ X.T)  # independent reference: S Sᵀ = X Xᵀ
    sigma_ws = torch.linalg.svdvals(W @ S_ref)
    S, lam = lowrank.whitening_matrix(X @ X.T)
    assert lam == 0.0 and torch.allclose(S, S_ref)
    for r in (2, 5, 9):
        A, B, _ = lowrank.factorize(W, r, lowrank.Whitening(S))
        loss = torch.linalg.matrix_norm((W - B @ A) @ X).item()
        assert loss == pytest.approx(sigma_ws[r:].norm().item(), rel=1e-8)
        # ... and it is the best rank-r choice for this loss: plain SVD does worse on correlated X.
        A0, B0, _ = lowrank.factorize(W, r)
        assert loss < torch.linalg.matrix_norm((W - B0 @ A0) @ X).item()


def test_svd_llm_whitening_from_calibration_statistics():
    d_in, n = 12, 300
    X = _correlated(d_in, n, seed=3)
    stats = InputStats(d_in)
    stats.add(X.T.float().reshape(3, n // 3, d_in))  # rows are tokens, in batches
    S, lam = lowrank.whitening_matrix(stats.gram)
    assert lam == 0.0
    assert torch.allclose(S @ S.T, X @ X.T, rtol=1e-4, atol=1e-4 * float((X @ X.T).abs().max()))


def test_svd_llm_damps_a_singular_gram_matrix():
    X = _correlated(8, 100, seed=4)
    X[3] = 0  # a dead input channel: X Xᵀ is singular
    S, lam = lowrank.whitening_matrix(X @ X.T, damping=1e-6)
    mean_diag = float((X @ X.T).diagonal().mean())
    assert 0 < lam <= 1e-5 * mean_diag
    assert torch.allclose(S @ S.T, X @ X.T + lam * torch.eye(8, dtype=torch.float64), rtol=1e-9, atol=1e-9)
    A, B, _ = lowrank.factorize(torch.randn(6, 8, dtype=torch.float64), 6, lowrank.Whitening(S))
    assert torch.isfinite(A).all() and torch.isfinite(B).all()


@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_asvd_scales_are_mean_abs_activation_to_the_alpha(alpha):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 50, 10, generator=g) * torch.linspace(0.1, 5.0, 10)  # (B, T, d_in)
    stats = InputStats(10, gram=False)
    stats.add(x)
    expected = x.abs().reshape(-1, 10).double().mean(0) ** alpha
    s = lowrank.asvd_scales(stats.abs_mean, alpha)
    assert torch.allclose(s, expected, rtol=1e-6)
    # ASVD truncates the SVD of W S: its error measured through S is the norm of W S's dropped σ.
    W = torch.randn(7, 10, generator=g, dtype=torch.float64)
    A, B, _ = lowrank.factorize(W, 3, lowrank.DiagonalScaling(s))
    sigma = torch.linalg.svdvals(W * expected)
    assert torch.linalg.matrix_norm((W - B @ A) * expected).item() == pytest.approx(sigma[3:].norm().item(),
                                                                                    rel=1e-5)
    A, B, _ = lowrank.factorize(W, 7, lowrank.DiagonalScaling(s))
    assert torch.allclose(B @ A, W, atol=1e-10)


# ---- rank allocation ----------------------------------------------------------------------------


def test_uniform_ranks_follow_the_closed_form():
    model = tiny_model("llama", hidden=48, intermediate=80)
    result = lowrank.apply_svd(model, SVDConfig(ratio=0.6))
    for name, spec in result.modules.items():
        d_in, d_out = spec["in_features"], spec["out_features"]
        assert spec["rank"] == math.floor(0.6 * d_in * d_out / (d_in + d_out))
        m = model.get_submodule(name)
        assert m.A.weight.shape == (spec["rank"], d_in) and m.B.weight.shape == (d_out, spec["rank"])
    assert result.achieved["ratio"] <= 0.6


def _targets_params(model):
    seen, n = set(), 0
    for block in arch.blocks(model):
        for m in block.modules():
            if isinstance(m, LowRankLinear):
                seen.update(id(p) for p in m.parameters())
                n += m.A.weight.numel() + m.B.weight.numel()
            elif (isinstance(m, nn.Linear) or arch.is_conv1d(m)) and id(m.weight) not in seen:
                n += m.weight.numel()
    return n


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.8])
def test_global_allocation_meets_the_parameter_budget(ratio):
    model = tiny_model("llama", hidden=48, intermediate=80, layers=3)
    dense = {t.name: t.in_features * t.out_features for t in arch.resolve(model, ["all-linear"])}
    total_before = sum(p.numel() for p in model.parameters())
    budget = math.floor(ratio * sum(dense.values()))
    result = lowrank.apply_svd(model, SVDConfig(ratio=ratio, allocation="global"))
    used = _targets_params(model)  # counted on the modules now in the model
    assert used <= budget
    assert used > budget - max(48 + 80, 48 + 48)  # nothing more fits: the slack is below one rank's cost
    assert result.achieved["matrix_parameters_after"] == used
    assert result.achieved["ratio"] == used / sum(dense.values())
    total_after = sum(p.numel() for p in model.parameters())
    assert total_before - total_after == sum(dense.values()) - used
    assert result.achieved["parameters_after"] == total_after
    ranks = {s["rank"] for s in result.modules.values()}
    assert len(ranks) > 1  # really non-uniform


def test_global_allocation_keeps_the_top_components_by_normalised_energy():
    # Equal shapes and a budget below every break-even rank: the greedy is a threshold on σ²/Σσ²,
    # so the ranks are the counts of the top-K normalised energies (K from the budget).
    g = torch.Generator().manual_seed(6)
    decay = torch.arange(30, dtype=torch.float64)
    spectra = [torch.exp(-a * decay) * (1 + 0.01 * torch.rand(1, generator=g, dtype=torch.float64)) for a in
               (0.05, 0.2, 0.6)]
    shapes = [(30, 40)] * 3
    budget = 20 * 70 + 5
    ranks = lowrank.allocate_global(spectra, shapes, budget)
    share = torch.cat([s**2 / (s**2).sum() for s in spectra])
    k = budget // 70
    top = torch.argsort(share, descending=True)[:k]
    expected = [int(((top >= 30 * i) & (top < 30 * (i + 1))).sum()) for i in range(3)]
    assert ranks == expected
    assert ranks[0] > ranks[1] > ranks[2]  # the flattest spectrum gets the most rank


def test_global_allocation_at_ratio_one_leaves_everything_dense():
    model = tiny_model("opt")
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    result = lowrank.apply_svd(model, SVDConfig(ratio=1.0, allocation="global"))
    assert result.modules == {} and result.achieved["ratio"] == 1.0
    assert all(not e["factored"] and e["reason"] for e in result.per_layer.values())
    assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())


def test_a_rank_above_break_even_leaves_the_layer_dense():
    model = tiny_model("llama", hidden=32, intermediate=64, kv_heads=4)
    # rank 20: q (32x32) would hold 20*64 = 1280 >= 1024 weights -> dense; up (64x32) holds 1920 < 2048.
    result = lowrank.apply_svd(model, SVDConfig(rank=20))
    q = result.per_layer["model.layers.0.self_attn.q_proj"]
    assert not q["factored"] and "not fewer than the dense 1024" in q["reason"]
    assert isinstance(model.get_submodule("model.layers.0.self_attn.q_proj"), nn.Linear)
    up = result.per_layer["model.layers.0.mlp.up_proj"]
    assert up["factored"] and up["rank"] == 20 and up["parameters_after"] == 20 * 96
    assert "model.layers.0.self_attn.q_proj" not in result.modules


# ---- every family end to end --------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["svd", "asvd", "svd_llm"])
def test_pipeline_on_every_family(family, method, tmp_path):
    model = tiny_model(family, seed=1)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    before = sum(p.numel() for p in model.parameters())
    allocation = "global" if method == "svd_llm" else "uniform"
    result = _apply(method, model, CONFIGS[method](ratio=0.5, allocation=allocation), _windows())
    after = sum(p.numel() for p in model.parameters())
    assert result.achieved["ratio"] <= 0.5
    assert before - after == result.achieved["matrix_parameters_before"] - result.achieved["matrix_parameters_after"]
    assert result.achieved["parameters_before"] == before and result.achieved["parameters_after"] == after
    fused = arch.family_of(model).fused_qkv
    for name, spec in result.modules.items():
        m = model.get_submodule(name)
        assert isinstance(m, LowRankLinear) and m.rank == spec["rank"]
        assert (m.in_features, m.out_features) == (spec["in_features"], spec["out_features"])
        assert spec["bias"] == (m.B.bias is not None)
    if fused:  # q, k and v factored as one matrix of 3 * hidden outputs
        qkv = result.modules[f"{arch.family_of(model).blocks}.0.{fused}"]
        assert qkv["out_features"] == 3 * 32
    with torch.no_grad():
        logits = model(ids).logits
    save_compressed(model, None, tmp_path, {"method": method}, result.modules)
    loaded = load_model(str(tmp_path), tokenizer=False).model
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, logits, atol=1e-6)
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=1)
    cached = loaded.generate(ids[:1], use_cache=True, **kw)
    assert torch.equal(cached, loaded.generate(ids[:1], use_cache=False, **kw))
    assert torch.equal(cached, model.generate(ids[:1], use_cache=True, **kw))


def test_svd_llm_loss_on_the_calibration_data_and_against_svd_and_asvd():
    # The first block sees the same inputs under every method, so its output error compares directly.
    windows = _windows(16, 16)
    errs = {}
    for method in ("svd", "asvd", "svd_llm"):
        model = tiny_model("llama", seed=2)
        block = arch.blocks(model)[0]
        x = {}
        h = block.mlp.down_proj.register_forward_pre_hook(lambda m, a, x=x: x.setdefault("in", a[0]))
        with torch.no_grad():
            model(windows)
        h.remove()
        dense = block.mlp.down_proj(x["in"])
        result = _apply(method, model, CONFIGS[method](ratio=0.4, targets=["down"], layers=[0]), windows)
        with torch.no_grad():
            errs[method] = (model.get_submodule("model.layers.0.mlp.down_proj")(x["in"]) - dense).norm().item()
        if method == "svd_llm":  # the calibration Gram is this X: ‖(W - Ŵ) X‖_F = ‖dropped σ of W S‖
            entry = result.per_layer["model.layers.0.mlp.down_proj"]
            assert entry["damping"] == 0.0
            assert errs[method] == pytest.approx(entry["dropped_sigma_norm"], rel=1e-3)
    assert errs["svd_llm"] < errs["svd"] and errs["svd_llm"] <= errs["asvd"] * 1.0001


# ---- errors before any weight is touched --------------------------------------------------------


def _unchanged(model, ref):
    return all(torch.equal(v, ref[k]) for k, v in model.state_dict().items()) and set(model.state_dict()) == set(ref)


@pytest.mark.parametrize("kwargs, match", [
    (dict(ratio=0.0), "ratio = 0.0 is out of range"),
    (dict(ratio=1.5), "ratio = 1.5 is out of range"),
    (dict(ratio=-0.2), "ratio = -0.2 is out of range"),
    (dict(rank=0), "rank = 0 is out of range"),
    (dict(ratio=0.5, rank=4), "either ratio"),
    (dict(rank=4, allocation="global"), "fixed rank"),
    (dict(allocation="best"), "allocation = 'best' is not allowed"),
    (dict(ratio="half"), "must be a number"),
])
def test_bad_config_is_refused(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        SVDConfig(**kwargs).validate()


@pytest.mark.parametrize("method, config, windows, error, match", [
    ("svd", SVDConfig(rank=33), None, ConfigError, r"rank = 33 exceeds min\(d_in, d_out\) = 32"),
    ("svd_llm", SVDLLMConfig(rank=40), True, ConfigError, "rank = 40 exceeds"),
    ("svd", SVDConfig(ratio=0.01), None, ConfigError, "leaves rank 0"),
    ("svd", SVDConfig(ratio=0.01, allocation="global"), None, ConfigError, "rank 1 in each"),
    ("svd", SVDConfig(targets=["q"]), None, UserError, "one fused matrix"),
    ("svd", SVDConfig(targets=["lm_head"]), None, UserError, "not inside a decoder block"),
    ("asvd", ASVDConfig(), None, UserError, "needs calibration windows"),
    ("svd_llm", SVDLLMConfig(), None, UserError, "needs calibration windows"),
])
def test_bad_input_is_refused_before_any_weight_changes(method, config, windows, error, match):
    model = tiny_model("gpt2")
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=match):
        _apply(method, model, config, _windows() if windows else None)
    assert _unchanged(model, ref)


def test_factoring_twice_is_refused():
    model = tiny_model("llama")
    lowrank.apply_svd(model, SVDConfig(ratio=0.5))
    with pytest.raises(UserError, match="already factored"):
        lowrank.apply_svd(model, SVDConfig(ratio=0.5))
    with pytest.raises(UserError, match="a factor of a LowRankLinear"):
        lowrank.apply_svd(model, SVDConfig(ratio=0.5, targets=["re:.*q_proj\\.A"]))


# ---- the command line ---------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["svd_llm", "svd", "asvd"])
def test_cli_compress_then_eval(method, tiny_embedded_path, tmp_path, capsys):
    from efficientgpt.cli import main

    out = tmp_path / "C"
    # The acceptance commands, scoring the first 4096 validation tokens (both commands score the same ones).
    assert main(["compress", "--model", "embedded:tiny", "--method", method, "--ratio", "0.5", "--out", str(out),
                 "--eval-tokens", "4096", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    a = s["achieved"]
    assert 0.45 < a["ratio"] <= 0.5
    assert s["size_after"]["parameters"] == a["parameters_after"] < s["size_before"]["parameters"]
    assert s["size_before"]["parameters"] - s["size_after"]["parameters"] == \
        a["matrix_parameters_before"] - a["matrix_parameters_after"]
    assert s["size_after"]["bytes"] < s["size_before"]["bytes"]
    assert math.isfinite(s["eval"]["ppl_before"]) and math.isfinite(s["eval"]["ppl_after"])
    assert main(["eval", "--model", str(out), "--data", "embedded:prose", "--max-tokens", "4096", "--json"]) == 0
    e = json.loads(capsys.readouterr().out)
    assert e["model"]["parameters"] == a["parameters_after"]
    assert e["perplexity"] == pytest.approx(s["eval"]["ppl_after"], rel=1e-5)
