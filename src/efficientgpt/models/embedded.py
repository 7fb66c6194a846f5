"""The embedded default: a small Llama-style model pretrained on the embedded prose corpus.

``efficientgpt pretrain`` (or the first use of ``--model embedded`` / ``embedded:tiny``) trains the
preset with the shared :class:`~efficientgpt.train.Trainer` on the prose train split, with the
embedded byte-level BPE, and saves it with ``save_pretrained`` (safetensors) plus the tokenizer into
``$EFFICIENTGPT_CACHE/models/<preset>-<key>``, where the key hashes the corpus fingerprint, the
tokenizer and the preset's full config; later uses load it from there.

Presets: ``default`` (a few million parameters; minutes on 2 CPU cores) and ``tiny`` (seconds, for
tests and quick runs).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any

from efficientgpt.cache import cache_dir, file_lock, publish_files, stable_hash, staging_dir
from efficientgpt.config import ConfigBase, field
from efficientgpt.errors import UserError


@dataclasses.dataclass
class EmbeddedPreset(ConfigBase):
    """Architecture and pretraining budget of an embedded model."""

    name: str = field("default", "preset name")
    hidden: int = field(256, "hidden size", minimum=8)
    layers: int = field(4, "decoder layers", minimum=1)
    heads: int = field(8, "attention heads", minimum=1)
    intermediate: int = field(688, "MLP intermediate size (SwiGLU)", minimum=1)
    seq_len: int = field(128, "context length trained and evaluated", minimum=8)
    vocab_size: int = field(4096, "BPE vocabulary size", minimum=260)
    steps: int = field(600, "pretraining optimizer steps", minimum=1)
    batch_size: int = field(16, "sequences per step", minimum=1)
    lr: float = field(2e-3, "peak learning rate", minimum=0.0, exclusive_minimum=True)
    warmup_steps: int = field(30, "warmup steps", minimum=0)
    weight_decay: float = field(0.1, "AdamW weight decay", minimum=0.0)
    seed: int = field(0, "seed")

    def model_config(self, tokenizer):
        from transformers import LlamaConfig

        eos = tokenizer.eos_token_id
        return LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=self.hidden, intermediate_size=self.intermediate,
            num_hidden_layers=self.layers, num_attention_heads=self.heads, num_key_value_heads=self.heads,
            max_position_embeddings=self.seq_len, tie_word_embeddings=True, bos_token_id=eos,
            eos_token_id=eos, pad_token_id=eos, rms_norm_eps=1e-5,
        )


PRESETS: dict[str, EmbeddedPreset] = {
    "default": EmbeddedPreset(),
    "tiny": EmbeddedPreset(name="tiny", hidden=64, layers=2, heads=4, intermediate=172, seq_len=64,
                           steps=80, batch_size=16, lr=3e-3, warmup_steps=8),
}


def preset_of(spec: str) -> EmbeddedPreset:
    name = spec.split(":", 1)[1] if ":" in spec else "default"
    if name not in PRESETS:
        raise UserError(f"unknown embedded preset {name!r} in {spec!r}; choose embedded or "
                        + ", ".join(f"embedded:{p}" for p in PRESETS))
    return PRESETS[name]


def _key(preset: EmbeddedPreset, tokenizer_path: Path, corpus_sha: str) -> str:
    return stable_hash([preset.to_dict(), tokenizer_path.name, corpus_sha])


def cached_path(preset: EmbeddedPreset) -> Path:
    from efficientgpt.data.corpus import corpus_text, fingerprint
    from efficientgpt.data.tokenizer import embedded_tokenizer

    _, tok_path = embedded_tokenizer(preset.vocab_size)
    return cache_dir("models") / f"{preset.name}-{_key(preset, tok_path, fingerprint(corpus_text('prose', 'train')))}"


def ensure_embedded(preset: EmbeddedPreset, progress: bool = True) -> Path:
    """The cached directory of ``preset``, pretraining it first if it is not there yet."""
    path = cached_path(preset)
    if (path / "config.json").exists():
        return path
    with file_lock(path.with_name(path.name + ".lock")):
        if not (path / "config.json").exists():
            pretrain(preset, out=path, progress=progress, resume=True)
            shutil.rmtree(path / "checkpoints", ignore_errors=True)  # the cache keeps only the model
    return path


def pretrain(preset: EmbeddedPreset, out: str | Path, progress: bool = True, resume: bool = False,
             dist=None, device: str = "auto", steps: int | None = None, log=None) -> dict[str, Any]:
    """Pretrain ``preset`` on the prose train split and save it to ``out`` (atomically).

    Checkpoints go to ``<out>/checkpoints`` every 100 steps so a killed run resumes with
    ``resume=True``; the model files are moved into ``out`` only when complete, ``config.json`` last,
    so a directory with a ``config.json`` always holds a whole model. Returns the run's metrics,
    including validation perplexity on prose and code.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from efficientgpt.data import sources, tokens
    from efficientgpt.data.tokenizer import embedded_tokenizer
    from efficientgpt.eval.perplexity import perplexity
    from efficientgpt.train import distributed
    from efficientgpt.train.trainer import TrainConfig, Trainer

    if steps is not None:
        preset = dataclasses.replace(preset, steps=steps)
    preset.validate()
    dist = dist or distributed.init(device)
    out = Path(out)
    t0 = time.perf_counter()
    tokenizer, tok_path = embedded_tokenizer(preset.vocab_size)
    train_text = sources.load_text("embedded:prose", "train")
    train_ids = tokens.encode(tokenizer, train_text)
    val_ids = {d: tokens.encode(tokenizer, sources.load_text(f"embedded:{d}", "validation")) for d in ("prose", "code")}
    torch.manual_seed(preset.seed)
    model = AutoModelForCausalLM.from_config(preset.model_config(tokenizer)).to(dist.device)
    cfg = TrainConfig(
        steps=preset.steps, batch_size=preset.batch_size, seq_len=preset.seq_len, lr=preset.lr,
        warmup_steps=min(preset.warmup_steps, preset.steps - 1), weight_decay=preset.weight_decay,
        seed=preset.seed, save_every=100, log_every=10, eval_every=0, save_trainable_only=False,
        progress=progress, eval_batches=0,
    )
    sampler = tokens.WindowSampler(train_ids, preset.seq_len, preset.batch_size, seed=preset.seed,
                                   rank=dist.rank, world=dist.world)

    def eval_prose(m) -> float:
        return perplexity(m, val_ids["prose"], preset.seq_len, batch_size=16).loss

    trainer = Trainer(model, cfg, sampler, out_dir=out, eval_fn=eval_prose,
                      fingerprint={"data": train_text.fingerprint, "tokenizer": tok_path.name}, dist=dist)
    result = trainer.train(resume=resume)
    metrics: dict[str, Any] = {"preset": preset.name, "path": str(out)}
    if dist.is_main:
        for domain, ids in val_ids.items():
            r = perplexity(model, ids, preset.seq_len, batch_size=16)
            metrics[f"val_ppl_{domain}"] = r.perplexity
            metrics[f"val_loss_{domain}"] = r.loss
        with staging_dir(out) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            (tmp / "efficientgpt_pretrain.json").write_text(json.dumps(
                {"preset": preset.to_dict(), "train": result.to_dict(), "data_sha256": train_text.fingerprint},
                indent=2, default=str))
            publish_files(tmp, out, last="config.json")
    distributed.barrier()
    metrics.update({
        "parameters": sum(p.numel() for p in model.parameters()),
        "steps": result.steps,
        "final_train_loss": result.final_loss,
        "tokens": result.tokens,
        "tokens_per_s": result.tokens_per_s,
        "wall_s": time.perf_counter() - t0,
        "data_sha256": train_text.fingerprint,
        "world_size": dist.world,
        "resumed_from": result.resumed_from,
    })
    return metrics
