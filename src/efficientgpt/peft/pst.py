"""PST: Parameter-Efficient Sparsity for Large Language Models Fine-Tuning (Li, Luo, Tan, Wang, Huang,
Li & Bai, IJCAI 2022; arXiv:2205.11005).

Sparse fine-tuning: every target matrix ends training with a share ``s`` of its weights set to zero,
chosen by a learned importance, while the pretrained weights stay frozen. The paper's Figure 1 gives
the parameterisation: the update of the weight is two small matrices ``U``, ``V``, and the data-driven
part of the importance is two sets of small matrices, ``A, B`` (its low-rankness) and ``R, C`` (its
structuredness). For a frozen ``W ∈ R^{d_out x d_in}`` (``nn.Linear`` orientation) the forward pass
is, as in the authors' released code (``pst/sparse.py``, ``SparseLinear.forward``)::

    W' = W + β U V                                      U ∈ R^{d_out x r_w}, V ∈ R^{r_w x d_in}
    S  = |W'| + α1 A B + α2 (R 1ᵀ + 1 Cᵀ)               A ∈ R^{d_out x r},   B ∈ R^{r x d_in},
                                                        R ∈ R^{d_out},       C ∈ R^{d_in}
    M  = Top(S): 1 on the numel - p largest entries of S, 0 on the p = round(s · numel) smallest
    h  = (M ⊙ W') x + b

``|W'|`` is the data-free criterion (magnitude pruning); ``α1 A B + α2 (R 1ᵀ + 1 Cᵀ)`` replaces the
full ``d_out x d_in`` score matrix of movement pruning (the data-driven criterion) with
``(r + 1)(d_in + d_out)`` numbers. ``M`` is binarised with a straight-through estimator: the backward
pass treats ``M`` as ``S`` (``∂L/∂S = ∂L/∂M = ∂L/∂(M⊙W') ⊙ W'``), so the importance parameters learn
from the loss as movement pruning's scores do. Only ``U, V, A, B, R, C`` train; ``W`` and the bias are
frozen. Trainable parameters per target matrix::

    (update_rank + rank) · (d_in + d_out)  +  (d_in + d_out) if structured

Initialisation (released code): ``U, A ~ N(0, 1)``, ``V = B = 0``, ``R = C = 0``, so ``W' = W`` and
``S = |W|`` at the start, and the model is unchanged while the sparsity is 0.

The sparsity follows the released code's cubic schedule (``pst/utils.py``,
``schedule_sparsity_ratio``; the cubic ramp of Zhu & Gupta, 2017, also used by movement pruning) over
``T = schedule_steps`` optimizer steps, with ``t0 = initial_warmup · T``, ``t1 = T - final_warmup · T``::

    s(t) = s_i                                         t <= t0
    s(t) = s_f + (s_i - s_f) (1 - (t - t0) / (t1 - t0))³  t0 < t <= t1
    s(t) = s_f                                         t > t1

The Trainer calls :meth:`PstDelta.on_step_begin` with the index of the optimizer step about to run
(the number of steps done), which is the step the released code passes after each update; the
sparsity is a pure function of that index, so a resumed run prunes exactly as an uninterrupted one.
``schedule_steps`` does not read the run's length: set it to the run's ``--steps`` (with the default
``final_warmup`` the last 30 % of the steps then train at the target sparsity). The current step is
saved with the delta (tensor ``schedule.step``), so a loaded delta prunes at the sparsity it was
saved at.

Mergeable: :meth:`~efficientgpt.peft.core.Delta.merge` writes ``M ⊙ W'`` at the current sparsity into
the weight, which leaves exactly ``round(s · numel)`` pruned entries per target matrix (the pruned
entries are zeros; a kept entry that happens to be zero adds to them); unmerging restores the saved
pretrained weight exactly. After training with ``schedule_steps`` equal to the run's steps, the
merged model is the sparse model of the requested sparsity.

Where this implementation departs from the released code, and why:

* **Pruned count and ties.** The released code prunes ``int(s · numel)`` entries found by an
  unstable ``argsort``. Here ``p = round(s · numel)`` (``int`` truncates products such as
  ``0.29 · 100 = 28.999…`` to one weight fewer), and ties in ``S`` are pruned in row-major order, so
  the mask is a deterministic function of ``S``. The selection uses ``kthvalue`` plus a tie count
  instead of a full sort (the same mask, in linear time).
* **Fused projections.** The released code splits GPT-2's ``c_attn`` into separate q, k and v linear
  layers. Here a fused projection (GPT-2 ``c_attn``, GPT-NeoX ``query_key_value``) stays one module,
  and each targeted role gets its own ``U, V, A, B, R, C`` and its own top-k over its own output
  rows, which is the same as the released code's per-projection pruning. Naming the fused module
  itself (``--targets c_attn``) prunes it as one matrix.
* **Hooks, not replaced modules.** The target module still computes ``W x + b``; a forward hook adds
  ``(M ⊙ W' - W) x``, which equals ``(M ⊙ W') x + b`` up to rounding and is exactly the base output
  when ``M = 1`` and ``U V = 0``. The price is a second product with a ``d_out x d_in`` matrix per
  forward pass; for inference, merge.
* **Defaults.** Targets default to every linear map of the decoder blocks, ranks ``r = r_w = 8``,
  ``α1 = α2 = β = 1``, ``initial_warmup = 0.1``, ``final_warmup = 0.3``, target sparsity 0.9 and
  initial sparsity 0: the released GPT-2 script's defaults (``NLG/src/gpt2_ft.py``), which prunes
  every ``nn.Linear`` of the transformer blocks.
* ``rank = 0``, ``update_rank = 0`` and ``structured = False`` drop the corresponding term (the
  paper's ablations); at least one of them must train.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from efficientgpt import registry
from efficientgpt.config import field
from efficientgpt.errors import ConfigError, UserError
from efficientgpt.models import arch
from efficientgpt.peft import core
from efficientgpt.peft.common import TargetedConfig

#: Name of the saved tensor holding the schedule step of the delta.
STEP_KEY = "schedule.step"


@dataclasses.dataclass
class PstConfig(TargetedConfig):
    """PST hyperparameters (Li et al., 2022); defaults follow the released GPT-2 script."""

    targets: list[str] = field(["all-linear"], "roles (q,k,v,o,gate,up,down; groups all-linear, attn-linear, "
                                               "mlp-linear), module-name suffixes, or re:REGEX patterns")
    sparsity: float = field(0.9, "target sparsity s_f: the share of each target matrix's weights pruned at "
                                 "the end of the schedule, in [0, 1)")
    initial_sparsity: float = field(0.0, "sparsity s_i before the schedule starts, in [0, 1); 0 leaves the model "
                                         "unchanged at initialisation")
    schedule_steps: int = field(100, "optimizer steps T the sparsity schedule spans: set it to the run's --steps",
                                minimum=1)
    initial_warmup: float = field(0.1, "share of schedule_steps trained at initial_sparsity before pruning starts",
                                  minimum=0.0, maximum=1.0)
    final_warmup: float = field(0.3, "share of schedule_steps at the end trained at the target sparsity",
                                minimum=0.0, maximum=1.0)
    rank: int = field(8, "rank r of the low-rank importance term A B (0: no low-rank term)", minimum=0)
    update_rank: int = field(8, "rank r_w of the weight update U V (0: the weights are not updated)", minimum=0)
    alpha1: float = field(1.0, "scale α1 of the low-rank importance term A B", minimum=0.0)
    alpha2: float = field(1.0, "scale α2 of the structured importance term R 1ᵀ + 1 Cᵀ", minimum=0.0)
    beta: float = field(1.0, "scale β of the weight update U V", minimum=0.0)
    structured: bool = field(True, "learn the structured importance: one score per row (R) and per column (C)")

    def validate(self) -> None:
        super().validate()
        for name in ("sparsity", "initial_sparsity"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"PstConfig.{name} = {value!r}: sparsity outside [0, 1); choose a share of "
                                  "pruned weights from 0 up to (not including) 1")
        if self.initial_sparsity > self.sparsity:
            raise ConfigError(f"PstConfig.initial_sparsity = {self.initial_sparsity!r} is larger than the target "
                              f"sparsity = {self.sparsity!r}; the schedule only raises the sparsity")
        if self.initial_warmup + self.final_warmup > 1.0:
            raise ConfigError(f"PstConfig.initial_warmup + final_warmup = {self.initial_warmup!r} + "
                              f"{self.final_warmup!r} exceeds 1: together they are shares of schedule_steps")
        if self.rank == 0 and self.update_rank == 0 and not self.structured:
            raise ConfigError("PstConfig with rank = 0, update_rank = 0 and structured = false trains nothing; "
                              "enable at least one of the low-rank importance, the weight update or the "
                              "structured importance")


def sparsity_at(step: int, config: PstConfig) -> float:
    """The cubic schedule ``s(t)`` of the released code at optimizer step ``step`` (see the module doc)."""
    total = config.schedule_steps
    start = config.initial_warmup * total
    end = total - config.final_warmup * total
    s_i, s_f = config.initial_sparsity, config.sparsity
    if step <= start:
        return s_i
    if step > end:
        return s_f
    remaining = 1.0 - (step - start) / (end - start)
    return s_f + (s_i - s_f) * remaining**3


def pruned_count(sparsity: float, numel: int) -> int:
    """How many of ``numel`` weights the mask zeroes at ``sparsity``: ``round(sparsity · numel)``."""
    return min(numel, max(0, round(sparsity * numel)))


def topk_mask(scores: torch.Tensor, n_pruned: int) -> torch.Tensor:
    """``1`` on all but the ``n_pruned`` smallest entries of ``scores``; ties are pruned in row-major
    order (the first ``n_pruned`` entries of a stable ascending sort). No gradient."""
    flat = scores.detach().reshape(-1).float()  # (n,); float32 ranks bf16 scores without new ties
    if n_pruned <= 0:
        return torch.ones_like(scores)
    kth = flat.kthvalue(n_pruned).values  # the largest pruned score
    below = flat < kth
    ties = flat == kth
    need = n_pruned - below.sum()  # how many of the ties at kth are pruned
    prune = below | (ties & (ties.cumsum(0) <= need))
    return (~prune).to(scores.dtype).view_as(scores)


class _StraightThroughTopK(torch.autograd.Function):
    """``M = Top(S)`` forward; the backward pass hands ``∂L/∂M`` to ``S`` unchanged."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, n_pruned: int) -> torch.Tensor:
        return topk_mask(scores, n_pruned)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class PstFactors(nn.Module):
    """The trainable tensors of one target matrix (names from the paper's Figure 1)."""

    def __init__(self, d_in: int, d_out: int, rank: int, update_rank: int, structured: bool):
        super().__init__()
        if update_rank:
            self.U = nn.Parameter(torch.randn(d_out, update_rank))
            self.V = nn.Parameter(torch.zeros(update_rank, d_in))
        if rank:
            self.A = nn.Parameter(torch.randn(d_out, rank))
            self.B = nn.Parameter(torch.zeros(rank, d_in))
        if structured:
            self.R = nn.Parameter(torch.zeros(d_out))
            self.C = nn.Parameter(torch.zeros(d_in))


class PstDelta(core.Delta):
    method = "pst"
    mergeable = True

    def attach(self) -> None:
        cfg: PstConfig = self.config
        self.step = 0
        self._saved: dict[str, torch.Tensor] = {}
        self._targets = arch.resolve(self.model, cfg.targets, cfg.layers, cfg.exclude)
        ref = arch.linear_weight(self._targets[0].module)
        self._by_module: dict[str, list[arch.Target]] = {}
        for t in self._targets:
            self.modules[self.key_of(t)] = PstFactors(t.in_features, t.out_features, cfg.rank, cfg.update_rank,
                                                      cfg.structured).to(dtype=ref.dtype)
            self._by_module.setdefault(t.name, []).append(t)
        for targets in self._by_module.values():
            self.hook_output(targets[0].module, self._make_hook(targets))

    @staticmethod
    def key_of(t: arch.Target) -> str:
        return core.target_key(t.name, t.role if t.out_index is not None else None)

    def targets(self) -> list[str]:
        return sorted(self._by_module)

    # ---- the schedule --------------------------------------------------------------------------
    def on_step_begin(self, step: int) -> None:
        """Set the sparsity of optimizer step ``step`` (a pure function of ``step``)."""
        was_merged = self.merged
        self.unmerge()
        self.step = int(step)
        if was_merged:
            self.merge()

    @property
    def sparsity(self) -> float:
        """The sparsity the masks have now: the schedule at :attr:`step`."""
        return sparsity_at(self.step, self.config)

    # ---- importance, mask, effective weight ----------------------------------------------------------
    def base_weight(self, t: arch.Target) -> torch.Tensor:
        """The frozen ``W`` of a target, ``(d_out, d_in)`` (a role's rows of a fused projection)."""
        w = arch.linear_weight(t.module)  # (d_out_module, d_in)
        return w if t.out_index is None else w.index_select(0, t.out_index.to(w.device))

    def updated_weight(self, t: arch.Target) -> torch.Tensor:
        """``W' = W + β U V``, ``(d_out, d_in)``."""
        f = self.modules[self.key_of(t)]
        w = self.base_weight(t)
        return w + self.config.beta * (f.U @ f.V) if self.config.update_rank else w

    def importance(self, t: arch.Target, updated: torch.Tensor | None = None) -> torch.Tensor:
        """``S = |W'| + α1 A B + α2 (R 1ᵀ + 1 Cᵀ)``, ``(d_out, d_in)``."""
        cfg: PstConfig = self.config
        f = self.modules[self.key_of(t)]
        s = (self.updated_weight(t) if updated is None else updated).abs()
        if cfg.rank:
            s = s + cfg.alpha1 * (f.A @ f.B)
        if cfg.structured:
            s = s + cfg.alpha2 * (f.R[:, None] + f.C[None, :])  # (d_out, 1) + (1, d_in)
        return s

    def mask(self, t: arch.Target) -> torch.Tensor:
        """The binary mask ``M`` at the current sparsity, ``(d_out, d_in)`` (no gradient)."""
        with torch.no_grad():
            s = self.importance(t)
        return topk_mask(s, pruned_count(self.sparsity, s.numel()))

    def effective_weight(self, t: arch.Target) -> torch.Tensor:
        """``M ⊙ W'``, differentiable in the trainable tensors (straight-through for ``M``)."""
        updated = self.updated_weight(t)
        scores = self.importance(t, updated)
        m = _StraightThroughTopK.apply(scores, pruned_count(self.sparsity, scores.numel()))
        return m * updated

    def sparsity_report(self) -> dict[str, dict[str, float | int]]:
        """Per target: pruned entries of the mask, the matrix's size and the achieved sparsity."""
        out = {}
        for t in self._targets:
            m = self.mask(t)
            pruned = int(m.numel() - torch.count_nonzero(m))
            out[self.key_of(t)] = {"pruned": pruned, "numel": m.numel(), "sparsity": pruned / m.numel()}
        return out

    # ---- forward ---------------------------------------------------------------------------------
    def _update(self, targets: list[arch.Target], device: torch.device) -> torch.Tensor:
        """``M ⊙ W' - W`` of a whole module, ``(d_out_module, d_in)`` (zero rows for untargeted roles)."""
        if len(targets) == 1 and targets[0].out_index is None:
            t = targets[0]
            return self.effective_weight(t) - self.base_weight(t)
        w = arch.linear_weight(targets[0].module)
        d = w.new_zeros(w.shape)
        for t in targets:
            d = d.index_copy(0, t.out_index.to(device), self.effective_weight(t) - self.base_weight(t))
        return d

    def _make_hook(self, targets: list[arch.Target]):
        def hook(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
            d = self._update(targets, out.device)  # (d_out, d_in)
            y = F.linear(x if x.dtype == d.dtype else x.to(d.dtype), d)  # (..., d_out)
            return out + (y if y.dtype == out.dtype else y.to(out.dtype))

        return hook

    # ---- merging -----------------------------------------------------------------------------------
    def _merge(self) -> None:
        new = {name: [(t, self.effective_weight(t)) for t in targets] for name, targets in self._by_module.items()}
        for name, pairs in new.items():
            module = pairs[0][0].module
            w = module.weight
            self._saved[name] = w.detach().clone()
            for t, weff in pairs:
                weff = weff.to(w.dtype)
                if arch.is_conv1d(module):  # weight is (d_in, d_out)
                    if t.out_index is None:
                        w.copy_(weff.T)
                    else:
                        w.index_copy_(1, t.out_index.to(w.device), weff.T.contiguous())
                elif t.out_index is None:
                    w.copy_(weff)
                else:
                    w.index_copy_(0, t.out_index.to(w.device), weff)

    def _unmerge(self) -> None:
        for name, targets in self._by_module.items():
            targets[0].module.weight.copy_(self._saved.pop(name))

    # ---- saving: the schedule step travels with the tensors --------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**super().state_dict(), STEP_KEY: torch.tensor([self.step], dtype=torch.int64)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        state = dict(state)
        step = state.pop(STEP_KEY, None)
        if step is None:
            raise UserError(f"the pst delta has no {STEP_KEY!r} tensor (the schedule step it was saved at)")
        super().load_state_dict(state)
        self.on_step_begin(int(step.reshape(-1)[0]))


def apply(model, config: PstConfig, name: str = "default") -> PstDelta:
    return core.apply(model, PstDelta, config, name)


SPEC = registry.register(registry.MethodSpec(
    name="pst", family="peft", config_cls=PstConfig, apply=apply, paper="pst",
    summary="sparse fine-tuning: top-k mask of |W+UV| + low-rank AB + row/column scores, frozen W "
            "(Li et al., IJCAI 2022)",
    mergeable=True,
))
