"""The delta protocol: attach a method to any causal LM without editing model code.

A *delta* is what a parameter-efficient method adds to a frozen model: its own tensors, and forward
hooks that use them. The word and the unified view of addition-, specification- and
reparameterisation-based methods come from delta tuning (Ding et al., "Parameter-efficient
Fine-tuning of Large-scale Pre-trained Language Models", Nature Machine Intelligence 2023, and its
OpenDelta library). Nothing in the model is replaced, so ``isinstance`` checks, GPT-2's ``Conv1D``,
gradient checkpointing and generation keep working, and removing a delta restores the model exactly.

* The tensors of every delta live in one ``nn.ModuleDict`` registered on the model as
  ``efficientgpt_deltas[<delta name>][<target key>]``: they move with ``.to()``, are seen by DDP and
  the optimizer, and are saved and loaded on their own.
* The hooks are ``torch`` forward (pre-)hooks on the target modules (or on the model); each checks
  whether its delta is enabled, so ``disable()``, ``set_active()`` and ``merge()`` are flag flips.
* :func:`apply` freezes every base parameter and leaves only the delta's trainable.

Saved deltas (:func:`save_delta`) are ``delta.safetensors`` plus ``delta_config.json`` (method, version,
config, and a fingerprint of the base model); :func:`load_delta` refuses a delta whose base differs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from efficientgpt.cache import publish_files, staging_dir
from efficientgpt.errors import UserError
from efficientgpt.models import arch

DELTA_ROOT = "efficientgpt_deltas"
FORMAT = "efficientgpt-delta"
FORMAT_VERSION = 1


def target_key(name: str, role: str | None = None) -> str:
    """A ``ModuleDict`` key for a module path (dots are not allowed in keys)."""
    key = name.replace(".", "__")
    return f"{key}__{role}" if role else key


class Delta:
    """One method attached to one model under a name. Methods subclass it.

    A subclass implements :meth:`attach` (create tensors in :attr:`modules` and register hooks with
    :meth:`hook_output` / :meth:`hook_input` / :meth:`hook_model`) and, if mergeable, :meth:`_merge`
    and :meth:`_unmerge`.
    """

    method: str = ""
    mergeable: bool = False
    version: int = 1

    def __init__(self, model: nn.Module, config: Any, name: str = "default"):
        self.model = model
        self.config = config
        self.name = name
        self.modules = nn.ModuleDict()
        self.active = True
        self.merged = False
        self._handles: list[Any] = []
        self._hook_specs: list[tuple[nn.Module, str, Any]] = []
        self.base_fingerprint: dict[str, Any] = {}

    # ---- subclass interface -------------------------------------------------------------
    def attach(self) -> None:
        raise NotImplementedError

    def _merge(self) -> None:
        raise UserError(f"{self.method} is not mergeable: its delta cannot be folded into the base weights")

    def _unmerge(self) -> None:
        raise UserError(f"{self.method} is not mergeable")

    def on_step_begin(self, step: int) -> None:
        """Called by the Trainer before each optimizer step (e.g. DyLoRA samples its rank here)."""

    def prepare_for_saving(self) -> None:
        """Fold training-only structure away (e.g. prefix tuning's reparameterisation MLP)."""

    def finalize_merged(self) -> None:
        """After :func:`merge_and_unload`: make the model's config describe the merged weights
        (e.g. BitFit sets ``attention_bias`` when it added biases to a bias-free Llama)."""

    def targets(self) -> list[str]:
        """Module paths this delta acts on (for the base fingerprint)."""
        return []

    # ---- protocol ----------------------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        return self.active and not self.merged and not getattr(self.model, "_efficientgpt_disabled", False)

    def hook_output(self, module: nn.Module, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        """``module``'s output becomes ``fn(input, output)`` while the delta is enabled."""

        def hook(mod, args, output):
            if not self.enabled:
                return None
            return fn(args[0], output)

        self._add_hook(module, "forward", hook)

    def hook_input(self, module: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """``module``'s first input becomes ``fn(input)`` while the delta is enabled."""

        def hook(mod, args):
            if not self.enabled:
                return None
            return (fn(args[0]), *args[1:])

        self._add_hook(module, "pre", hook)

    def hook_model(self, fn: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
        """The model's keyword arguments become ``fn(kwargs)`` while enabled (prompts, prefixes)."""
        import inspect

        names = [n for n, p in inspect.signature(self.model.forward).parameters.items()
                 if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]

        def hook(mod, args, kwargs):
            if not self.enabled:
                return None
            if args:  # normalise model(ids, mask, ...) to keyword form, so fn sees every input by name
                kwargs = {**kwargs, **dict(zip(names, args))}
                args = ()
            return args, fn(kwargs)

        self._add_hook(self.model, "pre_kwargs", hook)

    def _add_hook(self, module: nn.Module, kind: str, hook) -> None:
        self._hook_specs.append((module, kind, hook))
        self._handles.append(_register(module, kind, hook))

    def _detach_hooks(self) -> None:
        """Remove the hooks from the modules (a merged delta needs none: its update is in the weights,
        and a module without hooks takes PyTorch's fast call path)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _attach_hooks(self) -> None:
        if not self._handles:
            self._handles = [_register(m, kind, hook) for m, kind, hook in self._hook_specs]

    def parameters(self) -> list[nn.Parameter]:
        return list(self.modules.parameters())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.modules.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        mine = self.modules.state_dict()
        missing = sorted(set(mine) - set(state))
        unexpected = sorted(set(state) - set(mine))
        if missing or unexpected:
            raise UserError(f"delta tensors do not match the {self.method} config: missing {missing[:4]}, "
                            f"unexpected {unexpected[:4]}")
        for k, v in state.items():
            if v.shape != mine[k].shape:
                raise UserError(f"delta tensor {k} has shape {tuple(v.shape)}, expected {tuple(mine[k].shape)}")
        self.modules.load_state_dict(state)

    def merge(self) -> None:
        """Fold the delta into the base weights (merged logits equal unmerged)."""
        if not self.mergeable:
            self._merge()  # raises the method's own explanation
        if not self.merged:
            with torch.no_grad():
                self._merge()
            self.merged = True
            self._detach_hooks()

    def unmerge(self) -> None:
        """Undo :meth:`merge`, restoring the base weights."""
        if self.merged:
            with torch.no_grad():
                self._unmerge()
            self.merged = False
            self._attach_hooks()

    def remove(self) -> None:
        """Detach the delta: hooks gone, tensors gone, base weights as before (unmerged first)."""
        self.unmerge()
        self._detach_hooks()
        self._hook_specs.clear()
        root = getattr(self.model, DELTA_ROOT, None)
        if root is not None and self.name in root:
            del root[self.name]
            if len(root) == 0:
                delattr(self.model, DELTA_ROOT)
        self.model._efficientgpt_delta_objs.pop(self.name, None)

    def describe(self) -> dict[str, Any]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return {
            "name": self.name,
            "method": self.method,
            "config": _config_dict(self.config),
            "parameters": sum(p.numel() for p in self.parameters()),
            "trainable_parameters": trainable,
            "bytes": sum(t.numel() * t.element_size() for t in self.state_dict().values()),
            "mergeable": self.mergeable,
        }


def _register(module: nn.Module, kind: str, hook):
    if kind == "forward":
        return module.register_forward_hook(hook)
    if kind == "forward_always":  # runs even when the forward raised (restoring swapped state)
        return module.register_forward_hook(hook, always_call=True)
    if kind == "pre":
        return module.register_forward_pre_hook(hook)
    return module.register_forward_pre_hook(hook, with_kwargs=True)


def _config_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)


# ---- attaching ----------------------------------------------------------------------------------
def deltas(model: nn.Module) -> dict[str, Delta]:
    """The deltas attached to ``model``, by name."""
    return dict(getattr(model, "_efficientgpt_delta_objs", {}))


def apply(model: nn.Module, method: str | Any, config: Any = None, name: str = "default",
          freeze_base: bool = True) -> Delta:
    """Attach ``method`` (a registry name, or a Delta subclass) with ``config`` to ``model``.

    Every base parameter is frozen (unless ``freeze_base`` is false); the delta's tensors train.
    """
    if isinstance(method, str):
        from efficientgpt import registry

        spec = registry.get(method)
        config = spec.config_cls() if config is None else config
        return spec.apply(model, config, name=name)
    cls = method
    if config is None:
        raise UserError("apply() needs a config")
    if hasattr(config, "validate"):
        config.validate()
    existing = getattr(model, "_efficientgpt_delta_objs", None)
    if existing is None:
        existing = {}
        model._efficientgpt_delta_objs = existing
    if name in existing:
        raise UserError(f"a delta named {name!r} is already attached ({existing[name].method}); "
                        "choose another name or remove it first")
    if not getattr(model, DELTA_ROOT, None):
        model.add_module(DELTA_ROOT, nn.ModuleDict())
    model._efficientgpt_disabled = getattr(model, "_efficientgpt_disabled", False)  # a plain attribute: fast reads
    delta = cls(model, config, name)
    delta.base_fingerprint = base_fingerprint(model)
    try:
        delta.attach()
    except BaseException:
        delta._detach_hooks()
        root = getattr(model, DELTA_ROOT, None)
        if root is not None and len(root) == 0:
            delattr(model, DELTA_ROOT)
        raise
    delta.base_fingerprint["targets"] = {
        t: list(arch.linear_weight(model.get_submodule(t)).shape) if _is_linear_path(model, t) else None
        for t in delta.targets()
    }
    ref = next((p for p in model.parameters() if p.is_floating_point()), None)
    if ref is not None:
        delta.modules.to(device=ref.device)
    delta.modules.train(model.training)  # new modules start in training mode; follow the model's mode
    getattr(model, DELTA_ROOT)[name] = delta.modules
    existing[name] = delta
    if freeze_base:
        for n, p in model.named_parameters():
            if not n.startswith(DELTA_ROOT + "."):
                p.requires_grad_(False)
    set_active(model, [*[n for n, d in existing.items() if d.active and n != name], name])
    return delta


def _is_linear_path(model: nn.Module, path: str) -> bool:
    try:
        arch.linear_shape(model.get_submodule(path))
        return True
    except (TypeError, AttributeError):
        return False


def set_active(model: nn.Module, names: Sequence[str] | str) -> None:
    """Enable exactly the deltas ``names``; only their tensors train."""
    names = [names] if isinstance(names, str) else list(names)
    objs = deltas(model)
    unknown = [n for n in names if n not in objs]
    if unknown:
        raise UserError(f"no delta named {unknown[0]!r} on this model; attached: {', '.join(objs) or 'none'}")
    for n, d in objs.items():
        d.active = n in names
        for p in d.parameters():
            p.requires_grad_(d.active and _trainable(d, p))


def _trainable(delta: Delta, p: nn.Parameter) -> bool:
    return not getattr(p, "_efficientgpt_frozen", False)


@contextlib.contextmanager
def disable(model: nn.Module) -> Iterator[None]:
    """Run the base model alone: every delta's hooks are bypassed inside the block."""
    merged = [d for d in deltas(model).values() if d.merged]
    for d in merged:
        d.unmerge()
    prev = getattr(model, "_efficientgpt_disabled", False)
    model._efficientgpt_disabled = True
    try:
        yield
    finally:
        model._efficientgpt_disabled = prev
        for d in merged:
            d.merge()


def remove(model: nn.Module, name: str | None = None) -> None:
    """Remove one delta (or all), restoring the original model."""
    for n, d in list(deltas(model).items()):
        if name is None or n == name:
            d.remove()


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold every attached delta into the base weights and detach them: a plain HF model remains.

    Refuses (before changing anything) when a delta is not mergeable.
    """
    objs = deltas(model)
    bad = [f"{n} ({d.method})" for n, d in objs.items() if not d.mergeable]
    if bad:
        raise UserError(f"cannot merge: {', '.join(bad)} add computation that does not fold into the base "
                        "weights; keep the delta and load it with --delta instead")
    for d in objs.values():
        d.merge()
    for d in objs.values():
        d._detach_hooks()
        d._hook_specs.clear()
        d.finalize_merged()
    if hasattr(model, DELTA_ROOT):
        delattr(model, DELTA_ROOT)
    model._efficientgpt_delta_objs = {}
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def count_parameters(model: nn.Module) -> dict[str, Any]:
    """Trainable and total parameters (delta included), the trainable share, and delta bytes."""
    params = {id(p): p for p in model.parameters()}.values()  # tied weights once
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    delta_bytes = sum(t.numel() * t.element_size() for d in deltas(model).values() for t in d.state_dict().values())
    return {"trainable": trainable, "total": total, "trainable_pct": 100.0 * trainable / max(1, total),
            "delta_bytes": delta_bytes}


# ---- identity of the base model -----------------------------------------------------------------
_FINGERPRINT_CONFIG = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
                       "num_key_value_heads", "intermediate_size", "vocab_size")


def base_fingerprint(model: nn.Module) -> dict[str, Any]:
    """What a delta needs its base to be: architecture fields and a hash sampling the base weights."""
    cfg = model.config
    fields = {k: getattr(cfg, k, None) for k in _FINGERPRINT_CONFIG}
    h = hashlib.sha256()
    named = [(n, p) for n, p in model.named_parameters() if not n.startswith(DELTA_ROOT + ".")]
    for n, p in named[:: max(1, len(named) // 16)]:
        h.update(n.encode())
        h.update(p.detach().flatten()[:4096].float().cpu().numpy().tobytes())
    return {"config": fields, "weights_sample_sha256": h.hexdigest()}


def _fingerprint_diff(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    out = []
    for k, v in saved.get("config", {}).items():
        if current["config"].get(k) != v:
            out.append(f"{k}: delta was made for {v!r}, this model has {current['config'].get(k)!r}")
    if not out and saved.get("weights_sample_sha256") != current.get("weights_sample_sha256"):
        out.append("base weights: same architecture, but the weights differ from the delta's base model")
    return out


# ---- saving and loading ---------------------------------------------------------------------------
DELTA_FILE = "delta.safetensors"
CONFIG_FILE = "delta_config.json"


def save_delta(delta: Delta, directory: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write the delta's tensors and config into ``directory`` (safetensors only).

    The files are moved in complete, ``delta_config.json`` last, so a directory that has one holds a
    whole delta; other files there (a run's checkpoints and logs) are kept.
    """
    delta.prepare_for_saving()
    directory = Path(directory)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "method": delta.method,
        "method_version": delta.version,
        "name": delta.name,
        "config": _config_dict(delta.config),
        "base": delta.base_fingerprint,
        **(extra or {}),
    }
    with staging_dir(directory) as tmp:
        save_file({k: v.contiguous().cpu() for k, v in delta.state_dict().items()}, tmp / DELTA_FILE,
                  metadata={"format": FORMAT, "method": delta.method})
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")
        publish_files(tmp, directory, last=CONFIG_FILE)
    return directory


def read_delta_config(directory: str | Path) -> dict[str, Any]:
    directory = Path(directory)
    path = directory / CONFIG_FILE
    if not path.exists():
        hint = " (it looks like a PEFT adapter: use load_peft_adapter / 'efficientgpt import')" if (
            directory / "adapter_config.json").exists() else ""
        raise UserError(f"{str(directory)!r} is not a saved delta: it has no {CONFIG_FILE}{hint}")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON: {err}") from None
    if meta.get("format") != FORMAT:
        raise UserError(f"{path} is not an efficientgpt delta (format {meta.get('format')!r})")
    return meta


def load_delta(model: nn.Module, directory: str | Path, name: str | None = None, check_base: bool = True) -> Delta:
    """Attach the delta saved in ``directory`` to ``model``; a mismatched base is refused."""
    from efficientgpt import registry

    meta = read_delta_config(directory)
    spec = registry.get(meta["method"])
    config = spec.config_cls.from_dict(meta["config"]) if hasattr(spec.config_cls, "from_dict") else \
        spec.config_cls(**meta["config"])
    if check_base:
        diffs = _fingerprint_diff(meta.get("base", {}), base_fingerprint(model))
        if diffs:
            raise UserError(f"refusing to load the {meta['method']} delta from {directory} onto this model:\n  "
                            + "\n  ".join(diffs))
    delta = spec.apply(model, config, name=name or meta.get("name", "default"))
    try:
        delta.load_state_dict(load_file(Path(directory) / DELTA_FILE))
    except BaseException:
        delta.remove()
        raise
    return delta
