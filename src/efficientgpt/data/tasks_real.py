"""GLUE and SuperGLUE benchmarks as choice tasks, through ``datasets``.

``task:glue/sst2`` loads the hub dataset (``nyu-mll/glue``, ``aps/super_glue``); ``task:hf:DIR`` loads
a local directory in the hub layout (``DIR/{train,validation,test}-*.parquet`` or ``.jsonl``), named
after the benchmark it holds: ``.../glue/sst2``, ``.../super_glue/boolq`` (a bare ``.../sst2`` works
too). The benchmark's own train and validation splits are used; rows without a label (GLUE and
SuperGLUE hide their test labels, stored as -1) are dropped, so their ``test`` split is refused.

Each benchmark is a choice task scored by rank classification over its verbalised labels; the
prompts are GPT-3-style templates (Brown et al., NeurIPS 2020, Appendix G) with the options
T-Few's templates verbalise (``True``/``False`` for entailment, ``yes``/``no`` for BoolQ, COPA's
two alternatives continuing the premise).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from efficientgpt.data.tasks import Example, Task
from efficientgpt.errors import UserError


@dataclasses.dataclass(frozen=True)
class Benchmark:
    name: str
    hub: str
    config: str
    description: str
    template: str
    options: tuple[str, ...] | None
    convert: Callable[[dict[str, Any]], tuple[str, tuple[str, ...], int] | None]
    """Row -> (prompt, options, label), or None for an unlabelled row."""

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "format": "choice", "role": "benchmark", "hub": f"{self.hub}/{self.config}",
                "description": self.description, "template": self.template,
                "options": list(self.options) if self.options else None}


def _label(row: dict[str, Any], n: int) -> int | None:
    label = row.get("label")
    return int(label) if label is not None and 0 <= int(label) < n else None


def _sst2(row):
    options = (" negative", " positive")
    label = _label(row, 2)
    return None if label is None else (f"{row['sentence'].strip()}\nSentiment:", options, label)


def _entailment(row, options):
    premise = row.get("premise", row.get("sentence1"))
    hypothesis = row.get("hypothesis", row.get("sentence2"))
    label = _label(row, len(options))
    if label is None or premise is None or hypothesis is None:
        return None
    return f"{premise.strip()}\nQuestion: {hypothesis.strip()} True or False?\nAnswer:", options, label


def _rte(row):
    return _entailment(row, (" True", " False"))  # 0 = entailment, 1 = not_entailment


def _cb(row):
    return _entailment(row, (" True", " False", " Neither"))  # entailment, contradiction, neutral


def _boolq(row):
    label = _label(row, 2)
    if label is None:
        return None
    question = row["question"].strip().rstrip("?")
    return f"{row['passage'].strip()}\nQuestion: {question}?\nAnswer:", (" no", " yes"), label


def _copa(row):
    label = _label(row, 2)
    if label is None:
        return None
    connective = " because" if row["question"] == "cause" else " so"
    premise = row["premise"].strip().rstrip(".")
    options = tuple(" " + c.strip()[0].lower() + c.strip()[1:] for c in (row["choice1"], row["choice2"]))
    return premise + connective, options, label


BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (
    Benchmark("glue/sst2", "nyu-mll/glue", "sst2", "SST-2 movie review sentiment", "{sentence}\nSentiment:",
              (" negative", " positive"), _sst2),
    Benchmark("glue/rte", "nyu-mll/glue", "rte", "RTE textual entailment (GLUE columns)",
              "{sentence1}\nQuestion: {sentence2} True or False?\nAnswer:", (" True", " False"), _rte),
    Benchmark("super_glue/rte", "aps/super_glue", "rte", "RTE textual entailment (SuperGLUE columns)",
              "{premise}\nQuestion: {hypothesis} True or False?\nAnswer:", (" True", " False"), _rte),
    Benchmark("super_glue/cb", "aps/super_glue", "cb", "CommitmentBank three-way entailment",
              "{premise}\nQuestion: {hypothesis} True, False or Neither?\nAnswer:", (" True", " False", " Neither"),
              _cb),
    Benchmark("super_glue/boolq", "aps/super_glue", "boolq", "BoolQ yes/no questions about a passage",
              "{passage}\nQuestion: {question}?\nAnswer:", (" no", " yes"), _boolq),
    Benchmark("super_glue/copa", "aps/super_glue", "copa", "COPA: the more plausible cause or effect",
              "{premise} because|so", None, _copa),
)}


def _datasets():
    try:
        import datasets
    except ImportError:
        raise UserError("benchmark tasks need the 'datasets' package: pip install 'efficientgpt[datasets]'") from None
    return datasets


def _examples(bench: Benchmark, rows, where: str, split: str) -> list[Example]:
    out = []
    for row in rows:
        converted = bench.convert(row)
        if converted is None:
            continue
        prompt, options, label = converted
        key = hashlib.sha256(repr((prompt, options)).encode()).hexdigest()[:16]
        out.append(Example(key, prompt, options[label], options, label))
    if not out:
        raise UserError(f"{where} split {split} has no labelled rows (GLUE and SuperGLUE hide their test "
                        "labels; use train or validation)")
    return out


def _task(bench: Benchmark, name: str, load: Callable[[str], Any], where: str) -> Task:
    def loader(split: str) -> list[Example]:
        try:
            rows = load(split)
        except UserError:
            raise
        except Exception as err:  # noqa: BLE001 - datasets raises many types; the user needs the cause
            raise UserError(f"could not load {where} split {split}: {err}") from None
        return _examples(bench, rows, where, split)

    return Task(name, "choice", "benchmark", bench.description, bench.template, bench.options, loader, "benchmark")


def hub_benchmark(name: str) -> Task:
    """A benchmark from the Hugging Face hub (needs network on first use, then the datasets cache)."""
    bench = BENCHMARKS[name]
    datasets = _datasets()
    where = f"benchmark {name!r} ({bench.hub}/{bench.config})"

    def load(split: str):
        from efficientgpt.data.sources import require_hub

        require_hub(where)
        return datasets.load_dataset(bench.hub, bench.config, split=split)

    return _task(bench, name, load, where)


def benchmark_for_dir(path: Path) -> Benchmark:
    """The benchmark a local directory holds, from its name (``.../glue/sst2`` or ``.../sst2``)."""
    full = f"{path.parent.name}/{path.name}"
    if full in BENCHMARKS:
        return BENCHMARKS[full]
    for bench in BENCHMARKS.values():
        if bench.config == path.name:
            return bench
    names = sorted({b.config for b in BENCHMARKS.values()})
    raise UserError(f"cannot tell which benchmark {str(path)!r} holds: name the directory after one of "
                    f"{', '.join(names)} (e.g. .../glue/sst2)")


def local_benchmark(path: str) -> Task:
    """A benchmark stored in a local directory in the hub layout (no network)."""
    from efficientgpt.data.sources import _load_local_hf_dir

    root = Path(os.path.expanduser(path))
    if not root.is_dir():
        raise UserError(f"benchmark directory {path!r} does not exist")
    bench = benchmark_for_dir(root.resolve())
    datasets = _datasets()
    # Named after the benchmark, so a local copy has the same few-shot subsets as the hub's.
    return _task(bench, bench.name, lambda split: _load_local_hf_dir(datasets, str(root), split),
                 f"local benchmark {path!r} ({bench.name})")
