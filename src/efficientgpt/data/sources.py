"""Data specs (``--data``) to text: the embedded corpus, text files and ``datasets`` datasets.

Spec forms:

``embedded:prose`` / ``embedded:code``
    The embedded corpus (:mod:`efficientgpt.data.corpus`).
``PATH``
    A UTF-8 text file: the whole file serves every split. A directory holding ``train.txt``,
    ``validation.txt`` and/or ``test.txt`` gives one file per split.
``hf:NAME[/CONFIG]``
    A ``datasets`` dataset from the hub (e.g. ``hf:wikitext/wikitext-2-raw-v1``; a namespaced id takes
    its config as a third part, ``hf:OWNER/NAME/CONFIG``) or a local directory
    in the hub's layout (``hf:/data/wikitext/wikitext-2-raw-v1`` loads
    ``/data/wikitext/wikitext-2-raw-v1/{train,validation,test}-*.parquet``). Rows of the ``text``
    column are joined with ``"\\n\\n"``, the WikiText-2 protocol of SparseGPT, Wanda and
    lm-evaluation-harness.
``task:NAME``
    A task of the task suite.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from efficientgpt.data import corpus
from efficientgpt.errors import UserError

SPEC_FORMS = "embedded:prose, embedded:code, a text file or directory, hf:NAME[/CONFIG], task:NAME"


@dataclasses.dataclass(frozen=True)
class TextData:
    """One split of one data source as text, with its identity."""

    spec: str
    split: str
    text: str

    @property
    def fingerprint(self) -> str:
        return corpus.fingerprint(self.text)

    def describe(self) -> dict:
        return {"spec": self.spec, "split": self.split, "chars": len(self.text), "sha256": self.fingerprint}


def load_text(spec: str, split: str = "validation") -> TextData:
    """The text of ``split`` of the data named by ``spec`` (see the module docstring)."""
    if split not in corpus.SPLITS:
        raise UserError(f"unknown split {split!r}; choose one of {', '.join(corpus.SPLITS)}")
    if spec.startswith("embedded:"):
        domain = spec.split(":", 1)[1]
        if domain not in corpus.DOMAINS:
            raise UserError(f"unknown embedded data {spec!r}; choose embedded:prose or embedded:code")
        text = corpus.corpus_text(domain, split)
    elif spec.startswith("hf:"):
        text = _load_hf(spec[3:], split)
    elif spec.startswith("task:"):
        raise UserError(f"{spec!r} names a task; tasks are scored by the task evaluation, not as plain text")
    else:
        text = _load_path(spec, split)
    if not text.strip():
        raise UserError(f"data {spec!r} (split {split}) is empty")
    return TextData(spec, split, text)


def _load_path(spec: str, split: str) -> str:
    path = Path(os.path.expanduser(spec))
    if path.is_dir():
        candidate = path / f"{split}.txt"
        if not candidate.is_file():
            have = sorted(p.name for p in path.glob("*.txt"))
            raise UserError(
                f"data directory {str(path)!r} has no {split}.txt (found: {', '.join(have) or 'no .txt files'}); "
                "a data directory holds train.txt, validation.txt and/or test.txt"
            )
        path = candidate
    if not path.is_file():
        raise UserError(f"data {spec!r} is not a file or directory, nor a known spec ({SPEC_FORMS})")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"data file {str(path)!r} is not UTF-8 text ({err.reason} at byte {err.start})") from None


_HF_SPLITS = {"train": "train", "validation": "validation", "test": "test"}


def _load_hf(name: str, split: str) -> str:
    try:
        import datasets
    except ImportError:
        raise UserError("hf: data needs the 'datasets' package: pip install 'efficientgpt[datasets]'") from None
    local = os.path.expanduser(name) if os.path.isdir(os.path.expanduser(name)) else None
    config = None
    if local is None and "/" in name:
        # NAME/CONFIG, or OWNER/NAME/CONFIG for namespaced hub ids.
        name, config = name.rsplit("/", 1)
    try:
        if local is not None:
            ds = _load_local_hf_dir(datasets, local, split)
        else:
            require_hub(f"dataset 'hf:{name}{'/' + config if config else ''}'")
            ds = datasets.load_dataset(name, config, split=_HF_SPLITS[split])
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - datasets raises many types; the user needs the cause
        raise UserError(f"could not load dataset 'hf:{name}{'/' + config if config else ''}' split {split}: {err}") from None
    column = "text" if "text" in ds.column_names else next(
        (c for c, f in ds.features.items() if getattr(f, "dtype", None) == "string"), None
    )
    if column is None:
        raise UserError(f"dataset 'hf:{name}' has no text column (columns: {', '.join(ds.column_names)})")
    return "\n\n".join(ds[column])


def require_hub(what: str) -> None:
    """Fail at once, instead of after a minute of retries, when ``what`` needs an unreachable hub.

    ``datasets`` has no cache-only switch per call, so the way to a cached copy without network is
    the libraries' own offline mode, which this error names.
    """
    from efficientgpt import hub

    if hub.unreachable():
        raise UserError(f"{what} needs the hub, but {hub.unreachable_reason()}; for a copy already in the "
                        "datasets cache set HF_HUB_OFFLINE=1, or give a local directory in the hub layout "
                        "(hf:PATH with {split}-*.parquet/.jsonl/.txt files)")


def _load_local_hf_dir(datasets, path: str, split: str):
    """A local directory in the hub layout: ``{split}-*.parquet`` / ``.jsonl`` / ``.txt`` files."""
    root = Path(path)
    for ext, builder in (("parquet", "parquet"), ("jsonl", "json"), ("json", "json"), ("txt", "text")):
        files = sorted(str(p) for p in root.glob(f"{split}*.{ext}")) or sorted(
            str(p) for p in root.glob(f"*/{split}*.{ext}")
        )
        if files:
            return datasets.load_dataset(builder, data_files={split: files}, split=split)
    raise UserError(f"local dataset directory {path!r} has no {split}-*.parquet/.jsonl/.txt files")
