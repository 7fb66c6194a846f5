"""Efficient attention: backend switching, MHA -> GQA/MQA conversion, bounded KV caches, KV bytes."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from efficientgpt import registry
from efficientgpt.compress import attention
from efficientgpt.compress.attention import (
    GQAConfig,
    SinkCache,
    SlidingWindowCache,
    available_backends,
    kv_cache_bytes,
    set_attention_backend,
)
from efficientgpt.errors import UserError
from efficientgpt.models.tiny import TINY_FAMILIES, tiny_model

VOCAB = 128


def ids(batch: int = 2, length: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(2, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


# ---- attention backends -------------------------------------------------------------------------


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_eager_and_sdpa_give_the_same_logits(family):
    model = tiny_model(family)
    x = ids()
    assert set_attention_backend(model, "sdpa") == "sdpa"
    sdpa = model(x).logits
    assert set_attention_backend(model, "eager") == "eager"
    assert attention.attention_backend(model) == "eager" == model.config._attn_implementation
    eager = model(x).logits
    torch.testing.assert_close(eager, sdpa, rtol=0, atol=1e-5)


def test_unknown_or_unavailable_backend_is_refused_with_the_list():
    model = tiny_model("llama")
    avail = available_backends(model)
    assert avail["eager"] is None and avail["sdpa"] is None
    assert avail["flash_attention_2"] is not None  # CPU model: never usable here
    with pytest.raises(UserError, match=r"unknown attention backend 'sdpaa'.*did you mean 'sdpa'.*available for "
                                        r"this model: eager, sdpa"):
        set_attention_backend(model, "sdpaa")
    with pytest.raises(UserError, match=r"'flash_attention_2' is not available: .*; available for this model: "
                                        r"eager, sdpa"):
        set_attention_backend(model, "flash")
    assert attention.attention_backend(model) == "sdpa"  # unchanged by the refusals


# ---- KV-cache bytes -----------------------------------------------------------------------------


def test_kv_cache_bytes_closed_form():
    llama = tiny_model("llama")  # 2 layers, 4 heads, 2 kv heads, head_dim 8
    assert kv_cache_bytes(llama, 1) == 2 * 2 * 2 * 8 * 4
    assert kv_cache_bytes(llama, 100, torch.bfloat16, batch=3) == 2 * 2 * 2 * 8 * 2 * 100 * 3
    gpt2 = tiny_model("gpt2", layers=3)  # multi-head: kv heads = heads = 4
    assert kv_cache_bytes(gpt2, 10) == 2 * 3 * 4 * 8 * 4 * 10


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_kv_cache_bytes_equals_what_a_full_cache_holds(family):
    model = tiny_model(family)
    cache = DynamicCache()
    with torch.no_grad():
        model(ids(3, 17), cache=cache, use_cache=True)
    assert attention.cache_nbytes(cache) == kv_cache_bytes(model, 17, batch=3)


# ---- GQA conversion -----------------------------------------------------------------------------


def hand_pooled_reference(original, family: str, groups: int, **kw):
    """A fresh model with ``groups`` kv heads whose k/v weights average the original's per query head,
    computed with explicit loops (independent of the vectorised code under test)."""
    heads = original.config.num_attention_heads
    kv = original.config.num_key_value_heads
    hd = original.config.hidden_size // heads
    ref = tiny_model(family, kv_heads=groups, seed=123, **kw)
    sd = state(original)
    for key, t in list(sd.items()):
        if not any(f"self_attn.{p}_proj." in key for p in "kv"):
            continue
        rows = []
        per_group = heads // groups
        for g in range(groups):
            acc = torch.zeros_like(t[:hd])
            for h in range(g * per_group, (g + 1) * per_group):
                src = h // (heads // kv)  # the kv head query head h reads (transformers' repeat_kv)
                acc += t[src * hd:(src + 1) * hd]
            rows.append(acc / per_group)
        sd[key] = torch.cat(rows)
    ref.load_state_dict(sd)
    return ref


@pytest.mark.parametrize("family,kv,groups", [("llama", 4, 2), ("llama", 4, 1), ("qwen2", 2, 1), ("qwen2", 4, 2)])
def test_converted_logits_equal_a_hand_averaged_reference(family, kv, groups):
    model = tiny_model(family, kv_heads=kv)
    ref = hand_pooled_reference(model, family, groups)
    x = ids()
    before = model(x).logits
    result = attention.apply(model, GQAConfig(kv_heads=groups))
    assert model.config.num_key_value_heads == groups
    assert model.model.layers[0].self_attn.k_proj.weight.shape == (groups * 8, 32)
    torch.testing.assert_close(model(x).logits, ref(x).logits, rtol=0, atol=1e-6)
    assert (model(x).logits - before).abs().max() > 1e-3  # pooling distinct heads changes the model
    a = result.achieved
    assert (a["heads"], a["kv_heads_before"], a["kv_heads"], a["group_size"]) == (4, kv, groups, 4 // groups)
    assert a["kv_bytes_per_token_before"] == 2 * 2 * kv * 8 * 4
    assert a["kv_bytes_per_token_after"] == 2 * 2 * groups * 8 * 4
    bias = family == "qwen2"
    assert a["kv_parameters_before"] == 2 * 2 * (kv * 8 * 32 + bias * kv * 8)
    assert a["kv_parameters_after"] == 2 * 2 * (groups * 8 * 32 + bias * groups * 8)


@pytest.mark.parametrize("family,kv", [("llama", 4), ("qwen2", 2)])
def test_group_size_unchanged_is_the_identity(family, kv):
    model = tiny_model(family, kv_heads=kv)
    x = ids()
    before, weights = model(x).logits, state(model)
    result = attention.apply(model, GQAConfig(kv_heads=kv))
    assert torch.equal(model(x).logits, before)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert result.achieved["kv_cache_ratio"] == 1.0
    assert result.achieved["k_pool_error_mean"] == 0.0


@pytest.mark.parametrize("family,kv,bad,allowed", [("llama", 4, 3, "1, 2, 4"), ("llama", 4, 8, "1, 2, 4"),
                                                   ("qwen2", 2, 4, "1, 2")])
def test_bad_kv_heads_is_refused_before_any_weight_changes(family, kv, bad, allowed):
    model = tiny_model(family, kv_heads=kv)
    weights = state(model)
    with pytest.raises(UserError, match=rf"kv_heads = {bad} is not allowed.*must divide 4 and be at most {kv}; "
                                        rf"allowed: {allowed}$"):
        attention.apply(model, GQAConfig(kv_heads=bad))
    assert model.config.num_key_value_heads == kv
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("family", ["gpt2", "opt", "gpt_neox"])
def test_families_without_kv_head_counts_are_refused(family):
    model = tiny_model(family)
    weights = state(model)
    with pytest.raises(UserError, match=rf"gqa supports model types llama, mistral, qwen2, qwen3, not '{family}'"):
        attention.apply(model, GQAConfig(kv_heads=2))
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def test_config_bounds():
    with pytest.raises(UserError, match="kv_heads = 0 is out of range"):
        GQAConfig(kv_heads=0).validate()
    with pytest.raises(UserError, match="uptrain_steps = -1 is out of range"):
        GQAConfig(uptrain_steps=-1).validate()


def test_saved_model_reloads_with_plain_automodel(tmp_path):
    model = tiny_model("llama", kv_heads=4)
    attention.apply(model, GQAConfig(kv_heads=1))
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert again.config.num_key_value_heads == 1
    x = ids()
    assert torch.equal(again(x).logits, model(x).logits)


def test_uptraining_without_a_tokenizer_is_refused_before_any_weight_changes():
    model = tiny_model("llama", kv_heads=4)  # built from a config: no directory, no tokenizer
    weights = state(model)
    with pytest.raises(UserError, match="uptraining needs the model's tokenizer"):
        attention.apply(model, GQAConfig(kv_heads=1, uptrain_steps=2))
    assert model.config.num_key_value_heads == 4
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def test_uptraining_recovers_loss_after_mqa_conversion(tiny_embedded_path):
    from efficientgpt.data import sources, tokens
    from efficientgpt.eval.perplexity import perplexity

    def load():
        return AutoModelForCausalLM.from_pretrained(tiny_embedded_path).eval()

    tok = AutoTokenizer.from_pretrained(tiny_embedded_path)
    val = tokens.encode(tok, sources.load_text("embedded:prose", "validation"))[:4096]
    plain, uptrained = load(), load()
    attention.apply(plain, GQAConfig(kv_heads=1))
    uptrained.model.layers[0].mlp.up_proj.weight.requires_grad_(False)  # flags are restored afterwards
    result = attention.apply(uptrained, GQAConfig(kv_heads=1, uptrain_steps=12, uptrain_lr=1e-3,
                                                  uptrain_batch_size=8, uptrain_seq_len=32))
    assert not uptrained.model.layers[0].mlp.up_proj.weight.requires_grad
    assert not uptrained.training
    assert result.achieved["uptrain_steps"] == 12 and result.achieved["uptrain_tokens"] == 12 * 8 * 31
    loss_plain = perplexity(plain, val, 64, batch_size=16).loss
    loss_up = perplexity(uptrained, val, 64, batch_size=16).loss
    assert loss_up < loss_plain - 0.01, (loss_plain, loss_up)


# ---- bounded KV caches --------------------------------------------------------------------------


def _stream(model, cache, tokens: torch.Tensor, prefill: int):
    """Feed ``tokens`` (1, N): a prefill, then one token at a time; yields (t, logits of token t)."""
    with torch.no_grad():
        out = model(tokens[:, :prefill], cache=cache, use_cache=True)
        yield prefill - 1, out.logits[0, -1]
        for t in range(prefill, tokens.shape[1]):
            yield t, model(tokens[:, t:t + 1], cache=cache, use_cache=True).logits[0, -1]


def _kept(t: int, sink: int, window: int) -> list[int]:
    """Positions a cache of ``sink`` + ``window`` holds when token ``t`` is the query (written from the
    paper's rule: the first ``sink`` tokens and the ``window`` most recent before ``t``)."""
    seen = list(range(t))
    return seen if t <= sink + window else seen[:sink] + seen[t - window:]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("cls", ["sink", "window"])
def test_cache_never_holds_more_than_sink_plus_window(family, cls):
    model = tiny_model(family, max_positions=128)
    window, sink = 6, (3 if cls == "sink" else 0)
    make = (lambda: SinkCache(model, window=window, sink=sink)) if cls == "sink" else \
        (lambda: SlidingWindowCache(model, window=window))
    cache = make()
    x = ids(1, 4 + 3 * window)
    for t, _ in _stream(model, cache, x, prefill=4):
        seen = t + 1
        for layer in range(model.config.num_hidden_layers):
            assert cache.stored_length(layer) == min(seen, sink + window)
        assert cache.get_seq_length() == seen
    assert cache.nbytes() == kv_cache_bytes(model, sink + window)
    # generate() drives the same cache past the window (greedy, 3 windows of new tokens)
    cache = make()
    out = model.generate(ids(2, 5), cache=cache, max_new_tokens=3 * window, min_new_tokens=3 * window,
                         do_sample=False, pad_token_id=1, attention_mask=torch.ones(2, 5, dtype=torch.long))
    assert out.shape == (2, 5 + 3 * window)
    assert cache.stored_length() == sink + window
    assert cache.nbytes() == kv_cache_bytes(model, sink + window, batch=2)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_cache_equals_the_full_cache_until_it_evicts(family):
    model = tiny_model(family)
    x = ids(1, 12)
    full = [logits for _, logits in _stream(model, DynamicCache(), x, prefill=3)]
    sink = [logits for _, logits in _stream(model, SinkCache(model, window=8, sink=4), x, prefill=3)]
    for a, b in zip(full, sink):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt_neox"])
@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_rolling_positions_equal_recomputing_the_kept_tokens_at_cache_positions(family, backend):
    """With one layer, keys and values depend only on each token and its RoPE position, so StreamingLLM's
    output for token t equals a no-cache forward over [kept tokens, t] at positions 0..len (§3.2)."""
    model = tiny_model(family, layers=1, max_positions=256)
    set_attention_backend(model, backend)
    sink, window = 2, 5
    x = ids(1, 20, seed=1)
    worst = {True: 0.0, False: 0.0}
    for rolling in (True, False):
        cache = SinkCache(model, window=window, sink=sink, rolling=rolling)
        for t, logits in _stream(model, cache, x, prefill=3):
            if t < 3:
                continue
            with torch.no_grad():
                ref = model(x[:, _kept(t, sink, window) + [t]]).logits[0, -1]
            worst[rolling] = max(worst[rolling], (logits - ref).abs().max().item())
    assert worst[True] < 1e-5
    assert worst[False] > 1e-4  # without rolling the sinks sit at their original distance: different


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_chunks_after_eviction_see_the_kept_cache_and_are_causal_among_themselves(backend):
    model = tiny_model("llama", layers=1, max_positions=256)
    set_attention_backend(model, backend)
    sink, window, chunk = 2, 5, 3
    x = ids(1, 4 + 5 * chunk, seed=4)
    cache = SinkCache(model, window=window, sink=sink)
    with torch.no_grad():
        model(x[:, :4], cache=cache, use_cache=True)
        for start in range(4, x.shape[1], chunk):
            logits = model(x[:, start:start + chunk], cache=cache, use_cache=True).logits[0]  # (chunk, V)
            kept = _kept(start, sink, window)
            ref = model(x[:, kept + list(range(start, start + chunk))]).logits[0, len(kept):]
            torch.testing.assert_close(logits, ref, rtol=0, atol=1e-5)
            assert cache.stored_length() == sink + window


@pytest.mark.parametrize("family", ["gpt2", "opt"])
def test_learned_positions_keep_the_original_positions(family):
    model = tiny_model(family, layers=1, max_positions=64)
    cache = SinkCache(model, window=5, sink=2)
    assert not cache.rolling
    x = ids(1, 30, seed=2)
    for t, logits in _stream(model, cache, x, prefill=3):
        kept = _kept(t, 2, 5) + [t]
        with torch.no_grad():
            ref = model(x[:, kept], position_ids=torch.tensor([kept])).logits[0, -1]
        torch.testing.assert_close(logits, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_sliding_window_equals_recomputing_the_window(family):
    model = tiny_model(family, layers=1, max_positions=64)
    window = 6
    x = ids(1, 30, seed=3)
    for t, logits in _stream(model, SlidingWindowCache(model, window=window), x, prefill=2):
        kept = list(range(max(0, t - window), t + 1))
        with torch.no_grad():  # RoPE sees only distances, so positions 0..len do; learned positions need the originals
            pos = torch.tensor([kept]) if family == "gpt2" else None
            ref = model(x[:, kept], position_ids=pos).logits[0, -1]
        torch.testing.assert_close(logits, ref, rtol=0, atol=1e-5)


def test_rerotation_composes_with_transformers_rope():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model = tiny_model("llama")
    rope = model.model.rotary_emb
    k = torch.randn(1, 2, 3, 8, generator=torch.Generator().manual_seed(0))
    pos = torch.tensor([[0, 1, 2]])
    cos, sin = rope(k, pos)
    at_p = apply_rotary_pos_emb(k, k, cos, sin)[1]
    cos, sin = rope(k, pos + 37)
    at_p_37 = apply_rotary_pos_emb(k, k, cos, sin)[1]
    torch.testing.assert_close(attention.rerotate(at_p, 37, rope.inv_freq), at_p_37, rtol=0, atol=1e-5)


def test_cache_arguments_are_checked():
    llama, gpt2 = tiny_model("llama"), tiny_model("gpt2")
    with pytest.raises(UserError, match="window = 0 is not allowed"):
        SinkCache(llama, window=0)
    with pytest.raises(UserError, match="sink = -1 is not allowed"):
        SinkCache(llama, window=4, sink=-1)
    with pytest.raises(UserError, match="rolling positions need RoPE keys; model type 'gpt2'"):
        SinkCache(gpt2, window=4, rolling=True)
    with pytest.raises(NotImplementedError, match="cannot be cropped"):
        SinkCache(llama, window=4).layers[0].crop(-1)


# ---- registration and the command line ----------------------------------------------------------


def test_registered_in_the_attention_family():
    spec = registry.get("gqa")
    assert spec is attention.SPEC
    assert (spec.family, spec.paper, spec.calibration, spec.config_cls) == ("attention", "gqa", False, GQAConfig)


def test_cli_compress_gqa_then_eval(tiny_embedded_path, tmp_path, capsys):
    from efficientgpt.cli import main

    out = tmp_path / "G"
    assert main(["compress", "--model", "embedded:tiny", "--method", "gqa", "--kv-heads", "1", "--out", str(out),
                 "--eval-tokens", "4096", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    a = s["achieved"]
    # embedded:tiny: 2 layers, 4 heads of 16, multi-head, fp32
    assert (a["kv_heads_before"], a["kv_heads"]) == (4, 1)
    assert a["kv_bytes_per_token_before"] == 2 * 2 * 4 * 16 * 4 and a["kv_bytes_per_token_after"] == 2 * 2 * 1 * 16 * 4
    assert s["size_before"]["parameters"] - s["size_after"]["parameters"] == 2 * 2 * 3 * 16 * 64
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.num_key_value_heads == 1
    assert main(["eval", "--model", str(out), "--data", "embedded:prose", "--max-tokens", "4096", "--json"]) == 0
    e = json.loads(capsys.readouterr().out)
    assert e["model"]["parameters"] == s["size_after"]["parameters"]
    assert e["perplexity"] == pytest.approx(s["eval"]["ppl_after"], rel=1e-5)
