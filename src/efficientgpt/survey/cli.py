"""``efficientgpt survey ...``: query, extend, validate and render the survey.

Every subcommand reads the shipped data unless ``--papers``/``--taxonomy`` point elsewhere, accepts
``--json`` (one JSON object on stdout, human text on stderr) and returns an exit code. Bad input
raises :class:`~efficientgpt.errors.UserError`; the main CLI prints it and exits with status 1.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from efficientgpt.cli_common import Output, add_json_arg
from efficientgpt.errors import UserError

SUBCOMMANDS = ("list", "search", "show", "add", "validate", "render", "bibtex", "datasets", "check-links")

EPILOG = """\
examples:
  efficientgpt survey list --category pruning
  efficientgpt survey search lora --json
  efficientgpt survey show sparsegpt
  efficientgpt survey validate
  efficientgpt survey render --check
  efficientgpt survey bibtex --category parameter-efficient-tuning

The data lives in src/efficientgpt/survey/data/ (papers.yaml, taxonomy.yaml); docs/survey.md
describes the format.
"""


def _parser(sub, name: str, help: str, description: str, examples: str) -> argparse.ArgumentParser:
    p = sub.add_parser(
        name,
        help=help,
        description=description,
        epilog="examples:\n" + examples,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--papers", metavar="PATH", default=None,
                   help="papers file to read (default: the shipped survey/data/papers.yaml)")
    p.add_argument("--taxonomy", metavar="PATH", default=None,
                   help="taxonomy file to read (default: the shipped survey/data/taxonomy.yaml)")
    add_json_arg(p)
    return p


def _filters(p: argparse.ArgumentParser) -> None:
    p.add_argument("--category", metavar="ID", help="only papers in this category or one of its children")
    p.add_argument("--venue", help="only papers from this venue (e.g. ICLR)")
    p.add_argument("--year", metavar="YEAR[-YEAR]", help="only papers from this year or range (2022, 2021-2023)")
    p.add_argument("--dataset", metavar="NAME", help="only papers reporting on this dataset or benchmark")
    p.add_argument("--implemented", action="store_true",
                   help="only papers with an implementation (a method or a module) in this repository")


def register(sub) -> None:
    survey = sub.add_parser(
        "survey",
        help="the living survey: list, search, validate and render the paper list",
        description="A curated list of efficient GPT/LLM papers kept as validated YAML, rendered to "
                    "SURVEY.md and linked to this repository's implementations and measured results.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    survey.set_defaults(func=lambda args: _usage(survey))
    ss = survey.add_subparsers(dest="survey_command", metavar="SUBCOMMAND")

    p = _parser(ss, "list", "list every entry (with filters)",
                "List survey entries in file order. With --json each entry carries all of its fields.",
                "  efficientgpt survey list\n  efficientgpt survey list --category quantization --json\n"
                "  efficientgpt survey list --year 2023 --dataset WikiText-2")
    _filters(p)
    p.set_defaults(func=cmd_list)

    p = _parser(ss, "search", "search entries by text and filters",
                "Find entries whose id, title, authors, tags, notes or implementing methods contain every "
                "word of TEXT (case-insensitive), optionally narrowed by the filters. Best matches first: "
                "a word in the id or title counts more than one in the tags, authors or notes.",
                "  efficientgpt survey search lora\n  efficientgpt survey search 'weight quantization' --json\n"
                "  efficientgpt survey search attention --venue ICLR --year 2020-2024")
    p.add_argument("text", metavar="TEXT", help="words to look for")
    _filters(p)
    p.set_defaults(func=cmd_search)

    p = _parser(ss, "show", "show one entry with all its fields",
                "Show every field of one entry, its BibTeX and where it is implemented.",
                "  efficientgpt survey show lora\n  efficientgpt survey show sparsegpt --json")
    p.add_argument("id", metavar="ID", help="the paper's id (see 'efficientgpt survey list')")
    p.set_defaults(func=cmd_show)

    p = _parser(ss, "add", "add an entry (validated, atomic, order and comments kept)",
                "Add a paper to the papers file at its sort position. The whole resulting file is "
                "validated before anything is written, and the file is replaced atomically. Without the "
                "required flags and with a terminal on stdin, the missing fields are asked for.",
                "  efficientgpt survey add --id gptq --title 'GPTQ: ...' --venue ICLR --year 2023 \\\n"
                "      --category quantization --arxiv 2210.17323 --code https://github.com/IST-DASLab/gptq\n"
                "  efficientgpt survey add --file /tmp/papers.yaml   # prompts for the fields")
    p.add_argument("--file", dest="papers", metavar="PATH", help="same as --papers: the file to add to")
    p.add_argument("--id", help="kebab-case id, e.g. 'sparsegpt'")
    p.add_argument("--title", help="title as published")
    p.add_argument("--author", action="append", default=[], help="an author (repeat for each, in order)")
    p.add_argument("--venue", help="venue from the controlled list (see taxonomy.yaml)")
    p.add_argument("--year", type=int, help="year of that venue")
    p.add_argument("--category", action="append", default=[], help="taxonomy id (repeat; the first is primary)")
    p.add_argument("--url", help="link to the paper")
    p.add_argument("--arxiv", help="arXiv id or URL (normalised to e.g. 2106.09685)")
    p.add_argument("--doi", help="DOI or doi.org URL (normalised to lowercase 10.x/...)")
    p.add_argument("--code", help="official code repository URL")
    p.add_argument("--dataset", action="append", default=[], help="dataset or benchmark used (repeat)")
    p.add_argument("--tag", action="append", default=[], help="keyword (repeat)")
    p.add_argument("--notes", help="free-text notes")
    p.add_argument("--implementation", action="append", default=[], help="registry method implementing it")
    p.add_argument("--module", action="append", default=[],
                   help="module of this package implementing it without being a method (efficientgpt.peft.core)")
    p.set_defaults(func=cmd_add)

    p = _parser(ss, "validate", "check the data: schema, vocabularies, duplicates, order",
                "Check both data files and list every problem as file:line: message. Exit status 1 when "
                "there is any problem, 0 when the data is clean. Papers are ordered by primary category "
                "(taxonomy order), then year, then id.",
                "  efficientgpt survey validate\n  efficientgpt survey validate --papers /tmp/papers.yaml --json")
    p.set_defaults(func=cmd_validate)

    p = _parser(ss, "render", "write SURVEY.md from the data",
                "Render the survey to Markdown. The output is deterministic; --check compares instead "
                "of writing and exits 1 when the file is stale.",
                "  efficientgpt survey render\n  efficientgpt survey render --check\n"
                "  efficientgpt survey render --out /tmp/SURVEY.md --results benchmarks/results")
    p.add_argument("--out", metavar="PATH", default="SURVEY.md", help="file to write (default: %(default)s)")
    p.add_argument("--results", metavar="DIR", default=None,
                   help="directory of benchmark run JSON files (default: benchmarks/results; missing = none)")
    p.add_argument("--check", action="store_true", help="do not write; exit 1 if the file is out of date")
    p.set_defaults(func=cmd_render)

    p = _parser(ss, "bibtex", "print BibTeX entries",
                "Print BibTeX for the given ids, or a category (with its children), or everything.",
                "  efficientgpt survey bibtex lora sparsegpt\n"
                "  efficientgpt survey bibtex --category parameter-efficient-tuning > peft.bib")
    p.add_argument("ids", nargs="*", metavar="ID", help="paper ids (default: all, or the category's)")
    p.add_argument("--category", metavar="ID", help="every paper in this category or its children")
    p.set_defaults(func=cmd_bibtex)

    p = _parser(ss, "datasets", "index datasets and benchmarks to the papers using them",
                "List each dataset or benchmark of the controlled list with the papers reporting on it.",
                "  efficientgpt survey datasets\n  efficientgpt survey datasets --all --json")
    p.add_argument("--all", action="store_true", help="also list datasets no paper uses yet")
    p.set_defaults(func=cmd_datasets)

    p = _parser(ss, "check-links", "check that paper and code links still resolve",
                "Check every link (or those of the given ids/category) concurrently: HEAD, then GET on "
                "405/501, redirects followed, retries with backoff. Each link is ok, redirected, blocked "
                "(the server refused the checker), dead (an error answer) or unreachable (no answer). "
                "Failed links are never cached. Exit status 1 when a link is dead or unreachable.",
                "  efficientgpt survey check-links\n  efficientgpt survey check-links lora dylora --no-cache\n"
                "  efficientgpt survey check-links --category quantization --json")
    p.add_argument("ids", nargs="*", metavar="ID", help="only these papers' links")
    p.add_argument("--category", metavar="ID", help="only papers in this category or its children")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per request (default: %(default)s)")
    p.add_argument("--retries", type=int, default=2, help="retries of transient failures (default: %(default)s)")
    p.add_argument("--backoff", type=float, default=0.5,
                   help="first retry delay in seconds, doubled each retry (default: %(default)s)")
    p.add_argument("--workers", type=int, default=16, help="concurrent requests (default: %(default)s)")
    p.add_argument("--cache", metavar="PATH", default=None,
                   help="cache file (default: $EFFICIENTGPT_CACHE or ~/.cache/efficientgpt, survey-links.json)")
    p.add_argument("--ttl", type=float, default=7 * 24.0, help="cache lifetime in hours (default: %(default)s)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
    p.set_defaults(func=cmd_check_links)


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def _load(args):
    from efficientgpt.survey import store

    return store.load(args.papers, args.taxonomy)


# --------------------------------------------------------------------------------------------------
# querying


def _year_range(spec: str | None) -> tuple[int, int] | None:
    if not spec:
        return None
    try:
        lo, _, hi = spec.partition("-")
        return (int(lo), int(hi or lo))
    except ValueError:
        raise UserError(f"--year {spec!r} must be a year (2023) or a range (2021-2023)") from None


def select(survey, args, text: str | None = None) -> list:
    """Papers matching the filters in ``args`` (and every word of ``text``), in file order."""
    from efficientgpt.errors import closest

    tax = survey.taxonomy
    cats = None
    if getattr(args, "category", None):
        if args.category not in tax.category_ids:
            raise UserError(f"unknown category {args.category!r}{closest(args.category, tax.category_ids)} "
                            f"(categories: {', '.join(tax.category_ids)})")
        cats = set(tax.subtree(args.category))
    venue = getattr(args, "venue", None)
    if venue and venue.lower() not in {v.lower() for v in tax.venue_names}:
        raise UserError(f"unknown venue {venue!r}{closest(venue, tax.venue_names)} "
                        f"(venues: {', '.join(tax.venue_names)})")
    dataset = getattr(args, "dataset", None)
    if dataset and dataset.lower() not in {d.lower() for d in tax.dataset_names}:
        raise UserError(f"unknown dataset {dataset!r}{closest(dataset, tax.dataset_names)} "
                        f"(datasets: {', '.join(tax.dataset_names)})")
    years = _year_range(getattr(args, "year", None))
    words = text.lower().split() if text else []
    out = []
    scores: dict[str, int] = {}
    for p in survey.papers:
        if cats is not None and not cats.intersection(p.categories):
            continue
        if venue and (p.venue or "").lower() != venue.lower():
            continue
        if years and not years[0] <= p.year <= years[1]:
            continue
        if dataset and dataset.lower() not in {d.lower() for d in p.datasets}:
            continue
        if getattr(args, "implemented", False) and not (p.implementation or p.modules):
            continue
        if words:
            score = relevance(p, words)
            if score is None:
                continue
            scores[p.id] = score
        out.append(p)
    if words:
        out.sort(key=lambda p: -scores[p.id])  # stable: equal scores keep file order
    return out


# Where a search word is found says how much the entry is about it: the paper's own id or title
# outranks a tag, which outranks an author name or a passing mention in the notes.
_FIELD_WEIGHTS = (("id", 5), ("title", 4), ("implementation", 3), ("tags", 3), ("authors", 2), ("notes", 1))


def relevance(p, words: Sequence[str]) -> int | None:
    """Score of ``p`` for lower-case ``words`` (None when a word is missing from every field).

    Each word counts the weight of the best field that contains it, plus 2 where it is a whole word
    of the title and 10 where it is the paper's id itself, so ``search lora`` lists LoRA before the
    papers that merely mention it.
    """
    fields = {"id": p.id, "title": p.title, "implementation": " ".join((*p.implementation, *p.modules)),
              "tags": " ".join(p.tags), "authors": " ".join(p.authors), "notes": p.notes or ""}
    fields = {k: v.lower() for k, v in fields.items()}
    total = 0
    for w in words:
        best = max((weight for name, weight in _FIELD_WEIGHTS if w in fields[name]), default=None)
        if best is None:
            return None
        if re.search(rf"(?<![\w-]){re.escape(w)}(?![\w-])", fields["title"]):
            best += 2
        if w == fields["id"]:
            best += 10
        total += best
    return total


def _line(p) -> str:
    when = f"{p.venue or '-'} {p.year}"
    return f"{p.id:<28} {when:<22} {p.title}"


def _listing(args, papers, extra: dict[str, Any]) -> int:
    lines = [_line(p) for p in papers] or ["(no matching papers)"]
    lines.append(f"{len(papers)} paper{'s' if len(papers) != 1 else ''}")
    Output(args).result({**extra, "count": len(papers), "papers": [p.to_dict() for p in papers]},
                        human="\n".join(lines))
    return 0


def cmd_list(args) -> int:
    survey = _load(args)
    return _listing(args, select(survey, args), {})


def cmd_search(args) -> int:
    survey = _load(args)
    return _listing(args, select(survey, args, args.text), {"query": args.text})


def cmd_show(args) -> int:
    from efficientgpt.survey import bibtex

    survey = _load(args)
    paper = survey.paper(args.id)
    d = paper.to_dict()
    if paper.implementation:
        from efficientgpt.survey.results import implementation_paths

        d["implementation_paths"] = implementation_paths(paper.implementation)
    if paper.modules:
        from efficientgpt.survey.results import module_path

        d["module_paths"] = [module_path(m) for m in paper.modules]
    bib = bibtex.entry(paper, survey.taxonomy)
    lines = []
    for key, value in d.items():
        if value in (None, [], False, ""):
            continue
        lines.append(f"{key + ':':<16}{', '.join(map(str, value)) if isinstance(value, list) else value}")
    Output(args).result({"paper": d, "bibtex": bib}, human="\n".join(lines) + "\n\n" + bib)
    return 0


# --------------------------------------------------------------------------------------------------
# editing and checking


def _ask(prompt: str, required: bool) -> str:
    while True:
        try:
            answer = input(f"{prompt}{'' if required else ' (optional)'}: ").strip()
        except EOFError:
            raise UserError("input ended before the entry was complete; nothing was written") from None
        if answer or not required:
            return answer
        print("  this field is required", file=sys.stderr)


def cmd_add(args) -> int:
    from efficientgpt.survey import store
    from efficientgpt.survey.schema import normalize_arxiv, normalize_doi

    papers_path = Path(args.papers) if args.papers else store.DEFAULT_PAPERS
    fields: dict[str, Any] = {
        "id": args.id, "title": args.title, "authors": args.author, "venue": args.venue, "year": args.year,
        "categories": args.category, "url": args.url, "arxiv": args.arxiv, "doi": args.doi,
        "code": args.code, "datasets": args.dataset, "tags": args.tag, "notes": args.notes,
        "implementation": args.implementation, "modules": args.module,
    }  # fmt: skip
    required = ("id", "title", "venue", "year", "categories")
    missing = [k for k in required if not fields[k]]
    if missing:
        if not sys.stdin.isatty():
            flags = ", ".join("--category" if k == "categories" else f"--{k}" for k in missing)
            raise UserError(f"missing {flags} (give the flags, or run in a terminal to be asked)")
        taxonomy, _ = store.load_taxonomy(args.taxonomy)
        print(f"Adding a paper to {store.display_path(papers_path)}. Venues: {', '.join(taxonomy.venue_names)}",
              file=sys.stderr)
        for key in ("id", "title", "authors", "venue", "year", "categories", "arxiv", "doi", "url", "code",
                    "datasets", "tags", "notes"):
            if fields[key]:
                continue
            is_list = key in ("authors", "categories", "datasets", "tags")
            label = f"{key} (comma-separated)" if is_list else key
            answer = _ask(label, key in required)
            if is_list:
                fields[key] = [a.strip() for a in answer.split(",") if a.strip()]
            elif key == "year" and answer:
                try:
                    fields[key] = int(answer)
                except ValueError:
                    raise UserError(f"year {answer!r} must be an integer; nothing was written") from None
            else:
                fields[key] = answer or None
    if fields["arxiv"]:
        fields["arxiv"] = normalize_arxiv(fields["arxiv"])
    if fields["doi"]:
        fields["doi"] = normalize_doi(fields["doi"])
    paper = store.add_paper(papers_path, args.taxonomy, fields)
    out = Output(args)
    out.result({"added": paper.to_dict(), "file": str(papers_path)},
               human=f"added {paper.id!r} to {store.display_path(papers_path)} (line {paper.line})")
    return 0


def cmd_validate(args) -> int:
    from efficientgpt.survey import store

    survey, problems = store.check(args.papers, args.taxonomy)
    count = len(survey.papers) if survey else 0
    out = Output(args)
    if problems:
        for p in problems:
            out.info(str(p))
    human = (f"{len(problems)} problem{'s' if len(problems) != 1 else ''} found" if problems
             else f"ok: {count} papers, {len(survey.taxonomy.categories)} categories, no problems")
    out.result({"ok": not problems, "papers": count,
                "problems": [{"file": p.file, "line": p.line, "message": p.message, "text": str(p)}
                             for p in problems]},
               human=human)
    return 1 if problems else 0


def cmd_render(args) -> int:
    from efficientgpt.survey import store
    from efficientgpt.survey.render import render

    survey = _load(args)
    out_path = Path(args.out)
    text = render(survey, args.results, out_path)
    try:
        current = out_path.read_text(encoding="utf-8")
    except (FileNotFoundError, IsADirectoryError):
        current = None
    stale = current != text
    out = Output(args)
    if args.check:
        if stale:
            cmd = "efficientgpt survey render"
            for flag, value in (("--out", args.out if args.out != "SURVEY.md" else None),
                                ("--results", args.results), ("--papers", args.papers),
                                ("--taxonomy", args.taxonomy)):
                if value:
                    cmd += f" {flag} {value}"
            why = "does not exist" if current is None else "is out of date with the survey data"
            out.info(f"{args.out} {why}; regenerate it with: {cmd}")
        out.result({"path": str(out_path), "stale": stale, "written": False, "papers": len(survey.papers)},
                   human=f"{args.out} is up to date" if not stale else f"{args.out} is stale")
        return 1 if stale else 0
    if stale:
        store.atomic_write(out_path, text)
    out.result({"path": str(out_path), "stale": False, "written": stale, "papers": len(survey.papers)},
               human=f"{'wrote' if stale else 'unchanged:'} {args.out} ({len(survey.papers)} papers)")
    return 0


def cmd_bibtex(args) -> int:
    from efficientgpt.survey import bibtex

    survey = _load(args)
    papers = select(survey, args) if args.category else list(survey.papers)
    if args.ids:
        wanted = [survey.paper(i) for i in args.ids]
        papers = [p for p in wanted if p in papers]
    text = bibtex.render(papers, survey.taxonomy)
    Output(args).result({"count": len(papers), "keys": [bibtex.cite_key(p) for p in papers], "bibtex": text},
                        human=text.rstrip("\n"))
    return 0


def cmd_datasets(args) -> int:
    from efficientgpt.survey.render import dataset_index

    survey = _load(args)
    index = {ds.name: users for ds, users in dataset_index(survey)}
    rows = []
    for ds in survey.taxonomy.datasets:
        users = index.get(ds.name, [])
        if users or args.all:
            rows.append({"name": ds.name, "description": ds.description, "papers": [p.id for p in users]})
    lines = [f"{r['name']} ({len(r['papers'])}): {', '.join(r['papers']) or '-'}" for r in rows]
    Output(args).result({"count": len(rows), "datasets": rows}, human="\n".join(lines))
    return 0


def cmd_check_links(args) -> int:
    from efficientgpt.survey import links

    survey = _load(args)
    papers = select(survey, args) if args.category else list(survey.papers)
    if args.ids:
        papers = [survey.paper(i) for i in args.ids if survey.paper(i) in papers]
    by_url = links.links_of(papers)
    if args.timeout <= 0 or args.retries < 0 or args.workers < 1 or args.ttl < 0:
        raise UserError("--timeout and --workers must be positive, --retries and --ttl non-negative")
    cache = None if args.no_cache else (Path(args.cache) if args.cache else links.default_cache_path())
    out = Output(args)
    out.info(f"checking {len(by_url)} links from {len(papers)} papers ...")
    results = links.check_links(list(by_url), timeout=args.timeout, retries=args.retries, backoff=args.backoff,
                                workers=args.workers, cache_path=cache, ttl=args.ttl * 3600)
    counts = {s: sum(r.status == s for r in results) for s in links.STATUSES}
    lines = []
    for r in results:
        if r.status == "ok":
            continue
        detail = r.final_url if r.status == "redirected" else r.error
        lines.append(f"{r.status:<10} {r.url} ({', '.join(by_url[r.url])}){' -> ' + detail if detail else ''}")
    lines.append(", ".join(f"{n} {s}" for s, n in counts.items()))
    if results and counts["unreachable"] == len(results):
        lines.append("no server answered at all: this machine may have no network access")
    out.result({"counts": counts, "cache": str(cache) if cache else None,
                "links": [{**r.to_dict(), "papers": by_url[r.url]} for r in results]},
               human="\n".join(lines))
    return 1 if any(counts[s] for s in links.FAILED) else 0
