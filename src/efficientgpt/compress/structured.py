"""Structured pruning of attention heads and MLP channels, after LLM-Pruner (Ma, Fang & Wang, NeurIPS 2023).

LLM-Pruner removes *coupled structures*: sets of weights that must go together for the network to
stay well formed (§3.1, the dependency rule of Eq. 1: a neuron whose only input is a pruned neuron is
pruned too). In a decoder block there are two kinds, and this module removes both whole, so the
pruned model is an ordinary, smaller Hugging Face model:

* **MLP channel** ``j``: row ``j`` of the up projection (and of the gate, for SwiGLU MLPs) with its
  bias, and column ``j`` of the down projection. Removing it deletes one intermediate feature.
* **Attention head group**: for grouped-query attention (Llama, Qwen2, Mistral, Qwen3) one KV head
  together with the ``heads / kv_heads`` query heads that read it, i.e. ``n_rep · head_dim`` rows of
  ``q``, ``head_dim`` rows of ``k`` and ``v`` (and their biases) and the matching ``n_rep · head_dim``
  input columns of the output projection. Whole KV groups are removed, never single query heads, so
  every kept query head keeps its KV head and ``heads / kv_heads`` is unchanged; with ordinary
  multi-head attention a group is one head. (This matches the official code's Llama-3 script, which
  roots the head groups at ``k_proj`` in ``head_dim``-wide consecutive blocks.)

**Importance** of a group (§3.2) is summed over its members ("summation" aggregation, the paper's
default):

* ``taylor``: LLM-Pruner's element-wise first-order estimate, the first term of Eq. 4,
  ``I(W_k) = |W_k · ∂L/∂W_k|``, summed over every weight (and bias) of the group. ``L`` is the mean
  next-token loss over all calibration windows; its gradient comes from one backward pass over the
  whole model per batch of windows, accumulated (the official code takes 10 windows of 64 tokens
  in one batch; accumulating over batches gives the same gradient for more windows). The
  second-order term of Eq. 4 (the Hessian diagonal, which the paper approximates by the Fisher
  information) is not implemented.
* ``magnitude``: ``‖W_G‖₂``, the L2 norm of the group's weights and biases (the paper's ``L2``
  baseline).
* ``activation``: the norm, over all calibration tokens, of the group's channels as the block
  computes them: ``‖X_j‖₂`` of down-projection input ``j`` for an MLP channel, and the Frobenius
  norm of the group's heads' outputs (the output projection's input columns) for a head group.
  Statistics come from :func:`efficientgpt.compress.calibration.run_sequential`, so block ``i`` is
  measured on the outputs of the already pruned blocks ``< i`` (as SparseGPT calibrates); this
  criterion is not in the paper, it is the structured analogue of Wanda's activation norms.

**Removal.** Groups are ranked per layer and the ``round(ratio · n)`` least important groups of each
kind are removed in every layer (``ratio · n`` rounded to the nearest count, halves down, at most
``n - 1``; equal scores go to the lower index). ``LlamaConfig`` (transformers 5) also demands
``hidden_size % num_attention_heads == 0`` although it holds ``head_dim``, so for Llama the removed
KV-group count is the one nearest to ``ratio · n`` that leaves a divisor of ``hidden_size`` (4 heads
of a 64-wide model at ratio 0.3: 2 removed, not 1; the notes say so). LLM-Pruner's
block-wise setting keeps the first and last layers dense and prunes the middle ones harder; here
every layer loses the same number of heads and channels, because a Hugging Face config has one
global ``num_attention_heads`` / ``num_key_value_heads`` / ``intermediate_size`` and per-layer widths
could not be saved as a plain model. The rewritten config sets ``head_dim`` explicitly (``hidden /
heads`` no longer holds). Families whose attention derives the head size from ``hidden / heads``
(GPT-2, OPT, GPT-NeoX) cannot express fewer heads of the same size, so only their MLPs are pruned
(``n_inner``, ``ffn_dim``, ``intermediate_size``) and head pruning is refused with a clear error.

**Recovery** (§3.3, Eq. 6): with ``recovery_steps > 0`` LoRA (``efficientgpt.peft.lora``, rank ``r``,
``α = 2r``, dropout 0.05 on every linear map, as the official post-training script) is attached to
the pruned model, trained for ``recovery_steps`` with the shared
:class:`~efficientgpt.train.trainer.Trainer` on the calibration windows (the paper uses 50k Alpaca
samples for two epochs), and merged, so the saved model is again a plain Hugging Face model.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from efficientgpt import registry
from efficientgpt.compress.report import CompressionResult, parameter_bytes
from efficientgpt.config import ConfigBase, field
from efficientgpt.errors import ConfigError, UserError
from efficientgpt.models import arch

METHOD = "structured"
IMPORTANCES = ("taylor", "magnitude", "activation")


@dataclasses.dataclass
class StructuredConfig(ConfigBase):
    """Structured pruning hyperparameters (LLM-Pruner, Ma et al., 2023)."""

    ratio: float = field(0.3, "fraction of attention-head groups and of MLP channels removed in every layer, "
                              "in [0, 1)", minimum=0.0, maximum=1.0)
    importance: str = field("taylor", "group importance: taylor (|w·dL/dw| summed, LLM-Pruner), magnitude "
                                      "(L2 norm of the group's weights) or activation (calibration norm of the "
                                      "group's channels)", choices=IMPORTANCES)
    prune_heads: bool = field(True, "remove attention head groups (whole KV groups under GQA)")
    prune_mlp: bool = field(True, "remove MLP intermediate channels")
    recovery_steps: int = field(0, "LoRA recovery steps on the calibration windows after pruning (0: none)",
                                minimum=0)
    recovery_rank: int = field(8, "LoRA rank r of the recovery (alpha = 2r)", minimum=1)
    recovery_lr: float = field(1e-4, "learning rate of the LoRA recovery", minimum=0.0, exclusive_minimum=True)
    recovery_batch: int = field(8, "calibration windows per recovery step", minimum=1)

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.ratio < 1.0:
            raise ConfigError(f"StructuredConfig.ratio = {self.ratio!r} is out of range: must be in [0, 1) "
                              "(1 would remove every head and channel)")
        if not (self.prune_heads or self.prune_mlp):
            raise ConfigError("StructuredConfig: prune_heads and prune_mlp are both off; nothing to prune "
                              "(enable at least one)")


# ---- which families can express a pruned shape --------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Rule:
    """How a model type's config expresses a structurally pruned model."""

    mlp_field: str
    """Config field holding the MLP's intermediate width."""
    heads: bool
    """Whether fewer heads of the same size can be written to the config."""
    why_not_heads: str = ""
    heads_divide_hidden: bool = False
    """The config's validator demands ``hidden_size % num_attention_heads == 0`` even with an explicit
    ``head_dim`` (``LlamaConfig.validate_architecture`` in transformers 5)."""


_NO_HEADS = ("its attention computes the head size as hidden_size / {field} and the config has no head_dim, "
             "so fewer heads of the same size cannot be saved")
RULES: dict[str, Rule] = {
    "llama": Rule("intermediate_size", True, heads_divide_hidden=True),
    "mistral": Rule("intermediate_size", True),
    "qwen2": Rule("intermediate_size", True),
    "qwen3": Rule("intermediate_size", True),
    "gpt2": Rule("n_inner", False, _NO_HEADS.format(field="n_head")),
    "opt": Rule("ffn_dim", False, _NO_HEADS.format(field="num_attention_heads")),
    "gpt_neox": Rule("intermediate_size", False, _NO_HEADS.format(field="num_attention_heads")),
}


@dataclasses.dataclass
class Member:
    """One weight matrix's share of a coupled group: ``width`` consecutive rows (``axis="out"``) or
    input columns (``axis="in"``) per group, in ``nn.Linear`` orientation."""

    module: nn.Module
    axis: str
    width: int


@dataclasses.dataclass
class Plan:
    """What :func:`apply` checked before touching a weight."""

    rule: Rule
    prune_heads: bool
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    channels: int
    remove_groups: int
    """KV groups removed per layer."""
    remove_channels: int
    """MLP channels removed per layer."""

    @property
    def n_rep(self) -> int:
        return self.heads // self.kv_heads if self.kv_heads else 1


def nearest_count(target: float, allowed: list[int]) -> int:
    """The allowed count nearest to ``target``; a tie goes to the smaller count (remove less)."""
    return min(allowed, key=lambda r: (abs(r - target), r))


def head_groups_to_remove(ratio: float, kv_heads: int, n_rep: int, hidden: int, divide: bool) -> int:
    """KV groups to remove: nearest to ``ratio · kv_heads``, keeping at least one group and, where the
    config demands it, a head count that divides ``hidden``."""
    allowed = [r for r in range(kv_heads) if not divide or hidden % ((kv_heads - r) * n_rep) == 0]
    return nearest_count(ratio * kv_heads, allowed)


def channels_to_remove(ratio: float, channels: int) -> int:
    """MLP channels to remove: nearest to ``ratio · channels`` (ties: fewer), keeping at least one."""
    return min(channels - 1, max(0, math.ceil(ratio * channels - 0.5)))


def _check(model: nn.Module, config: StructuredConfig, windows: torch.Tensor | None) -> Plan:
    """Every refusal, before any weight changes."""
    config.validate()
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in RULES:
        raise UserError(f"structured pruning has no rule for model type {model_type!r}: it must know how the "
                        f"config expresses fewer heads and channels; supported: {', '.join(sorted(RULES))}")
    rule = RULES[model_type]
    from efficientgpt.peft import core

    if core.deltas(model):
        raise UserError(f"the model carries attached deltas ({', '.join(core.deltas(model))}); merge or remove "
                        "them before structured pruning")
    if config.prune_heads and not rule.heads:
        raise UserError(f"structured pruning cannot remove attention heads of a {model_type} model: "
                        f"{rule.why_not_heads}; prune its MLP only (--no-prune-heads, prune_heads=False)")
    if config.importance in ("taylor", "activation") and windows is None:
        raise UserError(f"importance {config.importance!r} needs calibration windows; pass windows= or use "
                        "importance 'magnitude'")
    if config.recovery_steps and windows is None:
        raise UserError("recovery_steps > 0 trains on the calibration windows; pass windows= or set "
                        "recovery_steps 0")
    if windows is not None and (windows.dim() != 2 or windows.shape[1] < 2):
        raise UserError(f"calibration windows must be (N, T) token ids with T >= 2, got shape {tuple(windows.shape)}")
    n_layers = arch.num_layers(model)
    channels = arch.linear_shape(arch.block_module(model, 0, "up"))[1]
    heads, kv, hd = arch.head_dims(model)
    if config.prune_heads:
        if heads % kv:
            raise UserError(f"{model_type}: {heads} query heads do not split into {kv} KV groups")
    for i in range(n_layers):
        if arch.linear_shape(arch.block_module(model, i, "up"))[1] != channels:
            raise UserError(f"layer {i} has a different MLP width than layer 0; structured pruning needs "
                            "layers of equal shape (the config holds one intermediate size)")
        if config.prune_heads:
            attn = arch.block_module(model, i, "attn")
            shapes = {r: arch.linear_shape(arch.block_module(model, i, r)) for r in ("q", "k", "v", "o")}
            expect = {"q": heads * hd, "k": kv * hd, "v": kv * hd}
            bad = [r for r, n in expect.items() if shapes[r][1] != n] + (["o"] if shapes["o"][0] != heads * hd
                                                                        else [])
            if bad or getattr(attn, "head_dim", hd) != hd:
                raise UserError(f"layer {i}: attention shapes do not match the config (heads {heads}, kv heads "
                                f"{kv}, head_dim {hd}) in {', '.join(bad) or 'head_dim'}")
    remove_groups = 0
    if config.prune_heads:
        if kv == 1 and config.ratio > 0:
            raise UserError(f"cannot prune heads of this {model_type} model: it has a single KV head shared by all "
                            f"{heads} query heads, and heads are removed in whole KV groups (removing the group "
                            "would remove the attention); use prune_heads=False (--no-prune-heads)")
        remove_groups = head_groups_to_remove(config.ratio, kv, heads // kv, model.config.hidden_size,
                                              rule.heads_divide_hidden)
    remove_channels = channels_to_remove(config.ratio, channels) if config.prune_mlp else 0
    return Plan(rule, config.prune_heads, n_layers, heads, kv, hd, channels, remove_groups, remove_channels)


# ---- coupled groups -------------------------------------------------------------------------------
def head_members(model: nn.Module, layer: int, plan: Plan) -> list[Member]:
    """KV group ``g``: q rows ``[g·n_rep·hd, (g+1)·n_rep·hd)``, k/v rows ``[g·hd, (g+1)·hd)``, the o columns
    matching q (HF's ``repeat_kv`` gives query head ``h`` the KV head ``h // n_rep``)."""
    hd, rep = plan.head_dim, plan.n_rep
    get = lambda r: arch.block_module(model, layer, r)  # noqa: E731
    return [Member(get("q"), "out", rep * hd), Member(get("k"), "out", hd), Member(get("v"), "out", hd),
            Member(get("o"), "in", rep * hd)]


def mlp_members(model: nn.Module, layer: int) -> list[Member]:
    fam = arch.family_of(model)
    out = [Member(arch.block_module(model, layer, r), "out", 1) for r in ("gate", "up") if r in fam.block_roles]
    return out + [Member(arch.block_module(model, layer, "down"), "in", 1)]


def _bias(module: nn.Module) -> torch.Tensor | None:
    return getattr(module, "bias", None)


def group_scores(members: list[Member], elem: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``Σ elem(p)`` over each group's weights and the biases of its output rows: ``(n_groups,)`` float64.

    ``elem`` maps a stored parameter to per-element scores of the same shape (it may read ``p.grad``).
    """
    total = None
    for m in members:
        s = elem(m.module.weight).double()
        if arch.is_conv1d(m.module):
            s = s.t()  # Conv1D stores (d_in, d_out)
        # s: (d_out, d_in)
        if m.axis == "out":
            per = s.sum(1)  # (d_out,)
            b = _bias(m.module)
            if b is not None:
                per = per + elem(b).double()
        else:
            per = s.sum(0)  # (d_in,)
        per = per.reshape(-1, m.width).sum(1)  # (n_groups,)
        total = per if total is None else total + per
    return total


def magnitude_scores(members: list[Member]) -> torch.Tensor:
    """``‖W_G‖₂`` per group."""
    return group_scores(members, lambda p: p.detach().float() ** 2).sqrt()


def taylor_scores(members: list[Member]) -> torch.Tensor:
    """``Σ_k |W_k · ∂L/∂W_k|`` per group (LLM-Pruner Eq. 4, first-order term); needs ``p.grad``."""

    def elem(p: torch.Tensor) -> torch.Tensor:
        if p.grad is None:
            raise RuntimeError("taylor importance needs the gradients of the calibration loss")
        return (p.detach().float() * p.grad.float()).abs()

    return group_scores(members, elem)


def _lowest(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the ``k`` smallest scores; ties go to the lower index."""
    return sorted(torch.argsort(scores.cpu(), stable=True)[:k].tolist())


def _keep_index(n_groups: int, width: int, removed: list[int], device) -> torch.Tensor:
    gone = set(removed)
    keep = [g for g in range(n_groups) if g not in gone]
    idx = torch.tensor(keep, dtype=torch.long)[:, None] * width + torch.arange(width)[None, :]  # (kept, width)
    return idx.reshape(-1).to(device)


@torch.no_grad()
def _select(module: nn.Module, axis: str, index: torch.Tensor) -> None:
    """Keep only features ``index`` of ``module``'s output (``"out"``) or input (``"in"``), in place."""
    w = module.weight
    conv = arch.is_conv1d(module)
    dim = (1 if conv else 0) if axis == "out" else (0 if conv else 1)  # Conv1D stores (d_in, d_out)
    module.weight = nn.Parameter(w.detach().index_select(dim, index).clone(), requires_grad=w.requires_grad)
    b = _bias(module)
    if axis == "out" and b is not None:
        module.bias = nn.Parameter(b.detach().index_select(0, index).clone(), requires_grad=b.requires_grad)
    n = len(index)
    if conv:
        if axis == "out":
            module.nf = n
        else:
            module.nx = n
    elif axis == "out":
        module.out_features = n
    else:
        module.in_features = n


def _prune(members: list[Member], n_groups: int, removed: list[int]) -> None:
    for m in members:
        idx = _keep_index(n_groups, m.width, removed, m.module.weight.device)
        _select(m.module, m.axis, idx)


# ---- importance by calibration ------------------------------------------------------------------
def _taylor_gradients(model: nn.Module, windows: torch.Tensor, params: list[nn.Parameter], batch: int,
                      progress: bool) -> None:
    """Leave ``∂L/∂p`` in ``p.grad`` for ``params``, ``L`` the mean next-token loss over all windows."""
    from tqdm.auto import tqdm

    from efficientgpt.train.losses import causal_lm_loss

    device = next(model.parameters()).device
    flags = {id(p): p.requires_grad for p in model.parameters()}
    was_training = model.training
    model.eval()  # no dropout: the gradient of the deterministic loss
    wanted = {id(p) for p in params}
    try:
        for p in model.parameters():
            p.requires_grad_(id(p) in wanted)
            p.grad = None
        n_tokens = windows.shape[0] * (windows.shape[1] - 1)
        with torch.enable_grad():
            for i in tqdm(range(0, len(windows), batch), desc="taylor", unit="batch", disable=not progress,
                          leave=False):
                loss_sum, _ = causal_lm_loss(model, {"input_ids": windows[i : i + batch].to(device)})
                (loss_sum / n_tokens).backward()
    finally:
        for p in model.parameters():
            p.requires_grad_(flags[id(p)])
        model.train(was_training)


# ---- apply ----------------------------------------------------------------------------------------
def apply(model: nn.Module, config: StructuredConfig, windows: torch.Tensor | None = None,
          progress: bool = False) -> CompressionResult:
    """Remove the least important head groups and MLP channels of every layer (see the module docstring)."""
    plan = _check(model, config, windows)
    size_before = parameter_bytes(model)
    fam = arch.family_of(model)
    per_layer: dict[str, dict[str, Any]] = {}
    removed_heads: dict[int, list[int]] = {}
    removed_channels: dict[int, list[int]] = {}

    def prune_layer(i: int, head_scores: torch.Tensor | None, mlp_scores: torch.Tensor | None) -> None:
        if plan.remove_groups and head_scores is not None:
            groups = _lowest(head_scores, plan.remove_groups)
            removed_heads[i] = groups
            _prune(head_members(model, i, plan), plan.kv_heads, groups)
        if plan.remove_channels and mlp_scores is not None:
            channels = _lowest(mlp_scores, plan.remove_channels)
            removed_channels[i] = channels
            _prune(mlp_members(model, i), plan.channels, channels)

    if config.importance == "activation":
        from efficientgpt.compress.calibration import run_sequential

        roles = (("o",) if plan.remove_groups else ()) + (("down",) if plan.remove_channels else ())

        def compress_block(i, block, stats, inputs):
            names = {t.role: t.name for t in arch.resolve(model, list(roles), layers=[i])}
            hs = ms = None
            if "o" in names:  # ‖output of the group's heads‖ over all calibration tokens
                hs = stats[names["o"]].sq_sum.reshape(plan.kv_heads, -1).sum(1).sqrt()  # (kv_heads,)
            if "down" in names:
                ms = stats[names["down"]].sq_sum.sqrt()  # (channels,)
            prune_layer(i, hs, ms)

        if roles:
            run_sequential(model, windows, compress_block, roles=roles, gram=False, progress=progress)
    else:
        if config.importance == "taylor":
            params = []
            for i in range(plan.layers):
                members = (head_members(model, i, plan) if plan.remove_groups else []) + \
                    (mlp_members(model, i) if plan.remove_channels else [])
                for m in members:
                    params += [p for p in (m.module.weight, _bias(m.module)) if p is not None]
            if params:
                _taylor_gradients(model, windows, params, batch=8, progress=progress)
            score = taylor_scores
        else:
            score = magnitude_scores
        all_scores = []
        for i in range(plan.layers):
            hs = score(head_members(model, i, plan)) if plan.remove_groups else None
            ms = score(mlp_members(model, i)) if plan.remove_channels else None
            all_scores.append((hs, ms))
        if config.importance == "taylor":
            model.zero_grad(set_to_none=True)
        for i, (hs, ms) in enumerate(all_scores):
            prune_layer(i, hs, ms)

    _rewrite_config(model, plan)
    for i in range(plan.layers):
        rep = plan.n_rep
        per_layer[f"{fam.blocks}.{i}"] = {
            "kv_groups_removed": removed_heads.get(i, []),
            "heads_removed": [g * rep + r for g in removed_heads.get(i, []) for r in range(rep)],
            "mlp_channels_removed": removed_channels.get(i, []),
        }
    achieved = measure(model, plan, size_before)
    achieved["importance"] = config.importance
    notes = ["every layer loses the same number of heads and channels, so the Hugging Face config holds the "
             "pruned shape; the saved model is a plain save_pretrained model"]
    if config.prune_heads and plan.kv_heads < plan.heads:
        notes.append(f"grouped-query attention: heads are removed in whole KV groups of {plan.n_rep} query heads")
    if config.prune_heads and plan.remove_groups != nearest_count(config.ratio * plan.kv_heads,
                                                                  list(range(plan.kv_heads))):
        notes.append(f"{model.config.model_type} configs need hidden_size divisible by num_attention_heads: "
                     f"{plan.remove_groups} of {plan.kv_heads} KV groups removed, the expressible count nearest "
                     f"to ratio {config.ratio}")
    if config.prune_heads and config.ratio > 0 and plan.remove_groups == 0:
        notes.append(f"ratio {config.ratio} of {plan.kv_heads} KV groups rounds to 0 groups: attention unchanged")
    if config.recovery_steps:
        achieved.update(_recover(model, config, windows, progress))
    return CompressionResult(method=METHOD, achieved=achieved, modules={}, per_layer=per_layer, notes=notes)


def _rewrite_config(model: nn.Module, plan: Plan) -> None:
    cfg = model.config
    if plan.remove_groups:
        kv = plan.kv_heads - plan.remove_groups
        cfg.num_attention_heads = kv * plan.n_rep
        cfg.num_key_value_heads = kv
        cfg.head_dim = plan.head_dim
    if plan.remove_channels:
        setattr(cfg, plan.rule.mlp_field, plan.channels - plan.remove_channels)


def measure(model: nn.Module, plan: Plan, size_before: dict[str, int]) -> dict[str, Any]:
    """What the weights hold now: heads and channels per layer (equal in all layers), parameters."""
    channels = {arch.linear_shape(arch.block_module(model, i, "up"))[1] for i in range(plan.layers)}
    downs = {arch.linear_shape(arch.block_module(model, i, "down"))[0] for i in range(plan.layers)}
    if len(channels) != 1 or channels != downs:
        raise RuntimeError(f"MLP widths differ after pruning: up {sorted(channels)}, down {sorted(downs)}")
    (ch,) = channels
    out: dict[str, Any] = {
        "mlp_channels_before": plan.channels,
        "mlp_channels_after": ch,
        "mlp_channels_removed_per_layer": plan.channels - ch,
        "mlp_ratio": (plan.channels - ch) / plan.channels,
    }
    if not plan.prune_heads:
        out.update({"heads_before": plan.heads, "heads_after": plan.heads, "heads_removed_per_layer": 0,
                    "kv_heads_before": plan.kv_heads, "kv_heads_after": plan.kv_heads, "head_ratio": 0.0})
    else:
        hd = plan.head_dim
        q = {arch.linear_shape(arch.block_module(model, i, "q"))[1] // hd for i in range(plan.layers)}
        k = {arch.linear_shape(arch.block_module(model, i, "k"))[1] // hd for i in range(plan.layers)}
        if len(q) != 1 or len(k) != 1:
            raise RuntimeError(f"head counts differ after pruning: q {sorted(q)}, kv {sorted(k)}")
        (h,), (kv,) = q, k
        out.update({"heads_before": plan.heads, "heads_after": h, "heads_removed_per_layer": plan.heads - h,
                    "kv_heads_before": plan.kv_heads, "kv_heads_after": kv, "head_ratio": (plan.heads - h) / plan.heads})
    after = parameter_bytes(model)
    out.update({"parameters_before": size_before["parameters"], "parameters_after": after["parameters"],
                "parameter_ratio": after["parameters"] / size_before["parameters"]})
    return out


# ---- LoRA recovery (§3.3) ---------------------------------------------------------------------------
def _recover(model: nn.Module, config: StructuredConfig, windows: torch.Tensor, progress: bool) -> dict[str, Any]:
    """Train a LoRA on the pruned model over the calibration windows, then fold it into the weights."""
    from efficientgpt.peft import core
    from efficientgpt.peft.lora import LoraConfig
    from efficientgpt.train.config import TrainConfig
    from efficientgpt.train.trainer import Trainer

    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training = model.training
    n, seq_len = windows.shape
    batch = min(config.recovery_batch, n)

    def batches(step: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(step)  # a pure function of the step, as the Trainer requires
        return {"input_ids": windows[torch.randint(0, n, (batch,), generator=g)]}

    cfg = TrainConfig(steps=config.recovery_steps, batch_size=batch, seq_len=seq_len, lr=config.recovery_lr,
                      warmup_steps=0, log_every=1, progress=progress, seed=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        core.apply(model, "lora", LoraConfig(targets=["all-linear"], rank=config.recovery_rank,
                                             alpha=2.0 * config.recovery_rank, dropout=0.05))
        try:
            result = Trainer(model, cfg, batches).train()
        except BaseException:
            core.remove(model)
            raise
    core.merge_and_unload(model)
    for name, p in model.named_parameters():
        p.requires_grad_(flags.get(name, True))
    model.train(was_training)
    losses = [r["loss"] for r in result.curve]
    return {"recovery_steps": config.recovery_steps, "recovery_loss_first": losses[0],
            "recovery_loss_last": losses[-1]}


SPEC = registry.register(registry.MethodSpec(
    name=METHOD, family="prune", config_cls=StructuredConfig, apply=apply, paper="llm-pruner",
    summary="remove whole attention-head groups and MLP channels; the config shrinks (Ma et al., NeurIPS 2023)",
    calibration=True,
))
