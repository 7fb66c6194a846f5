"""A small training run used by the resume and distributed tests (run as a subprocess or by torchrun).

Trains a tiny Llama on a synthetic token stream with the shared Trainer and prints one JSON line with
the per-step losses and the final loss.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from efficientgpt.data.tokens import WindowSampler
from efficientgpt.models.tiny import tiny_model
from efficientgpt.train import distributed
from efficientgpt.train.trainer import TrainConfig, Trainer


def stream(n: int = 20000, vocab: int = 128, seed: int = 0) -> np.ndarray:
    """Tokens with structure a model can learn: noisy arithmetic sequences."""
    rng = np.random.default_rng(seed)
    out, t = [], 0
    while len(out) < n:
        step = int(rng.integers(1, 5))
        for _ in range(int(rng.integers(8, 24))):
            t = (t + step) % vocab
            out.append(t if rng.random() > 0.05 else int(rng.integers(0, vocab)))
    return np.array(out[:n], dtype=np.int64)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--accum", type=int, default=1)
    p.add_argument("--save-every", type=int, default=0)
    p.add_argument("--sleep", type=float, default=0.0, help="pause per step (lets a test kill us mid-run)")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seq-len", type=int, default=16)
    p.add_argument("--fsdp", action="store_true", help="shard with FSDP2 (under torchrun)")
    p.add_argument("--optimizer", default="adamw", help="TrainConfig.optimizer")
    p.add_argument("--resume-from", default=None, help="resume from this checkpoint directory")
    args = p.parse_args()
    torch.set_num_threads(1)
    dist = distributed.init("cpu")
    model = tiny_model("llama", seed=0)
    data = stream()
    sampler = WindowSampler(data, args.seq_len, args.batch, seed=1, rank=dist.rank, world=dist.world)
    if args.sleep:
        inner = sampler

        def sampler(step):  # noqa: F811 - a slowed-down sampler, same batches
            time.sleep(args.sleep)
            return inner(step)

    cfg = TrainConfig(steps=args.steps, batch_size=args.batch, grad_accum=args.accum, seq_len=args.seq_len,
                      lr=args.lr, warmup_steps=2, weight_decay=0.1, log_every=1, save_every=args.save_every,
                      progress=False, seed=0, fsdp=args.fsdp, optimizer=args.optimizer)
    trainer = Trainer(model, cfg, sampler, out_dir=args.out, fingerprint={"data": "synthetic-v1"}, dist=dist)
    result = trainer.train(resume=args.resume_from or args.resume)
    if dist.is_main:
        print(json.dumps({"final_loss": result.final_loss, "losses": [c["loss"] for c in result.curve],
                          "resumed_from": result.resumed_from}), flush=True)
    if dist.enabled:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
