"""S4: a parameter-efficient fine-tuning design space (Chen, Zhang, Shi, Li, Smola & Yang,
"Parameter-Efficient Fine-Tuning Design Spaces", ICLR 2023; arXiv:2301.01821).

The paper does not propose one more PEFT strategy but a space of *compositions* of existing ones (§3),
characterised by four components:

1. **Layer grouping**: the ``L`` decoder layers are split into ``G`` groups of consecutive layers
   (``G = 4`` in the paper) whose sizes follow a pattern: *increasing*, *uniform*, *decreasing*,
   *spindle* (more layers in the middle groups) or *bowl* (fewer layers in the middle groups).
2. **Trainable parameter allocation** to layers: increasing, uniform or decreasing.
3. **Tunable groups**: which groups train at all.
4. **Strategy assignment**: each group gets a set of strategies among Adapter (A), Prefix tuning (P),
   BitFit (B) and LoRA (L).

Refining the space stage by stage (S0 → S1 … S4) the paper keeps, per stage, the best choice: spindle
grouping (S1), uniform allocation (S2), all groups tuned (S3) and the group-wise assignment (S4)
``G1: (A, L)``, ``G2: (A, P)``, ``G3: (A, P, B)``, ``G4: (P, B, L)``; the resulting S4-model is what
§4 evaluates. ``preset="s4"`` is that design.

Here the design is ONE delta (``method = "s4"``) composed of *child deltas*, one per (group, strategy),
each an ordinary registered method attached through :func:`core.apply` with ``layers`` set to its
group's layers and then adopted: its tensors live under the S4 delta (``<group>__<method>`` in its
``ModuleDict``), its name is ``<s4 name>/<group>/<method>``, and its hooks follow the S4 delta's
``active``/``merged`` state. So ``count_parameters``, ``save_delta``/``load_delta`` (one directory),
``disable``, ``set_active``, ``remove`` and ``merge`` treat the composite as one delta. Any registered
PEFT method whose config has a ``layers`` field can be a group strategy (lora, dylora, ia3, bitfit,
prefix_tuning, the adapters, ...); ``merge`` works only when every child is mergeable and otherwise
raises the not-mergeable error naming the children that are not.

Rules this module fixes (the paper describes the patterns by their shape, not by a formula):

* **Grouping rule.** Pattern weights for group ``i = 1..G``: uniform ``1``; increasing ``i``;
  decreasing ``G + 1 - i``; spindle ``t_i = min(i, G + 1 - i)`` (a tent: 1, 2, 2, 1 for ``G = 4``);
  bowl ``max_j t_j + 1 - t_i`` (2, 1, 1, 2). Group ``i`` gets ``n_i`` layers, the largest-remainder
  rounding of ``L · w_i / Σ w``: every group gets ``⌊L w_i / Σw⌋`` and the layers left over go, one
  each, to the groups with the largest remainders (ties to the earlier group). Spindle on 12 layers
  gives 2, 4, 4, 2 and on 24 layers 4, 8, 8, 4. On a model too shallow for the pattern a group can
  get no layer (spindle on 2 layers: 0, 1, 1, 0); that group is then not tuned, with a warning.
  Explicit ``groups`` must each list at least one layer.
* **Uniform allocation.** A budget ``b`` of trainable parameters per layer (``budget_unit``:
  ``layer``; ``total``, divided evenly over the tuned layers; or ``fraction`` of the base model's
  parameters, as the paper states its budgets, divided the same way). In each group the strategies
  whose size the model fixes (BitFit's biases, (IA)³'s vectors, or any strategy whose size ``options``
  gives) are attached first and their per-layer count ``f`` measured; the rest of the layer's budget,
  ``b - f``, is shared equally by the ``k`` sized strategies, and each takes the size whose per-layer
  count ``u · size + c`` is nearest to ``(b - f) / k`` (at least 1)::

      LoRA / DyLoRA  rank r:          u = Σ_targets (d_in + d_out),  c = 0
      adapter        bottleneck m:    u = Σ_adapters (2d + 1),       c = Σ_adapters d     (m <= d)
      prefix tuning  n tokens:        u = 2 · kv_heads · head_dim,   c = 0

  so every tuned layer trains ``b`` parameters up to half a size step of each sized strategy. Without
  a budget each strategy keeps its own config's size.
* **Prefix tuning** in a group adds its virtual tokens to that group's layers only (the others mask
  them out, see :mod:`efficientgpt.peft.prefix_tuning`) and trains ``P`` directly
  (``reparam=False``) so its count is per layer; ``options={"prefix_tuning": {"reparam": true}}``
  restores the paper-of-origin MLP, whose weights are shared by the group and outside the allocation.
* **Model-level strategies.** Prompt tuning (and LLaMA-Adapter, placed by a count of top layers) has
  no per-layer placement; ``model_strategies`` attaches such methods once for the whole model, sized by
  ``options`` and outside the per-layer budget. Naming them in a group is refused, as is full
  fine-tuning anywhere (it trains the base weights: the baseline, not a strategy).

Where this departs from the paper and why:

* The paper studies T5 and RoBERTa (encoder-decoder and encoder); here the groups partition a
  decoder-only model's layers.
* "A" is the Houlsby adapter (after attention and after the FFN, the adapter the paper's §2 describes);
  ``strategies`` may name ``adapter_pfeiffer`` instead. LoRA, BitFit and the adapters keep their own
  modules' defaults (LoRA on q and v; BitFit on every linear bias and the blocks' LayerNorm biases;
  within groups BitFit never includes the final LayerNorm, which belongs to no layer).
* The paper's budgets are percentages of the backbone; ``preset="s4"`` defaults to its 0.5 %
  (``budget=0.005, budget_unit="fraction"``).
* The official release (github.com/amazon-science/peft-design-spaces) builds on adapter-transformers;
  this is an independent implementation over this package's methods.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from typing import Any

import torch
from torch import nn

from efficientgpt import registry
from efficientgpt.config import ConfigBase, field
from efficientgpt.errors import ConfigError, UserError
from efficientgpt.models import arch
from efficientgpt.peft import core

PATTERNS = ("spindle", "uniform", "increasing", "decreasing", "bowl")
BUDGET_UNITS = ("layer", "total", "fraction")
PRESETS = ("s4", "none")

#: The paper's letters for its four strategies.
ALIASES = {"A": "adapter_houlsby", "P": "prefix_tuning", "B": "bitfit", "L": "lora"}
#: The S4-model's strategy assignment, G1..G4.
S4_STRATEGIES = [["adapter_houlsby", "lora"], ["adapter_houlsby", "prefix_tuning"],
                 ["adapter_houlsby", "prefix_tuning", "bitfit"], ["prefix_tuning", "bitfit", "lora"]]
S4_BUDGET = 0.005  # 0.5 % of the backbone's parameters

#: Options every child of a method gets unless ``options`` says otherwise.
DEFAULT_OPTIONS: dict[str, dict[str, Any]] = {"prefix_tuning": {"reparam": False}}
#: The config field that sets a sized strategy's size.
SIZE_FIELDS = {"lora": "rank", "dylora": "rank", "adapter_houlsby": "bottleneck",
               "adapter_pfeiffer": "bottleneck", "prefix_tuning": "num_virtual_tokens"}
#: Where the adapters sit (roles whose outputs pass through one), for their per-layer count.
ADAPTER_PLACEMENT = {"adapter_houlsby": ("o", "down"), "adapter_pfeiffer": ("down",)}
#: Registered PEFT methods that cannot be a strategy here, and why.
REFUSED = {"full": "full fine-tuning trains the base weights themselves: it is the baseline the design space is "
                   "compared to, not a strategy to compose"}


# ---- grouping ----------------------------------------------------------------------------------------
def pattern_weights(pattern: str, num_groups: int) -> list[int]:
    """The relative group sizes of a grouping ``pattern`` for ``num_groups`` groups (see the module doc)."""
    g = num_groups
    tent = [min(i, g + 1 - i) for i in range(1, g + 1)]
    weights = {
        "uniform": [1] * g,
        "increasing": list(range(1, g + 1)),
        "decreasing": list(range(g, 0, -1)),
        "spindle": tent,
        "bowl": [max(tent) + 1 - t for t in tent],
    }
    if pattern not in weights:
        raise ConfigError(f"S4Config.grouping = {pattern!r} is not a grouping pattern; choose one of {', '.join(PATTERNS)}")
    return weights[pattern]


def group_sizes(num_layers: int, num_groups: int, pattern: str) -> list[int]:
    """Layers per group: the largest-remainder rounding of ``num_layers · w_i / Σ w`` (ties: earlier group)."""
    weights = pattern_weights(pattern, num_groups)
    total = sum(weights)
    sizes = [num_layers * w // total for w in weights]
    remainders = [num_layers * w % total for w in weights]
    for i in sorted(range(num_groups), key=lambda i: (-remainders[i], i))[: num_layers - sum(sizes)]:
        sizes[i] += 1
    return sizes


def split_layers(num_layers: int, num_groups: int, pattern: str) -> list[list[int]]:
    """The layer indices of each group: consecutive runs of :func:`group_sizes`."""
    out, start = [], 0
    for n in group_sizes(num_layers, num_groups, pattern):
        out.append(list(range(start, start + n)))
        start += n
    return out


# ---- config ------------------------------------------------------------------------------------------
def _peft_names() -> list[str]:
    return [s.name for s in registry.methods("peft") if s.name != "s4"]


def _strategy_list(value: Any, where: str) -> list[str]:
    """A group's strategies: a list of names, or one string ``"a+b"``; the paper's letters A/P/B/L allowed."""
    if isinstance(value, str):
        value = [v.strip() for v in value.split("+") if v.strip()]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where} must be a list of method names (or 'a+b'), got {value!r}")
    names = [ALIASES.get(v, v) for v in value]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"{where} names {dup[0]!r} twice; a group uses each strategy once")
    return names


def _check_method(name: str, where: str, grouped: bool) -> registry.MethodSpec:
    known = _peft_names()
    if name == "s4":
        raise ConfigError(f"{where}: s4 cannot be a strategy of itself")
    if name not in known:
        raise ConfigError(f"{where}: {name!r} is not a registered PEFT method; registered PEFT methods: "
                          f"{', '.join(known)} (or the paper's letters {', '.join(f'{k}={v}' for k, v in ALIASES.items())})")
    if name in REFUSED:
        raise ConfigError(f"{where}: {name!r} cannot be part of a design space: {REFUSED[name]}")
    spec = registry.get(name)
    has_layers = "layers" in {f.name for f in dataclasses.fields(spec.config_cls)}
    if grouped and not has_layers:
        raise ConfigError(f"{where}: {name!r} has no per-layer placement (its config has no 'layers' field), so it "
                          "cannot act on one group of layers; attach it for the whole model with "
                          "S4Config.model_strategies")
    return spec


def _json(value: Any, where: str) -> Any:
    if isinstance(value, str):  # from the command line
        try:
            return json.loads(value)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{where} is not valid JSON: {err}") from None
    return value


@dataclasses.dataclass
class S4Config(ConfigBase):
    """A point of the PEFT design space of Chen et al. (ICLR 2023): layer groups, their strategies, a budget."""

    preset: str | None = field("s4", "s4: the paper's S4 design (spindle grouping into 4 groups, uniform allocation "
                                     "of a 0.005 share of the backbone's parameters, all groups tuned, G1 A+L, G2 A+P, "
                                     "G3 A+P+B, "
                                     "G4 P+B+L); fields given explicitly override it; none (or None): no preset",
                               choices=PRESETS)
    grouping: str | None = field(None, "how to split the layers into num_groups groups of consecutive layers: "
                                       + ", ".join(PATTERNS), choices=PATTERNS)
    num_groups: int | None = field(None, "number of groups G (default: one per entry of strategies)", minimum=1)
    strategies: list[list[str]] | None = field(None, "per group, the registered PEFT methods it uses (a list per "
                                                     "group, or 'a+b' strings; A, P, B, L are the paper's "
                                                     "adapter, prefix, BitFit, LoRA); an empty group is not tuned")
    groups: list[dict[str, Any]] | None = field(None, "explicit groups instead of a grouping rule: a list of "
                                                      "{'layers': [...], 'strategies': [...]}", cli=False)
    budget: float | None = field(None, "trainable parameters to allocate uniformly over the tuned layers, in "
                                       "budget_unit (default: each strategy keeps its own size)",
                                 minimum=0.0, exclusive_minimum=True)
    budget_unit: str | None = field(None, "layer: per tuned layer; total: over all tuned layers; fraction: of the "
                                          "base model's parameters (default: layer)", choices=BUDGET_UNITS)
    model_strategies: list[str] = field([], "methods attached once for the whole model (e.g. prompt_tuning), "
                                            "outside the groups and the budget")
    options: dict[str, dict[str, Any]] = field({}, "per method, config fields for all its children, e.g. "
                                                   "{\"lora\": {\"targets\": [\"q\", \"v\", \"o\"]}}; a size "
                                                   "field given here is not derived from the budget")

    def validate(self) -> None:
        super().validate()
        name = type(self).__name__
        if self.preset == "none":
            self.preset = None
        if self.num_groups is not None and (not isinstance(self.num_groups, int) or isinstance(self.num_groups, bool)):
            raise ConfigError(f"{name}.num_groups must be an integer >= 1, got {self.num_groups!r}")
        self.groups = _json(self.groups, f"{name}.groups")
        self.options = _json(self.options, f"{name}.options") or {}
        if self.groups is not None:
            if any(v is not None for v in (self.grouping, self.num_groups, self.strategies)):
                raise ConfigError(f"{name}.groups lists the groups itself; drop grouping, num_groups and strategies "
                                  "(or drop groups and use a grouping rule)")
            self.groups = self._normalised_groups()
        else:
            if self.preset == "s4":
                self.grouping = self.grouping or "spindle"
                self.num_groups = self.num_groups or (4 if self.strategies is None else None)
                self.strategies = self.strategies if self.strategies is not None else [list(s) for s in S4_STRATEGIES]
            if self.grouping is None or self.strategies is None:
                raise ConfigError(f"{name} needs a design: groups, or grouping and strategies (or preset='s4')")
            if isinstance(self.strategies, str):
                self.strategies = self.strategies.split(",")
            self.strategies = [_strategy_list(s, f"{name}.strategies[{i}]") for i, s in enumerate(self.strategies)]
            if self.num_groups is None:
                self.num_groups = len(self.strategies)
            if len(self.strategies) != self.num_groups:
                raise ConfigError(f"{name}.strategies has {len(self.strategies)} entries but num_groups is "
                                  f"{self.num_groups}; give one list of strategies per group")
            pattern_weights(self.grouping, self.num_groups)
        if self.preset == "s4" and self.budget is None:
            self.budget, self.budget_unit = S4_BUDGET, self.budget_unit or "fraction"
        if self.budget is not None and self.budget_unit is None:
            self.budget_unit = "layer"
        if self.budget_unit == "fraction" and self.budget is not None and self.budget >= 1:
            raise ConfigError(f"{name}.budget = {self.budget} is a fraction of the model's parameters and must be < 1 "
                              "(e.g. 0.005 for the paper's 0.5 %)")
        if isinstance(self.model_strategies, str):
            self.model_strategies = [s for s in self.model_strategies.split(",") if s]
        self.model_strategies = _strategy_list(list(self.model_strategies), f"{name}.model_strategies")
        per_group = self.group_strategies()
        for i, strategies in enumerate(per_group):
            for s in strategies:
                _check_method(s, f"{name} group G{i + 1}", grouped=True)
        for s in self.model_strategies:
            _check_method(s, f"{name}.model_strategies", grouped=False)
        if not any(per_group) and not self.model_strategies:
            raise ConfigError(f"{name} tunes nothing: every group's strategies are empty and model_strategies is empty")
        self._check_options(set(s for g in per_group for s in g) | set(self.model_strategies))

    def _normalised_groups(self) -> list[dict[str, Any]]:
        name = type(self).__name__
        if not isinstance(self.groups, list) or not self.groups:
            raise ConfigError(f"{name}.groups must be a non-empty list of {{'layers': [...], 'strategies': [...]}}")
        out, owner = [], {}
        for i, g in enumerate(self.groups):
            where = f"{name}.groups[{i}]"
            if not isinstance(g, dict):
                raise ConfigError(f"{where} must be a dict with 'layers' and 'strategies', got {g!r}")
            unknown = sorted(set(g) - {"layers", "strategies"})
            if unknown:
                raise ConfigError(f"{where} has unknown key(s) {unknown}; a group has 'layers' and 'strategies'")
            layers = g.get("layers")
            if not isinstance(layers, (list, tuple)) or not layers:
                raise ConfigError(f"{where}.layers is empty or missing: a group needs at least one layer")
            try:
                layers = [int(x) for x in layers]
            except (TypeError, ValueError):
                raise ConfigError(f"{where}.layers = {layers!r} must be layer indices") from None
            for layer in layers:
                if layer in owner:
                    raise ConfigError(f"layer {layer} is in two groups (G{owner[layer] + 1} and G{i + 1}); groups "
                                      "must not overlap")
                owner[layer] = i
            out.append({"layers": layers, "strategies": _strategy_list(g.get("strategies", []), f"{where}.strategies")})
        return out

    def _check_options(self, used: set[str]) -> None:
        name = type(self).__name__
        if not isinstance(self.options, dict):
            raise ConfigError(f"{name}.options must map method names to dicts of config fields, got {self.options!r}")
        for method, opts in self.options.items():
            if method not in used:
                raise ConfigError(f"{name}.options names {method!r}, which no group or model strategy uses; "
                                  f"used: {', '.join(sorted(used))}")
            if not isinstance(opts, dict):
                raise ConfigError(f"{name}.options[{method!r}] must be a dict of config fields, got {opts!r}")
            if "layers" in opts:
                raise ConfigError(f"{name}.options[{method!r}] sets 'layers', which the groups decide")
            try:  # unknown fields and bad values surface now, before anything is attached
                registry.get(method).config_cls.from_dict({**DEFAULT_OPTIONS.get(method, {}), **opts})
            except ConfigError as err:
                raise ConfigError(f"{name}.options[{method!r}]: {err}") from None

    def group_strategies(self) -> list[list[str]]:
        """The strategies of each group, G1 first."""
        if self.groups is not None:
            return [list(g["strategies"]) for g in self.groups]
        return [list(s) for s in self.strategies]


# ---- the composite delta -----------------------------------------------------------------------------
@dataclasses.dataclass
class Child:
    """One (group, strategy) child delta and how it was built."""

    key: str
    group: str
    method: str
    layers: list[int] | None
    delta: core.Delta
    config: Any
    """The config the child was built from (before any :meth:`~core.Delta.prepare_for_saving`)."""


class S4Delta(core.Delta):
    method = "s4"
    mergeable = False  # per instance: True exactly when every child is

    def __init__(self, model: nn.Module, config: S4Config, name: str = "default"):
        self.children: dict[str, Child] = {}
        self.layer_groups: list[list[int]] = []
        self.allocation: dict[str, dict[str, Any]] = {}
        super().__init__(model, config, name)

    # ---- the children follow the composite's state ---------------------------------------------------
    @property
    def active(self) -> bool:
        return self._active

    @active.setter
    def active(self, value: bool) -> None:
        self._active = value
        for c in getattr(self, "children", {}).values():
            c.delta.active = value

    # ---- building ------------------------------------------------------------------------------------
    def attach(self) -> None:
        cfg: S4Config = self.config
        num_layers = arch.num_layers(self.model)
        self.layer_groups = self._layer_groups(num_layers)
        per_group = cfg.group_strategies()
        tuned = sum(len(layers) for layers, s in zip(self.layer_groups, per_group) if s)
        if tuned == 0 and not cfg.model_strategies:
            raise ConfigError(f"s4 tunes nothing on this {num_layers}-layer model: no group with strategies has a layer")
        budget = self._per_layer_budget(tuned)
        # The children's core.apply freezes the base; whether it stays frozen is core.apply's call for the composite.
        grads = [(p, p.requires_grad) for n, p in self.model.named_parameters() if not n.startswith(core.DELTA_ROOT)]
        try:
            for i, (layers, strategies) in enumerate(zip(self.layer_groups, per_group)):
                if strategies and layers:
                    self._build_group(f"G{i + 1}", layers, strategies, budget)
            for method in cfg.model_strategies:
                self._adopt("model", method, None, self._child_config(method, None, {}))
        except BaseException:
            self._drop_children()
            if not hasattr(self.model, core.DELTA_ROOT):  # a failed child removed the (empty) root that
                self.model.add_module(core.DELTA_ROOT, nn.ModuleDict())  # core.apply's cleanup expects
            raise
        finally:
            for p, g in grads:
                p.requires_grad_(g)
        self.mergeable = all(c.delta.mergeable for c in self.children.values())

    def _layer_groups(self, num_layers: int) -> list[list[int]]:
        cfg: S4Config = self.config
        if cfg.groups is None:
            groups = split_layers(num_layers, cfg.num_groups, cfg.grouping)
            empty = [f"G{i + 1}" for i, (g, s) in enumerate(zip(groups, cfg.group_strategies())) if not g and s]
            if empty:
                warnings.warn(f"s4: a {cfg.grouping} grouping of this model's {num_layers} layers into {cfg.num_groups} "
                              f"groups gives {', '.join(empty)} no layer; their strategies are not used", stacklevel=2)
            return groups
        out, owner = [], {}
        for i, g in enumerate(cfg.groups):
            bad = [x for x in g["layers"] if not -num_layers <= x < num_layers]
            if bad:
                raise ConfigError(f"S4Config.groups[{i}].layers {bad} out of range: the model has {num_layers} layers "
                                  f"(0..{num_layers - 1})")
            layers = sorted({x % num_layers for x in g["layers"]})
            for layer in layers:
                if layer in owner:
                    raise ConfigError(f"layer {layer} is in two groups (G{owner[layer] + 1} and G{i + 1}); groups "
                                      "must not overlap")
                owner[layer] = i
            out.append(layers)
        return out

    def _per_layer_budget(self, tuned_layers: int) -> float | None:
        cfg: S4Config = self.config
        if cfg.budget is None or tuned_layers == 0:
            return None
        if cfg.budget_unit == "layer":
            return float(cfg.budget)
        if cfg.budget_unit == "total":
            return cfg.budget / tuned_layers
        base = {id(p): p for n, p in self.model.named_parameters() if not n.startswith(core.DELTA_ROOT + ".")}
        return cfg.budget * sum(p.numel() for p in base.values()) / tuned_layers

    def _child_config(self, method: str, layers: list[int] | None, extra: dict[str, Any]):
        cfg: S4Config = self.config
        fields = {**DEFAULT_OPTIONS.get(method, {}), **cfg.options.get(method, {}), **extra}
        if layers is not None:
            fields["layers"] = list(layers)
        return registry.get(method).config_cls.from_dict(fields)

    def _build_group(self, group: str, layers: list[int], strategies: list[str], budget: float | None) -> None:
        """Attach a group's strategies: the fixed-size ones first, then the sized ones from what they left."""
        cfg: S4Config = self.config
        sized = [m for m in strategies if budget is not None and m in SIZE_FIELDS
                 and SIZE_FIELDS[m] not in cfg.options.get(m, {})]
        fixed_cost = 0.0
        for method in strategies:
            if method not in sized:
                child = self._adopt(group, method, layers, self._child_config(method, layers, {}))
                fixed_cost += sum(p.numel() for p in child.delta.parameters()) / len(layers)
        sizes = {}
        for method in sized:
            share = (budget - fixed_cost) / len(sized)
            probe = self._child_config(method, layers, {})
            unit, const, cap = _unit_cost(self.model, method, probe, layers[0])
            size = max(1, math.floor((share - const) / unit + 0.5))
            sizes[method] = min(size, cap) if cap is not None else size
            self._adopt(group, method, layers, self._child_config(method, layers, {SIZE_FIELDS[method]: sizes[method]}))
        self.allocation[group] = {"layers": list(layers), "budget_per_layer": budget, "fixed_per_layer": fixed_cost,
                                  "sizes": sizes}

    def _adopt(self, group: str, method: str, layers: list[int] | None, config: Any) -> Child:
        """Attach ``method`` through :func:`core.apply`, then move it under this delta."""
        key = f"{group}__{method}"
        delta = core.apply(self.model, method, config, name=f"{self.name}/{group}/{method}")
        self.model._efficientgpt_delta_objs.pop(delta.name, None)
        root = getattr(self.model, core.DELTA_ROOT)
        if delta.name in root:
            del root[delta.name]
        self.modules[key] = delta.modules
        child = self.children[key] = Child(key, group, method, None if layers is None else list(layers), delta,
                                           dataclasses.replace(delta.config))
        delta.active = self.active
        return child

    def _drop_children(self) -> None:
        for c in self.children.values():
            c.delta.unmerge()
            c.delta._detach_hooks()
            c.delta._hook_specs.clear()
        self.children.clear()

    # ---- the protocol, composed ----------------------------------------------------------------------
    def targets(self) -> list[str]:
        return sorted({t for c in self.children.values() for t in c.delta.targets()})

    def parameters(self) -> list[nn.Parameter]:
        seen: dict[int, nn.Parameter] = {}
        for c in self.children.values():
            for p in c.delta.parameters():
                seen.setdefault(id(p), p)
        return list(seen.values())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{key}.{k}": v for key, c in self.children.items() for k, v in c.delta.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        parts: dict[str, dict[str, torch.Tensor]] = {key: {} for key in self.children}
        unexpected = []
        for k, v in state.items():
            key, _, rest = k.partition(".")
            if key in parts:
                parts[key][rest] = v
            else:
                unexpected.append(k)
        if unexpected:
            raise UserError(f"delta tensors do not match the s4 config: unexpected {sorted(unexpected)[:4]} (children: "
                            f"{', '.join(self.children)})")
        for key, c in self.children.items():
            c.delta.load_state_dict(parts[key])

    def on_step_begin(self, step: int) -> None:
        for c in self.children.values():
            c.delta.on_step_begin(step)

    def prepare_for_saving(self) -> None:
        """Let each child fold its training-only structure, and record what that changed in its config
        (e.g. prefix tuning's ``folded``) in ``options``, so the saved config rebuilds the same children."""
        changes: dict[str, dict[str, Any]] = {}
        for c in self.children.values():
            c.delta.prepare_for_saving()
            now = c.delta.config
            diff = {f.name: getattr(now, f.name) for f in dataclasses.fields(now)
                    if getattr(now, f.name) != getattr(c.config, f.name)}
            if diff:
                seen = changes.setdefault(c.method, diff)
                if seen != diff:
                    raise UserError(f"the {c.method} children of this s4 delta changed their configs differently when "
                                    f"prepared for saving ({seen} vs {diff}); they cannot be saved as one method option")
        if changes:
            cfg: S4Config = self.config
            options = {m: dict(o) for m, o in cfg.options.items()}
            for method, diff in changes.items():
                options.setdefault(method, {}).update(diff)
            self.config = dataclasses.replace(cfg, options=options)
            for c in self.children.values():
                c.config = dataclasses.replace(c.delta.config)

    def _merge(self) -> None:
        bad = [f"{c.delta.name} ({c.method})" for c in self.children.values() if not c.delta.mergeable]
        if bad:
            raise UserError(f"s4 is not mergeable here: its children {', '.join(bad)} add computation that does not "
                            "fold into the base weights; keep the delta and load it with --delta instead")
        done = []
        try:
            for c in self.children.values():
                c.delta.merge()
                done.append(c)
        except BaseException:
            for c in reversed(done):
                c.delta.unmerge()
            raise

    def _unmerge(self) -> None:
        for c in reversed(list(self.children.values())):
            c.delta.unmerge()

    def finalize_merged(self) -> None:
        for c in self.children.values():
            c.delta._detach_hooks()
            c.delta._hook_specs.clear()
            c.delta.finalize_merged()

    def remove(self) -> None:
        self.unmerge()
        self._drop_children()
        super().remove()

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out["groups"] = {f"G{i + 1}": layers for i, layers in enumerate(self.layer_groups)}
        out["children"] = {key: {"method": c.method, "layers": c.layers,
                                 "parameters": sum(p.numel() for p in c.delta.parameters())}
                           for key, c in self.children.items()}
        out["allocation"] = self.allocation
        return out


def _unit_cost(model: nn.Module, method: str, cfg: Any, layer: int) -> tuple[float, float, int | None]:
    """``(u, c, cap)``: one layer of ``method`` at size ``s`` trains ``u · s + c`` parameters; sizes <= cap."""
    if method in ("lora", "dylora"):
        targets = arch.resolve(model, cfg.targets, [layer], cfg.exclude)
        return float(sum(t.in_features + t.out_features for t in targets)), 0.0, None
    if method in ADAPTER_PLACEMENT:
        targets = arch.resolve(model, list(ADAPTER_PLACEMENT[method]), [layer])
        widths = [t.out_features for t in targets]
        return float(sum(2 * d + 1 for d in widths)), float(sum(widths)), min(widths)
    if method == "prefix_tuning":
        _, kv_heads, head_dim = arch.head_dims(model)
        return float(2 * kv_heads * head_dim), 0.0, None
    raise ConfigError(f"s4 has no size rule for {method!r}")  # SIZE_FIELDS and this function list the same methods


def apply(model, config: S4Config, name: str = "default") -> S4Delta:
    return core.apply(model, S4Delta, config, name)


SPEC = registry.register(registry.MethodSpec(
    name="s4", family="peft", config_cls=S4Config, apply=apply, paper="peft-design-spaces",
    summary="design-space composition: layer groups (spindle), uniform budget, per-group strategies among the "
            "registered PEFT methods; preset s4 = G1 A+L, G2 A+P, G3 A+P+B, G4 P+B+L (Chen et al., ICLR 2023)",
    mergeable=False,
))
