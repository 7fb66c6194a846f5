"""DyLoRA: truncation and α/b scaling against a closed form, rank sampling, the frozen and update_all
update rules under real AdamW, merging and export at any rank, and a short training run."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from efficientgpt.data.tokens import WindowSampler
from efficientgpt.errors import ConfigError, UserError
from efficientgpt.models import arch
from efficientgpt.models.tiny import tiny_model
from efficientgpt.peft import core
from efficientgpt.peft.dylora import DyLoraConfig, DyLoraDelta, loss_per_rank, sample_rank, to_lora_state
from efficientgpt.peft.lora import LoraConfig
from efficientgpt.train.losses import causal_lm_loss
from efficientgpt.train.trainer import TrainConfig, Trainer

sys.path.insert(0, str(Path(__file__).parent))
from train_script import stream  # noqa: E402

IDS = torch.randint(2, 128, (2, 10), generator=torch.Generator().manual_seed(3))
R = 4
ALPHA = 6.0


def _attached(family="llama", **cfg) -> tuple[torch.nn.Module, DyLoraDelta]:
    model = tiny_model(family, seed=0)
    torch.manual_seed(0)
    delta = core.apply(model, "dylora", DyLoraConfig(**{"targets": ["q", "v"], "rank": R, "alpha": ALPHA, **cfg}))
    return model, delta


def _perturb(delta, seed=0):
    """Give every component (B included) distinct non-zero values, so each one matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in delta.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))


def _snapshot(delta):
    return {n: p.detach().clone() for n, p in delta.modules.named_parameters()}


def _component(name: str) -> int:
    """Index i (0-based) of a parameter named ``<key>.A.<i>`` or ``<key>.B.<i>``."""
    return int(name.rsplit(".", 1)[1])


def _reference_delta_weights(model, delta, b):
    """Per adapted module: ΔW (nn.Linear orientation) = (α/b) Σ_{i<=b} B_i A_i, fused roles placed at
    their output features. Reads the components directly; no DyLoRA code involved."""
    out = {}
    for t in arch.resolve(model, ["q", "v"]):
        key = core.target_key(t.name, t.role if t.out_index is not None else None)
        comp = delta.modules[key]
        dw = sum(comp.B[i].detach() @ comp.A[i].detach() for i in range(b)) * (ALPHA / b)  # (d_out_role, d_in)
        d_in, d_out = arch.linear_shape(t.module)
        full = out.setdefault(t.name, torch.zeros(d_out, d_in))
        if t.out_index is None:
            full += dw
        else:
            full[t.out_index] += dw
    return out


# ---- config -------------------------------------------------------------------------------------
@pytest.mark.parametrize(("kwargs", "match"), [
    ({"rank": 0}, "rank = 0"),
    ({"alpha": 0.0}, "alpha = 0.0"),
    ({"min_rank": 5, "rank": 4}, "min_rank = 5"),
    ({"min_rank": 0}, "min_rank = 0"),
    ({"mode": "all"}, "mode = 'all'.*frozen, update_all"),
    ({"init": "zeros"}, "init = 'zeros'"),
    ({"dropout": 1.0}, "dropout = 1.0"),
    ({"seed": -1}, "seed = -1"),
])
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        DyLoraConfig(**kwargs).validate()


# ---- evaluation at any rank ---------------------------------------------------------------------
@pytest.mark.parametrize("family", ["gpt2", "llama", "gpt_neox"])
def test_rank_b_uses_exactly_b_components_with_scaling_alpha_over_b(family):
    """Closed form: each adapted module outputs W0 x + (α/b) Σ_{i<=b} B_i A_i x (fused q/v roles on
    their own output features; GPT-2's Conv1D included), and merging at rank b adds exactly that ΔW."""
    model, delta = _attached(family)
    _perturb(delta)
    x = torch.randn(3, 5, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    names = sorted({t.name for t in arch.resolve(model, ["q", "v"])})
    with core.disable(model):
        base = {n: model.get_submodule(n)(x) for n in names}
    assert delta.current_rank == R  # eval mode, no rank set: r_max
    for b in range(1, R + 1):
        delta.set_rank(b)
        assert delta.current_rank == b == delta.eval_rank
        ref = _reference_delta_weights(model, delta, b)
        with torch.no_grad():
            for n in names:
                torch.testing.assert_close(model.get_submodule(n)(x), base[n] + x @ ref[n].T, atol=1e-5, rtol=0)
            weights = {n: arch.linear_weight(model.get_submodule(n)).detach().clone() for n in names}
            delta.merge()
            for n in names:
                merged = arch.linear_weight(model.get_submodule(n))  # (out, in) view, Conv1D too
                torch.testing.assert_close(merged - weights[n], ref[n], atol=1e-6, rtol=0)
            delta.unmerge()
            for n in names:
                torch.testing.assert_close(arch.linear_weight(model.get_submodule(n)), weights[n], atol=1e-6, rtol=0)
    # Components above b are unused: changing them changes nothing at rank b.
    delta.set_rank(2)
    with torch.no_grad():
        before = model(IDS).logits
        for comp in delta.modules.values():
            comp.A[3].mul_(-5.0)
            comp.B[2].mul_(3.0)
        torch.testing.assert_close(model(IDS).logits, before, atol=0, rtol=0)


def test_set_rank_range_and_default():
    model, delta = _attached()
    for bad in (0, R + 1, -1, 2.0, True, "2"):
        with pytest.raises(UserError, match=f"1 to r_max = {R}"):
            delta.set_rank(bad)
    delta.set_rank(2)
    assert delta.current_rank == 2
    delta.set_rank(None)
    assert delta.current_rank == R == delta.max_rank


def test_merged_delta_follows_set_rank_and_unmerges_exactly():
    model, delta = _attached("gpt2")
    _perturb(delta)
    base_weights = {n: p.detach().clone() for n, p in model.named_parameters() if not n.startswith(core.DELTA_ROOT)}
    with torch.no_grad():
        unmerged = {}
        for b in (1, 3):
            delta.set_rank(b)
            unmerged[b] = model(IDS).logits
        assert (unmerged[1] - unmerged[3]).abs().max() > 1e-4
        delta.merge()
        torch.testing.assert_close(model(IDS).logits, unmerged[3], atol=1e-5, rtol=0)
        delta.set_rank(1)  # re-folds at the new rank
        torch.testing.assert_close(model(IDS).logits, unmerged[1], atol=1e-5, rtol=0)
        delta.unmerge()
    for n, p in model.named_parameters():
        if n in base_weights:
            torch.testing.assert_close(p, base_weights[n], atol=1e-6, rtol=0, msg=n)


def test_save_load_round_trips_every_rank(tmp_path):
    model, delta = _attached("opt")
    _perturb(delta)
    core.save_delta(delta, tmp_path / "d")
    fresh = tiny_model("opt", seed=0)
    loaded = core.load_delta(fresh, tmp_path / "d")
    assert isinstance(loaded, DyLoraDelta)
    with torch.no_grad():
        for b in range(1, R + 1):
            delta.set_rank(b)
            loaded.set_rank(b)
            torch.testing.assert_close(fresh(IDS).logits, model(IDS).logits, atol=0, rtol=0)


@pytest.mark.parametrize("b", [R, 2])
def test_export_as_plain_lora_reproduces_outputs(b):
    model, delta = _attached("gpt2")
    _perturb(delta)
    delta.set_rank(b)
    lora_cfg, state = to_lora_state(delta)
    assert lora_cfg.rank == b and lora_cfg.alpha == ALPHA and lora_cfg.scaling == ALPHA / b
    fresh = tiny_model("gpt2", seed=0)
    lora = core.apply(fresh, "lora", lora_cfg)
    lora.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(fresh(IDS).logits, model(IDS).logits, atol=1e-6, rtol=0)
    full_cfg, full_state = to_lora_state(delta, rank=R)  # the full-rank export: scaling α/r_max
    assert full_cfg.rank == R and full_cfg.scaling == ALPHA / R
    assert {tuple(v.shape) for k, v in full_state.items() if k.endswith(".A")} == {(R, 32)}
    with pytest.raises(UserError, match="rank 5"):
        to_lora_state(delta, rank=R + 1)


def test_init_matches_lora_under_the_same_seed():
    model, delta = _attached("llama")
    lora_model = tiny_model("llama", seed=0)
    torch.manual_seed(0)
    lora = core.apply(lora_model, "lora", LoraConfig(targets=["q", "v"], rank=R, alpha=ALPHA))
    for key, pair in lora.modules.items():
        comp = delta.modules[key]
        assert torch.equal(torch.cat(list(comp.A), 0), pair.A) and torch.equal(torch.cat(list(comp.B), 1), pair.B)
        assert not pair.B.any()


# ---- rank sampling --------------------------------------------------------------------------------
def test_sampling_is_deterministic_per_seed_and_step_and_uniform():
    draws = [sample_rank(7, s, 1, R) for s in range(4000)]
    assert draws == [sample_rank(7, s, 1, R) for s in range(4000)]
    assert draws != [sample_rank(8, s, 1, R) for s in range(4000)]
    counts = np.bincount(draws, minlength=R + 1)[1:]
    assert counts.sum() == 4000 and np.all(np.abs(counts - 1000) < 120), counts  # ~4 sigma
    assert set(sample_rank(0, s, 2, R) for s in range(200)) == {2, 3, 4}
    # The delta draws through the same function; two deltas (two DDP processes) agree step by step.
    (_, d1), (_, d2) = _attached(seed=7), _attached(seed=7)
    for s in (0, 5, 123):
        d1.on_step_begin(s)
        d2.on_step_begin(s)
        assert d1.sampled_rank == d2.sampled_rank == draws[s]


def test_training_forward_without_a_sampled_rank_is_refused():
    model, delta = _attached()
    model.train()
    with pytest.raises(UserError, match="on_step_begin"):
        model(IDS)
    with torch.no_grad():  # no gradient: evaluation at the evaluation rank is fine
        model(IDS)
    delta.on_step_begin(0)
    assert delta.current_rank == delta.sampled_rank
    model.eval()
    assert delta.current_rank == R


# ---- update rules under AdamW with weight decay and momentum ---------------------------------------
def _step_with_rank(seed, b):
    return next(s for s in range(10_000) if sample_rank(seed, s, 1, R) == b)


def _adamw_run(mode: str, b_last: int):
    """Several AdamW steps (weight decay 0.1) so that every component has momentum, then one step of
    rank ``b_last``; returns the delta, the optimizer and the parameters before and after it."""
    model, delta = _attached("gpt2", mode=mode, seed=3)
    _perturb(delta)
    opt = torch.optim.AdamW(delta.parameters(), lr=1e-2, weight_decay=0.1)
    model.train()

    def step(s):
        delta.on_step_begin(s)
        loss, n = causal_lm_loss(model, {"input_ids": IDS})
        (loss / n).backward()
        grads = {name: p.grad is not None for name, p in delta.modules.named_parameters()}
        opt.step()
        opt.zero_grad(set_to_none=True)
        return grads

    for b in range(R, 0, -1):  # ranks R..1 once each: every component gets optimizer state
        step(_step_with_rank(3, b))
    for p in delta.parameters():
        assert opt.state[p]["exp_avg"].abs().sum() > 0  # momentum that would move it if it were stepped
    before = _snapshot(delta)
    grads = step(_step_with_rank(3, b_last))
    assert delta.sampled_rank == b_last
    return delta, before, _snapshot(delta), grads


@pytest.mark.parametrize("b", [1, 3])
def test_frozen_mode_moves_only_component_b(b):
    delta, before, after, grads = _adamw_run("frozen", b)
    for name in before:
        moved = not torch.equal(before[name], after[name])
        if _component(name) == b - 1:
            assert moved and grads[name], name
        else:
            assert not moved and not grads[name], name  # bit-identical despite momentum and decay


@pytest.mark.parametrize("b", [2, 3])
def test_update_all_mode_moves_components_1_to_b_only(b):
    delta, before, after, grads = _adamw_run("update_all", b)
    for name in before:
        moved = not torch.equal(before[name], after[name])
        assert moved == grads[name] == (_component(name) < b), name


# ---- training ------------------------------------------------------------------------------------------
# On a random tiny base, adapters on q and v alone barely move the loss in a few steps (the attention
# output is damped by the random o_proj); the LM head (matched by name) gives a measurable signal.
TRAIN_TARGETS = ["q", "v", "lm_head"]


def _train(steps, out_dir=None, resume=False, save_every=0):
    torch.set_num_threads(1)
    model, delta = _attached("llama", targets=TRAIN_TARGETS, rank=R, alpha=2.0 * R, seed=11)
    data = stream()
    cfg = TrainConfig(steps=steps, batch_size=8, seq_len=16, lr=2e-2, warmup_steps=0, weight_decay=0.01,
                      log_every=1, progress=False, seed=0, save_every=save_every)
    trainer = Trainer(model, cfg, WindowSampler(data, 16, 8, seed=1), out_dir=out_dir,
                      fingerprint={"data": "synthetic-v1"}, step_callbacks=[delta.on_step_begin])
    return model, delta, trainer, trainer.train(resume=resume)


def test_short_training_lowers_the_loss_at_every_rank():
    held_out = WindowSampler(stream(seed=5), 16, 16, seed=2)
    batches = [held_out(0), held_out(1)]
    model, delta = _attached("llama", targets=TRAIN_TARGETS, rank=R, alpha=2.0 * R, seed=11)
    untrained = loss_per_rank(model, delta, batches)
    assert len(set(untrained.values())) == 1  # B = 0: every rank is the base model
    model, delta, _, result = _train(100)
    losses = [c["loss"] for c in result.curve]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.1, losses
    trained = loss_per_rank(model, delta, batches)
    print("DyLoRA held-out loss per rank:", {b: round(v, 4) for b, v in trained.items()},
          "untrained:", round(untrained[1], 4))
    assert sorted(trained) == list(range(1, R + 1))
    assert trained[R] < untrained[R] - 0.1
    assert all(v < untrained[b] for b, v in trained.items())
    assert delta.current_rank == R and not model.training  # loss_per_rank restored the evaluation state
    # Every component trained (each rank was drawn), so every B_i left its zero initialisation.
    assert all(comp.B[i].abs().sum() > 0 for comp in delta.modules.values() for i in range(R))


def test_resumed_training_draws_the_same_ranks(tmp_path):
    """A run resumed at step 3 ends bit-identical to an uninterrupted one: the ranks of steps 3..5
    are drawn again from (seed, step), and never-stepped components resume without optimizer state."""
    _, full, _, _ = _train(6, out_dir=tmp_path / "a", save_every=3)
    _, resumed, _, res = _train(6, out_dir=tmp_path / "b", resume=tmp_path / "a" / "checkpoints" / "step-00000003")
    assert res.resumed_from == 3
    for name, p in full.modules.named_parameters():
        torch.testing.assert_close(resumed.modules.get_parameter(name), p, atol=0, rtol=0, msg=name)


def test_full_rank_export_loads_in_peft(tmp_path):
    peft = pytest.importorskip("peft")
    import copy

    from efficientgpt.peft import hf_peft

    base = tiny_model("gpt2", seed=4)
    model = copy.deepcopy(base)
    delta = core.apply(model, "dylora", DyLoraConfig(targets=["q", "v"], rank=3, alpha=6.0))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in delta.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    model.eval()
    ids = torch.randint(2, 128, (2, 9), generator=g)
    with torch.no_grad():
        expected = model(ids).logits
    hf_peft.export_peft(delta, tmp_path / "p")
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "p")
    with torch.no_grad():
        torch.testing.assert_close(pm(input_ids=ids).logits, expected, atol=1e-5, rtol=0)
