"""The shipped survey data: it validates, SURVEY.md is current, and the acceptance commands work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from efficientgpt.survey import store
from efficientgpt.survey.render import render

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def survey():
    return store.load()


def test_shipped_data_validates_clean():
    survey, problems = store.check()
    assert problems == []
    assert survey is not None and len(survey.papers) >= 60


def test_committed_survey_md_is_up_to_date(monkeypatch, survey):
    # The same comparison as `efficientgpt survey render --check` run from the repository root.
    monkeypatch.chdir(REPO)
    expected = render(survey, results_dir="benchmarks/results", out_path="SURVEY.md")
    assert (REPO / "SURVEY.md").read_text(encoding="utf-8") == expected, (
        "SURVEY.md is stale; regenerate it with: efficientgpt survey render"
    )


@pytest.mark.parametrize(
    "category",
    ["pruning", "knowledge-distillation", "low-rank-decomposition", "efficient-attention", "quantization",
     "efficient-training", "parameter-efficient-tuning"],
)
def test_every_topic_has_at_least_eight_papers(survey, category):
    assert sum(category in p.categories for p in survey.papers) >= 8


def test_seed_entries_are_present_and_corrected(survey):
    by_id = {p.id: p for p in survey.papers}
    # The seed's two surveys, kept as cited, and the published survey the first one grew into.
    assert {p.id for p in survey.papers if "surveys" in p.categories} == {
        "efficient-gpt-survey", "efficient-gpt-edge-computing", "efficient-llms-survey"}
    assert (by_id["efficient-llms-survey"].venue, by_id["efficient-llms-survey"].arxiv) == ("TMLR", "2312.03863")
    assert all(by_id[i].unlinked and by_id[i].paper_url is None
               for i in ("efficient-gpt-survey", "efficient-gpt-edge-computing"))
    for pid in ("peft", "peft-large-scale-plms", "lora", "dylora", "llama-adapter", "t-few",
                "peft-design-spaces", "pst", "compacter", "attempt"):
        assert "parameter-efficient-tuning" in by_id[pid].categories
    assert all(p.venue != "NeurlPS" for p in survey.papers)
    assert (by_id["t-few"].venue, by_id["t-few"].year) == ("NeurIPS", 2022)
    assert (by_id["compacter"].venue, by_id["compacter"].year) == ("NeurIPS", 2021)
    assert by_id["dylora"].code == "https://github.com/huawei-noah/Efficient-NLP/tree/main/DyLoRA"
    assert "huawei-noah/KD-NLP/tree/main/DyLoRA" in by_id["dylora"].notes
    assert (by_id["llama-adapter"].venue, by_id["llama-adapter"].year) == ("ICLR", 2024)
    assert by_id["llama-adapter"].arxiv == "2303.16199"


def test_no_implementation_names_yet_point_nowhere(survey):
    # Implementations are filled in as methods register; none may name a missing method.
    from efficientgpt import registry

    registered = {s.name for s in registry.methods()}
    for p in survey.papers:
        assert set(p.implementation) <= registered


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "efficientgpt", "survey", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(REPO / "src")})


def test_acceptance_commands():
    assert _cli("validate").returncode == 0
    check = _cli("render", "--check")
    assert check.returncode == 0, check.stdout + check.stderr

    listed = _cli("list", "--json")
    assert listed.returncode == 0
    data = json.loads(listed.stdout)
    assert data["count"] == len(data["papers"]) >= 60
    lora = next(p for p in data["papers"] if p["id"] == "lora")
    for field in ("title", "authors", "venue", "year", "categories", "url", "arxiv", "doi", "code",
                  "datasets", "tags", "notes", "implementation", "unlinked"):
        assert field in lora

    found = json.loads(_cli("search", "lora", "--json").stdout)
    ids = [p["id"] for p in found["papers"]]
    assert {"lora", "dylora", "qlora"} <= set(ids)
    # Best match first: the paper whose id is the word, then those with it in their title, then
    # those that only tag it (LLM-Pruner's LoRA recovery), whatever the file order.
    assert ids[0] == "lora"
    assert ids.index("qlora") < ids.index("llm-pruner") and ids.index("dylora") < ids.index("llm-pruner")

    bib = _cli("bibtex", "--category", "parameter-efficient-tuning")
    assert bib.returncode == 0
    assert "@inproceedings{hu2022lora," in bib.stdout
    assert "@misc{mangrulkar2022peft," in bib.stdout
    assert "@article{ding2023peftlargescaleplms," in bib.stdout


def test_survey_modules_do_not_import_torch():
    # Checking ``implementation`` names loads the method registry (and torch); the modules alone do not.
    code = ("import sys, argparse; import efficientgpt.survey.cli as c; from efficientgpt.survey import store, "
            "render, bibtex, links; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert out.stdout.strip() == "False", out.stderr
