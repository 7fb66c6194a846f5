"""Prompt tuning (Lester, Al-Rfou & Constant, "The Power of Scale for Parameter-Efficient Prompt Tuning",
EMNLP 2021).

A frozen LM reads ``n`` learned *soft-prompt* embeddings ``P_e ∈ R^{n x e}`` before its input (paper §2,
where the prompt length is ``p``): the input embeddings ``X_e ∈ R^{T x e}`` become
``[P_e; X_e] ∈ R^{(n+T) x e}``, and only ``P_e`` trains.

With causal attention the soft prompt attends only to itself, so its keys and values in every layer do
not depend on the input. The delta therefore runs the model once on ``inputs_embeds = P_e`` (batch 1,
positions ``0 .. n-1``, with gradients so ``P_e`` trains), and hands the resulting keys and values to the
real call as a pre-filled KV cache (:mod:`efficientgpt.peft.kv_prefix`): the real tokens take positions
``n .. n+T-1`` and attend to the prompt exactly as in ``[P_e; X_e]``, while the logits cover only the
real tokens. This equals prepending ``P_e`` to the input embeddings (tested against that and against
HF PEFT) and costs ``n`` prompt tokens per call instead of ``n`` per sequence.

Initialisation (options in §2.1, details in §3.2 and Figure 3(b)):

* ``vocab`` (default): embeddings of distinct random tokens among the first ``vocab_pool`` ids. The paper
  samples from the 5,000 most common tokens of T5's vocabulary; token frequencies are not at hand here,
  and BPE and SentencePiece vocabularies list frequent pieces first only roughly, so this approximates it.
* ``text``: embeddings of the tokens ``init_text_ids``, repeated to fill ``n`` (as HF PEFT's ``TEXT``);
  with the ids of the class labels this is the paper's best-performing "class label" initialisation.
* ``random``: uniform in ``[-init_range, init_range]``, the paper's range 0.5 by default (HF PEFT draws
  ``N(0, 1)`` instead).

:func:`peft_export` and :func:`peft_import` convert to and from HF PEFT's ``PROMPT_TUNING`` adapters
(``adapter_config.json`` fields and the ``prompt_embeddings`` tensor).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Any

import torch
from torch import nn

from efficientgpt import registry
from efficientgpt.config import ConfigBase, field
from efficientgpt.errors import ConfigError, UserError
from efficientgpt.models import arch
from efficientgpt.peft import core
from efficientgpt.peft.kv_prefix import MARK, KVPrefixDelta, virtual_tokens

INITS = ("vocab", "text", "random")


@dataclasses.dataclass
class PromptTuningConfig(ConfigBase):
    """Prompt-tuning hyperparameters (Lester et al., 2021)."""

    num_virtual_tokens: int = field(20, "soft-prompt length n (the paper's gains flatten beyond 20, §3.2)", minimum=1)
    init: str = field("vocab", "initialisation of P_e: vocab (embeddings of random tokens), text (embeddings of "
                               "init_text_ids), random (uniform in ±init_range)", choices=INITS)
    init_range: float = field(0.5, "half-width of the uniform range for init=random", minimum=0.0,
                              exclusive_minimum=True)
    vocab_pool: int = field(5000, "init=vocab samples among the first vocab_pool token ids", minimum=1)
    init_text_ids: list[int] | None = field(None, "token ids of the init text for init=text (repeated to fill n)")

    def validate(self) -> None:
        super().validate()
        if isinstance(self.init_text_ids, str):  # "12,7,42" from the command line
            self.init_text_ids = self.init_text_ids.replace(",", " ").split()
        if self.init_text_ids is not None:
            try:
                self.init_text_ids = [int(i) for i in self.init_text_ids]
            except (TypeError, ValueError):
                raise ConfigError(f"PromptTuningConfig.init_text_ids = {self.init_text_ids!r} must be a list of "
                                  "token ids (integers)") from None
            bad = [i for i in self.init_text_ids if i < 0]
            if bad:
                raise ConfigError(f"PromptTuningConfig.init_text_ids holds negative token id {bad[0]}")
        if self.init == "text" and not self.init_text_ids:
            raise ConfigError("PromptTuningConfig.init = 'text' needs init_text_ids: the token ids of the init text")
        if self.init != "text" and self.init_text_ids:
            raise ConfigError(f"PromptTuningConfig.init_text_ids is used only with init='text' (init is "
                              f"{self.init!r})")


class SoftPrompt(nn.Module):
    """The soft prompt ``P_e`` (n x e)."""

    def __init__(self, P: torch.Tensor):
        super().__init__()
        self.P = nn.Parameter(P)


class PromptTuningDelta(KVPrefixDelta):
    method = "prompt_tuning"
    mergeable = False

    def build(self) -> None:
        embed = self.model.get_input_embeddings()
        with torch.no_grad():
            P = self._initial_prompt(embed.weight)  # (n, e)
        self.modules["prompt"] = SoftPrompt(P)
        params = inspect.signature(self.model.forward).parameters
        # the prompt's own logits are never read: compute only the last one
        self._inner_kwargs = {"logits_to_keep": 1} if "logits_to_keep" in params else {}

    def _initial_prompt(self, E: torch.Tensor) -> torch.Tensor:
        cfg: PromptTuningConfig = self.config
        n, (vocab, e) = self.n, E.shape
        if cfg.init == "random":
            return torch.empty(n, e, dtype=E.dtype).uniform_(-cfg.init_range, cfg.init_range)
        if cfg.init == "vocab":
            pool = min(vocab, cfg.vocab_pool)
            ids = torch.randperm(pool)[:n] if n <= pool else torch.randint(pool, (n,))
        else:
            bad = [i for i in cfg.init_text_ids if i >= vocab]
            if bad:
                raise ConfigError(f"PromptTuningConfig.init_text_ids holds token id {bad[0]}, but the model's "
                                  f"vocabulary has {vocab} tokens (ids 0..{vocab - 1})")
            reps = math.ceil(n / len(cfg.init_text_ids))
            ids = torch.tensor((cfg.init_text_ids * reps)[:n])
        return E[ids.to(E.device)].detach().clone()  # (n, e)

    @property
    def prompt(self) -> torch.Tensor:
        return self.modules["prompt"].P

    def extend_cache(self, cache, batch_size: int):
        past = cache.get_seq_length() if cache is not None else 0
        inner = self.new_cache()
        if past:  # other deltas' virtual tokens: input-independent, so every row is the same
            for i, layer in enumerate(cache.layers):
                inner.update(layer.keys[:1], layer.values[:1], i)
            setattr(inner, MARK, virtual_tokens(cache))
        self._busy = True  # this delta's own hook must not act on the prompt's pass
        try:
            self.model(inputs_embeds=self.prompt[None], use_cache=True, **{self.cache_kw: inner},
                       **self._inner_kwargs)  # fills inner with [past | P_e]: (1, kvh, past + n, hd) per layer
        finally:
            self._busy = False
        cache = cache if cache is not None else self.new_cache()
        for i, layer in enumerate(inner.layers):
            k = layer.keys[:, :, past:].expand(batch_size, -1, -1, -1)  # (B, kvh, new, hd)
            v = layer.values[:, :, past:].expand(batch_size, -1, -1, -1)  # (B, kvh, new, hd)
            cache.update(k, v, i)
        setattr(cache, MARK, virtual_tokens(inner))  # other deltas may have added theirs in the prompt's pass
        return cache


def apply(model, config: PromptTuningConfig, name: str = "default") -> PromptTuningDelta:
    return core.apply(model, PromptTuningDelta, config, name)


# ---- Hugging Face PEFT interoperability -------------------------------------------------------------
PEFT_KEY = "prompt_embeddings"


def peft_export(delta: PromptTuningDelta) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(adapter_config, tensors)`` of an HF PEFT ``PromptTuningConfig`` adapter for ``delta``.

    PEFT stores the soft prompt under the bare key ``prompt_embeddings`` (no module path).
    """
    if not isinstance(delta, PromptTuningDelta):
        raise UserError(f"peft_export of prompt tuning got a {delta.method!r} delta")
    model = delta.model
    heads, _, _ = arch.head_dims(model)
    config = {
        "peft_type": "PROMPT_TUNING",
        "task_type": "CAUSAL_LM",
        "num_virtual_tokens": delta.n,
        "token_dim": int(delta.prompt.shape[1]),
        "num_transformer_submodules": 1,
        "num_attention_heads": heads,
        "num_layers": int(model.config.num_hidden_layers),
        "prompt_tuning_init": "RANDOM",  # the values are in the tensor; this only says how PEFT would start
        "prompt_tuning_init_text": None,
        "tokenizer_name_or_path": None,
        "tokenizer_kwargs": None,
        "modules_to_save": None,
        "revision": None,
    }
    return config, {PEFT_KEY: delta.prompt.detach().clone()}


def peft_import(model, adapter_config: dict[str, Any], tensors: dict[str, torch.Tensor],
                name: str = "default") -> PromptTuningDelta:
    """Attach an HF PEFT ``PROMPT_TUNING`` adapter (its config dict and tensors) as our delta."""
    if adapter_config.get("peft_type") != "PROMPT_TUNING":
        raise UserError(f"not a prompt-tuning adapter: peft_type is {adapter_config.get('peft_type')!r}")
    task = adapter_config.get("task_type")
    if task not in (None, "CAUSAL_LM"):
        raise UserError(f"prompt-tuning adapter for task_type {task!r}; only CAUSAL_LM adapters can be imported")
    if adapter_config.get("num_transformer_submodules") not in (None, 1):
        raise UserError("prompt-tuning adapter for an encoder-decoder model (num_transformer_submodules = "
                        f"{adapter_config['num_transformer_submodules']}); only decoder-only models are supported")
    key = next((k for k in tensors if k == PEFT_KEY or k.endswith("." + PEFT_KEY)), None)
    if key is None:
        raise UserError(f"prompt-tuning adapter has no {PEFT_KEY!r} tensor; it has: {', '.join(sorted(tensors))}")
    P = tensors[key]
    n = int(adapter_config.get("num_virtual_tokens") or P.shape[0])
    e = model.get_input_embeddings().embedding_dim
    if tuple(P.shape) != (n, e):
        raise UserError(f"prompt_embeddings has shape {tuple(P.shape)}, expected ({n}, {e}) for "
                        f"num_virtual_tokens = {n} and this model's embedding width {e}")
    delta = apply(model, PromptTuningConfig(num_virtual_tokens=n, init="random"), name=name)
    delta.load_state_dict({"prompt.P": P})
    return delta


SPEC = registry.register(registry.MethodSpec(
    name="prompt_tuning", family="peft", config_cls=PromptTuningConfig, apply=apply, paper="prompt-tuning",
    summary="n learned input embeddings prepended to every sequence (Lester et al., EMNLP 2021)",
    mergeable=False,
))
