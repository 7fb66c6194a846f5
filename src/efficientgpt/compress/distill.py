"""Knowledge distillation: a small student learns to match a frozen teacher, through the shared Trainer.

**Objectives** (``DistillConfig.loss``). ``p_T`` and ``p_S`` are the teacher's and the student's
next-token distributions at one position, ``p^τ = softmax(z / τ)`` at temperature ``τ``. Every
objective is a per-token quantity summed over the positions the labels score (``labels != -100``),
so it fits the Trainer's ``(sum, count)`` contract; the distillation term is mixed with the
next-token cross-entropy ``CE`` by a weight ``α``::

    loss = α · τ² · D(p_T^τ, p_S^τ) + (1 − α) · CE(y, p_S)

* ``fkl``: forward KL, ``D = KL(p_T^τ ‖ p_S^τ)`` (Hinton, Vinyals & Dean, "Distilling the Knowledge in a
  Neural Network", arXiv 2015, §2). The ``τ²`` factor keeps the soft term's gradient, which scales as
  ``1/τ²``, comparable to the hard term's as ``τ`` changes (§2, last paragraph); the α-mix with the LM
  loss is DistilBERT's (Sanh et al., 2019, §2) and DistilGPT-2's. The default ``α = 0.9`` follows
  Hinton et al.'s finding that a considerably lower weight on the hard targets works best (§2); the
  default ``τ = 1`` is the LLM papers' (MiniLLM, DistiLLM, GKD), Hinton et al. raise it for small data.
* ``rkl``: reverse KL, ``D = KL(p_S^τ ‖ p_T^τ)``, the mode-seeking direction MiniLLM argues for (Gu,
  Dong, Wei & Huang, ICLR 2024, §2.1).
* ``skl``: skew forward KL of DistiLLM (Ko, Kim, Chen & Yun, ICML 2024, §3.1):
  ``D = KL(p_T ‖ λ p_T + (1 − λ) p_S)``; ``λ = 0`` is ``fkl``, ``λ = 1`` is identically 0.
* ``srkl``: skew reverse KL (same section): ``D = KL(p_S ‖ λ p_S + (1 − λ) p_T)``; ``λ = 0`` is
  ``rkl``, ``λ = 1`` is 0. DistiLLM's default ``λ = 0.1`` is ours.
* ``hidden``: ``D`` = the mean squared error between the output of each matched student block and of
  its teacher block, ``‖W h_S − h_T‖² / d_T`` averaged over the matched pairs, where ``W`` is a learned
  linear map ``d_S → d_T`` when the widths differ (TinyBERT, Jiao et al., Findings of EMNLP 2020, §3.1
  Eq. 8: one ``W_h`` shared by all layers) and the identity otherwise. ``τ`` does not apply.
* ``attn_out``: the same on the output of each matched block's attention module (before the residual
  addition).

Layer matching for ``hidden``/``attn_out`` (``layer_map``): a student made by layer dropping matches
each kept layer to the teacher layer it was copied from; any other student maps student layer ``j`` of
``L_S`` to teacher layer ``round((j + 1) · L_T / L_S) − 1``, the last layer of each of ``L_S`` equal
chunks. For the first ``L_S − 1`` student layers this is Patient-KD's "skip" mapping (Sun et al., EMNLP
2019, §3.2: teacher layers 2, 4, ..., 10 of 12 for a 6-layer student); the last student layer is matched
to the last teacher layer, which Patient-KD covers through its prediction loss instead.

**On-policy batches** (GKD, Agarwal et al., "On-Policy Distillation of Language Models: Learning from
Self-Generated Mistakes", ICLR 2024, Algorithm 1): with ``on_policy = λ`` a step's batch is, with
probability ``λ``, made of the student's own continuations: each window's first ``prompt_tokens``
tokens are a prompt, the student samples the rest (temperature ``gen_temperature``), and the divergence
is computed on the sampled tokens only (the prompt's labels are -100). Which steps are on-policy and
every sampled token are pure functions of ``(seed, step, row)``: each row of the global batch draws its
uniforms from its own generator, so a resumed run and a distributed run sample exactly what an
uninterrupted single-process run samples. CE needs ground truth, so on-policy rows carry the
distillation term only.

**Students** (:func:`build_student`): ``drop-layers:k`` keeps every ``k``-th decoder layer counting
down from the last (layers ``i`` with ``(L − 1 − i) mod k = 0``, so the last layer, which feeds the
final norm and LM head, is always kept; ``⌈L/k⌉`` layers), ``keep-layers:i,j,...`` keeps the listed
layers; both copy the teacher's embeddings, kept blocks, final norm and head into a model built from
the teacher's config with the layer count rewritten. ``width:r`` removes the fraction ``r`` of
attention-head groups and MLP channels with the library's structured pruning (LLM-Pruner's Taylor
importance on 16 training windows; :mod:`efficientgpt.compress.structured`), so the config shrinks and
the student starts from the teacher's surviving weights. Any other spec is loaded as a model; its
tokenizer and vocabulary must be the teacher's.

**Teacher.** The teacher runs in eval mode under ``torch.no_grad`` (not ``inference_mode``: inference
tensors cannot be saved for the student's backward). With ``cache_teacher`` its logits for data step
``s`` are stored in ``$EFFICIENTGPT_CACHE/teacher-logits/<key>/step-<s>-rank<r>.safetensors`` (the key
hashes the teacher's weights, the data, the batch shape, the seed and ``teacher_topk``) and read back
on later epochs (``epoch_steps``) and later runs. ``teacher_topk = k > 0`` stores the ``k`` largest
logits, their indices and the log-partition ``log Σ exp z``; the other ``V − k`` logits are rebuilt
equal, carrying the remaining probability mass, so at ``τ = 1`` the top-k probabilities and the
tail's total are exact. Full caching reproduces the recomputed loss bit for bit.

Departures: DistiLLM's code computes the skew forward KL as the cross-entropy ``−Σ p_T log m``, which
differs from the KL by the teacher's entropy (a constant for the student); here it is the KL itself, so
a model matched with itself scores 0 (its skew reverse KL is the KL already). All four logit
divergences use the tempered ``p^τ``; the LLM papers use ``τ = 1``. MiniLLM optimises the sequence-level reverse KL with a policy gradient over sampled
responses; ``rkl`` is its token-level, full-vocabulary form on the data (and, with ``on_policy``, on
student samples, which is GKD's reverse-KL variant). DistiLLM's adaptive off-policy replay buffer is
not implemented; on-policy batches are regenerated each time. Training runs on one process or under DDP
(``torchrun``); FSDP is refused, since the teacher runs whole on every process and on-policy sampling
calls the student outside the training forward.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from efficientgpt.config import ConfigBase, field
from efficientgpt.errors import ConfigError, UserError
from efficientgpt.models import arch
from efficientgpt.train.losses import IGNORE_INDEX

LOGIT_LOSSES = ("fkl", "rkl", "skl", "srkl")
STATE_LOSSES = ("hidden", "attn_out")
LOSSES = LOGIT_LOSSES + STATE_LOSSES
#: Which module's output each state-matching loss compares.
STATE_ROLE = {"hidden": "block", "attn_out": "attn"}

Batch = dict[str, torch.Tensor]


@dataclasses.dataclass
class DistillConfig(ConfigBase):
    """Knowledge-distillation objective and schedule (see the module docstring for the equations)."""

    loss: str = field("fkl", "distillation objective: fkl (forward KL), rkl (reverse KL), skl / srkl (DistiLLM "
                             "skew forward / reverse KL), hidden (block outputs, MSE), attn_out (attention "
                             "outputs, MSE)", choices=LOSSES)
    temperature: float = field(1.0, "softmax temperature τ of both models in the logit divergences (scaled by "
                                    "τ²)", minimum=0.0, exclusive_minimum=True)
    alpha: float = field(0.9, "weight α of the distillation term; the LM cross-entropy gets 1 - α",
                         minimum=0.0, maximum=1.0)
    skew: float = field(0.1, "skew λ of skl / srkl: KL(p ‖ λ p + (1 - λ) q)", minimum=0.0, maximum=1.0)
    layer_map: list[str] | None = field(None, "student:teacher layer pairs matched by hidden / attn_out, e.g. "
                                              "0:1,1:3 (default: the layers a dropped-layer student was copied "
                                              "from, else evenly spaced ending on the last)")
    on_policy: float = field(0.0, "fraction of steps whose batch is the student's own samples (GKD)",
                             minimum=0.0, maximum=1.0)
    prompt_tokens: int = field(0, "prompt length of on-policy batches; the student samples the rest of the "
                                  "window (0: half the window)", minimum=0)
    gen_temperature: float = field(1.0, "sampling temperature of on-policy generations", minimum=0.0,
                                   exclusive_minimum=True)
    cache_teacher: bool = field(False, "cache the teacher's logits per data step on disk and reuse them "
                                       "(logit losses, off-policy batches)")
    teacher_topk: int = field(0, "with cache_teacher: store only the k largest teacher logits per token "
                                 "(0: all of them)", minimum=0)
    epoch_steps: int = field(0, "repeat the batches of the first N data steps in epochs of N steps (0: new "
                                "windows every step)", minimum=0)

    def validate(self) -> None:
        super().validate()
        pairs = parse_layer_map(self.layer_map) if self.layer_map else None
        if pairs is not None and self.loss not in STATE_LOSSES:
            raise ConfigError(f"DistillConfig.layer_map applies to the losses {', '.join(STATE_LOSSES)}, "
                              f"not {self.loss!r}")
        if self.cache_teacher and self.loss not in LOGIT_LOSSES:
            raise ConfigError(f"DistillConfig.cache_teacher caches logits, so it needs a logit loss "
                              f"({', '.join(LOGIT_LOSSES)}), not {self.loss!r}")
        if self.teacher_topk and not self.cache_teacher:
            raise ConfigError("DistillConfig.teacher_topk applies to the teacher cache; set cache_teacher "
                              "(--cache-teacher) or leave teacher_topk at 0")


def parse_layer_map(items: list[str] | str) -> list[tuple[int, int]]:
    """``["0:1", "1:3"]`` (or ``"0:1,1:3"``) -> ``[(0, 1), (1, 3)]``; a bad item is a ConfigError."""
    if isinstance(items, str):
        items = [x for x in items.split(",") if x.strip()]
    pairs = []
    for item in items:
        parts = str(item).split(":")
        try:
            s, t = (int(p) for p in parts)
        except ValueError:
            raise ConfigError(f"DistillConfig.layer_map item {item!r} is not STUDENT:TEACHER with two layer "
                              "indices, e.g. 0:1") from None
        if s < 0 or t < 0:
            raise ConfigError(f"DistillConfig.layer_map item {item!r} has a negative layer index")
        pairs.append((s, t))
    if len({s for s, _ in pairs}) != len(pairs):
        raise ConfigError(f"DistillConfig.layer_map {','.join(map(str, items))} matches a student layer twice")
    return pairs


# ---- divergences ----------------------------------------------------------------------------------
def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """``Σ_v p (log p − log q)`` over the last axis; terms with ``p = 0`` are 0 (also where ``log q = −∞``)."""
    p = log_p.exp()
    terms = torch.where(p > 0, p * (log_p - log_q), torch.zeros((), dtype=p.dtype, device=p.device))
    return terms.sum(-1)


def _log_mix(lam: float, log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """``log(λ a + (1 − λ) b)`` from log-probabilities, stable for λ in [0, 1] (log 0 = −∞ drops a term)."""
    if lam <= 0.0:
        return log_b
    if lam >= 1.0:
        return log_a
    return torch.logaddexp(log_a + math.log(lam), log_b + math.log1p(-lam))


def token_divergence(kind: str, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                     temperature: float = 1.0, skew: float = 0.1) -> torch.Tensor:
    """Per-position divergence ``D(p_T^τ, p_S^τ)`` of logits ``(..., V)`` -> ``(...)`` (not scaled by τ²).

    ``fkl``: KL(p_T ‖ p_S); ``rkl``: KL(p_S ‖ p_T); ``skl``: KL(p_T ‖ λ p_T + (1−λ) p_S);
    ``srkl``: KL(p_S ‖ λ p_S + (1−λ) p_T), with ``λ = skew``. Computed in float32 at least.
    """
    if kind not in LOGIT_LOSSES:
        raise UserError(f"unknown logit divergence {kind!r}; choose one of {', '.join(LOGIT_LOSSES)}")
    if student_logits.shape != teacher_logits.shape:
        raise UserError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                        f"{tuple(teacher_logits.shape)} differ in shape")
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    log_s = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)  # (..., V)
    log_t = F.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)  # (..., V)
    if kind == "fkl":
        return _kl(log_t, log_s)
    if kind == "rkl":
        return _kl(log_s, log_t)
    if kind == "skl":
        return _kl(log_t, _log_mix(skew, log_t, log_s))
    return _kl(log_s, _log_mix(skew, log_s, log_t))


# ---- capturing block and attention outputs --------------------------------------------------------
@contextmanager
def capture(model: nn.Module, layers: list[int], role: str) -> Iterator[dict[int, torch.Tensor]]:
    """Collect the output ``(B, T, d)`` of ``role`` (``block`` or ``attn``) in each of ``layers``."""
    found: dict[int, torch.Tensor] = {}
    handles = []
    for i in layers:
        module = arch.block_module(model, i, role)

        def hook(_m, _inputs, output, i=i):
            found[i] = output[0] if isinstance(output, (tuple, list)) else output

        handles.append(module.register_forward_hook(hook))
    try:
        yield found
    finally:
        for h in handles:
            h.remove()


# ---- students ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class Student:
    """A student model and where it came from."""

    model: nn.Module
    tokenizer: Any
    spec: str
    kind: str
    """``drop-layers``, ``keep-layers``, ``width`` or ``model``."""
    source_layers: list[int] | None = None
    """For a layer-dropped student: the teacher layer each student layer was copied from."""
    notes: list[str] = dataclasses.field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        cfg = self.model.config
        return {"spec": self.spec, "kind": self.kind, "model_type": cfg.model_type,
                "parameters": sum(p.numel() for p in self.model.parameters()),
                "layers": arch.num_layers(self.model), "hidden_size": hidden_size(self.model),
                "source_layers": self.source_layers, "notes": self.notes}


def hidden_size(model: nn.Module) -> int:
    cfg = model.config
    return int(getattr(cfg, "hidden_size", None) or cfg.n_embd)


def dropped_layers(n_layers: int, k: int) -> list[int]:
    """The layers ``drop-layers:k`` keeps: ``i`` with ``(n − 1 − i) mod k = 0`` (the last one always)."""
    return [i for i in range(n_layers) if (n_layers - 1 - i) % k == 0]


def keep_layers(teacher: nn.Module, layers: list[int]) -> nn.Module:
    """A model of the teacher's config with only ``layers`` (in order), initialised from the teacher."""
    from transformers import AutoModelForCausalLM

    n = arch.num_layers(teacher)
    bad = [i for i in layers if not 0 <= i < n]
    if bad or not layers:
        raise UserError(f"layers {layers} are not a non-empty list of the teacher's layers 0..{n - 1}")
    if sorted(set(layers)) != list(layers):
        raise UserError(f"layers {layers} must be increasing and distinct (a block's position is its order)")
    cfg = copy.deepcopy(teacher.config)
    cfg.num_hidden_layers = len(layers)  # GPT-2's attribute_map routes this to n_layer
    if getattr(cfg, "layer_types", None) is not None:  # per-layer attention kinds (Qwen2 sliding windows)
        cfg.layer_types = [cfg.layer_types[i] for i in layers]
    prefix = arch.family_of(teacher).blocks + "."
    renumber = {old: new for new, old in enumerate(layers)}
    state = {}
    for name, tensor in teacher.state_dict().items():
        if name.startswith(prefix):
            old, rest = name[len(prefix):].split(".", 1)
            if int(old) not in renumber:
                continue
            name = f"{prefix}{renumber[int(old)]}.{rest}"
        state[name] = tensor
    dtype = next(teacher.parameters()).dtype
    with torch.device("meta"):
        student = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    student = student.to_empty(device=next(teacher.parameters()).device)
    missing, unexpected = student.load_state_dict(state, strict=False)
    # Tied heads appear once in a state dict; anything else missing would be left uninitialised.
    tied = {"lm_head.weight"} if getattr(cfg, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"copying kept layers failed: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if tied:
        student.tie_weights()
    # Non-persistent buffers (rotary inverse frequencies) are not in the state dict: copy them too.
    t_buffers = dict(teacher.named_buffers())
    for name, buf in student.named_buffers():
        src = name
        if name.startswith(prefix):
            old_new, rest = name[len(prefix):].split(".", 1)
            src = f"{prefix}{layers[int(old_new)]}.{rest}"
        if src in t_buffers:
            buf.copy_(t_buffers[src])
    return student.eval()


def build_student(spec: str, teacher: nn.Module, teacher_tokenizer: Any, windows: Callable[[], torch.Tensor],
                  trust_remote_code: bool = False, progress: bool = False) -> Student:
    """The student described by ``spec`` (see the module docstring); ``windows()`` gives calibration ids."""
    if spec.startswith("drop-layers:"):
        arg = spec.split(":", 1)[1]
        try:
            k = int(arg)
        except ValueError:
            k = 0
        if k < 2:
            raise UserError(f"student {spec!r}: drop-layers takes an integer k >= 2 (keep every k-th layer), "
                            f"got {arg!r}")
        n = arch.num_layers(teacher)
        layers = dropped_layers(n, k)
        return Student(keep_layers(teacher, layers), teacher_tokenizer, spec, "drop-layers", layers,
                       [f"kept teacher layers {layers} of {n} (one in every {k}, counting down from the last)"])
    if spec.startswith("keep-layers:"):
        try:
            layers = [int(x) for x in spec.split(":", 1)[1].split(",") if x.strip()]
        except ValueError:
            raise UserError(f"student {spec!r}: keep-layers takes teacher layer indices, e.g. keep-layers:0,3") \
                from None
        return Student(keep_layers(teacher, layers), teacher_tokenizer, spec, "keep-layers", layers,
                       [f"kept teacher layers {layers} of {arch.num_layers(teacher)}"])
    if spec.startswith("width:"):
        arg = spec.split(":", 1)[1]
        try:
            ratio = float(arg)
        except ValueError:
            ratio = -1.0
        if not 0.0 < ratio < 1.0:
            raise UserError(f"student {spec!r}: width takes the fraction r of heads and MLP channels to remove, "
                            f"0 < r < 1, got {arg!r}")
        return _width_student(spec, ratio, teacher, teacher_tokenizer, windows, progress)
    from efficientgpt.models.loading import load_model

    loaded = load_model(spec, trust_remote_code=trust_remote_code, device=next(teacher.parameters()).device,
                        progress=progress)
    return Student(loaded.model, loaded.tokenizer, spec, "model")


def _width_student(spec: str, ratio: float, teacher: nn.Module, tokenizer: Any,
                   windows: Callable[[], torch.Tensor], progress: bool) -> Student:
    from efficientgpt import registry
    from efficientgpt.compress import structured  # noqa: F401 - registers "structured"

    model_type = teacher.config.model_type
    rule = structured.RULES.get(model_type)
    if rule is None:
        raise UserError(f"student {spec!r}: structured pruning supports model types "
                        f"{', '.join(sorted(structured.RULES))}, not {model_type!r}")
    student = copy.deepcopy(teacher)
    config = structured.StructuredConfig(ratio=ratio, importance="taylor", prune_heads=rule.heads)
    with torch.random.fork_rng(devices=[]):
        result = registry.get("structured").apply(student, config, windows=windows(), progress=progress)
    notes = list(result.notes)
    if not rule.heads:
        notes.append(f"{model_type}: attention heads kept ({rule.why_not_heads}); MLP channels pruned")
    a = result.achieved
    notes.append(f"heads {a['heads_before']} -> {a['heads_after']}, MLP channels {a['mlp_channels_before']} -> "
                 f"{a['mlp_channels_after']}, parameters {a['parameters_before']:,} -> {a['parameters_after']:,}")
    return Student(student.eval(), tokenizer, spec, "width", None, notes)


def tokenizer_identity(tokenizer: Any) -> tuple[int, str] | None:
    if tokenizer is None:
        return None
    from efficientgpt.data.tokens import tokenizer_fingerprint

    return len(tokenizer), tokenizer_fingerprint(tokenizer)[:12]


def check_vocabulary(teacher: nn.Module, teacher_tokenizer: Any, student: nn.Module, student_tokenizer: Any) -> None:
    """Refuse a student whose tokenizer or logit width differs from the teacher's, naming both."""
    t_id, s_id = tokenizer_identity(teacher_tokenizer), tokenizer_identity(student_tokenizer)
    if t_id is not None and s_id is not None and t_id != s_id:
        raise UserError(f"the student's tokenizer (vocabulary {s_id[0]}, fingerprint {s_id[1]}) differs from the "
                        f"teacher's (vocabulary {t_id[0]}, fingerprint {t_id[1]}); distillation compares "
                        "next-token distributions, so both must share one tokenizer")
    t_v = teacher.get_output_embeddings().weight.shape[0]
    s_v = student.get_output_embeddings().weight.shape[0]
    if t_v != s_v:
        raise UserError(f"the student predicts {s_v} tokens but the teacher {t_v}; distillation needs the same "
                        "vocabulary (the same tokenizer and output size)")


def default_layer_map(student: Student, teacher: nn.Module) -> list[tuple[int, int]]:
    n_s, n_t = arch.num_layers(student.model), arch.num_layers(teacher)
    if student.source_layers is not None:
        return list(enumerate(student.source_layers))
    return [(j, max(0, round((j + 1) * n_t / n_s) - 1)) for j in range(n_s)]


def check_layer_map(pairs: list[tuple[int, int]], student: nn.Module, teacher: nn.Module) -> None:
    n_s, n_t = arch.num_layers(student), arch.num_layers(teacher)
    for s, t in pairs:
        if s >= n_s or t >= n_t:
            raise UserError(f"layer_map pair {s}:{t} is out of range: the student has layers 0..{n_s - 1}, the "
                            f"teacher 0..{n_t - 1}")


# ---- the trained module ---------------------------------------------------------------------------
class Distiller(nn.Module):
    """The student (and the projection of ``hidden``/``attn_out``) as one module for the Trainer.

    ``forward(batch)`` returns ``(sum of per-token losses, scored tokens)``; the teacher's outputs arrive
    in the batch (``teacher_logits`` ``(B, T, V)`` or ``teacher_states`` ``(B, P, T, d_T)``), so DDP sees a
    forward through every trained parameter. The teacher is held outside the module tree: it is not
    trained, not checkpointed and not broadcast.
    """

    def __init__(self, student: nn.Module, config: DistillConfig, pairs: list[tuple[int, int]] | None = None,
                 teacher_width: int | None = None):
        super().__init__()
        self.student = student
        self.kd = config
        self.pairs = pairs or []
        d_s = hidden_size(student)
        self.projection = None
        if config.loss in STATE_LOSSES and teacher_width is not None and teacher_width != d_s:
            self.projection = nn.Linear(d_s, teacher_width, bias=False).to(
                device=next(student.parameters()).device, dtype=next(student.parameters()).dtype)

    @property
    def config(self):
        """The student's Hugging Face config (what the Trainer fingerprints)."""
        return self.student.config

    def gradient_checkpointing_enable(self, **kwargs) -> None:
        enable = getattr(self.student, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs=kwargs.get("gradient_checkpointing_kwargs"))
        else:
            self.student.gradient_checkpointing_enable(**kwargs)

    def forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        kd = self.kd
        input_ids = batch["input_ids"]  # (B, T)
        labels = batch.get("labels", input_ids)  # (B, T)
        targets = labels[:, 1:]  # (B, T-1)
        mask = targets != IGNORE_INDEX  # (B, T-1)
        role = STATE_ROLE.get(kd.loss)
        layers = [s for s, _ in self.pairs] if role else []
        with capture(self.student, layers, role or "block") as states:
            logits = self.student(input_ids=input_ids, use_cache=False).logits  # (B, T, V)
        s_logits = logits[:, :-1].float()  # (B, T-1, V)
        ce = F.cross_entropy(s_logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                             reduction="none").view_as(targets)  # (B, T-1)
        on_policy = batch.get("on_policy")
        if on_policy is not None:  # the student's own samples carry no ground truth
            ce = ce * (1.0 - on_policy.to(ce.dtype))[:, None]
        if kd.loss in LOGIT_LOSSES:
            t_logits = batch["teacher_logits"][:, :-1]  # (B, T-1, V)
            d = kd.temperature ** 2 * token_divergence(kd.loss, s_logits, t_logits, kd.temperature, kd.skew)
        else:
            t_states = batch["teacher_states"]  # (B, P, T, d_T)
            d = torch.zeros_like(ce)
            for p, (s, _) in enumerate(self.pairs):
                h = states[s][:, :-1].float()  # (B, T-1, d_S)
                if self.projection is not None:
                    h = self.projection(h.to(self.projection.weight.dtype)).float()  # (B, T-1, d_T)
                d = d + (h - t_states[:, p, :-1].float()).pow(2).mean(-1)  # (B, T-1)
            d = d / max(1, len(self.pairs))
        per_token = kd.alpha * d + (1.0 - kd.alpha) * ce  # (B, T-1)
        return torch.where(mask, per_token, torch.zeros_like(per_token)).sum(), mask.sum()


def distill_loss(net: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The Trainer's ``loss_fn``: the (possibly DDP-wrapped) :class:`Distiller` computes it in forward."""
    return net(batch)


# ---- teacher outputs and their cache --------------------------------------------------------------
def model_digest(model: nn.Module) -> str:
    """sha256 of the model's config and every tensor's bytes (the teacher cache's identity)."""
    h = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    seen = set()
    for name, t in model.state_dict().items():
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.detach().reshape(-1).contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def topk_pack(logits: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    """The ``k`` largest logits ``(B, T, k)``, their indices and ``log Σ exp z`` ``(B, T)``."""
    values, index = logits.topk(k, dim=-1)  # (B, T, k)
    return {"values": values.contiguous(), "index": index.to(torch.int32).contiguous(),
            "lse": torch.logsumexp(logits.double(), dim=-1).contiguous()}


def topk_unpack(pack: dict[str, torch.Tensor], vocab: int) -> torch.Tensor:
    """Logits ``(B, T, V)`` with the stored top-k and the other ``V − k`` equal, holding the tail's mass."""
    values, index, lse = pack["values"], pack["index"].long(), pack["lse"]
    k = values.shape[-1]
    if k >= vocab:
        return torch.empty(*values.shape[:-1], vocab, dtype=values.dtype,
                           device=values.device).scatter_(-1, index, values)
    head = torch.exp(values.double() - lse[..., None]).sum(-1)  # (B, T) probability of the top k
    tail = torch.log1p(-head.clamp(max=1.0 - 1e-12)) - math.log(vocab - k)  # log of each tail token's share
    fill = (lse + tail).to(values.dtype)  # (B, T)
    out = fill[..., None].expand(*values.shape[:-1], vocab).clone()  # (B, T, V)
    return out.scatter_(-1, index, values)


class TeacherCache:
    """Teacher logits of each data step on disk, one safetensors file per (step, rank)."""

    def __init__(self, root: Path, topk: int, rank: int = 0):
        self.root, self.topk, self.rank = Path(root), topk, rank
        self.hits = self.misses = 0

    def path(self, step: int) -> Path:
        return self.root / f"step-{step:08d}-rank{self.rank}.safetensors"

    def get(self, step: int, vocab: int, device: torch.device) -> torch.Tensor | None:
        from safetensors.torch import load

        path = self.path(step)
        if not path.exists():
            self.misses += 1
            return None
        self.hits += 1
        tensors = {k: v.to(device) for k, v in load(path.read_bytes()).items()}
        return tensors["logits"] if "logits" in tensors else topk_unpack(tensors, vocab)

    def put(self, step: int, logits: torch.Tensor) -> torch.Tensor:
        """Store ``logits`` ``(B, T, V)``; return what a later :meth:`get` will return."""
        from safetensors.torch import save

        from efficientgpt.cache import atomic_write_bytes

        vocab = logits.shape[-1]
        if self.topk and self.topk < vocab:
            pack = topk_pack(logits, self.topk)
            atomic_write_bytes(self.path(step), save({k: v.cpu() for k, v in pack.items()}))
            return topk_unpack(pack, vocab)
        atomic_write_bytes(self.path(step), save({"logits": logits.contiguous().cpu()}))
        return logits


def _row_seed(seed: int, step: int, row: int) -> int:
    return int(np.random.SeedSequence([seed, step, row, 0x6B64]).generate_state(1, dtype=np.uint64)[0] >> 1)


def on_policy_step(fraction: float, seed: int, step: int) -> bool:
    """Whether step ``step`` trains on student samples: a pure function of ``(seed, step)``."""
    if fraction <= 0.0:
        return False
    if fraction >= 1.0:
        return True
    return bool(np.random.default_rng([seed, step, 0x6770]).random() < fraction)


def cache_kw(model: nn.Module) -> str:
    import inspect

    params = inspect.signature(model.forward).parameters
    # transformers >= 5 names the forward's cache ``cache``; older models and remote code say past_key_values
    return "cache" if "cache" in params else "past_key_values"


@torch.no_grad()
def sample_continuations(model: nn.Module, prompt: torch.Tensor, new_tokens: int, temperature: float,
                         uniforms: torch.Tensor) -> torch.Tensor:
    """Append ``new_tokens`` sampled tokens to ``prompt`` ``(B, P)``; ``uniforms`` ``(B, new_tokens)`` in [0, 1).

    Each token is the inverse CDF of ``softmax(z / temperature)`` at its row's uniform, so the sample is a
    function of the uniforms alone (the caller seeds them per row).
    """
    was_training = model.training
    model.eval()
    kw = cache_kw(model)
    try:
        ids = prompt
        out = model(input_ids=ids, use_cache=True)
        cache = out[kw] if kw in out else out.past_key_values
        logits = out.logits[:, -1]  # (B, V)
        for i in range(new_tokens):
            probs = torch.softmax(logits.double() / temperature, dim=-1)  # (B, V)
            cdf = probs.cumsum(-1)  # (B, V)
            u = (uniforms[:, i].to(cdf) * cdf[:, -1]).unsqueeze(-1)  # (B, 1)
            nxt = torch.searchsorted(cdf, u, right=True).clamp_(max=probs.shape[-1] - 1)  # (B, 1)
            ids = torch.cat([ids, nxt], dim=1)
            if i + 1 < new_tokens:
                out = model(input_ids=nxt, use_cache=True, **{kw: cache})
                cache = out[kw] if kw in out else out.past_key_values
                logits = out.logits[:, -1]
        return ids
    finally:
        model.train(was_training)


class DistillBatches:
    """``train_batches(step)`` for the Trainer: data (or student samples) plus the teacher's outputs."""

    def __init__(self, sampler: Callable[[int], Batch], teacher: nn.Module, student: nn.Module,
                 config: DistillConfig, seed: int, seq_len: int, rank: int = 0, world: int = 1,
                 pairs: list[tuple[int, int]] | None = None, cache: TeacherCache | None = None):
        self.sampler, self.teacher, self.student, self.kd = sampler, teacher, student, config
        self.seed, self.seq_len, self.rank, self.world = seed, seq_len, rank, world
        self.pairs, self.cache = pairs or [], cache
        self.prompt = config.prompt_tokens or max(1, seq_len // 2)
        if config.on_policy > 0 and not 1 <= self.prompt < seq_len:
            raise UserError(f"prompt_tokens {config.prompt_tokens} must be in 1..{seq_len - 1} (the sequence "
                            f"length is {seq_len}) so the student has tokens to sample")
        self.on_policy_steps = 0

    @property
    def device(self) -> torch.device:
        return next(self.teacher.parameters()).device

    def data_step(self, step: int) -> int:
        return step % self.kd.epoch_steps if self.kd.epoch_steps else step

    @torch.no_grad()
    def teacher_outputs(self, input_ids: torch.Tensor) -> Batch:
        self.teacher.eval()
        ids = input_ids.to(self.device)
        if self.kd.loss in LOGIT_LOSSES:
            return {"teacher_logits": self.teacher(input_ids=ids, use_cache=False).logits}
        role = STATE_ROLE[self.kd.loss]
        layers = [t for _, t in self.pairs]
        with capture(self.teacher, sorted(set(layers)), role) as states:
            self.teacher(input_ids=ids, use_cache=False)
        return {"teacher_states": torch.stack([states[t] for t in layers], dim=1)}  # (B, P, T, d_T)

    def __call__(self, step: int) -> Batch:
        data_step = self.data_step(step)
        batch = dict(self.sampler(data_step))
        rows = batch["input_ids"].shape[0]
        if on_policy_step(self.kd.on_policy, self.seed, step):
            self.on_policy_steps += 1
            prompt = batch["input_ids"][:, : self.prompt].to(self.device)  # (B, P)
            new = self.seq_len - self.prompt
            # Row j of this process is row rank + j·world of the global batch (WindowSampler's shard).
            uniforms = torch.stack([
                torch.rand(new, generator=torch.Generator().manual_seed(_row_seed(self.seed, step,
                                                                                  self.rank + j * self.world)),
                           dtype=torch.float64)
                for j in range(rows)])  # (B, new)
            ids = sample_continuations(self.student, prompt, new, self.kd.gen_temperature, uniforms)  # (B, T)
            labels = ids.clone()
            labels[:, : self.prompt] = IGNORE_INDEX
            batch = {"input_ids": ids, "labels": labels, "on_policy": torch.ones(rows, device=ids.device)}
            batch.update(self.teacher_outputs(ids))
            return batch
        batch["on_policy"] = torch.zeros(rows)
        if self.cache is not None:
            vocab = self.teacher.get_output_embeddings().weight.shape[0]
            logits = self.cache.get(data_step, vocab, self.device)
            if logits is None:
                logits = self.cache.put(data_step, self.teacher_outputs(batch["input_ids"])["teacher_logits"])
            batch["teacher_logits"] = logits
            return batch
        batch.update(self.teacher_outputs(batch["input_ids"]))
        return batch


def teacher_cache(teacher: nn.Module, config: DistillConfig, data_fingerprint: str, train_cfg, rank: int,
                  world: int) -> TeacherCache:
    from efficientgpt.cache import cache_dir, stable_hash

    key = stable_hash({"teacher": model_digest(teacher), "data": data_fingerprint, "seq_len": train_cfg.seq_len,
                       "batch_size": train_cfg.batch_size, "seed": train_cfg.seed, "world": world,
                       "topk": config.teacher_topk}, n=20)
    return TeacherCache(cache_dir("teacher-logits", key), config.teacher_topk, rank)


@torch.no_grad()
def validation_kl(teacher: nn.Module, student: nn.Module, source, seq_len: int, max_windows: int = 32) -> float | None:
    """Mean forward KL(p_T ‖ p_S) per predicted token (τ = 1) on validation windows of a text source."""
    ids = getattr(source, "val_ids", None)
    if ids is None:
        return None
    from efficientgpt.data.tokens import eval_windows

    windows = eval_windows(ids, seq_len)[:max_windows]
    device = next(student.parameters()).device
    was = student.training
    student.eval()
    total, count = 0.0, 0
    try:
        for i in range(0, len(windows), 8):
            w = windows[i : i + 8].to(device)
            s = student(input_ids=w, use_cache=False).logits[:, :-1]
            t = teacher(input_ids=w.to(next(teacher.parameters()).device), use_cache=False).logits[:, :-1]
            total += float(token_divergence("fkl", s, t.to(s.device)).double().sum())
            count += s.shape[0] * s.shape[1]
    finally:
        student.train(was)
    return total / count


# ---- the job ----------------------------------------------------------------------------------------
def _exp(x: float | None) -> float | None:
    return math.exp(x) if x is not None and x < 700 else None


def distill(teacher: str, student: str, config: DistillConfig | None = None, data: str = "embedded:prose",
            out: str | Path | None = None, train: dict[str, Any] | Any = None, resume: bool = False,
            eval_tokens: int | None = 65536, device: str = "auto", trust_remote_code: bool = False,
            log: Callable[[str], None] | None = None, teacher_loaded=None, student_model: Student | None = None,
            progress: bool = True) -> dict[str, Any]:
    """Distil ``teacher`` into ``student`` on ``data`` with the shared Trainer and save the student to ``out``.

    ``student`` is ``drop-layers:k``, ``keep-layers:i,j,..``, ``width:r`` or a model spec (see
    :func:`build_student`); ``student_model`` passes a ready :class:`Student` instead. Returns the run
    summary (also ``out/result.json``): parameters of both models, the training curve, and validation
    loss/perplexity of the teacher and of the student before and after.
    """
    from efficientgpt.cache import atomic_write_json, publish_files, staging_dir
    from efficientgpt.eval.perplexity import default_seq_len
    from efficientgpt.models.loading import load_model
    from efficientgpt.pipeline import default_train_config, open_data
    from efficientgpt.train import distributed
    from efficientgpt.train.config import TrainConfig
    from efficientgpt.train.trainer import Trainer

    config = config or DistillConfig()
    config.validate()
    dist = distributed.init(device)
    t0 = time.perf_counter()
    if teacher_loaded is None:
        teacher_loaded = load_model(teacher, trust_remote_code=trust_remote_code, device=dist.device,
                                    progress=dist.is_main and progress)
    t_model = teacher_loaded.model.eval()
    t_model.requires_grad_(False)
    if not isinstance(train, TrainConfig):
        train = dict(train or {})
        # At least ten points on the training curve (short runs log every step).
        train.setdefault("log_every", max(1, min(10, (train.get("steps") or 100) // 10)))
    train_cfg = train if isinstance(train, TrainConfig) else default_train_config(t_model, **train)
    if train_cfg.fsdp:
        raise UserError("distill trains on one process or with DDP (torchrun without --fsdp): the teacher runs whole "
                        "on every process and on-policy sampling runs the student outside the training forward, "
                        "which FSDP's sharded parameters do not allow; drop --fsdp")
    source = open_data(data, teacher_loaded.tokenizer, eval_tokens)

    def calibration() -> torch.Tensor:  # 16 training windows, for the structured pruning of width:r
        calib = dataclasses.replace(train_cfg, batch_size=16, grad_accum=1)
        return source.train_batches(calib, 0, 1)(0)["input_ids"].to(dist.device)

    torch.manual_seed(train_cfg.seed)
    built = student_model or build_student(student, t_model, teacher_loaded.tokenizer, calibration,
                                           trust_remote_code=trust_remote_code, progress=False)
    s_model = built.model.to(dist.device)
    check_vocabulary(t_model, teacher_loaded.tokenizer, s_model, built.tokenizer)
    context = default_seq_len(s_model)
    if train_cfg.seq_len > context:
        if isinstance(train, TrainConfig) or "seq_len" in train:
            raise UserError(f"seq_len {train_cfg.seq_len} exceeds the student's context of {context} tokens")
        train_cfg = default_train_config(t_model, **{**train, "seq_len": context})
    sampler = source.train_batches(train_cfg, dist.rank, dist.world)
    s_model.requires_grad_(True)
    pairs = None
    if config.loss in STATE_LOSSES:
        pairs = parse_layer_map(config.layer_map) if config.layer_map else default_layer_map(built, t_model)
        check_layer_map(pairs, s_model, t_model)
    torch.manual_seed(train_cfg.seed)  # the projection's initialisation
    distiller = Distiller(s_model, config, pairs, teacher_width=hidden_size(t_model))
    if log:
        log(f"teacher {teacher}: {sum(p.numel() for p in t_model.parameters()):,} parameters; student "
            f"{built.spec}: {sum(p.numel() for p in s_model.parameters()):,}"
            + (f" (+{distiller.projection.weight.numel():,} projection)" if distiller.projection is not None else ""))

    before = teacher_eval = None
    if dist.is_main:
        teacher_eval = source.evaluate(t_model, train_cfg)
        before = source.evaluate(s_model, train_cfg)
        before["kl_from_teacher"] = validation_kl(t_model, s_model, source, train_cfg.seq_len)
    cache = teacher_cache(t_model, config, source.fingerprint, train_cfg, dist.rank, dist.world) \
        if config.cache_teacher else None
    batches = DistillBatches(sampler, t_model, s_model, config, train_cfg.seed, train_cfg.seq_len, dist.rank,
                             dist.world, pairs, cache)
    trainer = Trainer(
        distiller, train_cfg, batches, out_dir=out,
        eval_fn=(lambda m: source.evaluate(m.student, train_cfg)["loss"]) if dist.is_main else None,
        loss_fn=distill_loss,
        fingerprint={"data": source.fingerprint, "teacher": teacher_loaded.describe(),
                     "student": built.spec, "distill": config.to_dict()},
        dist=dist,
    )
    result = trainer.train(resume=resume)
    curve = [r["loss"] for r in result.curve if "loss" in r]
    summary: dict[str, Any] = {
        "path": str(out) if out else None,
        "teacher": {**teacher_loaded.describe(), "layers": arch.num_layers(t_model)},
        "student": built.describe(),
        "config": config.to_dict(),
        "train_config": train_cfg.to_dict(),
        "data": source.describe(),
        "parameters": {"teacher": sum(p.numel() for p in t_model.parameters()),
                       "student": sum(p.numel() for p in s_model.parameters()),
                       "projection": distiller.projection.weight.numel() if distiller.projection is not None
                       else 0},
        "train": result.to_dict(),
        "losses": {"train_first": curve[0] if curve else None, "train_final": result.final_loss,
                   "logged_every": train_cfg.log_every, "on_policy_steps": batches.on_policy_steps},
    }
    if cache is not None:
        summary["teacher_cache"] = {"path": str(cache.root), "hits": cache.hits, "misses": cache.misses,
                                    "topk": config.teacher_topk}
    if dist.is_main:
        after = source.evaluate(s_model, train_cfg)
        after["kl_from_teacher"] = validation_kl(t_model, s_model, source, train_cfg.seq_len)
        summary["eval"] = {
            "teacher": teacher_eval, "student_before": before, "student_after": after,
            "loss_teacher": teacher_eval["loss"], "loss_before": before["loss"], "loss_after": after["loss"],
            "ppl_teacher": _exp(teacher_eval["loss"]), "ppl_before": _exp(before["loss"]),
            "ppl_after": _exp(after["loss"]),
        }
        summary["wall_s"] = time.perf_counter() - t0
        if out is not None:
            out = Path(out)
            record = json.loads(json.dumps(summary, default=str))
            s_model.eval()
            with staging_dir(out) as tmp:
                s_model.save_pretrained(tmp, safe_serialization=True)
                if built.tokenizer is not None:
                    built.tokenizer.save_pretrained(tmp)
                (tmp / "efficientgpt_distill.json").write_text(json.dumps(record, indent=2))
                publish_files(tmp, out, last="config.json")
            summary["files_bytes"] = sum(f.stat().st_size for f in out.glob("*.safetensors"))
            atomic_write_json(out / "result.json", json.loads(json.dumps(summary, default=str)))
    distributed.barrier()
    summary["student_model"] = s_model
    summary["distiller"] = distiller
    return summary
