"""Text to token streams, and the windows the trainer and the evaluator read from them.

A split is tokenized once into one flat stream (cached by tokenizer and text fingerprint). Training
reads random windows of ``seq_len`` tokens whose start positions are a pure function of
``(seed, step)``: resuming at step ``s`` needs no sampler state, and every process of a distributed
run draws the same global batch and takes its own shard (:class:`WindowSampler`). Evaluation reads
non-overlapping windows (:func:`eval_windows`).
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from efficientgpt.cache import atomic_write_bytes, cache_dir
from efficientgpt.data.sources import TextData
from efficientgpt.errors import UserError

_CHUNK_CHARS = 1 << 16


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    blob = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(blob.encode()).hexdigest()


def _chunks(text: str) -> list[str]:
    """Split text at line boundaries into pieces of about ``_CHUNK_CHARS`` for batched encoding."""
    out, start = [], 0
    while start < len(text):
        end = min(len(text), start + _CHUNK_CHARS)
        if end < len(text):
            nl = text.rfind("\n", start, end)
            end = nl + 1 if nl > start else end
        out.append(text[start:end])
        start = end
    return out


def encode(tokenizer, data: TextData, cache: bool = True) -> np.ndarray:
    """The token ids of ``data.text`` as one 1-D int array (cached on disk)."""
    key = hashlib.sha256(f"{tokenizer_fingerprint(tokenizer)}:{data.fingerprint}".encode()).hexdigest()[:24]
    path = cache_dir("tokens") / f"{key}.npy" if cache else None
    if path is not None and path.exists():
        return np.load(path)
    pieces = tokenizer(_chunks(data.text), add_special_tokens=False)["input_ids"]
    dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max else np.int32
    ids = np.fromiter((t for p in pieces for t in p), dtype=dtype)
    if path is not None:
        import io

        buf = io.BytesIO()
        np.save(buf, ids)
        atomic_write_bytes(path, buf.getvalue())
    return ids


def check_length(tokens: np.ndarray, seq_len: int, what: str) -> None:
    if len(tokens) < seq_len:
        raise UserError(
            f"{what} has {len(tokens)} tokens, fewer than one window of {seq_len} tokens; "
            "give more data or a smaller --seq-len"
        )


def eval_windows(tokens: np.ndarray, seq_len: int, max_tokens: int | None = None) -> torch.Tensor:
    """Non-overlapping windows ``(N, seq_len)`` covering the stream; the tail shorter than a window is dropped."""
    if max_tokens:
        tokens = tokens[:max_tokens]
    check_length(tokens, seq_len, "evaluation data")
    n = len(tokens) // seq_len
    return torch.from_numpy(tokens[: n * seq_len].astype(np.int64)).view(n, seq_len)


class WindowSampler:
    """Random training windows; the global batch of step ``s`` depends only on ``(seed, s)``.

    Each of ``world`` processes takes rows ``rank::world`` of the global batch, so a distributed run
    sees exactly the sequences a single process would.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int = 0, rank: int = 0,
                 world: int = 1, what: str = "training data"):
        check_length(tokens, seq_len + 1, what)
        if batch_size % world:
            raise UserError(f"batch size {batch_size} is not divisible by the {world} processes")
        self.tokens = torch.from_numpy(tokens.astype(np.int64))
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.rank, self.world = rank, world

    def __call__(self, step: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, step])
        starts = rng.integers(0, len(self.tokens) - self.seq_len + 1, size=self.batch_size)
        starts = torch.from_numpy(starts[self.rank :: self.world])
        idx = starts[:, None] + torch.arange(self.seq_len)[None, :]  # (B_local, T)
        return {"input_ids": self.tokens[idx]}
