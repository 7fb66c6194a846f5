"""The shared training loop's configuration (kept free of torch so the CLI can build its flags fast)."""

from __future__ import annotations

import dataclasses

from efficientgpt.config import ConfigBase, field
from efficientgpt.errors import UserError

#: TrainConfig fields that may change between a run and its resumption (checkpoints hold full tensors
#: under FSDP too, so a run may switch between one process, DDP and FSDP when it resumes).
RESUME_FREE_FIELDS = frozenset({"log_every", "eval_every", "eval_batches", "save_every", "keep_checkpoints",
                                "progress", "fsdp"})
#: Optimizers of the shared loop: torch AdamW, and bitsandbytes' 8-bit (and paged) AdamW.
OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw", "paged_adamw8bit")


@dataclasses.dataclass
class TrainConfig(ConfigBase):
    """Hyperparameters of the shared training loop."""

    steps: int = field(100, "optimizer steps to run", minimum=1)
    batch_size: int = field(16, "sequences per optimizer step, summed over processes", minimum=1)
    grad_accum: int = field(1, "micro-batches per optimizer step (per process)", minimum=1)
    seq_len: int = field(128, "tokens per training sequence", minimum=2)
    lr: float = field(1e-3, "peak learning rate", minimum=0.0, exclusive_minimum=True)
    weight_decay: float = field(0.0, "decoupled AdamW weight decay (not on biases and norms)", minimum=0.0)
    beta1: float = field(0.9, "AdamW beta1", minimum=0.0, maximum=1.0)
    beta2: float = field(0.95, "AdamW beta2", minimum=0.0, maximum=1.0)
    warmup_steps: int = field(0, "linear warmup steps", minimum=0)
    min_lr_ratio: float = field(0.1, "cosine decay floor as a fraction of lr", minimum=0.0, maximum=1.0)
    max_grad_norm: float = field(1.0, "clip the global gradient norm to this (0 disables)", minimum=0.0)
    bf16: bool = field(False, "bf16 autocast for forward and backward")
    gradient_checkpointing: bool = field(False, "recompute activations in backward to save memory")
    optimizer: str = field("adamw", "adamw (torch, fp32 states), adamw8bit (bitsandbytes blockwise 8-bit states), "
                                    "paged_adamw / paged_adamw8bit (bitsandbytes, states in CUDA unified memory "
                                    "paged to the host under memory pressure; CUDA only)", choices=OPTIMIZERS)
    fsdp: bool = field(False, "shard parameters, gradients and optimizer states over the torchrun processes "
                              "(PyTorch FSDP2: each decoder block, then the whole model) instead of DDP")
    eval_every: int = field(0, "evaluate every N steps (0: only at the end)", minimum=0)
    eval_batches: int = field(8, "batches of evaluation windows per evaluation (0: all)", minimum=0)
    log_every: int = field(10, "write a metrics line every N steps", minimum=1)
    save_every: int = field(0, "checkpoint every N steps (0: only at the end)", minimum=0)
    keep_checkpoints: int = field(2, "newest checkpoints kept on disk", minimum=1)
    save_trainable_only: bool = field(True, "checkpoints hold only the trainable parameters")
    seed: int = field(0, "seed for data order and initialisation")
    progress: bool = field(True, "show a progress bar")

    def validate(self) -> None:
        super().validate()
        if self.batch_size % self.grad_accum:
            raise UserError(f"batch_size {self.batch_size} is not divisible by grad_accum {self.grad_accum}")
        if self.warmup_steps >= self.steps and self.warmup_steps > 0:
            raise UserError(f"warmup_steps {self.warmup_steps} must be smaller than steps {self.steps}")


