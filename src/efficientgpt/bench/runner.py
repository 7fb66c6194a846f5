"""The benchmark harness: every registered method side by side on one model, one data set, one budget.

:func:`plan` turns the registry (or a suite, or a list of names) into runs; :func:`run_bench` runs
them one after another, each on a fresh copy of the same base model, and writes one JSON file per run
(:mod:`efficientgpt.bench.schema`) into the results directory, atomically, as soon as the run ends.
A bench that is interrupted therefore resumes where it stopped: a run whose file exists with status
``ok`` and the same ``key`` (a hash of everything that determines it) is not run again unless
``force``; failed runs are retried.

What is shared by every run:

* the base model (``model``: the embedded default unless given) and the seed;
* PEFT methods (family ``peft``, ``full`` fine-tuning included) adapt it to ``data`` (default
  ``embedded:code``, the code domain; the embedded model was pretrained on prose) through
  :func:`efficientgpt.pipeline.tune` with the same number of steps, batch size and sequence length,
  i.e. the same token budget; each method uses its learning rate from :data:`LEARNING_RATES` (the
  value conventional for the method, not tuned here) unless ``lr`` overrides them all;
* compression methods (families ``prune``, ``lowrank``, ``quant``, ``attention``) run through
  :func:`efficientgpt.pipeline.compress` with their default configs, calibrate on the train split of
  ``compress_data`` (prose) and are scored on its held-out validation split;
* the baseline run ``base`` scores the untouched model on every evaluation data of the bench.

Families with no pipeline here (``distill``, ``training``) are recorded as ``skipped`` with the reason.
A method that raises is recorded as ``failed`` with its error, and the bench goes on.

What is measured per run: see :data:`efficientgpt.bench.schema.METRICS`. Peak memory is taken by
:class:`~efficientgpt.bench.measure.PeakMemory` around the whole ``tune``/``compress`` call (evaluation
included): on CUDA ``max_memory_allocated``, on CPU the bytes in use by the C allocator (glibc
``mallinfo2``, sampled every millisecond), which earlier runs in the same process do not lower.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import gc
import importlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from efficientgpt.bench import schema
from efficientgpt.config import ConfigBase, field
from efficientgpt.errors import UserError

#: Compression-like families run through ``pipeline.compress``.
COMPRESS_FAMILIES = ("prune", "lowrank", "quant", "attention")
SUITES = ("all", "peft", "compress")

#: Learning rate per method (``--lr`` overrides all). Conventional values for each kind of update,
#: not tuned on this benchmark: the default suits low-rank and bottleneck deltas; full fine-tuning
#: moves every weight and needs less; vectors of scales, soft prompts and prefixes need more. T-Few
#: trains the same (IA)^3 vectors as ``ia3`` (at 3e-3 in its paper), so the two differ only in their
#: losses.
LEARNING_RATES: dict[str, float] = {"full": 3e-4, "ia3": 3e-3, "tfew": 3e-3, "prompt_tuning": 3e-2,
                                    "prefix_tuning": 1e-2}
DEFAULT_LR = 1e-3

BASE = "base"

#: Suite tasks every PEFT method also adapts to by default, both held-out target tasks: kv_lookup
#: (generation, exact match; the embedded default scores 0 before adaptation) and valid_indent
#: (choice, rank classification; 0.57 before), where T-Few's option losses apply.
DEFAULT_TASKS = ("kv_lookup", "valid_indent")


@dataclasses.dataclass
class BenchConfig(ConfigBase):
    """What every run of a bench shares."""

    model: str = field("embedded", "base model spec (hub id, local directory, embedded, embedded:tiny)")
    data: str = field("embedded:code", "data the PEFT methods adapt to (train split) and are scored on (validation)")
    compress_data: str = field("embedded:prose", "data compression methods calibrate on (train split) and are "
                                                 "scored on (validation split)")
    tasks: list[str] = field(list(DEFAULT_TASKS), "suite tasks (task:NAME data) the PEFT methods are also run on "
                                                  "(default: the target tasks kv_lookup and valid_indent)")
    steps: int = field(120, "optimizer steps per PEFT method", minimum=1)
    batch_size: int = field(8, "sequences per step", minimum=1)
    seq_len: int | None = field(None, "tokens per training sequence (default: min(128, model context))", minimum=2)
    lr: float | None = field(None, "learning rate for every method (default: LEARNING_RATES per method)",
                             minimum=0.0, exclusive_minimum=True)
    seed: int = field(0, "seed of initialisation, data order and calibration windows")
    eval_tokens: int = field(16384, "validation tokens scored per evaluation", minimum=1)
    calib_samples: int = field(32, "calibration windows for calibrated compression methods", minimum=1)
    latency_tokens: int = field(32, "new tokens generated to measure decoding latency (0: skip)", minimum=0)
    device: str = field("auto", "cpu, cuda, cuda:N or auto")
    quick: bool = field(False, "the quick preset (recorded in every run)")
    with_peft: bool = field(False, "also run HF PEFT's implementation of the methods it has")
    keep_artifacts: bool = field(False, "keep deltas and compressed models under OUT/artifacts")
    progress: bool = field(True, "progress bars")

    def key_settings(self) -> dict[str, Any]:
        """The settings that determine a run's results (not where or how it is displayed)."""
        d = self.to_dict()
        for k in ("tasks", "with_peft", "keep_artifacts", "progress"):
            d.pop(k)
        return d


#: ``--quick``: the whole registry in a few minutes on 2 CPU cores.
QUICK = {"model": "embedded:tiny", "steps": 30, "batch_size": 8, "eval_tokens": 4096, "calib_samples": 8,
         "latency_tokens": 16}


@dataclasses.dataclass
class Planned:
    """One run of a bench."""

    name: str
    """File stem in the results directory (unique)."""
    method: str
    family: str
    kind: str
    """tune | compress | baseline | peft_anchor | unsupported"""
    config: Any = None
    data: str | None = None
    pair: str | None = None
    """peft_anchor: the name of our run it is compared with."""
    implementation: str = "efficientgpt"
    reason: str | None = None
    """unsupported: why the run is skipped."""

    def config_dict(self) -> dict[str, Any]:
        if self.config is None:
            return {}
        return schema.finite(json.loads(json.dumps(self.config.to_dict(), default=str)))


def _suite_specs(suite: str) -> list:
    from efficientgpt import registry

    if suite not in SUITES:
        raise UserError(f"unknown suite {suite!r}; choose one of {', '.join(SUITES)}")
    specs = registry.methods()
    if suite == "peft":
        return [s for s in specs if s.family == "peft"]
    if suite == "compress":
        return [s for s in specs if s.family in COMPRESS_FAMILIES]
    return specs


def plan(cfg: BenchConfig, suite: str = "all", methods: list[str] | None = None, model=None) -> list[Planned]:
    """The runs of a bench: ``base`` first, then the methods by family and name; unknown names are errors.

    ``model`` (the base model, when loaded) lets ``--with-peft`` see when our config already selects what
    PEFT's does, so no extra run of ours is needed for the comparison.
    """
    from efficientgpt import registry

    if methods:
        names = [m for m in methods if m != BASE]
        specs = [registry.get(n) for n in dict.fromkeys(names)]  # an unknown name lists the registered ones
        specs.sort(key=lambda s: (registry.FAMILIES.index(s.family), s.name))
    else:
        specs = _suite_specs(suite)
    runs = [Planned(BASE, BASE, "baseline", "baseline")]
    datas = [cfg.data] + [f"task:{t}" for t in cfg.tasks]
    for spec in specs:
        config = spec.config_cls()
        if spec.family == "peft":
            for data in datas:
                suffix = "" if data == cfg.data else "-task-" + data.split(":", 1)[1]
                if spec.task_data and not data.startswith("task:"):
                    runs.append(Planned(spec.name + suffix, spec.name, spec.family, "unsupported", config, data,
                                        reason=f"{spec.name} trains on task data only (task:NAME), not on {data}; "
                                               "it runs on the bench's tasks (--tasks)"))
                    continue
                runs.append(Planned(spec.name + suffix, spec.name, spec.family, "tune", config, data))
                if cfg.with_peft and spec.name in _anchored():
                    from efficientgpt.bench import peft_anchor

                    ours = peft_anchor.ours_config(spec.name, config, model)
                    pair = spec.name + suffix
                    if ours is not config and ours != config:
                        pair = f"{spec.name}-peft_compatible{suffix}"
                        runs.append(Planned(pair, spec.name, spec.family, "tune", ours, data))
                    runs.append(Planned(f"peft-{spec.name}{suffix}", f"peft:{spec.name}", spec.family,
                                        "peft_anchor", ours, data, pair=pair, implementation="hf-peft"))
        elif spec.family in COMPRESS_FAMILIES:
            runs.append(Planned(spec.name, spec.name, spec.family, "compress", config, cfg.compress_data))
        else:
            runs.append(Planned(spec.name, spec.name, spec.family, "unsupported", config,
                                reason=f"the bench has no pipeline for family {spec.family!r} yet "
                                       f"(it runs peft through tune and {', '.join(COMPRESS_FAMILIES)} "
                                       "through compress)"))
    return runs


def _anchored() -> tuple[str, ...]:
    from efficientgpt.bench import peft_anchor

    return peft_anchor.ANCHORED if peft_anchor.available() else ()


# ---- environment and fingerprints ----------------------------------------------------------------
def environment(device, world: int = 1) -> dict[str, Any]:
    import torch
    import transformers

    import efficientgpt

    try:
        import peft

        peft_version = peft.__version__
    except ImportError:
        peft_version = None
    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    return {"python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft_version, "efficientgpt": efficientgpt.__version__,
            "device": device.type, "device_name": name, "threads": torch.get_num_threads(), "world_size": world}


def _load_average() -> float | None:
    """The 1-minute load average when the run starts: above the thread count, timings are inflated."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def run_key(item: Planned, cfg: BenchConfig, model_fp: dict[str, Any], world: int = 1) -> str:
    """Hash of everything that determines a run's result; a run whose key changed is run again.

    ``world``: the number of processes. Data-parallel training reaches the same losses, but step time and
    memory are per process, so a bench under ``torchrun`` does not reuse timings measured with another
    number of processes. One process adds nothing to the hash, so single-process keys are unchanged.
    """
    from efficientgpt.cache import stable_hash

    fields = {"schema": schema.SCHEMA_VERSION, "name": item.name, "method": item.method,
              "kind": item.kind, "config": item.config_dict(), "data": item.data,
              "model": [model_fp["spec"], model_fp["config_sha256"], model_fp["parameters"]],
              "settings": cfg.key_settings(), "lr": lr_for(item.method.split(":")[-1], cfg),
              # the baseline scores every evaluation data of the bench, the tasks among them
              "tasks": cfg.tasks if item.kind == "baseline" else None}
    if world > 1:
        fields["world_size"] = world
    return stable_hash(fields, n=24)


def lr_for(method: str, cfg: BenchConfig) -> float:
    return cfg.lr if cfg.lr is not None else LEARNING_RATES.get(method, DEFAULT_LR)


# ---- measurements ---------------------------------------------------------------------------------
def decode_latency_ms(model, prompt, new_tokens: int, pad_token_id: int | None, repeats: int = 3) -> float | None:
    """Milliseconds per generated token, greedy with the KV cache at batch 1, prefill excluded.

    Times ``generate`` for ``new_tokens + 1`` and for 1 new token (median of ``repeats`` each) and
    divides the difference by ``new_tokens``; EOS is suppressed so every call makes the same tokens.
    """
    import torch

    if new_tokens <= 0:
        return None
    device = prompt.device
    mask = torch.ones_like(prompt)

    def gen(n: int) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        model.generate(input_ids=prompt, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                       use_cache=True, pad_token_id=pad_token_id)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            gen(2)  # warm-up: kernels, caches
            long = statistics.median(gen(new_tokens + 1) for _ in range(repeats))
            short = statistics.median(gen(1) for _ in range(repeats))
    finally:
        model.train(was_training)
    per = (long - short) / new_tokens
    if per <= 0:  # timer noise on a model too small to measure this way: report the plain average
        per = long / (new_tokens + 1)
    return 1000.0 * per


def _quiet_generation() -> None:
    """Silence generation-config warnings (each generate call would print them)."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass


def _exp(x: float | None) -> float | None:
    import math

    return math.exp(x) if isinstance(x, (int, float)) and x < 700 else None


def _curves(train: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    curve = train.get("curve") or []
    return {
        "train": [{k: r[k] for k in ("step", "loss", "lr", "grad_norm") if k in r} for r in curve if "loss" in r],
        "eval": [{"step": r["step"], "eval_loss": r["eval_loss"]} for r in curve if "eval_loss" in r],
    }


def _file_bytes(directory: Path, pattern: str = "*.safetensors") -> int:
    return sum(f.stat().st_size for f in Path(directory).rglob(pattern))


def _free(device) -> None:
    import torch

    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


# ---- the bench ------------------------------------------------------------------------------------
class Bench:
    """State shared by the runs of one bench: the base model, the data, the settings."""

    def __init__(self, cfg: BenchConfig, out: str | Path, log: Callable[[str], None] | None = None):
        from efficientgpt.train import distributed

        cfg.validate()
        self.cfg = cfg
        self.out = Path(out)
        self.log = log or (lambda msg: None)
        self.dist = distributed.init(cfg.device)
        self.device = self.dist.device
        self._base = None
        self._sources: dict[str, Any] = {}
        self._env = None
        self._base_bytes: int | None = None
        self._fingerprints: dict[str, tuple[str | None, str | None]] = {}

    # -- shared objects, built on first use --
    @property
    def base(self):
        if self._base is None:
            from efficientgpt.models.loading import load_model

            self._base = load_model(self.cfg.model, device=self.device, progress=self.dist.is_main and self.cfg.progress)
            for p in self._base.model.parameters():
                p.requires_grad_(False)
        return self._base

    def model_fingerprint(self) -> dict[str, Any]:
        d = self.base.describe()
        return {k: d[k] for k in ("spec", "model_type", "parameters", "config_sha256")}

    def fresh(self):
        """A copy of the base model for one run (the run may modify it freely)."""
        from efficientgpt.models.loading import LoadedModel

        b = self.base
        return LoadedModel(model=copy.deepcopy(b.model), tokenizer=b.tokenizer, spec=b.spec, path=b.path)

    def source(self, data: str):
        """The opened data source of ``data`` (opened once per bench, shared by every run)."""
        if data not in self._sources:
            from efficientgpt.pipeline import open_data

            self._sources[data] = open_data(data, self.base.tokenizer, self.cfg.eval_tokens)
        return self._sources[data]

    def fingerprints(self, data: str) -> tuple[str | None, str | None]:
        """sha256 of the train and validation text of a plain-text data spec (None for tasks), once per bench."""
        if data not in self._fingerprints:
            if data.startswith("task:"):
                self._fingerprints[data] = (None, None)
            else:
                from efficientgpt.data import sources

                self._fingerprints[data] = (sources.load_text(data, "train").fingerprint,
                                            sources.load_text(data, "validation").fingerprint)
        return self._fingerprints[data]

    def train_overrides(self, method: str) -> dict[str, Any]:
        d = {"steps": self.cfg.steps, "batch_size": self.cfg.batch_size, "seed": self.cfg.seed,
             "lr": lr_for(method, self.cfg), "progress": self.cfg.progress and self.dist.is_main,
             "log_every": max(1, self.cfg.steps // 50)}
        if self.cfg.seq_len is not None:
            d["seq_len"] = self.cfg.seq_len
        return d

    def train_config(self, method: str):
        from efficientgpt.pipeline import default_train_config

        return default_train_config(self.base.model, **self.train_overrides(method))

    def environment(self) -> dict[str, Any]:
        if self._env is None:
            self._env = environment(self.device, self.dist.world)
        return self._env

    def prompt(self):
        """The latency prompt: the first 8 tokens of the adaptation data's validation split, batch 1."""
        import torch

        from efficientgpt.data import sources, tokens

        data = self.cfg.data if not self.cfg.data.startswith("task:") else self.cfg.compress_data
        ids = tokens.encode(self.base.tokenizer, sources.load_text(data, "validation"))[:8]
        return torch.as_tensor(ids.astype("int64"))[None].to(self.device)  # (1, 8)

    def latency(self, model) -> float | None:
        if not self.cfg.latency_tokens or not self.dist.is_main:
            return None
        tok = self.base.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        return decode_latency_ms(model, self.prompt(), self.cfg.latency_tokens, pad)

    def bench_settings(self, item: Planned) -> dict[str, Any]:
        d = {"quick": self.cfg.quick, "seed": self.cfg.seed, "latency_tokens": self.cfg.latency_tokens,
             "eval_tokens": self.cfg.eval_tokens}
        if item.kind in ("tune", "peft_anchor", "baseline"):
            tc = self.train_config(item.method.split(":")[-1])
            d.update({"steps": tc.steps, "batch_size": tc.batch_size, "seq_len": tc.seq_len,
                      "train_tokens": tc.steps * tc.batch_size * (tc.seq_len - 1),
                      "lr": tc.lr if item.kind != "baseline" else None})
        if item.kind == "compress":
            d["calib_samples"] = self.cfg.calib_samples
        return d

    def base_file_bytes(self) -> int:
        """Bytes of the base model's safetensors as ``save_pretrained`` writes them (measured once)."""
        if self._base_bytes is None:
            with tempfile.TemporaryDirectory(prefix="efficientgpt-bench-base-") as tmp:
                self.base.model.save_pretrained(tmp, safe_serialization=True)
                self._base_bytes = _file_bytes(Path(tmp))
        return self._base_bytes

    def artifacts(self, name: str):
        """A directory for a run's saved delta or model: kept under OUT/artifacts, or temporary."""
        if self.cfg.keep_artifacts and self.dist.is_main:
            path = self.out / "artifacts" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            import shutil

            shutil.rmtree(path, ignore_errors=True)
            return _KeepDir(path)
        return tempfile.TemporaryDirectory(prefix=f"efficientgpt-bench-{name}-")


class _KeepDir:
    def __init__(self, path: Path):
        self.path = path

    def __enter__(self) -> str:
        return str(self.path)

    def __exit__(self, *exc) -> None:
        return None


def _record(bench: Bench, item: Planned, key: str) -> dict[str, Any]:
    """A run's JSON object with everything but the outcome filled in."""
    train_spec = item.data
    eval_spec = item.data
    train_sha = eval_sha = None
    if item.data is not None:
        train_sha, eval_sha = bench.fingerprints(item.data)
        if item.data.startswith("task:"):
            train_sha = bench.source(item.data).fingerprint
    tc = None
    if item.kind in ("tune", "peft_anchor"):
        tc = bench.train_config(item.method.split(":")[-1]).to_dict()
    return {
        "schema": schema.SCHEMA, "schema_version": schema.SCHEMA_VERSION,
        "name": item.name, "method": item.method, "family": item.family, "kind": item.kind,
        "implementation": item.implementation, "pair": item.pair,
        "status": "ok", "error": None, "key": key,
        "config": item.config_dict(), "train_config": tc, "calibration": None,
        "model": bench.model_fingerprint(),
        "data": {"train": train_spec, "eval": eval_spec, "train_sha256": train_sha, "eval_sha256": eval_sha,
                 "eval_tokens": bench.cfg.eval_tokens},
        "environment": {**bench.environment(), "load_average": _load_average()},
        "bench": bench.bench_settings(item),
        "metrics": {}, "curves": {}, "notes": [],
        "created": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def run_baseline(bench: Bench, item: Planned, rec: dict[str, Any]) -> None:
    """The untouched base model on every evaluation data of the bench."""
    from efficientgpt.data import sources, tokens
    from efficientgpt.eval.perplexity import default_seq_len, perplexity

    t0 = time.perf_counter()
    model = bench.base.model
    quality = {}
    for data in [bench.cfg.data] + [f"task:{t}" for t in bench.cfg.tasks]:
        r = bench.source(data).evaluate(model, bench.train_config("base"))
        quality[data] = {"loss": r["loss"], "ppl": _exp(r["loss"]), "tokens": r.get("tokens"),
                         "accuracy": r.get("accuracy")}
    # The compression protocol of pipeline.compress: validation windows of min(512, context) tokens.
    val_ids = tokens.encode(bench.base.tokenizer, sources.load_text(bench.cfg.compress_data, "validation"))
    r = perplexity(model, val_ids, min(512, default_seq_len(model)), batch_size=8, max_tokens=bench.cfg.eval_tokens)
    quality[bench.cfg.compress_data] = {"loss": r.loss, "ppl": r.perplexity, "tokens": r.tokens, "accuracy": None}
    artifact = bench.base_file_bytes()
    main = quality[bench.cfg.data]
    rec["data"]["eval"] = bench.cfg.data
    rec["data"]["eval_sha256"] = bench.fingerprints(bench.cfg.data)[1]
    rec["metrics"] = {
        "val_loss": main["loss"], "val_ppl": main["ppl"], "accuracy": main["accuracy"],
        "trainable_params": 0, "trainable_pct": 0.0, "total_params": bench.model_fingerprint()["parameters"],
        "artifact_bytes": artifact, "latency_ms_per_token": bench.latency(model),
        "quality": quality, "wall_s": time.perf_counter() - t0,
    }


def run_tune(bench: Bench, item: Planned, rec: dict[str, Any]) -> None:
    from efficientgpt import pipeline
    from efficientgpt.bench.measure import PeakMemory
    from efficientgpt.registry import get

    loaded = bench.fresh()
    base_params = bench.model_fingerprint()["parameters"]
    source = bench.source(item.data)  # opened before the measurement, as for every other run
    t0 = time.perf_counter()
    with bench.artifacts(item.name) as tmp:
        with PeakMemory(bench.device) as mem:
            s = pipeline.tune(bench.cfg.model, item.method, item.config, data=item.data, out=tmp,
                              train=bench.train_overrides(item.method), eval_tokens=bench.cfg.eval_tokens,
                              device=bench.cfg.device, loaded=loaded, source=source)
        artifact = _file_bytes(Path(tmp), "delta*")
    wall = time.perf_counter() - t0
    model, delta = s["loaded"].model, s["delta"]
    counts = s["parameters"]
    ev = s.get("eval") or {}
    after = ev.get("after") or {}
    rec["metrics"] = {
        "val_loss": ev.get("loss_after"), "val_ppl": ev.get("ppl_after"),
        "val_loss_before": ev.get("loss_before"), "val_ppl_before": ev.get("ppl_before"),
        "accuracy": after.get("accuracy"),
        "trainable_params": counts["trainable"], "trainable_pct": 100.0 * counts["trainable"] / base_params,
        "total_params": counts["total"], "artifact_bytes": artifact,
        "peak_memory_bytes": mem.peak_bytes, "peak_memory_source": mem.source, "step_time_s": s["train"]["step_time_s"],
        "tokens_per_s": s["train"]["tokens_per_s"], "train_loss": s["train"]["final_loss"],
        "wall_s": wall,
    }
    rec["curves"] = _curves(s["train"])
    if bench.dist.is_main:
        per_rank = getattr(importlib.import_module(get(item.method).apply.__module__), "loss_per_rank", None)
        if per_rank is not None and getattr(bench.source(item.data), "val_ids", None) is not None:
            losses = per_rank(model, delta, _eval_batches(bench, item.data))
            rec["metrics"]["loss_per_rank"] = {str(k): v for k, v in losses.items()}
            rec["metrics"]["ppl_per_rank"] = {str(k): _exp(v) for k, v in losses.items()}
        rec["metrics"]["latency_ms_per_token"] = bench.latency(model)
    del s, model, delta, loaded


def _eval_batches(bench: Bench, data: str, batch: int = 16):
    """The validation windows that ``source.evaluate`` scores, as training-style batches."""
    import torch

    from efficientgpt.data.tokens import eval_windows

    src = bench.source(data)
    ids = getattr(src, "val_ids", None)
    if ids is None:
        raise UserError(f"per-rank quality needs plain-text validation data, not {data!r}")
    windows = eval_windows(ids, bench.train_config("base").seq_len, bench.cfg.eval_tokens)
    return [{"input_ids": w} for w in torch.split(windows, batch)]


def run_compress(bench: Bench, item: Planned, rec: dict[str, Any]) -> None:
    from efficientgpt import pipeline
    from efficientgpt.bench.measure import PeakMemory
    from efficientgpt.compress.calibration import CalibrationConfig

    calib = CalibrationConfig(calib_data=bench.cfg.compress_data, calib_samples=bench.cfg.calib_samples,
                              calib_seed=bench.cfg.seed)
    loaded = bench.fresh()
    t0 = time.perf_counter()
    with bench.artifacts(item.name) as tmp:
        with PeakMemory(bench.device) as mem:
            s = pipeline.compress(bench.cfg.model, item.method, item.config, out=tmp, calibration=calib,
                                  eval_data=bench.cfg.compress_data, eval_tokens=bench.cfg.eval_tokens,
                                  device=bench.cfg.device, progress=bench.cfg.progress, loaded=loaded)
        artifact = s.get("files_bytes")
    wall = time.perf_counter() - t0
    e = s["eval"]
    achieved = schema.finite(s.get("achieved") or {})
    sparsity = achieved.get("sparsity")
    base_bytes = bench.base_file_bytes()
    rec["calibration"] = s.get("calibration")
    rec["data"]["eval_tokens"] = e.get("tokens")
    rec["metrics"] = {
        "val_loss": e["loss_after"], "val_ppl": e["ppl_after"],
        "val_loss_before": e["loss_before"], "val_ppl_before": e["ppl_before"],
        "trainable_params": None, "trainable_pct": None,
        "total_params": s["size_after"]["parameters"], "artifact_bytes": artifact,
        "peak_memory_bytes": mem.peak_bytes, "peak_memory_source": mem.source, "compress_s": s["compress_s"], "wall_s": wall,
        "achieved": achieved, "sparsity": sparsity if isinstance(sparsity, (int, float)) else None,
        "size_ratio": artifact / base_bytes if artifact and base_bytes else None,
        "params_before": s["size_before"]["parameters"], "params_after": s["size_after"]["parameters"],
        "nonzero_params_after": s["size_after"]["nonzero_parameters"],
        "latency_ms_per_token": bench.latency(s["loaded"].model),
    }
    rec["notes"] += [str(n) for n in s.get("notes") or []]
    del s, loaded


def run_anchor(bench: Bench, item: Planned, rec: dict[str, Any]) -> None:
    from efficientgpt.bench import peft_anchor
    from efficientgpt.bench.measure import PeakMemory

    method = item.method.split(":", 1)[1]
    loaded = bench.fresh()
    tc = bench.train_config(method)
    source = bench.source(item.data)
    t0 = time.perf_counter()
    with bench.artifacts(item.name) as tmp:
        with PeakMemory(bench.device) as mem:
            s = peft_anchor.run(method, item.config, loaded, source, tc, out_dir=tmp, dist=bench.dist,
                                fingerprint={"data": source.fingerprint})
    wall = time.perf_counter() - t0
    ev = s.get("eval") or {}
    before, after = ev.get("before") or {}, ev.get("after") or {}
    rec["config"] = schema.finite(s["config"])
    rec["notes"] += s["notes"]
    rec["metrics"] = {
        "val_loss": after.get("loss"), "val_ppl": _exp(after.get("loss")),
        "val_loss_before": before.get("loss"), "val_ppl_before": _exp(before.get("loss")),
        "accuracy": after.get("accuracy"),
        "trainable_params": s["parameters"]["trainable"],
        "trainable_pct": 100.0 * s["parameters"]["trainable"] / s["parameters"]["base"],
        "total_params": s["parameters"]["total"], "artifact_bytes": s.get("artifact_bytes"),
        "peak_memory_bytes": mem.peak_bytes, "peak_memory_source": mem.source, "step_time_s": s["train"]["step_time_s"],
        "tokens_per_s": s["train"]["tokens_per_s"], "train_loss": s["train"]["final_loss"], "wall_s": wall,
        "latency_ms_per_token": bench.latency(s["model"]),
    }
    rec["curves"] = _curves(s["train"])
    del s, loaded


RUNNERS = {"baseline": run_baseline, "tune": run_tune, "compress": run_compress, "peft_anchor": run_anchor}


def _error(exc: BaseException) -> dict[str, str]:
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return {"type": type(exc).__name__, "message": str(exc) or type(exc).__name__, "traceback": tb[-4000:]}


def execute(bench: Bench, item: Planned, key: str) -> dict[str, Any]:
    """Run one planned item; never raises for a method's failure (KeyboardInterrupt still stops the bench)."""
    rec = _record(bench, item, key)
    if item.kind == "unsupported":
        rec["status"] = "skipped"
        rec["error"] = {"type": "Unsupported", "message": item.reason or "not supported", "traceback": ""}
        return rec
    try:
        RUNNERS[item.kind](bench, item, rec)
    except Exception as exc:  # noqa: BLE001 - a failing method is recorded and the bench goes on
        rec["status"] = "failed"
        rec["error"] = _error(exc)
        rec["metrics"] = {}
        rec["curves"] = {}
    finally:
        _free(bench.device)
    rec["metrics"] = {k: v for k, v in schema.finite(rec["metrics"]).items() if v is not None}
    rec["curves"] = schema.finite(rec["curves"])
    return schema.finite(rec)


@dataclasses.dataclass
class Outcome:
    name: str
    path: Path
    record: dict[str, Any]
    reused: bool


def load_existing(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and not schema.problems(data) else None


def run_bench(cfg: BenchConfig, out: str | Path, suite: str = "all", methods: list[str] | None = None,
              force: bool = False, log: Callable[[str], None] | None = None,
              on_run: Callable[[Outcome], None] | None = None) -> list[Outcome]:
    """Run (or reuse) every planned run and write its JSON into ``out``; returns the outcomes in plan order.

    Under ``torchrun`` every process runs the bench (PEFT training is data-parallel) and only rank 0
    writes. The skip decisions are made once, before any file is written, so every process agrees.
    """
    from tqdm.auto import tqdm

    from efficientgpt.cache import atomic_write_json
    from efficientgpt.train import distributed

    _quiet_generation()
    plan(cfg, suite, methods)  # unknown names fail before the model loads
    bench = Bench(cfg, out, log)
    for t in cfg.tasks:  # an unknown task fails here, once, and not in every method's run
        bench.source(f"task:{t}")
    items = plan(cfg, suite, methods, model=bench.base.model)
    out = Path(out)
    fp = bench.model_fingerprint()
    decisions = []
    for item in items:
        key = run_key(item, cfg, fp, bench.dist.world)
        path = out / f"{item.name}.json"
        old = None if force else load_existing(path)
        reuse = old is not None and old.get("status") in ("ok", "skipped") and old.get("key") == key
        decisions.append((item, key, path, old if reuse else None))
    distributed.barrier()
    if bench.dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
    outcomes = []
    bar = tqdm(total=len(items), desc="bench", unit="run", dynamic_ncols=True, position=0,
               disable=not (cfg.progress and bench.dist.is_main), file=sys.stderr)
    try:
        for item, key, path, old in decisions:
            bar.set_postfix_str(item.name)
            if old is not None:
                outcome = Outcome(item.name, path, old, reused=True)
                (log or (lambda m: None))(f"{item.name}: results exist ({path.name}), skipped (--force reruns)")
            else:
                rec = execute(bench, item, key)
                if bench.dist.is_main:
                    schema.validate(rec)
                    atomic_write_json(path, rec)
                outcome = Outcome(item.name, path, rec, reused=False)
                if log:
                    log(_one_line(rec))
            outcomes.append(outcome)
            if on_run:
                on_run(outcome)
            bar.update(1)
    finally:
        bar.close()
    distributed.barrier()
    return outcomes


def _one_line(rec: dict[str, Any]) -> str:
    m = rec["metrics"]
    if rec["status"] != "ok":
        return f"{rec['name']}: {rec['status']}: {rec['error']['message'].splitlines()[0][:200]}"
    parts = [f"{rec['name']}: ok"]
    if m.get("val_ppl") is not None:
        parts.append(f"ppl {m['val_ppl']:.3f}")
    if m.get("trainable_params") is not None:
        parts.append(f"{m['trainable_params']:,} trainable")
    if m.get("wall_s") is not None:
        parts.append(f"{m['wall_s']:.1f} s")
    return ", ".join(parts)
