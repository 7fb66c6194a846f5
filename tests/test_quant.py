"""RTN and GPTQ: grid closed forms, packing, GPTQ against a naive reference, storage bytes, save/load, CLI."""

from __future__ import annotations

import copy
import json
import struct

import pytest
import torch

from efficientgpt import cli
from efficientgpt.compress import quant
from efficientgpt.compress.calibration import run_block, run_sequential
from efficientgpt.compress.io import save_compressed
from efficientgpt.compress.quant import (
    INT4PACK_MAX_ROWS,
    GPTQConfig,
    QuantLinear,
    RTNConfig,
    gptq_quantize,
    pack,
    unpack,
)
from efficientgpt.compress.quant_grid import QuantGrid
from efficientgpt.errors import ConfigError, UserError
from efficientgpt.models import arch
from efficientgpt.models.loading import load_model
from efficientgpt.models.tiny import tiny_model

IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
WINDOWS = torch.randint(0, 128, (8, 24), generator=torch.Generator().manual_seed(2))


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _correlated_inputs(n, d_in, seed=0):
    """``(n, d_in)`` inputs with strongly correlated features and uneven scales, like LLM activations."""
    g = _gen(seed)
    mix = torch.randn(d_in, d_in, generator=g) * torch.linspace(0.05, 1.0, d_in)  # uneven feature spectrum
    return torch.randn(n, d_in, generator=g) @ mix + 0.3 * torch.randn(n, 1, generator=g)


def _err(W, W_hat, X):
    """``‖W Xᵀ - Ŵ Xᵀ‖²`` straight from the inputs ``X`` ``(n, d_in)``."""
    return float(((X @ (W - W_hat).T) ** 2).sum())


# ---- the grid ------------------------------------------------------------------------------------
@pytest.mark.parametrize("symmetric", [True, False])
def test_int8_round_trip_within_half_a_step(symmetric):
    W = torch.randn(16, 64, generator=_gen(0)) * torch.rand(16, 1, generator=_gen(1))
    grid = QuantGrid(8, symmetric)
    if symmetric:  # closed-form scales, computed here independently of the grid
        s = W.abs().amax(1, keepdim=True) / 127
    else:
        s = (W.amax(1, keepdim=True).clamp(min=0) - W.amin(1, keepdim=True).clamp(max=0)) / 255
    scale, zero = grid.fit(W)
    torch.testing.assert_close(scale, s, rtol=1e-6, atol=0)
    codes = grid.quantize(W, scale, zero)
    assert codes.dtype == torch.uint8
    dq = grid.dequantize(codes, scale, zero)
    assert ((W - dq).abs() <= s / 2 * (1 + 1e-5)).all()
    assert (W - dq).abs().max() > s.min() / 8  # the rounding does happen
    if symmetric:  # ±max|w| sit exactly on the grid
        rows = torch.arange(16)
        top = W.abs().argmax(1)
        torch.testing.assert_close(dq[rows, top], W[rows, top], rtol=1e-6, atol=0)


def test_group_quantization_has_one_scale_per_group():
    W = torch.randn(4, 64, generator=_gen(3))
    grid = QuantGrid(4, True, group_size=16)
    scale, zero = grid.fit(W)
    assert scale.shape == (4, 4)
    expected = W.reshape(4, 4, 16).abs().amax(-1) / 7  # (rows, groups)
    torch.testing.assert_close(scale, expected, rtol=1e-6, atol=0)
    assert (zero == 8).all()
    dq = grid.fake_quant(W)
    assert ((W - dq).abs() <= expected.repeat_interleave(16, 1) / 2 * (1 + 1e-5)).all()
    # Changing one group changes only that group's scale.
    W2 = W.clone()
    W2[1, 16:32] *= 3
    changed = (grid.fit(W2)[0] != scale).nonzero().tolist()
    assert changed == [[1, 1]]


def test_ragged_last_group_and_asymmetric_zero_point():
    W = torch.randn(3, 40, generator=_gen(4)) + 0.5
    grid = QuantGrid(4, False, group_size=16)
    scale, zero = grid.fit(W)
    assert scale.shape == (3, 3)  # groups of 16, 16 and 8 columns
    last = W[:, 32:]
    lo, hi = last.amin(1).clamp(max=0), last.amax(1).clamp(min=0)
    torch.testing.assert_close(scale[:, 2], (hi - lo) / 15, rtol=1e-6, atol=0)
    torch.testing.assert_close(zero[:, 2], torch.round(-lo / ((hi - lo) / 15)))
    at_zero = zero.to(torch.uint8).repeat_interleave(16, dim=1)[:, :40]  # every code at its zero point
    assert (grid.dequantize(at_zero, scale, zero) == 0).all()  # 0 is exactly representable


def test_unsupported_bits_are_refused_with_the_list():
    with pytest.raises(ConfigError, match="2, 3, 4, 8"):
        QuantGrid(5)
    with pytest.raises(ConfigError, match="2, 3, 4, 8"):
        RTNConfig(bits=6).validate()


# ---- packing -------------------------------------------------------------------------------------
def test_int4_packing_is_lossless_for_all_codes_and_two_per_byte():
    codes = torch.arange(16, dtype=torch.uint8).repeat(3, 1)  # every 4-bit code
    codes = torch.cat([codes, codes.flip(1)[:, :5]], dim=1)  # odd width: the last byte is padded
    packed = pack(codes, 4)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 11)
    assert packed[0, 0].item() == 0x10 and packed[0, 7].item() == 0xFE  # first column in the low nibble
    assert torch.equal(unpack(packed, 4, codes.shape[1]), codes)


@pytest.mark.parametrize("bits,width", [(2, 10), (3, 19), (8, 37)])
def test_other_widths_round_trip(bits, width):
    codes = torch.randint(0, 2 ** bits, (5, 37), generator=_gen(bits)).to(torch.uint8)
    packed = pack(codes, bits)
    assert packed.shape == (5, width)
    assert packed.dtype == (torch.int8 if bits == 8 else torch.uint8)
    assert torch.equal(unpack(packed, bits, 37), codes)


def test_quantlinear_kernels_agree_with_the_dequantized_weight():
    W = torch.randn(48, 32, generator=_gen(5))
    b = torch.randn(48, generator=_gen(6))
    x = torch.randn(3, 7, 32, generator=_gen(7))
    for bits, g, sym in ((8, None, True), (8, None, False), (4, 8, False), (4, None, True)):
        grid = QuantGrid(bits, sym, g, scale_dtype=torch.float16)
        codes, scale, zero = grid.encode(W)
        q = QuantLinear.from_codes(codes, scale, zero, grid, b)
        W_hat = grid.dequantize(codes, scale, zero)
        torch.testing.assert_close(q.dequantized_weight(), W_hat)
        torch.testing.assert_close(q(x), x @ W_hat.T + b, rtol=1e-5, atol=1e-5)
    # int8 symmetric per channel with bfloat16 activations runs torch's int8 weight-only kernel
    grid = QuantGrid(8, True, None, scale_dtype=torch.float16)
    q = QuantLinear.from_codes(*grid.encode(W), grid, b)
    if hasattr(torch, "_weight_int8pack_mm"):
        assert q.kernel(torch.bfloat16) == "int8pack"
    ref = x @ q.dequantized_weight().T + b
    torch.testing.assert_close(q(x.bfloat16()).float(), ref, rtol=0.02, atol=0.05)
    assert q.kernel(torch.float32) == "rowscale" and q.kernel(torch.float16) == "dequant"


@pytest.mark.skipif(not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"), reason="no int4 CPU kernel")
@pytest.mark.parametrize("bits, g, sym", [(4, 32, False), (4, None, True), (3, 64, False), (2, None, False),
                                          (4, 128, True)])
def test_int4_kernel_agrees_with_the_dequantized_weight(bits, g, sym):
    W = torch.randn(48, 256, generator=_gen(8))
    b = torch.randn(48, generator=_gen(9))
    grid = QuantGrid(bits, sym, g, scale_dtype=torch.float16)
    q = QuantLinear.from_codes(*grid.encode(W), grid, b)
    ref = lambda x: x.float() @ q.dequantized_weight().T + b  # noqa: E731

    def close(y, r):  # bfloat16 activations and scales: errors of bfloat16 rounding, a fraction of the output scale
        assert (y.float() - r).abs().max() <= 0.01 * r.abs().max()

    x = torch.randn(2, 3, 256, generator=_gen(10)).bfloat16()
    assert q.kernel(torch.bfloat16, rows=6) == "int4pack" and q.kernel(torch.float32) != "int4pack"
    close(q(x), ref(x))
    # Codes are shifted so that the kernel's bfloat16 offset vanishes wherever an integer shift can absorb it.
    if bits < 4 or sym:
        assert q._int4pack()[1][..., 1].eq(0).all()
    long = torch.randn(1, INT4PACK_MAX_ROWS + 1, 256, generator=_gen(11)).bfloat16()
    assert q.kernel(torch.bfloat16, rows=INT4PACK_MAX_ROWS + 1) in ("dequant", "rowscale")
    close(q(long), ref(long))
    # The kernel's copy of the codes follows changes to the stored codes and scales.
    before = q.dequantized_weight()
    q.scales.mul_(2)
    close(q(x), x.float() @ (2 * before).T + b)
    # No derivative exists for the packed kernel: an input that needs a gradient takes the dequantizing path.
    xg = x.clone().requires_grad_()
    assert q.kernel(torch.bfloat16, rows=6, grad=True) in ("dequant", "rowscale")
    q(xg).sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad.float()).all()
    # A group size the kernel lacks, d_in that no kernel group divides, or d_out not in blocks of 16 dequantizes.
    assert QuantLinear(256, 16, 4, 16, False, False).kernel(torch.bfloat16) == "dequant"
    assert QuantLinear(48, 16, 4, None, True, False).kernel(torch.bfloat16) == "rowscale"
    assert QuantLinear(256, 40, 4, 32, False, False).kernel(torch.bfloat16) == "dequant"


# ---- GPTQ ----------------------------------------------------------------------------------------
def _naive_gptq(W, H, grid, damp=0.01):
    """Column-by-column OBS updates with an explicitly shrunk inverse Hessian (paper Eq. 2-3), float64."""
    W = W.double().clone()
    H = H.double().clone()
    d_out, d_in = W.shape
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damp * H.diagonal().mean() * torch.eye(d_in, dtype=H.dtype)
    Hinv = torch.linalg.inv(H)
    g = grid.group_size
    codes = torch.zeros(d_out, d_in, dtype=torch.uint8)
    if g is None:
        s, z = grid.fit(W.float())
    for j in range(d_in):
        if g is not None and j % g == 0:
            s, z = grid.fit(W[:, j : j + g].float())
        w = W[:, j : j + 1].float()
        q = grid.quantize(w, s, z)
        codes[:, j] = q[:, 0]
        err = (W[:, j] - grid.dequantize(q, s, z)[:, 0].double()) / Hinv[j, j]  # (d_out,)
        W -= err[:, None] * Hinv[j][None, :]  # OBS update of every remaining weight (Eq. 2)
        W[:, j] = 0  # quantized: no longer updated
        Hinv = Hinv - Hinv[:, j : j + 1] @ Hinv[j : j + 1, :] / Hinv[j, j]  # remove column j (Eq. 3)
    return codes


@pytest.mark.parametrize("group_size", [None, 8])
def test_gptq_equals_the_naive_obs_reference(group_size):
    W = torch.randn(6, 24, generator=_gen(8))
    X = _correlated_inputs(200, 24)
    X[:, 5] = 0  # a dead input
    H = 2 * X.T @ X / len(X)
    grid = QuantGrid(3, False, group_size)
    ref = _naive_gptq(W, H, grid)
    for block in (5, 128):  # lazy batches must not change the result
        out = gptq_quantize(W, H, grid, block_size=block)
        assert torch.equal(out.codes, ref)
    assert (out.codes[:, 5] == out.zero[:, 0].to(torch.uint8)).all()  # dead column quantized to exactly 0


@pytest.mark.parametrize("bits,group_size", [(4, None), (4, 16), (3, 16), (8, None)])
def test_gptq_reconstruction_error_is_below_rtn(bits, group_size):
    W = torch.randn(32, 64, generator=_gen(9))
    X = _correlated_inputs(512, 64)
    H = 2 * X.T @ X / len(X)
    grid = QuantGrid(bits, False, group_size)
    rtn = _err(W, grid.fake_quant(W), X)
    # measured ratios gptq/rtn here: 0.69-0.80 in column order, 0.29-0.39 with act_order
    for act_order, bound in ((False, 0.85), (True, 0.5)):
        out = gptq_quantize(W, H, grid, act_order=act_order)
        gptq = _err(W, grid.dequantize(out.codes, out.scale, out.zero), X)
        assert gptq < bound * rtn, (act_order, gptq, rtn)


def test_act_order_equals_gptq_on_permuted_columns_permuted_back():
    W = torch.randn(8, 32, generator=_gen(10))
    X = _correlated_inputs(300, 32, seed=1)
    H = 2 * X.T @ X / len(X)
    grid = QuantGrid(4, True)
    perm = torch.argsort(H.diagonal(), descending=True)
    assert not torch.equal(perm, torch.arange(32))
    ref = gptq_quantize(W[:, perm], H[perm][:, perm], grid).codes[:, torch.argsort(perm)]
    got = gptq_quantize(W, H, grid, act_order=True).codes
    assert torch.equal(got, ref)
    # With groups, act_order uses static groups: grids fitted on the original contiguous column groups.
    grid = QuantGrid(4, False, 8)
    out = gptq_quantize(W, H, grid, act_order=True)
    s, z = grid.fit(W)
    assert torch.equal(out.scale, s) and torch.equal(out.zero, z)


def test_gptq_beats_rtn_on_a_tiny_models_layers_through_run_sequential():
    """Each layer's ‖W X - Ŵ X‖² on its own calibration inputs, captured in the test."""
    model = tiny_model("llama", seed=0)
    grid = QuantGrid(4, False, 16)
    errors = []

    def compress_block(i, block, stats, inputs):
        xs: dict[str, list] = {name: [] for name in stats}
        handles = [model.get_submodule(name).register_forward_pre_hook(
            lambda m, a, n=name: xs[n].append(a[0].reshape(-1, a[0].shape[-1]))) for name in stats]
        run_block(block, inputs)
        for h in handles:
            h.remove()
        for name, st in stats.items():
            X = torch.cat(xs[name])  # (rows, d_in)
            torch.testing.assert_close(st.hessian(), 2 * X.T @ X / len(X), rtol=1e-4, atol=1e-5)
            W = arch.linear_weight(model.get_submodule(name)).detach()
            out = gptq_quantize(W, st.hessian(), grid)
            errors.append((_err(W, grid.dequantize(out.codes, out.scale, out.zero), X),
                           _err(W, grid.fake_quant(W), X)))

    run_sequential(model, WINDOWS, compress_block)
    assert len(errors) == 2 * 7
    assert all(g < r for g, r in errors), errors


# ---- methods on models ---------------------------------------------------------------------------
def _apply(method, model, **kw):
    if method == "rtn":
        return quant.apply_rtn(model, RTNConfig(**kw))
    return quant.apply_gptq(model, GPTQConfig(**kw), windows=WINDOWS)


def _safetensors_sizes(path):
    """Bytes of each tensor in a safetensors file, read from its header."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    return {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}


@pytest.mark.parametrize("bits,group_size,symmetric", [(8, 0, True), (4, 32, False)])
def test_saved_bytes_of_quantized_layers(tmp_path, bits, group_size, symmetric):
    model = tiny_model("llama", hidden=64, intermediate=128)
    plan = {t.name: arch.linear_shape(t.module) for t in arch.resolve(model, ["all-linear"])}
    fp32 = sum(4 * d_in * d_out for d_in, d_out in plan.values())  # no biases in llama
    res = quant.apply_rtn(model, RTNConfig(bits=bits, group_size=group_size, symmetric=symmetric))
    save_compressed(model, None, tmp_path, {}, res.modules)
    sizes = _safetensors_sizes(tmp_path / "model.safetensors")
    on_disk = sum(v for k, v in sizes.items() if k.rsplit(".", 1)[0] in plan)
    # closed form: codes (bits/8 per weight) + fp16 scale (+ uint8 zero) per (row, group)
    per_group_meta = 2 + (0 if symmetric else 1)
    expected = sum(d_out * d_in * bits // 8 + d_out * (d_in // (group_size or d_in)) * per_group_meta
                   for d_in, d_out in plan.values())
    assert on_disk == expected == res.achieved["layer_bytes_after"]
    assert res.achieved["layer_bytes_before"] == fp32
    target = bits / 32  # 1/4 for int8, 1/8 for int4
    overhead = max(per_group_meta / (4 * (group_size or d_in)) for d_in, _ in plan.values())
    assert target <= on_disk / fp32 <= target + overhead
    assert res.achieved["model_bytes_before"] - res.achieved["model_bytes_after"] == fp32 - expected
    assert res.achieved["bits_per_weight"] == 8 * expected / sum(a * b for a, b in plan.values())


@pytest.mark.parametrize("family", ["gpt2", "llama", "opt", "qwen2", "gpt_neox"])
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_save_load_gives_identical_logits(tmp_path, family, method):
    model = tiny_model(family, seed=0)
    first = arch.resolve(model, ["all-linear"])[0].module
    base = model(IDS).logits
    res = _apply(method, model, bits=4, group_size=16)
    with torch.no_grad():
        logits = model(IDS).logits
    assert 0 < (logits - base).abs().max() < 0.5
    assert len(res.modules) == len({id(t.module) for t in arch.resolve(model, ["all-linear"])})
    spec = next(iter(res.modules.values()))
    assert spec["kind"] == "quant" and spec["bits"] == 4 and spec["group_size"] == 16
    assert spec["transposed"] == (family == "gpt2") and spec["bias"] == (first.bias is not None)
    save_compressed(model, None, tmp_path, {}, res.modules)
    loaded = load_model(str(tmp_path), tokenizer=False).model
    assert isinstance(loaded.get_submodule(next(iter(res.modules))), QuantLinear)
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, logits)


def test_conv1d_is_replaced_by_the_same_linear_map():
    model = tiny_model("gpt2", seed=0)
    conv = model.transformer.h[0].attn.c_attn
    W, b = arch.linear_weight(conv).detach().clone(), conv.bias.detach().clone()
    quant.apply_rtn(model, RTNConfig(bits=8))
    q = model.transformer.h[0].attn.c_attn
    assert isinstance(q, QuantLinear) and q.transposed and (q.out_features, q.in_features) == W.shape
    x = torch.randn(5, 32, generator=_gen(11))
    torch.testing.assert_close(q(x), x @ q.dequantized_weight().T + b)
    assert (q.dequantized_weight() - W).abs().max() <= W.abs().max() / 127 / 2 * 1.01


def test_quantized_model_generates_with_and_without_cache():
    model = tiny_model("llama", seed=0)
    res = _apply("gptq", model, bits=4, group_size=16, act_order=True)
    assert res.achieved["act_order"] and res.per_layer
    assert all(v["rel_error"] < v["rtn_rel_error"] for v in res.per_layer.values())
    a = model.generate(IDS[:1, :4], max_new_tokens=5, do_sample=False, use_cache=True)
    b = model.generate(IDS[:1, :4], max_new_tokens=5, do_sample=False, use_cache=False)
    assert a.shape == (1, 9) and torch.equal(a, b)
    assert "dequantized on the fly" in res.notes[0]


# ---- bad input -----------------------------------------------------------------------------------
@pytest.mark.parametrize("method,kw,error,match", [
    ("rtn", {"bits": 5}, ConfigError, "choose one of 2, 3, 4, 8"),
    ("gptq", {"bits": 16}, ConfigError, "choose one of 2, 3, 4, 8"),
    ("rtn", {"group_size": 48}, ConfigError, "exceeds the 32 input features"),
    ("gptq", {"group_size": -1}, ConfigError, "group_size"),
    ("gptq", {"damp": 0.0}, ConfigError, "damp"),
    ("rtn", {"targets": ["q"]}, UserError, "fused projection"),
    ("rtn", {"targets": ["lm_head"]}, UserError, "LM head"),
])
def test_bad_input_is_refused_before_any_weight_changes(method, kw, error, match):
    model = tiny_model("gpt2", seed=0)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(error, match=match):
        _apply(method, model, **kw)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_gptq_needs_windows_and_refuses_requantizing():
    model = tiny_model("llama", seed=0)
    with pytest.raises(UserError, match="calibration windows"):
        quant.apply_gptq(model, GPTQConfig())
    quant.apply_rtn(model, RTNConfig(targets=["q"]))
    with pytest.raises(UserError, match="already quantized"):
        quant.apply_rtn(model, RTNConfig(targets=["q"]))


# ---- command line --------------------------------------------------------------------------------
def _main(capsys, *argv):
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    assert code == 0, captured.err[-2000:]
    return json.loads(captured.out)


def test_cli_acceptance(tmp_path, capsys, tiny_embedded_path):
    model = str(tiny_embedded_path)
    shapes = [arch.linear_shape(t.module) for t in arch.resolve(load_model(model).model, ["all-linear"])]
    fast = ("--eval-tokens", "1024", "--no-progress", "--json")
    g = _main(capsys, "compress", "--model", model, "--method", "gptq", "--bits", "4", "--group-size", "32",
              "--calib-samples", "8", "--out", str(tmp_path / "G"), *fast)
    r = _main(capsys, "compress", "--model", model, "--method", "rtn", "--bits", "8", "--out", str(tmp_path / "R"),
              *fast)
    for res, bits, group in ((g, 4, 32), (r, 8, 0)):
        a = res["achieved"]
        assert (a["bits"], a["group_size"], a["quantized_layers"]) == (bits, group, 2 * 7)
        assert a["model_bytes_after"] == res["size_after"]["bytes"] < res["size_before"]["bytes"]
        meta = 2 if bits == 8 else 3  # fp16 scale (+ uint8 zero: gptq defaults to asymmetric) per (row, group)
        expected = sum(o * (i * bits // 8 + -(-i // (group or i)) * meta) for i, o in shapes)
        assert a["layer_bytes_after"] == expected and a["layer_bytes_before"] == sum(4 * i * o for i, o in shapes)
        assert a["layer_ratio"] == pytest.approx(sum(4 * i * o for i, o in shapes) / expected, rel=1e-12)
        assert res["files_bytes"] < res["size_before"]["bytes"]
        e = res["eval"]
        assert abs(e["loss_after"] - e["loss_before"]) < 0.1 * e["loss_before"]
    for name, res in (("G", g), ("R", r)):
        ev = _main(capsys, "eval", "--model", str(tmp_path / name), "--data", "embedded:prose", "--max-tokens",
                   "1024", "--json")
        assert ev["perplexity"] == pytest.approx(res["eval"]["ppl_after"], rel=1e-9)
