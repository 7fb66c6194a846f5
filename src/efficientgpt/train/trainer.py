"""The one training loop: pretraining, fine-tuning and distillation all run through :class:`Trainer`.

AdamW with decoupled weight decay (Loshchilov & Hutter, ICLR 2019; no decay on biases and norms),
linear warmup then cosine decay to ``min_lr_ratio * lr``, gradient accumulation, global-norm clipping,
optional bf16 autocast and gradient checkpointing, periodic evaluation, a JSONL metrics log, a
progress bar, and checkpoint/resume that reproduces an uninterrupted run exactly (see
:mod:`efficientgpt.train.checkpoint`). Under ``torchrun`` the same loop runs DDP with rank-0-only
logging and saving, or FSDP (``fsdp=True``).

Memory options, each usable with every method (see ``docs/training.md``):

* ``optimizer="adamw8bit"``: bitsandbytes' AdamW with blockwise 8-bit states (Dettmers et al., "8-bit
  Optimizers via Block-wise Quantization", ICLR 2022): both moments as uint8 codes of a dynamic
  quantization map with one float32 maximum per block of 256 values, 2 bytes per parameter instead
  of 8. Tensors under 4096 elements keep 32-bit states (bitsandbytes' ``min_8bit_size``).
  ``paged_adamw``/``paged_adamw8bit`` put the states in CUDA unified memory that the driver pages
  to host memory when the GPU runs out (QLoRA's paged optimizers, Dettmers et al., NeurIPS 2023, §3).
* ``fsdp=True``: PyTorch FSDP2 (``fully_shard``) shards every decoder block, then the root module
  (embeddings, final norm, LM head and the deltas' tensors), over the process group. Gradients are
  averaged by the reduce-scatter exactly as DDP averages them, so the loss scaling is shared.
  Checkpoints gather full tensors to rank 0 (``get_model_state_dict``/``get_optimizer_state_dict``
  with ``full_state_dict=True, cpu_offload=True``) and every rank reads them back sharded, so they
  are interchangeable with single-process and DDP checkpoints. Evaluation gathers the parameters on
  every rank (:meth:`Trainer.unsharded`) so that rank 0 can run the model alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from efficientgpt.cache import atomic_write_text
from efficientgpt.errors import UserError
from efficientgpt.train import checkpoint as ckpt
from efficientgpt.train import distributed
from efficientgpt.train.config import RESUME_FREE_FIELDS, TrainConfig
from efficientgpt.train.losses import causal_lm_loss, count_targets

Batch = dict[str, torch.Tensor]
LossFn = Callable[[nn.Module, Batch], tuple[torch.Tensor, torch.Tensor]]

def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    """Multiplier of ``lr`` at optimizer step ``s``: linear warmup, then cosine to ``min_lr_ratio``."""

    def f(s: int) -> float:
        if s < cfg.warmup_steps:
            return (s + 1) / cfg.warmup_steps
        progress = (s - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def param_groups(model: nn.Module, weight_decay: float) -> tuple[list[dict], dict[int, str]]:
    """Trainable parameters split into decayed (matrices) and undecayed (biases, norms, vectors)."""
    decay, no_decay, names = [], [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append((name, p))
    groups, index = [], {}
    for params, wd in ((decay, weight_decay), (no_decay, 0.0)):
        if params:
            groups.append({"params": [p for _, p in params], "weight_decay": wd})
            names.extend(n for n, _ in params)
    index = dict(enumerate(names))
    return groups, index


def build_optimizer(groups: list[dict], cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """The optimizer ``cfg.optimizer`` names over ``groups`` (see the module docstring)."""
    kwargs = {"lr": cfg.lr, "betas": (cfg.beta1, cfg.beta2), "eps": 1e-8}
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, **kwargs, foreach=device.type != "cpu" or None)
    if cfg.optimizer.startswith("paged_") and device.type != "cuda":
        raise UserError(f"optimizer {cfg.optimizer!r} pages its states between GPU and host memory and needs a "
                        f"CUDA device; this run is on {device.type}. On CPU use --optimizer adamw8bit (or adamw)")
    from efficientgpt.train.quantize import require_bitsandbytes

    bnb = require_bitsandbytes(f"optimizer {cfg.optimizer!r}")
    cls = {"adamw8bit": bnb.optim.AdamW8bit, "paged_adamw": bnb.optim.PagedAdamW,
           "paged_adamw8bit": bnb.optim.PagedAdamW8bit}[cfg.optimizer]
    return cls(groups, **kwargs)


def _item(x: torch.Tensor) -> float:
    """A scalar tensor's value; FSDP's gradient norm is a replicated DTensor."""
    return (x.full_tensor() if hasattr(x, "full_tensor") else x).item()


def model_fingerprint(model: nn.Module) -> dict[str, Any]:
    cfg = model.config.to_dict() if hasattr(model, "config") else {}
    volatile = {"transformers_version", "_name_or_path", "dtype", "torch_dtype", "architectures", "use_cache"}
    trainable = {n: list(p.shape) for n, p in model.named_parameters() if p.requires_grad}
    return {
        "config": {k: v for k, v in cfg.items() if k not in volatile and not k.startswith("_")},
        "trainable": trainable,
    }


@dataclasses.dataclass
class TrainResult:
    steps: int
    final_loss: float
    """Training loss (mean per token) of the last step."""
    eval_loss: float | None
    tokens: int
    """Tokens trained on in this process group over the whole run (resumed steps included)."""
    step_time_s: float
    """Mean wall time per optimizer step in this invocation."""
    tokens_per_s: float
    resumed_from: int | None
    curve: list[dict[str, float]]
    checkpoint: str | None

    @property
    def eval_ppl(self) -> float | None:
        return math.exp(self.eval_loss) if self.eval_loss is not None else None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["eval_ppl"] = self.eval_ppl
        return d


class Trainer:
    """Train ``model`` (its parameters with ``requires_grad``) on batches from ``train_batches``.

    ``train_batches(step)`` returns this process's shard of the global batch of optimizer step
    ``step``; it must be a pure function of ``step`` (as :class:`~efficientgpt.data.tokens.WindowSampler`
    is) so that resuming reproduces the data order. ``eval_fn(model)`` returns a mean loss.
    ``fingerprint`` describes the data and anything else a resumed run must share; the trainer adds
    the model's config, its trainable parameters and the training config. ``step_callbacks`` run
    before each optimizer step with its index (a pure function of the step keeps resumption exact).
    """

    def __init__(
        self,
        model: nn.Module,
        config: TrainConfig,
        train_batches: Callable[[int], Batch],
        out_dir: str | Path | None = None,
        eval_fn: Callable[[nn.Module], float] | None = None,
        loss_fn: LossFn = causal_lm_loss,
        fingerprint: dict[str, Any] | None = None,
        dist: distributed.DistInfo | None = None,
        step_callbacks: list[Callable[[int], None]] | None = None,
    ):
        config.validate()
        self.cfg = config
        self.dist = dist or distributed.current()
        self.device = self.dist.device if self.dist.enabled else next(model.parameters()).device
        self.model = model
        self.train_batches = train_batches
        self.eval_fn = eval_fn
        self.loss_fn = loss_fn
        self.step_callbacks = list(step_callbacks or [])
        self.out_dir = Path(out_dir) if out_dir else None
        if not any(p.requires_grad for p in model.parameters()):
            raise UserError("the model has no trainable parameters")
        self.fsdp = config.fsdp
        if config.fsdp:
            self._check_fsdp(model)
        if config.optimizer.startswith("paged_") and self.device.type != "cuda":
            build_optimizer([], config, self.device)  # raises the CUDA-only explanation before any work
        if config.gradient_checkpointing:
            # Non-reentrant checkpointing works with frozen inputs (PEFT) without extra hooks.
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            elif hasattr(model, "gradient_checkpointing_enable"):
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            else:
                raise UserError("gradient checkpointing needs a transformers model")
        if config.fsdp:
            self._shard(model)
        # After sharding: FSDP replaces the parameters by DTensors (same names).
        groups, self.param_names = param_groups(model, config.weight_decay)
        self.optimizer = build_optimizer(groups, config, self.device)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(config))
        self.fingerprint = json.loads(json.dumps({
            "model": model_fingerprint(model),
            # The default optimizer is left out, so checkpoints written before it was a choice still resume.
            "train": {k: v for k, v in config.to_dict().items()
                      if k not in RESUME_FREE_FIELDS and (k, v) != ("optimizer", "adamw")},
            **(fingerprint or {}),
        }, default=str))
        self.ddp = None
        self._any_eval = self.eval_fn is not None
        if self.fsdp:
            # Evaluation gathers parameters on every rank, so all must know whether any evaluates.
            flag = torch.tensor([float(self._any_eval)], device=self.device)
            self._any_eval = distributed.all_reduce_sum(flag).item() > 0
        elif self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            # Some methods leave parameters without gradient on a step (DyLoRA's ranks above b).
            self.ddp = DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=bool(self.step_callbacks),
            )

    # ---- FSDP ---------------------------------------------------------------------------------
    def _check_fsdp(self, model: nn.Module) -> None:
        import torch.distributed as tdist

        if not (self.dist.enabled and tdist.is_available() and tdist.is_initialized()):
            raise UserError("fsdp shards the model over the processes of a torchrun launch, and this is a single "
                            "process without a process group: launch with torchrun --nproc_per_node N (N >= 2), "
                            "e.g. torchrun --nproc_per_node 2 -m efficientgpt tune ... --fsdp; or drop --fsdp")
        if self.cfg.optimizer != "adamw":
            raise UserError(f"fsdp shards torch AdamW's states; optimizer {self.cfg.optimizer!r} keeps bitsandbytes "
                            "states that FSDP cannot shard: use --optimizer adamw with --fsdp, or DDP (no --fsdp) "
                            f"with --optimizer {self.cfg.optimizer}")
        if any(type(p).__name__ == "Params4bit" for p in model.parameters()):
            raise UserError("fsdp cannot shard a 4-bit quantized (QLoRA) base model: run QLoRA on one process or "
                            "with DDP (torchrun without --fsdp), or fsdp without --quantize")

    def _shard(self, model: nn.Module) -> None:
        from torch.distributed.fsdp import fully_shard

        from efficientgpt.models import arch

        try:
            blocks = list(arch.blocks(model))
        except UserError as err:
            raise UserError(f"fsdp shards each decoder block, and {err}") from None
        for block in blocks:
            fully_shard(block, reshard_after_forward=True)
        fully_shard(model)
        self._fsdp_blocks = blocks

    @contextlib.contextmanager
    def unsharded(self):
        """Inside the block every rank holds the full parameters, so one rank may run the model alone
        (evaluation, generation, reading a delta's tensors); a collective under FSDP, else a no-op.

        Every rank must enter it. The parameters are gathered once and not resharded after each
        forward (``set_reshard_after_forward(False)``); leaving restores FSDP2's defaults (blocks
        reshard after forward, the root does not).
        """
        if not self.fsdp:
            yield
            return
        modules = [*self._fsdp_blocks, self.model]
        for m in modules:
            m.unshard()
            m.set_reshard_after_forward(False, recurse=False)
        try:
            yield
        finally:
            distributed.barrier()
            for m in modules:
                m.reshard()
                m.set_reshard_after_forward(m is not self.model, recurse=False)

    def full_state_dict(self, trainable_only: bool = False) -> dict[str, torch.Tensor]:
        """The model's tensors by name, gathered to full CPU tensors on rank 0 under FSDP (a collective:
        every rank calls it; the other ranks get an empty dict). Tied weights appear once."""
        if not self.fsdp:
            return self._model_state(trainable_only)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        keep = set(self.param_names.values()) if trainable_only else {
            *(n for n, _ in self.model.named_parameters()),
            *(n for n, _ in self.model.named_buffers()),
        }
        return {k: v for k, v in full.items() if k in keep}

    # ---- checkpoints ------------------------------------------------------------------------
    @property
    def checkpoint_root(self) -> Path | None:
        return self.out_dir / "checkpoints" if self.out_dir else None

    def _model_state(self, trainable_only: bool | None = None) -> dict[str, torch.Tensor]:
        if self.cfg.save_trainable_only if trainable_only is None else trainable_only:
            return {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        # Tied weights (embedding = LM head) appear twice in state_dict; safetensors stores each once.
        state, seen = {}, set()
        for n, t in self.model.state_dict().items():
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                state[n] = t
        return state

    def save_checkpoint(self, step: int) -> Path | None:
        path = None
        model_state, optimizer_state = None, None
        if self.fsdp and self.checkpoint_root is not None:  # a collective: every rank gathers, rank 0 writes
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            model_state = self.full_state_dict(self.cfg.save_trainable_only)
            osd = get_optimizer_state_dict(self.model, self.optimizer,
                                           options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            optimizer_state = ckpt.full_optimizer_tensors(osd) if self.dist.is_main else None
        if self.dist.is_main and self.checkpoint_root is not None:
            path = ckpt.save(
                self.checkpoint_root, step, model_state if self.fsdp else self._model_state(), self.optimizer,
                self.param_names, {k: v for k, v in self.scheduler.state_dict().items() if k != "lr_lambdas"},
                self.fingerprint, keep=self.cfg.keep_checkpoints, optimizer_state=optimizer_state,
            )
        distributed.barrier()
        return path

    def _resume(self, resume: bool | str | Path) -> int:
        if resume is False or resume is None:
            return 0
        if resume is True:
            if self.checkpoint_root is None:
                raise UserError("resuming needs an output directory holding checkpoints")
            path = ckpt.latest(self.checkpoint_root)
            if path is None:
                return 0
        else:
            path = Path(resume)
            if not path.is_dir():
                raise UserError(f"checkpoint {str(path)!r} is not a directory")
        state = ckpt.load(path)
        diffs = ckpt.diff_meta(state["meta"], self.fingerprint)
        if diffs:
            raise UserError(f"refusing to resume from {path}: the run differs from the checkpoint in\n  "
                            + "\n  ".join(diffs))
        if self.fsdp:
            self._load_sharded(path, state)
        else:
            missing, unexpected = self.model.load_state_dict(state["model"], strict=False)
            if unexpected:
                raise UserError(f"checkpoint {path} holds parameters this model lacks: {unexpected[:5]}")
            ckpt.load_optimizer(self.optimizer, state["optimizer"], state["optimizer_groups"], self.param_names)
        sched = self.scheduler.state_dict()
        sched.update(state["scheduler"])
        self.scheduler.load_state_dict(sched)
        ckpt.restore_rng(state)
        return int(state["step"])

    def _load_sharded(self, path: Path, state: dict[str, Any]) -> None:
        """Every rank read the full checkpoint; each keeps its own shard of it."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        names = {n for n, _ in self.model.named_parameters()} | {n for n, _ in self.model.named_buffers()}
        unexpected = sorted(set(state["model"]) - names)
        if unexpected:
            raise UserError(f"checkpoint {path} holds parameters this model lacks: {unexpected[:5]}")
        set_model_state_dict(self.model, state["model"], options=StateDictOptions(full_state_dict=True, strict=False))
        current, start = [], 0  # this run's groups by name: param_groups() listed names group by group
        for g in self.optimizer.param_groups:
            n = len(g["params"])
            current.append({**{k: v for k, v in g.items() if k != "params"},
                            "params": [self.param_names[i] for i in range(start, start + n)]})
            start += n
        osd = ckpt.full_optimizer_state(state["optimizer"], state["optimizer_groups"], current)
        set_optimizer_state_dict(self.model, self.optimizer, osd, options=StateDictOptions(full_state_dict=True))

    # ---- the loop -----------------------------------------------------------------------------
    def _autocast(self):
        if not self.cfg.bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def _log(self, record: dict[str, Any]) -> None:
        if self.dist.is_main and self.out_dir is not None:
            with open(self.out_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def _truncate_log(self, step: int) -> None:
        """Drop metric lines past ``step`` (written by a run that died before its next checkpoint)."""
        path = self.out_dir / "metrics.jsonl" if self.out_dir else None
        if not (self.dist.is_main and path and path.exists()):
            return
        keep = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln).get("step", 0) <= step]
        atomic_write_text(path, "".join(ln + "\n" for ln in keep))

    def train(self, resume: bool | str | Path = False) -> TrainResult:
        cfg = self.cfg
        if self.out_dir is not None and self.dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        start = self._resume(resume)
        if start == 0 and not resume:
            torch.manual_seed(cfg.seed)
        self._truncate_log(start)
        net = self.ddp or self.model
        self.model.train()
        micro = cfg.batch_size // self.dist.world // cfg.grad_accum
        curve: list[dict[str, float]] = []
        loss_value = float("nan")
        tokens = 0
        times = []
        bar = tqdm(total=cfg.steps, initial=start, desc="train", unit="step", dynamic_ncols=True,
                   disable=not (cfg.progress and self.dist.is_main), leave=False, mininterval=0.5)
        eval_loss = None
        for step in range(start, cfg.steps):
            t0 = time.perf_counter()
            for callback in self.step_callbacks:
                callback(step)
            batch = {k: v.to(self.device) for k, v in self.train_batches(step).items()}
            # Normalise by the tokens of the whole global batch (all micro-batches, all processes).
            n_tokens = distributed.all_reduce_sum(count_targets(batch).to(self.device).float())
            if n_tokens.item() == 0:
                raise UserError(f"step {step}: the batch has no target tokens")
            total = torch.zeros((), device=self.device)
            for i in range(cfg.grad_accum):
                mb = {k: v[i * micro : (i + 1) * micro] for k, v in batch.items()}
                last = i == cfg.grad_accum - 1  # gradients are reduced over processes after the last one
                if self.fsdp:
                    self.model.set_requires_gradient_sync(last)
                no_sync = self.ddp.no_sync() if self.ddp is not None and not last else contextlib.nullcontext()
                with no_sync, self._autocast():
                    loss_sum, _ = self.loss_fn(net, mb)
                # DDP averages gradients over processes; scale so the result is the global mean.
                (loss_sum * (self.dist.world / n_tokens)).backward()
                total += loss_sum.detach()
            loss_value = (distributed.all_reduce_sum(total) / n_tokens).item()
            if cfg.max_grad_norm > 0:
                grad_norm = _item(torch.nn.utils.clip_grad_norm_(
                    [p for p in self.model.parameters() if p.requires_grad], cfg.max_grad_norm
                ))
            else:
                grad_norm = float("nan")
            lr = self.scheduler.get_last_lr()[0]
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
            tokens += int(n_tokens.item())
            done = step + 1
            record = {"step": done, "loss": loss_value, "lr": lr, "grad_norm": grad_norm}
            if self._any_eval and cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.steps:
                loss = self._evaluate_all()
                if loss is not None:
                    record["eval_loss"] = loss
            if done % cfg.log_every == 0 or done == cfg.steps or "eval_loss" in record:
                curve.append(record)
                self._log(record)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
            if cfg.save_every and done % cfg.save_every == 0 and done < cfg.steps:
                self.save_checkpoint(done)
        bar.close()
        if self._any_eval:
            eval_loss = self._evaluate_all()
            if eval_loss is not None:
                self._log({"step": cfg.steps, "eval_loss": eval_loss})
        final = self.save_checkpoint(cfg.steps) if self.out_dir is not None else None
        self.model.eval()
        step_time = sum(times) / len(times) if times else float("nan")
        return TrainResult(
            steps=cfg.steps, final_loss=loss_value, eval_loss=eval_loss,
            tokens=cfg.steps * cfg.batch_size * (cfg.seq_len - 1),
            step_time_s=step_time,
            tokens_per_s=(tokens / sum(times)) if times else float("nan"),
            resumed_from=start or None, curve=curve, checkpoint=str(final) if final else None,
        )

    def _evaluate_all(self) -> float | None:
        """Evaluate where ``eval_fn`` was given; under FSDP every rank takes part in gathering."""
        with self.unsharded():
            return self.evaluate() if self.eval_fn is not None else None

    @torch.no_grad()
    def evaluate(self) -> float:
        was_training = self.model.training
        self.model.eval()
        try:
            with self._autocast():
                return float(self.eval_fn(self.model))
        finally:
            self.model.train(was_training)
