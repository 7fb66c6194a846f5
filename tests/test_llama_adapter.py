"""LLaMA-Adapter: zero-gate identity, a slow hand-written reference of the zero-init attention per family,
gradients of the gates, closed-form counts, KV-cache decoding, the HF PEFT oracle, training, refusals."""

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
from efficientgpt.peft.llama_adapter import LlamaAdapterConfig
from efficientgpt.train.losses import causal_lm_loss

IDS = torch.randint(2, 128, (2, 10), generator=torch.Generator().manual_seed(3))


@pytest.fixture(autouse=True)
def _seeded():
    """The prompts are drawn from the global generator at attach time."""
    torch.manual_seed(0)


def _randomise(delta, seed=0, gate_scale=0.8):
    """Non-zero gates (the prompts are already N(0, 1)): the prompt branch then changes the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in delta.modules.named_parameters():
            scale = gate_scale if name.endswith("gate") else 1.0
            p.copy_(scale * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("peft_compatible", [False, True])
@pytest.mark.parametrize("family", FAMILIES)
def test_identity_at_init(family, peft_compatible):
    model = tiny_model(family)
    with torch.no_grad():
        base = model(IDS).logits
    delta = core.apply(model, "llama_adapter", LlamaAdapterConfig(adapter_len=4, peft_compatible=peft_compatible))
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, base, atol=0, rtol=0)
    for name, p in delta.modules.named_parameters():
        if name.endswith("gate"):
            assert torch.count_nonzero(p) == 0, name  # zero-init gating (§3.2)
        else:
            assert p.std() > 0.5, name  # N(0, 1) prompts, as the official nn.Embedding


# ---- a slow reference of one adapted attention layer, written out per family ---------------------------------
def _project(family, attn, x, heads, hd):
    """q, k, v of ``x`` (..., C) by the family's own layout: each (..., n·d_h)."""
    if family == "gpt2":  # Conv1D: weight (in, out), output [q | k | v]
        y = x @ attn.c_attn.weight + attn.c_attn.bias
        return y.split(heads * hd, dim=-1)
    if family == "gpt_neox":  # Linear, output viewed (heads, [q | k | v])
        y = F.linear(x, attn.query_key_value.weight, attn.query_key_value.bias)
        y = y.view(*x.shape[:-1], heads, 3 * hd)
        return tuple(y[..., i * hd:(i + 1) * hd].reshape(*x.shape[:-1], heads * hd) for i in range(3))
    return tuple(F.linear(x, m.weight, m.bias) for m in (attn.q_proj, attn.k_proj, attn.v_proj))


def _output(family, attn, y):
    if family == "gpt2":
        return y @ attn.c_proj.weight + attn.c_proj.bias
    o = {"gpt_neox": "dense", "opt": "out_proj"}.get(family, "o_proj")
    return F.linear(y, getattr(attn, o).weight, getattr(attn, o).bias)


def _rope(x, cos, sin):
    """x (B, h, T, d_h) rotated on its first r = cos.shape[-1] features (halves rotated as in HF)."""
    r = cos.shape[-1]
    cos, sin = cos[:, None], sin[:, None]
    x1, x2, rest = x[..., : r // 2], x[..., r // 2:r], x[..., r:]
    return torch.cat([x[..., :r] * cos + torch.cat([-x2, x1], dim=-1) * sin, rest], dim=-1)


def _layer_reference(family, attn, dims, hidden, pos, prompt, gate, with_prompt=True):
    """softmax(q K^T/√d_h + causal) V + gate_h · softmax(q (P W_k)^T/√d_h) (P W_v) per head, then Linear_o."""
    heads, kv_heads, hd = dims
    B, T, _ = hidden.shape
    q, k, v = _project(family, attn, hidden, heads, hd)
    q = q.view(B, T, heads, hd).transpose(1, 2)  # (B, h, T, d_h)
    k = k.view(B, T, kv_heads, hd).transpose(1, 2)  # (B, kv, T, d_h)
    v = v.view(B, T, kv_heads, hd).transpose(1, 2)
    if pos is not None:
        q, k = _rope(q, *pos), _rope(k, *pos)
    _, pk, pv = _project(family, attn, prompt, heads, hd)
    pk = pk.view(-1, kv_heads, hd).transpose(0, 1)  # (kv, K, d_h): no rotary, the prompt has no position
    pv = pv.view(-1, kv_heads, hd).transpose(0, 1)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    heads_out = []
    for h in range(heads):
        g = h // (heads // kv_heads)  # the key/value head of query head h's group
        s = q[:, h] @ k[:, g].transpose(-1, -2) / math.sqrt(hd)  # (B, T, T)
        out = s.masked_fill(~causal, float("-inf")).softmax(-1) @ v[:, g]  # (B, T, d_h)
        if with_prompt:
            sp = q[:, h] @ pk[g].T / math.sqrt(hd)  # (B, T, K): rotated queries, unrotated prompt keys
            out = out + gate[h if gate.numel() > 1 else 0] * sp.softmax(-1) @ pv[g]
        heads_out.append(out)
    return _output(family, attn, torch.cat(heads_out, dim=-1))  # (B, T, C)


@pytest.mark.parametrize(("family", "peft_compatible"), [
    ("gpt2", False), ("llama", False), ("opt", False), ("gpt_neox", False), ("qwen2", False),
    ("llama", True), ("gpt2", True),
])
def test_adapted_layer_matches_slow_reference(family, peft_compatible):
    model = tiny_model(family)
    delta = core.apply(model, "llama_adapter",
                       LlamaAdapterConfig(adapter_len=3, adapter_layers=1, peft_compatible=peft_compatible))
    _randomise(delta)
    top = arch.num_layers(model) - 1
    attn = arch.block_module(model, top, "attn")
    seen = {}

    def grab_in(mod, args, kwargs):
        seen["hidden"] = args[0] if args else kwargs["hidden_states"]
        seen["pos"] = kwargs.get("position_embeddings")

    def grab_out(mod, args, out):
        seen["out"] = out[0]

    attn.register_forward_pre_hook(grab_in, with_kwargs=True)
    attn.register_forward_hook(grab_out)
    with torch.no_grad():
        model(IDS)
        adapted, hidden, pos = seen["out"], seen["hidden"], seen["pos"]
        with core.disable(model):
            model(IDS)
        plain = seen["out"]
        prompt = delta.modules[core.target_key(f"{arch.family_of(model).blocks}.{top}")]
        gate = prompt.gate if peft_compatible else prompt.gate.tanh()
        dims = arch.head_dims(model)
        want = _layer_reference(family, attn, dims, hidden, pos, prompt.prompt, gate)
        want_plain = _layer_reference(family, attn, dims, hidden, pos, prompt.prompt, gate, with_prompt=False)
    if family == "gpt_neox":  # partial rotary: the reference rotates only the first rotary_pct of each head
        assert pos[0].shape[-1] < dims[2]
    torch.testing.assert_close(plain, want_plain, atol=1e-5, rtol=1e-5)  # the reference's frozen part is right
    torch.testing.assert_close(adapted, want, atol=1e-5, rtol=1e-5)
    assert (adapted - plain).abs().max() > 1e-3


def test_only_the_top_layers_are_adapted():
    model = tiny_model("llama", layers=3)
    delta = core.apply(model, "llama_adapter", LlamaAdapterConfig(adapter_len=2, adapter_layers=2))
    _randomise(delta)
    assert delta.targets() == sorted(f"model.layers.{i}.self_attn.{p}_proj" for i in (1, 2) for p in "qkvo")
    outs = {}
    for i in range(3):
        arch.block_module(model, i, "attn").register_forward_hook(
            lambda mod, args, out, i=i: outs.__setitem__(i, out[0]))
    with torch.no_grad():
        model(IDS)
        tuned = dict(outs)
        with core.disable(model):
            model(IDS)
    assert torch.equal(tuned[0], outs[0])  # layer 0 has no prompt
    assert all((tuned[i] - outs[i]).abs().max() > 1e-3 for i in (1, 2))


# ---- training signal ---------------------------------------------------------------------------------------
def test_gates_get_gradient_and_one_step_changes_the_model():
    model = tiny_model("llama")
    delta = core.apply(model, "llama_adapter", LlamaAdapterConfig(adapter_len=4))
    with torch.no_grad():
        base = model(IDS).logits
    opt = torch.optim.SGD(delta.parameters(), lr=0.5)
    model.train()
    loss, n = causal_lm_loss(model, {"input_ids": IDS})
    (loss / n).backward()
    for name, p in delta.modules.named_parameters():
        if name.endswith("gate"):
            assert p.grad is not None and torch.count_nonzero(p.grad) == p.numel(), name  # every head's gate
        else:  # tanh(0) = 0 cuts the prompt's gradient at the first step: the gate opens first
            assert p.grad is not None and torch.count_nonzero(p.grad) == 0, name
    opt.step()
    opt.zero_grad()
    model.eval()
    with torch.no_grad():
        assert (model(IDS).logits - base).abs().max() > 1e-4
    loss, n = causal_lm_loss(model, {"input_ids": IDS})
    (loss / n).backward()
    assert all(torch.count_nonzero(p.grad) > 0 for name, p in delta.modules.named_parameters()
               if name.endswith("prompt"))  # with the gate open, the prompts learn too


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_gradient_checkpointing_gives_the_same_gradients(family):
    """Recomputing a layer re-runs its hooks in order (queries kept, then the branch added): same gradients."""
    grads = []
    for checkpointing in (False, True):
        model = tiny_model(family)
        if checkpointing:
            model.gradient_checkpointing_enable()
        torch.manual_seed(0)
        delta = core.apply(model, "llama_adapter", LlamaAdapterConfig(adapter_len=3))
        _randomise(delta)
        model.train()
        loss, n = causal_lm_loss(model, {"input_ids": IDS})
        (loss / n).backward()
        grads.append([p.grad for p in delta.parameters()])
    for a, b in zip(*grads, strict=True):
        assert a.abs().max() > 0
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize(("family", "cfg", "layers"), [
    ("llama", LlamaAdapterConfig(adapter_len=5, adapter_layers=2), 2),
    ("qwen2", LlamaAdapterConfig(adapter_len=3, adapter_layers=1, peft_compatible=True), 1),
    ("gpt2", LlamaAdapterConfig(adapter_len=7), 2),  # default: every layer
    ("gpt_neox", LlamaAdapterConfig(adapter_len=1, peft_compatible=True), 2),
])
def test_parameter_count_closed_form(family, cfg, layers):
    model = tiny_model(family)
    delta = core.apply(model, "llama_adapter", cfg)
    d, heads = 32, 4
    per_layer = cfg.adapter_len * d + (1 if cfg.peft_compatible else heads)  # K·C + gates
    assert core.count_parameters(model)["trainable"] == layers * per_layer
    assert delta.describe()["trainable_parameters"] == layers * per_layer


# ---- decoding with the KV cache ----------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_cached_decoding_equals_uncached(family):
    """The prompt branch is per query token and takes no position: a cached step sees the same prompt
    attention as the full forward (queries rotated at their true positions)."""
    model = tiny_model(family)
    delta = core.apply(model, "llama_adapter", LlamaAdapterConfig(adapter_len=3))
    _randomise(delta, gate_scale=1.5)
    with torch.no_grad():
        full = model(IDS).logits
        out = model(IDS[:, :-3], use_cache=True)
        cache = out.past_key_values
        steps = []
        for t in range(IDS.shape[1] - 3, IDS.shape[1]):
            out = model(IDS[:, t:t + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits[:, -1])
        with core.disable(model):
            assert (model(IDS).logits - full).abs().max() > 1e-3  # the delta matters
    torch.testing.assert_close(torch.stack(steps, dim=1), full[:, -3:], atol=1e-5, rtol=1e-4)
    prompt = IDS[:1, :4]
    cached = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=1)
    uncached = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=1)
    assert torch.equal(cached, uncached)


# ---- the Hugging Face PEFT oracle ----------------------------------------------------------------------------
@pytest.mark.parametrize("adapter_layers", [1, 2])
def test_peft_compatible_matches_hf_peft_adaption_prompt(adapter_layers):
    peft = pytest.importorskip("peft")
    K = 3
    model = tiny_model("llama")  # 4 heads over 2 key/value heads: PEFT's GQA path too
    theirs = peft.get_peft_model(copy.deepcopy(model),
                                 peft.AdaptionPromptConfig(adapter_len=K, adapter_layers=adapter_layers,
                                                           task_type="CAUSAL_LM"))
    delta = core.apply(model, "llama_adapter",
                       LlamaAdapterConfig(adapter_len=K, adapter_layers=adapter_layers, peft_compatible=True))
    g = torch.Generator().manual_seed(5)
    adapted = range(2 - adapter_layers, 2)
    with torch.no_grad():
        mods = dict(theirs.named_modules())
        for i, gate in zip(adapted, (0.7, -1.3), strict=False):
            prompt = torch.randn(K, 32, generator=g)
            ours = delta.modules[f"model__layers__{i}"]
            ours.prompt.copy_(prompt)
            ours.gate.fill_(gate)
            wrapped = mods[f"base_model.model.model.layers.{i}.self_attn"]
            wrapped.adaption_prompt.copy_(prompt[None])  # PEFT keeps (1, K, C)
            wrapped.adaption_gate.fill_(gate)
        mine, ref = model(IDS).logits, theirs(input_ids=IDS).logits
    assert (mine - tiny_model("llama")(IDS).logits).abs().max() > 1e-3  # the gates are open
    torch.testing.assert_close(mine, ref, atol=1e-5, rtol=0)
    assert sum(p.numel() for p in theirs.parameters() if p.requires_grad) == core.count_parameters(model)["trainable"]


# ---- training ------------------------------------------------------------------------------------------------


def test_training_lowers_the_loss_and_moves_only_the_prompts(ascending_base):
    """Adapting the ascending-sequence model to descending sequences: the prompts and gates alone lower the
    held-out loss, and no base weight moves."""
    model = copy.deepcopy(ascending_base)
    torch.manual_seed(0)
    delta = core.apply(model, "llama_adapter", LlamaAdapterConfig(adapter_len=8))
    # A prompt-only method moves this loss slowly (the frozen attention, MLP and head do the computing), and
    # the prompts are unit-scale N(0, 1): hence a large step size and 60 steps (5.08 -> 4.82 here).
    before, after = adapt_to_descending(model, steps=60, lr=0.2)
    assert after < before - 0.15, (before, after)
    assert all(torch.count_nonzero(d.gate) > 0 for d in delta.modules.values())


# ---- saving, config, refusals --------------------------------------------------------------------------------
def test_save_and_load_round_trip_keeps_the_variant(tmp_path):
    model = tiny_model("qwen2")
    delta = core.apply(model, "llama_adapter", LlamaAdapterConfig(adapter_len=3, peft_compatible=True))
    _randomise(delta)
    with torch.no_grad():
        tuned = model(IDS).logits
    core.save_delta(delta, tmp_path / "d")
    fresh = tiny_model("qwen2")
    loaded = core.load_delta(fresh, tmp_path / "d")
    assert loaded.config == delta.config
    with torch.no_grad():
        torch.testing.assert_close(fresh(IDS).logits, tuned, atol=0, rtol=0)


def test_prompt_longer_than_the_context_is_fine():
    """The prompts take no position: K may exceed GPT-2's 64 learned positions."""
    model = tiny_model("gpt2")
    assert model.config.n_positions == 64
    delta = core.apply(model, "llama_adapter", LlamaAdapterConfig(adapter_len=80, adapter_layers=1))
    _randomise(delta)
    with torch.no_grad():
        assert torch.isfinite(model(IDS).logits).all()


def test_config_is_validated():
    model = tiny_model("llama")  # 2 layers
    with pytest.raises(ConfigError, match=r"adapter_layers = 3 is out of range for this model: it has 2 decoder "
                                          r"layers; choose 1\.\.2"):
        core.apply(model, "llama_adapter", LlamaAdapterConfig(adapter_layers=3))
    assert not core.deltas(model) and not hasattr(model, core.DELTA_ROOT)  # nothing left behind
    for bad, match in (
        (dict(adapter_layers=0), r"adapter_layers = 0 is out of range: must be >= 1"),
        (dict(adapter_len=0), r"adapter_len = 0 is out of range: must be >= 1"),
        (dict(adapter_len=2.5), r"adapter_len must be an integer"),
        (dict(adapter_layers="2"), r"adapter_layers must be an integer >= 1"),
    ):
        with pytest.raises(ConfigError, match=match):
            core.apply(tiny_model("llama"), "llama_adapter", LlamaAdapterConfig(**bad))


def test_qk_normalised_attention_is_refused():
    from transformers import AutoModelForCausalLM, Qwen3Config

    cfg = Qwen3Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
    model = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(UserError, match=r"does not support 'qwen3'.*q_norm, k_norm"):
        core.apply(model, "llama_adapter", LlamaAdapterConfig(adapter_len=2))
    assert not core.deltas(model)


def test_not_mergeable():
    model = tiny_model("opt")
    delta = core.apply(model, "llama_adapter", LlamaAdapterConfig(adapter_len=2))
    with pytest.raises(UserError, match="llama_adapter is not mergeable"):
        delta.merge()
    with pytest.raises(UserError, match="cannot merge"):
        core.merge_and_unload(model)
