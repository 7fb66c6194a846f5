"""ATTEMPT: the attention over prompts against a slow reference, logits against prepending the
per-instance prompt, gradients, generation, save/load without the source files, multi-task mode, the
one-command source training, clear errors, and a short training run on a suite task."""

from __future__ import annotations

import math
import shutil
import warnings

import pytest
import torch

from conftest import FAMILIES
from efficientgpt.errors import ConfigError, UserError
from efficientgpt.models.tiny import tiny_model
from efficientgpt.peft import core
from efficientgpt.peft.attempt import AttemptConfig
from efficientgpt.peft.prompt_tuning import PromptTuningConfig
from efficientgpt.train.losses import causal_lm_loss

N = 3
IDS = torch.randint(2, 128, (3, 8), generator=torch.Generator().manual_seed(0))
IDS[2] = IDS[0]  # rows 0 and 2 share their input


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers deprecation chatter
        yield


@pytest.fixture
def one_thread():
    """The embedded-model tests run many small matrix products: one thread avoids oversubscription."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _source_dirs(family: str, tmp_path, count: int = 2, n: int = N, **model_kwargs) -> list[str]:
    """Saved prompt_tuning deltas with distinct random prompts, as source prompts."""
    dirs = []
    for j in range(count):
        model = tiny_model(family, **model_kwargs)
        torch.manual_seed(10 + j)
        delta = core.apply(model, "prompt_tuning", PromptTuningConfig(num_virtual_tokens=n, init="random"))
        dirs.append(str(core.save_delta(delta, tmp_path / f"source{j}")))
    return dirs


def _attempt(family: str, tmp_path, sharpen: bool = True, **cfg):
    """A tiny model with ATTEMPT over two source prompts; ``sharpen`` makes the attention input-dependent
    (larger projections, lower temperature) so that the weights differ visibly between rows."""
    model = tiny_model(family)
    torch.manual_seed(0)
    cfg = {"num_virtual_tokens": N, "attn_hidden": 8, **cfg}
    if "source_prompts" not in cfg and "train_sources" not in cfg:
        cfg["source_prompts"] = _source_dirs(family, tmp_path)
    if sharpen:
        cfg.setdefault("attn_temperature", 0.5)
    delta = core.apply(model, "attempt", AttemptConfig(**cfg))
    if sharpen:
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in delta.modules["attention"].named_parameters():
                p.copy_(torch.randn(p.shape, generator=g) * (0.2 if "layer_norm" in name else 1.0) + (
                    1.0 if name.endswith("layer_norm.weight") else 0.0))
            delta.target_prompts.add_(0.3 * torch.randn(delta.target_prompts.shape, generator=g))
    return model, delta


def _reference(model, delta, ids, mask=None, task: int = 0):
    """Slow reference of §3.2, one row at a time, from the module's weights."""
    E = model.get_input_embeddings().weight  # (V, e)
    e = E.shape[1]
    att = delta.modules["attention"]
    ln = att.layer_norm
    T = delta.config.attn_temperature or e * math.e
    candidates = [*delta.source_prompts, delta.target_prompts[task]]  # each (n, e)
    weights, prompts = [], []
    for r in range(ids.shape[0]):
        tokens = [int(ids[r, t]) for t in range(ids.shape[1]) if mask is None or mask[r, t]]
        x_hat = torch.stack([E[t] for t in tokens]).max(dim=0).values  # max-pool over the input's tokens
        h = att.W_down.weight @ x_hat
        h = att.W_up.weight @ (h * torch.sigmoid(h))  # SiLU
        h = (h - h.mean()) / torch.sqrt(h.var(unbiased=False) + ln.eps) * ln.weight + ln.bias  # LayerNorm
        scores = torch.stack([P.max(dim=0).values @ h / T for P in candidates])  # p̂_j · H_out / T
        a = torch.exp(scores) / torch.exp(scores).sum()
        weights.append(a)
        prompts.append(candidates[-1] + sum(a_j * P_j for a_j, P_j in zip(a, candidates)))
    return torch.stack(weights), torch.stack(prompts)  # (B, t+1), (B, n, e)


def _prepended(model, P: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The definition: the base model on [P_instance; X], logits of the real tokens."""
    with core.disable(model):
        x = model.get_input_embeddings()(ids)  # (B, T, e)
        embeds = torch.cat([P, x], dim=1)  # (B, n + T, e)
        if mask is not None:
            mask = torch.cat([torch.ones(ids.shape[0], P.shape[1], dtype=mask.dtype), mask], dim=1)
        return model(inputs_embeds=embeds, attention_mask=mask).logits[:, P.shape[1]:]  # (B, T, V)


# ---- the mixture -------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_attention_weights_and_instance_prompts_match_the_reference(family, tmp_path):
    model, delta = _attempt(family, tmp_path)
    mask = torch.ones_like(IDS)
    mask[1, :3] = 0  # left padding: padded tokens are not part of the instance
    with torch.no_grad():
        a, P = delta.instance_prompts(IDS, attention_mask=mask)
        ref_a, ref_P = _reference(model, delta, IDS, mask)
    assert a.shape == (3, 3) and P.shape == (3, N, model.get_input_embeddings().weight.shape[1])
    torch.testing.assert_close(a.sum(dim=-1), torch.ones(3), atol=1e-6, rtol=0)
    torch.testing.assert_close(a, ref_a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(P, ref_P, atol=1e-5, rtol=1e-5)
    assert (a[0] - a[1]).abs().max() > 1e-2  # another input, another mixture
    torch.testing.assert_close(a[0], a[2], atol=0, rtol=0)  # the same input, the same mixture
    assert a.min() > 0


def test_default_temperature_is_width_times_e(tmp_path):
    model, delta = _attempt("llama", tmp_path, sharpen=False)
    assert delta.temperature == pytest.approx(32 * math.e)
    with torch.no_grad():
        torch.testing.assert_close(delta.instance_prompts(IDS)[0], _reference(model, delta, IDS)[0],
                                   atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_equal_prepending_the_instance_prompt(family, tmp_path):
    model, delta = _attempt(family, tmp_path)
    mask = torch.ones_like(IDS)
    mask[1, :2] = 0  # left padding in one row
    with torch.no_grad():
        for m in (None, mask):
            _, P = _reference(model, delta, IDS, m)
            torch.testing.assert_close(model(IDS, attention_mask=m).logits, _prepended(model, P, IDS, m),
                                       atol=1e-5, rtol=0)
        with core.disable(model):
            plain = model(IDS).logits
        assert (model(IDS).logits - plain).abs().max() > 1e-3  # the prompt matters


def test_only_the_target_prompt_and_the_attention_module_train(tmp_path):
    model, delta = _attempt("llama", tmp_path)
    sources = delta.source_prompts.clone()
    model.train()
    loss, n = causal_lm_loss(model, {"input_ids": IDS})
    (loss / n).backward()
    assert not delta.source_prompts.requires_grad and delta.source_prompts.grad is None
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert set(trainable) == {f"efficientgpt_deltas.default.{k}" for k in (
        "target.P", "attention.W_down.weight", "attention.W_up.weight", "attention.layer_norm.weight",
        "attention.layer_norm.bias")}
    for name, p in trainable.items():
        assert p.grad is not None and p.grad.abs().max() > 0, name
    torch.optim.SGD(trainable.values(), lr=1.0).step()
    assert torch.equal(delta.source_prompts, sources)
    assert "sources.P" in delta.state_dict()  # frozen, but part of the delta


# ---- generation, saving ------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_generation_uses_the_prompt_of_the_instance(family, tmp_path):
    """Cached and uncached greedy decoding equal decoding by the definition, with the instance = the prompt."""
    model, delta = _attempt(family, tmp_path)
    prompt = IDS[:2, :5]
    with torch.no_grad():
        _, P = _reference(model, delta, prompt)  # (2, n, e): from the prompt only
        cached = model.generate(prompt, max_new_tokens=4, do_sample=False, use_cache=True, pad_token_id=1)
        uncached = model.generate(prompt, max_new_tokens=4, do_sample=False, use_cache=False, pad_token_id=1)
        seq = prompt
        for _ in range(4):
            nxt = _prepended(model, P, seq)[:, -1].argmax(-1, keepdim=True)  # (2, 1)
            seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(cached, seq) and torch.equal(uncached, seq)


def test_uncached_rereading_keeps_its_instance_only_outside_training(tmp_path):
    model, delta = _attempt("llama", tmp_path)
    with torch.no_grad():
        model(IDS[:, :5])
        extended = model(IDS[:, :6]).logits  # re-read with one more token: the instance stays IDS[:, :5]
        _, P5 = _reference(model, delta, IDS[:, :5])
        torch.testing.assert_close(extended, _prepended(model, P5, IDS[:, :6]), atol=1e-5, rtol=0)
        delta.forget_instances()
        _, P6 = _reference(model, delta, IDS[:, :6])
        torch.testing.assert_close(model(IDS[:, :6]).logits, _prepended(model, P6, IDS[:, :6]), atol=1e-5, rtol=0)
    model.train()
    model(IDS[:, :5])
    torch.testing.assert_close(model(IDS[:, :6]).logits, _prepended(model, P6, IDS[:, :6]).detach(),
                               atol=1e-5, rtol=0)


def test_saved_delta_reloads_without_the_source_files(tmp_path):
    model, delta = _attempt("gpt2", tmp_path)
    with torch.no_grad():
        tuned = model(IDS).logits
    core.save_delta(delta, tmp_path / "d")
    for j in range(2):
        shutil.rmtree(tmp_path / f"source{j}")
    assert core.read_delta_config(tmp_path / "d")["config"]["num_sources"] == 2
    fresh = tiny_model("gpt2")
    loaded = core.load_delta(fresh, tmp_path / "d")
    with torch.no_grad():
        torch.testing.assert_close(fresh(IDS).logits, tuned, atol=0, rtol=0)
    torch.testing.assert_close(loaded.source_prompts, delta.source_prompts, atol=0, rtol=0)


# ---- multi-task mode ---------------------------------------------------------------------------------
def test_multi_task_rows_use_their_task_target_prompt(tmp_path):
    model, delta = _attempt("qwen2", tmp_path, target_tasks=["a", "b"])
    assert delta.target_prompts.shape[0] == 2
    tids = torch.tensor([0, 1, 1])
    with torch.no_grad():
        logits = model(IDS, task_ids=tids).logits
        for r, t in enumerate(tids.tolist()):
            _, P = _reference(model, delta, IDS[r : r + 1], task=t)
            torch.testing.assert_close(logits[r : r + 1], _prepended(model, P, IDS[r : r + 1]), atol=1e-5, rtol=0)
        assert (logits[0] - logits[2]).abs().max() > 1e-4  # same input, another task
        with delta.use_task("b"):
            torch.testing.assert_close(model(IDS).logits, model(IDS, task_ids=torch.tensor([1, 1, 1])).logits,
                                       atol=1e-6, rtol=0)
        with pytest.raises(UserError, match="say each row's task"):
            model(IDS)
        with pytest.raises(UserError, match="no target prompt for task 'c'"), delta.use_task("c"):
            pass


def test_multi_task_training_batches_and_evaluation(tiny_embedded, one_thread, tmp_path):
    from efficientgpt.data.tasks import TaskSource, target_tasks
    from efficientgpt.train.config import TrainConfig

    shape = {"vocab_size": tiny_embedded.tokenizer.vocab_size, "max_positions": 128}
    model = tiny_model("llama", **shape)
    sources = _source_dirs("llama", tmp_path, count=1, n=2, **shape)
    delta = core.apply(model, "attempt", AttemptConfig(num_virtual_tokens=2, attn_hidden=4, source_prompts=sources,
                                                       target_tasks=["target"]))
    names = [t.name for t in target_tasks()]
    assert delta.task_names == names
    source = TaskSource("task:target?eval=2", tiny_embedded.tokenizer)
    cfg = TrainConfig(steps=1, batch_size=8, seq_len=64)
    batches, _ = delta.training_objective(source, cfg)
    b = batches(0)
    idx = source.train_indices(0, 8, 0)
    assert b["task_ids"].tolist() == [names.index(source.train[i].task) for i in idx]
    assert torch.equal(b["instance_mask"], b["attention_mask"].bool() & (b["labels"] == -100))
    assert ((b["labels"] != -100) & b["instance_mask"]).sum() == 0  # the answer is never part of the instance
    loss, n = causal_lm_loss(model, b)
    assert torch.isfinite(loss / n)
    res = source.evaluate(model, cfg)  # each task scored with its own target prompt (bind_data)
    assert set(res["tasks"]) == set(names)
    with pytest.raises(UserError, match="say each row's task"):  # a source the delta was not bound to
        TaskSource("task:target?eval=2", tiny_embedded.tokenizer).evaluate(model, cfg)


# ---- source prompts from the command line --------------------------------------------------------------
def test_one_command_trains_frozen_source_prompts_then_the_target(tiny_embedded_path, tmp_path, one_thread):
    """`tune --method attempt --train-sources 2 --source-tasks ... --data task:...`: pipeline.tune alone."""
    from efficientgpt import pipeline
    from efficientgpt.models.loading import load_model

    cfg = AttemptConfig(num_virtual_tokens=4, attn_hidden=8, train_sources=2,
                        source_tasks=["copy_words", "compare_numbers"])
    loaded = load_model(str(tiny_embedded_path))
    s = pipeline.tune(str(tiny_embedded_path), "attempt", cfg, data="task:docstring_order?eval=4", loaded=loaded,
                      out=tmp_path / "d", train={"steps": 3, "batch_size": 4, "lr": 0.1, "progress": False})
    delta = s["delta"]
    vocab = loaded.model.get_input_embeddings().weight
    # every source prompt was trained: its rows are no longer rows of the embedding table (their start)
    assert not (delta.source_prompts[:, :, None] == vocab[None, None]).all(-1).any()
    assert s["parameters"]["trainable"] == 4 * 64 + 2 * 8 * 64 + 2 * 64
    fresh = load_model(str(tiny_embedded_path)).model
    core.load_delta(fresh, tmp_path / "d")
    ids = torch.randint(5, 4000, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, loaded.model(ids).logits, atol=0, rtol=0)


def test_training_on_a_target_task_lowers_the_loss_and_raises_accuracy(tiny_embedded, one_thread):
    """Sources trained on two source tasks, then 40 steps on docstring_order (seed 0).

    Measured (first 100 validation examples, seeds 0-3): base model 0.86, ATTEMPT before target
    training 0.68-0.71 (the target prompt starts as the first source prompt), after 0.88-0.90.
    """
    import copy

    from efficientgpt.data.tasks import TaskSource
    from efficientgpt.train.config import TrainConfig
    from efficientgpt.train.trainer import Trainer

    model = copy.deepcopy(tiny_embedded.model)
    source = TaskSource("task:docstring_order?eval=100", tiny_embedded.tokenizer)
    cfg = TrainConfig(steps=40, batch_size=16, seq_len=64, lr=0.1, progress=False, seed=0)
    base = source.evaluate(model, cfg)
    torch.manual_seed(0)
    delta = core.apply(model, "attempt", AttemptConfig(num_virtual_tokens=8, attn_hidden=16, train_sources=10,
                                                       source_tasks=["code_or_prose", "copy_words"]))
    batches, loss_fn = delta.training_objective(source, cfg)  # trains the two source prompts first
    sources = delta.source_prompts.clone()
    untrained = source.evaluate(model, cfg)
    Trainer(model, cfg, batches, loss_fn=loss_fn).train()
    trained = source.evaluate(model, cfg)
    torch.testing.assert_close(delta.source_prompts, sources, atol=0, rtol=0)  # frozen while the target trains
    assert trained["loss"] < untrained["loss"] - 0.05
    assert trained["accuracy"] > untrained["accuracy"] + 0.1
    assert trained["accuracy"] >= base["accuracy"]


# ---- errors --------------------------------------------------------------------------------------------
def test_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="no source prompts"):
        AttemptConfig(train_sources=0).validate()
    assert AttemptConfig().trains_sources  # by default the run trains them, for its own step count
    with pytest.raises(ConfigError, match="both give the source prompts"):
        AttemptConfig(source_prompts=["x"], train_sources=3).validate()
    with pytest.raises(ConfigError, match="used only when the source prompts are trained"):
        AttemptConfig(source_prompts=["x"], source_tasks=["copy_words"]).validate()
    with pytest.raises(ConfigError, match="not a task of the suite"):
        AttemptConfig(train_sources=3, source_tasks=["copy_wrds"]).validate()
    cfg = AttemptConfig(train_sources=2)
    cfg.validate()
    assert len(cfg.source_tasks) == 6  # the suite's source tasks
    from_cli = AttemptConfig(source_prompts="a, b", target_tasks="target")  # strings from a flag or a file
    from_cli.validate()
    assert from_cli.source_prompts == ["a", "b"] and len(from_cli.target_tasks) == 4

    with pytest.raises(ConfigError, match="Prompt longer than the model's context"):
        core.apply(tiny_model("llama"), "attempt", AttemptConfig(num_virtual_tokens=64, train_sources=1))
    with pytest.raises(ConfigError, match="is not a directory"):
        core.apply(tiny_model("llama"), "attempt", AttemptConfig(num_virtual_tokens=N,
                                                                  source_prompts=[str(tmp_path / "none")]))
    short = _source_dirs("llama", tmp_path / "short", count=1, n=2)
    with pytest.raises(ConfigError, match="has 2 virtual tokens, but AttemptConfig.num_virtual_tokens = 3"):
        core.apply(tiny_model("llama"), "attempt", AttemptConfig(num_virtual_tokens=N, source_prompts=short))
    wide = _source_dirs("llama", tmp_path / "wide", count=1, hidden=48)
    with pytest.raises(ConfigError, match="another base model:\n  hidden_size: delta was made for 48"):
        core.apply(tiny_model("llama"), "attempt", AttemptConfig(num_virtual_tokens=N, source_prompts=wide))
    lora_model = tiny_model("llama")
    lora = core.save_delta(core.apply(lora_model, "lora"), tmp_path / "lora")
    with pytest.raises(ConfigError, match="holds a 'lora' delta; source prompts are prompt_tuning deltas"):
        core.apply(tiny_model("llama"), "attempt", AttemptConfig(num_virtual_tokens=N, source_prompts=[str(lora)]))
    model = tiny_model("llama")
    core.apply(model, "attempt", AttemptConfig(num_virtual_tokens=N, train_sources=1, source_tasks=["copy_words"]))
    assert core.deltas(model)["default"].source_prompts.shape == (1, N, 32)


def test_training_objective_refuses_plain_text(tmp_path):
    _, delta = _attempt("llama", tmp_path)

    class Text:
        spec = "embedded:code"

    with pytest.raises(UserError, match="trains on task data"):
        delta.training_objective(Text(), None)
