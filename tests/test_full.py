"""Full fine-tuning in the delta protocol: what trains (closed forms), saving and loading the trained
weights, training moves every weight, and how the base model comes back (disable, inactive, remove)."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

from efficientgpt.data.tokens import WindowSampler
from efficientgpt.errors import UserError
from efficientgpt.models.tiny import tiny_model
from efficientgpt.peft import core
from efficientgpt.peft.full import FullConfig
from efficientgpt.peft.lora import LoraConfig
from efficientgpt.train.losses import causal_lm_loss
from efficientgpt.train.trainer import TrainConfig, Trainer
from train_script import stream

IDS = torch.randint(2, 128, (2, 10), generator=torch.Generator().manual_seed(4))
V, D, L, INTER, POS = 128, 32, 2, 64, 64  # the tiny models' shapes (models/tiny.py)


def _gpt2_counts():
    block = (2 * D) + (D * 3 * D + 3 * D) + (D * D + D) + (2 * D) + (D * INTER + INTER) + (INTER * D + D)
    embeddings = V * D + POS * D  # wte (= lm_head, tied) and wpe
    norms = L * 4 * D + 2 * D  # ln_1, ln_2 per block (weight, bias), ln_f
    return {"all": embeddings + L * block + 2 * D, "embeddings": embeddings, "norms": norms}


def _llama_counts():
    kv = 2 * (D // 4)  # 2 kv heads of head_dim 8
    block = D + (D * D + 2 * D * kv + D * D) + D + 3 * D * INTER
    embeddings = 2 * V * D  # embed_tokens and an untied lm_head
    norms = L * 2 * D + D
    return {"all": embeddings + L * block + D, "embeddings": embeddings, "norms": norms}


def _perturb(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize(("family", "counts"), [("gpt2", _gpt2_counts()), ("llama", _llama_counts())])
def test_trainable_count_is_every_parameter_tied_once(family, counts):
    for cfg, expected in (
        (FullConfig(), counts["all"]),
        (FullConfig(train_embeddings=False), counts["all"] - counts["embeddings"]),
        (FullConfig(train_norms=False), counts["all"] - counts["norms"]),
    ):
        model = tiny_model(family)
        delta = core.apply(model, "full", cfg)
        got = core.count_parameters(model)
        assert got["trainable"] == expected, (cfg, got)
        assert got["total"] == counts["all"]
        assert delta.describe()["trainable_parameters"] == expected
    model = tiny_model(family)
    core.apply(model, "full", FullConfig(train_embeddings=False))
    assert not model.get_input_embeddings().weight.requires_grad
    assert not model.get_output_embeddings().weight.requires_grad


def test_training_changes_every_weight_and_lowers_the_loss():
    torch.manual_seed(0)
    model = tiny_model("opt")
    core.apply(model, "full", FullConfig())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    data = stream(4000)
    probe = WindowSampler(stream(4000, seed=1), 16, 16, seed=2)(0)

    def loss():
        with torch.no_grad():
            s, n = causal_lm_loss(model, probe)
        return (s / n).item()

    start = loss()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = TrainConfig(steps=15, batch_size=8, seq_len=16, lr=1e-2, warmup_steps=2, progress=False, seed=0)
        Trainer(model, cfg, WindowSampler(data, 16, 8, seed=1)).train()
    finally:
        torch.set_num_threads(threads)
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p, before[n])]
    assert not unchanged, unchanged
    assert loss() < start - 0.3


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_save_load_round_trip(family, tmp_path):
    model = tiny_model(family)
    delta = core.apply(model, "full", FullConfig())
    _perturb(model)
    with torch.no_grad():
        tuned = model(IDS).logits
    core.save_delta(delta, tmp_path / "d")
    saved = load_file(tmp_path / "d" / core.DELTA_FILE)
    assert set(saved) == {n for n, _ in model.named_parameters()}
    if family == "gpt2":  # tied: stored once, under the embedding's name
        assert "transformer.wte.weight" in saved and "lm_head.weight" not in saved
    fresh = tiny_model(family)
    core.load_delta(fresh, tmp_path / "d")
    with torch.no_grad():
        torch.testing.assert_close(fresh(IDS).logits, tuned, atol=0, rtol=0)
    if family == "gpt2":
        assert fresh.lm_head.weight is fresh.transformer.wte.weight  # still tied after loading


def test_partial_config_saves_only_what_trains(tmp_path):
    model = tiny_model("llama")
    delta = core.apply(model, "full", FullConfig(train_embeddings=False, train_norms=False))
    core.save_delta(delta, tmp_path / "d")
    saved = load_file(tmp_path / "d" / core.DELTA_FILE)
    assert "model.embed_tokens.weight" not in saved and "lm_head.weight" not in saved
    assert not any("norm" in n for n in saved)
    assert "model.layers.0.self_attn.q_proj.weight" in saved
    core.load_delta(tiny_model("llama"), tmp_path / "d")
    with pytest.raises(UserError, match=r"missing \['lm_head.weight'"):
        core.apply(tiny_model("llama"), "full", FullConfig()).load_state_dict(saved)


def test_disable_inactive_and_remove_give_the_base_model():
    model = tiny_model("gpt2")
    with torch.no_grad():
        base = model(IDS).logits
    delta = core.apply(model, "full", FullConfig())
    _perturb(model)
    params = {n: p for n, p in model.named_parameters()}
    with torch.no_grad():
        tuned = model(IDS).logits
    assert (tuned - base).abs().max() > 1e-3
    with core.disable(model):
        out = model(IDS).logits  # gradients on: the base weights are frozen stand-ins
        assert not out.requires_grad
        torch.testing.assert_close(out, base, atol=0, rtol=0)
        with pytest.raises(IndexError):
            model(torch.full((1, 3), 10_000))  # a failing forward still puts the trained weights back
    assert all(p is params[n] for n, p in model.named_parameters())  # the same Parameter objects
    assert model.lm_head.weight is model.transformer.wte.weight
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, tuned, atol=0, rtol=0)
        core.set_active(model, [])
        torch.testing.assert_close(model(IDS).logits, base, atol=0, rtol=0)
        core.set_active(model, "default")
        delta.merge()  # a no-op: merged is the fine-tuned model
        torch.testing.assert_close(model(IDS).logits, tuned, atol=0, rtol=0)
        delta.unmerge()
        core.remove(model)
        torch.testing.assert_close(model(IDS).logits, base, atol=0, rtol=0)


def test_inactive_full_under_lora_gives_base_gradients():
    """With full fine-tuning inactive, a LoRA on top trains against the base weights, gradients included."""
    ref = tiny_model("llama")
    model = copy.deepcopy(ref)
    core.apply(model, "full", FullConfig())
    _perturb(model)
    cfg = LoraConfig(targets=["q", "v"], rank=2)
    torch.manual_seed(1)
    lora = core.apply(model, "lora", cfg, name="l")
    torch.manual_seed(1)
    lora_ref = core.apply(ref, "lora", cfg)
    for d in (lora, lora_ref):
        _perturb(d.modules, seed=2)
    core.set_active(model, ["l"])
    grads = []
    for m, d in ((model, lora), (ref, lora_ref)):
        loss, n = causal_lm_loss(m, {"input_ids": IDS})
        (loss / n).backward()
        grads.append([p.grad.clone() for p in d.parameters()])
    for g, g_ref in zip(*grads, strict=True):
        torch.testing.assert_close(g, g_ref, atol=1e-6, rtol=1e-5)


def test_merge_and_unload_keeps_the_fine_tuned_model():
    model = tiny_model("qwen2")
    core.apply(model, "full", FullConfig())
    _perturb(model)
    with torch.no_grad():
        tuned = model(IDS).logits
    core.merge_and_unload(model)
    assert not core.deltas(model) and not hasattr(model, core.DELTA_ROOT)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, tuned, atol=0, rtol=0)


def test_without_a_base_copy_disable_and_remove_refuse():
    model = tiny_model("llama")
    core.apply(model, "full", FullConfig(keep_base=False))
    core.remove(model)  # nothing changed yet: removing is fine
    delta = core.apply(model, "full", FullConfig(keep_base=False))
    _perturb(model)
    with core.disable(model), pytest.raises(UserError, match="keep_base=False"):
        model(IDS)
    with pytest.raises(UserError, match="cannot remove full fine-tuning attached with keep_base=False"):
        delta.remove()


def test_a_second_full_delta_is_refused():
    model = tiny_model("llama")
    core.apply(model, "full", FullConfig())
    with pytest.raises(UserError, match="already attached to this model as 'default'"):
        core.apply(model, "full", FullConfig(), name="again")
    assert set(core.deltas(model)) == {"default"}
