"""(IA)^3 (Liu et al., NeurIPS 2022): the rescaling against hand-written references, exact merging, and
Hugging Face PEFT's IA3 as an oracle (same vectors -> same logits; adapters move both ways)."""

from __future__ import annotations

import json
import math

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file

from efficientgpt.errors import ConfigError, UserError
from efficientgpt.models import arch
from efficientgpt.models.tiny import TINY_FAMILIES, tiny_model
from efficientgpt.peft import core
from efficientgpt.peft.ia3 import PEFT_DEFAULT_TARGETS, IA3Config, IA3Delta, peft_export, peft_import

IDS = torch.randint(2, 128, (2, 10), generator=torch.Generator().manual_seed(0))
PREFIX = "base_model.model."


def _randomise(delta, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in delta.parameters():
            p.copy_(1.0 + 0.5 * torch.randn(p.shape, generator=g))


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def _capture(module, pre=False):
    """Record ``module``'s (final, after every earlier hook) input or output."""
    seen = {}
    if pre:
        module.register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0].detach()))
    else:
        module.register_forward_hook(lambda m, args, out: seen.__setitem__("y", out.detach()))
    return seen


def test_vectors_start_at_ones_and_keep_the_model():
    model = tiny_model("gpt2")
    base = _logits(model)
    delta = core.apply(model, "ia3")
    assert all(torch.equal(p, torch.ones_like(p)) for p in delta.parameters())
    torch.testing.assert_close(_logits(model), base, atol=0, rtol=0)


def test_gpt2_attention_matches_the_papers_formula():
    """softmax(Q (l_k ⊙ K^T) / √d) (l_v ⊙ V) written out by hand on layer 1, query untouched."""
    model = tiny_model("gpt2", seed=3)
    delta = core.apply(model, "ia3", IA3Config())
    _randomise(delta)
    block = model.transformer.h[1]
    x_in = _capture(block.attn.c_attn, pre=True)
    ctx_out = _capture(block.attn.c_proj, pre=True)  # the attention context, before the output projection
    ff_in = _capture(block.mlp.c_proj, pre=True)
    ff_x = _capture(block.mlp.c_fc, pre=True)
    _logits(model)
    l_k = delta.vector("transformer__h__1__attn__c_attn__k").detach()
    l_v = delta.vector("transformer__h__1__attn__c_attn__v").detach()
    l_ff = delta.vector("transformer__h__1__mlp__c_proj").detach()
    d, heads = 32, 4
    hd = d // heads
    w, b = block.attn.c_attn.weight, block.attn.c_attn.bias  # Conv1D: (in, 3d)
    qkv = x_in["x"] @ w + b  # (B, T, 3d)
    q, k, v = qkv[..., :d], qkv[..., d:2 * d] * l_k, qkv[..., 2 * d:] * l_v
    B, T, _ = q.shape

    def split(t):
        return t.view(B, T, heads, hd).transpose(1, 2)  # (B, nh, T, hd)

    att = split(q) @ split(k).transpose(-1, -2) / math.sqrt(hd)  # (B, nh, T, T)
    att = att.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
    ctx = (att @ split(v)).transpose(1, 2).reshape(B, T, d)  # (B, T, d)
    torch.testing.assert_close(ctx_out["x"], ctx, atol=1e-5, rtol=1e-5)
    # (l_ff ⊙ γ(W1 x)) W2: the input of the down projection
    h = torch.nn.functional.gelu(ff_x["x"] @ block.mlp.c_fc.weight + block.mlp.c_fc.bias, approximate="tanh")
    torch.testing.assert_close(ff_in["x"], h * l_ff, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_kv_projections_and_ffn_activation_are_rescaled(family):
    model = tiny_model(family, seed=4)
    delta = core.apply(model, "ia3", IA3Config())
    _randomise(delta)
    k_mod = arch.block_module(model, 0, "k")
    v_mod = arch.block_module(model, 0, "v")
    down = arch.block_module(model, 0, "down")
    k_in, k_out, v_out = _capture(k_mod, pre=True), _capture(k_mod), _capture(v_mod)
    down_in = _capture(down, pre=True)
    x_mlp = _capture(arch.block_module(model, 0, "up"), pre=True)
    _logits(model)
    by_role = {s.target.role: delta.vector(s.key).detach() for s in delta.scaled if s.target.layer == 0}
    x = k_in["x"]
    if family == "llama":
        torch.testing.assert_close(k_out["y"], (x @ k_mod.weight.T) * by_role["k"], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(v_out["y"], (x @ v_mod.weight.T) * by_role["v"], atol=1e-6, rtol=1e-5)
        mlp = arch.block_module(model, 0, "mlp")
        xm = x_mlp["x"]
        h = torch.nn.functional.silu(xm @ mlp.gate_proj.weight.T) * (xm @ mlp.up_proj.weight.T)  # act(gate) * up
        torch.testing.assert_close(down_in["x"], h * by_role["down"], atol=1e-6, rtol=1e-5)
    else:  # per-head interleaved (heads, [q | k | v]): only k and v features scaled
        y = (x @ k_mod.weight.T + k_mod.bias).view(*x.shape[:-1], 4, 3, 8)  # (B, T, nh, [q|k|v], hd)
        y[..., 1, :] *= by_role["k"].view(4, 8)
        y[..., 2, :] *= by_role["v"].view(4, 8)
        torch.testing.assert_close(k_out["y"], y.flatten(-3), atol=1e-6, rtol=1e-5)
        h = torch.nn.functional.gelu(x_mlp["x"] @ arch.block_module(model, 0, "up").weight.T
                                     + arch.block_module(model, 0, "up").bias)
        torch.testing.assert_close(down_in["x"], h * by_role["down"], atol=1e-6, rtol=1e-5)


def test_merge_folds_rows_and_columns_and_unmerge_restores():
    model = tiny_model("gpt2", seed=5)
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    delta = core.apply(model, "ia3", IA3Config())
    _randomise(delta)
    tuned = _logits(model)
    delta.merge()
    torch.testing.assert_close(_logits(model), tuned, atol=1e-5, rtol=0)
    attn = "transformer.h.0.attn.c_attn"
    l_k = delta.vector("transformer__h__0__attn__c_attn__k").detach()
    w = model.get_parameter(attn + ".weight")  # Conv1D (in, out): output features are columns
    assert torch.equal(w[:, :32], w0[attn + ".weight"][:, :32])  # q untouched
    torch.testing.assert_close(w[:, 32:64], w0[attn + ".weight"][:, 32:64] * l_k, atol=0, rtol=0)
    torch.testing.assert_close(model.get_parameter(attn + ".bias")[32:64], w0[attn + ".bias"][32:64] * l_k)
    l_ff = delta.vector("transformer__h__0__mlp__c_proj").detach()
    down = "transformer.h.0.mlp.c_proj"  # input features are the rows of a Conv1D weight
    torch.testing.assert_close(model.get_parameter(down + ".weight"), w0[down + ".weight"] * l_ff[:, None])
    assert torch.equal(model.get_parameter(down + ".bias"), w0[down + ".bias"])
    delta.unmerge()
    for n, p in model.named_parameters():
        if n in w0:
            torch.testing.assert_close(p, w0[n], atol=1e-6, rtol=1e-6, msg=n)


def test_merge_refuses_a_zero_scale_and_changes_nothing():
    model = tiny_model("llama")
    delta = core.apply(model, "ia3", IA3Config())
    with torch.no_grad():
        delta.vector(delta.scaled[1].key)[3] = 0.0
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(UserError, match=r"entry 3 = 0\.0.*\|l\| >= 1e-06"):
        delta.merge()
    assert not delta.merged
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_config_errors():
    with pytest.raises(ConfigError, match="peft_compatible"):
        IA3Config(targets=["q", "v"], peft_compatible=True).validate()
    with pytest.raises(UserError, match="fused module .*c_attn"):
        core.apply(tiny_model("gpt2"), "ia3", IA3Config(targets=["k", "v"], feedforward=["k"]))


def test_peft_default_table_matches_installed_peft():
    from peft.utils import constants

    for model_type, (targets, feedforward) in PEFT_DEFAULT_TARGETS.items():
        assert sorted(constants.TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING[model_type]) == sorted(targets)
        assert sorted(constants.TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING[model_type]) == \
            sorted(feedforward)


def _peft_model(family, seed=0, **kwargs):
    """A PEFT IA3 model with random vectors, and its vectors by module path."""
    pm = peft.get_peft_model(tiny_model(family), peft.IA3Config(task_type="CAUSAL_LM", **kwargs))
    g = torch.Generator().manual_seed(seed)
    vectors = {}
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if ".ia3_l." in n:
                p.copy_(1.0 + 0.5 * torch.randn(p.shape, generator=g))
                vectors[n[len(PREFIX):].split(".ia3_l.")[0]] = p.detach().clone()
    return pm.eval(), vectors


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_oracle_peft_defaults_equal_peft_compatible(family):
    pm, vectors = _peft_model(family)
    model = tiny_model(family)
    delta = core.apply(model, "ia3", IA3Config(peft_compatible=True))
    assert {s.target.name for s in delta.scaled} == set(vectors)
    with torch.no_grad():
        for s in delta.scaled:
            v = vectors[s.target.name]
            assert v.shape[0] == 1 if s.feedforward else v.shape[1] == 1  # (1, in) for feedforward
            delta.vector(s.key).copy_(v.flatten())
    assert core.count_parameters(model)["trainable"] == sum(v.numel() for v in vectors.values())
    torch.testing.assert_close(_logits(model), _logits(pm), atol=1e-5, rtol=0)


def _write_peft_dir(path, adapter_config, tensors):
    """What ``hf_peft.export_peft`` writes: the config and the tensors under PEFT's prefix."""
    path.mkdir()
    save_file({PREFIX + k: v.contiguous() for k, v in tensors.items()}, path / "adapter_model.safetensors",
              metadata={"format": "pt"})
    (path / "adapter_config.json").write_text(json.dumps(adapter_config))


@pytest.mark.parametrize(("family", "config"), [
    ("gpt2", IA3Config(peft_compatible=True)),
    ("llama", IA3Config()),  # the paper's targets are whole modules on Llama: k_proj, v_proj, down_proj
    ("gpt_neox", IA3Config(peft_compatible=True)),
    ("opt", IA3Config(layers=[1])),
])
def test_export_loads_in_peft(family, config, tmp_path):
    model = tiny_model(family)
    delta = core.apply(model, "ia3", config)
    _randomise(delta, seed=1)
    adapter_config, tensors = peft_export(delta)
    if family == "gpt2":
        assert adapter_config["target_modules"] == ["c_attn", "mlp.c_proj"] and adapter_config["fan_in_fan_out"]
        assert tensors["transformer.h.0.attn.c_attn.ia3_l"].shape == (96, 1)
        assert tensors["transformer.h.0.mlp.c_proj.ia3_l"].shape == (1, 64)
    _write_peft_dir(tmp_path / "a", adapter_config, tensors)
    loaded = peft.PeftModel.from_pretrained(tiny_model(family), tmp_path / "a").eval()
    torch.testing.assert_close(_logits(loaded), _logits(model), atol=1e-5, rtol=0)


def test_export_refuses_a_fused_slice():
    delta = core.apply(tiny_model("gpt2"), "ia3", IA3Config())
    with pytest.raises(UserError, match=r"only the 'k' features of the fused module .*peft_compatible=True"):
        peft_export(delta)


@pytest.mark.parametrize(("family", "kwargs"), [
    ("gpt2", {}),
    ("llama", {}),
    ("qwen2", {}),
    ("llama", {"target_modules": ["k_proj", "down_proj"], "feedforward_modules": ["down_proj"],
               "exclude_modules": r"model\.layers\.0\..*"}),
    ("opt", {"target_modules": r".*\.(v_proj|fc1)", "feedforward_modules": r".*fc1"}),
])
def test_peft_saved_adapter_imports(family, kwargs, tmp_path):
    pm, vectors = _peft_model(family, seed=2, **kwargs)
    pm.save_pretrained(tmp_path / "p")
    adapter_config = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    tensors = {k[len(PREFIX):]: v for k, v in load_file(tmp_path / "p" / "adapter_model.safetensors").items()}
    model = tiny_model(family)
    delta = peft_import(model, adapter_config, tensors)
    assert isinstance(delta, IA3Delta)
    assert {s.target.name for s in delta.scaled} == set(vectors)
    torch.testing.assert_close(_logits(model), _logits(pm), atol=1e-5, rtol=0)
    # and back: our export of the imported delta is the same adapter
    config2, tensors2 = peft_export(delta)
    assert set(tensors2) == set(tensors)
    assert all(torch.equal(tensors2[k], tensors[k]) for k in tensors)


def test_peft_import_refuses_other_adapters():
    with pytest.raises(UserError, match="peft_type is 'LORA'"):
        peft_import(tiny_model("llama"), {"peft_type": "LORA"}, {})
    with pytest.raises(UserError, match="no tensor .*k_proj.ia3_l"):
        peft_import(tiny_model("llama"), {"peft_type": "IA3"}, {})


def test_training_lowers_the_loss_and_moves_only_the_vectors():
    from efficientgpt.data.tokens import WindowSampler
    from efficientgpt.train.losses import causal_lm_loss
    from efficientgpt.train.trainer import TrainConfig, Trainer
    from train_script import stream

    torch.manual_seed(0)
    model = tiny_model("llama", seed=0)
    with torch.no_grad():  # sharper random weights: at the default init the logits are near uniform
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(10)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    delta = core.apply(model, "ia3", IA3Config())
    sampler = WindowSampler(stream(4000), 16, 8, seed=1)
    held_out = WindowSampler(stream(4000, seed=1), 16, 32, seed=2)(0)

    def loss():
        with torch.no_grad():
            total, n = causal_lm_loss(model, held_out)
        return float(total / n)

    before = loss()
    cfg = TrainConfig(steps=30, batch_size=8, seq_len=16, lr=0.1, log_every=1, progress=False, seed=0)
    Trainer(model, cfg, sampler).train()
    assert loss() < before - 0.1, (before, loss())
    for n, p in model.named_parameters():
        if n in base:
            assert torch.equal(p, base[n]), n
    assert any(not torch.equal(p, torch.ones_like(p)) for p in delta.parameters())
