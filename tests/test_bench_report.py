"""The committed benchmark results: every file matches the schema, and report.md and the README's
results section are exactly what the committed JSON renders (regenerate with
``efficientgpt bench report --results benchmarks/results --readme README.md``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from efficientgpt.bench import report, schema

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"

pytestmark = pytest.mark.skipif(not any(RESULTS.glob("*.json")), reason="no committed benchmark results")


def test_committed_runs_match_the_schema():
    runs = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))]
    bench_runs = [r for r in runs if isinstance(r, dict) and r.get("schema") == schema.SCHEMA]
    assert bench_runs, "benchmarks/results has JSON files but no benchmark runs"
    for run in bench_runs:
        schema.validate(run)
    assert any(r["method"] == "base" and r["status"] == "ok" for r in bench_runs)


def test_readme_and_report_are_not_stale():
    stale = report.check(RESULTS, README)
    assert not stale, ("\n".join(stale) + "\nregenerate with: efficientgpt bench report --results "
                       "benchmarks/results --readme README.md")


def test_readme_section_is_the_last_thing_in_the_readme():
    text = README.read_text(encoding="utf-8")
    assert text.count(report.START) == 1 and text.count(report.END) == 1
    assert text.rstrip().endswith(report.END)
