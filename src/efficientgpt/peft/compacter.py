"""Compacter, Compacter++ and the PHM adapter (Karimi Mahabadi, Henderson & Ruder, "Compacter: Efficient
Low-Rank Hypercomplex Adapter Layers", NeurIPS 2021; official code github.com/rabeehk/compacter).

A Compacter is a bottleneck adapter (Houlsby et al., 2019; see :mod:`efficientgpt.peft.adapter`)
``h ↦ h + U f(D h)`` whose down-projection ``D`` (``d → m``) and up-projection ``U`` (``m → d``) are
*parameterised hypercomplex multiplication* (PHM) layers (paper §3, Eqs. 3–5)::

    y = W x + b,    W = Σ_{i=1}^{n} A_i ⊗ B_i,    A_i ∈ R^{n x n},  B_i ∈ R^{(k/n) x (d/n)}

for a PHM layer mapping ``d`` inputs to ``k`` outputs (``⊗`` is the Kronecker product, so ``W`` is
``k x d``; ``n`` must divide both). Compacter then

* shares the "slow" weights ``A_i`` across all adapter layers (one ``n x n x n`` tensor for the whole
  model), and
* factorises each layer's "fast" weights as ``B_i = s_i t_iᵀ`` with ``s_i ∈ R^{(k/n) x r}`` and
  ``t_i ∈ R^{(d/n) x r}`` (rank ``r = 1`` in the paper).

What exactly is shared. In the official code (``T5ForConditionalGeneration.set_phm_rule`` with
``shared_phm_rule=True``) *one* ``phm_rule`` tensor of shape ``(n, n, n)`` is handed to every
``PHMLinear`` of the model: the down- and up-projections of every adapter in every layer use the same
``A_i``. This module does the same: the delta holds one ``A`` (key ``phm_rule``) and every PHM layer reads
it; its gradient is the sum of the contributions of all PHM layers. With ``shared_phm_rule=False`` each
PHM layer owns its ``A`` (the official PHM-Adapter configuration).

Registered methods (one PHM module and one delta class; they differ in placement and config defaults only):

* ``compacter``: adapters after the attention and after the FFN sublayer (Houlsby placement, the paper's
  "Compacter"): outputs of the ``o`` and ``down`` roles of :mod:`efficientgpt.models.arch`.
* ``compacter_pp``: after the FFN sublayer only (the paper's "Compacter++", official
  ``add_adapter_in_self_attention=false``).
* ``phm_adapter``: the paper's PHM-Adapter baseline: Houlsby placement, full-rank ``B_i``
  (``factorized_phm=False``) and a rule ``A`` per PHM layer (``shared_phm_rule=False``), as in the official
  ``phm_adapters.json``. It is the same module with two flags flipped; any mix of the flags is allowed.
  That file uses ``n = 12`` for T5-base (``d = 768``, ``m = 24``); the default here stays ``n = 4``,
  which divides the hidden sizes of the small models this package targets.

Parameter count (exact, biases included). With hidden size ``d``, bottleneck ``m``, ``n`` = ``phm_dim``,
``r`` = ``phm_rank`` and ``N`` adapters (``N = 2L`` for ``compacter``/``phm_adapter``, ``L`` for
``compacter_pp``, over ``L`` adapted layers)::

    fast weights of one PHM layer  d→k:  r·(k + d)   (Compacter: n slices of s_i (k/n x r), t_i (d/n x r))
                                         k·d / n     (PHM adapter: n slices of B_i (k/n x d/n))
    one adapter                       :  fast(d→m) + fast(m→d) + m + d          (+ 2n³ if A is not shared)
    whole delta                       :  N · one adapter + n³ if A is shared

so Compacter costs ``N·(2r(d + m) + d + m) + n³``: linear in ``d`` and ``m`` (the paper's O(k + d) per
layer), against ``N·(2dm + d + m)`` for a Houlsby adapter.

Computation. The official code materialises ``W`` (``k x d``, ``n·k·d`` multiply-adds) on every call and
then multiplies it with the input. Here ``W`` is never built: with the input ``x`` viewed as ``X ∈ R^{n x
(d/n)}`` (row-major), ``(A_i ⊗ B_i) x = vec(A_i X B_iᵀ)``, so Compacter computes
``Σ_i A_i (X t_i) s_iᵀ`` for ``O(n·r·(d + k) + n³·r)`` work per token instead of ``O(d·k)``, and the PHM
adapter ``Σ_i A_i (X B_iᵀ)`` for ``O(d·k + n²·k)``. :meth:`PHMLinear.weight` builds ``W`` for inspection.

Initialisation (official code, ``compacter.json``): ``A`` ~ N(0, ``phm_init_range``²) with
``phm_init_range = 1e-4`` (``phm_c_init="normal"``); every fast weight (each ``s_i``, ``t_i`` or ``B_i``
slice) Glorot-uniform with gain √2 (``hypercomplex_nonlinearity="glorot-uniform"``); biases zero.
Departure: the official init is only *near* the identity (``A`` is small but non-zero). Here the
up-projection's output-side fast weights (``s_i`` of ``U``, or ``B_i`` of ``U`` for the PHM adapter) start
at exactly zero, so ``U = 0`` and the model is *exactly* unchanged at initialisation, the same choice as
:mod:`efficientgpt.peft.adapter` (and LoRA's ``B = 0``). ``U``'s other factor and ``A`` stay non-zero, so
the first step trains ``U`` and every later step trains everything.

Other departures from the paper and the official code, and why:

* Nonlinearity: the official code uses ``gelu_new`` (GELU's tanh approximation); the default
  ``activation="gelu_tanh"`` is that function. relu, gelu (exact erf form) and silu are also offered.
* Bottleneck: the official configs use ``task_reduction_factor=32`` (``m = d / 32``). Here ``m`` defaults
  to ``d / reduction_factor`` rounded *down to a multiple of n* (and at least ``n``), so the default
  config works on any hidden size divisible by ``n``; an explicit ``bottleneck`` is used as given and must
  be divisible by ``n``.
* The paper (like Houlsby et al.) also trains the base model's layer norms. They belong to the base model
  and training them in place would break :func:`core.disable` and :func:`core.remove`; only the delta's
  tensors train. The official options ``factorized_phm_rule`` and ``shared_W_phm`` (ablations, off in the
  paper's configurations) are not offered.
* Placement is that of :mod:`efficientgpt.peft.adapter`: on the projection's output before the block's
  residual add (see there for output dropout, pre-LN decoders and GPT-NeoX's parallel residual).
  ``dropout`` adds dropout on the adapter branch ``U f(D h)`` before its skip connection.

Not mergeable: ``f`` is nonlinear, so the adapter does not fold into ``W_o`` or ``W_down``.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from efficientgpt import registry
from efficientgpt.config import ConfigBase, field
from efficientgpt.errors import ConfigError
from efficientgpt.models import arch
from efficientgpt.peft import core
from efficientgpt.peft.adapter import ACTIVATIONS as _ADAPTER_ACTIVATIONS
from efficientgpt.peft.adapter import check_bottleneck_fits, validate_bottleneck_fields

ACTIVATIONS = {**_ADAPTER_ACTIVATIONS, "gelu_tanh": lambda z: F.gelu(z, approximate="tanh")}
RULE_KEY = "phm_rule"
"""Key of the shared rule ``A`` in the delta's ``ModuleDict`` (target keys contain ``__``, never this)."""


@dataclasses.dataclass
class CompacterConfig(ConfigBase):
    """Compacter hyperparameters (Karimi Mahabadi et al., 2021); defaults follow the official configs."""

    bottleneck: int | None = field(None, "bottleneck width m of each adapter, divisible by phm_dim (default: "
                                         "hidden size / reduction_factor, rounded down to a multiple of phm_dim)",
                                   minimum=1)
    reduction_factor: float = field(32.0, "when bottleneck is not given, m ≈ hidden size / reduction_factor "
                                          "(the official configs use 32)", minimum=1.0)
    phm_dim: int = field(4, "n: number of Kronecker terms A_i ⊗ B_i; must divide the hidden size and m",
                         minimum=1)
    phm_rank: int = field(1, "r: rank of the fast weights B_i = s_i t_iᵀ (with factorized_phm)", minimum=1)
    factorized_phm: bool = field(True, "factorise the fast weights as B_i = s_i t_iᵀ (Compacter); false keeps "
                                       "full B_i (the PHM adapter)")
    shared_phm_rule: bool = field(True, "share one set of slow weights A_i (n x n x n) across all PHM layers; "
                                        "false gives each PHM layer its own")
    activation: str = field("gelu_tanh", "nonlinearity f between the projections (the official code uses "
                                         "gelu_new, i.e. gelu_tanh)", choices=tuple(ACTIVATIONS))
    dropout: float = field(0.0, "dropout on the adapter branch U f(D h) before its skip connection",
                           minimum=0.0, maximum=1.0)
    phm_init_range: float = field(1e-4, "std of the normal initialisation of the slow weights A_i (official "
                                        "phm_init_range)", minimum=0.0, exclusive_minimum=True)
    layers: list[int] | None = field(None, "only these decoder layers (default: all)")

    def validate(self) -> None:
        super().validate()
        validate_bottleneck_fields(self)
        if self.bottleneck is not None and self.bottleneck % self.phm_dim:
            raise ConfigError(self._indivisible_message(None, self.bottleneck))

    def bottleneck_for(self, hidden: int) -> int:
        """The bottleneck width ``m`` for a hidden size ``d`` (a multiple of ``n`` unless given explicitly)."""
        if self.bottleneck is not None:
            return self.bottleneck
        n = self.phm_dim
        return max(n, n * int(hidden // (self.reduction_factor * n)))

    def _indivisible_message(self, hidden: int | None, m: int, where: str = "") -> str:
        n = self.phm_dim
        dims = f"hidden size d = {hidden}{where} and bottleneck m = {m}" if hidden is not None else f"bottleneck m = {m}"
        common = [k for k in range(1, m + 1) if m % k == 0 and (hidden is None or hidden % k == 0)]
        return (f"{type(self).__name__}.phm_dim = {n}: a PHM n that does not divide the dimensions ({dims}); "
                f"W = Σ A_i ⊗ B_i needs n to divide both d and m. Allowed n here: {', '.join(map(str, common))}")


@dataclasses.dataclass
class PHMAdapterConfig(CompacterConfig):
    """The PHM adapter: full-rank fast weights and a rule A per PHM layer (official phm_adapters.json)."""

    factorized_phm: bool = field(False, "factorise the fast weights as B_i = s_i t_iᵀ (Compacter); false keeps "
                                        "full B_i (the PHM adapter)")
    shared_phm_rule: bool = field(False, "share one set of slow weights A_i (n x n x n) across all PHM layers; "
                                         "false gives each PHM layer its own")


def _glorot_slices_(w: torch.Tensor) -> None:
    """Glorot-uniform, gain √2, on each slice ``w[i]`` (the official ``glorot_uniform`` per ``i``)."""
    for i in range(w.shape[0]):
        nn.init.xavier_uniform_(w[i], gain=math.sqrt(2.0))


class PHMRule(nn.Module):
    """The slow weights ``A = (A_1 .. A_n)``, ``(n, n, n)``, ``A[i]`` being ``A_i``."""

    def __init__(self, n: int, init_range: float):
        super().__init__()
        self.A = nn.Parameter(torch.empty(n, n, n))
        nn.init.normal_(self.A, std=init_range)


class PHMLinear(nn.Module):
    """One PHM layer ``x ↦ (Σ_i A_i ⊗ B_i) x + b`` mapping ``d_in → d_out`` (paper §3).

    Holds the fast weights (``s``, ``t`` when factorised, else ``B``), the bias, and its own rule ``A``
    only when it is not shared (the shared one is passed to :meth:`forward`).
    """

    def __init__(self, d_in: int, d_out: int, n: int, rank: int, factorized: bool, own_rule: bool,
                 init_range: float, zero_output_factor: bool):
        super().__init__()
        p, q = d_out // n, d_in // n
        self.n, self.factorized = n, factorized
        if own_rule:
            self.A = nn.Parameter(torch.empty(n, n, n))
            nn.init.normal_(self.A, std=init_range)
        if factorized:
            self.s = nn.Parameter(torch.empty(n, p, rank))  # s_i: (d_out/n, r)
            self.t = nn.Parameter(torch.empty(n, q, rank))  # t_i: (d_in/n, r)
            _glorot_slices_(self.t)
            if zero_output_factor:
                nn.init.zeros_(self.s)
            else:
                _glorot_slices_(self.s)
        else:
            self.B = nn.Parameter(torch.empty(n, p, q))  # B_i: (d_out/n, d_in/n)
            if zero_output_factor:
                nn.init.zeros_(self.B)
            else:
                _glorot_slices_(self.B)
        self.bias = nn.Parameter(torch.zeros(d_out))

    def rule(self, A: torch.Tensor | None) -> torch.Tensor:
        own = getattr(self, "A", None)
        return own if own is not None else A

    def fast_weights(self) -> torch.Tensor:
        """``B = (B_1 .. B_n)``, ``(n, d_out/n, d_in/n)``; ``B_i = s_i t_iᵀ`` when factorised."""
        return self.s @ self.t.transpose(1, 2) if self.factorized else self.B

    def weight(self, A: torch.Tensor | None = None) -> torch.Tensor:
        """``W = Σ_i A_i ⊗ B_i``, ``(d_out, d_in)`` (``nn.Linear`` orientation), materialised."""
        A, B = self.rule(A), self.fast_weights()
        n, p, q = B.shape
        # (A_i ⊗ B_i)[(a, x), (b, y)] = A_i[a, b] · B_i[x, y]
        return torch.einsum("iab,ixy->axby", A, B).reshape(n * p, n * q)

    def forward(self, x: torch.Tensor, A: torch.Tensor | None = None) -> torch.Tensor:
        A = self.rule(A)
        X = x.unflatten(-1, (self.n, -1))  # (..., n, d_in/n): row b of X is input block b
        if self.factorized:
            # Σ_i A_i X t_i s_iᵀ, never forming the (d_out x d_in) W.
            u = torch.einsum("...bq,iqr->...ibr", X, self.t)  # (..., n_i, n, r)
            v = torch.einsum("iab,...ibr->...iar", A, u)  # (..., n_i, n, r)
            y = torch.einsum("...iar,ipr->...ap", v, self.s)  # (..., n, d_out/n)
        else:
            u = torch.einsum("...bq,ipq->...ibp", X, self.B)  # (..., n_i, n, d_out/n)
            y = torch.einsum("iab,...ibp->...ap", A, u)  # (..., n, d_out/n)
        return y.flatten(-2) + self.bias  # (..., d_out)


class CompacterAdapter(nn.Module):
    """``h ↦ h + U f(D h)`` with PHM layers ``D`` (``d → m``) and ``U`` (``m → d``)."""

    def __init__(self, hidden: int, bottleneck: int, cfg: CompacterConfig):
        super().__init__()
        common = dict(n=cfg.phm_dim, rank=cfg.phm_rank, factorized=cfg.factorized_phm,
                      own_rule=not cfg.shared_phm_rule, init_range=cfg.phm_init_range)
        self.down = PHMLinear(hidden, bottleneck, zero_output_factor=False, **common)  # D
        self.up = PHMLinear(bottleneck, hidden, zero_output_factor=True, **common)  # U = 0: exact identity
        self.activation = cfg.activation
        self.dropout = cfg.dropout

    def branch(self, h: torch.Tensor, A: torch.Tensor | None = None, training: bool = False) -> torch.Tensor:
        """The residual branch ``U f(D h)`` alone: ``(..., d) -> (..., d)``; ``A`` is the shared rule."""
        z = ACTIVATIONS[self.activation](self.down(h, A))  # (..., m)
        y = self.up(z, A)  # (..., d)
        return F.dropout(y, self.dropout, training=training) if self.dropout > 0 else y

    def forward(self, h: torch.Tensor, A: torch.Tensor | None = None, training: bool = False) -> torch.Tensor:
        return h + self.branch(h, A, training)


class CompacterDelta(core.Delta):
    """Compacter layers on the outputs of the modules whose roles are listed in :attr:`placement`."""

    mergeable = False
    placement: tuple[str, ...] = ()
    """Roles (``o``: attention output, ``down``: FFN output) whose outputs pass through an adapter."""

    def attach(self) -> None:
        cfg: CompacterConfig = self.config
        self._targets = arch.resolve(self.model, list(self.placement), cfg.layers)
        ref = arch.linear_weight(self._targets[0].module)
        n = cfg.phm_dim
        for t in self._targets:  # every check before anything is built
            d = t.out_features
            m = cfg.bottleneck_for(d)
            check_bottleneck_fits(cfg, m, d, t.name)
            if d % n or m % n:
                raise ConfigError(cfg._indivisible_message(d, m, f" of {t.name}"))
            if cfg.factorized_phm and cfg.phm_rank > min(d, m) // n:
                raise ConfigError(
                    f"{type(cfg).__name__}.phm_rank = {cfg.phm_rank} exceeds min(d, m) / n = {min(d, m) // n} "
                    f"(d = {d}, m = {m}, n = {n}): B_i = s_i t_iᵀ would be no low-rank factorisation; choose "
                    f"1..{min(d, m) // n}, or factorized_phm=false for full-rank B_i"
                )
        if cfg.shared_phm_rule:
            self.modules[RULE_KEY] = PHMRule(n, cfg.phm_init_range).to(dtype=ref.dtype)
        for t in self._targets:
            d = t.out_features
            key = core.target_key(t.name)
            self.modules[key] = CompacterAdapter(d, cfg.bottleneck_for(d), cfg).to(dtype=ref.dtype)
            self.hook_output(t.module, self._make_hook(key))

    def targets(self) -> list[str]:
        return sorted({t.name for t in self._targets})

    def shared_rule(self) -> torch.Tensor | None:
        """The slow weights ``A`` shared by every PHM layer, ``(n, n, n)``; ``None`` when not shared."""
        return self.modules[RULE_KEY].A if RULE_KEY in self.modules else None

    def _make_hook(self, key: str):
        def fn(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
            adapter: CompacterAdapter = self.modules[key]
            dtype = adapter.up.bias.dtype
            # The skip stays in the model's dtype; only the branch runs in the adapter's. Dropout follows
            # the model's mode (modules attached to a model already in eval mode would start in train mode).
            branch = adapter.branch(out.to(dtype), self.shared_rule(), training=self.model.training)
            return out + branch.to(out.dtype)  # (B, T, d)

        return fn


class CompacterHoulsbyDelta(CompacterDelta):
    method = "compacter"
    placement = ("o", "down")


class CompacterPPDelta(CompacterDelta):
    method = "compacter_pp"
    placement = ("down",)


class PHMAdapterDelta(CompacterDelta):
    method = "phm_adapter"
    placement = ("o", "down")


def apply(model, config: CompacterConfig, name: str = "default") -> CompacterHoulsbyDelta:
    return core.apply(model, CompacterHoulsbyDelta, config, name)


def apply_pp(model, config: CompacterConfig, name: str = "default") -> CompacterPPDelta:
    return core.apply(model, CompacterPPDelta, config, name)


def apply_phm_adapter(model, config: CompacterConfig, name: str = "default") -> PHMAdapterDelta:
    return core.apply(model, PHMAdapterDelta, config, name)


SPEC = registry.register(registry.MethodSpec(
    name="compacter", family="peft", config_cls=CompacterConfig, apply=apply, paper="compacter",
    summary="adapters after attention and FFN whose projections are sums of Kronecker products of shared "
            "slow weights and rank-r fast weights (Karimi Mahabadi et al., NeurIPS 2021)",
    mergeable=False,
))
PP_SPEC = registry.register(registry.MethodSpec(
    name="compacter_pp", family="peft", config_cls=CompacterConfig, apply=apply_pp, paper="compacter",
    summary="Compacter++: one Compacter layer after the FFN sublayer only (Karimi Mahabadi et al., NeurIPS 2021)",
    mergeable=False,
))
PHM_ADAPTER_SPEC = registry.register(registry.MethodSpec(
    name="phm_adapter", family="peft", config_cls=PHMAdapterConfig, apply=apply_phm_adapter, paper="compacter",
    summary="adapters whose projections are PHM layers Σ A_i ⊗ B_i with full-rank B_i (Karimi Mahabadi et al., "
            "NeurIPS 2021)",
    mergeable=False,
))
