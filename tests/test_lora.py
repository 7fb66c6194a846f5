"""LoRA: closed forms, options, and the oracle against Hugging Face PEFT (same weights, same logits)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from efficientgpt.errors import UserError
from efficientgpt.models import arch
from efficientgpt.models.tiny import tiny_model
from efficientgpt.peft import core, hf_peft
from efficientgpt.peft.lora import LoraConfig

peft = pytest.importorskip("peft")
IDS = torch.randint(2, 128, (2, 11), generator=torch.Generator().manual_seed(1))


def _randomise(params, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(0.1 * torch.randn(p.shape, generator=g))


def test_update_is_scaled_low_rank_product():
    model = tiny_model("llama")
    (t,) = arch.resolve(model, ["q"], layers=[1])
    x = torch.randn(3, 32)
    base = t.module(x)
    for rslora, scale in ((False, 6.0 / 3), (True, 6.0 / math.sqrt(3))):
        m = copy.deepcopy(model)
        d = core.apply(m, "lora", LoraConfig(targets=["q"], layers=[1], rank=3, alpha=6.0, rslora=rslora))
        _randomise(d.parameters())
        A, B = d.factors(core.target_key(t.name))
        torch.testing.assert_close(m.get_submodule(t.name)(x), base + scale * x @ A.T @ B.T)


def test_fused_roles_write_only_their_slice():
    model = tiny_model("gpt_neox")
    d = core.apply(model, "lora", LoraConfig(targets=["v"], rank=2))
    _randomise(d.parameters())
    (t,) = arch.resolve(model, ["v"], layers=[0])
    x = torch.randn(4, 32)
    with core.disable(model):
        base = t.module(x)
    diff = (t.module(x) - base).abs().sum(0)
    changed = set(torch.nonzero(diff > 0).flatten().tolist())
    assert changed == set(t.out_index.tolist())  # per-head interleaved v features only


def test_dropout_follows_train_and_eval_mode():
    model = tiny_model("llama")
    d = core.apply(model, "lora", LoraConfig(targets=["q", "v"], rank=4, dropout=0.5))
    _randomise(d.parameters())
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, model(IDS).logits)
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(IDS).logits, model(IDS).logits)


def test_init_options():
    model = tiny_model("llama", hidden=64)
    d = core.apply(copy.deepcopy(model), "lora", LoraConfig(targets=["q"], rank=8, init="gaussian"))
    A = torch.cat([p for n, p in d.modules.named_parameters() if n.endswith(".A")])
    assert A.std().item() == pytest.approx(1 / 8, rel=0.15)
    assert all(torch.count_nonzero(p) == 0 for n, p in d.modules.named_parameters() if n.endswith(".B"))
    k = core.apply(copy.deepcopy(model), "lora", LoraConfig(targets=["q"], rank=8))
    A = torch.cat([p for n, p in k.modules.named_parameters() if n.endswith(".A")])
    bound = 1 / math.sqrt(64)  # kaiming_uniform(a=√5) on fan_in 64
    assert A.abs().max() <= bound and A.abs().max() > 0.9 * bound


def test_config_errors():
    for kwargs, msg in (({"rank": 0}, "rank = 0 is out of range: must be >= 1"),
                        ({"alpha": 0.0}, "alpha = 0.0 is out of range: must be > 0"),
                        ({"init": "xavier"}, "init = 'xavier' is not allowed; choose one of kaiming, gaussian")):
        with pytest.raises(UserError, match=msg):
            LoraConfig(**kwargs).validate()
    with pytest.raises(UserError, match="match no module"):
        core.apply(tiny_model("opt"), "lora", LoraConfig(targets=["gate"]))


def test_loading_onto_the_wrong_base_is_refused(tmp_path):
    d = core.apply(tiny_model("llama"), "lora", LoraConfig(rank=2))
    core.save_delta(d, tmp_path / "d")
    with pytest.raises(UserError, match="hidden_size: delta was made for 32, this model has 64"):
        core.load_delta(tiny_model("llama", hidden=64), tmp_path / "d")
    with pytest.raises(UserError, match="same architecture, but the weights differ"):
        core.load_delta(tiny_model("llama", seed=5), tmp_path / "d")


def _peft_lora(model, targets, r, alpha, **kw):
    cfg = peft.LoraConfig(task_type="CAUSAL_LM", r=r, lora_alpha=alpha, target_modules=targets, **kw)
    return peft.get_peft_model(model, cfg)


def _copy_into_peft(ours, pm):
    """Copy our (A, B) of each whole-module LoRA into PEFT's lora_A/lora_B of the same module."""
    sd = pm.state_dict()
    n = 0
    for name in sd:
        if ".lora_A." in name or ".lora_B." in name:
            path = name.split("base_model.model.", 1)[1].rsplit(".lora_", 1)[0]
            A, B = ours.factors(core.target_key(path))
            sd[name] = (A if ".lora_A." in name else B).detach().clone()
            n += 1
    pm.load_state_dict(sd)
    return n


@pytest.mark.parametrize(("family", "ours_targets", "peft_targets"), [
    ("gpt2", ["c_attn", "c_fc"], ["c_attn", "c_fc"]),         # Conv1D, fused qkv as one module
    ("llama", ["q", "v"], ["q_proj", "v_proj"]),
    ("qwen2", ["all-linear"], ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
])
@pytest.mark.parametrize("rslora", [False, True])
def test_oracle_same_weights_same_logits(family, ours_targets, peft_targets, rslora):
    base = tiny_model(family, seed=2)
    ours_model = copy.deepcopy(base)
    ours = core.apply(ours_model, "lora", LoraConfig(targets=ours_targets, rank=4, alpha=8.0, rslora=rslora))
    _randomise(ours.parameters())
    pm = _peft_lora(copy.deepcopy(base), peft_targets, 4, 8, use_rslora=rslora)
    assert _copy_into_peft(ours, pm) == 2 * len(ours.modules)
    with torch.no_grad():
        torch.testing.assert_close(ours_model(IDS).logits, pm(input_ids=IDS).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "llama", "opt"])
def test_export_loads_in_peft_and_peft_adapters_load_in_ours(family, tmp_path):
    base = tiny_model(family, seed=3)
    model = copy.deepcopy(base)
    d = core.apply(model, "lora", LoraConfig(targets=["q", "v", "down"], rank=3, alpha=5.0))
    _randomise(d.parameters())
    with torch.no_grad():
        expected = model(IDS).logits
    hf_peft.export_peft(d, tmp_path / "p")
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "p")
    with torch.no_grad():
        torch.testing.assert_close(pm(input_ids=IDS).logits, expected, atol=1e-5, rtol=0)
    # ... and back: a PEFT-saved adapter (with per-module rank_pattern) loads into ours.
    pm.save_pretrained(tmp_path / "p2")
    back = copy.deepcopy(base)
    hf_peft.import_peft(back, tmp_path / "p2")
    with torch.no_grad():
        torch.testing.assert_close(back(IDS).logits, expected, atol=1e-5, rtol=0)


def test_peft_dirs_without_safetensors_are_refused(tmp_path):
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (tmp_path / "adapter_model.bin").write_bytes(b"\x80\x02")
    with pytest.raises(UserError, match="only adapter_model.bin \\(a pickle\\)"):
        hf_peft.import_peft(tiny_model("gpt2"), tmp_path)
