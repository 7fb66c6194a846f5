"""Rendering: Markdown layout, implementation links, measured results, ``--check``, BibTeX, datasets."""

from __future__ import annotations

import json
import textwrap
from dataclasses import dataclass

import pytest

from conftest import run_survey as run
from efficientgpt import registry
from efficientgpt.survey import bibtex, results, store
from efficientgpt.survey.render import render, slug

PAPERS = """\
papers:
  - id: toy-tuning
    title: "Toy-Tuning: Tuning | With Toys"
    authors: [Émile Zola, Ada Lovelace]
    venue: ICLR
    year: 2022
    categories: [parameter-efficient-tuning]
    arxiv: '2201.00001'
    code: https://github.com/example/toy
    datasets: [GLUE]
    implementation: toy_method

  - id: toy-library
    title: "Toy Library"
    venue: GitHub
    year: 2023
    categories: [parameter-efficient-tuning]
    code: https://github.com/example/lib
"""


@dataclass
class ToyConfig:
    rank: int = 1


def toy_apply(model, config):
    return model


# A module inside the package, so the derived path is a real file of this repository.
toy_apply.__module__ = "efficientgpt.survey.results"


@pytest.fixture
def toy_registered(monkeypatch):
    spec = registry.MethodSpec(name="toy_method", family="peft", config_cls=ToyConfig, apply=toy_apply,
                               paper="toy-tuning", summary="a throwaway method for tests")
    monkeypatch.setitem(registry._REGISTRY, "toy_method", spec)
    return spec


@pytest.fixture
def papers(tmp_path):
    path = tmp_path / "papers.yaml"
    path.write_text(PAPERS, encoding="utf-8")
    return path


def write_run(directory, name, **data):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_text(json.dumps(data), encoding="utf-8")


def test_unregistered_implementation_is_a_validation_error(papers):
    _, problems = store.check(papers)
    [problem] = problems
    assert str(problem).startswith(f"{papers}:2: paper 'toy-tuning': implementation 'toy_method' names no "
                                   "registered method")


def test_registered_implementation_renders_impl_link_and_best_run(papers, toy_registered, tmp_path):
    survey = store.load(papers)
    runs = tmp_path / "runs"
    write_run(runs, "a.json", method="toy_method", status="ok",
              metrics={"val_ppl": 14.25, "trainable_pct": 0.5})
    write_run(runs, "b.json", method="toy_method", status="ok",
              metrics={"val_ppl": 12.34, "accuracy": 0.8531, "trainable_pct": 0.2417})
    write_run(runs, "c.json", method="toy_method", status="failed", metrics={"val_ppl": 1.0})
    write_run(runs, "d.json", method="other", status="ok", metrics={"val_ppl": 2.0})
    (runs / "broken.json").write_text("{not json", encoding="utf-8")
    text = render(survey, results_dir=runs, out_path=tmp_path / "SURVEY.md")
    line = next(ln for ln in text.splitlines() if ln.startswith("- Toy-Tuning"))
    assert line == (
        r"- Toy-Tuning: Tuning | With Toys, <ins>ICLR, 2022</ins> [[Paper](https://arxiv.org/abs/2201.00001)] "
        "[[Code](https://github.com/example/toy)] [[Impl](src/efficientgpt/survey/results.py)] "
        "· measured: ppl 12.3 · acc 0.853 · 0.242% trainable ([run](runs/b.json))"
    )
    # The library has no paper link and no implementation: no Paper, Impl or measured cell.
    lib = next(ln for ln in text.splitlines() if ln.startswith("- Toy Library"))
    assert lib == "- Toy Library, <ins>GitHub, 2023</ins> [[Code](https://github.com/example/lib)]"


def test_modules_link_framework_entries_and_unknown_modules_are_errors(toy_registered, tmp_path):
    path = tmp_path / "papers.yaml"
    path.write_text(PAPERS.replace("    code: https://github.com/example/lib\n",
                                   "    code: https://github.com/example/lib\n    modules: [efficientgpt.peft.core]\n"),
                    encoding="utf-8")
    survey = store.load(path)
    assert survey.paper("toy-library").modules == ("efficientgpt.peft.core",)
    text = render(survey, results_dir=tmp_path / "none", out_path=tmp_path / "SURVEY.md")
    lib = next(ln for ln in text.splitlines() if ln.startswith("- Toy Library"))
    assert lib.endswith("[[Code](https://github.com/example/lib)] [[Impl](src/efficientgpt/peft/core.py)]")

    path.write_text(PAPERS.replace("    code: https://github.com/example/lib\n",
                                   "    code: https://github.com/example/lib\n"
                                   "    modules: [efficientgpt.peft.nothing, os.path]\n"), encoding="utf-8")
    _, problems = store.check(path)
    assert [p.message for p in problems if "module" in p.message] == [
        "paper 'toy-library': module 'efficientgpt.peft.nothing' does not exist (no file nothing.py in the package)",
        "paper 'toy-library': module 'os.path' must be a dotted module name of this package, e.g. "
        "'efficientgpt.peft.core'",
    ]


def test_no_results_directory_means_no_measured_cell(papers, toy_registered, tmp_path):
    text = render(store.load(papers), results_dir=tmp_path / "missing", out_path=tmp_path / "SURVEY.md")
    assert "· measured:" not in text and "[[Impl](src/efficientgpt/survey/results.py)]" in text


def test_metric_formatting_and_run_choice():
    assert results.format_metrics({"trainable_params": 1_234_567}) == "1.23M trainable params"
    assert results.format_metrics({"val_ppl": float("nan"), "accuracy": 0.5}) == "acc 0.5"
    assert results.format_metrics({}) == ""
    from pathlib import Path

    no_ppl = results.Run("m", Path("a.json"), {"accuracy": 0.9})
    worse = results.Run("m", Path("b.json"), {"val_ppl": 20.0})
    better = results.Run("m", Path("c.json"), {"val_ppl": 10.0})
    assert results.best_run([no_ppl, worse, better]) is better
    assert results.best_run([no_ppl]) is no_ppl and results.best_run([]) is None
    main = results.Run("m", Path("m.json"), {"val_ppl": 200.0})  # the bench's main data: always preferred
    task = results.Run("m", Path("m-task-x.json"), {"val_ppl": 3.0})
    assert results.best_run([task, main]) is main


def test_layout_toc_and_dataset_index(papers, toy_registered, tmp_path):
    text = render(store.load(papers), results_dir=None, out_path=tmp_path / "SURVEY.md")
    assert text.startswith("# Efficient GPT: Survey, Papers, Benchmarks, and Open-Source Resources\n")
    sections = [ln for ln in text.splitlines() if ln.startswith("#")]
    assert sections[:4] == ["# Efficient GPT: Survey, Papers, Benchmarks, and Open-Source Resources",
                            "## What is Efficient GPT About?", "## Survey", "## Table of Contents"]
    assert "### Quantization" in sections and sections[-1] == "## Datasets and Benchmarks"
    assert "  - [Low-rank Decomposition](#low-rank-decomposition)" in text
    assert "| GLUE | General Language Understanding Evaluation suite (MNLI, QQP, SST-2, ...) | Toy-Tuning (2022) |" \
        in text
    assert slug("Low-rank Decomposition") == "low-rank-decomposition"


def test_render_is_deterministic_and_check_detects_staleness(papers, toy_registered, tmp_path, capsys,
                                                             monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, _ = run(["render", "--papers", str(papers), "--check"], capsys)
    assert code == 1  # no SURVEY.md yet
    assert run(["render", "--papers", str(papers)], capsys)[0] == 0
    first = (tmp_path / "SURVEY.md").read_bytes()
    code, out, _ = run(["render", "--papers", str(papers), "--json"], capsys)
    assert code == 0 and json.loads(out)["written"] is False
    assert (tmp_path / "SURVEY.md").read_bytes() == first
    assert run(["render", "--papers", str(papers), "--check"], capsys)[0] == 0

    (tmp_path / "SURVEY.md").write_text("hand edited\n", encoding="utf-8")
    code, out, err = run(["render", "--papers", str(papers), "--check"], capsys)
    assert code == 1
    assert f"SURVEY.md is out of date with the survey data; regenerate it with: efficientgpt survey render " \
           f"--papers {papers}" in out + err
    assert (tmp_path / "SURVEY.md").read_text(encoding="utf-8") == "hand edited\n"


def test_bibtex_entry_types_and_stable_keys(papers, toy_registered):
    survey = store.load(papers)
    text = bibtex.render(survey.papers, survey.taxonomy)
    assert text.startswith(textwrap.dedent("""\
        @inproceedings{zola2022toytuning,
          author        = {Émile Zola and Ada Lovelace},
          title         = {{Toy-Tuning: Tuning | With Toys}},
          booktitle     = {International Conference on Learning Representations},
          year          = {2022},
          eprint        = {2201.00001},
          archiveprefix = {arXiv},
          url           = {https://arxiv.org/abs/2201.00001}
        }"""))
    assert "@misc{toylibrary2023,\n  title        = {{Toy Library}},\n  howpublished = {\\url{https://github.com/" \
        in text


def test_bibtex_of_shipped_data_by_category_and_ids(capsys):
    code, out, _ = run(["bibtex", "--category", "model-compression", "--json"], capsys)
    assert code == 0
    data = json.loads(out)
    assert "frantar2023sparsegpt" in data["keys"] and "frantar2023gptq" in data["keys"]  # children included
    assert "hu2022lora" not in data["keys"]
    code, out, _ = run(["bibtex", "gptq", "hinton-distillation"], capsys)
    assert "@article{hinton2015hintondistillation," in out and "journal       = {arXiv preprint arXiv:1503.02531}" in out
    assert run(["bibtex", "no-such-paper"], capsys)[0] == 1


def test_query_commands(capsys):
    code, out, _ = run(["search", "quantization", "--venue", "iclr", "--year", "2023-2024", "--json"], capsys)
    ids = {p["id"] for p in json.loads(out)["papers"]}
    assert code == 0 and {"gptq", "omniquant"} <= ids and "awq" not in ids
    code, out, _ = run(["list", "--category", "quantization", "--dataset", "wikitext-2", "--json"], capsys)
    assert {"gptq", "awq"} <= {p["id"] for p in json.loads(out)["papers"]}
    code, out, _ = run(["list", "--implemented", "--json"], capsys)
    assert json.loads(out)["count"] == sum(1 for p in store.load().papers if p.implementation or p.modules)
    code, out, _ = run(["show", "sparsegpt", "--json"], capsys)
    assert json.loads(out)["paper"]["arxiv"] == "2301.00774"
    code, _, err = run(["show", "sparsegtp"], capsys)
    assert code == 1 and "did you mean 'sparsegpt'" in err
    code, _, err = run(["list", "--category", "prunning"], capsys)
    assert code == 1 and "unknown category 'prunning'" in err
    code, _, err = run(["list", "--year", "twenty"], capsys)
    assert code == 1 and "--year 'twenty'" in err


def test_datasets_command(capsys):
    code, out, _ = run(["datasets", "--json"], capsys)
    rows = {r["name"]: r["papers"] for r in json.loads(out)["datasets"]}
    assert code == 0 and "gptq" in rows["WikiText-2"] and all(rows.values())
    code, out, _ = run(["datasets", "--all", "--json"], capsys)
    assert json.loads(out)["count"] >= len(rows)
