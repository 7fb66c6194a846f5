"""Reading and writing the survey's YAML files.

Loading uses ruamel.yaml's round-trip parser because it keeps the line of every key, which lets
each problem point at ``papers.yaml:LINE``. Writing (``survey add``) splices the new entry's text
into the file at its sort position, so every existing byte, comment and blank line stays as it was,
validates the whole resulting text, and only then replaces the file atomically: a temporary file
in the same directory followed by :func:`os.replace`, so a reader never sees a half-written file.
"""

from __future__ import annotations

import dataclasses
import io
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from efficientgpt.errors import UserError
from efficientgpt.survey.schema import (
    PAPER_FIELDS,
    Paper,
    Problem,
    Taxonomy,
    check_collection,
    parse_papers,
    parse_taxonomy,
    sort_key,
)

#: The package's own data directory (shipped as package data).
DATA_DIR = Path(__file__).resolve().parent / "data"
DEFAULT_PAPERS = DATA_DIR / "papers.yaml"
DEFAULT_TAXONOMY = DATA_DIR / "taxonomy.yaml"


class SurveyDataError(UserError):
    """The survey data has problems; ``problems`` lists every one of them."""

    def __init__(self, problems: Sequence[Problem]):
        self.problems = list(problems)
        lines = "\n".join(f"  {p}" for p in self.problems)
        count = len(self.problems)
        super().__init__(f"{count} problem{'s' if count != 1 else ''} in the survey data "
                         f"(run 'efficientgpt survey validate'):\n{lines}")


@dataclasses.dataclass(frozen=True)
class Survey:
    """A loaded, validated survey."""

    taxonomy: Taxonomy
    papers: tuple[Paper, ...]
    """In file order."""
    papers_path: Path
    taxonomy_path: Path

    def paper(self, pid: str) -> Paper:
        for p in self.papers:
            if p.id == pid:
                return p
        from efficientgpt.errors import closest

        raise UserError(f"no paper with id {pid!r}{closest(pid, [p.id for p in self.papers])}; "
                        "'efficientgpt survey list' shows every id")


def display_path(path: Path | str) -> str:
    """``path`` relative to the working directory when it lies inside it, else absolute."""
    p = Path(path).resolve()
    try:
        return p.relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return str(p)


def yaml_rt():
    """The one ruamel.yaml configuration used to read and write the data files."""
    from ruamel.yaml import YAML

    y = YAML(typ="rt")
    y.preserve_quotes = True
    y.width = 4096  # never fold long titles or notes onto a second line
    y.indent(mapping=2, sequence=4, offset=2)
    return y


def _line_of(node: Any, key: Any = None) -> int | None:
    """1-based line of ``key`` in a ruamel mapping (of the node itself when ``key`` is None)."""
    lc = getattr(node, "lc", None)
    if lc is None:
        return None
    try:
        return (lc.line if key is None else lc.key(key)[0]) + 1
    except (KeyError, TypeError, AttributeError, IndexError):
        return lc.line + 1 if lc.line is not None else None


def parse_yaml(text: str, file: str) -> tuple[Any, list[Problem]]:
    """Parse ``text``; a syntax error becomes a problem at its line."""
    from ruamel.yaml.error import MarkedYAMLError, YAMLError

    try:
        return yaml_rt().load(text), []
    except MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        line = mark.line + 1 if mark is not None else None
        what = " ".join(str(s) for s in (err.context, err.problem) if s)
        return None, [Problem(file, line, f"malformed YAML: {what}")]
    except YAMLError as err:
        return None, [Problem(file, None, f"malformed YAML: {err}")]


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"no such file: {path}") from None
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror}") from None


def load_taxonomy(path: Path | str | None = None) -> tuple[Taxonomy, list[Problem]]:
    path = Path(path) if path else DEFAULT_TAXONOMY
    file = display_path(path)
    raw, problems = parse_yaml(_read(path), file)
    if problems:
        return Taxonomy((), (), ()), problems
    return parse_taxonomy(raw, file, _line_of)


def check_papers_text(text: str, taxonomy: Taxonomy, file: str, registered=None) -> tuple[list[Paper], list[Problem]]:
    """Parse and fully validate the text of a papers file."""
    raw, problems = parse_yaml(text, file)
    if problems:
        return [], problems
    papers, problems = parse_papers(raw, taxonomy, file, _line_of)
    problems += check_collection(papers, taxonomy, file, registered)
    return papers, problems


def check(papers_path=None, taxonomy_path=None, registered=None) -> tuple[Survey | None, list[Problem]]:
    """Load both files and return the survey (``None`` when unusable) with every problem found."""
    papers_path = Path(papers_path) if papers_path else DEFAULT_PAPERS
    taxonomy_path = Path(taxonomy_path) if taxonomy_path else DEFAULT_TAXONOMY
    taxonomy, problems = load_taxonomy(taxonomy_path)
    text = _read(papers_path)
    papers, paper_problems = check_papers_text(text, taxonomy, display_path(papers_path), registered)
    problems += paper_problems
    # Report in reading order: by file (taxonomy first), then line.
    problems.sort(key=lambda p: (p.file != display_path(taxonomy_path), p.line or 0))
    if not taxonomy.categories:
        return None, problems
    return Survey(taxonomy, tuple(papers), papers_path, taxonomy_path), problems


def load(papers_path=None, taxonomy_path=None) -> Survey:
    """Load and validate; any problem raises :class:`SurveyDataError` listing all of them."""
    survey, problems = check(papers_path, taxonomy_path)
    if problems or survey is None:
        raise SurveyDataError(problems)
    return survey


# --------------------------------------------------------------------------------------------------
# writing


def entry_mapping(fields: dict[str, Any]):
    """A ruamel mapping for a new entry: keys in :data:`PAPER_FIELDS` order, short lists inline."""
    from ruamel.yaml.comments import CommentedMap, CommentedSeq
    from ruamel.yaml.scalarstring import DoubleQuotedScalarString

    entry = CommentedMap()
    for key in PAPER_FIELDS:
        value = fields.get(key)
        if value in (None, "", [], ()):
            continue
        if isinstance(value, (list, tuple)):
            seq = CommentedSeq(value)
            seq.fa.set_flow_style()
            value = seq
        elif key == "title":
            value = DoubleQuotedScalarString(value)  # titles are double-quoted throughout the file
        entry[key] = value
    return entry


def entry_text(fields: dict[str, Any], indent: int = 2) -> str:
    """The YAML text of one list item, its dash at column ``indent``."""
    from ruamel.yaml.comments import CommentedMap, CommentedSeq

    buf = io.StringIO()
    yaml_rt().dump(CommentedMap(papers=CommentedSeq([entry_mapping(fields)])), buf)
    lines = buf.getvalue().splitlines(keepends=True)[1:]  # drop 'papers:'
    shift = indent - 2  # the dump puts the dash at column 2
    if shift > 0:
        lines = [" " * shift + ln if ln.strip() else ln for ln in lines]
    elif shift < 0:
        lines = [ln[-shift:] for ln in lines]
    return "".join(lines)


def insert_entry(text: str, fields: dict[str, Any], taxonomy: Taxonomy) -> str:
    """``text`` with a new entry spliced in before the first entry that sorts after it.

    Comment lines directly above an entry (at or left of its dash) belong to that entry, e.g. a
    section header, so the new entry goes above them; a blank line separates it from its neighbours
    when the file separates entries that way.
    """
    raw, problems = parse_yaml(text, "papers")
    if problems or not isinstance(raw, dict) or "papers" not in raw:
        return text  # unusable file: validation of the result reports why
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    if not raw["papers"]:
        # 'papers:' or 'papers: []': the new entry becomes the list.
        at = raw.lc.key("papers")[0]
        return "".join(lines[:at]) + "papers:\n" + entry_text(fields) + "".join(lines[at + 1:])
    entries = raw["papers"]
    dash_col = max(0, (entries[0].lc.col if hasattr(entries[0], "lc") else 4) - 2)
    new_key = _fields_sort_key(fields, taxonomy)
    target = None
    for node in entries:
        try:
            key = _fields_sort_key(dict(node), taxonomy)
        except (TypeError, ValueError):
            continue
        if key > new_key:
            target = node
            break
    uses_blank = any(not ln.strip() for ln in lines[entries[0].lc.line:])
    block = entry_text(fields, dash_col)
    if target is None:
        while lines and not lines[-1].strip():
            lines.pop()
        return "".join(lines) + ("\n" if uses_blank else "") + block
    at = target.lc.line  # 0-based line of the target's first key, which shares the dash's line
    while at > 0 and _belongs_to_next(lines[at - 1], dash_col):
        at -= 1
    return "".join(lines[:at]) + ("\n" if uses_blank else "") + block + "".join(lines[at:])


def _belongs_to_next(line: str, dash_col: int) -> bool:
    stripped = line.strip()
    if not stripped:
        return True
    return stripped.startswith("#") and len(line) - len(line.lstrip()) <= dash_col


def _fields_sort_key(fields: dict[str, Any], taxonomy: Taxonomy) -> tuple[int, int, str]:
    cats = fields.get("categories") or [""]
    year = fields.get("year")
    stub = Paper(id=str(fields.get("id") or ""), title="", year=year if isinstance(year, int) else 0,
                 categories=tuple(str(c) for c in cats))
    return sort_key(stub, taxonomy)


def add_paper(papers_path: Path | str, taxonomy_path: Path | str | None, fields: dict[str, Any]) -> Paper:
    """Insert a paper into ``papers_path`` after validating the whole resulting file.

    Raises :class:`SurveyDataError` with every problem (the file is left untouched) when the new
    file would not validate, including problems that were already there.
    """
    papers_path = Path(papers_path)
    taxonomy, problems = load_taxonomy(taxonomy_path)
    if problems:
        raise SurveyDataError(problems)
    old = _read(papers_path)
    new = insert_entry(old, fields, taxonomy)
    papers, problems = check_papers_text(new, taxonomy, display_path(papers_path))
    if problems:
        raise SurveyDataError(problems)
    atomic_write(papers_path, new)
    return next(p for p in papers if p.id == fields["id"])


def atomic_write(path: Path | str, text: str) -> None:
    """Replace ``path`` with ``text`` so that readers see the old file or the new one, never half."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.chmod(tmp, path.stat().st_mode & 0o7777)
        except FileNotFoundError:
            os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
