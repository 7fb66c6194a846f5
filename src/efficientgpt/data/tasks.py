"""The task suite: seeded, generated tasks over the embedded corpus and symbolic data, plus benchmarks.

Every task is either a **choice** task (classification or multiple choice, scored by rank
classification with length normalisation, :func:`efficientgpt.eval.tasks.rank_classify`) or a
**generation** task (scored by exact match of greedy decoding). Each has a name, a role (``source``:
the tasks multi-task methods such as ATTEMPT train on; ``target``: held out for transfer), a
description, a prompt template and, for choice tasks, its answer options.

Generated tasks run on any machine with Python: corpus tasks draw their items from the standard
library (:mod:`efficientgpt.data.corpus`), symbolic tasks from a seeded random generator. Splits
never overlap: duplicates are dropped first, then an item built from docstrings belongs to the split
of the document it comes from (:func:`efficientgpt.data.corpus.split_of`, so the embedded models,
pretrained on the prose train split, never saw a validation or test docstring), and any other item
(symbolic, or built from source code alone) to the split given by a hash of the item itself. All
randomness is seeded by :data:`SUITE_SEED` and the task name, so a task's examples are the same on
every run of the same Python (the corpus, hence the corpus tasks, differ between Python versions).

Data specs (``--data``)::

    task:NAME            a suite task (see `efficientgpt tasks`), its whole train split
    task:NAME@K          K-shot: K training examples (a fixed, seeded subset of the train split)
    task:source          every source task mixed (examples-proportional); task:target, task:all likewise
    task:source@K        K examples of each task
    task:glue/sst2       a benchmark from the Hugging Face hub through `datasets`
                         (glue/sst2, glue/rte, super_glue/rte, super_glue/boolq, super_glue/copa, super_glue/cb)
    task:hf:DIR          a local directory in the hub layout ({split}-*.parquet / .jsonl), named after the
                         benchmark it holds (e.g. /data/glue/sst2 or /data/super_glue/boolq)
    ...?k=K&seed=S&eval=N   query form: K shots, few-shot subset seed S (default 0), at most N
                         validation examples per task in evaluation (default 200)

K-shot subsets are nested: the 16-shot subset of a seed is the first 16 of its 32-shot subset.

Templates are short, so that every example with its answer fits the 64-token context of
``embedded:tiny``, and the answer follows its evidence closely: prompts end with `` ->`` (one token
in the embedded BPE and in GPT-2's) or, for ``code_or_prose``, with the line itself, whose last
characters (a period ends every docstring sentence) are the cue. On the 2-layer tiny model, LoRA
(all linear layers, rank 8) stayed at the label prior for 40-60 steps with ``"\nAnswer:"`` after the
line and learnt in some runs only with `` ->``; with the line last it reached 0.92-0.97 validation
accuracy in 60 steps (lr 3e-3) for each of three seeds.

Training batches (:meth:`TaskSource.train_batches`) hold prompt + gold answer (a generation answer
followed by the end-of-sequence token), ``labels`` = -100 on the prompt and the padding, right padding
with the tokenizer's pad token and an ``attention_mask``. Prompts longer than the sequence length are
cut from the left; an answer is never cut. :meth:`TaskSource.choice_batch` gives every answer option
of a set of training examples for option-level losses (T-Few's unlikelihood and length-normalised
losses).
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import random
import sys
import textwrap
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from efficientgpt import pipeline
from efficientgpt.cache import atomic_write_text, cache_dir, file_lock, stable_hash
from efficientgpt.data import corpus
from efficientgpt.errors import UserError, closest

FORMATS = ("choice", "generation")
ROLES = ("source", "target", "benchmark")
SPLITS = corpus.SPLITS
#: The seed of every generated task (with the task's name).
SUITE_SEED = 0
#: Bumped whenever a generated task changes, so data fingerprints change with it.
SUITE_VERSION = 1
#: Percent of hash-split items in validation and in test (docstring items follow the corpus split).
VALIDATION_PERCENT = 10
TEST_PERCENT = 10
#: Items generated per symbolic task before splitting.
POOL_SIZE = 2000
#: At most this many items per corpus task, before splitting.
CORPUS_POOL_SIZE = 4000
#: Validation examples per task scored by :meth:`TaskSource.evaluate` unless the spec says otherwise.
EVAL_EXAMPLES = 200
MIXTURES = ("source", "target", "all")


@dataclasses.dataclass(frozen=True)
class Example:
    """One example: ``prompt`` is followed by ``answer`` (for a choice task, ``options[label]``)."""

    key: str
    """The item's identity: unique within a task; hash-split items go to the split a hash of it gives."""
    prompt: str
    answer: str
    options: tuple[str, ...] = ()
    label: int = -1
    """Index of the gold option (choice tasks), -1 for generation tasks."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True, eq=False)
class Task:
    """A named task: its format, role, description, template and per-split examples."""

    name: str
    format: str
    role: str
    description: str
    template: str
    """The prompt with its fields in braces, e.g. ``"{a} + {b} ="``; options follow the prompt."""
    options: tuple[str, ...] | None
    """Fixed answer options of a choice task; None where each example has its own."""
    loader: Callable[[str], list[Example]] = dataclasses.field(repr=False)
    origin: str = "generated"
    _cache: dict = dataclasses.field(default_factory=dict, repr=False)

    def examples(self, split: str) -> list[Example]:
        if split not in SPLITS:
            raise UserError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
        if split not in self._cache:
            examples = self.loader(split)
            if not examples:
                raise UserError(f"task {self.name!r} has no {split} examples")
            self._cache[split] = examples
        return self._cache[split]

    def few_shot(self, k: int, seed: int = 0) -> list[Example]:
        """``k`` training examples: the train split ordered by a seeded hash of each key, first ``k``."""
        train = self.examples("train")
        if k > len(train):
            raise UserError(f"task {self.name!r} has {len(train)} training examples, fewer than the {k} shots asked")
        return sorted(train, key=lambda e: _digest(f"shots/{seed}/{self.name}/{e.key}"))[:k]

    def split_sizes(self) -> dict[str, int]:
        return {s: len(self.examples(s)) for s in SPLITS}

    def describe(self, sizes: bool = True) -> dict[str, Any]:
        d = {"name": self.name, "format": self.format, "role": self.role, "origin": self.origin,
             "description": self.description, "template": self.template,
             "options": list(self.options) if self.options is not None else None}
        if sizes:
            d["splits"] = self.split_sizes()
        return d


TASKS: dict[str, Task] = {}


def source_tasks() -> list[Task]:
    return [t for t in TASKS.values() if t.role == "source"]


def target_tasks() -> list[Task]:
    return [t for t in TASKS.values() if t.role == "target"]


def _digest(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def _rng(name: str) -> random.Random:
    return random.Random(f"efficientgpt-tasks/{SUITE_SEED}/{name}")


def symbolic_split(task: str, key: str) -> str:
    """The split of a symbolic item: a hash of the task and the item's key."""
    bucket = _digest(f"split/{task}/{key}") % 100
    if bucket < VALIDATION_PERCENT:
        return "validation"
    if bucket < VALIDATION_PERCENT + TEST_PERCENT:
        return "test"
    return "train"


#: Task name -> the function that generates its examples of every split from scratch.
GENERATORS: dict[str, Callable[[], dict[str, list[Example]]]] = {}


def generate(name: str) -> dict[str, list[Example]]:
    """Generate a suite task's examples of every split anew (``Task.examples`` caches them)."""
    return GENERATORS[name]()


def _register(name: str, format: str, role: str, description: str, template: str,
              options: tuple[str, ...] | None, origin: str, build: Callable[[], dict[str, list[Example]]]) -> Task:
    cache: dict[str, dict[str, list[Example]]] = {}

    def loader(split: str) -> list[Example]:
        if "all" not in cache:
            cache["all"] = build()
        return cache["all"][split]

    GENERATORS[name] = build
    task = Task(name, format, role, description, template, options, loader, origin)
    TASKS[name] = task
    return task


def _symbolic(name: str, make: Callable[[random.Random], Example]) -> Callable[[], dict[str, list[Example]]]:
    """Draw :data:`POOL_SIZE` distinct items with the task's seeded generator and hash-split them."""

    def build() -> dict[str, list[Example]]:
        rng = _rng(name)
        out: dict[str, list[Example]] = {s: [] for s in SPLITS}
        seen: set[str] = set()
        for _ in range(POOL_SIZE * 20):
            if len(seen) == POOL_SIZE:
                break
            ex = make(rng)
            if ex.key not in seen:
                seen.add(ex.key)
                out[symbolic_split(name, ex.key)].append(ex)
        return out

    return build


def _from_corpus(name: str, items: Callable[[random.Random], list[tuple[str, Example]]], by_document: bool = True
                 ) -> Callable[[], dict[str, list[Example]]]:
    """Corpus items ``(document name, example)``: dedupe, sample the pool, split.

    Items built from docstrings split by document, as the corpus does, so no embedded model was
    pretrained on (the prose of) a validation or test item; items built from source code alone
    (``by_document=False``), which no embedded model pretrains on, split by a hash of the item like
    symbolic items, which keeps their validation split large enough.
    """

    def build() -> dict[str, list[Example]]:
        rng = _rng(name)
        pairs, seen = [], set()
        for doc, ex in items(rng):
            if ex.key not in seen:
                seen.add(ex.key)
                pairs.append((doc, ex))
        if len(pairs) > CORPUS_POOL_SIZE:
            pairs = rng.sample(pairs, CORPUS_POOL_SIZE)
        out: dict[str, list[Example]] = {s: [] for s in SPLITS}
        for doc, ex in pairs:
            out[corpus.split_of(doc) if by_document else symbolic_split(name, ex.key)].append(ex)
        return out

    return build


# ---- raw material from the standard library ---------------------------------------------------------

#: Bumped whenever extraction below changes.
MATERIAL_VERSION = 1


def _first_sentence(doc: str) -> str | None:
    para = " ".join(doc.split("\n\n", 1)[0].split())
    end = para.find(". ")
    sentence = para if end < 0 else para[: end + 1]
    if not (25 <= len(sentence) <= 90 and sentence.endswith(".") and sentence.isascii()):
        return None
    if len(sentence.split()) < 4 or any(c in sentence for c in "`>|*"):
        return None
    return sentence


def _statements(node: ast.AST):
    """``node`` and every statement nested in it (expressions are not visited: much faster than ast.walk)."""
    yield node
    for field in ("body", "orelse", "finalbody", "handlers", "cases"):
        for child in getattr(node, field, None) or ():
            if isinstance(child, (ast.stmt, ast.excepthandler, ast.match_case)):
                yield from _statements(child)


def _extract(source: str) -> dict[str, list[str]]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tree = ast.parse(source)
    lines = source.splitlines()
    string_lines: set[int] = set()
    out: dict[str, list[str]] = {"docstrings": [], "code_lines": [], "functions": []}
    for node in _statements(tree):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            string_lines.update(range(node.lineno, (node.end_lineno or node.lineno) + 1))
        if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        doc = ast.get_docstring(node, clean=True)
        if doc and (s := _first_sentence(doc)):
            out["docstrings"].append(s)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and doc is None and node.end_lineno:
            n = node.end_lineno - node.lineno + 1
            if 2 <= n <= 4:
                snippet = textwrap.dedent("\n".join(lines[node.lineno - 1 : node.end_lineno]))
                ok = (len(snippet) <= 76 and "\t" not in snippet and snippet.isascii()
                      and all(ln.strip() and not ln.strip().startswith("#") for ln in snippet.splitlines()))
                if ok and snippet.startswith(("def ", "async def ")) and _compiles(snippet):
                    out["functions"].append(snippet)
    # Lines of string statements (docstrings) are prose; a line inside another multi-line string
    # literal may slip through as "code", a little label noise the task tolerates.
    for i, ln in enumerate(lines, start=1):
        s = ln.strip()
        if (i not in string_lines and 20 <= len(s) <= 60 and s.isascii() and not s.startswith(("#", "'", '"'))
                and not s.endswith("\\") and "#" not in s):
            out["code_lines"].append(s)
    return out


def _compiles(src: str) -> bool:
    try:
        compile(src, "<snippet>", "exec", dont_inherit=True)
    except (SyntaxError, ValueError):
        return False
    return True


def material() -> dict[str, list[list[str]]]:
    """Per stdlib module: docstring first sentences, code lines and short functions (cached as JSON).

    Rows are ``[document name, top-level module, text]``; at most 20 code lines per document, chosen
    by a hash, so the file stays small.
    """
    key = stable_hash([MATERIAL_VERSION, corpus.CORPUS_VERSION, sys.version, str(corpus.stdlib_root())])
    folder = cache_dir("tasks")
    path = folder / f"material-{key}.json"
    if not path.exists():
        with file_lock(folder / f"material-{key}.lock"):
            if not path.exists():
                rows: dict[str, list[list[str]]] = {"docstrings": [], "code_lines": [], "functions": []}
                for doc in corpus.documents("code"):
                    top = doc.name.split(":", 1)[1].split("/", 1)[0].removesuffix(".py")
                    if top.startswith("_") or top == "this":
                        continue
                    try:
                        found = _extract(doc.text)
                    except (SyntaxError, ValueError):
                        continue
                    found["code_lines"] = sorted(set(found["code_lines"]),
                                                 key=lambda s, d=doc.name: _digest(f"{d}/{s}"))[:20]
                    for kind, texts in found.items():
                        rows[kind].extend([doc.name, top, t] for t in texts)
                atomic_write_text(path, json.dumps(rows))
    return json.loads(path.read_text(encoding="utf-8"))


# ---- the generated tasks -----------------------------------------------------------------------------

WORDS = (
    "apple", "river", "stone", "cloud", "green", "table", "light", "house", "bread", "chair", "dog", "cat",
    "sun", "moon", "star", "tree", "bird", "fish", "book", "door", "road", "hill", "lake", "rain", "snow",
    "wind", "fire", "milk", "salt", "ship", "king", "ring", "bell", "coin", "lamp", "rope", "sand", "leaf",
    "wolf", "bear", "frog", "duck", "corn", "rice", "gold", "iron", "wood", "wall", "box", "cup", "hat",
    "pen", "key", "map", "egg", "owl", "bee", "ant", "fox", "cow",
)


def _word_list(rng: random.Random) -> list[str]:
    return rng.sample(WORDS, rng.randint(3, 5))


def _copy(rng: random.Random) -> Example:
    words = _word_list(rng)
    return Example(" ".join(words), f"Copy: {' '.join(words)} ->", " " + " ".join(words))


def _sort(rng: random.Random) -> Example:
    words = _word_list(rng)
    return Example(" ".join(words), f"Sort: {' '.join(words)} ->", " " + " ".join(sorted(words)))


def _reverse(rng: random.Random) -> Example:
    words = _word_list(rng)
    return Example(" ".join(words), f"Reverse: {' '.join(words)} ->", " " + " ".join(reversed(words)))


def _arithmetic(rng: random.Random) -> Example:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    op = rng.choice("+-")
    if op == "-" and b > a:
        a, b = b, a
    value = a + b if op == "+" else a - b
    return Example(f"{a}{op}{b}", f"Compute {a} {op} {b} ->", f" {value}")


def _compare(rng: random.Random) -> Example:
    a, b = rng.sample(range(1000), 2)
    options = (f" {a}", f" {b}")
    return Example(f"{a},{b}", f"Larger of {a} and {b} ->", options[int(b > a)], options, int(b > a))


def _kv_lookup(rng: random.Random) -> Example:
    keys = rng.sample("abcdefghijklmnopqrstuvwxyz", rng.randint(3, 5))
    values = [rng.randint(0, 9) for _ in keys]
    q = rng.randrange(len(keys))
    pairs = ", ".join(f"{k}={v}" for k, v in zip(keys, values, strict=True))
    return Example(f"{pairs}?{keys[q]}", f"Values: {pairs}. What is {keys[q]}? ->", f" {values[q]}")


def _code_or_prose(rng: random.Random) -> list[tuple[str, Example]]:
    m = material()
    half = CORPUS_POOL_SIZE // 2
    code = rng.sample(m["code_lines"], min(half, len(m["code_lines"])))
    prose = rng.sample(m["docstrings"], min(half, len(m["docstrings"])))
    options = (" code", " text")
    out = []
    for label, rows in ((0, code), (1, prose)):
        for doc, _, text in rows:
            out.append((doc, Example(f"{label}:{text}", f"Code or text? {text}", options[label],
                                     options, label)))
    rng.shuffle(out)
    return out


def _docstring_module(rng: random.Random) -> list[tuple[str, Example]]:
    rows = material()["docstrings"]
    counts: dict[str, int] = {}
    for _, top, _ in rows:
        counts[top] = counts.get(top, 0) + 1
    # Labels common enough to be learnt from the train split; distractors drawn from the same set.
    modules = sorted(m for m, c in counts.items() if c >= 20)
    out = []
    for doc, top, text in rows:
        if top not in modules:
            continue
        options = [top, *rng.sample([m for m in modules if m != top], 3)]
        rng.shuffle(options)
        opts = tuple(f" {o}" for o in options)
        out.append((doc, Example(text, f"Module of: {text} ->", f" {top}", opts, options.index(top))))
    return out


def _docstring_order(rng: random.Random) -> list[tuple[str, Example]]:
    out = []
    for doc, _, text in material()["docstrings"]:
        words = text.split()
        if len(words) < 6:
            continue
        shuffled = words[:]
        for _ in range(10):
            rng.shuffle(shuffled)
            if shuffled != words:
                break
        else:
            continue
        label = rng.randrange(2)
        opts = [" " + " ".join(shuffled)]
        opts.insert(label, " " + text)
        out.append((doc, Example(text, "A sentence from the Python documentation:", " " + text, tuple(opts), label)))
    return out


def _indent_break(snippet: str, rng: random.Random) -> str | None:
    """``snippet`` with one body line re-indented so that it no longer compiles, or None."""
    lines = snippet.splitlines()
    for _ in range(8):
        i = rng.randrange(1, len(lines))
        body = lines[i].lstrip(" ")
        indent = len(lines[i]) - len(body)
        new = max(0, indent + rng.choice((-4, -3, -2, -1, 1, 2, 3)))
        broken = "\n".join([*lines[:i], " " * new + body, *lines[i + 1 :]])
        if new != indent and not _compiles(broken):
            return broken
    return None


def _valid_indent(rng: random.Random) -> list[tuple[str, Example]]:
    options = (" valid", " invalid")
    out = []
    for doc, _, snippet in material()["functions"]:
        label = rng.randrange(2)
        code = snippet if label == 0 else _indent_break(snippet, rng)
        if code is None:
            continue
        out.append((doc, Example(snippet, f"Indentation valid or invalid?\n{code}\n->",
                                 options[label], options, label)))
    return out


_register("code_or_prose", "choice", "source",
          "is a line of text Python source code or documentation prose (stdlib lines vs docstring sentences)",
          "Code or text? {text}", (" code", " text"), "corpus",
          _from_corpus("code_or_prose", _code_or_prose))
_register("docstring_module", "choice", "source",
          "which top-level stdlib module a docstring sentence comes from (4 options)",
          "Module of: {text} ->", None, "corpus", _from_corpus("docstring_module", _docstring_module))
_register("compare_numbers", "choice", "source", "which of two numbers below 1000 is larger",
          "Larger of {a} and {b} ->", None, "symbolic", _symbolic("compare_numbers", _compare))
_register("copy_words", "generation", "source", "repeat a list of 3-5 words",
          "Copy: {words} ->", None, "symbolic", _symbolic("copy_words", _copy))
_register("sort_words", "generation", "source", "sort a list of 3-5 words alphabetically",
          "Sort: {words} ->", None, "symbolic", _symbolic("sort_words", _sort))
_register("arithmetic", "generation", "source", "add or subtract two numbers below 100 (non-negative results)",
          "Compute {a} {op} {b} ->", None, "symbolic", _symbolic("arithmetic", _arithmetic))
_register("docstring_order", "choice", "target",
          "tell a docstring sentence from the same words shuffled (2 options, no question asked)",
          "A sentence from the Python documentation:", None, "corpus",
          _from_corpus("docstring_order", _docstring_order))
_register("valid_indent", "choice", "target",
          "does a short stdlib function compile, or was one line re-indented to break it",
          "Indentation valid or invalid?\n{code}\n->", (" valid", " invalid"), "corpus",
          _from_corpus("valid_indent", _valid_indent, by_document=False))
_register("reverse_words", "generation", "target", "reverse a list of 3-5 words",
          "Reverse: {words} ->", None, "symbolic", _symbolic("reverse_words", _reverse))
_register("kv_lookup", "generation", "target", "read the value of a key from 3-5 key=digit pairs in the prompt",
          "Values: {pairs}. What is {key}? ->", None, "symbolic", _symbolic("kv_lookup", _kv_lookup))


# ---- specs ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """A parsed ``task:`` data spec (see the module docstring)."""

    name: str
    shots: int | None = None
    seed: int = 0
    eval_examples: int = EVAL_EXAMPLES


def _int_param(spec: str, key: str, value: str, minimum: int) -> int:
    try:
        n = int(value)
    except ValueError:
        n = minimum - 1
    if n < minimum:
        raise UserError(f"{key}={value!r} in data spec {spec!r} must be an integer >= {minimum}")
    return n


def parse_spec(spec: str) -> TaskSpec:
    """``task:NAME[@K][?k=K&seed=S&eval=N]`` to a :class:`TaskSpec`."""
    if not spec.startswith("task:"):
        raise UserError(f"data spec {spec!r} is not a task spec (task:NAME)")
    body = spec[len("task:"):]
    params: dict[str, int] = {}
    if "?" in body:
        body, query = body.rsplit("?", 1)
        for part in filter(None, query.split("&")):
            key, sep, value = part.partition("=")
            if not sep or key not in ("k", "shots", "seed", "eval"):
                raise UserError(f"unknown parameter {part!r} in data spec {spec!r}; allowed: k=K, seed=S, eval=N")
            params["k" if key == "shots" else key] = _int_param(spec, key, value, 0 if key == "seed" else 1)
    if "@" in body and body.rsplit("@", 1)[1].isdigit():
        body, k = body.rsplit("@", 1)
        params["k"] = _int_param(spec, "@K", k, 1)
    if not body:
        raise UserError(f"data spec {spec!r} names no task; try task:NAME (see 'efficientgpt tasks')")
    return TaskSpec(body, params.get("k"), params.get("seed", 0), params.get("eval", EVAL_EXAMPLES))


def resolve(name: str) -> list[Task]:
    """The tasks a spec name stands for: one task, a mixture, or a benchmark."""
    if name in TASKS:
        return [TASKS[name]]
    if name in MIXTURES:
        return source_tasks() if name == "source" else target_tasks() if name == "target" else list(TASKS.values())
    from efficientgpt.data import tasks_real

    if name.startswith("hf:"):
        return [tasks_real.local_benchmark(name[3:])]
    if name in tasks_real.BENCHMARKS:
        return [tasks_real.hub_benchmark(name)]
    known = [*TASKS, *MIXTURES, *tasks_real.BENCHMARKS]
    raise UserError(f"unknown task {name!r}{closest(name, known)}; choose one of {', '.join(known)}, "
                    "or hf:DIR for a local benchmark directory")


# ---- the data source -----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TaskExample:
    """An example of a (possibly mixed) task source, with its task."""

    task: str
    example: Example


@dataclasses.dataclass
class ChoiceBatch:
    """Every answer option of N examples, for option-level losses (T-Few's L_UL and L_LN).

    Rows are example-major: row ``n * C + c`` holds example ``n``'s prompt followed by its option
    ``c``, where ``C`` is the largest number of options in the batch. An example with fewer options has
    rows of prompt alone whose ``labels`` are all -100 and ``option_mask[n, c]`` False. A generation
    example has one option: its answer followed by the end-of-sequence token.

    ``continuation_nll(model, batch.model_inputs())`` (:mod:`efficientgpt.eval.tasks`) returns the summed
    NLL and token count per row; ``.view(N, C)`` gives per-option values, and ``sum / count`` the
    length-normalised NLL that rank classification ranks by.
    """

    input_ids: torch.Tensor  # (N*C, T)
    attention_mask: torch.Tensor  # (N*C, T)
    labels: torch.Tensor  # (N*C, T): option tokens, -100 elsewhere
    option_mask: torch.Tensor  # (N, C) bool
    gold: torch.Tensor  # (N,)
    task_ids: torch.Tensor  # (N,): index into TaskSource.task_names

    @property
    def num_options(self) -> int:
        return self.option_mask.shape[1]

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "labels": self.labels}

    def to(self, device) -> ChoiceBatch:
        return ChoiceBatch(**{f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)})


class TaskSource:
    """A ``task:`` data spec as a pipeline data source (see :class:`efficientgpt.pipeline.DataSource`).

    ``train`` lists the training examples (the K-shot subsets when the spec asks for shots) in a fixed
    order; :meth:`train_indices` says which of them make up the global batch of a step, and
    ``train[i].task`` which task each comes from (``task_names.index`` gives its task id).
    """

    def __init__(self, spec: str, tokenizer, eval_tokens: int | None = None, eval_examples: int | None = None):
        self.spec = spec
        self.parsed = parse_spec(spec)
        self.tasks = resolve(self.parsed.name)
        self.task_names = [t.name for t in self.tasks]
        self.tokenizer = tokenizer
        self.eval_examples = eval_examples if eval_examples is not None else self.parsed.eval_examples
        self.pad_id, self.eos_id = _special_ids(tokenizer)
        self.prefix = _bos_prefix(tokenizer)
        self.train: list[TaskExample] = []
        for task in self.tasks:
            chosen = task.few_shot(self.parsed.shots, self.parsed.seed) if self.parsed.shots else task.examples("train")
            self.train.extend(TaskExample(task.name, ex) for ex in chosen)
        self._by_name = {t.name: t for t in self.tasks}
        self._encoded: dict[int, tuple[list[int], list[int]]] = {}
        blob = json.dumps([SUITE_VERSION, self.parsed.name, self.parsed.shots, self.parsed.seed,
                           [(t.task, t.example.prompt, t.example.answer, t.example.options) for t in self.train],
                           [(t.name, [(e.prompt, e.answer, e.options) for e in t.examples("validation")])
                            for t in self.tasks]])
        self.fingerprint = hashlib.sha256(blob.encode()).hexdigest()

    # ---- encoding ----------------------------------------------------------------------------------
    def _ids(self, texts: Sequence[str]) -> list[list[int]]:
        if not texts:
            return []
        return self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]

    def _target(self, task: str, ids: list[int]) -> list[int]:
        """A generation answer ends with end-of-sequence, so the model learns where to stop."""
        gen = self._by_name[task].format == "generation"
        return ids + [self.eos_id] if gen and self.eos_id is not None else ids

    def fit_prompt(self, prompt_ids: list[int], longest_answer: int, max_len: int, what: str = "") -> list[int]:
        """The tokenizer's start tokens + the prompt, cut from the left so the answer fits in ``max_len``."""
        room = max_len - longest_answer - len(self.prefix)
        if room < 1:
            raise UserError(f"the answer of {what or 'an example'} has {longest_answer} tokens and does not fit "
                            f"a sequence of {max_len} tokens with its prompt; use a longer --seq-len")
        return self.prefix + list(prompt_ids[-room:])

    def _encode_train(self, indices: Sequence[int]) -> list[tuple[list[int], list[int]]]:
        todo = sorted({i for i in indices if i not in self._encoded})
        if todo:
            prompts = self._ids([self.train[i].example.prompt for i in todo])
            answers = self._ids([self.train[i].example.answer for i in todo])
            for i, p, a in zip(todo, prompts, answers, strict=True):
                self._encoded[i] = (p, self._target(self.train[i].task, a))
        return [self._encoded[i] for i in indices]

    # ---- training ----------------------------------------------------------------------------------
    def train_indices(self, step: int, batch_size: int, seed: int = 0) -> list[int]:
        """Indices into ``train`` of the global batch of ``step``: a pure function of ``(seed, step)``.

        Epoch ``e`` visits the examples in a permutation seeded by ``(seed, e)``; a batch may span
        two epochs. Mixtures are thus examples-proportional.
        """
        n = len(self.train)
        out = []
        for pos in range(step * batch_size, (step + 1) * batch_size):
            epoch, i = divmod(pos, n)
            out.append(int(_permutation(seed, epoch, n)[i]))
        return out

    def train_batches(self, cfg, rank: int = 0, world: int = 1) -> Callable[[int], dict[str, torch.Tensor]]:
        """Step -> this process's rows ``rank::world`` of the global batch (padded to its longest row)."""
        if cfg.batch_size % world:
            raise UserError(f"batch size {cfg.batch_size} is not divisible by the {world} processes")
        from efficientgpt.eval.tasks import collate

        def batch(step: int) -> dict[str, torch.Tensor]:
            idx = self.train_indices(step, cfg.batch_size, cfg.seed)
            rows = self._encode_train(idx)
            prompts = [self.fit_prompt(p, len(a), cfg.seq_len, self.train[i].task)
                       for i, (p, a) in zip(idx, rows, strict=True)]
            b = collate(prompts, [a for _, a in rows], self.pad_id)
            return {k: v[rank::world] for k, v in b.items()}

        return batch

    def choice_batch(self, indices: Sequence[int], seq_len: int) -> ChoiceBatch:
        """All answer options of the training examples ``indices`` (see :class:`ChoiceBatch`)."""
        from efficientgpt.eval.tasks import collate

        exs = [self.train[i] for i in indices]
        prompts = self._ids([t.example.prompt for t in exs])
        options = [[self._target(t.task, o) for o in self._ids(list(t.example.options) or [t.example.answer])]
                   for t in exs]
        width = max(len(o) for o in options)
        rows_p, rows_c, mask = [], [], torch.zeros(len(exs), width, dtype=torch.bool)
        for n, (t, p, opts) in enumerate(zip(exs, prompts, options, strict=True)):
            fitted = self.fit_prompt(p, max(len(o) for o in opts), seq_len, t.task)
            for c in range(width):
                rows_p.append(fitted)
                rows_c.append(opts[c] if c < len(opts) else [])
                mask[n, c] = c < len(opts)
        b = collate(rows_p, rows_c, self.pad_id)
        gold = torch.tensor([max(t.example.label, 0) for t in exs], dtype=torch.long)
        task_ids = torch.tensor([self.task_names.index(t.task) for t in exs], dtype=torch.long)
        return ChoiceBatch(b["input_ids"], b["attention_mask"], b["labels"], mask, gold, task_ids)

    # ---- evaluation --------------------------------------------------------------------------------
    def evaluate(self, model, cfg) -> dict[str, Any]:
        """Task metrics on the validation split, at most ``eval_examples`` examples per task."""
        return self.evaluate_split(model, "validation", self.eval_examples, seq_len=cfg.seq_len)

    def evaluate_split(self, model, split: str = "validation", max_examples: int | None = EVAL_EXAMPLES,
                       seq_len: int | None = None, batch_size: int = 32) -> dict[str, Any]:
        """``loss`` (mean NLL per gold-answer token), ``accuracy`` (the task metric), ``metric``, ``examples``.

        ``accuracy`` is rank-classification accuracy for choice tasks and exact match for generation
        tasks (``metric`` says which); for a mixture it is the mean over its tasks and ``tasks`` holds
        each task's own numbers.
        """
        from efficientgpt.eval.perplexity import default_seq_len

        max_len = min(seq_len or default_seq_len(model), default_seq_len(model))
        was_training = model.training
        model.eval()
        try:
            per_task = {t.name: self._score(model, t, t.examples(split)[:max_examples], max_len, batch_size)
                        for t in self.tasks}
        finally:
            model.train(was_training)
        nll = sum(r.pop("_nll") for r in per_task.values())
        tokens = sum(r["tokens"] for r in per_task.values())
        if len(per_task) == 1:
            (name, r), = per_task.items()
            return {**r, "loss": nll / max(1, tokens), "task": name, "split": split}
        return {"loss": nll / max(1, tokens), "accuracy": sum(r["accuracy"] for r in per_task.values()) / len(per_task),
                "metric": "mean_task_score", "examples": sum(r["examples"] for r in per_task.values()),
                "tokens": tokens, "split": split, "tasks": per_task}

    def _score(self, model, task: Task, examples: list[Example], max_len: int, batch_size: int) -> dict[str, Any]:
        from efficientgpt.eval import tasks as scoring

        prompts = self._ids([e.prompt for e in examples])
        if task.format == "choice":
            options = [self._ids(list(e.options)) for e in examples]
            fitted = [self.fit_prompt(p, max(len(o) for o in opts), max_len, task.name)
                      for p, opts in zip(prompts, options, strict=True)]
            res = scoring.rank_classify(model, fitted, options, [e.label for e in examples], self.pad_id, batch_size)
            acc = res.accuracy([e.label for e in examples])
            return {"metric": "accuracy", "accuracy": acc, "examples": len(examples), "tokens": res.gold_tokens,
                    "loss": res.gold_nll / max(1, res.gold_tokens), "_nll": res.gold_nll}
        answers = [self._target(task.name, a) for a in self._ids([e.answer for e in examples])]
        # Room for the gold answer and one more token (its end-of-sequence), so that "the answer, then
        # something else" is a miss.
        budget = [len(a) + (0 if self.eos_id is not None else 1) for a in answers]
        fitted = [self.fit_prompt(p, n, max_len, task.name) for p, n in zip(prompts, budget, strict=True)]
        sums, counts = scoring.score_continuations(model, fitted, answers, self.pad_id, batch_size)
        stop = {self.eos_id} if self.eos_id is not None else set()
        generated = scoring.greedy_generate(model, fitted, budget, stop, self.pad_id, batch_size)
        texts = [scoring.decode_generation(self.tokenizer, g, stop) for g in generated]
        hits = [scoring.exact_match(t, e.answer) for t, e in zip(texts, examples, strict=True)]
        acc = sum(hits) / max(1, len(hits))
        nll, tokens = float(sums.sum()), int(counts.sum())
        return {"metric": "exact_match", "accuracy": acc, "exact_match": acc, "examples": len(examples),
                "tokens": tokens, "loss": nll / max(1, tokens), "_nll": nll}

    def describe(self) -> dict[str, Any]:
        return {"spec": self.spec, "tasks": [t.describe(sizes=False) for t in self.tasks],
                "shots": self.parsed.shots, "few_shot_seed": self.parsed.seed, "train_examples": len(self.train),
                "eval_examples": self.eval_examples, "fingerprint": self.fingerprint}


_PERMUTATIONS: dict[tuple[int, int, int], np.ndarray] = {}


def _permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    key = (seed, epoch, n)
    if key not in _PERMUTATIONS:
        if len(_PERMUTATIONS) > 64:
            _PERMUTATIONS.clear()
        _PERMUTATIONS[key] = np.random.default_rng([seed, epoch]).permutation(n)
    return _PERMUTATIONS[key]


def _special_ids(tokenizer) -> tuple[int, int | None]:
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    if pad is None:
        raise UserError("the tokenizer has neither a pad nor an end-of-sequence token to pad task batches with")
    return pad, eos


def _bos_prefix(tokenizer) -> list[int]:
    """The tokens the tokenizer puts before a text (a Llama ``<s>``; nothing for GPT-2's BPE)."""
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    if len(with_special) > len(plain) and with_special[len(with_special) - len(plain):] == plain:
        return with_special[: len(with_special) - len(plain)]
    return []


def open_task(spec: str, tokenizer, eval_tokens: int | None = None) -> TaskSource:
    """The pipeline opener for ``task:`` specs (``eval_tokens`` does not apply: tasks count examples)."""
    return TaskSource(spec, tokenizer, eval_tokens)


pipeline.OPENERS["task:"] = open_task
