"""T-Few's option-level training losses (Liu et al., "Few-Shot Parameter-Efficient Fine-Tuning is Better
and Cheaper than In-Context Learning", NeurIPS 2022, §3.2).

Each training example ``x`` of a choice task comes with answer options ``ŷ^(1..N)``, one of them the
gold ``y``. With ``T(ŷ)`` the option's token count and ``p(ŷ_t | x, ŷ_<t)`` the model's probability of
its ``t``-th token:

* ``L_LM`` (§3.2): the usual cross-entropy of the gold answer, a mean over the gold tokens of the
  batch, ``L_LM = -(1 / T(y)) Σ_t log p(y_t | x, y_<t)``.
* ``L_UL``, unlikelihood on the wrong options (Eq. 2)::

      L_UL = - Σ_{n≠gold} Σ_t log(1 - p(ŷ^(n)_t | x, ŷ^(n)_<t)) / Σ_{n≠gold} T(ŷ^(n))

  a mean over every wrong-option token of the batch, as the official code
  (github.com/r-three/t-few, ``EncoderDecoder.training_step``) normalises it. The official code
  computes ``log(1 - p + 0.01)``; ``epsilon`` (default 0.01) is that constant, which bounds the loss
  of a token the model is sure of (``epsilon=0`` is Eq. 2 exactly, with ``1 - p`` floored at 1e-30).
* ``L_LN``, the length-normalised loss (Eq. 3): a softmax cross-entropy over the options of
  ``β(x, ŷ) = (1 / T(ŷ)) Σ_t log p(ŷ_t | x, ŷ_<t)``, a mean over the examples of the batch::

      L_LN = -log( exp(β(x, y)) / Σ_n exp(β(x, ŷ^(n))) )

The paper trains on ``L = L_LM + L_UL + L_LN``; :func:`tfew_loss` sums any subset with weights.

**The trainer contract.** A loss returns ``(sum, count)`` and the trainer divides the sum of all
micro-batches and processes by the *global* count of :func:`efficientgpt.train.losses.count_targets`,
i.e. the gold-answer tokens of the step (the batch's ``labels`` are the gold option's labels). That
count is ``L_LM``'s own normaliser; ``L_UL`` and ``L_LN`` are normalised by other global numbers
(wrong-option tokens, examples), so each example row carries ``ul_scale = G / W`` and ``ln_scale =
G / E`` (``G`` gold tokens, ``W`` wrong-option tokens, ``E`` examples, all of the whole global step,
computed where the batch is built: :func:`choice_batch_from` and :func:`train_batches`). Summing
``ul_scale · (wrong-token terms)`` and dividing by ``G`` gives ``L_UL`` exactly, over any split into
micro-batches and processes; likewise ``L_LN``. A batch without the scales (one built by hand and
scored whole) gets them from itself.

**Batches.** Tensors lead with the example dimension ``E`` so the trainer's micro-batch slicing keeps
whole examples: ``option_input_ids``, ``option_attention_mask``, ``option_labels`` ``(E, C, T)`` (prompt
followed by option ``c``, right-padded; labels -100 on prompt and padding), ``option_mask (E, C)``
(which options exist; a generation example has one, its answer), ``gold (E,)``, ``input_ids`` and
``labels`` ``(E, T)`` (the gold rows, which :func:`~efficientgpt.train.losses.count_targets` reads) and
the two scales ``(E,)``.

Departures: T-Few's encoder-decoder (T0) encodes the input once and decodes each option; a causal LM
reads ``prompt + option`` once per option, so a step runs the model on ``C`` times the rows of a
language-modelling batch. ``L_UL``'s sum runs over wrong-option tokens only; the official code's sum
also holds a constant ``-log(1.01)`` for every padding position and every gold-option position (its
denominator does not count them), which changes the reported value slightly and no gradient.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from efficientgpt.errors import UserError
from efficientgpt.eval.tasks import collate
from efficientgpt.train.losses import IGNORE_INDEX, causal_lm_loss

Batch = dict[str, torch.Tensor]
LossFn = Callable[[torch.nn.Module, Batch], tuple[torch.Tensor, torch.Tensor]]

LOSSES = ("lm", "ul", "ln")
#: The official code's constant inside L_UL's logarithm, log(1 - p + 0.01).
UL_EPSILON = 0.01
#: Floor of 1 - p + ε in L_UL, so that ε = 0 with p = 1 gives a large finite loss, not inf.
MIN_ONE_MINUS_P = 1e-30


# ---- batches ------------------------------------------------------------------------------------------

def choice_inputs(prompts: Sequence[Sequence[int]], options: Sequence[Sequence[Sequence[int]]],
                  gold: Sequence[int], pad_id: int) -> Batch:
    """A batch of examples from token ids: ``options[e][c]`` is option ``c`` of example ``e``."""
    if not prompts or len(prompts) != len(options) or len(options) != len(gold):
        raise ValueError(f"need as many prompts ({len(prompts)}), option lists ({len(options)}) and gold "
                         f"indices ({len(gold)}), at least one")
    width = max(len(o) for o in options)
    rows_p, rows_c = [], []
    option_mask = torch.zeros(len(options), width, dtype=torch.bool)  # (E, C)
    for e, (p, opts) in enumerate(zip(prompts, options, strict=True)):
        if not opts or any(len(o) == 0 for o in opts):
            raise ValueError(f"example {e} has no options or an empty one")
        for c in range(width):
            rows_p.append(p)
            rows_c.append(opts[c] if c < len(opts) else [])
            option_mask[e, c] = c < len(opts)
    rows = collate(rows_p, rows_c, pad_id)  # (E*C, T) each
    return assemble(rows["input_ids"], rows["attention_mask"], rows["labels"], option_mask,
                    torch.tensor(list(gold), dtype=torch.long))


def choice_batch_from(cb) -> Batch:
    """The batch of a task source's :class:`~efficientgpt.data.tasks.ChoiceBatch` (rows ``e * C + c``)."""
    return assemble(cb.input_ids, cb.attention_mask, cb.labels, cb.option_mask, cb.gold)


def assemble(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
             option_mask: torch.Tensor, gold: torch.Tensor) -> Batch:
    """Example-major rows ``(E*C, T)`` as an ``(E, C, T)`` batch with the gold labels and the scales."""
    E, C = option_mask.shape
    T = input_ids.shape[-1]
    if input_ids.shape[0] != E * C:
        raise ValueError(f"{input_ids.shape[0]} rows for {E} examples of {C} options")
    if ((gold < 0) | (gold >= C)).any() or not option_mask[torch.arange(E), gold.clamp(0, C - 1)].all():
        raise ValueError(f"gold indices {gold.tolist()} name options that do not exist")
    option_labels = labels.reshape(E, C, T)
    batch = {
        "option_input_ids": input_ids.reshape(E, C, T),
        "option_attention_mask": attention_mask.reshape(E, C, T),
        "option_labels": option_labels,
        "option_mask": option_mask,
        "gold": gold,
        # The gold rows as a causal LM batch: count_targets counts their answer tokens.
        "input_ids": input_ids.reshape(E, C, T)[torch.arange(E), gold],  # (E, T)
        "labels": option_labels[torch.arange(E), gold],  # (E, T)
    }
    batch.update(scales(batch))
    return batch


def _option_lengths(batch: Batch) -> torch.Tensor:
    """``T(ŷ)`` of every option, ``(E, C)`` (0 for options that do not exist)."""
    return (batch["option_labels"][..., 1:] != IGNORE_INDEX).sum(-1)


def _gold_onehot(batch: Batch) -> torch.Tensor:
    E, C = batch["option_mask"].shape
    return F.one_hot(batch["gold"], C).bool()  # (E, C)


def scales(batch: Batch) -> Batch:
    """``ul_scale = G / W`` and ``ln_scale = G / E`` for every example, taking ``batch`` as the whole step."""
    lengths = _option_lengths(batch).double()  # (E, C)
    gold = _gold_onehot(batch)
    wrong = batch["option_mask"] & ~gold
    E = lengths.shape[0]
    G = float((lengths * gold).sum())
    W = float((lengths * wrong).sum())
    return {"ul_scale": torch.full((E,), G / W if W > 0 else 0.0),  # (E,)
            "ln_scale": torch.full((E,), G / E)}  # (E,)


# ---- log-probabilities --------------------------------------------------------------------------------

def option_log_probs(model, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """``log p(ŷ_t | x, ŷ_<t)`` of every option token and which positions are option tokens.

    Returns ``(E, C, T-1)`` float32 log-probabilities (0 elsewhere) and the ``(E, C, T-1)`` mask; the
    model runs once, on the rows of options that exist, trimmed to their longest row.
    """
    ids, attn, labels = batch["option_input_ids"], batch["option_attention_mask"], batch["option_labels"]
    E, C, T = ids.shape
    valid = batch["option_mask"].reshape(E * C)  # (E*C,)
    rows = valid.nonzero().squeeze(1)  # (R,)
    width = int(attn.reshape(E * C, T)[rows].sum(1).max())
    logits = model(input_ids=ids.reshape(E * C, T)[rows, :width],
                   attention_mask=attn.reshape(E * C, T)[rows, :width], use_cache=False).logits  # (R, w, V)
    targets = labels.reshape(E * C, T)[rows, 1:width]  # (R, w-1): position t predicts token t+1
    logp = -F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), targets, ignore_index=IGNORE_INDEX,
                            reduction="none")  # (R, w-1)
    full = logp.new_zeros(E * C, T - 1).index_copy(
        0, rows, F.pad(logp, (0, T - width)))  # (E*C, T-1)
    scored = labels.reshape(E * C, T)[:, 1:] != IGNORE_INDEX  # (E*C, T-1)
    return full.reshape(E, C, T - 1), scored.reshape(E, C, T - 1)


# ---- the losses: each returns (sum, gold-token count) ---------------------------------------------------

def _parts(logp: torch.Tensor, scored: torch.Tensor, batch: Batch, epsilon: float) -> dict[str, torch.Tensor]:
    """The three scaled sums from one forward pass (see the module docstring)."""
    gold = _gold_onehot(batch)  # (E, C)
    wrong = batch["option_mask"] & ~gold  # (E, C)
    E = gold.shape[0]
    gold_logp = logp[torch.arange(E, device=logp.device), batch["gold"]]  # (E, T-1), 0 off the answer
    lm = -gold_logp.sum()

    # Eq. 2: -log(1 - p + ε) on every wrong-option token. Other positions get log p = -1e4 before the
    # logarithm, so their (masked) terms stay finite and pass no NaN gradient.
    wrong_tok = scored & wrong[..., None]  # (E, C, T-1)
    safe = logp.masked_fill(~wrong_tok, -1e4)
    one_minus_p = (-torch.expm1(safe)).clamp(min=0) + epsilon  # (E, C, T-1)
    ul_terms = -torch.log(one_minus_p.clamp(min=MIN_ONE_MINUS_P)) * wrong_tok  # (E, C, T-1)
    ul = (ul_terms.sum((1, 2)) * batch["ul_scale"].to(logp.dtype)).sum()

    # Eq. 3: softmax cross-entropy over the options of β = mean log-probability of the option's tokens.
    lengths = scored.sum(-1)  # (E, C)
    beta = logp.sum(-1) / lengths.clamp(min=1)  # (E, C)
    beta = beta.masked_fill(~batch["option_mask"], float("-inf"))
    ce = torch.logsumexp(beta, dim=-1) - beta[torch.arange(E, device=beta.device), batch["gold"]]  # (E,)
    ln = (ce * batch["ln_scale"].to(logp.dtype)).sum()
    return {"lm": lm, "ul": ul, "ln": ln}


def _with_scales(batch: Batch) -> Batch:
    if "ul_scale" in batch and "ln_scale" in batch:
        return batch
    return {**batch, **{k: v.to(batch["gold"].device) for k, v in scales(batch).items()}}


def _count(batch: Batch) -> torch.Tensor:
    return (batch["labels"][:, 1:] != IGNORE_INDEX).sum()


def tfew_loss(losses: Sequence[str] = LOSSES, weights: dict[str, float] | None = None,
              epsilon: float = UL_EPSILON) -> LossFn:
    """``Σ_k weight_k · L_k`` over ``losses`` (a subset of lm, ul, ln), from one forward pass."""
    bad = [k for k in losses if k not in LOSSES]
    if bad or not losses:
        raise UserError(f"T-Few losses {list(losses)!r}: choose a non-empty subset of {', '.join(LOSSES)}")
    w = {k: 1.0 for k in losses} if weights is None else {k: float(weights.get(k, 1.0)) for k in losses}

    def loss_fn(model, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        batch = _with_scales(batch)
        logp, scored = option_log_probs(model, batch)
        parts = _parts(logp, scored, batch, epsilon)
        total = sum(w[k] * parts[k] for k in losses)
        return total, _count(batch)

    loss_fn.losses = tuple(losses)  # type: ignore[attr-defined]
    return loss_fn


def lm_loss(model, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """``L_LM``: summed NLL of the gold options' tokens and their count."""
    return tfew_loss(("lm",))(model, batch)


def unlikelihood_loss(model, batch: Batch, epsilon: float = UL_EPSILON) -> tuple[torch.Tensor, torch.Tensor]:
    """``L_UL`` (Eq. 2), scaled so that dividing by the gold-token count gives the wrong-token mean."""
    return tfew_loss(("ul",), epsilon=epsilon)(model, batch)


def length_normalized_loss(model, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """``L_LN`` (Eq. 3), scaled so that dividing by the gold-token count gives the mean over examples."""
    return tfew_loss(("ln",))(model, batch)


# ---- feeding the trainer ------------------------------------------------------------------------------

def train_batches(source, cfg, rank: int = 0, world: int = 1) -> Callable[[int], Batch]:
    """Step -> this process's examples ``rank::world`` of the step's global batch, all options each.

    The scales are computed on the whole global batch, so the trainer's global normalisation gives
    the paper's batch means exactly under DDP and gradient accumulation.
    """
    if cfg.batch_size % world:
        raise UserError(f"batch size {cfg.batch_size} is not divisible by the {world} processes")

    def batch(step: int) -> Batch:
        idx = source.train_indices(step, cfg.batch_size, cfg.seed)
        full = choice_batch_from(source.choice_batch(idx, cfg.seq_len))
        return {k: v[rank::world] for k, v in full.items()}

    return batch


def objective(source, losses: Sequence[str], weights: dict[str, float], epsilon: float, cfg, rank: int = 0,
              world: int = 1) -> tuple[Callable[[int], Batch], LossFn]:
    """Training batches and loss for ``source``: T-Few's losses on a task source with answer options.

    Text data has no answer options, so ``L_UL`` and ``L_LN`` are undefined there; with ``lm`` among
    the losses the run trains on ``L_LM`` (the causal LM loss) alone and warns, else it is refused.
    """
    if hasattr(source, "choice_batch") and hasattr(source, "train_indices"):
        return train_batches(source, cfg, rank, world), tfew_loss(losses, weights, epsilon)
    spec = getattr(source, "spec", "this data")
    if "lm" not in losses:
        raise UserError(f"T-Few losses {', '.join(losses)} score answer options, and {spec!r} has none: train "
                        "on a task (--data task:NAME, see 'efficientgpt tasks') or add lm to the losses")
    others = [k for k in losses if k != "lm"]
    if others:
        warnings.warn(f"{spec!r} has no answer options: T-Few trains with L_LM alone, without "
                      f"{', '.join('L_' + k.upper() for k in others)} (use --data task:NAME for those)",
                      UserWarning, stacklevel=2)
    w = float(weights.get("lm", 1.0))

    def lm_only(model, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        s, n = causal_lm_loss(model, batch)
        return w * s, n

    return source.train_batches(cfg, rank, world), lm_only
