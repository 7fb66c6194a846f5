"""The task suite: splits, few-shot subsets, batches, rank classification, exact match, benchmarks, CLI."""

from __future__ import annotations

import argparse
import json
import types

import pytest
import torch
from torch import nn

from efficientgpt import cli, pipeline
from efficientgpt.data import tasks
from efficientgpt.errors import UserError
from efficientgpt.eval import tasks as scoring
from efficientgpt.train.config import TrainConfig

CONTEXT = 64  # embedded:tiny's context length


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models on a shared 2-core machine run several times faster on one thread.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tokenizer():
    from efficientgpt.data.tokenizer import embedded_tokenizer

    return embedded_tokenizer()[0]


# ---- the suite --------------------------------------------------------------------------------------

def test_suite_declares_formats_roles_and_templates():
    assert len(tasks.TASKS) >= 8
    assert {t.format for t in tasks.TASKS.values()} == {"choice", "generation"}
    source, target = {t.name for t in tasks.source_tasks()}, {t.name for t in tasks.target_tasks()}
    assert len(source) >= 5 and len(target) >= 3 and not source & target
    assert source | target == set(tasks.TASKS)
    for role in (tasks.source_tasks(), tasks.target_tasks()):  # both roles hold both formats
        assert {t.format for t in role} == {"choice", "generation"}
    for t in tasks.TASKS.values():
        assert t.description and t.template and t.role in ("source", "target")
        for ex in t.examples("validation")[:50]:
            if t.format == "choice":
                assert len(ex.options) >= 2 and ex.answer == ex.options[ex.label]
                assert len(set(ex.options)) == len(ex.options)
                if t.options is not None:
                    assert ex.options == t.options
            else:
                assert ex.options == () and ex.label == -1 and ex.answer.strip()


@pytest.mark.parametrize("name", sorted(tasks.TASKS))
def test_splits_are_deterministic_disjoint_and_fit_the_tiny_context(name, tokenizer):
    task = tasks.TASKS[name]
    fresh = tasks.generate(name)  # generated again from scratch: identical to the cached examples
    assert {s: fresh[s] for s in tasks.SPLITS} == {s: task.examples(s) for s in tasks.SPLITS}
    sizes = task.split_sizes()
    assert sizes["train"] >= 1000 and sizes["validation"] >= 50 and sizes["test"] >= 50
    keys = {s: {e.key for e in task.examples(s)} for s in tasks.SPLITS}
    items = {s: {(e.prompt, e.options or e.answer) for e in task.examples(s)} for s in tasks.SPLITS}
    for a, b in (("train", "validation"), ("train", "test"), ("validation", "test")):
        assert not keys[a] & keys[b] and not items[a] & items[b], (a, b)
    assert all(len(keys[s]) == sizes[s] for s in tasks.SPLITS)  # no duplicates within a split either
    if task.origin == "symbolic":
        assert all(tasks.symbolic_split(name, e.key) == s for s in tasks.SPLITS for e in task.examples(s))
    # Every example fits embedded:tiny's context untruncated: prompt + longest answer (+ eos).
    for split in tasks.SPLITS:
        exs = task.examples(split)
        prompts = tokenizer([e.prompt for e in exs], add_special_tokens=False)["input_ids"]
        for e, p in zip(exs, prompts, strict=True):
            answers = tokenizer(list(e.options or (e.answer,)), add_special_tokens=False)["input_ids"]
            longest = max(len(a) for a in answers) + (task.format == "generation")
            assert len(p) + longest <= CONTEXT, (split, e)


def test_few_shot_subsets_are_stable_nested_and_of_size_k(tokenizer):
    task = tasks.TASKS["compare_numbers"]
    s16 = task.few_shot(16, seed=0)
    assert len(s16) == 16 and len({e.key for e in s16}) == 16
    assert s16 == task.few_shot(16, seed=0) == task.few_shot(32, seed=0)[:16]
    assert {e.key for e in s16} <= {e.key for e in task.examples("train")}
    assert {e.key for e in s16} != {e.key for e in task.few_shot(16, seed=1)}
    src = tasks.TaskSource("task:compare_numbers@16", tokenizer)
    assert [t.example for t in src.train] == s16
    assert [t.example for t in tasks.TaskSource("task:compare_numbers?k=16&seed=1", tokenizer).train] == \
        task.few_shot(16, seed=1)
    mix = tasks.TaskSource("task:source@4", tokenizer)
    assert len(mix.train) == 4 * len(tasks.source_tasks())
    with pytest.raises(UserError, match="fewer than the 100000 shots"):
        tasks.TaskSource("task:compare_numbers@100000", tokenizer)


def test_spec_syntax():
    assert tasks.parse_spec("task:copy_words") == tasks.TaskSpec("copy_words")
    assert tasks.parse_spec("task:copy_words@16") == tasks.TaskSpec("copy_words", 16)
    assert tasks.parse_spec("task:source?k=8&seed=3&eval=50") == tasks.TaskSpec("source", 8, 3, 50)
    assert tasks.parse_spec("task:hf:/data/glue/sst2@32") == tasks.TaskSpec("hf:/data/glue/sst2", 32)
    with pytest.raises(UserError, match="unknown parameter 'shot=2'"):
        tasks.parse_spec("task:copy_words?shot=2")
    with pytest.raises(UserError, match="must be an integer >= 1"):
        tasks.parse_spec("task:copy_words?eval=0")
    with pytest.raises(UserError, match="unknown task 'copy_word' \\(did you mean 'copy_words'\\?\\)"):
        tasks.resolve("copy_word")
    with pytest.raises(UserError, match="names no task"):
        tasks.parse_spec("task:@4")


# ---- batches ----------------------------------------------------------------------------------------

def _cfg(**kw):
    return TrainConfig(**{"batch_size": 8, "seq_len": CONTEXT, "seed": 3, **kw})


@pytest.mark.parametrize("spec", ["task:code_or_prose", "task:copy_words@16", "task:source"])
def test_batches_are_pure_functions_of_the_step_and_shard_exactly(spec, tokenizer):
    src = tasks.TaskSource(spec, tokenizer)
    full = src.train_batches(_cfg())
    again = tasks.TaskSource(spec, tokenizer).train_batches(_cfg())
    b3 = full(3)
    for k in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(b3[k], again(3)[k]) and torch.equal(b3[k], full(3)[k])
    assert not torch.equal(full(4)["input_ids"], b3["input_ids"])
    shards = [src.train_batches(_cfg(), rank=r, world=2)(3) for r in range(2)]
    for k, v in b3.items():
        assert torch.equal(shards[0][k], v[0::2]) and torch.equal(shards[1][k], v[1::2])
    # Over enough steps every training example is visited once per epoch.
    n = len(src.train)
    if n <= 64:
        seen = [i for s in range(n // 8) for i in src.train_indices(s, 8, seed=3)]
        assert sorted(seen) == list(range(n))
    with pytest.raises(UserError, match="not divisible"):
        src.train_batches(_cfg(batch_size=6), rank=0, world=4)


@pytest.mark.parametrize("name", ["code_or_prose", "arithmetic"])
def test_labels_mask_the_prompt_and_padding(name, tokenizer):
    src = tasks.TaskSource(f"task:{name}", tokenizer)
    b = src.train_batches(_cfg())(0)
    idx = src.train_indices(0, 8, seed=3)
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    for row, i in enumerate(idx):
        ex = src.train[i].example
        ids, mask, labels = b["input_ids"][row], b["attention_mask"][row], b["labels"][row]
        n = int(mask.sum())
        assert mask[:n].all() and not mask[n:].any() and (ids[n:] == pad).all()
        scored = (labels != -100).nonzero().flatten()
        # The labelled tokens are exactly the tail of the real tokens: the gold answer (+ eos).
        assert scored.tolist() == list(range(n - len(scored), n))
        assert torch.equal(labels[scored], ids[scored])
        target = tokenizer(ex.answer, add_special_tokens=False)["input_ids"]
        target += [eos] if tasks.TASKS[name].format == "generation" else []
        assert labels[scored].tolist() == target
        assert tokenizer.decode(ids[: n - len(scored)]) == ex.prompt


def test_long_prompts_are_cut_from_the_left_never_the_answer(tokenizer):
    src = tasks.TaskSource("task:sort_words", tokenizer)
    b = src.train_batches(_cfg(seq_len=16))(0)
    assert b["input_ids"].shape[1] <= 16
    cut = 0
    for row, i in enumerate(src.train_indices(0, 8, seed=3)):
        ex = src.train[i].example
        labels = b["labels"][row]
        answer = tokenizer(ex.answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        assert labels[labels != -100].tolist() == answer
        prompt = b["input_ids"][row][: int(b["attention_mask"][row].sum()) - len(answer)].tolist()
        full = tokenizer(ex.prompt, add_special_tokens=False)["input_ids"]
        assert prompt == full[len(full) - len(prompt):] and len(prompt) == min(len(full), 16 - len(answer))
        cut += len(prompt) < len(full)
    assert cut >= 4
    with pytest.raises(UserError, match="does not fit a sequence of 4 tokens"):
        src.train_batches(_cfg(seq_len=4))(0)


def test_choice_batch_holds_every_option(tokenizer, tiny_embedded):
    src = tasks.TaskSource("task:source", tokenizer)
    idx = src.train_indices(0, 32)
    cb = src.choice_batch(idx, seq_len=CONTEXT)
    n, c = len(idx), cb.num_options
    assert c == 4  # docstring_module has four options, the other choice tasks two, generation tasks one
    assert cb.input_ids.shape[0] == n * c and cb.option_mask.shape == (n, c)
    for j, i in enumerate(idx):
        t = src.train[i]
        opts = t.example.options or (t.example.answer,)
        assert cb.option_mask[j].tolist() == [k < len(opts) for k in range(c)]
        assert src.task_names[cb.task_ids[j]] == t.task and cb.gold[j] == max(t.example.label, 0)
        for k in range(c):
            labels = cb.labels[j * c + k]
            got = labels[labels != -100].tolist()
            if k < len(opts):
                want = tokenizer(opts[k], add_special_tokens=False)["input_ids"]
                want += [tokenizer.eos_token_id] if not t.example.options else []
                assert got == want
            else:
                assert got == []
    # Per-option NLL through the same function rank classification uses: (N*C,) -> (N, C).
    with torch.no_grad():
        sums, counts = scoring.continuation_nll(tiny_embedded.model, cb.model_inputs())
    assert sums.view(n, c)[~cb.option_mask].abs().max() == 0 and (counts.view(n, c)[cb.option_mask] > 0).all()


# ---- scoring ----------------------------------------------------------------------------------------

class TableLM(nn.Module):
    """A bigram model: the next-token log-probabilities depend only on the current token."""

    def __init__(self, logprobs: torch.Tensor):
        super().__init__()
        self.table = nn.Parameter(logprobs)
        self.config = types.SimpleNamespace(max_position_embeddings=64)

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        return types.SimpleNamespace(logits=self.table[input_ids])  # (B, T, V)


def test_rank_classification_uses_length_normalised_nll_on_a_known_model():
    v = 6
    lp = torch.full((v, v), -30.0)
    lp[0, 1], lp[0, 2] = -2.0, -1.0  # after 0: option A = [1] costs 2 nats, B starts with 1 nat
    lp[2, 3], lp[3, 4] = -1.0, -1.0  # B = [2, 3, 4] costs 1 nat per token, 3 in all
    lp[0, 5] = torch.log(1 - torch.exp(torch.tensor(-2.0)) - torch.exp(torch.tensor(-1.0)))
    for r in (2, 3):
        lp[r, 5] = torch.log(1 - torch.exp(torch.tensor(-1.0)))
    lp = lp.log_softmax(-1)  # (exactly the numbers above up to the e^-30 mass)
    model = TableLM(lp)
    res = scoring.rank_classify(model, [[0], [0]], [[[1], [2, 3, 4]], [[2, 3, 4], [1]]], [0, 1], pad_id=5)
    assert res.predictions == [1, 0]  # the summed NLL (2 < 3) would pick A; per token (2 > 1) picks B
    torch.testing.assert_close(torch.tensor(res.scores), torch.tensor([[2.0, 1.0], [1.0, 2.0]]), atol=1e-5, rtol=0)
    assert res.gold_nll == pytest.approx(4.0, abs=1e-4) and res.gold_tokens == 2
    assert res.accuracy([0, 1]) == 0.0 and res.accuracy([1, 0]) == 1.0


def test_rank_classification_matches_a_slow_reference_on_the_tiny_model(tiny_embedded):
    model, tok = tiny_embedded.model, tiny_embedded.tokenizer
    src = tasks.TaskSource("task:docstring_module", tok)
    exs = tasks.TASKS["docstring_module"].examples("validation")[:6] + \
        tasks.TASKS["code_or_prose"].examples("validation")[:6]
    prompts = [src.fit_prompt(tok(e.prompt)["input_ids"], 8, CONTEXT) for e in exs]
    options = [[tok(o)["input_ids"] for o in e.options] for e in exs]
    res = scoring.rank_classify(model, prompts, options, [e.label for e in exs], tok.pad_token_id, batch_size=5)
    for n, (p, opts) in enumerate(zip(prompts, options, strict=True)):
        ref = []
        for o in opts:  # one unpadded sequence at a time
            ids = torch.tensor([p + o])
            with torch.no_grad():
                logp = model(input_ids=ids).logits[0].double().log_softmax(-1)  # (T, V)
            ref.append(-sum(logp[len(p) - 1 + j, t].item() for j, t in enumerate(o)) / len(o))
        torch.testing.assert_close(torch.tensor(res.scores[n]), torch.tensor(ref), atol=2e-4, rtol=0)
        assert res.predictions[n] == min(range(len(ref)), key=ref.__getitem__)


def test_exact_match_and_greedy_generation_stop():
    assert scoring.exact_match(" 42\nmore", " 42") and scoring.exact_match("42 ", " 42")
    assert not scoring.exact_match(" 421", " 42") and not scoring.exact_match(" 4 2", " 42")
    assert not scoring.exact_match("", " 42")
    v = 10
    lp = torch.full((v, v), -20.0)
    for t in range(v):
        lp[t, (t + 1) % v] = 0.0  # always the successor; 9 is the stop token
    model = TableLM(lp.log_softmax(-1))
    out = scoring.greedy_generate(model, [[3], [7], [1, 2]], [3, 5, 0], stop_ids={9}, pad_id=0, batch_size=2)
    assert out == [[4, 5, 6], [8, 9], []]


class OracleLM(nn.Module):
    """Answers the prompts of ``known`` (prefix -> next token) and says ``wrong`` everywhere else."""

    def __init__(self, known: dict[tuple[int, ...], int], vocab: int, wrong: int):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))
        self.known, self.vocab, self.wrong = known, vocab, wrong
        self.config = types.SimpleNamespace(max_position_embeddings=64)

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        b, t = input_ids.shape
        logits = torch.zeros(b, t, self.vocab)
        for i in range(b):
            row = input_ids[i].tolist()
            for j in range(t):
                logits[i, j, self.known.get(tuple(row[: j + 1]), self.wrong)] = 10.0
        return types.SimpleNamespace(logits=logits)


def test_generation_tasks_are_scored_by_exact_match_end_to_end(tokenizer):
    src = tasks.TaskSource("task:arithmetic?eval=10", tokenizer)
    exs = tasks.TASKS["arithmetic"].examples("validation")[:10]
    known = {}
    for n, e in enumerate(exs):
        p = tokenizer(e.prompt)["input_ids"]
        a = tokenizer(e.answer)["input_ids"] + [tokenizer.eos_token_id]
        if n % 2 == 1:
            a = tokenizer(" 1000")["input_ids"] + [tokenizer.eos_token_id]  # a wrong answer, cleanly ended
        if n == 4:
            a = a[:-1] + tokenizer(" 7")["input_ids"] + [tokenizer.eos_token_id]  # right answer, then more
        for j in range(len(a)):
            known[tuple(p + a[:j])] = a[j]
    model = OracleLM(known, len(tokenizer), wrong=tokenizer.eos_token_id)
    r = src.evaluate(model, _cfg())
    assert r["metric"] == "exact_match" and r["examples"] == 10
    assert r["accuracy"] == r["exact_match"] == pytest.approx(4 / 10)  # 0, 2, 6, 8 (4 ran on)


# ---- training -----------------------------------------------------------------------------------------

def test_lora_training_on_an_easy_task_raises_accuracy(tiny_embedded_path, tmp_path):
    from efficientgpt.models.loading import load_model
    from efficientgpt.peft.lora import LoraConfig

    loaded = load_model(str(tiny_embedded_path))  # a fresh copy: the method attaches to it
    out = pipeline.tune("embedded:tiny", "lora", LoraConfig(rank=8, targets=["all-linear"]),
                        data="task:code_or_prose?eval=100", out=tmp_path / "D", loaded=loaded,
                        train={"steps": 60, "batch_size": 16, "lr": 3e-3, "seed": 0, "progress": False})
    before, after = out["eval"]["before"], out["eval"]["after"]
    assert before["metric"] == "accuracy" and before["examples"] == 100
    # Measured: 0.70 -> 0.92 (seeds 1, 2: 0.95, 0.97); a model stuck on the label prior stays at 0.70.
    assert after["accuracy"] >= before["accuracy"] + 0.15, (before["accuracy"], after["accuracy"])
    assert after["loss"] < before["loss"]
    saved = json.loads((tmp_path / "D" / "result.json").read_text())
    assert saved["data"]["tasks"][0]["name"] == "code_or_prose"


def test_mixture_evaluation_reports_each_task(tokenizer, tiny_embedded):
    src = tasks.TaskSource("task:target?eval=8", tokenizer)
    r = src.evaluate(tiny_embedded.model, _cfg())
    assert set(r["tasks"]) == {t.name for t in tasks.target_tasks()} and r["metric"] == "mean_task_score"
    assert r["accuracy"] == pytest.approx(sum(t["accuracy"] for t in r["tasks"].values()) / len(r["tasks"]))
    assert r["examples"] == sum(min(8, len(tasks.TASKS[n].examples("validation"))) for n in r["tasks"])
    assert r["loss"] > 0
    # The fingerprint names the data (examples, shots, seed), not how much of it evaluation reads.
    assert pipeline.open_data("task:target", tokenizer).fingerprint == src.fingerprint
    assert tasks.TaskSource("task:target@8", tokenizer).fingerprint != src.fingerprint


# ---- benchmarks in the hub layout ---------------------------------------------------------------------

def _write_parquet(path, rows):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def test_local_glue_layout_benchmarks(tmp_path, tokenizer, tiny_embedded):
    pytest.importorskip("datasets")
    sst2 = tmp_path / "glue" / "sst2"
    words = ["a fine film", "dull and long", "great fun", "a mess", "moving", "boring", "lovely", "awful"]
    _write_parquet(sst2 / "train-00000-of-00001.parquet",
                   [{"sentence": w, "label": i % 2, "idx": i} for i, w in enumerate(words)])
    _write_parquet(sst2 / "validation-00000-of-00001.parquet",
                   [{"sentence": w + " indeed", "label": (i + 1) % 2, "idx": i} for i, w in enumerate(words[:6])])
    _write_parquet(sst2 / "test-00000-of-00001.parquet", [{"sentence": "unknown", "label": -1, "idx": 0}])
    src = tasks.TaskSource(f"task:hf:{sst2}@4", tokenizer)
    task = src.tasks[0]
    assert task.name == "glue/sst2" and task.format == "choice" and task.role == "benchmark"
    assert len(src.train) == 4
    ex = task.examples("validation")[0]
    assert ex.prompt == "a fine film indeed\nSentiment:" and ex.options == (" negative", " positive")
    assert ex.answer == " positive" and ex.label == 1
    r = src.evaluate(tiny_embedded.model, _cfg())
    assert r["metric"] == "accuracy" and r["examples"] == 6 and 0 <= r["accuracy"] <= 1
    with pytest.raises(UserError, match="has no labelled rows"):
        task.examples("test")
    b = src.train_batches(_cfg(batch_size=4))(0)
    assert b["input_ids"].shape[0] == 4

    rte = tmp_path / "super_glue" / "rte"  # SuperGLUE's column names, jsonl files
    rte.mkdir(parents=True)
    (rte / "train.jsonl").write_text(json.dumps({"premise": "It rains.", "hypothesis": "It is wet.", "label": 0,
                                                 "idx": 0}) + "\n")
    (rte / "validation.jsonl").write_text(json.dumps({"premise": "It is dry.", "hypothesis": "It rains.",
                                                      "label": 1, "idx": 0}) + "\n")
    ex = tasks.resolve(f"hf:{rte}")[0].examples("validation")[0]
    assert ex.prompt == "It is dry.\nQuestion: It rains. True or False?\nAnswer:" and ex.answer == " False"

    copa = tmp_path / "copa"
    copa.mkdir()
    (copa / "validation.jsonl").write_text(json.dumps({"premise": "The man fell.", "choice1": "He slipped.",
                                                       "choice2": "He sang.", "question": "cause", "label": 0}))
    ex = tasks.resolve(f"hf:{copa}")[0].examples("validation")[0]
    assert ex.prompt == "The man fell because" and ex.options == (" he slipped.", " he sang.") and ex.label == 0

    (tmp_path / "mystery").mkdir()
    with pytest.raises(UserError, match="cannot tell which benchmark"):
        tasks.resolve(f"hf:{tmp_path / 'mystery'}")
    with pytest.raises(UserError, match="does not exist"):
        tasks.resolve(f"hf:{tmp_path / 'nowhere'}")


# ---- command line -------------------------------------------------------------------------------------

def test_tasks_command_json(capsys):
    from efficientgpt.commands import tasks as tasks_command

    parser = argparse.ArgumentParser()
    tasks_command.register(parser.add_subparsers())
    args = parser.parse_args(["tasks", "--json"])
    assert args.func(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["count"] == len(tasks.TASKS) and set(out["source"]) | set(out["target"]) == set(tasks.TASKS)
    row = next(r for r in out["tasks"] if r["name"] == "copy_words")
    assert row["format"] == "generation" and row["role"] == "source" and row["description"]
    assert row["splits"] == tasks.TASKS["copy_words"].split_sizes()
    assert {b["name"] for b in out["benchmarks"]} >= {"glue/sst2", "super_glue/boolq", "super_glue/copa"}
    args = parser.parse_args(["tasks", "--role", "target", "--json"])
    args.func(args)
    assert {r["role"] for r in json.loads(capsys.readouterr().out)["tasks"]} == {"target"}


def _main(capsys, *argv):
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    assert code == 0, captured.err[-2000:]
    return json.loads(captured.out)


def test_tune_and_eval_commands_on_a_task(tmp_path, capsys, tiny_embedded_path):
    d = tmp_path / "D"
    res = _main(capsys, "tune", "--model", "embedded:tiny", "--method", "lora", "--data", "task:copy_words?eval=8",
                "--steps", "3", "--batch-size", "4", "--out", str(d), "--json", "--no-progress")
    assert res["eval"]["after"]["metric"] == "exact_match"
    ev = _main(capsys, "eval", "--model", "embedded:tiny", "--delta", str(d), "--data", "task:code_or_prose",
               "--max-examples", "12", "--json")
    assert ev["metric"] == "accuracy" and ev["examples"] == 12 and 0 <= ev["accuracy"] <= 1
    assert ev["delta"]["method"] == "lora" and ev["loss"] > 0 and ev["task"] == "code_or_prose"
    ev = _main(capsys, "eval", "--model", "embedded:tiny", "--data", "task:kv_lookup?eval=5", "--split", "test",
               "--json")
    assert ev["metric"] == "exact_match" and ev["examples"] == 5 and ev["split"] == "test"
    assert cli.main(["eval", "--model", "embedded:tiny", "--data", "task:nope"]) == 1
    assert "unknown task 'nope'" in capsys.readouterr().err
