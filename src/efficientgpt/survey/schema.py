"""The survey's data model and every check ``efficientgpt survey validate`` runs.

Two files hold the survey: ``taxonomy.yaml`` (the category tree plus the controlled lists of venues
and datasets) and ``papers.yaml`` (one entry per paper). This module turns their parsed YAML into
frozen dataclasses and reports every problem it finds as a :class:`Problem` carrying the file and
line, so one run of ``validate`` lists all of them instead of stopping at the first.

Nothing here reads files or imports heavy packages; :mod:`efficientgpt.survey.store` does the I/O.
The registry is consulted only when an entry names an ``implementation``, because importing the
method modules pulls in torch.
"""

from __future__ import annotations

import dataclasses
import datetime
import re
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from efficientgpt.errors import closest

#: Ids of papers and categories: lowercase words joined by single hyphens.
ID_RE = re.compile(r"^[a-z0-9]+(?:-[a-z0-9]+)*$")
#: A normalised modern arXiv identifier (``YYMM.NNNNN``), no version suffix.
ARXIV_RE = re.compile(r"^\d{4}\.\d{4,5}$")
#: A pre-2007 arXiv identifier such as ``hep-th/9901001``.
ARXIV_OLD_RE = re.compile(r"^[a-z][a-z.-]*/\d{7}$")
#: A normalised DOI: the ``10.`` prefix, a registrant code and a suffix, lowercase.
DOI_RE = re.compile(r"^10\.\d{4,9}/\S+$")
#: The earliest year a paper in this survey may carry.
MIN_YEAR = 1980
#: Venue kinds; they pick the BibTeX entry type.
VENUE_KINDS = ("conference", "journal", "preprint", "software")


@dataclasses.dataclass(frozen=True)
class Problem:
    """One thing wrong with the data, printed as ``file:line: message``."""

    file: str
    """The file as shown to the user (relative to the working directory when inside it)."""
    line: int | None
    """1-based line of the offending key or entry; ``None`` when no line applies."""
    message: str
    """What is wrong, naming the bad value and what is allowed."""

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}" if self.line else f"{self.file}: {self.message}"


@dataclasses.dataclass(frozen=True)
class Category:
    """A node of the taxonomy."""

    id: str
    """Kebab-case id that papers list in ``categories``."""
    title: str
    """Heading in the rendered survey."""
    description: str
    """One line shown under the heading."""
    parent: str | None = None
    """Id of the parent category; ``None`` at the top level."""
    front: bool = False
    """Rendered before the table of contents (the survey papers' section)."""
    children: tuple[str, ...] = ()
    """Ids of the child categories, in display order."""


@dataclasses.dataclass(frozen=True)
class Venue:
    """One entry of the controlled venue list."""

    name: str
    """The spelling papers use, e.g. ``NeurIPS``."""
    kind: str
    """One of :data:`VENUE_KINDS`."""
    full: str
    """Full name, used as BibTeX ``booktitle``/``journal``."""


@dataclasses.dataclass(frozen=True)
class Dataset:
    """One entry of the controlled list of datasets and benchmarks."""

    name: str
    """The spelling papers use, e.g. ``WikiText-2``."""
    description: str
    """One line for the datasets index."""


@dataclasses.dataclass(frozen=True)
class Taxonomy:
    """The category tree and the controlled vocabularies papers draw from."""

    categories: tuple[Category, ...]
    """Every category, depth-first in display order (a parent precedes its children)."""
    venues: tuple[Venue, ...]
    datasets: tuple[Dataset, ...]

    def category(self, cid: str) -> Category:
        for c in self.categories:
            if c.id == cid:
                return c
        raise KeyError(cid)

    @property
    def category_ids(self) -> tuple[str, ...]:
        return tuple(c.id for c in self.categories)

    @property
    def venue_names(self) -> tuple[str, ...]:
        return tuple(v.name for v in self.venues)

    @property
    def dataset_names(self) -> tuple[str, ...]:
        return tuple(d.name for d in self.datasets)

    def venue(self, name: str) -> Venue | None:
        return next((v for v in self.venues if v.name == name), None)

    def subtree(self, cid: str) -> tuple[str, ...]:
        """``cid`` and all of its descendants."""
        out = [cid]
        for child in self.category(cid).children:
            out.extend(self.subtree(child))
        return tuple(out)

    def rank(self, cid: str) -> int:
        """Position of ``cid`` in display order (unknown ids sort last)."""
        ids = self.category_ids
        return ids.index(cid) if cid in ids else len(ids)


@dataclasses.dataclass(frozen=True)
class Paper:
    """One survey entry. Optional fields are empty when the entry does not give them."""

    id: str
    """Kebab-case id, unique in the file (``lora``, ``sparsegpt``)."""
    title: str
    """Title as published."""
    year: int
    """Year of the venue given in ``venue``."""
    categories: tuple[str, ...]
    """Taxonomy ids; the first one is the primary category that decides the file order."""
    venue: str | None = None
    """Name from the controlled venue list; absent only on ``unlinked`` entries."""
    authors: tuple[str, ...] = ()
    """Author names as printed on the paper, in order."""
    url: str | None = None
    """Canonical link to the paper (proceedings, OpenReview, ACL Anthology, arXiv)."""
    arxiv: str | None = None
    """Normalised arXiv id, e.g. ``2106.09685`` (no ``arXiv:`` prefix, no version)."""
    doi: str | None = None
    """Normalised DOI, lowercase, without ``https://doi.org/``."""
    code: str | None = None
    """Official code repository."""
    datasets: tuple[str, ...] = ()
    """Datasets and benchmarks from the controlled list that the paper reports on."""
    tags: tuple[str, ...] = ()
    """Free kebab-case keywords for search."""
    notes: str | None = None
    """Corrections, provenance, anything a reader should know."""
    implementation: tuple[str, ...] = ()
    """Registry method names implementing the paper in this repository (YAML: a name or a list)."""
    modules: tuple[str, ...] = ()
    """Modules of this package that implement the work without being a registered method (a
    framework or a tool, e.g. ``efficientgpt.peft.core`` for delta tuning); dotted names."""
    unlinked: bool = False
    """True for an entry kept as cited although no publication could be located."""
    line: int | None = None
    """1-based line of the entry in its file (not a YAML field)."""

    @property
    def short(self) -> str:
        """The name used in indexes: the title up to its first colon (``LoRA``)."""
        head = self.title.split(":", 1)[0].strip()
        return head if head and head != self.title else self.title

    @property
    def paper_url(self) -> str | None:
        """The best link to the paper: ``url``, else the arXiv page, else the DOI resolver."""
        if self.url:
            return self.url
        if self.arxiv:
            return f"https://arxiv.org/abs/{self.arxiv}"
        if self.doi:
            return f"https://doi.org/{self.doi}"
        return None

    def to_dict(self) -> dict[str, Any]:
        """Every field, for ``--json`` (lists rather than tuples; ``implementation`` as a list)."""
        d = dataclasses.asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        d["paper_url"] = self.paper_url
        return d


#: The fields a paper entry may carry, in the order ``add`` writes them.
PAPER_FIELDS = (
    "id", "title", "authors", "venue", "year", "categories", "url", "arxiv", "doi", "code",
    "datasets", "tags", "notes", "implementation", "modules", "unlinked",
)  # fmt: skip
REQUIRED_FIELDS = ("id", "title", "year", "categories")


def module_file(name: str) -> Path:
    """The source file of the dotted module ``name`` of this package (which may not exist)."""
    package_dir = Path(__file__).resolve().parents[1]  # .../efficientgpt
    return package_dir.joinpath(*name.split(".")[1:]).with_suffix(".py")


def module_problem(name: str) -> str | None:
    """Why ``name`` is not a module of this package (None when it is); nothing is imported."""
    if not re.fullmatch(r"efficientgpt(\.[a-z_][a-z0-9_]*)+", name):
        return "must be a dotted module name of this package, e.g. 'efficientgpt.peft.core'"
    if not module_file(name).is_file():
        return f"does not exist (no file {module_file(name).name} in the package)"
    return None


def sort_key(paper: Paper, taxonomy: Taxonomy) -> tuple[int, int, str]:
    """The file order of papers: primary category in taxonomy order, then year, then id."""
    primary = paper.categories[0] if paper.categories else ""
    return (taxonomy.rank(primary), paper.year, paper.id)


# --------------------------------------------------------------------------------------------------
# normalisation


def normalize_arxiv(value: str) -> str:
    """``arXiv:2106.09685v2`` / ``https://arxiv.org/abs/2106.09685`` -> ``2106.09685``."""
    v = value.strip()
    v = re.sub(r"^(?:https?://)?(?:www\.)?(?:export\.)?arxiv\.org/(?:abs|pdf)/", "", v, flags=re.I)
    v = re.sub(r"^arxiv:\s*", "", v, flags=re.I)
    v = re.sub(r"\.pdf$", "", v)
    return re.sub(r"v\d+$", "", v)


def normalize_doi(value: str) -> str:
    """``https://doi.org/10.1038/S42256-...`` / ``doi:10...`` -> ``10.1038/s42256-...``."""
    v = value.strip()
    v = re.sub(r"^(?:https?://)?(?:dx\.)?doi\.org/", "", v, flags=re.I)
    v = re.sub(r"^doi:\s*", "", v, flags=re.I)
    return v.lower()


def normalize_title(title: str) -> str:
    """Title reduced for duplicate detection: accents, case, punctuation and spacing removed."""
    t = unicodedata.normalize("NFKD", title)
    t = "".join(ch for ch in t if not unicodedata.combining(ch)).lower()
    return re.sub(r"[^a-z0-9]+", " ", t).strip()


def url_problem(url: str) -> str | None:
    """Why ``url`` is not an absolute http(s) URL, or ``None`` when it is one."""
    if any(ch.isspace() for ch in url):
        return "contains whitespace"
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        return f"scheme {parts.scheme or '(none)'!r} is not http or https"
    if not parts.hostname or "." not in parts.hostname and parts.hostname != "localhost":
        return "has no valid host name"
    return None


# --------------------------------------------------------------------------------------------------
# parsing with problem collection


LineOf = Callable[[Any, Any], int | None]
"""``line_of(node, key)``: 1-based line of ``key`` inside mapping ``node`` (of ``node`` itself when
``key`` is ``None``). The store supplies it from ruamel's position data."""


def _no_lines(node: Any, key: Any = None) -> int | None:
    return None


class _Collector:
    """Accumulates problems for one file."""

    def __init__(self, file: str, line_of: LineOf):
        self.file = file
        self.line_of = line_of
        self.problems: list[Problem] = []

    def add(self, line: int | None, message: str) -> None:
        self.problems.append(Problem(self.file, line, message))


def _allowed(value: str, allowed: Sequence[str]) -> str:
    return f"{closest(value, list(allowed))} (allowed: {', '.join(allowed)})"


def parse_taxonomy(raw: Any, file: str, line_of: LineOf = _no_lines) -> tuple[Taxonomy, list[Problem]]:
    """Build the taxonomy from parsed YAML, returning it with every problem found."""
    col = _Collector(file, line_of)
    if not isinstance(raw, Mapping):
        col.add(1, "the taxonomy file must be a mapping with keys 'categories', 'venues', 'datasets'")
        return Taxonomy((), (), ()), col.problems
    for key in raw:
        if key not in ("categories", "venues", "datasets"):
            col.add(line_of(raw, key), f"unknown top-level key {key!r} (allowed: categories, venues, datasets)")

    categories: list[Category] = []
    seen: set[str] = set()

    def walk(nodes: Any, parent: str | None, where: int | None) -> list[str]:
        if not isinstance(nodes, Sequence) or isinstance(nodes, str):
            col.add(where, "'categories'/'children' must be a list of categories")
            return []
        ids = []
        for node in nodes:
            line = line_of(node, None)
            if not isinstance(node, Mapping):
                col.add(line, f"a category must be a mapping with id, title, description; got {node!r}")
                continue
            for key in node:
                if key not in ("id", "title", "description", "children", "front"):
                    col.add(line_of(node, key), f"category: unknown field {key!r} "
                            "(allowed: id, title, description, front, children)")
            cid = node.get("id")
            if not isinstance(cid, str) or not ID_RE.match(cid):
                col.add(line, f"category id {cid!r} must be kebab-case (e.g. 'efficient-attention')")
                continue
            if cid in seen:
                col.add(line, f"category {cid!r} is defined twice")
                continue
            seen.add(cid)
            for key in ("title", "description"):
                if not isinstance(node.get(key), str) or not node.get(key).strip():
                    col.add(line, f"category {cid!r}: missing or empty {key!r}")
            front = node.get("front", False)
            if not isinstance(front, bool):
                col.add(line_of(node, "front"), f"category {cid!r}: 'front' must be true or false")
                front = False
            index = len(categories)
            categories.append(Category(cid, str(node.get("title", cid)), str(node.get("description", "")),
                                       parent, front))
            children: list[str] = []
            if "children" in node:
                children = walk(node["children"], cid, line_of(node, "children"))
            categories[index] = dataclasses.replace(categories[index], children=tuple(children))
            ids.append(cid)
        return ids

    if "categories" not in raw:
        col.add(1, "missing 'categories'")
    else:
        walk(raw["categories"], None, line_of(raw, "categories"))

    venues: list[Venue] = []
    for node in _entries(raw, "venues", col):
        line = line_of(node, None)
        _only(node, ("name", "kind", "full"), "venue", col)
        name, kind, full = node.get("name"), node.get("kind"), node.get("full")
        if not isinstance(name, str) or not name.strip():
            col.add(line, "venue: missing 'name'")
            continue
        if kind not in VENUE_KINDS:
            col.add(line, f"venue {name!r}: kind {kind!r} is not one of {', '.join(VENUE_KINDS)}")
        if name in {v.name for v in venues}:
            col.add(line, f"venue {name!r} is listed twice")
        venues.append(Venue(name, str(kind), str(full or name)))

    datasets: list[Dataset] = []
    for node in _entries(raw, "datasets", col):
        line = line_of(node, None)
        _only(node, ("name", "description"), "dataset", col)
        name = node.get("name")
        if not isinstance(name, str) or not name.strip():
            col.add(line, "dataset: missing 'name'")
            continue
        if name in {d.name for d in datasets}:
            col.add(line, f"dataset {name!r} is listed twice")
        datasets.append(Dataset(name, str(node.get("description") or "")))
    return Taxonomy(tuple(categories), tuple(venues), tuple(datasets)), col.problems


def _only(node: Mapping, allowed: tuple[str, ...], what: str, col: _Collector) -> None:
    # A stray key usually means an unquoted comma split a flow mapping, e.g. `{description: a, b}`.
    for key in node:
        if key not in allowed:
            col.add(col.line_of(node, key), f"{what} {node.get('name')!r}: unknown field {key!r} "
                                             f"(allowed: {', '.join(allowed)}; quote values containing commas)")


def _entries(raw: Mapping, key: str, col: _Collector) -> Iterable[Mapping]:
    nodes = raw.get(key)
    if nodes is None:
        col.add(1, f"missing {key!r}")
        return []
    if not isinstance(nodes, Sequence) or isinstance(nodes, str):
        col.add(col.line_of(raw, key), f"{key!r} must be a list")
        return []
    out = []
    for node in nodes:
        if isinstance(node, Mapping):
            out.append(node)
        else:
            col.add(col.line_of(raw, key), f"{key!r}: each entry must be a mapping, got {node!r}")
    return out


def parse_papers(
    raw: Any, taxonomy: Taxonomy, file: str, line_of: LineOf = _no_lines
) -> tuple[list[Paper], list[Problem]]:
    """Build papers from parsed YAML; per-entry problems only (see :func:`check_collection`)."""
    col = _Collector(file, line_of)
    if not isinstance(raw, Mapping) or "papers" not in raw:
        col.add(1, "the papers file must be a mapping with a 'papers' list")
        return [], col.problems
    for key in raw:
        if key != "papers":
            col.add(line_of(raw, key), f"unknown top-level key {key!r} (allowed: papers)")
    entries = raw["papers"]
    if entries is None:
        return [], col.problems
    if not isinstance(entries, Sequence) or isinstance(entries, str):
        col.add(line_of(raw, "papers"), "'papers' must be a list of entries")
        return [], col.problems
    papers = []
    for index, node in enumerate(entries):
        paper = _parse_paper(node, index, taxonomy, col)
        if paper is not None:
            papers.append(paper)
    return papers, col.problems


def _parse_paper(node: Any, index: int, taxonomy: Taxonomy, col: _Collector) -> Paper | None:
    line_of = col.line_of
    line = line_of(node, None)
    if not isinstance(node, Mapping):
        col.add(line, f"entry #{index + 1} must be a mapping of fields, got {node!r}")
        return None
    pid = node.get("id")
    label = f"paper {pid!r}" if isinstance(pid, str) else f"entry #{index + 1}"

    def bad(key: str | None, message: str) -> None:
        col.add(line_of(node, key) if key in node else line, f"{label}: {message}")

    for key in node:
        if key not in PAPER_FIELDS:
            bad(key, f"unknown field {key!r}{_allowed(str(key), PAPER_FIELDS)}")
    for key in REQUIRED_FIELDS:
        if node.get(key) in (None, "", []):
            bad(None, f"missing required field {key!r}")
    ok = True

    def text(key: str) -> str | None:
        nonlocal ok
        value = node.get(key)
        if value is None:
            return None
        if not isinstance(value, str) or not value.strip():
            if key == "arxiv" and isinstance(value, (int, float)):
                # An unquoted arXiv id parses as a number and silently loses trailing zeros.
                bad(key, f"arxiv id {value!r} must be a quoted string, e.g. arxiv: '2106.09685'")
            else:
                bad(key, f"{key!r} must be a non-empty string, got {value!r}")
            ok = False
            return None
        return str(value)

    def names(key: str) -> tuple[str, ...]:
        nonlocal ok
        value = node.get(key)
        if value is None:
            return ()
        if isinstance(value, str):
            value = [value] if key in ("implementation", "modules") else None
        if not isinstance(value, Sequence) or not all(isinstance(v, str) and v.strip() for v in value):
            bad(key, f"{key!r} must be a list of non-empty strings, got {node.get(key)!r}")
            ok = False
            return ()
        dups = sorted({v for v in value if list(value).count(v) > 1})
        if dups:
            bad(key, f"{key!r} lists {', '.join(dups)} more than once")
        return tuple(str(v) for v in value)

    if isinstance(pid, str) and not ID_RE.match(pid):
        bad("id", f"id {pid!r} must be kebab-case: lowercase letters and digits joined by '-' (e.g. 'sparsegpt')")
    title = text("title")
    authors = names("authors")

    venue = text("venue")
    unlinked = node.get("unlinked", False)
    if not isinstance(unlinked, bool):
        bad("unlinked", f"'unlinked' must be true or false, got {unlinked!r}")
        unlinked = False
    if venue is not None and venue not in taxonomy.venue_names:
        bad("venue", f"unknown venue {venue!r}{_allowed(venue, taxonomy.venue_names)}")
    if venue is None and "venue" not in node and not unlinked:
        bad(None, "missing required field 'venue' (only entries marked 'unlinked: true' may omit it)")

    year = node.get("year")
    max_year = datetime.date.today().year + 1
    if year is not None:
        if isinstance(year, bool) or not isinstance(year, int):
            bad("year", f"year {year!r} must be an integer")
            ok = False
        elif not MIN_YEAR <= year <= max_year:
            bad("year", f"year {year} is outside {MIN_YEAR}..{max_year}")

    categories = names("categories")
    for cid in categories:
        if cid not in taxonomy.category_ids:
            bad("categories", f"unknown category {cid!r}{_allowed(cid, taxonomy.category_ids)}")

    url, code = text("url"), text("code")
    for key, value in (("url", url), ("code", code)):
        if value is not None and (why := url_problem(value)):
            bad(key, f"{key} {value!r} {why}")

    arxiv = text("arxiv")
    if arxiv is not None:
        if not (ARXIV_RE.match(arxiv) or ARXIV_OLD_RE.match(arxiv)):
            fixed = normalize_arxiv(arxiv)
            hint = f" (write {fixed!r})" if fixed != arxiv and ARXIV_RE.match(fixed) else ""
            bad("arxiv", f"arxiv id {arxiv!r} is not a normalised arXiv id like '2106.09685'{hint}")
    doi = text("doi")
    if doi is not None and (not DOI_RE.match(doi) or doi != doi.lower()):
        fixed = normalize_doi(doi)
        hint = f" (write {fixed!r})" if fixed != doi and DOI_RE.match(fixed) else ""
        bad("doi", f"doi {doi!r} is not a normalised DOI like '10.1038/s42256-023-00626-4'{hint}")

    datasets = names("datasets")
    for name in datasets:
        if name not in taxonomy.dataset_names:
            bad("datasets", f"unknown dataset {name!r}{_allowed(name, taxonomy.dataset_names)}")
    tags = names("tags")
    for tag in tags:
        if not ID_RE.match(tag):
            bad("tags", f"tag {tag!r} must be kebab-case (e.g. 'low-rank')")
    notes = text("notes")
    implementation = names("implementation")
    modules = names("modules")
    for name in modules:
        if (why := module_problem(name)):
            bad("modules", f"module {name!r} {why}")

    if not ok or not isinstance(pid, str) or not title or not categories or not isinstance(year, int):
        return None
    return Paper(
        id=pid, title=title, year=year, categories=categories, venue=venue, authors=authors, url=url,
        arxiv=arxiv, doi=doi, code=code, datasets=datasets, tags=tags, notes=notes,
        implementation=implementation, modules=modules, unlinked=bool(unlinked), line=line,
    )


def check_collection(
    papers: Sequence[Paper], taxonomy: Taxonomy, file: str, registered: Callable[[], Sequence[str]] | None = None
) -> list[Problem]:
    """Checks across entries: duplicates, sort order and (lazily) implementation names.

    ``registered`` returns the registry's method names; it is called only when some entry names an
    implementation, so validating a survey without implementations never imports the methods.
    """
    problems: list[Problem] = []

    def dup(kind: str, value_of: Callable[[Paper], str | None], shown: Callable[[Paper], str] | None = None) -> None:
        first: dict[str, Paper] = {}
        for p in papers:
            value = value_of(p)
            if not value:
                continue
            if value in first:
                other = first[value]
                what = f"{shown(p)!r}, the same as {shown(other)!r}" if shown else repr(value)
                problems.append(Problem(file, p.line, f"paper {p.id!r}: duplicate {kind} {what} "
                                                      f"(on paper {other.id!r} at line {other.line})"))
            else:
                first[value] = p

    dup("id", lambda p: p.id)
    dup("title", lambda p: normalize_title(p.title), lambda p: p.title)
    dup("arXiv id", lambda p: p.arxiv)
    dup("DOI", lambda p: p.doi)
    # Only explicit URLs: links derived from arXiv ids or DOIs are covered by the checks above.
    dup("paper URL", lambda p: p.url.rstrip("/") if p.url else None)

    for prev, cur in zip(papers, papers[1:]):
        if sort_key(cur, taxonomy) < sort_key(prev, taxonomy):
            problems.append(Problem(file, cur.line, f"paper {cur.id!r} is out of order: it belongs before "
                                                    f"{prev.id!r} (order: primary category as in the taxonomy, "
                                                    "then year, then id)"))

    if any(p.implementation for p in papers):
        known = list(registered() if registered is not None else _registered_methods())
        for p in papers:
            for name in p.implementation:
                if name not in known:
                    listed = ", ".join(known) or "(none registered)"
                    problems.append(Problem(file, p.line, f"paper {p.id!r}: implementation {name!r} names no "
                                                          f"registered method{closest(name, known)} "
                                                          f"(registered: {listed})"))
    return problems


def _registered_methods() -> list[str]:
    from efficientgpt import registry

    return [s.name for s in registry.methods()]
