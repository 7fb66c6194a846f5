"""BitFit (Ben Zaken et al., ACL 2022): which biases train, the delta against biases edited by hand, merging
into a model that reloads with ``from_pretrained``, and the refusal where a config cannot hold the biases."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from efficientgpt.errors import UserError
from efficientgpt.models import arch
from efficientgpt.models.tiny import tiny_model
from efficientgpt.peft import core
from efficientgpt.peft.bitfit import BitFitConfig

IDS = torch.randint(2, 128, (2, 10), generator=torch.Generator().manual_seed(0))
D, F, KV = 32, 64, 16  # tiny models: hidden, FFN width, Llama/Qwen2 k/v width (2 kv heads of 8)


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def _randomise(delta, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in delta.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize(("family", "per_layer", "final"), [
    ("gpt2", 3 * D + D + F + D + 2 * D, D),  # b_q, b_k, b_v (slices of c_attn), o, up, down, ln_1, ln_2
    ("opt", 3 * D + D + F + D + 2 * D, D),
    ("gpt_neox", 3 * D + D + F + D + 2 * D, D),
    ("llama", D + 2 * KV + D + 2 * F + D, 0),  # q, k, v, o, gate, up, down; RMSNorm has no bias
    ("qwen2", D + 2 * KV + D + 2 * F + D, 0),
])
def test_trainable_count_closed_form(family, per_layer, final):
    model = tiny_model(family)
    delta = core.apply(model, "bitfit", BitFitConfig())
    assert core.count_parameters(model)["trainable"] == 2 * per_layer + final
    assert all(n.endswith(".b") for n, p in model.named_parameters() if p.requires_grad)
    no_norms = core.apply(tiny_model(family), "bitfit", BitFitConfig(norms=False))
    assert sum(p.numel() for p in no_norms.parameters()) == 2 * (per_layer - (2 * D if final else 0))
    assert delta.targets()


def test_gpt2_delta_equals_biases_edited_by_hand():
    """The additive delta is training the bias: the same logits as a model whose biases we change."""
    model = tiny_model("gpt2", seed=2)
    ref = copy.deepcopy(model)
    delta = core.apply(model, "bitfit", BitFitConfig())
    _randomise(delta)
    d = {k: m.b.detach() for k, m in delta.modules.items()}
    with torch.no_grad():
        for i, block in enumerate(ref.transformer.h):
            p = f"transformer__h__{i}__"
            for j, role in enumerate("qkv"):
                block.attn.c_attn.bias[j * D:(j + 1) * D] += d[f"{p}attn__c_attn__{role}"]
            block.attn.c_proj.bias += d[f"{p}attn__c_proj"]
            block.mlp.c_fc.bias += d[f"{p}mlp__c_fc"]
            block.mlp.c_proj.bias += d[f"{p}mlp__c_proj"]
            block.ln_1.bias += d[f"{p}ln_1"]
            block.ln_2.bias += d[f"{p}ln_2"]
        ref.transformer.ln_f.bias += d["transformer__ln_f"]
    torch.testing.assert_close(_logits(model), _logits(ref), atol=1e-5, rtol=0)


def test_llama_delta_equals_added_biases():
    model = tiny_model("llama", seed=2)
    ref = copy.deepcopy(model)
    delta = core.apply(model, "bitfit", BitFitConfig(targets=["v", "down"], layers=[1]))
    _randomise(delta)
    with torch.no_grad():
        layer = ref.model.layers[1]
        for mod, key in ((layer.self_attn.v_proj, "model__layers__1__self_attn__v_proj"),
                         (layer.mlp.down_proj, "model__layers__1__mlp__down_proj")):
            mod.bias = torch.nn.Parameter(delta.modules[key].b.detach().clone())
    torch.testing.assert_close(_logits(model), _logits(ref), atol=1e-5, rtol=0)


def test_merge_creates_biases_and_unmerge_deletes_them():
    model = tiny_model("llama")
    keys = set(model.state_dict())
    delta = core.apply(model, "bitfit", BitFitConfig())
    _randomise(delta)
    tuned = _logits(model)
    delta.merge()
    q = arch.block_module(model, 0, "q")
    assert isinstance(q.bias, torch.nn.Parameter)
    torch.testing.assert_close(q.bias, delta.modules["model__layers__0__self_attn__q_proj"].b)
    torch.testing.assert_close(_logits(model), tuned, atol=1e-5, rtol=0)
    delta.unmerge()
    assert q.bias is None
    assert {k for k in model.state_dict() if not k.startswith(core.DELTA_ROOT)} == keys


@pytest.mark.parametrize(("family", "config", "flags"), [
    ("llama", BitFitConfig(), {"attention_bias": True, "mlp_bias": True}),
    ("llama", BitFitConfig(targets=["v"], layers=[0]), {"attention_bias": True, "mlp_bias": False}),
    ("gpt2", BitFitConfig(), {}),
    ("qwen2", BitFitConfig(targets=["q", "k", "v"]), {}),  # Qwen2's own biases
    ("gpt_neox", BitFitConfig(), {}),
])
def test_merged_model_reloads_with_from_pretrained(family, config, flags, tmp_path):
    model = tiny_model(family)
    delta = core.apply(model, "bitfit", config)
    _randomise(delta)
    tuned = _logits(model)
    merged = core.merge_and_unload(model)
    assert not hasattr(merged, core.DELTA_ROOT)
    torch.testing.assert_close(_logits(merged), tuned, atol=1e-5, rtol=0)
    for flag, value in flags.items():
        assert getattr(merged.config, flag) is value, flag
    merged.save_pretrained(tmp_path / "m")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    torch.testing.assert_close(_logits(reloaded), tuned, atol=1e-5, rtol=0)
    if family == "llama" and config.layers == [0]:  # the flag covers o_proj of every layer: zero biases there
        assert torch.equal(reloaded.model.layers[1].self_attn.o_proj.bias, torch.zeros(D))


def test_qwen2_merge_is_refused_and_changes_nothing():
    model = tiny_model("qwen2")
    delta = core.apply(model, "bitfit", BitFitConfig())
    _randomise(delta)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tuned = _logits(model)
    with pytest.raises(UserError, match=r"o_proj has no bias and the qwen2 config has no flag"):
        delta.merge()
    with pytest.raises(UserError, match="no flag"):
        core.merge_and_unload(model)
    assert not delta.merged and core.deltas(model)
    assert {n for n, _ in model.named_parameters()} == set(before)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    torch.testing.assert_close(_logits(model), tuned, atol=0, rtol=0)


def test_training_moves_only_the_bias_deltas():
    from efficientgpt.data.tokens import WindowSampler
    from efficientgpt.train.losses import causal_lm_loss
    from efficientgpt.train.trainer import TrainConfig, Trainer
    from train_script import stream

    torch.manual_seed(0)
    model = tiny_model("gpt2", seed=0)
    with torch.no_grad():  # sharper random weights: at the default init the logits are near uniform
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(10)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    delta = core.apply(model, "bitfit", BitFitConfig())
    held_out = WindowSampler(stream(4000, seed=1), 16, 32, seed=2)(0)

    def loss():
        with torch.no_grad():
            total, n = causal_lm_loss(model, held_out)
        return float(total / n)

    before = loss()
    cfg = TrainConfig(steps=30, batch_size=8, seq_len=16, lr=0.1, log_every=1, progress=False, seed=0)
    Trainer(model, cfg, WindowSampler(stream(4000), 16, 8, seed=1)).train()
    assert loss() < before - 0.2, (before, loss())
    for n, p in model.named_parameters():
        if n in base:
            assert torch.equal(p, base[n]), n  # every base tensor, biases and LayerNorms included
    assert all((m.b != 0).any() for m in delta.modules.values())
