"""(IA)^3: Infused Adapter by Inhibiting and Amplifying Inner Activations (Liu et al., NeurIPS 2022).

From "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning" (the T-Few
paper), §3.3. Three learned vectors per block rescale the keys, the values and the feed-forward
intermediate activation element-wise; every weight of the model stays frozen::

    softmax(Q (l_k ⊙ K^T) / √d_k) (l_v ⊙ V)          l_k ∈ R^{d_k}, l_v ∈ R^{d_v}
    (l_ff ⊙ γ(W_1 x)) W_2                           l_ff ∈ R^{d_ff}

The vectors start at ones, so the model is unchanged at initialisation (§3.3).

Implementation, by hooks on the projections (nothing in the model is replaced):

* ``l_k`` / ``l_v`` multiply the output features of the k and v projections. On a fused projection
  (GPT-2 ``attn.c_attn``, GPT-NeoX ``attention.query_key_value``) only that role's output features
  (:attr:`~efficientgpt.models.arch.Target.out_index`) are scaled; the query stays untouched.
* ``l_ff`` multiplies the *input* of the FFN down projection (role ``down``), which is exactly
  ``γ(W_1 x)``. For Llama and Qwen2 that input is the gated activation ``act(gate(x)) * up(x)``; scaling
  it equals scaling ``up(x)``, which is what the official code does on T5 v1.1's gated FFN (it scales
  the output of ``wi_1``).
* Targets are roles or module-name patterns; ``feedforward`` says which targets have their input
  (not their output) scaled. ``peft_compatible=True`` swaps the paper's targets for Hugging Face
  PEFT's per-family defaults (whole-module scaling; e.g. GPT-2's whole ``c_attn`` output, q included,
  and Qwen2's q and v rather than k and v), so adapters move between the two libraries unchanged
  (:func:`peft_export`, :func:`peft_import`).

Mergeable exactly: an output scaling folds into the rows (output features) of the weight and into
the bias, ``W ← diag(l) W``, ``b ← l ⊙ b``; an input scaling folds into the columns of the weight,
``W ← W diag(l)`` (transposed for GPT-2's ``Conv1D``, which stores ``(in, out)``). Unmerging divides by
``l``, so merging refuses a vector with an entry ``|l| < 1e-6`` (or a non-finite one): a zero erases
the weights it multiplies and no division restores them.

Departures from the paper and the official code (github.com/r-three/t-few):

* On rotary models (Llama, Qwen2, GPT-NeoX) ``l_k`` acts on the key projection's output, *before*
  the rotary embedding, as HF PEFT does; the paper's T5 has no rotary embedding. The vectors still
  fold exactly into ``W_k``.
* Only the parameterisation is implemented. T-Few's training recipe (the unlikelihood and
  length-normalised losses of §3.2, and pre-training the vectors on a multitask mixture, §3.4) is
  not part of the method here.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from efficientgpt import registry
from efficientgpt.config import field
from efficientgpt.errors import ConfigError, UserError
from efficientgpt.models import arch
from efficientgpt.peft import core
from efficientgpt.peft.common import TargetedConfig

PAPER_TARGETS = ["k", "v", "down"]
PAPER_FEEDFORWARD = ["down"]

#: Entries of a vector below this magnitude make a merge irreversible (unmerge divides by ``l``).
MIN_MERGE_SCALE = 1e-6

#: HF PEFT's default (IA)^3 targets per model type, as in ``peft/utils/constants.py``
#: (``TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING`` and ``..._FEEDFORWARD_MODULES_MAPPING``),
#: for the model types efficientgpt has role tables for: ``model_type -> (targets, feedforward)``.
PEFT_DEFAULT_TARGETS: dict[str, tuple[list[str], list[str]]] = {
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "mistral": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "qwen2": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "qwen3": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "opt": (["q_proj", "k_proj", "fc2"], ["fc2"]),
    "gpt_neox": (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"]),
}


@dataclasses.dataclass
class IA3Config(TargetedConfig):
    """(IA)^3 hyperparameters (Liu et al., 2022): which activations get a learned scaling vector."""

    targets: list[str] = field(list(PAPER_TARGETS), "what to rescale: roles (q,k,v,o,gate,up,down; groups "
                               "all-linear, attn-linear, mlp-linear), module-name suffixes or re:REGEX; the "
                               "paper's keys, values and FFN intermediate activation are k, v, down")
    feedforward: list[str] = field(list(PAPER_FEEDFORWARD), "targets whose input (not output) is rescaled, the "
                                   "paper's l_ff: roles or module-name patterns as in targets")
    peft_compatible: bool = field(False, "use Hugging Face PEFT's per-family default targets (whole-module "
                                  "scaling) instead of the paper's k, v and FFN activation")

    def validate(self) -> None:
        super().validate()
        if isinstance(self.feedforward, str):
            self.feedforward = [t.strip() for t in self.feedforward.split(",") if t.strip()]
        if self.peft_compatible and (list(self.targets) != PAPER_TARGETS
                                     or list(self.feedforward) != PAPER_FEEDFORWARD):
            raise ConfigError(
                f"IA3Config.peft_compatible = True picks Hugging Face PEFT's per-family targets, but targets = "
                f"{self.targets!r} and feedforward = {self.feedforward!r} were also given; leave them at their "
                f"defaults ({PAPER_TARGETS}, {PAPER_FEEDFORWARD}), or set peft_compatible false and name the "
                "modules yourself (e.g. targets=c_attn,mlp.c_proj feedforward=mlp.c_proj)")


class ScalingVector(nn.Module):
    """One learned vector ``l`` (``l_k``, ``l_v`` or ``l_ff``), initialised to ones (§3.3)."""

    def __init__(self, n: int, dtype: torch.dtype):
        super().__init__()
        self.l = nn.Parameter(torch.ones(n, dtype=dtype))


@dataclasses.dataclass(frozen=True)
class Scaled:
    """One target with its vector: ``feedforward`` scales the module's input, else its output."""

    target: arch.Target
    key: str
    feedforward: bool


def _matches(pattern: str, name: str) -> bool:
    """The target-pattern rule of :func:`arch.resolve`: a path suffix at a dot, or ``re:`` full match."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern)


def effective_targets(model: nn.Module, cfg: IA3Config) -> tuple[list[str], list[str]]:
    """``(targets, feedforward)`` after ``peft_compatible`` picked PEFT's defaults for this model type."""
    if not cfg.peft_compatible:
        return list(cfg.targets), list(cfg.feedforward)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in PEFT_DEFAULT_TARGETS:
        raise UserError(f"IA3Config.peft_compatible: no Hugging Face PEFT default (IA)^3 targets known for model "
                        f"type {model_type!r}; known: {', '.join(sorted(PEFT_DEFAULT_TARGETS))} (name the "
                        "targets and feedforward modules yourself instead)")
    targets, feedforward = PEFT_DEFAULT_TARGETS[model_type]
    return list(targets), list(feedforward)


def classify(model: nn.Module, targets: Sequence[str], feedforward: Sequence[str],
             layers: Sequence[int] | None = None, exclude: Sequence[str] = ()) -> list[Scaled]:
    """Resolve ``targets`` and decide, for each, whether its input or its output is scaled.

    A target is feed-forward when its role is a ``feedforward`` role, or its (whole) module is one that
    a ``feedforward`` role or pattern names. Input scaling cannot act on one slice of a fused module.
    """
    found = arch.resolve(model, targets, layers, exclude)
    ff_spec = arch.expand_roles(list(feedforward))
    ff_roles = {r for r in ff_spec if r in arch.LINEAR_ROLES}
    ff_patterns = [p for p in ff_spec if p not in arch.LINEAR_ROLES]
    ff_role_paths: set[str] = set()
    if ff_roles:
        try:
            ff_role_paths = {t.name for t in arch.resolve(model, sorted(ff_roles)) if t.out_index is None}
        except UserError:  # e.g. "gate" on a family without a gated MLP
            ff_role_paths = set()
    out: list[Scaled] = []
    seen: set[str] = set()
    for t in found:
        key = core.target_key(t.name, t.role if t.out_index is not None else None)
        if key in seen:  # the same module named twice (a role and a pattern)
            continue
        seen.add(key)
        ff = (t.role in ff_roles) or (t.out_index is None and (
            t.name in ff_role_paths or any(_matches(p, t.name) for p in ff_patterns)))
        if ff and t.out_index is not None:
            raise UserError(f"(IA)^3 feedforward role {t.role!r} is a slice of the fused module {t.name}: its input "
                            "feeds q, k and v together, so an input scaling cannot act on one role; remove "
                            f"{t.role!r} from feedforward")
        out.append(Scaled(t, key, ff))
    return out


class IA3Delta(core.Delta):
    method = "ia3"
    mergeable = True

    def attach(self) -> None:
        cfg: IA3Config = self.config
        targets, feedforward = effective_targets(self.model, cfg)
        self.scaled = classify(self.model, targets, feedforward, cfg.layers, cfg.exclude)
        dtype = arch.linear_weight(self.scaled[0].target.module).dtype
        for s in self.scaled:
            t = s.target
            self.modules[s.key] = ScalingVector(t.in_features if s.feedforward else t.out_features, dtype)
            if s.feedforward:
                self.hook_input(t.module, self._scale_input(s.key))
            else:
                self.hook_output(t.module, self._scale_output(s.key, t.out_index))

    def targets(self) -> list[str]:
        return sorted({s.target.name for s in self.scaled})

    def vector(self, key: str) -> torch.Tensor:
        return self.modules[key].l

    def _scale_input(self, key: str):
        def fn(x: torch.Tensor) -> torch.Tensor:
            return x * self.vector(key).to(x.dtype)  # (..., d_in) ⊙ (d_in,)

        return fn

    def _scale_output(self, key: str, out_index: torch.Tensor | None):
        def fn(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
            l = self.vector(key)
            if out_index is None:
                return out * l.to(out.dtype)  # (..., d_out) ⊙ (d_out,)
            # Ones everywhere but this role's features of the fused output: q (and the other role) pass.
            scale = l.new_ones(out.shape[-1]).index_copy(0, out_index.to(l.device), l)  # (d_fused,)
            return out * scale.to(out.dtype)

        return fn

    # ---- merging ----------------------------------------------------------------------------------
    def _check_invertible(self) -> None:
        for s in self.scaled:
            l = self.vector(s.key).detach()
            bad = ~torch.isfinite(l) | (l.abs() < MIN_MERGE_SCALE)
            if bad.any():
                i = int(bad.nonzero()[0, 0])
                raise UserError(
                    f"cannot merge (IA)^3: the vector of {s.target.name}"
                    + (f" ({s.target.role})" if s.target.out_index is not None else "")
                    + f" has entry {i} = {float(l[i])!r}; merging multiplies the weights by it and unmerging "
                    f"divides, so every entry must be finite with |l| >= {MIN_MERGE_SCALE:g}; keep the delta "
                    "unmerged")

    def _fold(self, merge: bool) -> None:
        for s in self.scaled:
            t, module = s.target, s.target.module
            w = module.weight
            l = self.vector(s.key).detach().to(w.dtype)
            op = torch.mul if merge else torch.div
            conv1d = arch.is_conv1d(module)  # weight (in, out) instead of (out, in)
            if s.feedforward:  # the columns (input features) of W
                w.copy_(op(w, l[:, None] if conv1d else l[None, :]))
                continue
            out_dim = 1 if conv1d else 0
            shape = (1, -1) if conv1d else (-1, 1)
            bias = getattr(module, "bias", None)
            if t.out_index is None:  # the rows (output features) of W, and the bias
                w.copy_(op(w, l.reshape(shape)))
                if bias is not None:
                    bias.copy_(op(bias, l.to(bias.dtype)))
            else:
                idx = t.out_index.to(w.device)
                w.index_copy_(out_dim, idx, op(w.index_select(out_dim, idx), l.reshape(shape)))
                if bias is not None:
                    bias.index_copy_(0, idx, op(bias.index_select(0, idx), l.to(bias.dtype)))

    def _merge(self) -> None:
        self._check_invertible()
        self._fold(merge=True)

    def _unmerge(self) -> None:
        self._fold(merge=False)


def apply(model, config: IA3Config, name: str = "default") -> IA3Delta:
    return core.apply(model, IA3Delta, config, name)


# ---- Hugging Face PEFT interoperability ------------------------------------------------------------
#
# PEFT keeps one vector ``ia3_l`` per module: shape (out_features, 1) scaling the output, or
# (1, in_features) scaling the input for its ``feedforward_modules``. Its matching rules differ in one
# detail that matters for the conversion: a ``target_modules`` list entry matches a module path that
# equals it or ends with "." + entry, a ``feedforward_modules`` list entry one that merely ends with it.

PEFT_KEY = "ia3_l"


def _linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules()
            if n and not n.startswith(core.DELTA_ROOT) and (isinstance(m, nn.Linear) or arch.is_conv1d(m))]


def _module_names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_modules() if n and not n.startswith(core.DELTA_ROOT)]


def _peft_targets(model: nn.Module, adapter_config: dict[str, Any]) -> tuple[list[str], set[str]]:
    """Module paths PEFT would adapt with ``adapter_config``, and which of them are feed-forward."""
    target_modules = adapter_config.get("target_modules")
    feedforward = adapter_config.get("feedforward_modules")
    model_type = getattr(model.config, "model_type", None)
    if target_modules is None or feedforward is None:
        if model_type not in PEFT_DEFAULT_TARGETS:
            raise UserError(f"the PEFT (IA)^3 adapter leaves target_modules/feedforward_modules to PEFT's defaults, "
                            f"which are not known here for model type {model_type!r}; known: "
                            f"{', '.join(sorted(PEFT_DEFAULT_TARGETS))}")
        default_targets, default_ff = PEFT_DEFAULT_TARGETS[model_type]
        target_modules = default_targets if target_modules is None else target_modules
        feedforward = default_ff if feedforward is None else feedforward
    exclude = adapter_config.get("exclude_modules")
    linear = set(_linear_names(model))
    if isinstance(target_modules, str) and target_modules.lower() == "all-linear":
        head = model.get_output_embeddings()
        target_modules = sorted(n for n in linear if model.get_submodule(n) is not head)

    def excluded(key: str) -> bool:
        if not exclude:
            return False
        if isinstance(exclude, str):
            return re.fullmatch(exclude, key) is not None
        return key in exclude or any(key.endswith("." + e) for e in exclude)

    selected = []
    for key in _module_names(model):
        if excluded(key):
            continue
        if isinstance(target_modules, str):
            hit = re.fullmatch(target_modules, key) is not None
        else:
            hit = key in target_modules or any(key.endswith("." + t) for t in target_modules)
        if hit:
            if key not in linear:
                raise UserError(f"the PEFT (IA)^3 adapter targets {key}, a {type(model.get_submodule(key)).__name__}; "
                                "only Linear and GPT-2 Conv1D modules can be imported")
            selected.append(key)
    if not selected:
        raise UserError(f"the PEFT (IA)^3 adapter's target_modules {target_modules!r} match no module of this "
                        f"model; its linear modules look like: {', '.join(sorted(linear)[:8])}")
    if isinstance(feedforward, str):
        ff = {k for k in selected if re.fullmatch(feedforward, k)}
    else:
        ff = {k for k in selected if any(k.endswith(f) for f in feedforward)}
    return selected, ff


def _peft_selects(model: nn.Module, targets: list[str], feedforward: list[str]) -> tuple[set[str], set[str]] | None:
    """What PEFT would select with these lists (``None`` if it would refuse them)."""
    if not set(feedforward) <= set(targets):  # PEFT requires feedforward_modules ⊆ target_modules
        return None
    try:
        chosen, ff = _peft_targets(model, {"target_modules": targets, "feedforward_modules": feedforward})
    except UserError:
        return None
    return set(chosen), ff


def _ours_selects(model: nn.Module, targets: list[str], feedforward: list[str]) -> tuple[set[str], set[str]] | None:
    """What :func:`classify` would select with these lists (``None`` if it refuses them or slices)."""
    try:
        scaled = classify(model, targets, feedforward)
    except UserError:
        return None
    if any(s.target.out_index is not None for s in scaled):
        return None
    return {s.target.name for s in scaled}, {s.target.name for s in scaled if s.feedforward}


def _block_relative(model: nn.Module, name: str) -> str:
    """``transformer.h.3.attn.c_attn`` -> ``attn.c_attn`` (the path inside its decoder block)."""
    try:
        prefix = arch.family_of(model).blocks + "."
    except UserError:
        return name
    if name.startswith(prefix):
        rest = name[len(prefix):].split(".", 1)
        if len(rest) == 2 and rest[0].isdigit():
            return rest[1]
    return name


def _compact(model: nn.Module, names: Sequence[str], ff_names: set[str],
             candidates: list[tuple[list[str], list[str]]], selects) -> tuple[list[str], list[str]]:
    """The first of ``candidates``, then block-relative suffixes, then full paths, that ``selects``
    exactly ``names`` (with ``ff_names`` feed-forward)."""
    want = (set(names), set(ff_names))
    suffix_t = sorted({_block_relative(model, n) for n in names})
    suffix_f = sorted({_block_relative(model, n) for n in ff_names})
    full = (sorted(names), sorted(ff_names))
    for targets, ff in [*candidates, (suffix_t, suffix_f), full]:
        if selects(model, list(targets), list(ff)) == want:
            return list(targets), list(ff)
    raise UserError(f"(IA)^3 targets {sorted(names)[:4]}... cannot be written as module-name lists")


def _is_plain(patterns: Sequence[str]) -> bool:
    """Module-name suffixes only: no roles, role groups or ``re:`` patterns."""
    return all(p not in arch.LINEAR_ROLES and p not in arch.ROLE_GROUPS and not p.startswith("re:")
               for p in patterns)


def peft_export(delta: IA3Delta) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(adapter_config, tensors)`` of ``delta`` in HF PEFT's IA3 format.

    Tensor keys are module paths without PEFT's ``base_model.model.`` prefix, e.g.
    ``transformer.h.0.attn.c_attn.ia3_l``. PEFT scales whole modules, one vector per module, so a delta
    scaling one role's slice of a fused projection (the paper's ``k``/``v`` on GPT-2 or GPT-NeoX) is
    refused: attach it with ``peft_compatible=True`` (or name whole modules) to exchange it with PEFT.
    """
    if not isinstance(delta, IA3Delta):
        raise UserError(f"peft_export of (IA)^3 got a {delta.method!r} delta")
    model = delta.model
    sliced = [s for s in delta.scaled if s.target.out_index is not None]
    if sliced:
        s = sliced[0]
        raise UserError(
            f"this (IA)^3 delta scales only the {s.target.role!r} features of the fused module {s.target.name}; "
            "Hugging Face PEFT scales a module's whole output with one vector, so it cannot express that. Attach "
            "(IA)^3 with peft_compatible=True (PEFT's defaults) or name whole modules in targets to export it")
    names = [s.target.name for s in delta.scaled]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UserError(f"this (IA)^3 delta has two vectors on {twice[0]}; PEFT keeps one per module")
    ff_names = {s.target.name for s in delta.scaled if s.feedforward}
    cfg: IA3Config = delta.config
    own_t, own_f = effective_targets(model, cfg)
    candidates = []
    if _is_plain(own_t) and _is_plain(own_f) and cfg.layers is None and not cfg.exclude:
        candidates.append((own_t, [f for f in own_f if f in own_t]))
    target_modules, feedforward_modules = _compact(model, names, ff_names, candidates, _peft_selects)
    adapter_config = {
        "peft_type": "IA3",
        "task_type": "CAUSAL_LM",
        "target_modules": target_modules,
        "feedforward_modules": feedforward_modules,
        "exclude_modules": None,
        "fan_in_fan_out": any(arch.is_conv1d(s.target.module) for s in delta.scaled),
        "init_ia3_weights": True,
        "modules_to_save": None,
    }
    tensors = {}
    for s in delta.scaled:
        l = delta.vector(s.key).detach()
        tensors[f"{s.target.name}.{PEFT_KEY}"] = (l[None, :] if s.feedforward else l[:, None]).contiguous()
    return adapter_config, tensors


def peft_import(model: nn.Module, adapter_config: dict[str, Any], tensors: dict[str, torch.Tensor],
                name: str = "default") -> IA3Delta:
    """Attach a HF PEFT IA3 adapter (its config and tensors, keys without ``base_model.model.``) to
    ``model`` as an :class:`IA3Delta` computing what PEFT computes: whole-module scaling of PEFT's
    targets, the input of its ``feedforward_modules`` and the output of the others."""
    if adapter_config.get("peft_type") != "IA3":
        raise UserError(f"not a PEFT (IA)^3 adapter: peft_type is {adapter_config.get('peft_type')!r}, expected 'IA3'")
    if adapter_config.get("modules_to_save"):
        raise UserError(f"the PEFT (IA)^3 adapter also trains whole modules (modules_to_save = "
                        f"{adapter_config['modules_to_save']!r}), which an (IA)^3 delta cannot hold")
    selected, ff = _peft_targets(model, adapter_config)
    state = {}
    expected = set()
    for path in selected:
        key = f"{path}.{PEFT_KEY}"
        t = tensors.get(key, tensors.get(key + ".weight"))  # some PEFT versions saved ".weight"
        if t is None:
            raise UserError(f"the PEFT (IA)^3 adapter has no tensor {key} for its target {path}")
        expected.update({key, key + ".weight"})
        state[path] = t
    unexpected = sorted(set(tensors) - expected)
    if unexpected:
        raise UserError(f"the PEFT (IA)^3 adapter holds tensors that match none of its targets in this model: "
                        f"{unexpected[:4]}")
    raw_t, raw_f = adapter_config.get("target_modules"), adapter_config.get("feedforward_modules")
    candidates = []
    if isinstance(raw_t, list) and isinstance(raw_f, list) and _is_plain(raw_t) and _is_plain(raw_f) and \
            not adapter_config.get("exclude_modules"):
        candidates.append((raw_t, raw_f))
    targets, feedforward = _compact(model, selected, ff, candidates, _ours_selects)
    config = IA3Config(targets=targets, feedforward=feedforward)
    delta = core.apply(model, IA3Delta, config, name)
    try:
        ours = {}
        for s in delta.scaled:
            t = state[s.target.name]
            n = s.target.in_features if s.feedforward else s.target.out_features
            want = (1, n) if s.feedforward else (n, 1)
            if tuple(t.shape) != want:
                raise UserError(f"PEFT (IA)^3 tensor {s.target.name}.{PEFT_KEY} has shape {tuple(t.shape)}, "
                                f"expected {want} for this model")
            ours[f"{s.key}.l"] = t.reshape(-1).to(delta.vector(s.key).dtype)
        delta.load_state_dict(ours)
    except BaseException:
        delta.remove()
        raise
    return delta


SPEC = registry.register(registry.MethodSpec(
    name="ia3", family="peft", config_cls=IA3Config, apply=apply, paper="t-few",
    summary="learned vectors rescaling keys, values and the FFN activation ((IA)^3, Liu et al., NeurIPS 2022)",
    mergeable=True,
))
