"""DyLoRA: dynamic search-free low-rank adaptation (Valipour, Rezagholizadeh, Kobyzev & Ghodsi, EACL 2023).

LoRA (:mod:`efficientgpt.peft.lora`) fixes its rank ``r`` before training. DyLoRA trains one pair of
factors ``W_dw ∈ R^{r_max x d_in}`` (our ``A``) and ``W_up ∈ R^{d_out x r_max}`` (our ``B``) so that
every leading truncation works as a LoRA of its own rank, and the rank is chosen after training with
no search and no retraining (paper §3, "Dynamic LoRA").

At each optimizer step a rank ``b ~ p_B`` is drawn, uniform on ``{r_min, ..., r_max}``, and the
factors are truncated to their first ``b`` components (paper §3)::

    W_dw↓b = W_dw[1:b, :],   W_up↓b = W_up[:, 1:b]
    h = W0 x + (α / b) · W_up↓b W_dw↓b x                      (the truncated forward pass)

The scaling is ``α/b``, the rank actually in use, not ``α/r_max``: the official code
(``loralib/DyLoRA.py``) multiplies each truncated factor by ``√(r_max/b)`` on top of LoRA's
``α/r_max``, which is the same ``α/b``. At ``b = r_max`` this is exactly LoRA's ``α/r`` (LoRA Eq. 3),
so the full-rank DyLoRA *is* a LoRA of rank ``r_max`` with the same ``α`` (:func:`to_lora_state`).

The paper's update rule trains only the newest component: the ``b``-th row of ``W_dw`` and the
``b``-th column of ``W_up`` (``mode="frozen"``); components ``1..b-1`` take part in the forward pass
but stay fixed. ``mode="update_all"`` trains all of ``1..b`` (the alternative that the paper's
ablation compares against). Components above ``b`` are unused on that step.

Implementation notes (where this departs from the official code, and why):

* Each rank component is its own parameter (``A[i]``: ``(1, d_in)``, ``B[i]``: ``(d_out, 1)``) and
  frozen components enter the forward pass through ``.detach()``. They then get no gradient at all
  (``.grad is None``), and ``torch.optim.AdamW`` skips such parameters entirely: neither the momentum
  of earlier steps nor weight decay moves a frozen component. The official code detaches a slice of
  one matrix, whose frozen rows get zero gradient but are still moved by momentum and weight decay.
* ``b`` is drawn in :meth:`DyLoraDelta.on_step_begin` (the Trainer calls it before every optimizer
  step) from ``numpy.random.default_rng([seed, step])``: a pure function of the step, so a resumed run
  draws the same ranks as an uninterrupted one and every DDP process agrees without communication.
  One ``b`` is shared by all adapted layers, as in the official code.
* In ``model.eval()`` the rank is the evaluation rank set by :meth:`DyLoraDelta.set_rank` (``r_max``
  by default), so any rank is evaluated with no retraining; merging folds the update at that rank.
  In ``model.train()`` the rank is the last one drawn.
* A training-mode forward pass with gradients before any rank was drawn is refused: it would
  silently train a plain LoRA. (Without gradients it uses the evaluation rank.)
* With ``min_rank > 1`` and ``mode="frozen"`` the components below ``r_min`` are never trained (the
  paper's rule taken literally); they keep ``B = 0`` and contribute nothing.

Initialisation is LoRA's (kaiming-uniform or gaussian ``A``, zero ``B``), drawn with the same random
calls, so with the same torch seed DyLoRA starts from the very factors LoRA would.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterable, Iterator

import numpy as np
import torch
from torch import nn

from efficientgpt import registry
from efficientgpt.config import field
from efficientgpt.errors import ConfigError, UserError
from efficientgpt.models import arch
from efficientgpt.peft import core
from efficientgpt.peft.common import TargetedConfig
from efficientgpt.peft.lora import INITS, LoraConfig, LoraDelta, LoraPair

MODES = ("frozen", "update_all")


@dataclasses.dataclass
class DyLoraConfig(TargetedConfig):
    """DyLoRA hyperparameters (Valipour et al., 2023)."""

    rank: int = field(8, "maximum rank r_max: the factors hold r_max components", minimum=1)
    min_rank: int = field(1, "minimum rank r_min sampled in training (p_B is uniform on r_min..r_max)",
                          minimum=1)
    alpha: float = field(16.0, "scaling numerator α: at rank b the update is scaled by α/b",
                         minimum=0.0, exclusive_minimum=True)
    dropout: float = field(0.0, "dropout on the input of A", minimum=0.0, maximum=1.0)
    init: str = field("kaiming", "initialisation of A: kaiming (uniform) or gaussian (N(0, 1/r_max²)); B = 0",
                      choices=INITS)
    mode: str = field("frozen", "frozen: train only component b of each step (the paper); "
                                "update_all: train components 1..b", choices=MODES)
    seed: int = field(0, "seed of the rank sampling: b of step s depends only on (seed, s)", minimum=0)

    def validate(self) -> None:
        super().validate()
        if self.dropout >= 1.0:
            raise ConfigError(f"DyLoraConfig.dropout = {self.dropout} must be < 1")
        if self.min_rank > self.rank:
            raise ConfigError(f"DyLoraConfig.min_rank = {self.min_rank} must be <= rank (r_max) = {self.rank}")


def sample_rank(seed: int, step: int, min_rank: int, max_rank: int) -> int:
    """The rank ``b`` of optimizer step ``step``: uniform on ``min_rank..max_rank``, a pure function
    of ``(seed, step)``."""
    return int(np.random.default_rng([seed, step]).integers(min_rank, max_rank + 1))


class DyLoraFactors(nn.Module):
    """The ``r_max`` components of one update, each its own parameter so that a frozen component can
    be left without gradient: ``A[i]`` is row ``i`` of ``W_dw`` ``(1, d_in)``, ``B[i]`` column ``i``
    of ``W_up`` ``(d_out, 1)``."""

    def __init__(self, d_in: int, d_out: int, rank: int, init: str):
        super().__init__()
        full = LoraPair(d_in, d_out, rank, init)  # LoRA's initialisation, then split into components
        self.A = nn.ParameterList([nn.Parameter(a.clone()) for a in full.A.detach().split(1, dim=0)])
        self.B = nn.ParameterList([nn.Parameter(b.clone()) for b in full.B.detach().split(1, dim=1)])


class DyLoraDelta(LoraDelta):
    """LoRA's hooks and merging (fused q/k/v roles, GPT-2 ``Conv1D``) with truncated factors.

    Overrides LoRA's :meth:`factors` and :meth:`scaling`: both read the rank in use
    (:attr:`current_rank`).
    """

    method = "dylora"
    mergeable = True

    def attach(self) -> None:
        self.sampled_rank: int | None = None
        self._eval_rank: int | None = None
        self._fold_rank: int | None = None
        self._merged_rank: int | None = None
        super().attach()

    def new_factors(self, t: arch.Target) -> nn.Module:
        return DyLoraFactors(t.in_features, t.out_features, self.config.rank, self.config.init)

    # ---- ranks -----------------------------------------------------------------------------
    @property
    def max_rank(self) -> int:
        return self.config.rank

    @property
    def eval_rank(self) -> int:
        """The rank used outside training and for merging (``r_max`` unless :meth:`set_rank` chose one)."""
        return self._eval_rank if self._eval_rank is not None else self.max_rank

    @property
    def current_rank(self) -> int:
        """The rank the next forward pass uses: the sampled ``b`` in training, else :attr:`eval_rank`."""
        if self._fold_rank is not None:
            return self._fold_rank
        if self.model.training and self.sampled_rank is not None:
            return self.sampled_rank
        return self.eval_rank

    def set_rank(self, rank: int | None) -> None:
        """Evaluate (and merge) at ``rank`` in ``1..r_max``; ``None`` goes back to ``r_max``.

        A merged delta is re-folded at the new rank.
        """
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, (int, np.integer))
                                 or not 1 <= rank <= self.max_rank):
            raise UserError(f"DyLoRA rank {rank!r} is out of range: choose an integer from 1 to "
                            f"r_max = {self.max_rank}")
        was_merged = self.merged
        self.unmerge()
        self._eval_rank = None if rank is None else int(rank)
        if was_merged:
            self.merge()

    def on_step_begin(self, step: int) -> None:
        """Draw this optimizer step's rank ``b`` (shared by every adapted layer)."""
        cfg: DyLoraConfig = self.config
        self.sampled_rank = sample_rank(cfg.seed, step, cfg.min_rank, cfg.rank)

    # ---- LoRA's override points ------------------------------------------------------------
    def _training_pass(self) -> bool:
        return self._fold_rank is None and self.model.training and torch.is_grad_enabled()

    def factors(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The truncated factors ``W_dw↓b`` ``(b, d_in)`` and ``W_up↓b`` ``(d_out, b)``."""
        if self._training_pass() and self.sampled_rank is None:
            raise UserError("DyLoRA draws its rank before each optimizer step: call delta.on_step_begin(step) "
                            "first (pass step_callbacks=[delta.on_step_begin] to the Trainer)")
        b = self.current_rank
        comp = self.modules[key]
        A = [comp.A[i] for i in range(b)]  # b x (1, d_in)
        B = [comp.B[i] for i in range(b)]  # b x (d_out, 1)
        if self._training_pass() and self.config.mode == "frozen":
            # Detached components get no gradient at all, so the optimizer leaves them untouched.
            A = [a.detach() for a in A[:-1]] + A[-1:]
            B = [w.detach() for w in B[:-1]] + B[-1:]
        return torch.cat(A, dim=0), torch.cat(B, dim=1)  # (b, d_in), (d_out, b)

    def scaling(self, key: str) -> float:
        return self.config.alpha / self.current_rank

    # ---- merging at the evaluation rank ----------------------------------------------------
    @contextlib.contextmanager
    def _folding(self, rank: int) -> Iterator[None]:
        self._fold_rank = rank
        try:
            yield
        finally:
            self._fold_rank = None

    def _merge(self) -> None:
        self._merged_rank = self.eval_rank
        with self._folding(self._merged_rank):
            super()._merge()

    def _unmerge(self) -> None:
        with self._folding(self._merged_rank):  # the rank that was folded in, whatever set since
            super()._unmerge()
        self._merged_rank = None


def to_lora_state(delta: DyLoraDelta, rank: int | None = None) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """Export DyLoRA at ``rank`` (default: its evaluation rank, ``r_max`` unless set) as a plain LoRA.

    Returns ``(config, state)``: a :class:`~efficientgpt.peft.lora.LoraConfig` with ``rank = b`` and the
    same ``α``, targets, layers, exclusions, dropout and init, and the tensors in the exact layout of
    a :class:`~efficientgpt.peft.lora.LoraDelta` built from that config (``"<target key>.A"``:
    ``(b, d_in)``, ``"<target key>.B"``: ``(d_out, b)``). LoRA scales by ``α/b`` at rank ``b``, as
    DyLoRA does, so ``core.apply(model, "lora", config).load_state_dict(state)`` on the same base
    reproduces the DyLoRA outputs at that rank; at ``r_max`` the scaling is ``α/r_max``. A PEFT
    exporter writes ``r = config.rank`` and ``lora_alpha = config.alpha``.
    """
    b = delta.eval_rank if rank is None else rank
    if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or not 1 <= b <= delta.max_rank:
        raise UserError(f"cannot export DyLoRA at rank {b!r}: choose an integer from 1 to r_max = {delta.max_rank}")
    b = int(b)
    cfg: DyLoraConfig = delta.config
    lora_cfg = LoraConfig(targets=list(cfg.targets), layers=None if cfg.layers is None else list(cfg.layers),
                          exclude=list(cfg.exclude), rank=b, alpha=cfg.alpha, dropout=cfg.dropout,
                          init=cfg.init, rslora=False)
    state = {}
    for key, comp in delta.modules.items():
        state[f"{key}.A"] = torch.cat([comp.A[i].detach() for i in range(b)], dim=0)  # (b, d_in)
        state[f"{key}.B"] = torch.cat([comp.B[i].detach() for i in range(b)], dim=1)  # (d_out, b)
    return lora_cfg, state


@torch.no_grad()
def loss_per_rank(model: nn.Module, delta: DyLoraDelta, batches: Iterable[dict[str, torch.Tensor]],
                  ranks: Iterable[int] | None = None) -> dict[int, float]:
    """Mean per-token next-token loss over ``batches`` at each rank (default ``1..r_max``).

    Runs in eval mode; the model's mode and the delta's evaluation rank are restored afterwards.
    """
    from efficientgpt.train.losses import causal_lm_loss

    batches = list(batches)
    ranks = list(range(1, delta.max_rank + 1)) if ranks is None else list(ranks)
    was_training, previous = model.training, delta._eval_rank
    device = next(model.parameters()).device
    model.eval()
    out: dict[int, float] = {}
    try:
        for b in ranks:
            delta.set_rank(b)
            total, count = 0.0, 0
            for batch in batches:
                loss, n = causal_lm_loss(model, {k: v.to(device) for k, v in batch.items()})
                total += float(loss)
                count += int(n)
            if count == 0:
                raise UserError("loss_per_rank: the batches hold no target tokens")
            out[b] = total / count
    finally:
        delta.set_rank(previous)
        model.train(was_training)
    return out


def apply(model, config: DyLoraConfig, name: str = "default") -> DyLoraDelta:
    return core.apply(model, DyLoraDelta, config, name)


SPEC = registry.register(registry.MethodSpec(
    name="dylora", family="peft", config_cls=DyLoraConfig, apply=apply, paper="dylora",
    summary="LoRA trained over ranks 1..r_max at once, any rank chosen after training (Valipour et al., "
            "EACL 2023)", mergeable=True,
))


def peft_export(delta: DyLoraDelta) -> tuple[dict, dict[str, torch.Tensor]]:
    """DyLoRA at its full rank as a Hugging Face PEFT LoRA adapter (see :mod:`efficientgpt.peft.hf_peft`).

    At ``b = r_max`` DyLoRA's update is a plain LoRA of rank ``r_max`` with scaling ``α/r_max``; the
    factors go through LoRA's own exporter, fused-projection roles included.
    """
    from efficientgpt.peft.lora import LoraDelta, LoraPair
    from efficientgpt.peft.lora import peft_export as lora_peft_export

    lora_cfg, state = to_lora_state(delta, rank=delta.max_rank)
    shadow = LoraDelta(delta.model, lora_cfg, name=delta.name)  # not attached: no hooks, only factors
    shadow._targets = delta._targets
    for key in delta.modules:
        A, B = state[f"{key}.A"], state[f"{key}.B"]
        shadow.modules[key] = LoraPair(A.shape[1], B.shape[0], lora_cfg.rank, lora_cfg.init)
    shadow.modules.load_state_dict(state)
    return lora_peft_export(shadow)
