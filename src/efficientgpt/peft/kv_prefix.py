"""Virtual tokens through the KV cache: the machinery that prompt tuning and prefix tuning share.

Both methods put ``n`` *virtual tokens* in front of every sequence: prompt tuning (Lester et al.,
EMNLP 2021) as learned input embeddings, prefix tuning (Li & Liang, ACL 2021) as learned keys and
values in every layer. With causal attention a virtual token attends only to the virtual tokens before
it, never to the user's tokens, so its keys and values do not depend on the input. They can therefore
be handed to the model as a *pre-filled KV cache*, exactly as if the model had already read them:

* the user's tokens attend to them like to any cached past, and take positions ``n .. n+T-1``;
* the output logits (and ``labels``, and the loss) cover only the user's tokens: nothing to strip;
* generation works unchanged: the cache that comes back holds the virtual tokens, and each later
  decoding step reads them from there.

:class:`KVPrefixDelta` is a model-level forward pre-hook (:meth:`~efficientgpt.peft.core.Delta.hook_model`).
When the incoming cache holds no virtual tokens of this delta (the first call of a sequence: no cache,
or an empty one as ``generate`` passes) it fills one (:meth:`KVPrefixDelta.extend_cache`, per method)
and marks it with the delta's name and ``n``. On every call it prepends ``n`` ones to a given 2-D
``attention_mask`` and adds ``n`` to given ``position_ids`` (``generate`` passes both, counted over the
user's tokens only); models that derive positions from the cache length (Llama, GPT-2, GPT-NeoX) or from
the mask (OPT) then agree. A cache the caller did not ask for (``use_cache=False``) is dropped from the
output again by a forward hook, so ``generate(use_cache=False)`` does not mistake it for a past.

Per-layer virtual tokens. Every layer's cache must hold the same number of tokens: transformers builds
one attention mask per forward from one cache length, so a layer cannot simply hold fewer virtual tokens
than another. A delta whose virtual tokens should act only in some layers (prefix tuning with ``layers``)
therefore fills the other layers' slots with zeros and hides them there: :func:`hide_virtual_tokens`, a
pre-hook on those layers' attention modules, sets the slots' columns of the 4-D attention mask to
"masked" (``False`` in a boolean mask, the dtype's minimum in an additive one), so their softmax weight
is exactly zero and the layer computes what it would without them. The slots sit where
:func:`virtual_token_span` says: deltas append their tokens in the order they are marked on the cache.

Limits, raised as clear errors: the mask must be 2-D; a cache holding tokens read *without* this delta
is refused; gradient checkpointing in training is refused, because transformers' checkpointed decoder
layers drop the cache, and with it the virtual tokens; absolute-position families (GPT-2, OPT) must fit
``n`` plus the sequence in their position table.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicCache
from transformers.utils import ModelOutput

from efficientgpt.errors import ConfigError, UserError
from efficientgpt.models import arch
from efficientgpt.peft import core

#: Attribute on a ``Cache``: ``{delta name: n}`` for the deltas whose virtual tokens it holds.
MARK = "_efficientgpt_virtual_tokens"
#: Attribute on a ``Cache`` made only to carry virtual tokens through a call that asked for no cache.
TRANSIENT = "_efficientgpt_transient_cache"


def virtual_tokens(cache: Cache | None) -> dict[str, int]:
    """The virtual tokens ``cache`` holds, by delta name."""
    return dict(getattr(cache, MARK, {})) if cache is not None else {}


def virtual_token_span(cache: Cache | None, name: str) -> tuple[int, int] | None:
    """``(start, stop)`` of delta ``name``'s virtual tokens in ``cache``'s sequence axis, or ``None``."""
    start = 0
    for other, n in virtual_tokens(cache).items():  # insertion order is the order they were appended
        if other == name:
            return start, start + n
        start += n
    return None


#: The forward keyword under which each family's attention module receives the cache.
_CACHE_KWARGS = ("cache", "past_key_values", "layer_past")


def hide_virtual_tokens(kwargs: dict[str, Any], name: str, hidden: torch.Tensor, layer: int,
                        additive: bool) -> dict[str, Any]:
    """The attention module's keyword arguments with delta ``name``'s virtual tokens masked out.

    ``kwargs`` are those of a layer's attention module (``attention_mask``, and the cache under one of
    :data:`_CACHE_KWARGS`), ``hidden`` its input ``(B, q, d)`` and ``layer`` its decoder layer; ``additive``
    says which mask to make where the model passes none (eager attention adds a float mask, sdpa takes a
    boolean one). Returns ``kwargs`` unchanged when the cache holds no virtual tokens of ``name``.
    """
    cache = next((kwargs[k] for k in _CACHE_KWARGS if kwargs.get(k) is not None), None)
    span = virtual_token_span(cache, name)
    if span is None:
        return kwargs
    start, stop = span
    mask = kwargs.get("attention_mask")
    if mask is None:
        # No mask: the model relies on plain causal attention (sdpa's decoding step). Make it explicit, aligned
        # to the end of the keys: query i sees keys 0 .. past + i.
        q_len, past = hidden.shape[-2], cache.get_seq_length(layer)
        kv = past + q_len
        rows = torch.arange(q_len, device=hidden.device)[:, None]  # (q, 1)
        cols = torch.arange(kv, device=rows.device)[None, :]  # (1, kv)
        mask = (cols <= past + rows)[None, None]  # (1, 1, q, kv)
        if additive:
            mask = torch.zeros(mask.shape, dtype=hidden.dtype, device=hidden.device).masked_fill(
                ~mask, torch.finfo(hidden.dtype).min)
    elif not isinstance(mask, torch.Tensor) or mask.ndim != 4:
        raise UserError(f"per-layer virtual tokens need a 4-D attention mask (eager or sdpa attention); this model's "
                        f"attention got {type(mask).__name__}"
                        f"{'' if not isinstance(mask, torch.Tensor) else f' of shape {tuple(mask.shape)}'}")
    mask = mask.clone()  # the model shares one mask between its layers
    if mask.dtype == torch.bool:
        mask[..., start:stop] = False  # (B, 1, q, kv): True means "may attend"
    else:
        mask[..., start:stop] = torch.finfo(mask.dtype).min  # additive mask
    return {**kwargs, "attention_mask": mask}


def max_positions(model) -> int | None:
    """The model's context length (``max_position_embeddings``; GPT-2 maps ``n_positions`` to it)."""
    value = getattr(model.config, "max_position_embeddings", None)
    return int(value) if value else None


def check_context(model, n: int, cls_name: str) -> None:
    """Refuse ``n`` virtual tokens that leave no position for a real one."""
    limit = max_positions(model)
    if limit is not None and n >= limit:
        raise ConfigError(f"Prompt longer than the model's context: {cls_name}.num_virtual_tokens = {n}, but the "
                          f"model has {limit} positions; use fewer than {limit} virtual tokens")


def _absolute_positions(model) -> bool:
    """Learned position tables (GPT-2, OPT) fail on positions past their end; RoPE does not."""
    try:
        return "pos_embed" in arch.family_of(model).model_roles
    except UserError:
        return False


def _drop_transient_cache(module, args, output):
    """Forward hook: remove from the output a cache the caller did not ask for."""
    if isinstance(output, ModelOutput):
        keys = [k for k, v in output.items() if getattr(v, TRANSIENT, False)]
        if keys:
            return type(output)(**{k: v for k, v in output.items() if k not in keys})
    elif isinstance(output, tuple) and any(getattr(v, TRANSIENT, False) for v in output):
        return tuple(v for v in output if not getattr(v, TRANSIENT, False))
    return None


class KVPrefixDelta(core.Delta):
    """A delta whose ``config.num_virtual_tokens`` virtual tokens reach the model as a pre-filled cache.

    A subclass creates its tensors in :meth:`build` and implements :meth:`extend_cache`.
    """

    def build(self) -> None:
        raise NotImplementedError

    def extend_cache(self, cache: Cache | None, batch_size: int) -> Cache:
        """Append this delta's virtual tokens to ``cache`` (a new cache when ``None``), for every layer
        and ``batch_size`` rows; ``cache`` holds at most other deltas' virtual tokens."""
        raise NotImplementedError

    # ---- shared -----------------------------------------------------------------------------------
    @property
    def n(self) -> int:
        return self.config.num_virtual_tokens

    def attach(self) -> None:
        check_context(self.model, self.n, type(self.config).__name__)
        params = inspect.signature(self.model.forward).parameters
        # transformers >= 5 names the forward's cache ``cache``; older models and remote code say past_key_values
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        self._absolute = _absolute_positions(self.model)
        self._busy = False  # set while a subclass runs the model to compute its own virtual tokens
        self.build()
        self.hook_model(self._before_forward)
        self._add_hook(self.model, "forward", _drop_transient_cache)

    def new_cache(self) -> DynamicCache:
        """An empty cache laid out like the one the model would make itself."""
        return DynamicCache(config=self.model.config)

    def _before_forward(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        if self._busy:
            return kwargs
        kwargs = dict(kwargs)
        tokens = kwargs.get("input_ids")
        tokens = tokens if tokens is not None else kwargs.get("inputs_embeds")  # (B, T) or (B, T, e)
        if tokens is None:
            raise UserError(f"{self.method}: the model was called without input_ids or inputs_embeds")
        cache = kwargs.pop("cache", None)
        legacy = kwargs.pop("past_key_values", None)
        cache = cache if cache is not None else legacy
        if cache is not None and not isinstance(cache, Cache):
            raise UserError(f"{self.method}: the model was given a {type(cache).__name__} as its cache; "
                            "pass a transformers Cache object (e.g. DynamicCache) or none")
        if self.name not in virtual_tokens(cache):
            cache = self._start_sequence(cache, tokens.shape[0], kwargs.get("use_cache"))
        kwargs[self.cache_kw] = cache
        n = self.n
        mask = kwargs.get("attention_mask")
        if mask is not None:
            if mask.ndim != 2:
                raise UserError(f"{self.method} needs a 2-D attention_mask (batch, tokens) to prepend its virtual "
                                f"tokens to; got shape {tuple(mask.shape)}")
            kwargs["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], n), mask], dim=1)  # (B, n + T)
        positions = kwargs.get("position_ids")
        if positions is not None:  # counted over the user's tokens (generate's): the virtual ones come first
            kwargs["position_ids"] = positions + n
        limit = max_positions(self.model)
        if self._absolute and limit is not None and cache.get_seq_length() + tokens.shape[1] > limit:
            raise UserError(f"{tokens.shape[1]} tokens after {cache.get_seq_length()} cached ones (including "
                            f"{sum(virtual_tokens(cache).values())} virtual tokens) exceed the model's {limit} "
                            "positions")
        return kwargs

    def _start_sequence(self, cache: Cache | None, batch_size: int, use_cache: bool | None) -> Cache:
        """The first call of a sequence: a cache holding this delta's virtual tokens, marked as such."""
        others = sum(virtual_tokens(cache).values())
        past = cache.get_seq_length() if cache is not None else 0
        if past != others:
            raise UserError(f"{self.method} delta {self.name!r}: the cache passed to the model holds {past - others} "
                            "tokens read without this delta's virtual tokens (e.g. while it was disabled); start "
                            "from no cache (or an empty one)")
        if self.model.training and torch.is_grad_enabled() and getattr(self.model, "is_activation_checkpointing",
                                                                       False):
            raise UserError(f"{self.method} passes its virtual tokens through the KV cache, which transformers' "
                            "gradient checkpointing drops in training; turn gradient checkpointing off")
        wanted = use_cache if use_cache is not None else getattr(self.model.config, "use_cache", True)
        created = cache is None
        cache = self.extend_cache(cache, batch_size)
        setattr(cache, MARK, {**virtual_tokens(cache), self.name: self.n})
        if created and not wanted:
            setattr(cache, TRANSIENT, True)
        return cache
