"""``survey validate``: every problem reported once, with its file and line, and exit status 1."""

from __future__ import annotations

import datetime
import json
import textwrap

import pytest

from conftest import run_survey as run
from efficientgpt.survey import schema, store

GOOD = """\
papers:
  - id: alpha
    title: "Alpha: A Paper"
    venue: ICLR
    year: 2020
    categories: [pruning]
    arxiv: '2001.00001'

  - id: beta
    title: "Beta: Another Paper"
    venue: NeurIPS
    year: 2021
    categories: [pruning]
    url: https://example.org/beta
"""


def write(tmp_path, text: str):
    path = tmp_path / "papers.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def problems_of(path) -> list[str]:
    _, problems = store.check(path)
    return [str(p) for p in problems]


def test_clean_file_passes(tmp_path, capsys):
    path = write(tmp_path, GOOD)
    assert problems_of(path) == []
    code, out, _ = run(["validate", "--papers", str(path)], capsys)
    assert code == 0 and "no problems" in out


def test_unknown_venue_names_file_line_and_allowed_values(tmp_path):
    path = write(tmp_path, GOOD.replace("venue: NeurIPS", "venue: NeurlPS"))
    [problem] = problems_of(path)
    assert problem.startswith(f"{path}:11: paper 'beta': unknown venue 'NeurlPS'")
    assert "did you mean 'NeurIPS'" in problem and "allowed: NeurIPS, ICLR" in problem


def test_every_problem_is_listed_and_exit_status_is_1(tmp_path, capsys):
    bad = GOOD + """
  - id: Gamma_Bad
    title: "Alpha: a paper!"
    venue: Arxiv
    year: 1970
    categories: [pruning, nonsense]
    arxiv: 2001.00001
    doi: https://doi.org/10.1000/ABC
    url: ftp://example.org/x
    datasets: [Wikitext2]
    colour: blue
"""
    path = write(tmp_path, bad)
    code, out, err = run(["validate", "--papers", str(path)], capsys)
    assert code == 1
    text = out + err
    for needle in [
        ":16: paper 'Gamma_Bad': id 'Gamma_Bad' must be kebab-case",
        ":18: paper 'Gamma_Bad': unknown venue 'Arxiv' (did you mean 'arXiv'?)",
        ":19: paper 'Gamma_Bad': year 1970 is outside 1980..",
        ":20: paper 'Gamma_Bad': unknown category 'nonsense'",
        ":21: paper 'Gamma_Bad': arxiv id 2001.00001 must be a quoted string",
        ":22: paper 'Gamma_Bad': doi 'https://doi.org/10.1000/ABC' is not a normalised DOI",
        "(write '10.1000/abc')",
        ":23: paper 'Gamma_Bad': url 'ftp://example.org/x' scheme 'ftp' is not http or https",
        ":24: paper 'Gamma_Bad': unknown dataset 'Wikitext2'",
        ":25: paper 'Gamma_Bad': unknown field 'colour'",
    ]:
        assert needle in text, needle
    assert "problems found" in out


def test_missing_required_fields(tmp_path):
    path = write(tmp_path, """\
        papers:
          - id: lonely
            categories: [pruning]
        """)
    problems = problems_of(path)
    assert any("paper 'lonely': missing required field 'title'" in p for p in problems)
    assert any("missing required field 'year'" in p for p in problems)
    assert any("missing required field 'venue' (only entries marked 'unlinked: true'" in p for p in problems)
    assert all(p.startswith(f"{path}:2:") for p in problems)


def test_unlinked_entries_may_omit_venue(tmp_path):
    path = write(tmp_path, """\
        papers:
          - id: a-survey
            title: "Some Survey"
            year: 2023
            categories: [surveys]
            unlinked: true
        """)
    assert problems_of(path) == []


def test_duplicates_by_title_arxiv_doi_and_url(tmp_path):
    path = write(tmp_path, GOOD + """
  - id: gamma
    title: "ALPHA -- a paper"
    venue: ICML
    year: 2022
    categories: [pruning]
    arxiv: '2001.00001'
    doi: 10.1000/xyz

  - id: gamma
    title: "Delta"
    venue: ICML
    year: 2022
    categories: [pruning]
    url: https://example.org/beta/
    doi: 10.1000/xyz
""")
    problems = problems_of(path)
    assert problems == [
        f"{path}:16: paper 'gamma': duplicate title 'ALPHA -- a paper', the same as 'Alpha: A Paper' "
        "(on paper 'alpha' at line 2)",
        f"{path}:16: paper 'gamma': duplicate arXiv id '2001.00001' (on paper 'alpha' at line 2)",
        f"{path}:24: paper 'gamma': duplicate id 'gamma' (on paper 'gamma' at line 16)",
        f"{path}:24: paper 'gamma': duplicate DOI '10.1000/xyz' (on paper 'gamma' at line 16)",
        f"{path}:24: paper 'gamma': duplicate paper URL 'https://example.org/beta' (on paper 'beta' at line 9)",
    ]


def test_sort_order_is_enforced(tmp_path):
    text = GOOD.replace("year: 2020", "year: 2022")
    problems = problems_of(write(tmp_path, text))
    assert len(problems) == 1
    assert "paper 'beta' is out of order: it belongs before 'alpha'" in problems[0]


def test_year_upper_bound_is_next_year(tmp_path):
    limit = datetime.date.today().year + 1
    assert problems_of(write(tmp_path, GOOD.replace("year: 2021", f"year: {limit}"))) == []
    [problem] = problems_of(write(tmp_path, GOOD.replace("year: 2021", f"year: {limit + 1}")))
    assert f"year {limit + 1} is outside 1980..{limit}" in problem


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        ("papers:\n  - id: x\n    title: [unclosed\n", 4, "malformed YAML"),
        ("papers:\n  - id: x\n    id: y\n", 3, "malformed YAML"),
        ("papers:\n  - id: x\n   title: bad indent\n", 3, "malformed YAML"),
    ],
)
def test_malformed_yaml_reports_its_line(tmp_path, capsys, text, line, fragment):
    path = write(tmp_path, text)
    [problem] = problems_of(path)
    assert problem.startswith(f"{path}:{line}: {fragment}")
    code, out, _ = run(["validate", "--papers", str(path), "--json"], capsys)
    assert code == 1
    data = json.loads(out)
    assert data["ok"] is False and data["problems"][0]["line"] == line


def test_other_commands_refuse_invalid_data(tmp_path, capsys):
    path = write(tmp_path, GOOD.replace("venue: NeurIPS", "venue: NeurlPS"))
    code, _, err = run(["list", "--papers", str(path)], capsys)
    assert code == 1
    assert "1 problem in the survey data" in err and "unknown venue 'NeurlPS'" in err


def test_taxonomy_problems_are_reported(tmp_path):
    tax = tmp_path / "taxonomy.yaml"
    tax.write_text(textwrap.dedent("""\
        categories:
          - id: Bad Id
            title: x
            description: y
          - id: pruning
            title: Pruning
            description: Removing weights.
        venues:
          - {name: ICLR, kind: conference, full: International Conference on Learning Representations}
          - {name: Foo, kind: magazine}
        datasets:
          - {name: GLUE, description: a, b}
        """), encoding="utf-8")
    papers = write(tmp_path, "papers: []\n")
    _, problems = store.check(papers, tax)
    text = "\n".join(map(str, problems))
    assert f"{tax}:2: category id 'Bad Id' must be kebab-case" in text
    assert f"{tax}:10: venue 'Foo': kind 'magazine' is not one of conference" in text
    assert f"{tax}:12: dataset 'GLUE': unknown field 'b'" in text


def test_normalisers():
    assert schema.normalize_arxiv("arXiv:2106.09685v2") == "2106.09685"
    assert schema.normalize_arxiv("https://arxiv.org/abs/2106.09685v1") == "2106.09685"
    assert schema.normalize_arxiv("https://arxiv.org/pdf/2106.09685.pdf") == "2106.09685"
    assert schema.normalize_doi("https://doi.org/10.1038/S42256-023-00626-4") == "10.1038/s42256-023-00626-4"
    assert schema.normalize_doi("doi:10.1145/ABC") == "10.1145/abc"
    assert schema.normalize_title("Ünïcode:  Title!") == "unicode title"


def test_output_json_keeps_stdout_machine_readable(tmp_path, capsys):
    path = write(tmp_path, GOOD.replace("venue: NeurIPS", "venue: NeurlPS"))
    code, out, err = run(["validate", "--papers", str(path), "--json"], capsys)
    assert code == 1
    assert json.loads(out)["problems"][0]["message"].startswith("paper 'beta': unknown venue")
    assert "unknown venue" in err  # the human listing went to stderr
