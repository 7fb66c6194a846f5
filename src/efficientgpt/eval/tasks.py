"""Task scoring: rank classification for choice tasks, exact match of greedy decoding for generation.

Rank classification follows T-Few (Liu et al., "Few-Shot Parameter-Efficient Fine-Tuning is Better
and Cheaper than In-Context Learning", NeurIPS 2022, Sec. 3.2 and 3.3): every answer option is scored
as a continuation of the prompt, and the option with the lowest *length-normalised* negative
log-likelihood wins,

    score(x, y) = -(1 / |y|) * sum_t log p(y_t | x, y_<t),      prediction = argmin_y score(x, y).

Length normalisation keeps long options from losing merely for having more tokens (T-Few's
``L_LN`` uses the same normalised log-probabilities). Generation tasks are scored by exact match:
greedy decoding until the end-of-sequence token or a newline, surrounding whitespace stripped, compared
with the gold answer, the protocol of lm-evaluation-harness's ``until`` stop sequences.

Sequences are right-padded and carry an attention mask; with causal attention a right pad never
influences the positions before it, so a padded row scores exactly as the same row alone. Prompt and
continuation are tokenized separately and concatenated, so the boundary between them is exact.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def collate(prompts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]], pad_id: int,
            length: int | None = None) -> dict[str, torch.Tensor]:
    """Rows ``prompt + continuation``, right-padded with ``pad_id`` to the longest row (or ``length``).

    ``labels`` hold the continuation tokens and ``-100`` on the prompt and the padding, so
    :func:`continuation_nll` (and the trainer's loss) scores only the continuation.
    """
    lengths = [len(p) + len(c) for p, c in zip(prompts, continuations, strict=True)]
    width = max(lengths, default=1) if length is None else length
    if lengths and max(lengths) > width:
        raise ValueError(f"a row of {max(lengths)} tokens does not fit the padded length {width}")
    n = len(lengths)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)  # (N, T)
    attention_mask = torch.zeros((n, width), dtype=torch.long)  # (N, T)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)  # (N, T)
    for i, (p, c) in enumerate(zip(prompts, continuations, strict=True)):
        row = list(p) + list(c)
        input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, : len(row)] = 1
        labels[i, len(p) : len(row)] = torch.tensor(list(c), dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def continuation_nll(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed NLL of each row's labelled tokens and their count, both ``(N,)``; differentiable.

    The building block of rank classification and of option-level losses (unlikelihood,
    length-normalised softmax over options): ``sum / count`` is the length-normalised NLL.
    """
    labels = batch["labels"]  # (N, T)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    targets = labels[:, 1:]  # (N, T-1): position t predicts token t+1
    nll = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), targets, ignore_index=IGNORE_INDEX,
                          reduction="none")  # (N, T-1)
    return nll.sum(dim=1), (targets != IGNORE_INDEX).sum(dim=1)


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def score_continuations(model, prompts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]],
                        pad_id: int, batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum NLL, token count)`` of every continuation given its prompt, ``(N,)`` float64 / int64.

    Rows are sorted by length before batching so little compute goes to padding.
    """
    n = len(prompts)
    sums = torch.zeros(n, dtype=torch.float64)
    counts = torch.zeros(n, dtype=torch.long)
    order = sorted(range(n), key=lambda i: len(prompts[i]) + len(continuations[i]))
    device = _device(model)
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        batch = collate([prompts[i] for i in idx], [continuations[i] for i in idx], pad_id)
        s, c = continuation_nll(model, {k: v.to(device) for k, v in batch.items()})
        sums[idx] = s.double().cpu()
        counts[idx] = c.cpu()
    return sums, counts


@dataclasses.dataclass
class ChoiceScores:
    """Rank classification of N examples."""

    predictions: list[int]
    """Index of the option with the lowest length-normalised NLL, per example."""
    scores: list[list[float]]
    """Length-normalised NLL (nats per token) of every option, per example."""
    gold_nll: float
    """Summed NLL of the gold options' tokens."""
    gold_tokens: int

    def accuracy(self, gold: Sequence[int]) -> float:
        return sum(p == g for p, g in zip(self.predictions, gold, strict=True)) / max(1, len(gold))


def rank_classify(model, prompts: Sequence[Sequence[int]], options: Sequence[Sequence[Sequence[int]]],
                  gold: Sequence[int], pad_id: int, batch_size: int = 32) -> ChoiceScores:
    """Rank classification: per example, the option whose tokens have the lowest mean NLL wins.

    ``options[n][c]`` are the token ids of option ``c`` of example ``n``; ``gold[n]`` the correct one
    (only used for the gold NLL). Ties go to the lower option index.
    """
    flat_p, flat_c, owner = [], [], []
    for n, (p, opts) in enumerate(zip(prompts, options, strict=True)):
        for c in opts:
            if not c:
                raise ValueError(f"example {n} has an empty answer option")
            flat_p.append(p)
            flat_c.append(c)
            owner.append(n)
    sums, counts = score_continuations(model, flat_p, flat_c, pad_id, batch_size)
    norm = (sums / counts).tolist()
    scores: list[list[float]] = [[] for _ in prompts]
    for n, s in zip(owner, norm, strict=True):
        scores[n].append(s)
    predictions = [min(range(len(s)), key=s.__getitem__) for s in scores]
    gold_nll, gold_tokens, row = 0.0, 0, 0
    for n, opts in enumerate(options):
        gold_nll += float(sums[row + gold[n]])
        gold_tokens += int(counts[row + gold[n]])
        row += len(opts)
    return ChoiceScores(predictions, scores, gold_nll, gold_tokens)


@torch.no_grad()
def greedy_generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: Sequence[int], stop_ids: set[int],
                    pad_id: int, batch_size: int = 32) -> list[list[int]]:
    """Greedy continuations of each prompt: up to ``max_new_tokens[i]`` tokens, ending after a stop id.

    Recomputes the whole (short) sequence every step rather than using a key-value cache, so any
    attached method (prefixes, prompts, hooks) sees exactly the inputs it sees in training.
    """
    device = _device(model)
    out: list[list[int]] = [[] for _ in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        seqs = [list(prompts[i]) for i in idx]
        active = [max_new_tokens[i] > 0 for i in idx]
        for _ in range(max((max_new_tokens[i] for i in idx), default=0)):
            if not any(active):
                break
            batch = collate(seqs, [[] for _ in seqs], pad_id)
            logits = model(input_ids=batch["input_ids"].to(device),
                           attention_mask=batch["attention_mask"].to(device), use_cache=False).logits  # (B, T, V)
            last = torch.tensor([len(s) - 1 for s in seqs], device=device)
            nxt = logits[torch.arange(len(seqs), device=device), last].argmax(dim=-1).tolist()  # (B,)
            for j, i in enumerate(idx):
                if not active[j]:
                    continue
                out[i].append(nxt[j])
                seqs[j].append(nxt[j])
                if nxt[j] in stop_ids or len(out[i]) >= max_new_tokens[i]:
                    active[j] = False
    return out


def normalize_answer(text: str) -> str:
    """The text up to the first newline, surrounding whitespace stripped."""
    return text.split("\n", 1)[0].strip()


def exact_match(prediction: str, answer: str) -> bool:
    """Whether ``prediction`` (cut at the first newline) equals ``answer``, ignoring surrounding whitespace."""
    return normalize_answer(prediction) == answer.strip()


def decode_generation(tokenizer, ids: Sequence[int], stop_ids: set[int]) -> str:
    """The text of generated ``ids`` up to (not including) the first stop token."""
    cut = next((k for k, t in enumerate(ids) if t in stop_ids), len(ids))
    return tokenizer.decode(list(ids[:cut]), skip_special_tokens=True)
