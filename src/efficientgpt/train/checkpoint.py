"""Checkpoints that survive being killed: safetensors only, written atomically, verified on load.

A checkpoint is a directory ``checkpoints/step-XXXXXXXX`` holding

* ``model.safetensors``: the trainable parameters (or the whole model),
* ``optimizer.safetensors``: per-parameter optimizer state, keyed ``<parameter name>::<key>``
  (bitsandbytes' 8-bit state: uint8 ``state1``/``state2`` and float32 quantization maps and block
  maxima, under ``__bnb_optimizer_quant_state__/<key>``; Python numbers such as its ``step`` tagged
  ``#int``),
* ``rng.safetensors``: the torch RNG states,
* ``trainer_state.json``: step, fingerprints of model/data/config, optimizer hyperparameters,
  scheduler state and the sha256 of every file above.

It is written into a temporary directory and renamed into place, then ``checkpoints/latest`` is
replaced atomically to name it. Nothing is ever unpickled. Loading checks every file's sha256, so a
truncated or corrupted checkpoint is refused with a clear error and the older ones are left as they
are (the newest ``keep`` are kept). Under FSDP the model and optimizer states are gathered to full
tensors before rank 0 writes them, so a checkpoint reads the same whatever the process count.
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


#: Marks optimizer-state entries that were Python numbers (bitsandbytes keeps ``step`` as an ``int``).
_SCALAR_TAGS = {"#int": int, "#float": float}


def _flatten_state(prefix: str, state: dict[str, Any], out: dict[str, torch.Tensor]) -> None:
    """``{key: value}`` of one parameter's optimizer state as ``{"<prefix>::<key>": tensor}``.

    Nested dicts (bitsandbytes wraps its 8-bit ``state1``/``state2`` (uint8), ``qmap*`` and ``absmax*``
    (float32) in one) become ``key/subkey``; Python numbers are stored as 0-d tensors tagged with
    their type so that loading gives the optimizer back exactly what it had.
    """
    for k, v in state.items():
        if isinstance(v, dict):
            _flatten_state(f"{prefix}{k}/", v, out)
        elif torch.is_tensor(v):
            out[f"{prefix}{k}"] = v
        elif isinstance(v, bool) or not isinstance(v, (int, float)):
            raise UserError(f"optimizer state {prefix}{k} is a {type(v).__name__}, which a checkpoint cannot hold")
        else:
            tag = "#int" if isinstance(v, int) else "#float"
            out[f"{prefix}{k}{tag}"] = torch.tensor(v, dtype=torch.int64 if tag == "#int" else torch.float64)


def _unflatten_state(flat: dict[str, torch.Tensor]) -> dict[str, Any]:
    state: dict[str, Any] = {}
    for key, t in flat.items():
        value: Any = t
        for tag, cast in _SCALAR_TAGS.items():
            if key.endswith(tag):
                key, value = key[: -len(tag)], cast(t.item())
        *outer, last = key.split("/")
        d = state
        for part in outer:
            d = d.setdefault(part, {})
        d[last] = value
    return state


def _cpu_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached contiguous CPU copies; tensors sharing storage (bitsandbytes' one quantization map
    per optimizer) are cloned, since safetensors stores every tensor on its own."""
    out, seen = {}, set()
    for k, v in tensors.items():
        t = v.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if ptr is not None and ptr in seen:
            t = t.clone()
        if ptr is not None:
            seen.add(ptr)
        out[k] = t
    return out


def _groups_json(groups: list[dict], param_name) -> list[dict]:
    out = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in groups]
    for g in out:
        g["params"] = [param_name(i) for i in g["params"]]
    return out


def optimizer_tensors(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> tuple[dict, list]:
    """Optimizer state as ``{"<param name>::<key>": tensor}`` plus JSON-able param groups."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for idx, state in sd["state"].items():
        _flatten_state(f"{names[idx]}::", state, tensors)
    return _cpu_tensors(tensors), _groups_json(sd["param_groups"], names.__getitem__)


def full_optimizer_tensors(osd: dict[str, Any]) -> tuple[dict, list]:
    """The same for a gathered FSDP optimizer state dict (``get_optimizer_state_dict`` with
    ``full_state_dict=True``), whose state and groups are keyed by parameter name already."""
    tensors: dict[str, torch.Tensor] = {}
    for name, state in osd["state"].items():
        _flatten_state(f"{name}::", state, tensors)
    return _cpu_tensors(tensors), _groups_json(osd["param_groups"], str)


def _split_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    per_param: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        name, k = key.rsplit("::", 1)
        per_param.setdefault(name, {})[k] = t
    return per_param


def load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list,
                   names: dict[int, str]) -> None:
    index = {n: i for i, n in names.items()}
    state: dict[int, dict[str, Any]] = {}
    for name, flat in _split_tensors(tensors).items():
        if name not in index:
            raise UserError(f"checkpoint has optimizer state for {name!r}, which this model does not train")
        state[index[name]] = _unflatten_state(flat)
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


def full_optimizer_state(tensors: dict[str, torch.Tensor], groups: list, current: list[dict]) -> dict[str, Any]:
    """A checkpoint's optimizer state as the name-keyed dict ``set_optimizer_state_dict`` takes (FSDP).

    ``current`` is this run's param groups, keyed by name: the saved groups must hold the same names.
    """
    loaded_groups = []
    for g, cur in zip(groups, current):
        g = dict(g)
        if list(g["params"]) != list(cur["params"]):
            raise UserError("checkpoint's optimizer parameter groups differ from this run's trainable parameters")
        for k, v in g.items():
            if isinstance(cur.get(k), tuple):
                g[k] = tuple(v)
        loaded_groups.append(g)
    return {"state": {n: _unflatten_state(flat) for n, flat in _split_tensors(tensors).items()},
            "param_groups": loaded_groups}


def save(root: Path, step: int, model_state: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer | None,
         param_names: dict[int, str], scheduler_state: dict, meta: dict, keep: int = 2,
         optimizer_state: tuple[dict, list] | None = None) -> Path:
    """Write checkpoint ``step`` under ``root`` atomically; keep only the newest ``keep``.

    ``optimizer_state`` (tensors, groups) replaces reading ``optimizer`` when the caller gathered it
    already (FSDP: :func:`full_optimizer_tensors`).
    """
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    opt_tensors, groups = optimizer_state or optimizer_tensors(optimizer, param_names)
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
