"""Unstructured and N:M pruning (magnitude, Wanda, SparseGPT): closed forms, brute-force references, invariants,
every tiny family end to end, bad input, and the command line."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from efficientgpt import cli
from efficientgpt.compress import prune, sparsegpt
from efficientgpt.compress.io import save_compressed
from efficientgpt.compress.prune import MagnitudeConfig, WandaConfig, parse_sparsity
from efficientgpt.compress.quant_grid import QuantGrid
from efficientgpt.compress.sparsegpt import SparseGPTConfig, sparsegpt_prune
from efficientgpt.errors import ConfigError, UserError
from efficientgpt.models import arch
from efficientgpt.models.loading import load_model
from efficientgpt.models.tiny import TINY_FAMILIES, tiny_model

WINDOWS = torch.randint(2, 128, (6, 16), generator=torch.Generator().manual_seed(0))
IDS = torch.randint(2, 128, (2, 9), generator=torch.Generator().manual_seed(1))


def _run(method: str, model, sparsity, **kw):
    if method == "magnitude":
        return prune.apply_magnitude(model, MagnitudeConfig(sparsity=sparsity, **kw))
    if method == "wanda":
        return prune.apply_wanda(model, WandaConfig(sparsity=sparsity, **kw), windows=WINDOWS)
    return sparsegpt.apply(model, SparseGPTConfig(sparsity=sparsity, **kw), windows=WINDOWS)


def _matrices(model):
    """Every decoder linear weight in (d_out, d_in) orientation, once per module."""
    seen = {}
    for t in arch.resolve(model, ["all-linear"]):
        seen.setdefault(t.name, arch.linear_weight(t.module).detach().clone())
    return seen


def _count(n: int, s: float) -> int:
    return round(s * n)


# ---------------------------------------------------------------------------------------------
# The sparsity spec


def test_sparsity_spec_parses_fractions_and_n_m():
    assert parse_sparsity("0.5").fraction == 0.5 and not parse_sparsity("0.5").is_nm
    assert parse_sparsity(0).fraction == 0.0
    p = parse_sparsity(" 2:4 ")
    assert (p.n, p.m, p.target_sparsity, str(p)) == (2, 4, 0.5, "2:4")
    assert parse_sparsity("1:8").target_sparsity == 0.875
    assert parse_sparsity("4:4").target_sparsity == 0.0


@pytest.mark.parametrize("bad", ["1", "1.0", "-0.1", "nan", "inf", "half", "", "3:2", "0:4", "2:0", "2:4:8",
                                 "a:b", "2:", True, None, [0.5]])
def test_malformed_sparsity_is_refused_naming_the_value(bad):
    with pytest.raises(ConfigError, match="sparsity"):
        MagnitudeConfig(sparsity=bad).validate()


# ---------------------------------------------------------------------------------------------
# Magnitude


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("s", [0.3, 0.5, 0.7])
def test_magnitude_removes_exactly_the_smallest_per_matrix(family, s):
    model = tiny_model(family)
    before = _matrices(model)
    res = _run("magnitude", model, str(s))
    after = _matrices(model)
    for name, w0 in before.items():
        w1 = after[name]
        pruned = w1 == 0
        assert int(pruned.sum()) == _count(w0.numel(), s), name  # exact count per matrix
        assert w0[pruned].abs().max() <= w0[~pruned].abs().min()  # the smallest |W| went
        assert torch.equal(w1[~pruned], w0[~pruned])  # no update
        assert res.per_layer[name]["zeros"] == int(pruned.sum())
    total = sum(w.numel() for w in before.values())
    assert res.achieved["sparsity"] == sum(_count(w.numel(), s) for w in before.values()) / total


def test_magnitude_leaves_embeddings_head_norms_and_biases_alone():
    model = tiny_model("opt")
    linear = {n + ".weight" for n in _matrices(model)}
    ref = copy.deepcopy(model.state_dict())
    _run("magnitude", model, "0.6")
    for k, v in model.state_dict().items():
        if k not in linear:
            assert torch.equal(v, ref[k]), k


def test_fused_qkv_is_one_matrix_and_a_role_prunes_only_its_rows():
    # All of q, k, v: one threshold over the whole fused matrix (not 50 % of each third).
    model = tiny_model("gpt2")
    (t,) = {x.name: x for x in arch.resolve(model, ["q"], layers=[0])}.values()
    w0 = arch.linear_weight(t.module).detach().clone()  # (96, 32)
    _run("magnitude", model, "0.5", targets=["q", "k", "v"], layers=[0])
    w1 = arch.linear_weight(t.module)
    keep = w0.abs().flatten().topk(w0.numel() // 2).indices
    expected = torch.zeros(w0.numel(), dtype=torch.bool)
    expected[keep] = True
    assert torch.equal(w1.flatten() != 0, expected)
    # Only v: the q and k rows of c_attn stay as they were.
    model = tiny_model("gpt_neox")
    (v,) = arch.resolve(model, ["v"], layers=[1])
    w0 = arch.linear_weight(v.module).detach().clone()
    res = _run("magnitude", model, "0.5", targets=["v"], layers=[1])
    w1 = arch.linear_weight(v.module)
    rows = torch.zeros(w0.shape[0], dtype=torch.bool)
    rows[v.out_index] = True
    assert torch.equal(w1[~rows], w0[~rows])
    assert int((w1[rows] == 0).sum()) == w0[rows].numel() // 2
    assert res.achieved["target_sparsity"] == 0.5 and res.achieved["sparsity"] < 0.5


# ---------------------------------------------------------------------------------------------
# Wanda


def _brute_force_wanda(model, windows, s):
    """Wanda written out: layer by layer on the model pruned so far, ‖X_j‖ from hooks, sort each row."""
    n_layers = arch.num_layers(model)
    for i in range(n_layers):
        mods = {}
        for t in arch.resolve(model, ["all-linear"], layers=[i]):
            mods.setdefault(t.name, t.module)
        sq = {name: 0.0 for name in mods}

        def hook(name, sq=sq):
            def fn(mod, args):
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                sq[name] = sq[name] + (x * x).sum(0)
            return fn

        handles = [m.register_forward_pre_hook(hook(n)) for n, m in mods.items()]
        with torch.no_grad():
            model(input_ids=windows)
        for h in handles:
            h.remove()
        for name, m in mods.items():
            w = arch.linear_weight(m).detach()  # (d_out, d_in)
            norm = sq[name].sqrt()
            d_out, d_in = w.shape
            k = round(s * d_in)
            new = w.detach().clone()
            for r in range(d_out):
                scores = [(abs(float(w[r, j])) * float(norm[j]), j) for j in range(d_in)]
                for _, j in sorted(scores)[:k]:
                    new[r, j] = 0.0
            with torch.no_grad():
                w.copy_(new)
    return _matrices(model)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_wanda_mask_equals_brute_force_top_k_per_row(family):
    model = tiny_model(family)
    expected = _brute_force_wanda(copy.deepcopy(model), WINDOWS, 0.5)
    res = _run("wanda", model, "0.5")
    got = _matrices(model)
    for name in expected:
        assert torch.equal(got[name] == 0, expected[name] == 0), name
        assert torch.equal(got[name], expected[name]), name
    assert res.achieved["sparsity"] == 0.5


@pytest.mark.parametrize("s", [0.3, 0.7])
def test_wanda_prunes_each_row_to_the_exact_fraction(s):
    model = tiny_model("qwen2", intermediate=48)
    before = _matrices(model)
    _run("wanda", model, str(s))
    for name, w in _matrices(model).items():
        zeros_per_row = (w == 0).sum(1)
        assert torch.all(zeros_per_row == _count(w.shape[1], s)), name
        kept = w != 0
        assert torch.equal(w[kept], before[name][kept])  # kept weights untouched


def test_wanda_differs_from_magnitude_when_inputs_have_scale():
    # With one input feature 10⁴x louder, Wanda keeps its column where magnitude drops small weights in it.
    torch.manual_seed(0)
    w = torch.randn(8, 16)
    norm = torch.ones(16)
    norm[3] = 1e4
    wanda = prune.wanda_mask(w, norm, parse_sparsity("0.75"))
    assert wanda[:, 3].all()
    assert not prune.magnitude_mask(w, parse_sparsity("0.75"))[:, 3].all()


# ---------------------------------------------------------------------------------------------
# N:M for every method, on a Conv1D family and a Linear family


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("nm", [(2, 4), (4, 8), (1, 4)])
def test_n_m_masks_have_exactly_n_nonzeros_per_group_of_m_inputs(method, family, nm):
    n, m = nm
    model = tiny_model(family)
    res = _run(method, model, f"{n}:{m}")
    for name, w in _matrices(model).items():  # (d_out, d_in): groups run along the inputs
        groups = (w != 0).reshape(w.shape[0], -1, m).sum(-1)
        assert torch.all(groups == n), (name, groups.unique())
    assert res.achieved["sparsity"] == 1 - n / m and res.achieved["pattern"] == f"{n}:{m}"
    if family == "gpt2":
        stored = model.transformer.h[0].mlp.c_fc.weight  # Conv1D (d_in, d_out): groups must not run along d_out
        wrong = (stored != 0).reshape(stored.shape[0], -1, m).sum(-1)
        assert not torch.all(wrong == n)


def test_n_m_refuses_m_not_dividing_d_in_before_touching_weights():
    model = tiny_model("llama")  # d_in 32 and 64
    ref = copy.deepcopy(model.state_dict())
    with pytest.raises(UserError, match="M = 6 must divide"):
        _run("magnitude", model, "3:6")
    assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())


# ---------------------------------------------------------------------------------------------
# SparseGPT on single layers


def _layer(seed=0, d_row=12, d_col=24, n=256):
    """Random weights and strongly correlated inputs X (n, d_col): a mixing matrix with decaying spectrum."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d_row, d_col, generator=g)
    mix = torch.randn(d_col, d_col, generator=g) * torch.logspace(0, -1.5, d_col)[:, None]
    X = torch.randn(n, d_col, generator=g) @ mix + 0.3 * torch.randn(1, d_col, generator=g)
    return W, X, 2 * X.T @ X / n


def _err(W_hat, W, X):
    return float(((W_hat - W) @ X.T).square().sum())


@pytest.mark.parametrize("spec", ["0.5", "0.7", "2:4"])
def test_sparsegpt_reconstructs_better_than_its_mask_alone_and_than_magnitude(spec):
    pattern = parse_sparsity(spec)
    for seed in range(3):
        W, X, H = _layer(seed)
        W_hat, _ = sparsegpt_prune(W, H, pattern, block_size=8)
        mask = W_hat != 0
        assert int((~mask).sum()) == round(pattern.target_sparsity * W.numel())
        e_sgpt = _err(W_hat, W, X)
        e_mask = _err(W * mask, W, X)
        e_mag = _err(W * prune.magnitude_mask(W, pattern), W, X)
        assert e_sgpt < 0.9 * e_mask and e_sgpt < 0.9 * e_mag, (seed, e_sgpt, e_mask, e_mag)


def _reference_sparsegpt(W, H, pattern, percdamp=0.01):
    """Algorithm 1 from explicit inverses of H restricted to the remaining columns F_j (float64, one block)."""
    W = W.double().clone()
    H = H.double().clone()
    d_row, d_col = W.shape
    H += percdamp * H.diagonal().mean() * torch.eye(d_col, dtype=H.dtype)
    inv_F = [torch.linalg.inv(H[j:, j:]) for j in range(d_col)]  # (d_col - j, d_col - j)
    pruned = torch.zeros(d_row, d_col, dtype=torch.bool)
    if not pattern.is_nm:  # one block: choose the whole mask first, by w² / [H_F⁻¹]_jj
        sal = torch.stack([W[:, j] ** 2 / inv_F[j][0, 0] for j in range(d_col)], 1)
        k = round(pattern.fraction * W.numel())
        order = sorted(range(W.numel()), key=lambda i: float(sal.flatten()[i]))[:k]
        pruned.view(-1)[torch.tensor(order, dtype=torch.long)] = True
    for j in range(d_col):
        if pattern.is_nm and j % pattern.m == 0:
            sal = torch.stack([W[:, c] ** 2 / inv_F[c][0, 0] for c in range(j, j + pattern.m)], 1)
            for r in range(d_row):
                for c in sorted(range(pattern.m), key=lambda c: float(sal[r, c]))[: pattern.m - pattern.n]:
                    pruned[r, j + c] = True
        q = W[:, j].masked_fill(pruned[:, j], 0.0)
        W[:, j:] -= ((W[:, j] - q) / inv_F[j][0, 0])[:, None] * inv_F[j][0][None, :]  # OBS update, Eq. 3
        W[:, j] = q
    return W


@pytest.mark.parametrize("spec", ["0.5", "2:4", "1:4"])
def test_sparsegpt_matches_obs_updates_from_explicit_inverses(spec):
    pattern = parse_sparsity(spec)
    W, _, H = _layer(1, d_row=6, d_col=16)
    got, _ = sparsegpt_prune(W, H, pattern, block_size=16)
    ref = _reference_sparsegpt(W, H, pattern)
    assert torch.equal(got == 0, ref == 0)
    torch.testing.assert_close(got.double(), ref, rtol=1e-3, atol=1e-4)


def test_sparsegpt_n_m_does_not_depend_on_block_size():
    W, _, H = _layer(2, d_row=8, d_col=32)
    pattern = parse_sparsity("2:4")
    a, _ = sparsegpt_prune(W, H, pattern, block_size=4)
    b, _ = sparsegpt_prune(W, H, pattern, block_size=32)
    assert torch.equal(a == 0, b == 0)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_sparsegpt_unstructured_count_is_exact_across_uneven_blocks():
    W, _, H = _layer(3, d_row=7, d_col=24)
    for s in (0.3, 0.55, 0.9):
        W_hat, _ = sparsegpt_prune(W, H, parse_sparsity(str(s)), block_size=10)
        assert int((W_hat == 0).sum()) == round(s * 7 * 24)


def test_sparsegpt_dead_inputs_are_pruned_first_within_the_count():
    W, X, H = _layer(4, d_row=8, d_col=16)
    H[5, :] = H[:, 5] = 0  # input 5 never fires
    W_hat, _ = sparsegpt_prune(W, H, parse_sparsity("0.5"), block_size=16)
    assert torch.all(W_hat[:, 5] == 0) and int((W_hat == 0).sum()) == 64


def test_sparsegpt_joint_quantization_lands_on_each_rows_grid():
    W, X, H = _layer(5, d_row=8, d_col=32)
    grid = QuantGrid(4, symmetric=False)
    for group in (0, 8):
        W_hat, _ = sparsegpt_prune(W, H, parse_sparsity("0.5"), block_size=16, grid=grid, group_size=group)
        assert int((W_hat == 0).sum()) >= 128
        if not group:  # one grid per row, fitted on the unpruned weights: W_hat maps onto itself
            scale, zero = grid.fit(W)
            torch.testing.assert_close(grid.fake_quant(W_hat, scale, zero), W_hat, rtol=0, atol=1e-6)
        for r in range(8):
            for c in range(0, 32, group or 32):
                assert len(W_hat[r, c : c + (group or 32)].unique()) <= 16
        # Error feedback beats pruning and rounding the same weights without updates.
        mask = W_hat != 0
        naive = QuantGrid(4, False, group or None).fake_quant(W * mask)
        assert _err(W_hat, W, X) < _err(naive, W, X)


# ---------------------------------------------------------------------------------------------
# SparseGPT on models


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox"])
def test_sparsegpt_at_sparsity_zero_leaves_weights_unchanged(family):
    model = tiny_model(family)
    ref = copy.deepcopy(model.state_dict())
    res = _run("sparsegpt", model, "0")
    assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())
    assert res.achieved["pruned_weights"] == 0


def test_sparsegpt_reduces_the_layer_output_error_on_a_model():
    # On a one-block model the calibration inputs of every linear layer are the model's own.
    base = tiny_model("llama", layers=1)
    errs = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        model = copy.deepcopy(base)
        _run(method, model, "0.6")
        inputs = {}

        def grab(mod, a, n, inputs=inputs):
            inputs.setdefault(n, a[0].reshape(-1, a[0].shape[-1]))

        hooks = [t.module.register_forward_pre_hook(lambda mod, a, n=t.name: grab(mod, a, n))
                 for t in arch.resolve(base, ["all-linear"])]
        with torch.no_grad():
            base(input_ids=WINDOWS)
        for h in hooks:
            h.remove()
        w0, w1 = _matrices(base), _matrices(model)
        errs[method] = sum(_err(w1[n], w0[n], x) for n, x in inputs.items())
    assert errs["sparsegpt"] < errs["wanda"] and errs["sparsegpt"] < errs["magnitude"], errs


# ---------------------------------------------------------------------------------------------
# Every family: compress, save, reload, generate


@pytest.mark.parametrize("method,spec", [("magnitude", "0.5"), ("wanda", "2:4"), ("sparsegpt", "0.5")])
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_every_family_compresses_saves_reloads_and_generates(family, method, spec, tmp_path):
    model = tiny_model(family)
    res = _run(method, model, spec)
    assert res.achieved["sparsity"] == 0.5 and res.modules == {}
    assert set(res.per_layer) == set(_matrices(model))
    save_compressed(model, None, tmp_path, {"achieved": res.achieved}, res.modules)
    loaded = load_model(str(tmp_path), tokenizer=False).model
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, model(IDS).logits)
    for name, w in _matrices(loaded).items():
        assert float((w == 0).float().mean()) == res.per_layer[name]["sparsity"] == 0.5
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=1)
    a = loaded.generate(IDS[:1], **kw)
    b = model.generate(IDS[:1], **kw)
    assert a.shape == (1, IDS.shape[1] + 5) and torch.equal(a, b)


def test_layers_and_exclude_restrict_calibrated_pruning():
    model = tiny_model("llama")
    ref = _matrices(model)
    res = _run("wanda", model, "0.5", layers=[1], exclude=["re:.*mlp.*"])
    got = _matrices(model)
    pruned = {n for n in got if not torch.equal(got[n], ref[n])}
    assert pruned == {f"model.layers.1.self_attn.{p}_proj" for p in "qkvo"} == set(res.per_layer)


# ---------------------------------------------------------------------------------------------
# Bad input: refused before any weight changes


@pytest.mark.parametrize("method,kw,match", [
    ("magnitude", {"sparsity": "1.0"}, "outside"),
    ("wanda", {"sparsity": "5:4"}, "N = 5 > M = 4"),
    ("sparsegpt", {"sparsity": "2:4:8"}, "malformed"),
    ("wanda", {"sparsity": "3:6"}, "M = 6 must divide"),
    ("sparsegpt", {"sparsity": "2:8", "block_size": 12}, "block_size = 12"),
    ("sparsegpt", {"sparsity": "0.5", "bits": 5}, "bits = 5"),
    ("sparsegpt", {"sparsity": "0.5", "group_size": 8}, "needs joint quantization"),
    ("sparsegpt", {"sparsity": "0.5", "bits": 4, "group_size": 24, "block_size": 48}, "group_size = 24"),
    ("magnitude", {"sparsity": "0.5", "targets": ["nonexistent"]}, "match no module"),
    ("wanda", {"sparsity": "0.5", "targets": ["lm_head"]}, "outside the decoder blocks"),
])
def test_bad_input_is_refused_with_nothing_touched(method, kw, match):
    model = tiny_model("llama")
    ref = copy.deepcopy(model.state_dict())
    with pytest.raises(UserError, match=match):
        _run(method, model, **kw)
    assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_calibrated_methods_need_windows(method):
    model = tiny_model("opt")
    ref = copy.deepcopy(model.state_dict())
    cfg = WandaConfig() if method == "wanda" else SparseGPTConfig()
    fn = prune.apply_wanda if method == "wanda" else sparsegpt.apply
    with pytest.raises(UserError, match="calibration windows"):
        fn(model, cfg)
    assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())


# ---------------------------------------------------------------------------------------------
# Command line


def _main(capsys, *argv):
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    assert code == 0, captured.err[-2000:]
    return json.loads(captured.out)


@pytest.mark.parametrize("method,spec", [("magnitude", "0.5"), ("wanda", "0.5"), ("sparsegpt", "2:4")])
def test_cli_compress_then_eval(method, spec, tmp_path, capsys, tiny_embedded_path):
    out = tmp_path / "C"
    res = _main(capsys, "compress", "--model", "embedded:tiny", "--method", method, "--sparsity", spec,
                "--out", str(out), "--json", "--calib-samples", "8", "--eval-tokens", "1024")
    assert res["achieved"]["sparsity"] == 0.5 and res["achieved"]["target_sparsity"] == 0.5
    before, after = res["size_before"], res["size_after"]
    assert after["parameters"] == before["parameters"] and after["bytes"] == before["bytes"]
    assert before["nonzero_parameters"] - after["nonzero_parameters"] == res["achieved"]["pruned_weights"]
    assert res["eval"]["ppl_before"] > 1 and res["eval"]["ppl_after"] > 1
    assert (res["calibration"] is None) == (method == "magnitude")
    ev = _main(capsys, "eval", "--model", str(out), "--data", "embedded:prose", "--json", "--max-tokens", "1024")
    assert ev["perplexity"] == pytest.approx(res["eval"]["ppl_after"], rel=1e-5)


def test_cli_refuses_bad_sparsity(tmp_path, capsys, tiny_embedded_path):
    code = cli.main(["compress", "--model", "embedded:tiny", "--method", "magnitude", "--sparsity", "3:2",
                     "--out", str(tmp_path / "C"), "--json"])
    assert code == 1 and "N = 3 > M = 2" in capsys.readouterr().err
    assert not (tmp_path / "C").exists()
