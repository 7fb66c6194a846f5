"""Prompt tuning and prefix tuning: numerics against explicit references and HF PEFT, the KV cache in
generation, folding of the prefix MLP, training, PEFT adapter round trips, and the clear errors."""

from __future__ import annotations

import dataclasses
import json
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import FAMILIES
from efficientgpt.errors import ConfigError, UserError
from efficientgpt.models.tiny import tiny_model
from efficientgpt.peft import core
from efficientgpt.peft.prefix_tuning import PrefixTuningConfig
from efficientgpt.peft.prompt_tuning import PromptTuningConfig, peft_export, peft_import
from efficientgpt.train.config import TrainConfig
from efficientgpt.train.losses import causal_lm_loss
from efficientgpt.train.trainer import Trainer

N = 4
IDS = torch.randint(2, 128, (2, 7), generator=torch.Generator().manual_seed(0))


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT and transformers deprecation chatter
        yield


def _prompt_model(family: str, **cfg):
    model = tiny_model(family)
    torch.manual_seed(0)
    delta = core.apply(model, "prompt_tuning", PromptTuningConfig(num_virtual_tokens=N, **cfg))
    return model, delta


def _prefix_model(family: str, **cfg):
    model = tiny_model(family)
    torch.manual_seed(0)
    delta = core.apply(model, "prefix_tuning", PrefixTuningConfig(num_virtual_tokens=N, hidden=16, **cfg))
    return model, delta


def _prepended(model, P: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The paper's definition: run the base model on [P_e; X_e], keep the logits of the real tokens."""
    with core.disable(model):
        x = model.get_input_embeddings()(ids)  # (B, T, e)
        embeds = torch.cat([P[None].expand(ids.shape[0], -1, -1), x], dim=1)  # (B, n + T, e)
        if mask is not None:
            mask = torch.cat([torch.ones(ids.shape[0], P.shape[0], dtype=mask.dtype), mask], dim=1)
        return model(inputs_embeds=embeds, attention_mask=mask).logits[:, P.shape[0]:]  # (B, T, V)


# ---- prompt tuning ---------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_tuning_equals_prepending_the_prompt_embeddings(family):
    model, delta = _prompt_model(family)
    mask = torch.ones_like(IDS)
    mask[0, :2] = 0  # left padding in one row
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, _prepended(model, delta.prompt, IDS), atol=1e-5, rtol=0)
        torch.testing.assert_close(model(IDS, attention_mask=mask).logits,
                                   _prepended(model, delta.prompt, IDS, mask), atol=1e-5, rtol=0)
        with core.disable(model):
            plain = model(IDS).logits
        assert (model(IDS).logits - plain).abs().max() > 1e-3  # the prompt matters


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_tuning_generation_follows_the_prepended_reference(family):
    """``generate`` (with its own position ids, mask and KV cache) scores every step like the definition."""
    model, delta = _prompt_model(family)
    prompt = IDS[:1, :5]
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=4, do_sample=False, use_cache=True, pad_token_id=1,
                             output_logits=True, return_dict_in_generate=True)
        seq = prompt
        for step_logits in out.logits:  # greedy decoding by the definition, no cache
            expected = _prepended(model, delta.prompt, seq)[:, -1]  # (1, V)
            torch.testing.assert_close(step_logits, expected, atol=1e-5, rtol=0)
            seq = torch.cat([seq, expected.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out.sequences, seq)


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_tuning_matches_hf_peft(family):
    model, delta = _prompt_model(family, init="random")
    reference = peft.get_peft_model(tiny_model(family), peft.PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=N))
    with torch.no_grad():
        reference.prompt_encoder.default.embedding.weight.copy_(delta.prompt)
        theirs = reference(input_ids=IDS).logits  # (B, n + T, V): PEFT keeps the virtual positions
        assert theirs.shape[1] == N + IDS.shape[1]
        torch.testing.assert_close(model(IDS).logits, theirs[:, N:], atol=1e-5, rtol=0)


def test_prompt_tuning_initialisations():
    model, delta = _prompt_model("llama", init="random", init_range=0.25)
    assert delta.prompt.abs().max() <= 0.25 and delta.prompt.std() > 0.05
    E = model.get_input_embeddings().weight
    _, delta = _prompt_model("llama", init="vocab", vocab_pool=10)
    rows = [int(torch.where((E[:10] == p).all(-1))[0][0]) for p in delta.prompt]  # each row is a token's embedding
    assert len(set(rows)) == N
    _, delta = _prompt_model("llama", init="text", init_text_ids=[5, 9, 11])
    torch.testing.assert_close(delta.prompt, E[[5, 9, 11, 5]], atol=0, rtol=0)
    with pytest.raises(ConfigError, match="vocabulary has 128 tokens"):
        _prompt_model("llama", init="text", init_text_ids=[3, 500])
    from_cli = PromptTuningConfig(init="text", init_text_ids="5, 9")  # a command-line flag gives a string
    from_cli.validate()
    assert from_cli.init_text_ids == [5, 9]
    with pytest.raises(ConfigError, match="needs init_text_ids"):
        PromptTuningConfig(init="text").validate()
    with pytest.raises(ConfigError, match="only with init='text'"):
        PromptTuningConfig(init="vocab", init_text_ids=[1]).validate()


# ---- prefix tuning -----------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_tuning_matches_hf_peft(family):
    """The folded prefix P (n x L·2·kv_dim) read by HF PEFT's prefix tuning gives the same logits."""
    model, delta = _prefix_model(family)
    delta.prepare_for_saving()
    reference = peft.get_peft_model(tiny_model(family), peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=N))
    with torch.no_grad():
        reference.prompt_encoder.default.embedding.weight.copy_(delta.prefix())
        ours = model(IDS).logits
        torch.testing.assert_close(ours, reference(input_ids=IDS).logits, atol=1e-5, rtol=0)
        with core.disable(model):
            assert (ours - model(IDS).logits).abs().max() > 1e-3  # the prefix matters
        out = model.generate(IDS[:1, :5], max_new_tokens=3, do_sample=False, use_cache=True, pad_token_id=1,
                             output_logits=True, return_dict_in_generate=True)
        for i, step_logits in enumerate(out.logits):  # each cached step scores like PEFT on the whole sequence
            expected = reference(input_ids=out.sequences[:, : 5 + i]).logits[:, -1]  # (1, V)
            torch.testing.assert_close(step_logits, expected, atol=1e-5, rtol=0)


def test_prefix_reparametrisation_matches_hf_peft_projection():
    """Eq. 5, P = Linear(tanh(Linear(P'))), against PEFT's prefix_projection (same shapes where kv_dim = d)."""
    model, delta = _prefix_model("gpt2")
    reference = peft.get_peft_model(tiny_model("gpt2"), peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=N, prefix_projection=True, encoder_hidden_size=16))
    enc, ours = reference.prompt_encoder.default, delta.modules["prefix"]
    with torch.no_grad():
        enc.embedding.weight.copy_(ours.P_prime)
        for i in (0, 2):
            enc.transform[i].weight.copy_(ours.mlp[i].weight)
            enc.transform[i].bias.copy_(ours.mlp[i].bias)
        torch.testing.assert_close(model(IDS).logits, reference(input_ids=IDS).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_folding_keeps_logits_and_shrinks_the_saved_delta(family, tmp_path):
    model, delta = _prefix_model(family)
    c = model.config
    kv_dim = (getattr(c, "num_key_value_heads", None) or c.num_attention_heads) * (c.hidden_size // c.num_attention_heads)
    with torch.no_grad():
        before = model(IDS).logits
        core.save_delta(delta, tmp_path / "d")
        torch.testing.assert_close(model(IDS).logits, before, atol=1e-6, rtol=0)
    saved = load_file(tmp_path / "d" / "delta.safetensors")
    assert list(saved) == ["prefix.P"]
    assert saved["prefix.P"].numel() == N * c.num_hidden_layers * 2 * kv_dim
    assert json.loads((tmp_path / "d" / "delta_config.json").read_text())["config"]["folded"] is True
    fresh = tiny_model(family)
    loaded = core.load_delta(fresh, tmp_path / "d")
    assert [n for n, _ in loaded.modules.named_parameters()] == ["prefix.P"]
    with torch.no_grad():
        torch.testing.assert_close(fresh(IDS).logits, before, atol=1e-6, rtol=0)


def test_prefix_without_reparametrisation_trains_P_directly():
    model, delta = _prefix_model("llama", reparam=False)
    c = model.config
    kv_dim = c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)  # GQA: 2 kv heads of 8
    assert [n for n, p in delta.modules.named_parameters() if p.requires_grad] == ["prefix.P"]
    assert core.count_parameters(model)["trainable"] == N * c.num_hidden_layers * 2 * kv_dim


# ---- both ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_training_lowers_the_loss_and_reaches_every_delta_tensor(method):
    model, delta = (_prompt_model if method == "prompt_tuning" else _prefix_model)("llama")
    model.train()
    loss, n = causal_lm_loss(model, {"input_ids": IDS})
    (loss / n).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in delta.parameters())
    model.zero_grad()
    data = torch.randint(5, 9, (4, 12), generator=torch.Generator().manual_seed(1))  # 4 of 128 tokens: learnable
    cfg = TrainConfig(steps=12, batch_size=4, seq_len=12, lr=0.1, min_lr_ratio=1.0, log_every=1, progress=False)
    result = Trainer(model, cfg, lambda step: {"input_ids": data}).train()
    assert result.curve[-1]["loss"] < result.curve[0]["loss"] - 0.05, result.curve


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_prompt_longer_than_the_context_is_refused(method, family):
    cfg = (PromptTuningConfig if method == "prompt_tuning" else PrefixTuningConfig)(num_virtual_tokens=64)
    with pytest.raises(ConfigError, match="Prompt longer than the model's context"):
        core.apply(tiny_model(family, max_positions=64), method, cfg)
    core.apply(tiny_model(family, max_positions=64), method, dataclasses.replace(cfg, num_virtual_tokens=63))


def test_positions_past_a_learned_table_are_a_clear_error():
    model, _ = _prompt_model("gpt2")
    with pytest.raises(UserError, match="exceed the model's 64 positions"):
        model(torch.randint(2, 128, (1, 64 - N + 1)))


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_cache_only_when_asked_and_cache_continuation(method):
    model, _ = (_prompt_model if method == "prompt_tuning" else _prefix_model)("opt")
    with torch.no_grad():
        assert model(IDS, use_cache=False).cache is None
        full = model(IDS).logits
        mask = torch.ones_like(IDS)
        out = model(IDS[:, :4], attention_mask=mask[:, :4], use_cache=True)
        assert out.cache.get_seq_length() == N + 4
        rest = model(IDS[:, 4:], attention_mask=mask, cache=out.cache).logits
    torch.testing.assert_close(rest, full[:, 4:], atol=1e-5, rtol=0)


def test_stacked_prompt_and_prefix_decode_consistently():
    model = tiny_model("llama")
    torch.manual_seed(0)
    core.apply(model, "prompt_tuning", PromptTuningConfig(num_virtual_tokens=3), name="prompt")
    core.apply(model, "prefix_tuning", PrefixTuningConfig(num_virtual_tokens=2, hidden=16), name="prefix")
    with torch.no_grad():
        full = model(IDS).logits
        out = model(IDS[:, :-1], use_cache=True)
        assert out.cache.get_seq_length() == 5 + IDS.shape[1] - 1
        step = model(IDS[:, -1:], cache=out.cache).logits
        cached = model.generate(IDS[:1, :5], max_new_tokens=4, do_sample=False, use_cache=True, pad_token_id=1)
        uncached = model.generate(IDS[:1, :5], max_new_tokens=4, do_sample=False, use_cache=False, pad_token_id=1)
    torch.testing.assert_close(step[:, -1], full[:, -1], atol=1e-5, rtol=0)
    assert torch.equal(cached, uncached)


def test_cache_read_without_the_delta_is_refused():
    model, _ = _prefix_model("llama")
    with torch.no_grad():
        with core.disable(model):
            past = model(IDS, use_cache=True).cache
        with pytest.raises(UserError, match="read without this delta's virtual tokens"):
            model(IDS[:, :1], cache=past)


def test_gradient_checkpointing_is_refused_in_training():
    model, _ = _prompt_model("llama")
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    with pytest.raises(UserError, match="gradient checkpointing"):
        causal_lm_loss(model, {"input_ids": IDS})


# ---- HF PEFT adapter files -----------------------------------------------------------------------------
def _write_peft_dir(directory, config, tensors):
    directory.mkdir()
    save_file({k: v.contiguous() for k, v in tensors.items()}, directory / "adapter_model.safetensors")
    (directory / "adapter_config.json").write_text(json.dumps({"inference_mode": True, **config}))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_peft_export_loads_in_hf_peft(family, tmp_path):
    model, delta = _prompt_model(family)
    config, tensors = peft_export(delta)
    assert set(tensors) == {"prompt_embeddings"}
    _write_peft_dir(tmp_path / "a", config, tensors)
    theirs = peft.PeftModel.from_pretrained(tiny_model(family), tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=IDS).logits[:, N:], model(IDS).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_peft_adapter_imports(family, tmp_path):
    torch.manual_seed(3)
    theirs = peft.get_peft_model(tiny_model(family), peft.PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=N))
    theirs.save_pretrained(tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    tensors = load_file(tmp_path / "a" / "adapter_model.safetensors")
    model = tiny_model(family)
    delta = peft_import(model, config, tensors, name="imported")
    assert delta.name == "imported"
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, theirs(input_ids=IDS).logits[:, N:], atol=1e-5, rtol=0)
    with pytest.raises(UserError, match="expected"):
        peft_import(tiny_model(family), {**config, "num_virtual_tokens": N + 1}, tensors)
    with pytest.raises(UserError, match="not a prompt-tuning adapter"):
        peft_import(tiny_model(family), {**config, "peft_type": "LORA"}, tensors)

