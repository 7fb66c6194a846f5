"""The one JSON schema of a benchmark run, and its validator.

Every run of ``efficientgpt bench`` (one method, or the untouched base model, or Hugging Face PEFT's
implementation of a method) is one JSON file in the results directory. Reports, plots, the README's
results section and the survey's "measured" column are all rendered from these files. The layout
(documented field by field in ``docs/bench.md``)::

    {
      "schema": "efficientgpt-bench-run", "schema_version": 1,
      "name": "lora",                  # file stem; unique in a results directory
      "method": "lora",                # registry name; "base" for the untouched model; "peft:lora" for PEFT's
      "family": "peft",                # registry family; "baseline" for base
      "kind": "tune",                  # tune | compress | baseline | peft_anchor | unsupported
      "implementation": "efficientgpt",  # or "hf-peft"
      "pair": null,                    # peft_anchor: the name of our run it is compared with
      "status": "ok",                  # ok | failed | skipped
      "error": null,                   # failed/skipped: {"type", "message", "traceback"}
      "key": "…",                      # hash of everything that determines the run (skip/rerun decision)
      "config": {...}, "train_config": {...} | null, "calibration": {...} | null,
      "model": {"spec", "model_type", "parameters", "config_sha256"},
      "data": {"train", "eval", "train_sha256", "eval_sha256", "eval_tokens"},
      "environment": {"python", "platform", "torch", "transformers", "peft", "efficientgpt",
                      "device", "device_name", "threads", "world_size", "load_average"?},
      "bench": {"quick", "seed", "steps", "batch_size", "seq_len", "train_tokens", "lr", "latency_tokens"},
      "metrics": {...},                # see METRICS
      "curves": {"train": [{"step", "loss", "lr", "grad_norm"}], "eval": [{"step", "eval_loss"}]},
      "notes": ["…"],
      "created": "2025-01-01T00:00:00Z"
    }

It is a superset of what :mod:`efficientgpt.survey.results` reads (``method``, ``status`` and
``metrics.val_ppl`` / ``accuracy`` / ``trainable_params`` / ``trainable_pct``).
"""

from __future__ import annotations

import math
from typing import Any

SCHEMA = "efficientgpt-bench-run"
SCHEMA_VERSION = 1

STATUSES = ("ok", "failed", "skipped")
KINDS = ("tune", "compress", "baseline", "peft_anchor", "unsupported")
IMPLEMENTATIONS = ("efficientgpt", "hf-peft")

_NUM = (int, float)
_OPT_NUM = (int, float, type(None))
_OPT_INT = (int, type(None))
_OPT_STR = (str, type(None))
_OPT_DICT = (dict, type(None))

#: Top-level fields: name -> allowed types (every field is required; ``None`` where it does not apply).
FIELDS: dict[str, tuple[type, ...]] = {
    "schema": (str,),
    "schema_version": (int,),
    "name": (str,),
    "method": (str,),
    "family": (str,),
    "kind": (str,),
    "implementation": (str,),
    "pair": _OPT_STR,
    "status": (str,),
    "error": _OPT_DICT,
    "key": (str,),
    "config": (dict,),
    "train_config": _OPT_DICT,
    "calibration": _OPT_DICT,
    "model": (dict,),
    "data": (dict,),
    "environment": (dict,),
    "bench": (dict,),
    "metrics": (dict,),
    "curves": (dict,),
    "notes": (list,),
    "created": (str,),
}

#: Metrics: name -> (allowed types, meaning). All are optional; absent or ``null`` means "not measured".
METRICS: dict[str, tuple[tuple[type, ...], str]] = {
    "val_loss": (_OPT_NUM, "mean NLL per predicted token on the evaluation data's validation split (nats)"),
    "val_ppl": (_OPT_NUM, "exp(val_loss)"),
    "val_loss_before": (_OPT_NUM, "val_loss of the base model on the same evaluation data"),
    "val_ppl_before": (_OPT_NUM, "exp(val_loss_before)"),
    "accuracy": (_OPT_NUM, "task accuracy (task data only)"),
    "trainable_params": (_OPT_INT, "parameters that train (PEFT); null for compression"),
    "trainable_pct": (_OPT_NUM, "trainable_params as % of the base model's parameters"),
    "total_params": (_OPT_INT, "parameters of the model as run (base + delta, or the compressed model)"),
    "artifact_bytes": (_OPT_INT, "bytes on disk of what the method produces: the saved delta, the compressed "
                                 "model's safetensors, or (base) the base model's safetensors"),
    "peak_memory_bytes": (_OPT_INT, "peak memory above the level at entry during the tune/compress call: CUDA "
                                    "max_memory_allocated; on CPU the bytes in use by malloc (glibc mallinfo2), "
                                    "sampled every millisecond, or the process RSS where mallinfo2 is missing"),
    "peak_memory_source": (_OPT_STR, "what peak_memory_bytes counts: cuda, malloc or rss"),
    "step_time_s": (_OPT_NUM, "mean wall time per optimizer step"),
    "tokens_per_s": (_OPT_NUM, "supervised training tokens per second (tokens with a label: every token of plain "
                               "text; the answers of task data)"),
    "train_loss": (_OPT_NUM, "training loss of the last step"),
    "latency_ms_per_token": (_OPT_NUM, "greedy decoding with the KV cache at batch 1: milliseconds per new token "
                                       "(prefill excluded)"),
    "compress_s": (_OPT_NUM, "wall time of the compression pass alone"),
    "wall_s": (_OPT_NUM, "wall time of the whole run (evaluation and saving included)"),
    "achieved": (_OPT_DICT, "compression: what the method reports it achieved (sparsity, ratio, bits, ...)"),
    "sparsity": (_OPT_NUM, "compression: fraction of zero parameters over the whole model after compression"),
    "size_ratio": (_OPT_NUM, "compression: artifact_bytes / the base model's bytes on disk"),
    "params_before": (_OPT_INT, "compression: parameters before"),
    "params_after": (_OPT_INT, "compression: parameters after"),
    "nonzero_params_after": (_OPT_INT, "compression: nonzero parameters after"),
    "ppl_per_rank": (_OPT_DICT, "methods exposing loss_per_rank (DyLoRA): {rank: validation perplexity}"),
    "loss_per_rank": (_OPT_DICT, "methods exposing loss_per_rank (DyLoRA): {rank: validation loss}"),
    "quality": (_OPT_DICT, "baseline: {data spec: {loss, ppl, tokens}} for every evaluation data of the bench"),
}

ENVIRONMENT_FIELDS = ("python", "platform", "torch", "transformers", "peft", "efficientgpt", "device",
                      "device_name", "threads", "world_size")
MODEL_FIELDS = ("spec", "model_type", "parameters", "config_sha256")
DATA_FIELDS = ("train", "eval", "train_sha256", "eval_sha256", "eval_tokens")


def problems(run: Any) -> list[str]:
    """Everything wrong with ``run`` as a benchmark-run object (empty when it is valid)."""
    if not isinstance(run, dict):
        return [f"a run is a JSON object, got {type(run).__name__}"]
    out = []
    for name, types in FIELDS.items():
        if name not in run:
            out.append(f"missing field {name!r}")
        elif not isinstance(run[name], types) or isinstance(run[name], bool) and bool not in types:
            out.append(f"field {name!r} has type {type(run[name]).__name__}, expected "
                       + " or ".join("null" if t is type(None) else t.__name__ for t in types))
    extra = sorted(set(run) - set(FIELDS))
    if extra:
        out.append(f"unknown field(s) {', '.join(extra)}")
    if out:
        return out
    if run["schema"] != SCHEMA:
        out.append(f"schema is {run['schema']!r}, expected {SCHEMA!r}")
    if run["schema_version"] != SCHEMA_VERSION:
        out.append(f"schema_version is {run['schema_version']}, expected {SCHEMA_VERSION}")
    for name, allowed in (("status", STATUSES), ("kind", KINDS), ("implementation", IMPLEMENTATIONS)):
        if run[name] not in allowed:
            out.append(f"{name} is {run[name]!r}, expected one of {', '.join(allowed)}")
    if run["status"] == "ok" and run["error"] is not None:
        out.append("status 'ok' with a non-null error")
    if run["status"] != "ok":
        err = run["error"]
        if not isinstance(err, dict) or not isinstance(err.get("message"), str) or not isinstance(err.get("type"), str):
            out.append(f"status {run['status']!r} needs error {{type, message}}")
    if run["kind"] == "peft_anchor" and not isinstance(run["pair"], str):
        out.append("a peft_anchor run names the run it is compared with in 'pair'")
    for section, names in (("environment", ENVIRONMENT_FIELDS), ("model", MODEL_FIELDS), ("data", DATA_FIELDS)):
        missing = [n for n in names if n not in run[section]]
        if missing:
            out.append(f"{section} lacks {', '.join(missing)}")
    for name, value in run["metrics"].items():
        if name not in METRICS:
            out.append(f"unknown metric {name!r}")
            continue
        types = METRICS[name][0]
        if isinstance(value, bool) or not isinstance(value, types):
            out.append(f"metric {name!r} has type {type(value).__name__}")
        elif isinstance(value, float) and not math.isfinite(value):
            out.append(f"metric {name!r} is not finite ({value}); write null instead")
    for name, points in run["curves"].items():
        if not isinstance(points, list) or not all(isinstance(p, dict) and "step" in p for p in points):
            out.append(f"curve {name!r} is not a list of {{step, ...}} points")
    if not all(isinstance(n, str) for n in run["notes"]):
        out.append("notes must be strings")
    return out


def validate(run: Any) -> None:
    """Raise ``ValueError`` listing every problem of ``run`` (see :func:`problems`)."""
    found = problems(run)
    if found:
        name = run.get("name", "?") if isinstance(run, dict) else "?"
        raise ValueError(f"benchmark run {name!r} does not match the schema:\n  " + "\n  ".join(found))


def number(value: Any) -> float | None:
    """``value`` as a float when it is a finite number (not a bool); otherwise ``None``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def finite(value: Any) -> Any:
    """``value`` with non-finite floats (NaN, inf) replaced by ``None``, recursively (JSON has no NaN)."""
    if isinstance(value, dict):
        return {str(k): finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item") and callable(value.item) and not isinstance(value, (str, bytes)):
        try:
            return finite(value.item())
        except (TypeError, ValueError):
            return str(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
