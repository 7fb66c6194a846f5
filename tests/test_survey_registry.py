"""The registry and the survey point at each other: every method's paper is a survey entry, and an
entry that names implementations names registered methods whose paper it is."""

from __future__ import annotations

from efficientgpt import registry
from efficientgpt.survey import store


def test_every_method_cites_a_survey_entry_that_links_back():
    survey = store.load()
    papers = {p.id: p for p in survey.papers}
    for spec in registry.methods():
        assert spec.paper in papers, f"{spec.name}: paper id {spec.paper!r} is not in the survey"
    implemented = {name: p.id for p in survey.papers for name in p.implementation}
    for name, paper_id in implemented.items():
        assert registry.get(name).paper == paper_id, (name, paper_id)
    # Each method whose paper is the method's own is linked from that entry. Baselines without a paper
    # of their own cite the closest entry: full fine-tuning, round-to-nearest, plain truncated SVD.
    stand_ins = {"full", "rtn", "svd"}
    for spec in registry.methods():
        if spec.name not in stand_ins:
            assert spec.name in papers[spec.paper].implementation, f"{spec.paper} does not link {spec.name}"
