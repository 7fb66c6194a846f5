"""Checkpoints that survive being killed: safetensors only, written atomically, verified on load.

A checkpoint is a directory ``checkpoints/step-XXXXXXXX`` holding

* ``model.safetensors``: the trainable parameters (or the whole model),
* ``optimizer.safetensors``: per-parameter optimizer state, keyed by parameter name,
* ``rng.safetensors``: the torch RNG states,
* ``trainer_state.json``: step, fingerprints of model/data/config, optimizer hyperparameters,
  scheduler state and the sha256 of every file above.

It is written into a temporary directory and renamed into place, then ``checkpoints/latest`` is
replaced atomically to name it. Nothing is ever unpickled. Loading checks every file's sha256, so a
truncated or corrupted checkpoint is refused with a clear error and the older ones are left as they
are (the newest ``keep`` are kept).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from efficientgpt.cache import atomic_dir, atomic_write_text, file_sha256
from efficientgpt.errors import UserError

FILES = ("model.safetensors", "optimizer.safetensors", "rng.safetensors")


def _rng_state() -> dict[str, torch.Tensor]:
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            states[f"cuda{i}"] = s
    return states


def _set_rng_state(states: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(states["torch"])
    cuda = [states[k] for k in sorted(states) if k.startswith("cuda")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def optimizer_tensors(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> tuple[dict, list]:
    """Optimizer state as ``{"<param name>::<key>": tensor}`` plus JSON-able param groups."""
    sd = optimizer.state_dict()
    tensors = {}
    for idx, state in sd["state"].items():
        for k, v in state.items():
            t = v if torch.is_tensor(v) else torch.tensor(v)
            tensors[f"{names[idx]}::{k}"] = t.detach().cpu().contiguous()
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    for g in groups:
        g["params"] = [names[i] for i in g["params"]]
    return tensors, groups


def load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list,
                   names: dict[int, str]) -> None:
    index = {n: i for i, n in names.items()}
    state: dict[int, dict[str, Any]] = {}
    for key, t in tensors.items():
        name, k = key.rsplit("::", 1)
        if name not in index:
            raise UserError(f"checkpoint has optimizer state for {name!r}, which this model does not train")
        state.setdefault(index[name], {})[k] = t
    current = optimizer.state_dict()["param_groups"]
    loaded_groups = []
    for g, cur in zip(groups, current):
        g = dict(g)
        g["params"] = [index[n] for n in g["params"]]
        if g["params"] != cur["params"]:
            raise UserError("checkpoint's optimizer parameter groups differ from this run's trainable parameters")
        for k, v in g.items():
            if isinstance(cur.get(k), tuple):
                g[k] = tuple(v)
        loaded_groups.append(g)
    optimizer.load_state_dict({"state": state, "param_groups": loaded_groups})


def save(root: Path, step: int, model_state: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
         param_names: dict[int, str], scheduler_state: dict, meta: dict, keep: int = 2) -> Path:
    """Write checkpoint ``step`` under ``root`` atomically; keep only the newest ``keep``."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    opt_tensors, groups = optimizer_tensors(optimizer, param_names)
    with atomic_dir(final) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in model_state.items()}, tmp / "model.safetensors")
        save_file(opt_tensors, tmp / "optimizer.safetensors")
        save_file(_rng_state(), tmp / "rng.safetensors")
        state = {
            "step": step,
            "meta": meta,
            "optimizer_groups": groups,
            "scheduler": scheduler_state,
            "files": {f: file_sha256(tmp / f) for f in FILES},
        }
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2, sort_keys=True, default=float))
    atomic_write_text(root / "latest", final.name + "\n")
    old = sorted(p for p in root.glob("step-*") if p.is_dir() and p.name != final.name)
    for p in old[: max(0, len(old) - (keep - 1))]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def latest(root: Path) -> Path | None:
    """The checkpoint ``root/latest`` names, or ``None`` when there is none yet."""
    pointer = root / "latest"
    if not pointer.exists():
        return None
    path = root / pointer.read_text().strip()
    if not path.is_dir():
        raise UserError(f"{pointer} names {path.name}, which does not exist; resume from one of: "
                        f"{', '.join(p.name for p in sorted(root.glob('step-*'))) or 'none'}")
    return path


def load(path: Path) -> dict[str, Any]:
    """Read and verify a checkpoint; a corrupted or truncated one is refused with a clear error."""
    path = Path(path)
    state_file = path / "trainer_state.json"
    others = ", ".join(str(p) for p in sorted(path.parent.glob("step-*")) if p != path) or "none"
    try:
        state = json.loads(state_file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"checkpoint {path} is unreadable ({err}); other checkpoints: {others}") from None
    for name, digest in state["files"].items():
        f = path / name
        if not f.exists() or file_sha256(f) != digest:
            raise UserError(
                f"checkpoint {path} is corrupted or truncated: {name} does not match its recorded sha256; "
                f"it was not loaded. Other checkpoints (resume with --resume PATH): {others}"
            )
    state["model"] = load_file(path / "model.safetensors")
    state["optimizer"] = load_file(path / "optimizer.safetensors")
    state["rng"] = load_file(path / "rng.safetensors")
    return state


def restore_rng(state: dict[str, Any]) -> None:
    _set_rng_state(state["rng"])


def diff_meta(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Fields whose values differ between a checkpoint's fingerprint and this run's."""
    out = []
    for k in sorted(set(saved) | set(current)):
        a, b = saved.get(k, "<absent>"), current.get(k, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += diff_meta(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: checkpoint {a!r} != now {b!r}")
    return out
