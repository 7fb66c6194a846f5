"""The one pipeline every job runs: load a model, open data, apply a method, train, evaluate, record.

The CLI (``efficientgpt tune``), the benchmark harness and the tests call :func:`tune`; data specs
open through :func:`open_data`, which returns a :class:`DataSource` that knows how to feed the Trainer
and how to score a model (perplexity for text, the task metric for ``task:NAME``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch

from efficientgpt.errors import UserError
from efficientgpt.train.config import TrainConfig

Batch = dict[str, torch.Tensor]


class DataSource(Protocol):
    """What the pipeline needs from data: training batches, a score, an identity."""

    spec: str
    fingerprint: str

    def train_batches(self, cfg: TrainConfig, rank: int, world: int) -> Callable[[int], Batch]: ...

    def evaluate(self, model, cfg: TrainConfig) -> dict[str, float]:
        """Metrics on the validation split; always holds ``loss`` (mean NLL per scored token)."""
        ...

    def describe(self) -> dict[str, Any]: ...


@dataclasses.dataclass
class TextSource:
    """Plain text (embedded corpus, files, ``hf:`` datasets): windows for training, perplexity to score."""

    spec: str
    tokenizer: Any
    eval_tokens: int | None = 65536

    def __post_init__(self) -> None:
        from efficientgpt.data import sources, tokens

        self.train_text = sources.load_text(self.spec, "train")
        self.val_text = sources.load_text(self.spec, "validation")
        self.train_ids = tokens.encode(self.tokenizer, self.train_text)
        self.val_ids = tokens.encode(self.tokenizer, self.val_text)
        self.fingerprint = self.train_text.fingerprint

    def train_batches(self, cfg: TrainConfig, rank: int = 0, world: int = 1) -> Callable[[int], Batch]:
        from efficientgpt.data.tokens import WindowSampler

        return WindowSampler(self.train_ids, cfg.seq_len, cfg.batch_size, seed=cfg.seed, rank=rank, world=world)

    def evaluate(self, model, cfg: TrainConfig) -> dict[str, float]:
        from efficientgpt.eval.perplexity import perplexity

        r = perplexity(model, self.val_ids, cfg.seq_len, batch_size=16, max_tokens=self.eval_tokens)
        return {"loss": r.loss, "perplexity": r.perplexity, "tokens": r.tokens}

    def describe(self) -> dict[str, Any]:
        return {"spec": self.spec, "train": self.train_text.describe(), "validation": self.val_text.describe(),
                "eval_tokens": self.eval_tokens}


#: Openers for data-spec prefixes other than plain text (``task:`` registers here).
OPENERS: dict[str, Callable[..., DataSource]] = {}


def open_data(spec: str, tokenizer, eval_tokens: int | None = 65536) -> DataSource:
    prefix = spec.split(":", 1)[0] + ":" if ":" in spec else ""
    if prefix in OPENERS:
        return OPENERS[prefix](spec, tokenizer, eval_tokens=eval_tokens)
    if prefix == "task:":
        import efficientgpt.data.tasks  # noqa: F401 - registers the task opener

        if prefix in OPENERS:
            return OPENERS[prefix](spec, tokenizer, eval_tokens=eval_tokens)
    return TextSource(spec, tokenizer, eval_tokens)


def default_train_config(model, **overrides) -> TrainConfig:
    """The fine-tuning defaults: 100 steps, 10% warmup (at most 10), sequences of min(128, context)."""
    from efficientgpt.eval.perplexity import default_seq_len

    steps = overrides.pop("steps", None) or 100
    kwargs = {"steps": steps, "warmup_steps": min(10, steps // 10), "seq_len": min(128, default_seq_len(model)),
              "save_trainable_only": True, **overrides}
    cfg = TrainConfig(**kwargs)
    cfg.validate()
    return cfg


def _exp(x: float | None) -> float | None:
    return math.exp(x) if x is not None and x < 700 else None


def tune(model_spec: str, method: str, method_config, data: str = "embedded:code", out: str | Path | None = None,
         train: dict[str, Any] | TrainConfig | None = None, resume: bool = False, eval_tokens: int | None = 65536,
         device: str = "auto", trust_remote_code: bool = False, log: Callable[[str], None] | None = None,
         loaded=None) -> dict[str, Any]:
    """Attach ``method`` to ``model_spec``, train it on ``data`` and save the delta to ``out``.

    Returns the run summary (also written to ``out/result.json``): parameter counts, delta bytes,
    training curve and speed, and the validation metrics before and after training.
    """
    from efficientgpt.models.loading import load_model
    from efficientgpt.peft import core
    from efficientgpt.registry import get
    from efficientgpt.train import distributed
    from efficientgpt.train.losses import causal_lm_loss
    from efficientgpt.train.trainer import Trainer

    spec = get(method)
    dist = distributed.init(device)
    t0 = time.perf_counter()
    if loaded is None:
        loaded = load_model(model_spec, trust_remote_code=trust_remote_code, device=dist.device,
                            progress=dist.is_main)
    model = loaded.model
    train_cfg = train if isinstance(train, TrainConfig) else default_train_config(model, **(train or {}))
    source = open_data(data, loaded.tokenizer, eval_tokens)
    before = source.evaluate(model, train_cfg) if dist.is_main else None
    torch.manual_seed(train_cfg.seed)
    delta = spec.apply(model, method_config)
    counts = core.count_parameters(model)
    if log:
        log(f"{method} on {model_spec}: {counts['trainable']:,} trainable of {counts['total']:,} parameters "
            f"({counts['trainable_pct']:.3f}%)")
    batches, loss_fn = source.train_batches(train_cfg, dist.rank, dist.world), causal_lm_loss
    if hasattr(delta, "training_objective"):  # a method's own batches and loss (T-Few's option-level losses)
        batches, loss_fn = delta.training_objective(source, train_cfg, dist.rank, dist.world)
    trainer = Trainer(
        model, train_cfg, batches, out_dir=out,
        eval_fn=(lambda m: source.evaluate(m, train_cfg)["loss"]) if dist.is_main else None,
        fingerprint={"data": source.fingerprint, "method": method,
                     "method_config": json.loads(json.dumps(method_config.to_dict(), default=str)),
                     "base": delta.base_fingerprint},
        dist=dist, step_callbacks=[delta.on_step_begin], loss_fn=loss_fn,
    )
    result = trainer.train(resume=resume)
    summary: dict[str, Any] = {
        "path": str(out) if out else None,
        "method": method,
        "family": spec.family,
        "config": method_config.to_dict(),
        "train_config": train_cfg.to_dict(),
        "model": loaded.describe(),
        "data": source.describe(),
        "parameters": counts,
        "delta_bytes": sum(t.numel() * t.element_size() for t in delta.state_dict().values()),
        "train": result.to_dict(),
    }
    if dist.is_main:
        after = source.evaluate(model, train_cfg)
        summary["eval"] = {"before": before, "after": after, "loss_before": before["loss"],
                           "loss_after": after["loss"], "ppl_before": _exp(before["loss"]),
                           "ppl_after": _exp(after["loss"])}
        if out is not None:
            core.save_delta(delta, out, extra={"base_model": {"spec": model_spec, "path": loaded.path}})
            summary["delta_files_bytes"] = sum(f.stat().st_size for f in Path(out).glob("delta*"))
        summary["wall_s"] = time.perf_counter() - t0
        if out is not None:
            from efficientgpt.cache import atomic_write_json

            atomic_write_json(Path(out) / "result.json", json.loads(json.dumps(summary, default=str)))
    distributed.barrier()
    summary["delta"] = delta
    summary["loaded"] = loaded
    return summary


def compress(model_spec: str, method: str, method_config, out: str | Path | None = None, calibration=None,
             eval_data: str = "embedded:prose", eval_tokens: int | None = 65536, device: str = "auto",
             trust_remote_code: bool = False, progress: bool = True, log: Callable[[str], None] | None = None,
             loaded=None) -> dict[str, Any]:
    """Compress ``model_spec`` with ``method``; report what was achieved and perplexity before/after.

    Calibrated methods draw their windows from ``calibration`` (a
    :class:`~efficientgpt.compress.calibration.CalibrationConfig`); evaluation uses the validation
    split of ``eval_data`` (held-out prose by default). The compressed model is saved to ``out``.
    """
    from efficientgpt.compress.calibration import CalibrationConfig, calibration_windows
    from efficientgpt.compress.io import save_compressed
    from efficientgpt.compress.report import parameter_bytes
    from efficientgpt.data import sources, tokens
    from efficientgpt.eval.perplexity import default_seq_len, perplexity
    from efficientgpt.models.loading import load_model
    from efficientgpt.registry import get
    from efficientgpt.train import distributed

    spec = get(method)
    if spec.family == "peft":
        raise UserError(f"{method!r} is a fine-tuning method; use 'efficientgpt tune --method {method}'")
    method_config.validate()
    calibration = calibration or CalibrationConfig()
    calibration.validate()
    t0 = time.perf_counter()
    if loaded is None:
        loaded = load_model(model_spec, trust_remote_code=trust_remote_code,
                            device=distributed.pick_device(device), progress=progress)
    model = loaded.model
    seq_len = min(512, default_seq_len(model))
    val = sources.load_text(eval_data, "validation")
    val_ids = tokens.encode(loaded.tokenizer, val)
    before = perplexity(model, val_ids, seq_len, batch_size=8, max_tokens=eval_tokens)
    size_before = parameter_bytes(model)
    windows = calibration_windows(loaded.tokenizer, model, calibration) if spec.calibration else None
    t1 = time.perf_counter()
    result = spec.apply(model, method_config, windows=windows, progress=progress) if spec.calibration else \
        spec.apply(model, method_config, progress=progress)
    compress_s = time.perf_counter() - t1
    after = perplexity(model, val_ids, seq_len, batch_size=8, max_tokens=eval_tokens)
    summary: dict[str, Any] = {
        "path": str(out) if out else None,
        "method": method,
        "family": spec.family,
        "config": method_config.to_dict(),
        "calibration": calibration.to_dict() if spec.calibration else None,
        "model": loaded.describe(),
        "eval": {"data": val.describe(), "seq_len": seq_len, "tokens": before.tokens,
                 "loss_before": before.loss, "loss_after": after.loss,
                 "ppl_before": before.perplexity, "ppl_after": after.perplexity},
        "achieved": result.achieved,
        "size_before": size_before,
        "size_after": parameter_bytes(model),
        "notes": result.notes,
        "compress_s": compress_s,
    }
    if out is not None:
        save_compressed(model, loaded.tokenizer, out, {k: v for k, v in summary.items() if k != "path"},
                        result.modules)
        summary["files_bytes"] = sum(f.stat().st_size for f in Path(out).glob("*.safetensors"))
    summary["wall_s"] = time.perf_counter() - t0
    summary["per_layer"] = result.per_layer
    summary["loaded"] = loaded
    return summary
