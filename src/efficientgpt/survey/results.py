"""Links from survey entries to this repository: implementing modules and measured runs.

An entry's ``implementation`` names registry methods. The module that implements a method is the
module of its spec's ``apply`` function, shown as a path from the repository root
(``src/efficientgpt/peft/lora.py``).

Measured results come from the benchmark harness's JSON files, one run per file::

    {"method": "lora", "status": "ok", "metrics": {"val_ppl": 12.3, "trainable_pct": 0.24, ...}, ...}

Only runs with ``"status": "ok"`` count. When a method has several, its main run is shown: the one
whose file is named after the method (``lora.json``: the bench's main data set; perplexities on
different data do not compare), else the one with the lowest ``val_ppl`` (runs without it rank after
those with it; ties go to the first file name). The cell names the file it came from.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from efficientgpt.bench.schema import number

#: Where ``render`` looks for run files unless ``--results`` says otherwise (relative to the cwd).
DEFAULT_RESULTS_DIR = Path("benchmarks") / "results"


@dataclasses.dataclass(frozen=True)
class Run:
    """One successful benchmark run of a method."""

    method: str
    """Registry name of the method the run measured."""
    path: Path
    """The JSON file the run was read from."""
    metrics: dict[str, Any]
    """The run's ``metrics`` object, as written by the harness."""

    def rank(self) -> tuple[int, int, float, str]:
        main = 0 if self.path.stem == self.method else 1
        ppl = number(self.metrics.get("val_ppl"))
        return (main, 0, ppl, self.path.name) if ppl is not None else (main, 1, 0.0, self.path.name)




def load_runs(results_dir: Path | str | None) -> tuple[dict[str, list[Run]], list[str]]:
    """Successful runs by method, and warnings for files that could not be read.

    A missing directory simply means no results yet. Files are read in name order so the choice of
    run, and therefore the rendered survey, does not depend on the file system's listing order.
    """
    runs: dict[str, list[Run]] = {}
    warnings: list[str] = []
    directory = Path(results_dir) if results_dir is not None else DEFAULT_RESULTS_DIR
    if not directory.is_dir():
        return runs, warnings
    for path in sorted(directory.glob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            warnings.append(f"{path}: skipped, not readable JSON ({err})")
            continue
        if not isinstance(data, dict) or not isinstance(data.get("method"), str):
            warnings.append(f"{path}: skipped, no 'method' name")
            continue
        if data.get("status") != "ok":
            continue
        metrics = data.get("metrics") if isinstance(data.get("metrics"), dict) else {}
        runs.setdefault(data["method"], []).append(Run(data["method"], path, metrics))
    return runs, warnings


def best_run(runs: list[Run]) -> Run | None:
    return min(runs, key=Run.rank) if runs else None


def format_metrics(metrics: dict[str, Any]) -> str:
    """``ppl 12.3 · acc 0.853 · 0.24% trainable`` from whichever metrics the run has."""
    parts = []
    if (ppl := number(metrics.get("val_ppl"))) is not None:
        parts.append(f"ppl {ppl:.1f}")
    if (acc := number(metrics.get("accuracy"))) is not None:
        parts.append(f"acc {acc:.3g}")
    if (pct := number(metrics.get("trainable_pct"))) is not None:
        parts.append(f"{pct:.3g}% trainable")
    elif (n := number(metrics.get("trainable_params"))) is not None:
        parts.append(f"{_count(n)} trainable params")
    return " · ".join(parts)


def _count(n: float) -> str:
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:.3g}{suffix}"
    return f"{int(n)}"


def module_path(module_name: str) -> str:
    """Repository-relative path of a module of this package, e.g. ``src/efficientgpt/peft/lora.py``."""
    module = sys.modules.get(module_name)
    file = getattr(module, "__file__", None)
    if file:
        package_root = Path(__file__).resolve().parents[2]  # .../src
        try:
            rel = Path(file).resolve().relative_to(package_root)
            return f"src/{rel.as_posix()}"
        except ValueError:
            pass
    return "src/" + module_name.replace(".", "/") + ".py"


def implementation_paths(names: tuple[str, ...], lookup: Callable[[str], Any] | None = None) -> list[str]:
    """The distinct module paths implementing the registry methods ``names``, in order."""
    if lookup is None:
        from efficientgpt import registry

        lookup = registry.get
    paths: list[str] = []
    for name in names:
        path = module_path(lookup(name).apply.__module__)
        if path not in paths:
            paths.append(path)
    return paths
