"""BibTeX for survey entries.

Entry types follow the venue's kind: ``@inproceedings`` for conferences, ``@article`` for journals
and arXiv preprints, ``@misc`` for software. Keys are ``<first author's surname><year><id>`` with
the id's hyphens removed (``hu2022lora``), or ``<id><year>`` without authors: they depend only on the
entry, so they never change when other entries are added, and the id makes them unique.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable

from efficientgpt.survey.schema import Paper, Taxonomy


def _ascii(text: str) -> str:
    t = unicodedata.normalize("NFKD", text)
    return "".join(ch for ch in t if not unicodedata.combining(ch))


def cite_key(paper: Paper) -> str:
    base = re.sub(r"[^a-z0-9]", "", paper.id.lower())
    if paper.authors:
        surname = re.sub(r"[^a-z]", "", _ascii(paper.authors[0].split()[-1]).lower())
        if surname:
            return f"{surname}{paper.year}{base}"
    return f"{base}{paper.year}"


def _escape(text: str) -> str:
    """Escape BibTeX/LaTeX specials; braces stay balanced because they are escaped too."""
    return re.sub(r"([&%$#_{}])", r"\\\1", text).replace("~", r"\textasciitilde{}").replace("^", r"\^{}")


def entry(paper: Paper, taxonomy: Taxonomy) -> str:
    venue = taxonomy.venue(paper.venue) if paper.venue else None
    kind = venue.kind if venue else "preprint"
    fields: list[tuple[str, str]] = []
    if paper.authors:
        fields.append(("author", " and ".join(_escape(a) for a in paper.authors)))
    # Double braces keep the title's capitalisation (LoRA, GPT) under every bibliography style.
    fields.append(("title", "{" + _escape(paper.title) + "}"))
    if kind == "conference" and venue:
        entry_type = "inproceedings"
        fields.append(("booktitle", _escape(venue.full)))
    elif kind == "journal" and venue:
        entry_type = "article"
        fields.append(("journal", _escape(venue.full)))
    elif kind == "software":
        entry_type = "misc"
        if paper.code or paper.url:
            fields.append(("howpublished", r"\url{" + (paper.code or paper.url or "") + "}"))
    else:
        entry_type = "article"
        if paper.arxiv:
            fields.append(("journal", f"arXiv preprint arXiv:{paper.arxiv}"))
        elif venue:
            fields.append(("journal", _escape(venue.full)))
    fields.append(("year", str(paper.year)))
    if paper.doi:
        fields.append(("doi", paper.doi))
    if paper.arxiv:
        fields += [("eprint", paper.arxiv), ("archiveprefix", "arXiv")]
    if paper.paper_url:
        fields.append(("url", paper.paper_url))
    if paper.unlinked:
        fields.append(("note", "Publication not located; listed as cited"))
    width = max(len(k) for k, _ in fields)
    body = ",\n".join(f"  {k.ljust(width)} = {{{v}}}" for k, v in fields)
    return f"@{entry_type}{{{cite_key(paper)},\n{body}\n}}"


def render(papers: Iterable[Paper], taxonomy: Taxonomy) -> str:
    return "\n\n".join(entry(p, taxonomy) for p in papers) + "\n"
