"""The embedded corpus: text taken from the running Python's own standard library.

Two domains, available on every machine with Python and no network:

* ``prose``: the documentation topics of ``pydoc_data.topics`` plus every module, class and function
  docstring of the standard library's source, read with :mod:`ast` (nothing is imported, so no module
  runs).
* ``code``: the standard library's ``.py`` source files themselves.

Test suites (``test``/``tests``/``idle_test`` directories) and vendored packages (``site-packages``,
``ensurepip/_bundled``) are excluded. Each document (a source file, or a pydoc topic) goes to the
``train``, ``validation`` or ``test`` split by a hash of its name, so the split is deterministic and a
file never straddles two splits. The sha256 of a split's text is its fingerprint, recorded with every
result: the corpus differs between Python versions, and the fingerprint says which one was used.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import os
import sys
import sysconfig
import warnings
from pathlib import Path

from efficientgpt.cache import atomic_write_text, cache_dir, file_lock, stable_hash
from efficientgpt.errors import UserError

DOMAINS = ("prose", "code")
SPLITS = ("train", "validation", "test")
#: Percent of documents in the validation and test splits (the rest is train).
VALIDATION_PERCENT = 5
TEST_PERCENT = 5
#: Bumped whenever extraction changes, so cached text is rebuilt.
CORPUS_VERSION = 1
#: The separator between documents in a split's text.
DOC_SEPARATOR = "\n\n"

_EXCLUDED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "_bundled"}


@dataclasses.dataclass(frozen=True)
class Document:
    name: str
    """``stdlib:<relative path>`` or ``pydoc:<topic>``; the split is a hash of this name."""
    text: str


def split_of(name: str) -> str:
    """The split a document belongs to: a stable hash of its name, independent of the others."""
    bucket = int(hashlib.sha256(name.encode()).hexdigest(), 16) % 100
    if bucket < VALIDATION_PERCENT:
        return "validation"
    if bucket < VALIDATION_PERCENT + TEST_PERCENT:
        return "test"
    return "train"


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_sources() -> list[Path]:
    """The standard library's ``.py`` files, tests and vendored packages excluded, sorted."""
    root = stdlib_root()
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        if any(part in _EXCLUDED_DIRS for part in rel.parts):
            dirnames[:] = []
            continue
        dirnames.sort()
        files.extend(Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py"))
    return sorted(files)


def _docstrings(source: str) -> list[str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # invalid escape sequences in old sources
        tree = ast.parse(source)
    nodes = [tree] + [
        n for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
    ]
    return [d for n in nodes if (d := ast.get_docstring(n, clean=True))]


def documents(domain: str) -> list[Document]:
    """Every document of ``domain``, in a deterministic order."""
    if domain not in DOMAINS:
        raise UserError(f"unknown embedded domain {domain!r}; choose one of {', '.join(DOMAINS)}")
    root = stdlib_root()
    docs: list[Document] = []
    if domain == "prose":
        from pydoc_data.topics import topics

        docs.extend(Document(f"pydoc:{k}", topics[k].strip()) for k in sorted(topics))
    for path in stdlib_sources():
        try:
            source = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        name = f"stdlib:{path.relative_to(root).as_posix()}"
        if domain == "code":
            if source.strip():
                docs.append(Document(name, source))
            continue
        try:
            strings = _docstrings(source)
        except SyntaxError:  # lib2to3-era fixtures and the like
            continue
        if strings:
            docs.append(Document(name, DOC_SEPARATOR.join(strings)))
    return docs


def corpus_text(domain: str, split: str) -> str:
    """The text of one split of one domain (documents joined by :data:`DOC_SEPARATOR`), cached."""
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if domain not in DOMAINS:
        raise UserError(f"unknown embedded domain {domain!r}; choose one of {', '.join(DOMAINS)}")
    key = stable_hash([CORPUS_VERSION, sys.version, str(stdlib_root()), VALIDATION_PERCENT, TEST_PERCENT])
    folder = cache_dir("corpus", key)
    path = folder / f"{domain}-{split}.txt"
    if not path.exists():
        with file_lock(folder / ".lock"):
            if not path.exists():
                by_split: dict[str, list[str]] = {s: [] for s in SPLITS}
                for doc in documents(domain):
                    by_split[split_of(doc.name)].append(doc.text)
                for s, texts in by_split.items():
                    atomic_write_text(folder / f"{domain}-{s}.txt", DOC_SEPARATOR.join(texts))
    return path.read_text(encoding="utf-8")


def fingerprint(text: str) -> str:
    """sha256 of a text: the identity of the data a result was measured on."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
