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
         loaded=None, quantize: str = "none", quantize_compute_dtype: str = "auto",
         source: DataSource | None = None) -> dict[str, Any]:
    """Attach ``method`` to ``model_spec``, train it on ``data`` and save the delta to ``out``.

    ``loaded`` and ``source`` let a caller that runs many jobs on one model and one data set (the
    benchmark harness) pass them already loaded: ``source`` must be ``open_data(data,
    loaded.tokenizer, eval_tokens)``.

    Returns the run summary (also written to ``out/result.json``): parameter counts, delta bytes,
    training curve and speed, and the validation metrics before and after training.

    ``quantize="nf4"`` is QLoRA (:mod:`efficientgpt.train.quantize`): the decoder blocks' linear
    layers are stored in NF4 before the method attaches, the validation metrics are those of the
    quantized model, and on CUDA the optimizer defaults to ``paged_adamw``. The delta is saved as
    usual and records the base's fingerprint from before quantization, so ``eval --delta`` and
    ``merge`` use it with the unquantized base model. Under ``train.fsdp`` the delta's tensors are
    gathered to rank 0 to be saved and rank 0 evaluates on the gathered parameters.
    """
    from efficientgpt.models.loading import load_model
    from efficientgpt.peft import core
    from efficientgpt.registry import get
    from efficientgpt.train import distributed
    from efficientgpt.train.losses import causal_lm_loss
    from efficientgpt.train.quantize import QUANTIZE_CHOICES, quantize_model
    from efficientgpt.train.trainer import Trainer

    spec = get(method)
    if quantize not in QUANTIZE_CHOICES:
        raise UserError(f"quantize {quantize!r} is not allowed; choose one of {', '.join(QUANTIZE_CHOICES)}")
    dist = distributed.init(device)
    t0 = time.perf_counter()
    if loaded is None:
        loaded = load_model(model_spec, trust_remote_code=trust_remote_code, device=dist.device,
                            progress=dist.is_main)
    model = loaded.model
    if quantize != "none" and isinstance(train, dict) and "optimizer" not in train and dist.device.type == "cuda":
        train = {**train, "optimizer": "paged_adamw"}  # QLoRA's paged optimizer (Dettmers et al., 2023, §3)
    train_cfg = train if isinstance(train, TrainConfig) else default_train_config(model, **(train or {}))
    if quantize != "none" and train_cfg.fsdp:
        raise UserError("fsdp cannot shard a 4-bit quantized (QLoRA) base model: drop --fsdp (one process or "
                        "DDP) or --quantize")
    if source is None:
        source = open_data(data, loaded.tokenizer, eval_tokens)
    quantization = None
    unquantized_fingerprint = None
    if quantize == "nf4":
        unquantized_fingerprint = core.base_fingerprint(model)
        quantization = quantize_model(model, compute_dtype=quantize_compute_dtype)
        if log:
            log(f"quantized {quantization['modules']} linear layers to NF4: {quantization['bytes_before']:,} -> "
                f"{quantization['bytes_after']:,} bytes ({quantization['bits_per_parameter']:.2f} bits/parameter)")
    before = source.evaluate(model, train_cfg) if dist.is_main else None
    torch.manual_seed(train_cfg.seed)
    delta = spec.apply(model, method_config)
    if quantization is not None:
        _check_quantized_frozen(model, delta, method)
        _use_unquantized_fingerprint(model, delta, unquantized_fingerprint)
    if train_cfg.fsdp and type(delta).prepare_for_saving is not core.Delta.prepare_for_saving:
        raise UserError(f"{method} folds its tensors before saving, which fsdp does not support: train it on one "
                        "process or with DDP (torchrun without --fsdp)")
    counts = core.count_parameters(model)
    if log:
        log(f"{method} on {model_spec}: {counts['trainable']:,} trainable of {counts['total']:,} parameters "
            f"({counts['trainable_pct']:.3f}%)")
    fingerprint = {"data": source.fingerprint, "method": method,
                   "method_config": json.loads(json.dumps(method_config.to_dict(), default=str)),
                   "base": delta.base_fingerprint}
    if quantization is not None:
        fingerprint["quantize"] = {k: quantization[k] for k in ("type", "double_quant", "compute_dtype")}
    batches, loss_fn = source.train_batches(train_cfg, dist.rank, dist.world), causal_lm_loss
    if hasattr(delta, "training_objective"):  # a method's own batches and loss (T-Few's option-level losses)
        batches, loss_fn = delta.training_objective(source, train_cfg, dist.rank, dist.world)
    trainer = Trainer(
        model, train_cfg, batches, out_dir=out,
        eval_fn=(lambda m: source.evaluate(m, train_cfg)["loss"]) if dist.is_main else None,
        fingerprint=fingerprint, dist=dist, step_callbacks=[delta.on_step_begin], loss_fn=loss_fn,
    )
    result = trainer.train(resume=resume)
    saved = delta
    if trainer.fsdp:  # the delta's tensors are shards here: gather them (every rank takes part)
        full = trainer.full_state_dict()
        saved = _GatheredDelta(delta, full) if dist.is_main else None
    summary: dict[str, Any] = {
        "path": str(out) if out else None,
        "method": method,
        "family": spec.family,
        "config": method_config.to_dict(),
        "train_config": train_cfg.to_dict(),
        "model": loaded.describe(),
        "data": source.describe(),
        "parameters": counts,
        "delta_bytes": sum(t.numel() * t.element_size() for t in saved.state_dict().values()) if saved else None,
        "train": result.to_dict(),
    }
    if quantization is not None:
        summary["quantize"] = {k: v for k, v in quantization.items() if k != "names"}
    with trainer.unsharded():
        if dist.is_main:
            after = source.evaluate(model, train_cfg)
            summary["eval"] = {"before": before, "after": after, "loss_before": before["loss"],
                               "loss_after": after["loss"], "ppl_before": _exp(before["loss"]),
                               "ppl_after": _exp(after["loss"])}
    if dist.is_main:
        if out is not None:
            extra = {"base_model": {"spec": model_spec, "path": loaded.path}}
            if quantization is not None:
                # The delta was trained against this quantized base; it loads onto the unquantized one.
                extra["base_quantization"] = fingerprint["quantize"]
            core.save_delta(saved, out, extra=extra)
            summary["delta_files_bytes"] = sum(f.stat().st_size for f in Path(out).glob("delta*"))
        summary["wall_s"] = time.perf_counter() - t0
        if out is not None:
            from efficientgpt.cache import atomic_write_json

            atomic_write_json(Path(out) / "result.json", json.loads(json.dumps(summary, default=str)))
    distributed.barrier()
    summary["delta"] = delta
    summary["loaded"] = loaded
    return summary


def _check_quantized_frozen(model, delta, method: str) -> None:
    """QLoRA trains adapters over a frozen 4-bit base; a method that trains base weights cannot run on it."""
    from efficientgpt.peft import core

    trained = [n for n, p in model.named_parameters() if p.requires_grad and type(p).__name__ == "Params4bit"]
    if trained:
        core.remove(model, delta.name)
        raise UserError(f"{method} trains the base weights ({trained[0]}, ...), which --quantize nf4 stores frozen "
                        "in 4 bits: use a method that adds its own tensors (lora, dylora, ia3, adapters, ...)")


def _use_unquantized_fingerprint(model, delta, fingerprint: dict[str, Any]) -> None:
    """The delta names the base it was made for: the unquantized model (with linear shapes, not packed ones)."""
    targets = dict(delta.base_fingerprint.get("targets", {}))
    for t in targets:
        m = model.get_submodule(t)
        if type(getattr(m, "weight", None)).__name__ == "Params4bit":
            targets[t] = [m.out_features, m.in_features]  # (d_out, d_in), as for the unquantized layer
    delta.base_fingerprint = {**delta.base_fingerprint, "config": fingerprint["config"],
                              "weights_sample_sha256": fingerprint["weights_sample_sha256"],
                              "targets": targets}


class _GatheredDelta:
    """What :func:`core.save_delta` reads of a delta, with its tensors gathered from FSDP shards.

    ``full`` maps model names to full tensors; a delta's own tensors sit under
    ``efficientgpt_deltas.<name>.``, full fine-tuning's are the model's parameters by name.
    """

    def __init__(self, delta, full: dict[str, torch.Tensor]):
        from efficientgpt.peft import core

        self.method, self.version, self.name = delta.method, delta.version, delta.name
        self.config, self.base_fingerprint = delta.config, delta.base_fingerprint
        prefix = f"{core.DELTA_ROOT}.{delta.name}."
        self._state = {}
        for key in delta.state_dict():
            tensor = full.get(prefix + key, full.get(key))
            if tensor is None:
                raise UserError(f"gathering the {delta.method} delta: no tensor {key!r} in the model's state")
            self._state[key] = tensor

    def prepare_for_saving(self) -> None:
        pass

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._state


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
