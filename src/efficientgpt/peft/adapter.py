"""Bottleneck adapters: Houlsby et al. (ICML 2019) and Pfeiffer et al. (EACL 2021) placements.

An adapter is a small residual MLP inserted into each decoder block of a frozen model (Houlsby et al.,
"Parameter-Efficient Transfer Learning for NLP", ICML 2019, §2.1 and Fig. 2)::

    h ← h + W_up f(W_down h + b_down) + b_up,    W_down ∈ R^{m x d},  W_up ∈ R^{d x m}

with hidden size ``d``, bottleneck ``m ≪ d`` and nonlinearity ``f``. Per adapter that is
``(d·m + m) + (m·d + d)`` trainable parameters. Two placements are registered, sharing one module and
one delta class:

* ``adapter_houlsby`` (Houlsby §2.1, Fig. 2): two adapters per block, one on the output of the
  attention sublayer and one on the output of the feed-forward sublayer, "after it has been projected
  back to the input size, but prior to adding the skip connection back". Here these are the outputs of
  the modules with roles ``o`` (attention output projection) and ``down`` (FFN output projection) in
  :mod:`efficientgpt.models.arch`, before the block adds its residual.
* ``adapter_pfeiffer`` (Pfeiffer, Kamath, Rücklé, Cho & Gurevych, "AdapterFusion: Non-Destructive Task
  Composition for Transfer Learning", EACL 2021): one adapter per block, after the feed-forward
  sublayer only, with a ReLU nonlinearity (the configuration the paper's adapter-architecture search
  selected and that AdapterHub calls the Pfeiffer adapter).

Initialisation. Houlsby initialise the adapter "to a near-identity function" (§2.1), drawing both
projections from a zero-mean Gaussian truncated at two standard deviations (std 1e-3 in the official
``adapter-bert`` code; the paper's analysis, §3.6, finds training robust for scales up to about 1e-2).
Here ``W_down`` follows that (truncated normal, std ``init_scale``, default 1e-2) but ``W_up`` and both
biases start at exactly zero, so the model is *exactly* unchanged at initialisation rather than
approximately: the common exact-identity choice (e.g. He et al., ICLR 2022). ``W_down`` must not also
be zero: with both projections zero neither receives a gradient and the adapter never trains, hence
``init_scale > 0``.

Nonlinearity. Houlsby's paper does not name ``f``; the official code uses GELU (its tanh approximation;
here the exact erf form, which differs by less than 1e-3), so ``adapter_houlsby`` defaults to ``gelu``.
Pfeiffer et al. use ReLU, so ``adapter_pfeiffer`` defaults to ``relu``. Both accept relu, gelu, silu.

Where this departs from the papers, and why:

* Houlsby et al. also train the layer-norm parameters of every block (§2.1). Those belong to the base
  model, and training them in place would break :func:`core.disable` and :func:`core.remove`; this
  module trains the adapters only.
* Houlsby's official code applies the adapter after the sublayer's output dropout; here it reads the
  projection's output before that dropout (the hook sits on the projection). The two coincide when the
  residual dropout is 0 (Llama and Qwen2 have none; the tiny test models set it to 0). ``dropout`` adds
  dropout on the adapter's branch ``W_up f(·)`` before its skip connection.
* Pfeiffer's adapter sits in a post-LN BERT block and is wired around the block's add & norm. With FFN
  output ``h`` and block input ``x``, AdapterHub's Pfeiffer configuration computes ``y = LN(h + x)``,
  then ``a = h + W_up f(W_down y)``, and the block output ``LN(a + x)``, the block's LayerNorm applied
  twice (``original_ln_before``, ``residual_before_ln``, ``original_ln_after``). Here the adapter reads
  ``h`` itself and its skip is ``h``: the block output is ``x + h + W_up f(W_down h)``. Why: the
  supported decoders are pre-LN (GPT-2, Llama, Qwen2, GPT-NeoX, and OPT except its 350m model) and have
  no LayerNorm between the FFN and the residual add, so ``LN(h + x)`` does not exist in them;
  normalising there with a new or borrowed LayerNorm would change the model at initialisation. Reading
  ``h`` keeps the exact identity at initialisation, uses the same ``down`` hook on every family, and
  makes ``adapter_pfeiffer`` exactly ``adapter_houlsby`` without its attention adapter.
* GPT-NeoX with ``use_parallel_residual=True`` (its default) computes ``x + attn(ln1(x)) + mlp(ln2(x))``:
  attention and FFN read the same input. The adapters still act on each sublayer's output before the
  residual sum, so the placement is unchanged; the attention adapter only no longer feeds the FFN.

Not mergeable: ``f`` is nonlinear, so the adapter does not fold into ``W_o`` or ``W_down``; merging
raises the delta protocol's error and ``merge_and_unload`` refuses.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from efficientgpt import registry
from efficientgpt.config import ConfigBase, field
from efficientgpt.errors import ConfigError
from efficientgpt.models import arch
from efficientgpt.peft import core

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}


def validate_bottleneck_fields(config) -> None:
    """The checks every bottleneck-adapter config shares (these adapters and Compacter's PHM adapters):
    an integer ``bottleneck``, ``dropout`` below 1, and ``layers`` as integers."""
    name = type(config).__name__
    bottleneck = config.bottleneck
    if bottleneck is not None and (not isinstance(bottleneck, int) or isinstance(bottleneck, bool)):
        raise ConfigError(f"{name}.bottleneck must be an integer >= 1, got {bottleneck!r}")
    if config.dropout >= 1.0:
        raise ConfigError(f"{name}.dropout = {config.dropout} must be < 1")
    if config.layers is not None:
        config.layers = [int(x) for x in config.layers]


def check_bottleneck_fits(config, m: int, d: int, where: str) -> None:
    """Refuse a bottleneck width ``m`` above the hidden size ``d`` of the module named ``where``."""
    if m > d:
        raise ConfigError(
            f"{type(config).__name__}.bottleneck = {m} is larger than the hidden size {d} of this model "
            f"({where}): an adapter bottleneck larger than the hidden size is no bottleneck; choose 1..{d}"
        )


@dataclasses.dataclass
class AdapterConfig(ConfigBase):
    """Bottleneck adapter hyperparameters (Houlsby et al., 2019; Pfeiffer et al., 2021)."""

    bottleneck: int | None = field(None, "bottleneck width m of each adapter (default: hidden size / "
                                         "reduction_factor)", minimum=1)
    reduction_factor: float = field(16.0, "when bottleneck is not given, m = max(1, hidden size // "
                                          "reduction_factor)", minimum=1.0)
    activation: str = field("gelu", "nonlinearity f between the projections", choices=tuple(ACTIVATIONS))
    dropout: float = field(0.0, "dropout on the adapter branch W_up f(W_down h) before its skip connection",
                           minimum=0.0, maximum=1.0)
    init_scale: float = field(1e-2, "std of the truncated-normal (±2σ) initialisation of W_down; W_up and "
                                    "both biases start at zero", minimum=0.0, exclusive_minimum=True)
    layers: list[int] | None = field(None, "only these decoder layers (default: all)")

    def validate(self) -> None:
        super().validate()
        validate_bottleneck_fields(self)

    def bottleneck_for(self, hidden: int) -> int:
        """The bottleneck width ``m`` for a hidden size ``d``."""
        if self.bottleneck is not None:
            return self.bottleneck
        return max(1, int(hidden // self.reduction_factor))


@dataclasses.dataclass
class HoulsbyAdapterConfig(AdapterConfig):
    """Houlsby adapters: after attention and after the FFN; GELU as in the official code."""

    activation: str = field("gelu", "nonlinearity f between the projections (the official code uses gelu)",
                            choices=tuple(ACTIVATIONS))


@dataclasses.dataclass
class PfeifferAdapterConfig(AdapterConfig):
    """Pfeiffer adapters: after the FFN only; ReLU as in the AdapterFusion paper."""

    activation: str = field("relu", "nonlinearity f between the projections (the paper uses relu)",
                            choices=tuple(ACTIVATIONS))


class BottleneckAdapter(nn.Module):
    """``h ↦ h + W_up f(W_down h + b_down) + b_up`` (Houlsby Fig. 2, right)."""

    def __init__(self, hidden: int, bottleneck: int, activation: str, dropout: float, init_scale: float):
        super().__init__()
        self.down = nn.Linear(hidden, bottleneck)  # W_down, b_down
        self.up = nn.Linear(bottleneck, hidden)  # W_up, b_up
        self.activation = activation
        self.drop = nn.Dropout(dropout)  # a child module, so model.eval() turns it off
        with torch.no_grad():
            nn.init.trunc_normal_(self.down.weight, std=init_scale, a=-2 * init_scale, b=2 * init_scale)
            nn.init.zeros_(self.down.bias)
            nn.init.zeros_(self.up.weight)  # exact identity at initialisation
            nn.init.zeros_(self.up.bias)

    def branch(self, h: torch.Tensor) -> torch.Tensor:
        """The residual branch ``W_up f(W_down h)`` alone: ``(..., d) -> (..., d)``."""
        z = ACTIVATIONS[self.activation](self.down(h))  # (..., m)
        return self.drop(self.up(z))  # (..., d)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.branch(h)


class AdapterDelta(core.Delta):
    """Bottleneck adapters on the outputs of the modules whose roles are listed in :attr:`placement`."""

    mergeable = False
    placement: tuple[str, ...] = ()
    """Roles (``o``: attention output, ``down``: FFN output) whose outputs pass through an adapter."""

    def attach(self) -> None:
        cfg: AdapterConfig = self.config
        self._targets = arch.resolve(self.model, list(self.placement), cfg.layers)
        ref = arch.linear_weight(self._targets[0].module)
        for t in self._targets:
            check_bottleneck_fits(cfg, cfg.bottleneck_for(t.out_features), t.out_features, t.name)
        for t in self._targets:
            d = t.out_features
            key = core.target_key(t.name)
            adapter = BottleneckAdapter(d, cfg.bottleneck_for(d), cfg.activation, cfg.dropout, cfg.init_scale)
            self.modules[key] = adapter.to(dtype=ref.dtype)
            self.hook_output(t.module, self._make_hook(key))

    def targets(self) -> list[str]:
        return sorted({t.name for t in self._targets})

    def _make_hook(self, key: str):
        def fn(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
            adapter: BottleneckAdapter = self.modules[key]
            # The skip stays in the model's dtype; only the branch runs in the adapter's.
            return out + adapter.branch(out.to(adapter.up.weight.dtype)).to(out.dtype)  # (B, T, d)

        return fn


class HoulsbyAdapterDelta(AdapterDelta):
    method = "adapter_houlsby"
    placement = ("o", "down")


class PfeifferAdapterDelta(AdapterDelta):
    method = "adapter_pfeiffer"
    placement = ("down",)


def apply_houlsby(model, config: AdapterConfig, name: str = "default") -> HoulsbyAdapterDelta:
    return core.apply(model, HoulsbyAdapterDelta, config, name)


def apply_pfeiffer(model, config: AdapterConfig, name: str = "default") -> PfeifferAdapterDelta:
    return core.apply(model, PfeifferAdapterDelta, config, name)


HOULSBY_SPEC = registry.register(registry.MethodSpec(
    name="adapter_houlsby", family="peft", config_cls=HoulsbyAdapterConfig, apply=apply_houlsby,
    paper="adapter-houlsby",
    summary="bottleneck adapters after the attention and the FFN sublayers (Houlsby et al., ICML 2019)",
    mergeable=False,
))
PFEIFFER_SPEC = registry.register(registry.MethodSpec(
    name="adapter_pfeiffer", family="peft", config_cls=PfeifferAdapterConfig, apply=apply_pfeiffer,
    paper="adapterfusion",
    summary="one bottleneck adapter after the FFN sublayer (Pfeiffer et al., AdapterFusion, EACL 2021)",
    mergeable=False,
))
