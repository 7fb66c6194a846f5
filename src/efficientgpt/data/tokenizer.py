"""The embedded tokenizer: a byte-level BPE trained on the prose train split.

Trained with the ``tokenizers`` library (GPT-2's byte-level scheme: every byte is a base symbol, so
any text, code included, encodes without unknown tokens) and wrapped as a standard
``PreTrainedTokenizerFast``; ``<|endoftext|>`` separates documents and serves as eos, bos and pad.
"""

from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedTokenizerFast

from efficientgpt.cache import atomic_dir, cache_dir, file_lock, stable_hash
from efficientgpt.data.corpus import DOC_SEPARATOR, corpus_text, fingerprint

EOS = "<|endoftext|>"
DEFAULT_VOCAB_SIZE = 4096


def train_tokenizer(texts: list[str], vocab_size: int = DEFAULT_VOCAB_SIZE) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=EOS, unk_token=None,
        model_max_length=1 << 30,
    )


def embedded_tokenizer(vocab_size: int = DEFAULT_VOCAB_SIZE) -> tuple[PreTrainedTokenizerFast, Path]:
    """The embedded BPE (trained once, cached by corpus fingerprint and vocabulary size) and its dir."""
    text = corpus_text("prose", "train")
    key = stable_hash(["bpe", fingerprint(text), vocab_size])
    root = cache_dir("tokenizer")
    path = root / key
    if not (path / "tokenizer.json").exists():
        with file_lock(root / f"{key}.lock"):
            if not (path / "tokenizer.json").exists():
                tok = train_tokenizer(text.split(DOC_SEPARATOR), vocab_size)
                with atomic_dir(path) as tmp:
                    tok.save_pretrained(tmp)
    return PreTrainedTokenizerFast.from_pretrained(path), path
