"""Full fine-tuning: every parameter of the model trains. The baseline every method is compared to.

Not a paper's method but the reference point of all of them (Houlsby et al., ICML 2019, and the
delta-tuning analysis of Ding et al., Nature Machine Intelligence 2023, measure against it). It is
expressed in the delta protocol (:mod:`efficientgpt.peft.core`) so that the CLI, the Trainer, the
benchmark and the conformance matrix treat it like any other method:

* **What trains.** :func:`core.apply` freezes every base parameter and then marks the delta's
  :meth:`FullDelta.parameters` trainable. Here those *are* the base parameters: all of them by default,
  tied weights once (GPT-2's token embedding is its LM head); ``train_embeddings=False`` keeps the token
  and position embeddings and the LM head frozen, ``train_norms=False`` the LayerNorm/RMSNorm weights
  (modules whose class name contains ``Norm``). The delta adds no tensors and no hooks on the blocks.
* **What is saved.** :func:`core.save_delta` writes the trained parameters themselves, by their names
  in the model (``transformer.h.0.attn.c_attn.weight``, ...; a tied weight once, under its first
  name), so a saved full fine-tune is a safetensors file of the whole trained model plus its config.
  Loading copies them into a fresh base of the same architecture and weights.
* **Merging** is a no-op: the trained weights already are the model (``mergeable=True``; merged logits
  equal unmerged trivially and ``merge_and_unload`` leaves the fine-tuned model as a plain HF model).
* **The base model.** Other methods get :func:`core.disable`, :func:`core.set_active` (inactive) and
  :func:`core.remove` for free because they never write into the base weights; full fine-tuning does.
  With ``keep_base=True`` (default) attaching keeps a CPU copy of the trained parameters' original
  values, which costs one more copy of the model in host memory:

  - ``remove()`` copies the originals back, so the model is the base model again;
  - while the delta is disabled or inactive, a forward pre-hook on the model swaps the original
    weights in as separate, frozen ``nn.Parameter`` objects (in every module that holds them, so tied
    weights stay tied) and a forward hook (``always_call=True``, so also after an exception) swaps the
    trained ones back. The swap rebinds parameters rather than overwriting ``.data``, so autograd of a
    disabled forward saves the base tensors: gradients that flow through it to other deltas' tensors
    are those of the base model. The original weights are moved to the model's device on every such
    forward, so disabled runs are meant for reference outputs, not for hot loops. Gradient
    checkpointing recomputes blocks during backward, after the swap is undone: do not combine it with
    training other deltas through an inactive full fine-tune.

  With ``keep_base=False`` there is no copy: a disabled or inactive forward, and ``remove()`` after
  the weights changed (tracked by the parameters' version counters), raise a :class:`UserError`.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from efficientgpt import registry
from efficientgpt.config import ConfigBase, field
from efficientgpt.errors import UserError
from efficientgpt.models import arch
from efficientgpt.peft import core


@dataclasses.dataclass
class FullConfig(ConfigBase):
    """Full fine-tuning: which base parameters train, and whether the base weights are kept."""

    train_embeddings: bool = field(True, "train the token and position embeddings and the LM head")
    train_norms: bool = field(True, "train the LayerNorm/RMSNorm weights and biases")
    keep_base: bool = field(True, "keep a CPU copy of the original weights so disable(), inactive "
                                  "set_active() and remove() give the base model (one more model copy "
                                  "in host memory)")


def _embedding_params(model: nn.Module) -> list[nn.Parameter]:
    modules = [model.get_input_embeddings(), model.get_output_embeddings()]
    try:
        modules.append(arch.model_module(model, "pos_embed"))
    except UserError:  # no learned positions (rotary) or no role table
        pass
    return [p for m in modules if m is not None for p in m.parameters()]


def _norm_params(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in model.modules() if isinstance(m, nn.LayerNorm) or "Norm" in type(m).__name__
            for p in m.parameters(recurse=False)]


class FullDelta(core.Delta):
    method = "full"
    mergeable = True

    def attach(self) -> None:
        cfg: FullConfig = self.config
        others = [n for n, d in core.deltas(self.model).items() if isinstance(d, FullDelta)]
        if others:
            raise UserError(f"full fine-tuning is already attached to this model as {others[0]!r}; "
                            "remove it first (both would train the same weights)")
        excluded = set()
        if not cfg.train_embeddings:
            excluded |= {id(p) for p in _embedding_params(self.model)}
        if not cfg.train_norms:
            excluded |= {id(p) for p in _norm_params(self.model)}
        # named_parameters() lists a tied weight once, under its first name.
        self._named = [(n, p) for n, p in self.model.named_parameters()
                       if not n.startswith(core.DELTA_ROOT + ".") and id(p) not in excluded]
        ids = {id(p) for _, p in self._named}
        self._slots: dict[int, list[tuple[nn.Module, str]]] = {}
        for module in self.model.modules():
            for key, p in module._parameters.items():
                if p is not None and id(p) in ids:
                    self._slots.setdefault(id(p), []).append((module, key))
        self._base = {n: p.detach().to("cpu", copy=True) for n, p in self._named} if cfg.keep_base else None
        self._versions = {n: p._version for n, p in self._named}
        self._swapped = False
        self._add_hook(self.model, "pre", self._swap_in_base)
        self._add_hook(self.model, "forward_always", self._swap_back)

    # ---- the delta's tensors are the model's own ------------------------------------------------
    def parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self._named]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self._named}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        mine = dict(self._named)
        missing = sorted(set(mine) - set(state))
        unexpected = sorted(set(state) - set(mine))
        if missing or unexpected:
            raise UserError(f"saved weights do not match this model and full-fine-tuning config: missing "
                            f"{missing[:4]}, unexpected {unexpected[:4]}")
        for n, v in state.items():
            if v.shape != mine[n].shape:
                raise UserError(f"saved weight {n} has shape {tuple(v.shape)}, this model's is "
                                f"{tuple(mine[n].shape)}")
        with torch.no_grad():
            for n, v in state.items():
                mine[n].copy_(v.to(dtype=mine[n].dtype))

    def _merge(self) -> None:
        """Nothing to fold: the trained weights are the model's weights."""

    def _unmerge(self) -> None:
        """Nothing to unfold (see :meth:`_merge`)."""

    # ---- the base model --------------------------------------------------------------------------
    def _wants_base(self) -> bool:
        # Merged does not count: merged full fine-tuning is the fine-tuned model.
        return not self.active or getattr(self.model, "_efficientgpt_disabled", False)

    def _bind(self, new: dict[int, nn.Parameter]) -> None:
        for _, p in self._named:
            for module, key in self._slots[id(p)]:
                module._parameters[key] = new[id(p)]

    def _swap_in_base(self, module: nn.Module, args) -> None:
        if self._swapped or not self._wants_base():
            return
        if self._base is None:
            raise UserError("full fine-tuning was attached with keep_base=False, so the base model's weights "
                            "are gone: it cannot run disabled or inactive")
        base = {id(p): nn.Parameter(self._base[n].to(device=p.device, dtype=p.dtype), requires_grad=False)
                for n, p in self._named}
        self._bind(base)
        self._swapped = True

    def _swap_back(self, module: nn.Module, args, output) -> None:
        if self._swapped:
            self._bind({id(p): p for _, p in self._named})
            self._swapped = False

    def remove(self) -> None:
        """Detach, giving the model its original weights back."""
        if self._base is not None:
            with torch.no_grad():
                for n, p in self._named:
                    p.copy_(self._base[n].to(device=p.device, dtype=p.dtype))
        else:
            changed = [n for n, p in self._named if p._version != self._versions[n]]
            if changed:
                raise UserError(f"cannot remove full fine-tuning attached with keep_base=False: the weights "
                                f"changed ({changed[0]}, ...) and the originals were not kept; use "
                                "merge_and_unload() to keep the fine-tuned model as a plain one")
        super().remove()


def apply(model, config: FullConfig, name: str = "default") -> FullDelta:
    return core.apply(model, FullDelta, config, name)


SPEC = registry.register(registry.MethodSpec(
    name="full", family="peft", config_cls=FullConfig, apply=apply, paper="peft-large-scale-plms",
    summary="full fine-tuning: every parameter trains (the baseline of every comparison)", mergeable=True,
))
