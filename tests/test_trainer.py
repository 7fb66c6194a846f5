"""The shared Trainer: schedule, accumulation, decay groups, checkpoints, kill-and-resume, DDP."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from efficientgpt.data.tokens import WindowSampler
from efficientgpt.errors import UserError
from efficientgpt.models.tiny import tiny_model
from efficientgpt.train import checkpoint as ckpt
from efficientgpt.train.trainer import TrainConfig, Trainer, lr_lambda, param_groups

TESTS = Path(__file__).parent
SCRIPT = str(TESTS / "train_script.py")


def _stream():
    sys.path.insert(0, str(TESTS))
    from train_script import stream

    return stream()


def _trainer(tmp_path=None, **overrides):
    cfg = dict(steps=6, batch_size=8, seq_len=16, lr=3e-3, warmup_steps=1, progress=False, log_every=1)
    cfg.update(overrides)
    model = tiny_model("llama", seed=0)
    sampler = WindowSampler(_stream(), cfg["seq_len"], cfg["batch_size"], seed=1)
    return Trainer(model, TrainConfig(**cfg), sampler, out_dir=tmp_path, fingerprint={"data": "synthetic-v1"})


def test_lr_schedule_warmup_then_cosine_to_floor():
    cfg = TrainConfig(steps=110, warmup_steps=10, min_lr_ratio=0.1)
    f = lr_lambda(cfg)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(110) == pytest.approx(0.1)


def test_weight_decay_skips_biases_and_norms():
    model = tiny_model("gpt2")
    groups, names = param_groups(model, 0.1)
    decayed = {id(p) for p in groups[0]["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in decayed) == (p.ndim >= 2), name
    assert groups[1]["weight_decay"] == 0.0 and len(names) == sum(1 for _ in model.parameters())


def test_training_lowers_the_loss():
    result = _trainer(steps=30, lr=1e-2).train()
    assert result.curve[-1]["loss"] < result.curve[0]["loss"] - 0.3


def test_gradient_accumulation_matches_full_batch():
    a, b = _trainer(), _trainer(grad_accum=4)
    ra, rb = a.train(), b.train()
    assert [c["loss"] for c in ra.curve] == pytest.approx([c["loss"] for c in rb.curve], abs=1e-5)
    for (n, p), (_, q) in zip(a.model.named_parameters(), b.model.named_parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4, msg=n)


def test_gradient_checkpointing_and_bf16_train():
    base = _trainer(steps=3).train()
    gc = _trainer(steps=3, gradient_checkpointing=True).train()
    assert [c["loss"] for c in gc.curve] == pytest.approx([c["loss"] for c in base.curve], abs=1e-5)
    bf = _trainer(steps=3, bf16=True).train()
    assert bf.final_loss == pytest.approx(base.final_loss, abs=0.05)


def test_only_trainable_parameters_change():
    t = _trainer(steps=3)
    for name, p in t.model.named_parameters():
        p.requires_grad_(name.endswith("q_proj.weight"))
    t = Trainer(t.model, t.cfg, t.train_batches, fingerprint={})
    before = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    t.train()
    for n, p in t.model.named_parameters():
        assert torch.equal(p, before[n]) != n.endswith("q_proj.weight"), n


def test_config_errors_name_the_field():
    with pytest.raises(UserError, match=r"TrainConfig.lr = 0.0 is out of range: must be > 0"):
        TrainConfig(lr=0.0).validate()
    with pytest.raises(UserError, match="not divisible by grad_accum 3"):
        TrainConfig(batch_size=8, grad_accum=3).validate()


def test_checkpoint_round_trip_and_corruption(tmp_path):
    t = _trainer(tmp_path, steps=4, save_every=2, keep_checkpoints=3)
    t.train()
    root = tmp_path / "checkpoints"
    assert (root / "latest").read_text().strip() == "step-00000004"
    assert sorted(p.name for p in root.glob("step-*")) == ["step-00000002", "step-00000004"]
    good = root / "step-00000002"
    snapshot = {f.name: f.read_bytes() for f in good.iterdir()}
    # Truncate the newest checkpoint's model file: loading refuses it and names the others.
    model_file = root / "step-00000004" / "model.safetensors"
    model_file.write_bytes(model_file.read_bytes()[:100])
    with pytest.raises(UserError, match=r"corrupted or truncated: model.safetensors.*step-00000002"):
        _trainer(tmp_path, steps=4, save_every=2, keep_checkpoints=3).train(resume=True)
    assert {f.name: f.read_bytes() for f in good.iterdir()} == snapshot
    # The previous good checkpoint still resumes.
    r = _trainer(tmp_path, steps=4, save_every=2, keep_checkpoints=3).train(resume=good)
    assert r.resumed_from == 2


def test_failed_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    t = _trainer(tmp_path, steps=2)
    t.train()
    root = tmp_path / "checkpoints"
    before = sorted(p.name for p in root.iterdir())

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        t.save_checkpoint(3)
    assert sorted(p.name for p in root.iterdir()) == before
    assert ckpt.latest(root).name == "step-00000002"


def test_resume_with_different_config_is_refused(tmp_path):
    _trainer(tmp_path, steps=4, save_every=2).train()
    with pytest.raises(UserError) as err:
        _trainer(tmp_path, steps=4, lr=1e-3, seq_len=8).train(resume=True)
    msg = str(err.value)
    assert "train.lr: checkpoint 0.003 != now 0.001" in msg and "train.seq_len" in msg
    other = _trainer(tmp_path, steps=4)
    other.fingerprint["data"] = "another corpus"
    with pytest.raises(UserError, match="data: checkpoint 'synthetic-v1' != now 'another corpus'"):
        other.train(resume=True)


def _run(args, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, env=env, **kw)


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_final_loss(tmp_path):
    full = _run(["--steps", "12"], check=True)
    expected = json.loads(full.stdout)["final_loss"]
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, SCRIPT, "--steps", "12", "--save-every", "3", "--sleep", "0.3",
                             "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    latest = out / "checkpoints" / "latest"
    while time.time() < deadline:
        if latest.exists() and latest.read_text().strip() >= "step-00000006":
            break
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = int(latest.read_text().strip().split("-")[1])
    assert 6 <= killed_at < 12
    resumed = json.loads(_run(["--steps", "12", "--save-every", "3", "--out", str(out), "--resume"],
                              check=True).stdout)
    assert resumed["resumed_from"] == killed_at
    assert resumed["final_loss"] == pytest.approx(expected, abs=1e-6)
    steps_logged = [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps_logged == list(range(1, 13))


@pytest.mark.slow
def test_torchrun_ddp_matches_single_process(tmp_path):
    single = json.loads(_run(["--steps", "5", "--batch", "8"], check=True).stdout)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(29500 + os.getpid() % 1000), SCRIPT, "--steps", "5",
                           "--batch", "8", "--out", str(tmp_path / "ddp")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = json.loads(proc.stdout.strip().splitlines()[-1])
    assert np.allclose(ddp["losses"], single["losses"], atol=1e-4), (ddp["losses"], single["losses"])
    assert (tmp_path / "ddp" / "checkpoints" / "latest").exists()
