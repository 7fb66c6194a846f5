"""ATTEMPT: attentional mixtures of soft prompts (Asai, Salehi, Peters & Hajishirzi, "ATTEMPT:
Parameter-Efficient Multi-task Tuning via Attentional Mixtures of Soft Prompts", EMNLP 2022).

Source prompts ``P_1 .. P_t`` (``n x e`` each) are first trained by prompt tuning on source tasks and
then frozen (paper §3.1). For a target task, a new target prompt ``P_target`` and a small attention
module ``G`` train; every instance ``X`` gets its own prompt (§3.2)::

    x̂        = max-pool_tokens(embed(X))                       (e,)     input key
    p̂_j      = max-pool_tokens(P_j),  j = 1 .. t+1               (e,)     prompt keys, P_{t+1} = P_target
    H_out    = LayerNorm(W_up · SiLU(W_down · x̂))               (e,)     W_down: r x e, W_up: e x r
    a_j      = exp(p̂_j · H_out / T) / Σ_k exp(p̂_k · H_out / T)          softmax over the t+1 candidates
    P_instance(X) = P_target + Σ_{j=1}^{t+1} a_j P_j             (n, e)

and the frozen LM reads ``[P_instance(X); X]``. Only ``P_target``, ``W_down``, ``W_up`` and the layer
norm's weight and bias train: ``k·n·e + 2·r·e + 2·e`` parameters for ``k`` target prompts.

Multi-task mode (§3.3, "ATTEMPT-m"): one attention module is shared by several target tasks trained
at once, each with its own target prompt; a row picks the target prompt of its task (the official
code's ``shared_attn`` with ``task_ids``). ``target_tasks`` names the tasks (``target`` stands for the
suite's target tasks); rows say their task through the model keyword ``task_ids`` (the training
batches of :meth:`AttemptDelta.training_objective` carry it), :meth:`AttemptDelta.use_task`, or, in
the pipeline's task evaluation, :meth:`AttemptDelta.bind_data`.

How it runs. As in prompt tuning (:mod:`efficientgpt.peft.prompt_tuning`), the prompt's keys and values
in every layer are computed by one base-model pass over the prompt and handed to the real call as a
pre-filled KV cache (:mod:`efficientgpt.peft.kv_prefix`). The prompt now differs per row, so the pass
runs on ``inputs_embeds = P_instance`` of shape ``(B, n, e)``: one batched pass, not one per row.

Source prompts come from saved ``prompt_tuning`` deltas (``source_prompts``), or are trained in the
same command (``train_sources`` steps per task of ``source_tasks``, by default the run's step count
on each of the suite's source tasks):
:meth:`AttemptDelta.training_objective`, which the pipeline calls before it trains the target,
trains one prompt per source task with the shared Trainer and freezes it. The source prompts are
part of the delta's tensors, so a saved delta reloads without the files or the training
(``num_sources`` records how many it holds).

What the instance ``X`` is. The paper's T5 encoder reads the input ``X`` and the decoder the answer; a
decoder-only model reads both in one sequence, and pooling over the answer would let the prompt, which
every position sees, carry the answer's tokens to the positions that predict them. Hence:

* training batches from :meth:`AttemptDelta.training_objective` pass ``instance_mask``: the prompt's
  tokens (attended, label -100), so ``x̂`` never sees the answer;
* otherwise ``X`` is every attended token of the call that starts the sequence (the prompt of
  ``generate``; the prompt and the option for rank classification, which scores both in one call);
* a model that re-reads a growing sequence without a cache (``generate(use_cache=False)``, the task
  suite's greedy decoding) keeps the instance it started from: outside training, a sequence-starting
  call whose rows each extend the previous such call's rows by at most one token reuses their ``x̂``.
  So cached and uncached generation agree. :meth:`AttemptDelta.forget_instances` drops the memory.

Departures from the paper and the official code (github.com/AkariAsai/ATTEMPT):

* decoder-only models instead of T5 (above); the max-pool skips padding, which the official code,
  padding to a fixed length, includes;
* ``T`` defaults to ``e · exp(1)``: the official configurations use ``temperature = 2087`` for T5-base
  (768 · e = 2087.7); the learned-temperature variant of the code is not implemented;
* ``W_down``/``W_up`` start from ``N(0, 0.01²)`` (the official T5 code's init of added linear layers),
  the layer norm from ones and zeros; ``target_init="source"`` starts each target prompt from the first
  source prompt, as the official training script does (``vocab``/``random``: prompt tuning's inits);
* the official multi-task configurations can also start from an attention module pre-trained on the
  source tasks; that pre-training is not implemented.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from transformers.cache_utils import Cache

from efficientgpt import registry
from efficientgpt.config import ConfigBase, field
from efficientgpt.errors import ConfigError, UserError
from efficientgpt.peft import core
from efficientgpt.peft.kv_prefix import MARK, KVPrefixDelta, virtual_tokens

TARGET_INITS = ("source", "vocab", "random")
#: Extra keyword arguments the model accepts while an ATTEMPT delta is attached (removed before the model sees them).
EXTRA_INPUTS = ("instance_mask", "task_ids")
_VOCAB_POOL = 5000  # prompt tuning's default pool for init=vocab


@dataclasses.dataclass
class AttemptConfig(ConfigBase):
    """ATTEMPT hyperparameters (Asai et al., 2022)."""

    num_virtual_tokens: int = field(20, "prompt length n, shared by the source and target prompts (the paper: 100)",
                                    minimum=1)
    source_prompts: list[str] | None = field(
        None, "saved prompt_tuning deltas (tune --method prompt_tuning --out DIR), one per source task, "
              "comma-separated; the same n and base model as this run")
    train_sources: int | None = field(
        None, "train the source prompts in this command: steps per task of source_tasks, before the target "
              "training (default, without source_prompts: the run's --steps; 0: never train them)",
        minimum=0)
    source_tasks: list[str] | None = field(
        None, "suite tasks that train_sources trains a prompt on, comma-separated (default: the suite's source "
              "tasks, 'efficientgpt tasks --role source')")
    source_lr: float | None = field(None, "learning rate of the source-prompt training (default: the run's --lr)",
                                    minimum=0.0, exclusive_minimum=True)
    target_tasks: list[str] | None = field(
        None, "multi-task mode (paper §3.3): one target prompt per named task and a shared attention module; "
              "'target' names the suite's target tasks (default: one target prompt)")
    attn_hidden: int = field(100, "width r of the attention module's down-projection W_down (official code: 100)",
                             minimum=1)
    attn_temperature: float | None = field(
        None, "softmax temperature T of the attention over prompts (default: e·exp(1), e the embedding width)",
        minimum=0.0, exclusive_minimum=True)
    target_init: str = field("source", "initialisation of the target prompt: source (a copy of the first source "
                                       "prompt, as the official code), vocab (embeddings of random tokens), "
                                       "random (uniform in ±init_range)", choices=TARGET_INITS)
    init_range: float = field(0.5, "half-width of the uniform range for target_init=random", minimum=0.0,
                              exclusive_minimum=True)
    num_sources: int | None = field(
        None, "source prompts held in the delta's own tensors (set when the delta is saved: a loaded delta "
              "needs neither the prompt files nor the source training)", minimum=1, cli=False)

    def validate(self) -> None:
        for name in ("source_prompts", "source_tasks", "target_tasks"):
            value = getattr(self, name)
            if isinstance(value, str):  # "a,b" from a config file or a caller
                setattr(self, name, [v.strip() for v in value.split(",") if v.strip()])
        super().validate()
        if self.num_sources is None:
            if not self.source_prompts and self.train_sources == 0:
                raise ConfigError("AttemptConfig has no source prompts: give source_prompts (saved prompt_tuning "
                                  "deltas) or let train_sources (steps per source task) train them in this run")
            if self.source_prompts and self.train_sources:
                raise ConfigError(f"AttemptConfig.source_prompts ({len(self.source_prompts)} files) and "
                                  f"train_sources = {self.train_sources} both give the source prompts; choose one")
            if self.source_tasks and (self.source_prompts or self.train_sources == 0):
                raise ConfigError("AttemptConfig.source_tasks is used only when the source prompts are trained in "
                                  "this run (with source_prompts, the files are the source prompts)")
        if self.trains_sources:
            self.source_tasks = _suite_names(self.source_tasks or ["source"], "source_tasks", suite_only=True)
        if self.target_tasks is not None:
            self.target_tasks = _suite_names(self.target_tasks, "target_tasks", suite_only=False)
            if not self.target_tasks:
                raise ConfigError("AttemptConfig.target_tasks is empty; name the target tasks or leave it unset")

    @property
    def trains_sources(self) -> bool:
        """Whether this run trains the source prompts (no files given, no saved ones held)."""
        return self.num_sources is None and not self.source_prompts and self.train_sources != 0

    def temperature_for(self, width: int) -> float:
        return self.attn_temperature if self.attn_temperature is not None else width * math.e


def _suite_names(names: list[str], what: str, suite_only: bool) -> list[str]:
    """``names`` with the suite's mixture names (source, target, all) expanded, in order, without repeats."""
    from efficientgpt.data import tasks as suite

    out: list[str] = []
    for name in names:
        if name in suite.MIXTURES:
            out.extend(t.name for t in suite.resolve(name))
        elif suite_only and name not in suite.TASKS:
            raise ConfigError(f"AttemptConfig.{what} names {name!r}, which is not a task of the suite; choose among "
                              f"{', '.join(suite.TASKS)} (or source, target, all)")
        else:
            out.append(name)
    return list(dict.fromkeys(out))


class SourcePrompts(nn.Module):
    """The frozen source prompts ``P_1 .. P_t`` (t, n, e): a buffer, so no optimizer ever sees them."""

    def __init__(self, P: torch.Tensor):
        super().__init__()
        self.register_buffer("P", P)


class TargetPrompts(nn.Module):
    """The target prompts ``P_target`` (k, n, e): one per target task (k = 1 outside multi-task mode)."""

    def __init__(self, P: torch.Tensor):
        super().__init__()
        self.P = nn.Parameter(P)


class PromptAttention(nn.Module):
    """The attention module G of §3.2: ``H_out = LayerNorm(W_up SiLU(W_down x̂))``."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.W_down = nn.Linear(width, hidden, bias=False)
        self.W_up = nn.Linear(hidden, width, bias=False)
        self.layer_norm = nn.LayerNorm(width)
        nn.init.normal_(self.W_down.weight, std=0.01)
        nn.init.normal_(self.W_up.weight, std=0.01)

    def forward(self, x_hat: torch.Tensor) -> torch.Tensor:  # (B, e) -> (B, e)
        return self.layer_norm(self.W_up(F.silu(self.W_down(x_hat))))


@dataclasses.dataclass
class _Instances:
    """The instance tokens of the last sequence started outside training, and their pooled input key."""

    rows: list[torch.Tensor]
    x_hat: torch.Tensor  # (B, e)


class AttemptDelta(KVPrefixDelta):
    method = "attempt"
    mergeable = False

    # ---- construction ---------------------------------------------------------------------------------
    def build(self) -> None:
        cfg: AttemptConfig = self.config
        E = self.model.get_input_embeddings().weight  # (V, e)
        n, e = self.n, E.shape[1]
        with torch.no_grad():
            if cfg.num_sources is not None:  # a saved delta: its tensors bring the source prompts
                P_src = torch.stack([_vocab_prompt(E, n) for _ in range(cfg.num_sources)])
                self._sources_ready = True
            elif cfg.source_prompts:
                P_src = torch.stack([_read_source_prompt(self.model, path, i, n, e)
                                     for i, path in enumerate(cfg.source_prompts)]).to(E.device, E.dtype)
                self._sources_ready = True
            else:  # trained by training_objective; until then, prompt tuning's starting point
                P_src = torch.stack([_vocab_prompt(E, n) for _ in cfg.source_tasks])
                self._sources_ready = False
            k = len(cfg.target_tasks) if cfg.target_tasks else 1
            if cfg.target_init == "source":
                P_tgt = P_src[:1].repeat(k, 1, 1)
            elif cfg.target_init == "vocab":
                P_tgt = torch.stack([_vocab_prompt(E, n) for _ in range(k)])
            else:
                P_tgt = torch.empty(k, n, e, dtype=E.dtype, device=E.device).uniform_(-cfg.init_range, cfg.init_range)
        self.modules["sources"] = SourcePrompts(P_src.detach().clone())  # (t, n, e)
        self.modules["target"] = TargetPrompts(P_tgt.detach().clone())  # (k, n, e)
        self.modules["attention"] = PromptAttention(e, cfg.attn_hidden).to(dtype=E.dtype)
        self.temperature = cfg.temperature_for(e)
        params = inspect.signature(self.model.forward).parameters
        # the prompt's own logits are never read: compute only the last one
        self._inner_kwargs = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        self._pending: torch.Tensor | None = None
        self._instances: _Instances | None = None
        self.task: str | None = None

    @property
    def source_prompts(self) -> torch.Tensor:  # (t, n, e)
        return self.modules["sources"].P

    @property
    def target_prompts(self) -> torch.Tensor:  # (k, n, e)
        return self.modules["target"].P

    @property
    def task_names(self) -> list[str]:
        return list(self.config.target_tasks or [])

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        super().load_state_dict(state)
        self._sources_ready = True

    def prepare_for_saving(self) -> None:
        # The tensors hold the source prompts: a loaded delta needs neither the files nor the training.
        self.config = dataclasses.replace(self.config, num_sources=int(self.source_prompts.shape[0]))

    # ---- the mixture (§3.2) -------------------------------------------------------------------------
    def input_key(self, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                  attention_mask: torch.Tensor | None = None,
                  instance_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x̂``: the max-pool of the instance's token embeddings, ``(B, e)``.

        The instance is ``instance_mask``'s tokens if given, else the attended tokens (``attention_mask``).
        """
        X = inputs_embeds if inputs_embeds is not None else self.model.get_input_embeddings()(input_ids)  # (B, T, e)
        keep = _instance_tokens(X.shape[:2], X.device, attention_mask, instance_mask)  # (B, T)
        empty = (~keep).all(dim=1)
        if empty.any():
            raise UserError(f"{self.method}: row {int(empty.nonzero()[0, 0])} has no instance tokens to pool (its "
                            "instance_mask / attention_mask is all zeros)")
        return X.masked_fill(~keep[..., None], float("-inf")).amax(dim=1)  # (B, e)

    def mixture(self, x_hat: torch.Tensor, task_ids: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(a, P_instance)`` for input keys ``x_hat`` (B, e): the attention weights over the candidates
        ``[P_1 .. P_t, P_target]`` (B, t+1) and the instance prompts (B, n, e)."""
        B = x_hat.shape[0]
        tids = self._task_rows(B, x_hat.device, task_ids)  # (B,)
        P_tgt = self.target_prompts[tids]  # (B, n, e)
        P_src = self.source_prompts.to(P_tgt.dtype)  # (t, n, e)
        candidates = torch.cat([P_src[None].expand(B, -1, -1, -1), P_tgt[:, None]], dim=1)  # (B, t+1, n, e)
        keys = candidates.amax(dim=2)  # (B, t+1, e): p̂_j, max-pooled over the prompt's tokens
        H_out = self.modules["attention"](x_hat.to(P_tgt.dtype))  # (B, e)
        scores = torch.einsum("bje,be->bj", keys, H_out) / self.temperature  # (B, t+1)
        a = scores.softmax(dim=-1)  # (B, t+1)
        return a, P_tgt + torch.einsum("bj,bjne->bne", a, candidates)  # (B, n, e)

    def instance_prompts(self, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                         attention_mask: torch.Tensor | None = None, instance_mask: torch.Tensor | None = None,
                         task_ids: torch.Tensor | int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(a, P_instance)`` for a batch of inputs (see :meth:`input_key` and :meth:`mixture`)."""
        return self.mixture(self.input_key(input_ids, inputs_embeds, attention_mask, instance_mask), task_ids)

    def _task_rows(self, batch: int, device: torch.device, task_ids) -> torch.Tensor:
        """Each row's target prompt index ``(B,)``: from ``task_ids``, else :attr:`task`."""
        k = self.target_prompts.shape[0]
        if task_ids is None and self.task is not None:
            task_ids = self.task_index(self.task)
        if task_ids is None:
            if k > 1:
                raise UserError(f"{self.method} delta {self.name!r} has one target prompt per task "
                                f"({', '.join(self.task_names)}); say each row's task: pass task_ids=... to the "
                                "model, use delta.use_task(NAME), or delta.bind_data(task_source) for evaluation")
            return torch.zeros(batch, dtype=torch.long, device=device)
        tids = torch.as_tensor(task_ids, dtype=torch.long, device=device).reshape(-1)
        if tids.numel() == 1:
            tids = tids.expand(batch)
        if tids.numel() != batch:
            raise UserError(f"{self.method}: task_ids has {tids.numel()} entries for {batch} rows")
        if tids.numel() and (tids.min() < 0 or tids.max() >= k):
            raise UserError(f"{self.method}: task_ids must lie in 0..{k - 1} (the target tasks "
                            f"{', '.join(self.task_names) or '(one)'}); got {tids.tolist()}")
        return tids

    def task_index(self, name: str) -> int:
        names = self.task_names
        if name not in names:
            raise UserError(f"{self.method} delta {self.name!r} has no target prompt for task {name!r}; its tasks: "
                            f"{', '.join(names) or 'none (a single target prompt)'}")
        return names.index(name)

    @contextlib.contextmanager
    def use_task(self, name: str | None) -> Iterator[None]:
        """Rows without ``task_ids`` use the target prompt of task ``name`` inside the block."""
        if name is not None:
            self.task_index(name)
        previous, self.task = self.task, name
        try:
            yield
        finally:
            self.task = previous

    def forget_instances(self) -> None:
        """Drop the remembered instance (see the module docstring): the next call starts afresh."""
        self._instances = None

    # ---- the model hook ---------------------------------------------------------------------------------
    def _before_forward(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        if self._busy:
            return kwargs
        kwargs = dict(kwargs)
        instance_mask = kwargs.pop("instance_mask", None)
        task_ids = kwargs.pop("task_ids", None)
        cache = kwargs.get("cache")
        cache = cache if cache is not None else kwargs.get("past_key_values")
        if self.name not in virtual_tokens(cache if isinstance(cache, Cache) else None):  # a sequence starts
            x_hat = self._sequence_key(kwargs, instance_mask)
            self._pending = self.mixture(x_hat, task_ids)[1]  # (B, n, e)
        try:
            return super()._before_forward(kwargs)
        finally:
            self._pending = None

    def _sequence_key(self, kwargs: dict[str, Any], instance_mask: torch.Tensor | None) -> torch.Tensor:
        ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
        if ids is None and embeds is None:
            raise UserError(f"{self.method}: the model was called without input_ids or inputs_embeds")
        mask = kwargs.get("attention_mask")
        mask = mask if isinstance(mask, torch.Tensor) and mask.ndim == 2 else None  # other shapes: refused later
        x_hat = self.input_key(ids, embeds, mask, instance_mask)
        if instance_mask is not None or ids is None or (self.model.training and torch.is_grad_enabled()):
            return x_hat
        keep = _instance_tokens(ids.shape, ids.device, mask, None)
        rows = [ids[b][keep[b]] for b in range(ids.shape[0])]
        last = self._instances
        if last is not None and len(last.rows) == len(rows) and all(
                0 <= len(r) - len(o) <= 1 and torch.equal(r[: len(o)], o) for r, o in zip(rows, last.rows)):
            last.rows = rows  # the same sequences, re-read with their next token: keep their instance
            return last.x_hat.to(x_hat.dtype)
        self._instances = _Instances(rows, x_hat.detach())
        return x_hat

    def extend_cache(self, cache: Cache | None, batch_size: int) -> Cache:
        P = self._pending  # (B, n, e)
        if P is None or P.shape[0] != batch_size:
            raise UserError(f"{self.method}: no instance prompts for this call of {batch_size} rows")
        past = cache.get_seq_length() if cache is not None else 0
        inner = self.new_cache()
        if past:  # other deltas' virtual tokens, already one row per instance
            for i, layer in enumerate(cache.layers):
                inner.update(layer.keys, layer.values, i)
            setattr(inner, MARK, virtual_tokens(cache))
        self._busy = True  # this delta's own hook must not act on the prompt's pass
        try:
            self.model(inputs_embeds=P, use_cache=True, **{self.cache_kw: inner},
                       **self._inner_kwargs)  # fills inner with [past | P_instance]: (B, kvh, past + n, hd) per layer
        finally:
            self._busy = False
        cache = cache if cache is not None else self.new_cache()
        for i, layer in enumerate(inner.layers):
            cache.update(layer.keys[:, :, past:], layer.values[:, :, past:], i)  # (B, kvh, new, hd)
        setattr(cache, MARK, virtual_tokens(inner))
        return cache

    # ---- training: source prompts, then the target ---------------------------------------------------
    def training_objective(self, source, train_config, rank: int = 0, world: int = 1):
        """``(train_batches, loss_fn)`` for the Trainer on the task data ``source``.

        Called by :func:`efficientgpt.pipeline.tune` before it trains the target. Trains the source
        prompts first when the config asks for it (``train_sources``); the batches carry
        ``instance_mask`` (each row's prompt tokens: ``x̂`` never sees the answer) and, in multi-task
        mode, ``task_ids`` (each row's target task).
        """
        from efficientgpt.train.losses import causal_lm_loss

        if not hasattr(source, "train_indices"):
            raise UserError(f"{self.method} trains on task data (task:NAME, see 'efficientgpt tasks'): its prompts "
                            "mix per instance, and plain text has no instance input apart from its targets; got "
                            f"{getattr(source, 'spec', source)!r}")
        if not self._sources_ready:
            self.train_source_prompts(source.tokenizer, train_config, rank, world)
        lookup = None
        if len(self.task_names) > 1:
            unknown = [t for t in source.task_names if t not in self.task_names]
            if unknown:
                raise UserError(f"{self.method}: the data has task(s) {', '.join(unknown)} without a target prompt; "
                                f"target_tasks: {', '.join(self.task_names)}")
            lookup = {t: self.task_index(t) for t in source.task_names}
            self.bind_data(source)
        elif len(self.task_names) == 1 and source.task_names != self.task_names:
            raise UserError(f"{self.method}: target_tasks is {self.task_names[0]!r} but the data holds "
                            f"{', '.join(source.task_names)}")
        batches = source.train_batches(train_config, rank, world)

        def batch(step: int) -> dict[str, torch.Tensor]:
            b = dict(batches(step))
            mask = b.get("attention_mask", torch.ones_like(b["input_ids"])).bool()
            b["instance_mask"] = mask & (b["labels"] == -100)  # (B, T): the prompt, not the answer or padding
            if lookup is not None:
                idx = source.train_indices(step, train_config.batch_size, train_config.seed)[rank::world]
                b["task_ids"] = torch.tensor([lookup[source.train[i].task] for i in idx], dtype=torch.long)
            return b

        return batch, causal_lm_loss

    def train_source_prompts(self, tokenizer, train_config, rank: int = 0, world: int = 1) -> None:
        """Train one prompt per task of ``source_tasks`` (``train_sources`` steps each) and freeze it.

        Each runs as an ordinary ``prompt_tuning`` delta with the shared Trainer while this delta is
        inactive; its prompt is then copied into this delta's source prompts (paper §3.1).
        """
        from efficientgpt.data.tasks import TaskSource
        from efficientgpt.peft import prompt_tuning
        from efficientgpt.train.trainer import Trainer

        cfg: AttemptConfig = self.config
        steps = cfg.train_sources if cfg.train_sources is not None else train_config.steps
        source_cfg = dataclasses.replace(train_config, steps=steps, lr=cfg.source_lr or train_config.lr,
                                         warmup_steps=min(train_config.warmup_steps, steps // 10),
                                         eval_every=0, save_every=0)
        active = [n for n, d in core.deltas(self.model).items() if d.active]
        for j, task in enumerate(cfg.source_tasks):
            data = TaskSource(f"task:{task}", tokenizer)
            torch.manual_seed(train_config.seed + 1000 * (j + 1))
            prompt = prompt_tuning.apply(self.model, prompt_tuning.PromptTuningConfig(num_virtual_tokens=self.n),
                                         name=f"{self.name}__source__{task}")
            try:
                core.set_active(self.model, [prompt.name])
                Trainer(self.model, source_cfg, data.train_batches(source_cfg, rank, world)).train()
                with torch.no_grad():
                    self.source_prompts[j].copy_(prompt.prompt)
            finally:
                core.remove(self.model, prompt.name)
                core.set_active(self.model, active)
        if cfg.target_init == "source":
            with torch.no_grad():
                self.target_prompts.copy_(self.source_prompts[:1].expand_as(self.target_prompts))
        self._sources_ready = True

    def bind_data(self, source) -> None:
        """Let a task data source's evaluation say which target task it scores (multi-task mode).

        Wraps the source's per-task scoring so that each task is scored with its own target prompt;
        tasks without one raise the error of :meth:`_task_rows`.
        """
        score = getattr(source, "_score", None)
        if score is None or getattr(score, "_attempt_bound", None) is self or len(self.task_names) < 2:
            return

        def scored(model, task, *args, **kwargs):
            with self.use_task(task.name if task.name in self.task_names else None):
                return score(model, task, *args, **kwargs)

        scored._attempt_bound = self
        source._score = scored


def _instance_tokens(shape, device, attention_mask: torch.Tensor | None,
                     instance_mask: torch.Tensor | None) -> torch.Tensor:
    """Which tokens form each row's instance ``(B, T)`` bool."""
    mask = instance_mask if instance_mask is not None else attention_mask
    if mask is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    if tuple(mask.shape) != tuple(shape):
        raise UserError(f"attempt: a mask of shape {tuple(mask.shape)} for inputs of shape {tuple(shape)}")
    return mask.to(device=device).bool()


def _vocab_prompt(E: torch.Tensor, n: int) -> torch.Tensor:
    """Prompt tuning's default start: embeddings of distinct random tokens among the first ids (n, e)."""
    pool = min(E.shape[0], _VOCAB_POOL)
    ids = torch.randperm(pool)[:n] if n <= pool else torch.randint(pool, (n,))
    return E[ids.to(E.device)].detach().clone()


def _read_source_prompt(model, path: str, i: int, n: int, e: int) -> torch.Tensor:
    """The soft prompt (n, e) of the saved prompt_tuning delta at ``path``."""
    where = f"AttemptConfig.source_prompts[{i}] = {path!r}"
    if not Path(path).is_dir():
        raise ConfigError(f"{where} is not a directory; give the --out directory of 'efficientgpt tune --method "
                          "prompt_tuning'")
    meta = core.read_delta_config(path)
    if meta.get("method") != "prompt_tuning":
        raise ConfigError(f"{where} holds a {meta.get('method')!r} delta; source prompts are prompt_tuning deltas")
    diffs = core._fingerprint_diff(meta.get("base", {}), core.base_fingerprint(model))
    if diffs:
        raise ConfigError(f"{where} was trained on another base model:\n  " + "\n  ".join(diffs))
    P = load_file(Path(path) / core.DELTA_FILE).get("prompt.P")
    if P is None or P.ndim != 2:
        raise ConfigError(f"{where} has no soft prompt tensor 'prompt.P' of shape (n, e)")
    if P.shape[1] != e:
        raise ConfigError(f"{where} has prompts of width {P.shape[1]}, but this model's embeddings are {e} wide")
    if P.shape[0] != n:
        raise ConfigError(f"{where} has {P.shape[0]} virtual tokens, but AttemptConfig.num_virtual_tokens = {n}: "
                          "every source prompt and the target prompt share one length")
    return P


def apply(model, config: AttemptConfig, name: str = "default") -> AttemptDelta:
    return core.apply(model, AttemptDelta, config, name)


SPEC = registry.register(registry.MethodSpec(
    name="attempt", family="peft", config_cls=AttemptConfig, apply=apply, paper="attempt",
    summary="per-instance attention-weighted mixture of frozen source prompts and a target prompt "
            "(Asai et al., EMNLP 2022)",
    mergeable=False, task_data=True,
))
