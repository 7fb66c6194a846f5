"""The living survey: a curated list of efficient GPT/LLM papers kept as validated data.

``data/taxonomy.yaml`` holds the category tree and the controlled lists of venues and datasets;
``data/papers.yaml`` holds one entry per paper. :mod:`~efficientgpt.survey.schema` defines and checks
the entries, :mod:`~efficientgpt.survey.store` reads and writes the files, and the renderers turn
them into ``SURVEY.md`` (:mod:`~efficientgpt.survey.render`) and BibTeX
(:mod:`~efficientgpt.survey.bibtex`). Entries link to this repository's implementations through the
method registry and to measured runs through the benchmark JSON files
(:mod:`~efficientgpt.survey.results`). ``efficientgpt survey --help`` lists the commands.

The package imports nothing heavy: the registry (and with it torch) is loaded only when an entry
names an implementation.
"""

from efficientgpt.survey.schema import Category, Dataset, Paper, Problem, Taxonomy, Venue
from efficientgpt.survey.store import DEFAULT_PAPERS, DEFAULT_TAXONOMY, Survey, SurveyDataError, check, load

__all__ = [
    "Category", "Dataset", "Paper", "Problem", "Taxonomy", "Venue",
    "DEFAULT_PAPERS", "DEFAULT_TAXONOMY", "Survey", "SurveyDataError", "check", "load",
]  # fmt: skip
