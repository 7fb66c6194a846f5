"""T-Few (Liu et al., NeurIPS 2022): L_LM, L_UL (Eq. 2) and L_LN (Eq. 3) against a slow per-option,
per-token reference; their gradient directions; the trainer's normalisation over micro-batches and
processes; few-shot training on a suite choice task; the tune/eval commands."""

from __future__ import annotations

import json
import math
import types
import warnings

import pytest
import torch

from efficientgpt import cli, pipeline
from efficientgpt.errors import ConfigError, UserError
from efficientgpt.models.tiny import tiny_model
from efficientgpt.peft import core
from efficientgpt.peft.tfew import TFewConfig, TFewDelta
from efficientgpt.train import tfew_losses as tl
from efficientgpt.train.config import TrainConfig
from efficientgpt.train.losses import causal_lm_loss, count_targets
from efficientgpt.train.trainer import Trainer

PAD = 0
# Three examples: varied prompt and option lengths, a gold option that is not the first, and an example
# with a single option (how a generation example enters a mixed batch).
PROMPTS = [[5, 6, 7, 8], [9, 10, 11, 12, 13, 14], [15, 16, 17]]
OPTIONS = [[[20], [21, 22], [23, 24, 25]], [[26, 27], [28]], [[29, 30, 31, 32]]]
GOLD = [1, 0, 0]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _model(family="gpt2", dtype=torch.float32):
    """A tiny model with T-Few attached and its vectors moved off ones, so the delta takes part."""
    model = tiny_model(family, seed=0).to(dtype)
    delta = core.apply(model, "tfew", TFewConfig())
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in delta.parameters():
            p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g).to(p.dtype))
    return model, delta


def _token_log_probs(model, prompt, option):
    """log p(ŷ_t | x, ŷ_<t) for each token of ``option``, from one unpadded sequence."""
    ids = torch.tensor([prompt + option])
    logp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)  # (T, V)
    return [logp[len(prompt) + t - 1, tok] for t, tok in enumerate(option)]


def _reference(model, prompts=PROMPTS, options=OPTIONS, gold=GOLD, epsilon=tl.UL_EPSILON):
    """The paper's three losses written out option by option, token by token."""
    lm_sum, lm_n, ul_sum, ul_n, ln = 0.0, 0, 0.0, 0, []
    for p, opts, g in zip(prompts, options, gold, strict=True):
        betas = []
        for c, o in enumerate(opts):
            lps = _token_log_probs(model, p, o)
            betas.append(sum(lps) / len(lps))
            if c == g:
                lm_sum -= sum(lps)
                lm_n += len(lps)
            else:
                for lp in lps:
                    ul_sum -= torch.log(1 - torch.exp(lp) + epsilon)
                ul_n += len(lps)
        betas = torch.stack(betas)
        ln.append(-(betas[g] - torch.logsumexp(betas, 0)))
    return {"lm": float(lm_sum / lm_n), "ul": float(ul_sum / ul_n), "ln": float(sum(ln) / len(ln))}


def _mean(loss_fn, model, batch):
    s, n = loss_fn(model, batch)
    return float(s / n)


# ---- the losses against the slow reference ------------------------------------------------------------

@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_each_loss_matches_a_slow_reference(family):
    model, _ = _model(family)
    batch = tl.choice_inputs(PROMPTS, OPTIONS, GOLD, PAD)
    assert batch["option_input_ids"].shape[:2] == (3, 3) and batch["option_mask"].tolist() == [
        [True, True, True], [True, True, False], [True, False, False]]
    with torch.no_grad():
        ref = _reference(model)
        got = {"lm": _mean(tl.lm_loss, model, batch), "ul": _mean(tl.unlikelihood_loss, model, batch),
               "ln": _mean(tl.length_normalized_loss, model, batch)}
    for k in ref:
        assert got[k] == pytest.approx(ref[k], rel=1e-5, abs=1e-6), k
    # The count is the trainer's: gold-answer tokens (2 + 2 + 4).
    assert int(tl.lm_loss(model, batch)[1]) == int(count_targets(batch)) == 8


def test_unlikelihood_without_epsilon_is_eq_2_as_printed():
    model, _ = _model()
    batch = tl.choice_inputs(PROMPTS, OPTIONS, GOLD, PAD)
    with torch.no_grad():
        ref = _reference(model, epsilon=0.0)["ul"]
        got = _mean(lambda m, b: tl.unlikelihood_loss(m, b, epsilon=0.0), model, batch)
        with_eps = _mean(tl.unlikelihood_loss, model, batch)
    assert got == pytest.approx(ref, rel=1e-5)
    assert with_eps < got  # log(1 - p + ε) > log(1 - p)


def test_combined_loss_is_the_weighted_sum_of_one_forward_pass():
    model, _ = _model()
    batch = tl.choice_inputs(PROMPTS, OPTIONS, GOLD, PAD)
    with torch.no_grad():
        parts = {k: tl.tfew_loss((k,))(model, batch)[0] for k in tl.LOSSES}
        total, n = tl.tfew_loss()(model, batch)
        torch.testing.assert_close(total, parts["lm"] + parts["ul"] + parts["ln"])
        ref = _reference(model)
        assert float(total / n) == pytest.approx(ref["lm"] + ref["ul"] + ref["ln"], rel=1e-5)
        weighted, _ = tl.tfew_loss(("ul", "ln"), {"lm": 5.0, "ul": 0.5, "ln": 3.0})(model, batch)
        torch.testing.assert_close(weighted, 0.5 * parts["ul"] + 3.0 * parts["ln"])
        cfg = TFewConfig(losses=["lm", "ln"], ln_weight=2.0)
        delta_loss, _ = TFewDelta.make_loss(types.SimpleNamespace(config=cfg))(model, batch)
        torch.testing.assert_close(delta_loss, parts["lm"] + 2.0 * parts["ln"])


def test_split_batches_sum_to_the_whole_batch_loss():
    """The scales are those of the whole step, so micro-batches (the trainer's slices) and process shards
    (``rank::world``) give exactly the full batch's losses when divided by the global count."""
    model, _ = _model()
    batch = tl.choice_inputs(PROMPTS, OPTIONS, GOLD, PAD)
    loss = tl.tfew_loss()
    with torch.no_grad():
        full = _mean(loss, model, batch)
        for parts in ([slice(0, 1), slice(1, 3)], [slice(0, 3, 2), slice(1, 3, 2)]):
            sums = [loss(model, {k: v[s] for k, v in batch.items()})[0] for s in parts]
            assert float(sum(sums) / count_targets(batch)) == pytest.approx(full, rel=1e-6)
        # A slice scored on its own (its scales recomputed from itself) is a different, smaller batch.
        alone = {k: v[1:] for k, v in batch.items() if not k.endswith("_scale")}
        assert _mean(loss, model, alone) == pytest.approx(
            sum(_reference(model, PROMPTS[1:], OPTIONS[1:], GOLD[1:]).values()), rel=1e-5)


@pytest.mark.parametrize("grad_accum", [1, 3])
def test_the_trainer_reports_the_papers_loss(grad_accum):
    model, delta = _model()
    batch = tl.choice_inputs(PROMPTS, OPTIONS, GOLD, PAD)
    with torch.no_grad():
        ref = sum(_reference(model).values())
    cfg = TrainConfig(steps=1, batch_size=3, grad_accum=grad_accum, lr=1e-3, progress=False)
    result = Trainer(model, cfg, lambda step: batch, loss_fn=delta.make_loss()).train()
    assert result.final_loss == pytest.approx(ref, rel=1e-5)


# ---- gradient directions --------------------------------------------------------------------------------

def _option_log_probs(model, prompt, options):
    return [sum(_token_log_probs(model, prompt, o)) for o in options]


@pytest.mark.parametrize("loss", ["lm", "ul", "ln"])
def test_a_small_step_moves_the_options_the_way_the_paper_says(loss):
    """One gradient step on the (IA)^3 vectors: L_UL lowers the wrong option's probability, L_LM raises
    the gold one's, L_LN widens the gap between them (single-token options: exact to first order)."""
    model, delta = _model(dtype=torch.float64)
    prompt, options, gold = [5, 6, 7, 8, 9], [[40], [41]], 0
    batch = tl.choice_inputs([prompt], [options], [gold], PAD)
    with torch.no_grad():
        before = _option_log_probs(model, prompt, options)
    s, n = tl.tfew_loss((loss,))(model, batch)
    (s / n).backward()
    grads = [p.grad for p in delta.parameters()]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
    with torch.no_grad():
        for p in delta.parameters():
            p.sub_(1e-3 * p.grad)
        after = _option_log_probs(model, prompt, options)
    gold_change, wrong_change = float(after[0] - before[0]), float(after[1] - before[1])
    if loss == "ul":
        assert wrong_change < 0
    elif loss == "lm":
        assert gold_change > 0
    else:
        assert gold_change - wrong_change > 0


def test_unlikelihood_is_finite_when_a_wrong_option_is_certain():
    logp = torch.zeros(1, 2, 1, dtype=torch.float64, requires_grad=True)  # p = 1 for both options' token
    batch = tl.choice_inputs([[1]], [[[2], [3]]], [0], PAD)
    scored = torch.ones(1, 2, 1, dtype=torch.bool)
    for eps in (0.0, tl.UL_EPSILON):
        ul = tl._parts(logp, scored, batch, eps)["ul"]
        ul.backward()
        assert math.isfinite(float(ul.detach())) and torch.isfinite(logp.grad).all()
        logp.grad = None
    assert float(tl._parts(logp, scored, batch, tl.UL_EPSILON)["ul"].detach()) == pytest.approx(-math.log(0.01))


# ---- configuration, data -------------------------------------------------------------------------------

def test_config_validation():
    assert TFewConfig().losses == ["lm", "ul", "ln"]
    assert TFewConfig.from_dict({"losses": ["ln", "ul"]}).losses == ["ln", "ul"]
    for bad, match in [({"losses": ["lm", "mc"]}, "'mc' is not allowed"), ({"losses": []}, "at least one"),
                       ({"losses": ["ul", "ul"]}, "at most once"), ({"ul_weight": -1.0}, "out of range"),
                       ({"losses": ["ul"], "ul_weight": 0.0}, "weight 0"), ({"ul_epsilon": 2.0}, "out of range")]:
        with pytest.raises(ConfigError, match=match):
            TFewConfig.from_dict(bad)
    with pytest.raises(ValueError, match="name options that do not exist"):
        tl.choice_inputs([[1]], [[[2]]], [1], PAD)


def test_text_data_trains_l_lm_alone_and_says_so():
    text = types.SimpleNamespace(spec="embedded:code", train_batches=lambda cfg, rank, world: "windows")
    cfg = TrainConfig(steps=1, batch_size=2)
    with pytest.warns(UserWarning, match="L_UL, L_LN"):
        batches, loss = tl.objective(text, ["lm", "ul", "ln"], {"lm": 2.0}, 0.01, cfg)
    assert batches == "windows"
    ids = torch.randint(2, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    model = tiny_model("gpt2")
    s, n = loss(model, {"input_ids": ids})
    torch.testing.assert_close(s, 2.0 * causal_lm_loss(model, {"input_ids": ids})[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tl.objective(text, ["lm"], {}, 0.01, cfg)  # nothing dropped, nothing to say
    with pytest.raises(UserError, match="has none: train on a task"):
        tl.objective(text, ["ul", "ln"], {}, 0.01, cfg)


@pytest.fixture(scope="module")
def tokenizer():
    from efficientgpt.data.tokenizer import embedded_tokenizer

    return embedded_tokenizer()[0]


def test_task_batches_hold_every_option_and_shard_exactly(tokenizer, tiny_embedded):
    from efficientgpt.data import tasks

    source = tasks.TaskSource("task:docstring_module@16", tokenizer)
    cfg = TrainConfig(steps=1, batch_size=4, seq_len=64, seed=3)
    full = tl.train_batches(source, cfg)(0)
    assert full["option_input_ids"].shape[:2] == (4, 4) and full["option_mask"].all()
    # The gold rows are the standard training batch's rows (prompt + gold answer), only padded wider.
    plain = source.train_batches(cfg)(0)
    width = plain["input_ids"].shape[1]
    assert torch.equal(full["labels"][:, :width], plain["labels"])
    assert (full["labels"][:, width:] == -100).all()
    model = tiny_embedded.model
    loss = tl.tfew_loss()
    with torch.no_grad():
        whole = _mean(loss, model, full)
        shards = [tl.train_batches(source, cfg, rank, 2)(0) for rank in (0, 1)]
        total = sum(loss(model, s)[0] for s in shards) / sum(count_targets(s) for s in shards)
    assert float(total) == pytest.approx(whole, rel=1e-5)
    # Checked against the slow reference on the task's own token ids.
    ex = [source.train[i].example for i in source.train_indices(0, 4, 3)]
    def ids(texts):
        return tokenizer(list(texts), add_special_tokens=False)["input_ids"]

    with torch.no_grad():
        ref = _reference(model, ids([e.prompt for e in ex]), [ids(e.options) for e in ex], [e.label for e in ex])
    assert whole == pytest.approx(sum(ref.values()), rel=1e-4)


# ---- training and the commands --------------------------------------------------------------------------

def test_few_shot_training_raises_rank_classification_accuracy(tiny_embedded_path, tmp_path):
    from efficientgpt.models.loading import load_model

    loaded = load_model(str(tiny_embedded_path))  # a fresh copy: the delta attaches to it
    out = pipeline.tune("embedded:tiny", "tfew", TFewConfig(), data="task:code_or_prose@32?eval=100",
                        out=tmp_path / "D", loaded=loaded,
                        train={"steps": 30, "batch_size": 8, "lr": 0.5, "seed": 0, "progress": False})
    before, after = out["eval"]["before"], out["eval"]["after"]
    assert before["metric"] == after["metric"] == "accuracy" and after["examples"] == 100
    # Measured (seeds 0, 1, 2): 0.70 (the label prior) -> 0.88, 0.88, 0.84.
    assert after["accuracy"] >= before["accuracy"] + 0.1, (before["accuracy"], after["accuracy"])
    assert out["delta"].method == "tfew"
    # Mergeable: the merged plain model ranks the options exactly as the delta does.
    source = pipeline.open_data("task:code_or_prose@32?eval=100", loaded.tokenizer)
    core.merge_and_unload(loaded.model)
    merged = source.evaluate(loaded.model, TrainConfig(seq_len=64))
    assert merged["accuracy"] == after["accuracy"]
    assert merged["loss"] == pytest.approx(after["loss"], rel=1e-5)


def _main(capsys, *argv):
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    assert code == 0, captured.err[-2000:]
    return json.loads(captured.out)


def test_tune_and_eval_commands(tmp_path, capsys, tiny_embedded_path):
    d = tmp_path / "D"
    res = _main(capsys, "tune", "--model", "embedded:tiny", "--method", "tfew", "--data",
                "task:code_or_prose@16?eval=20", "--steps", "20", "--batch-size", "4", "--lr", "0.3",
                "--losses", "lm,ul,ln", "--ul-weight", "0.5", "--out", str(d), "--json", "--no-progress")
    assert res["method"] == "tfew" and res["config"]["losses"] == ["lm", "ul", "ln"]
    assert res["config"]["ul_weight"] == 0.5 and res["eval"]["after"]["metric"] == "accuracy"
    assert math.isfinite(res["train"]["final_loss"])
    ev = _main(capsys, "eval", "--model", "embedded:tiny", "--delta", str(d), "--data", "task:code_or_prose",
               "--max-examples", "20", "--json")
    assert ev["metric"] == "accuracy" and ev["examples"] == 20 and ev["task"] == "code_or_prose"
    assert ev["accuracy"] == res["eval"]["after"]["accuracy"]
    assert ev["delta"]["method"] == "tfew" and ev["delta"]["config"]["ul_weight"] == 0.5
