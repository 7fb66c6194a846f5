"""``survey add``: validated before writing, inserted in order, comments kept, atomic."""

from __future__ import annotations

import json
import shutil
import sys

import pytest

from conftest import run_survey as run
from efficientgpt.survey import store


@pytest.fixture
def papers(tmp_path):
    path = tmp_path / "papers.yaml"
    shutil.copy(store.DEFAULT_PAPERS, path)
    return path


GPTQ_LIKE = ["--title", "A New Quantizer: Fewer Bits", "--venue", "ICLR", "--year", "2023",
             "--category", "quantization", "--dataset", "WikiText-2", "--tag", "post-training"]


def test_add_inserts_in_sort_order_and_keeps_everything_else(papers, capsys):
    before = papers.read_text(encoding="utf-8")
    code, out, _ = run(["add", "--file", str(papers), "--id", "new-quantizer", *GPTQ_LIKE,
                        "--arxiv", "arXiv:2399.00001v3", "--doi", "https://doi.org/10.5555/ABC.1",
                        "--author", "Ada Lovelace", "--author", "Alan Turing", "--json"], capsys)
    assert code == 0, out
    added = json.loads(out)["added"]
    assert added["arxiv"] == "2399.00001" and added["doi"] == "10.5555/abc.1"
    after = papers.read_text(encoding="utf-8")
    # Only lines were added: every original line (comments included) is still there, in order.
    old_lines, new_lines = before.splitlines(), after.splitlines()
    it = iter(new_lines)
    assert all(any(line == n for n in it) for line in old_lines)
    assert len(new_lines) - len(old_lines) == 11  # blank separator + 10 fields
    assert "    arxiv: '2399.00001'" in new_lines
    survey, problems = store.check(papers)
    assert problems == []
    ids = [p.id for p in survey.papers]
    # 2023 quantization papers sort by id: gptq < new-quantizer < quip.
    assert ids.index("gptq") < ids.index("new-quantizer") < ids.index("quip")


def test_add_writes_modules_and_refuses_one_that_is_not_in_the_package(papers, capsys):
    code, out, _ = run(["add", "--file", str(papers), "--id", "new-quantizer", *GPTQ_LIKE,
                        "--module", "efficientgpt.compress.quant", "--json"], capsys)
    assert code == 0 and json.loads(out)["added"]["modules"] == ["efficientgpt.compress.quant"]
    assert "    modules: [efficientgpt.compress.quant]" in papers.read_text(encoding="utf-8").splitlines()
    before = papers.read_bytes()
    code, _, err = run(["add", "--file", str(papers), "--id", "other-quantizer", *GPTQ_LIKE,
                        "--module", "efficientgpt.compress.nothing"], capsys)
    assert code == 1 and "module 'efficientgpt.compress.nothing' does not exist" in err
    assert papers.read_bytes() == before


def test_add_at_the_end_of_a_category_goes_above_the_next_header(papers, capsys):
    code, _, _ = run(["add", "--file", str(papers), "--id", "zz-last-quantizer", *GPTQ_LIKE[:4], "--year", "2025",
                      "--category", "quantization", "--arxiv", "2501.99999"], capsys)
    assert code == 0
    text = papers.read_text(encoding="utf-8")
    assert text.index("id: zz-last-quantizer") < text.index("# Efficient training")
    assert text.index("id: spqr") < text.index("id: zz-last-quantizer")
    assert store.check(papers)[1] == []


def test_failed_validation_leaves_the_file_byte_identical(papers, capsys):
    before = papers.read_bytes()
    for bad in (
        ["--id", "lora", *GPTQ_LIKE],  # duplicate id
        ["--id", "x-paper", *GPTQ_LIKE[:2], "--venue", "NeurlPS", "--year", "2023", "--category", "pruning"],
        ["--id", "y-paper", *GPTQ_LIKE, "--arxiv", "2106.09685"],  # LoRA's arXiv id
        ["--id", "z-paper", *GPTQ_LIKE, "--code", "not a url"],
    ):
        code, _, err = run(["add", "--file", str(papers), *bad], capsys)
        assert code == 1 and "error:" in err
        assert papers.read_bytes() == before
    assert sorted(p.name for p in papers.parent.iterdir()) == ["papers.yaml"]  # no temp files left


def test_missing_flags_without_a_terminal_is_an_error(papers, capsys, monkeypatch):
    monkeypatch.setattr(sys.stdin, "isatty", lambda: False)
    code, _, err = run(["add", "--file", str(papers), "--id", "only-id"], capsys)
    assert code == 1
    assert "missing --title, --venue, --year, --category" in err


def test_interactive_prompt_fills_missing_fields(papers, capsys, monkeypatch):
    answers = iter(["Prompted Paper: A Study", "", "EMNLP", "2021", "parameter-efficient-tuning", "2104.99999",
                    "", "", "", "GLUE, SuperGLUE", "", ""])
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True)
    monkeypatch.setattr("builtins.input", lambda prompt="": next(answers))
    code, out, _ = run(["add", "--file", str(papers), "--id", "prompted-paper"], capsys)
    assert code == 0, out
    paper = store.load(papers).paper("prompted-paper")
    assert (paper.venue, paper.year, paper.datasets) == ("EMNLP", 2021, ("GLUE", "SuperGLUE"))


def test_add_to_an_empty_list(tmp_path, capsys):
    path = tmp_path / "papers.yaml"
    path.write_text("# my papers\npapers: []\n", encoding="utf-8")
    code, _, _ = run(["add", "--file", str(path), "--id", "first", *GPTQ_LIKE], capsys)
    assert code == 0
    text = path.read_text(encoding="utf-8")
    assert text.startswith("# my papers\npapers:\n  - id: first\n")
    assert [p.id for p in store.load(path).papers] == ["first"]


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "f.txt"
    path.write_text("old", encoding="utf-8")

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("os.replace", boom)
    with pytest.raises(OSError):
        store.atomic_write(path, "new")
    assert path.read_text(encoding="utf-8") == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]
