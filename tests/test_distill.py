"""Knowledge distillation: divergences in closed form, gradients, students, teacher cache, on-policy
batches, the distillation job against an LM-only baseline, and the ``efficientgpt distill`` command."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from efficientgpt.compress import distill as kd
from efficientgpt.compress.distill import DistillConfig
from efficientgpt.errors import ConfigError, UserError
from efficientgpt.models import arch
from efficientgpt.models.tiny import TINY_FAMILIES, tiny_model
from efficientgpt.train.config import TrainConfig
from efficientgpt.train.trainer import Trainer

KINDS = ("fkl", "rkl", "skl", "srkl")


def _logits(*shape, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


# ---- divergences --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tau", [1.0, 2.5])
def test_divergence_of_a_distribution_with_itself_is_zero(kind, tau):
    z = _logits(3, 5, 17)
    d = kd.token_divergence(kind, z, z.clone(), temperature=tau, skew=0.3)
    assert d.shape == (3, 5)
    assert d.abs().max().item() < 1e-12
    # And it is positive elsewhere (KL is 0 only at equality).
    assert (kd.token_divergence(kind, z, _logits(3, 5, 17, seed=1), temperature=tau, skew=0.3) > 1e-6).all()


def _two_point(a: float, b: float):
    """Logits of the distributions (a, 1-a) and (b, 1-b)."""
    return (torch.tensor([[math.log(b), math.log(1 - b)]], dtype=torch.float64),
            torch.tensor([[math.log(a), math.log(1 - a)]], dtype=torch.float64))


def _kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


@pytest.mark.parametrize("lam", [0.0, 0.1, 0.5, 1.0])
def test_closed_forms_on_two_points_and_the_degenerate_skews(lam):
    a, b = 0.8, 0.3  # teacher (a, 1-a), student (b, 1-b)
    student, teacher = _two_point(a, b)
    pt, ps = (a, 1 - a), (b, 1 - b)
    mix_f = [lam * t + (1 - lam) * s for t, s in zip(pt, ps)]
    mix_r = [lam * s + (1 - lam) * t for t, s in zip(pt, ps)]
    expect = {"fkl": _kl(pt, ps), "rkl": _kl(ps, pt), "skl": _kl(pt, mix_f), "srkl": _kl(ps, mix_r)}
    for kind, value in expect.items():
        got = kd.token_divergence(kind, student, teacher, skew=lam).item()
        assert got == pytest.approx(value, abs=1e-12), kind
    if lam == 0.0:  # λ = 0: the skewed divergences are the plain ones
        assert expect["skl"] == pytest.approx(expect["fkl"]) and expect["srkl"] == pytest.approx(expect["rkl"])
    if lam == 1.0:  # λ = 1: the mixture is the first argument itself
        assert kd.token_divergence("skl", student, teacher, skew=1.0).item() == 0.0
        assert kd.token_divergence("srkl", student, teacher, skew=1.0).item() == 0.0


def test_temperature_softens_both_distributions():
    a_logits, b_logits = _logits(1, 9, seed=3), _logits(1, 9, seed=4)
    tau = 3.0
    pt = torch.softmax(a_logits[0] / tau, -1).tolist()
    ps = torch.softmax(b_logits[0] / tau, -1).tolist()
    got = kd.token_divergence("fkl", b_logits, a_logits, temperature=tau).item()
    assert got == pytest.approx(_kl(pt, ps), rel=1e-10)


def test_analytic_gradients_of_forward_and_reverse_kl():
    s, t = _logits(4, 11, seed=5).requires_grad_(True), _logits(4, 11, seed=6)
    tau = 2.0
    # d/dz_S [τ² KL(p_T^τ ‖ p_S^τ)] = τ (p_S^τ − p_T^τ)   (Hinton et al. 2015, §2.1)
    (tau**2 * kd.token_divergence("fkl", s, t, temperature=tau)).sum().backward()
    expect = tau * (torch.softmax(s.detach() / tau, -1) - torch.softmax(t / tau, -1))
    torch.testing.assert_close(s.grad, expect, rtol=1e-10, atol=1e-12)
    # d/dz_S KL(p_S ‖ p_T) = p_S ⊙ (log p_S − log p_T − KL)
    s.grad = None
    r = kd.token_divergence("rkl", s, t)
    r.sum().backward()
    log_ps, log_pt = F.log_softmax(s.detach(), -1), F.log_softmax(t, -1)
    expect = log_ps.exp() * (log_ps - log_pt - r.detach()[:, None])
    torch.testing.assert_close(s.grad, expect, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_moving_the_student_toward_the_teacher_lowers_every_divergence(kind):
    s, t = _logits(6, 13, seed=7), _logits(6, 13, seed=8)
    direction = t - s

    def f(eps):
        return kd.token_divergence(kind, s + eps * direction, t, temperature=1.5, skew=0.2)

    x = s.clone().requires_grad_(True)
    kd.token_divergence(kind, x, t, temperature=1.5, skew=0.2).sum().backward()
    analytic = (x.grad * direction).sum(-1)  # (6,) directional derivatives
    eps = 1e-6
    finite = (f(eps) - f(-eps)) / (2 * eps)
    torch.testing.assert_close(analytic, finite, rtol=1e-5, atol=1e-8)
    assert (analytic < 0).all()
    assert (f(0.1) < f(0.0)).all() and (f(1.0).abs() < 1e-12).all()


def test_model_with_itself_scores_zero_and_alpha_mixes_the_lm_loss():
    model = tiny_model("llama", seed=0)
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    for kind in KINDS:
        dist = kd.Distiller(model, DistillConfig(loss=kind, alpha=1.0, temperature=2.0))
        loss, count = dist({"input_ids": ids, "teacher_logits": logits})
        assert count.item() == 2 * 9 and abs(loss.item()) < 1e-5, kind
    # α = 0 is the plain next-token loss, whatever the teacher says.
    from efficientgpt.train.losses import causal_lm_loss

    dist = kd.Distiller(model, DistillConfig(loss="fkl", alpha=0.0))
    loss, _ = dist({"input_ids": ids, "teacher_logits": torch.randn_like(logits)})
    assert loss.item() == pytest.approx(causal_lm_loss(model, {"input_ids": ids})[0].item(), rel=1e-6)


def test_loss_is_the_sum_over_scored_tokens_and_their_count():
    model = tiny_model("gpt2", seed=1)
    ids = torch.randint(0, 128, (3, 9), generator=torch.Generator().manual_seed(5))
    labels = ids.clone()
    labels[0, :5] = -100
    labels[2, 3:7] = -100
    teacher_logits = _logits(3, 9, 128, seed=9).float()
    config = DistillConfig(loss="srkl", alpha=0.7, temperature=1.5, skew=0.2)
    loss, count = kd.Distiller(model, config)({"input_ids": ids, "labels": labels, "teacher_logits": teacher_logits})
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    expect, n = 0.0, 0
    for b in range(3):
        for t in range(8):
            if labels[b, t + 1] == -100:
                continue
            d = kd.token_divergence("srkl", logits[b, t], teacher_logits[b, t], 1.5, 0.2).item()
            ce = -F.log_softmax(logits[b, t].double(), -1)[labels[b, t + 1]].item()
            expect += 0.7 * 1.5**2 * d + 0.3 * ce
            n += 1
    assert count.item() == n == 3 * 8 - 4 - 4
    assert loss.item() == pytest.approx(expect, rel=1e-5)
    # On-policy rows carry the divergence alone.
    flags = torch.tensor([0.0, 1.0, 0.0])
    only = kd.Distiller(model, config)({"input_ids": ids, "labels": labels, "teacher_logits": teacher_logits,
                                        "on_policy": flags})[0]
    ce_row1 = F.cross_entropy(logits[1, :-1].double(), ids[1, 1:], reduction="sum").item()
    assert only.item() == pytest.approx(expect - 0.3 * ce_row1, rel=1e-5)


# ---- hidden-state and attention-output matching ------------------------------------------------------
def test_hidden_matching_with_a_projection_between_widths():
    teacher = tiny_model("llama", seed=1, hidden=32, layers=4)
    student = tiny_model("llama", seed=2, hidden=16, layers=3, heads=2)
    config = DistillConfig(loss="hidden", alpha=1.0, layer_map=["0:0", "1:2"])
    pairs = kd.parse_layer_map(config.layer_map)
    torch.manual_seed(0)
    dist = kd.Distiller(student, config, pairs, teacher_width=32)
    assert dist.projection is not None and tuple(dist.projection.weight.shape) == (32, 16)
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(1))
    batches = kd.DistillBatches(lambda s: {"input_ids": ids}, teacher, student, config, seed=0, seq_len=8,
                                pairs=pairs)
    batch = batches(0)
    assert tuple(batch["teacher_states"].shape) == (2, 2, 8, 32)
    loss, count = dist(batch)
    # Reference from Hugging Face's own hidden_states (entry i+1 is block i's output before the last block).
    with torch.no_grad():
        hs_t = teacher(input_ids=ids, output_hidden_states=True).hidden_states
        hs_s = student(input_ids=ids, output_hidden_states=True).hidden_states
        w = dist.projection.weight  # (32, 16)
        ref = sum(((hs_s[s + 1] @ w.T - hs_t[t + 1]) ** 2).mean(-1)[:, :-1] for s, t in pairs) / len(pairs)
    assert count.item() == 2 * 7
    assert loss.item() == pytest.approx(ref.sum().item(), rel=1e-5)
    # The projection and the student both learn from it.
    opt = torch.optim.Adam(dist.parameters(), lr=1e-2)
    first = loss.item()
    for _ in range(20):
        opt.zero_grad()
        loss, _ = dist(batch)
        loss.backward()
        assert dist.projection.weight.grad.abs().sum() > 0
        opt.step()
    assert loss.item() < 0.5 * first


def test_attention_output_matching_of_a_model_with_itself_is_zero_and_default_maps():
    teacher = tiny_model("gpt2", seed=3, layers=4)
    config = DistillConfig(loss="attn_out", alpha=1.0)
    student = kd.Student(kd.keep_layers(teacher, [1, 3]), None, "drop-layers:2", "drop-layers", [1, 3])
    assert kd.default_layer_map(student, teacher) == [(0, 1), (1, 3)]
    other = kd.Student(tiny_model("gpt2", seed=4, layers=2), None, "m", "model")
    assert kd.default_layer_map(other, teacher) == [(0, 1), (1, 3)]
    three = kd.Student(tiny_model("gpt2", seed=4, layers=3), None, "m", "model")
    assert kd.default_layer_map(three, tiny_model("gpt2", layers=6)) == [(0, 1), (1, 3), (2, 5)]
    pairs = [(0, 0), (1, 1)]
    dist = kd.Distiller(teacher, config, pairs, teacher_width=32)
    assert dist.projection is None
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(2))
    batch = kd.DistillBatches(lambda s: {"input_ids": ids}, teacher, teacher, config, 0, 8, pairs=pairs)(0)
    loss, _ = dist(batch)
    assert abs(loss.item()) < 1e-10
    with pytest.raises(UserError, match="out of range"):
        kd.check_layer_map([(0, 4)], student.model, teacher)


# ---- students ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_kept_layers_copy_the_teacher(family):
    teacher = tiny_model(family, seed=5, layers=4)
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        same = kd.keep_layers(teacher, [0, 1, 2, 3])
        torch.testing.assert_close(same(input_ids=ids).logits, teacher(input_ids=ids).logits, rtol=0, atol=0)
        student = kd.build_student("drop-layers:2", teacher, None, lambda: None)
        assert student.source_layers == [1, 3] and arch.num_layers(student.model) == 2
        assert student.model.config.num_hidden_layers == 2
        for new, old in enumerate([1, 3]):
            for (n, p), (_, q) in zip(arch.blocks(student.model)[new].named_parameters(),
                                      arch.blocks(teacher)[old].named_parameters()):
                assert torch.equal(p, q), n
        # The KV cache indexes layers by position: cached generation must equal uncached.
        kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=1, attention_mask=torch.ones_like(ids))
        a = student.model.generate(ids, use_cache=True, **kw)
        b = student.model.generate(ids, use_cache=False, **kw)
        assert torch.equal(a, b)
    assert student.model.state_dict().keys() == kd.keep_layers(teacher, [0, 2]).state_dict().keys()


def test_drop_layers_definition():
    assert kd.dropped_layers(4, 2) == [1, 3]
    assert kd.dropped_layers(6, 3) == [2, 5]
    assert kd.dropped_layers(5, 2) == [0, 2, 4]
    assert kd.dropped_layers(2, 2) == [1]
    teacher = tiny_model("llama", layers=2)
    for bad in ("drop-layers:1", "drop-layers:x", "keep-layers:3", "keep-layers:1,0", "width:1.5", "width:0"):
        with pytest.raises(UserError, match="student|layers"):
            kd.build_student(bad, teacher, None, lambda: None)


def test_width_student_comes_from_structured_pruning():
    teacher = tiny_model("llama", seed=6, hidden=32, heads=4, kv_heads=2, layers=2, intermediate=64)
    windows = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(4))
    student = kd.build_student("width:0.5", teacher, None, lambda: windows)
    cfg = student.model.config
    assert cfg.num_key_value_heads == 1 and cfg.num_attention_heads == 2 and cfg.intermediate_size == 32
    assert cfg.hidden_size == 32 and cfg.vocab_size == 128
    assert teacher.config.intermediate_size == 64  # the teacher is untouched
    assert sum(p.numel() for p in student.model.parameters()) < sum(p.numel() for p in teacher.parameters())


def test_a_student_with_another_vocabulary_is_refused():
    from efficientgpt.data.tokenizer import train_tokenizer

    teacher, student = tiny_model("llama", vocab_size=128), tiny_model("llama", vocab_size=96)
    with pytest.raises(UserError, match=r"student predicts 96 tokens but the teacher 128"):
        kd.check_vocabulary(teacher, None, student, None)
    texts = ["def f(x): return x + 1\n", "the quick brown fox jumps over the lazy dog\n"] * 20
    tok_a, tok_b = train_tokenizer(texts, 300), train_tokenizer(texts[:2] + ["zzz yyy"] * 5, 280)
    with pytest.raises(UserError, match=rf"vocabulary {len(tok_b)}, fingerprint \w+\) differs from the teacher's "
                                        rf"\(vocabulary {len(tok_a)}, fingerprint \w+\)"):
        kd.check_vocabulary(teacher, tok_a, teacher, tok_b)
    kd.check_vocabulary(teacher, tok_a, tiny_model("llama", seed=3), tok_a)  # same tokenizer: accepted


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="loss = 'kl' is not allowed"):
        DistillConfig(loss="kl").validate()
    with pytest.raises(ConfigError, match="cache_teacher caches logits"):
        DistillConfig(loss="hidden", cache_teacher=True).validate()
    with pytest.raises(ConfigError, match="teacher_topk applies to the teacher cache"):
        DistillConfig(teacher_topk=5).validate()
    with pytest.raises(ConfigError, match="'1-2' is not STUDENT:TEACHER"):
        DistillConfig(loss="hidden", layer_map=["1-2"]).validate()
    with pytest.raises(ConfigError, match="alpha = 1.5 is out of range"):
        DistillConfig(alpha=1.5).validate()


# ---- teacher cache -------------------------------------------------------------------------------------
def _setup(vocab=128, on_policy=0.0, **kw):
    teacher = tiny_model("llama", seed=7, layers=2, vocab_size=vocab)
    student = tiny_model("llama", seed=8, layers=1, vocab_size=vocab)
    tokens = np.random.default_rng(0).integers(0, vocab, 4000)
    from efficientgpt.data.tokens import WindowSampler

    return teacher, student, tokens, WindowSampler


def test_teacher_cache_gives_the_recomputed_loss(tmp_path):
    teacher, student, tokens, WindowSampler = _setup()
    sampler = WindowSampler(tokens, 16, 4, seed=0)
    plain = kd.DistillBatches(sampler, teacher, student, DistillConfig(), 0, 16)
    cached_cfg = DistillConfig(cache_teacher=True, epoch_steps=2)
    cache = kd.TeacherCache(tmp_path / "full", 0)
    cached = kd.DistillBatches(sampler, teacher, student, cached_cfg, 0, 16, cache=cache)
    dist = kd.Distiller(student, DistillConfig(temperature=2.0))
    for step in range(4):  # two epochs of two data steps
        a, b = plain(step % 2), cached(step)
        assert torch.equal(a["input_ids"], b["input_ids"])
        assert torch.equal(a["teacher_logits"], b["teacher_logits"])
        assert dist(a)[0].item() == dist(b)[0].item()
    assert (cache.misses, cache.hits) == (2, 2)
    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == ["step-00000000-rank0.safetensors",
                                                                      "step-00000001-rank0.safetensors"]
    # Top-k: the stored probabilities are exact at τ = 1, the tail keeps its total mass.
    topk = kd.TeacherCache(tmp_path / "top", 8)
    first = kd.DistillBatches(sampler, teacher, student, DistillConfig(cache_teacher=True, teacher_topk=8), 0, 16,
                              cache=topk)(0)
    again = kd.DistillBatches(sampler, teacher, student, DistillConfig(cache_teacher=True, teacher_topk=8), 0, 16,
                              cache=topk)(0)
    assert torch.equal(first["teacher_logits"], again["teacher_logits"]) and topk.hits == 1
    full = plain(0)["teacher_logits"]
    lp_full = F.log_softmax(full.double(), -1)
    lp_top = F.log_softmax(first["teacher_logits"].double(), -1)
    _, idx = full.topk(8, -1)
    torch.testing.assert_close(lp_top.gather(-1, idx), lp_full.gather(-1, idx), rtol=0, atol=1e-5)
    mask = torch.ones_like(full, dtype=torch.bool).scatter_(-1, idx, False)
    tail_full = (lp_full.exp() * mask).sum(-1)
    tail_top = (lp_top.exp() * mask).sum(-1)
    torch.testing.assert_close(tail_top, tail_full, rtol=0, atol=1e-5)
    assert (lp_top.exp() * mask).amax(-1).sub((lp_top.exp() * mask).sum(-1) / (128 - 8)).abs().max() < 1e-6


def test_teacher_cache_through_the_trainer_matches_recomputing(tmp_path):
    teacher, _, tokens, WindowSampler = _setup()
    cfg = TrainConfig(steps=4, batch_size=4, seq_len=16, lr=1e-2, progress=False, log_every=1)

    def run(config, cache=None):
        student = tiny_model("llama", seed=8, layers=1)
        dist = kd.Distiller(student, config)
        batches = kd.DistillBatches(WindowSampler(tokens, 16, 4, seed=0), teacher, student, config, 0, 16,
                                    cache=cache)
        curve = [r["loss"] for r in Trainer(dist, cfg, batches, loss_fn=kd.distill_loss).train().curve]
        return curve, student

    base, s0 = run(DistillConfig(epoch_steps=2))
    cache = kd.TeacherCache(tmp_path, 0)
    first, s1 = run(DistillConfig(epoch_steps=2, cache_teacher=True), cache)
    second, s2 = run(DistillConfig(epoch_steps=2, cache_teacher=True), cache)
    assert base == first == second
    assert cache.misses == 2 and cache.hits == 6
    for a, b in zip(s0.parameters(), s2.parameters()):
        assert torch.equal(a, b)


# ---- on-policy batches ---------------------------------------------------------------------------------
def test_on_policy_batches_are_student_samples_seeded_by_step_and_row():
    teacher, student, tokens, WindowSampler = _setup()
    config = DistillConfig(on_policy=1.0, prompt_tokens=6)
    full = kd.DistillBatches(WindowSampler(tokens, 16, 4, seed=0), teacher, student, config, 0, 16)
    a, b = full(3), full(3)
    assert torch.equal(a["input_ids"], b["input_ids"]) and a["on_policy"].tolist() == [1.0] * 4
    prompt = WindowSampler(tokens, 16, 4, seed=0)(3)["input_ids"][:, :6]
    assert torch.equal(a["input_ids"][:, :6], prompt)
    assert (a["labels"][:, :6] == -100).all() and torch.equal(a["labels"][:, 6:], a["input_ids"][:, 6:])
    assert not torch.equal(full(4)["input_ids"][:, 6:], a["input_ids"][:, 6:])
    # Each process samples its rows of the global batch exactly as one process would.
    for rank in (0, 1):
        shard = kd.DistillBatches(WindowSampler(tokens, 16, 4, seed=0, rank=rank, world=2), teacher, student,
                                  config, 0, 16, rank=rank, world=2)(3)
        assert torch.equal(shard["input_ids"], a["input_ids"][rank::2])
        torch.testing.assert_close(shard["teacher_logits"], a["teacher_logits"][rank::2])
    # The samples follow the student: a near-deterministic student (low temperature) gives its argmax.
    cold = kd.DistillBatches(WindowSampler(tokens, 16, 4, seed=0), teacher, student,
                             DistillConfig(on_policy=1.0, prompt_tokens=6, gen_temperature=1e-4), 0, 16)(3)
    greedy = student.generate(prompt, max_new_tokens=10, do_sample=False, pad_token_id=1,
                              attention_mask=torch.ones_like(prompt))
    assert torch.equal(cold["input_ids"], greedy)
    # Which steps are on-policy: a fixed fraction on average, a pure function of (seed, step).
    flags = [kd.on_policy_step(0.3, 0, s) for s in range(2000)]
    assert flags == [kd.on_policy_step(0.3, 0, s) for s in range(2000)]
    assert abs(sum(flags) / 2000 - 0.3) < 0.04


def test_on_policy_training_resumes_exactly(tmp_path):
    teacher, _, tokens, WindowSampler = _setup()
    config = DistillConfig(on_policy=0.5, loss="rkl", prompt_tokens=8)

    def run(out, steps, resume=False, save_every=0):
        student = tiny_model("llama", seed=8, layers=1)
        dist = kd.Distiller(student, config)
        cfg = TrainConfig(steps=6, batch_size=4, seq_len=16, lr=1e-2, progress=False, save_every=save_every,
                          log_every=1)
        batches = kd.DistillBatches(WindowSampler(tokens, 16, 4, seed=0), teacher, student, config, 0, 16)
        trainer = Trainer(dist, cfg, batches, out_dir=out, loss_fn=kd.distill_loss)
        if steps < 6:  # a run killed after `steps` steps: train a shortened copy that checkpoints there
            trainer.cfg = dataclasses.replace(cfg, steps=steps)
        result = trainer.train(resume=resume)
        return result, student, batches

    full, s_full, b_full = run(tmp_path / "a", 6)
    assert 0 < b_full.on_policy_steps < 6
    run(tmp_path / "b", 3, save_every=3)
    resumed, s_res, _ = run(tmp_path / "b", 6, resume=True)
    assert resumed.resumed_from == 3
    for a, b in zip(s_full.parameters(), s_res.parameters()):
        assert torch.equal(a, b)


# ---- the job on the embedded corpus ------------------------------------------------------------------
@pytest.fixture(scope="module")
def teacher4():
    """A 4-layer embedded-preset teacher pretrained briefly on the embedded prose (seconds)."""
    from transformers import AutoModelForCausalLM

    from efficientgpt.data import sources, tokens
    from efficientgpt.data.tokenizer import embedded_tokenizer
    from efficientgpt.models.embedded import PRESETS
    from efficientgpt.models.loading import LoadedModel

    tok, _ = embedded_tokenizer(PRESETS["tiny"].vocab_size)
    preset = dataclasses.replace(PRESETS["tiny"], layers=4, name="tiny4")
    ids = tokens.encode(tok, sources.load_text("embedded:prose", "train"))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(preset.model_config(tok))
    cfg = TrainConfig(steps=TEACHER_STEPS, batch_size=16, seq_len=32, lr=6e-3, warmup_steps=5, progress=False,
                      save_trainable_only=False)
    Trainer(model, cfg, tokens.WindowSampler(ids, 32, 16, seed=0)).train()
    return LoadedModel(model.eval(), tok, "tiny4", "(in memory)")


TEACHER_STEPS = 60
STUDENT = {"steps": 20, "batch_size": 8, "seq_len": 32, "lr": 2e-3, "warmup_steps": 0, "progress": False}


def test_distillation_beats_lm_only_training_at_equal_steps(teacher4):
    from efficientgpt.pipeline import open_data
    from efficientgpt.train.losses import causal_lm_loss

    s = kd.distill("tiny4", "drop-layers:2", DistillConfig(loss="fkl", alpha=1.0), train=STUDENT,
                   eval_tokens=8192, teacher_loaded=teacher4)
    assert s["student"]["source_layers"] == [1, 3]
    assert s["parameters"]["student"] < s["parameters"]["teacher"]
    e = s["eval"]
    # The LM-only baseline: the same student init, data order and schedule, next-token loss alone.
    baseline = kd.build_student("drop-layers:2", teacher4.model, teacher4.tokenizer, lambda: None).model
    baseline.requires_grad_(True)
    cfg = TrainConfig(**s["train_config"])
    source = open_data("embedded:prose", teacher4.tokenizer, 8192)
    assert source.evaluate(baseline, cfg)["loss"] == pytest.approx(e["loss_before"], abs=1e-9)
    Trainer(baseline, cfg, source.train_batches(cfg), loss_fn=causal_lm_loss).train()
    lm_only = source.evaluate(baseline, cfg)["loss"]
    print(f"teacher {e['loss_teacher']:.4f}  student before {e['loss_before']:.4f}  distilled {e['loss_after']:.4f}"
          f"  LM-only {lm_only:.4f}")
    assert e["loss_after"] < lm_only - MARGIN
    assert e["student_after"]["kl_from_teacher"] < e["student_before"]["kl_from_teacher"]


MARGIN = 0.01


# ---- the command ---------------------------------------------------------------------------------------
@pytest.fixture
def cli(monkeypatch):
    from efficientgpt import cli

    return cli


def test_cli_acceptance_command(cli, tiny_embedded_path, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = cli.main(["distill", "--teacher", "embedded:tiny", "--student", "drop-layers:2", "--loss", "fkl",
                     "--steps", "50", "--out", "S", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out)
    assert result["parameters"]["student"] < result["parameters"]["teacher"]
    assert result["student"]["layers"] == 1 and result["train"]["steps"] == 50
    e = result["eval"]
    for key in ("ppl_teacher", "ppl_before", "ppl_after"):
        assert math.isfinite(e[key]) and e[key] > 1
    assert e["loss_after"] < e["loss_before"]
    assert result["losses"]["train_final"] is not None
    # The saved student loads back as a plain model with its tokenizer and scores what was reported.
    from efficientgpt.eval.perplexity import perplexity
    from efficientgpt.models.loading import load_model
    from efficientgpt.pipeline import open_data

    loaded = load_model(str(tmp_path / "S"))
    assert loaded.model.config.num_hidden_layers == 1
    source = open_data("embedded:prose", loaded.tokenizer)
    r = perplexity(loaded.model, source.val_ids, 64, batch_size=16, max_tokens=65536)
    assert r.loss == pytest.approx(e["loss_after"], abs=1e-5)
    assert (tmp_path / "S" / "result.json").exists() and not list(tmp_path.glob(".S.*"))


def test_cli_errors_are_clear(cli, tiny_embedded_path, tmp_path, capsys):
    code = cli.main(["distill", "--teacher", "embedded:tiny", "--student", "drop-layers:1", "--steps", "1",
                     "--out", str(tmp_path / "X"), "--json"])
    assert code == 1
    assert "drop-layers takes an integer k >= 2" in capsys.readouterr().err
    code = cli.main(["distill", "--teacher", "embedded:tiny", "--loss", "hidden", "--cache-teacher",
                     "--out", str(tmp_path / "X")])
    assert code == 1
    assert "cache_teacher caches logits" in capsys.readouterr().err
    code = cli.main(["distill", "--teacher", "embedded:tiny", "--fsdp", "--out", str(tmp_path / "X")])
    assert code == 1
    assert "drop --fsdp" in capsys.readouterr().err
    assert not (tmp_path / "X").exists()
