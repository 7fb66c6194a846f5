"""Efficient training options of the shared Trainer: 8-bit AdamW, QLoRA (NF4 base + LoRA), FSDP."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli
from efficientgpt import registry
from efficientgpt.data.tokens import WindowSampler
from efficientgpt.errors import UserError
from efficientgpt.models.tiny import tiny_model
from efficientgpt.peft import core
from efficientgpt.train.trainer import TrainConfig, Trainer

TESTS = Path(__file__).parent
SCRIPT = str(TESTS / "train_script.py")


def _stream():
    sys.path.insert(0, str(TESTS))
    from train_script import stream

    return stream()


def _trainer(out=None, model=None, **overrides):
    cfg = dict(steps=4, batch_size=8, seq_len=16, lr=3e-3, warmup_steps=1, progress=False, log_every=1)
    cfg.update(overrides)
    model = model or tiny_model("llama", seed=0, vocab_size=128, hidden=64, intermediate=128)
    sampler = WindowSampler(_stream(), cfg["seq_len"], cfg["batch_size"], seed=1)
    return Trainer(model, TrainConfig(**cfg), sampler, out_dir=out, fingerprint={"data": "synthetic-v1"})


# ---- 8-bit AdamW -----------------------------------------------------------------------------------------
def test_adamw8bit_follows_adamw_with_8bit_states():
    pytest.importorskip("bitsandbytes")
    ref = _trainer(steps=6)
    ref_losses = [c["loss"] for c in ref.train().curve]
    t = _trainer(steps=6, optimizer="adamw8bit")
    losses = [c["loss"] for c in t.train().curve]
    # Blockwise 8-bit moments change the update by well under a percent of the loss here.
    assert losses == pytest.approx(ref_losses, abs=0.02)
    assert losses[-1] < losses[0] - 0.1
    emb = t.model.get_input_embeddings().weight  # 128 x 64 = 8192 elements >= bitsandbytes' 4096
    quant = t.optimizer.state[emb]
    assert quant["state1"].dtype == torch.uint8 and quant["state2"].dtype == torch.uint8
    assert quant["absmax1"].numel() == math.ceil(emb.numel() / 256)
    norm = t.model.model.norm.weight  # 64 elements: float32 states
    assert t.optimizer.state[norm]["state1"].dtype == torch.float32
    # Same initial parameters, different optimizer: the trajectories stay close but are not equal.
    for (n, p), (_, q) in zip(ref.model.named_parameters(), t.model.named_parameters()):
        assert (p - q).abs().max() < 5e-3, n


def test_adamw8bit_checkpoint_resumes_exactly(tmp_path):
    pytest.importorskip("bitsandbytes")
    full = _trainer(tmp_path / "a", steps=4, optimizer="adamw8bit").train()
    _trainer(tmp_path / "b", steps=4, save_every=2, optimizer="adamw8bit").train()
    ckpt = tmp_path / "b" / "checkpoints" / "step-00000002"
    opt = load_file(ckpt / "optimizer.safetensors")
    emb = "model.embed_tokens.weight"
    assert opt[f"{emb}::__bnb_optimizer_quant_state__/state1"].dtype == torch.uint8
    assert opt[f"{emb}::__bnb_optimizer_quant_state__/absmax2"].dtype == torch.float32
    assert opt[f"{emb}::step#int"].item() == 2
    resumed = _trainer(tmp_path / "b", steps=4, optimizer="adamw8bit").train(resume=ckpt)
    assert resumed.resumed_from == 2
    assert resumed.final_loss == pytest.approx(full.final_loss, abs=1e-6)


def test_optimizer_errors_name_the_fix(monkeypatch):
    with pytest.raises(UserError, match="needs a CUDA device; this run is on cpu. On CPU use --optimizer adamw8bit"):
        _trainer(optimizer="paged_adamw8bit")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if it were not installed
    with pytest.raises(UserError, match=r"optimizer 'adamw8bit' needs bitsandbytes.*pip install bitsandbytes"):
        _trainer(optimizer="adamw8bit")


# ---- QLoRA ---------------------------------------------------------------------------------------------
def _nf4_levels() -> torch.Tensor:
    """The 16 NF4 values from the construction of QLoRA §3: quantiles of N(0, 1), 8 for the positive
    half and 7 for the negative half, each spanning [offset, 1/2] of the probability mass, so that
    zero is exact; normalised to [-1, 1]. ``offset`` is the official code's 0.9677083."""
    offset = 0.9677083
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    v = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg])
    return (v / v.abs().max()).sort().values.float()


def _nf4_reference(w: torch.Tensor, block: int = 64) -> torch.Tensor:
    """Blockwise absmax NF4 round-to-nearest of a (out, in) weight, flattened row-major as in the paper."""
    levels = _nf4_levels()
    flat = w.reshape(-1, block)  # (n_blocks, 64)
    absmax = flat.abs().amax(dim=1, keepdim=True)
    codes = (flat / absmax).unsqueeze(-1).sub(levels).abs().argmin(-1)  # nearest of the 16 values
    return (levels[codes] * absmax).reshape(w.shape)


def test_nf4_levels_are_the_papers():
    # QLoRA, Appendix E: the NF4 data type, to four decimals.
    paper = [-1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0,
             0.0796, 0.1609, 0.2461, 0.3379, 0.4407, 0.5626, 0.7230, 1.0]
    assert _nf4_levels().tolist() == pytest.approx(paper, abs=1e-4)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_nf4_weights_match_an_independent_reference(family):
    bnb = pytest.importorskip("bitsandbytes")
    from efficientgpt.models import arch
    from efficientgpt.train.quantize import quantize_model

    model = tiny_model(family, seed=0, hidden=64, intermediate=128)
    originals = {f"{arch.family_of(model).blocks}.{i}.{n}": arch.linear_weight(m).detach().clone()
                 for i, b in enumerate(arch.blocks(model)) for n, m in b.named_modules()
                 if type(m) is torch.nn.Linear or arch.is_conv1d(m)}
    report = quantize_model(model, double_quant=False)
    assert sorted(report["names"]) == sorted(originals)  # every block linear layer, nothing else
    assert type(model.get_output_embeddings()) is torch.nn.Linear  # the LM head stays in float
    for name, w in originals.items():
        q = model.get_submodule(name)
        assert isinstance(q, bnb.nn.Linear4bit) and (q.out_features, q.in_features) == tuple(w.shape)
        deq = bnb.functional.dequantize_4bit(q.weight.data, q.weight.quant_state)
        torch.testing.assert_close(deq, _nf4_reference(w), atol=1e-6, rtol=0, msg=name)


def test_double_quantization_stores_the_block_maxima_in_8_bits():
    bnb = pytest.importorskip("bitsandbytes")
    from efficientgpt.train.quantize import nf4_bits_per_parameter, quantize_model

    model = tiny_model("llama", seed=0, hidden=256, intermediate=512, layers=1)
    w = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    report = quantize_model(model)
    q = model.model.layers[0].mlp.up_proj
    assert q.weight.quant_state.nested and q.weight.quant_state.absmax.dtype == torch.uint8
    deq = bnb.functional.dequantize_4bit(q.weight.data, q.weight.quant_state)
    ref = _nf4_reference(w)
    # 8-bit block maxima: each weight moves by a fraction of a percent of its block's maximum at most.
    scale = w.reshape(-1, 64).abs().amax(1, keepdim=True).expand(-1, 64).reshape(w.shape)
    assert ((deq - ref).abs() / scale).max() < 0.01
    assert nf4_bits_per_parameter() == pytest.approx(4.127, abs=1e-3)  # QLoRA §3
    # Large matrices approach the paper's 4.127 bits; our tiny ones carry a 16-value code table each.
    assert 4.1 < report["bits_per_parameter"] < 4.6


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_qlora_is_lora_over_the_dequantized_base(family):
    bnb = pytest.importorskip("bitsandbytes")
    from efficientgpt.models import arch
    from efficientgpt.peft.lora import LoraConfig
    from efficientgpt.train.quantize import quantize_model

    torch.manual_seed(0)
    model = tiny_model(family, seed=0, hidden=64, intermediate=128)
    quantize_model(model)
    cfg = LoraConfig(targets=["all-linear"] if family == "llama" else ["q", "v", "o", "up", "down"], rank=4)
    delta = core.apply(model, "lora", cfg)
    with torch.no_grad():
        for p in delta.parameters():
            p.normal_(0, 0.05)
    # Reference: the same model with plain Linear layers holding the dequantized NF4 weights.
    ref = tiny_model(family, seed=0, hidden=64, intermediate=128)
    for name, m in model.named_modules():
        if isinstance(m, bnb.nn.Linear4bit):
            w = bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state)  # (out, in)
            target = ref.get_submodule(name)
            with torch.no_grad():
                target.weight.copy_(w.T if arch.is_conv1d(target) else w)
    ref_delta = core.apply(ref, "lora", cfg)
    ref_delta.load_state_dict(delta.state_dict())
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    # One step trains the LoRA factors only; the 4-bit codes do not move.
    # The packed codes sit in float32 storage: compare their bits (some patterns read as NaN).
    packed = {n: p.detach().view(torch.int32).clone() for n, p in model.named_parameters()
              if type(p).__name__ == "Params4bit"}
    t = Trainer(model, TrainConfig(steps=1, batch_size=2, seq_len=12, progress=False, warmup_steps=0),
                lambda step: {"input_ids": ids}, fingerprint={})
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    t.train()
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters() if p.requires_grad)
    assert all(torch.equal(packed[n], p.detach().view(torch.int32)) for n, p in model.named_parameters()
               if n in packed)


def test_qlora_refusals(monkeypatch):
    pytest.importorskip("bitsandbytes")
    from efficientgpt import pipeline
    from efficientgpt.models.loading import LoadedModel
    from efficientgpt.train.quantize import quantize_model

    model = tiny_model("llama")
    core.apply(model, "lora", registry.get("lora").config_cls(rank=2))
    with pytest.raises(UserError, match="quantize the base model before attaching a delta"):
        quantize_model(model)
    model = tiny_model("llama")
    quantize_model(model)
    with pytest.raises(UserError, match="the model is quantized already"):
        quantize_model(model)
    loaded = LoadedModel(model=tiny_model("llama"), tokenizer=None, spec="tiny", path="tiny")
    monkeypatch.setattr(pipeline, "open_data", lambda *a, **k: _FakeSource())
    with pytest.raises(UserError, match="full trains the base weights .* stores frozen in 4 bits"):
        pipeline.tune("tiny", "full", registry.get("full").config_cls(keep_base=False), loaded=loaded,
                      quantize="nf4", train={"steps": 1}, device="cpu")
    with pytest.raises(UserError, match="quantize 'int3' is not allowed; choose one of none, nf4"):
        pipeline.tune("tiny", "lora", registry.get("lora").config_cls(), loaded=loaded, quantize="int3")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if it were not installed
    with pytest.raises(UserError, match=r"--quantize nf4 \(QLoRA\) needs bitsandbytes.*pip install bitsandbytes"):
        quantize_model(tiny_model("llama"))


class _FakeSource:
    fingerprint = "fake"

    def evaluate(self, model, cfg):
        return {"loss": 1.0}

    def train_batches(self, cfg, rank, world):
        return lambda step: {"input_ids": torch.zeros(cfg.batch_size, cfg.seq_len, dtype=torch.long)}

    def describe(self):
        return {}


@pytest.mark.slow
def test_qlora_acceptance_command(tmp_path, tiny_embedded_path):
    """The exact command of the acceptance list; the delta then loads onto the unquantized base."""
    pytest.importorskip("bitsandbytes")
    q = tmp_path / "Q"
    res = json.loads(run_cli("tune", "--model", "embedded:tiny", "--method", "lora", "--quantize", "nf4",
                             "--steps", "10", "--out", str(q), "--json").stdout)
    assert res["quantize"]["type"] == "nf4" and res["quantize"]["modules"] == 14  # 2 layers x 7 linear maps
    assert res["parameters"]["trainable"] == 2 * 2 * 8 * (64 + 64)  # LoRA r=8 on q, v
    meta = json.loads((q / "delta_config.json").read_text())
    assert meta["base_quantization"]["type"] == "nf4" and meta["base"]["targets"]["model.layers.0.self_attn.q_proj"] \
        == [64, 64]
    ev = json.loads(run_cli("eval", "--model", "embedded:tiny", "--delta", str(q), "--data", "embedded:code",
                            "--json", "--max-tokens", "4096").stdout)
    assert ev["delta"]["method"] == "lora" and math.isfinite(ev["loss"])
    run_cli("merge", "--model", "embedded:tiny", "--delta", str(q), "--out", str(tmp_path / "M"))
    assert (tmp_path / "M" / "config.json").exists()


# ---- FSDP ---------------------------------------------------------------------------------------------------
def test_fsdp_without_a_process_group_names_torchrun():
    with pytest.raises(UserError, match=r"launch with torchrun --nproc_per_node N \(N >= 2\)"):
        _trainer(fsdp=True)


def _torchrun(*args, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(29600 + os.getpid() % 1000), SCRIPT, *args],
                          capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _single(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, env=env, check=True)
    return json.loads(proc.stdout)


@pytest.mark.slow
def test_fsdp_matches_single_process_and_its_checkpoints_interchange(tmp_path):
    single = _single("--steps", "5", "--batch", "8", "--save-every", "3", "--out", str(tmp_path / "one"))
    fsdp = _torchrun("--steps", "5", "--batch", "8", "--save-every", "3", "--fsdp", "--out", str(tmp_path / "fsdp"))
    assert np.allclose(fsdp["losses"], single["losses"], atol=1e-4), (fsdp["losses"], single["losses"])
    # Rank 0 wrote full tensors: the same as the single process's, for weights and AdamW moments.
    for name in ("model.safetensors", "optimizer.safetensors"):
        a = load_file(tmp_path / "one" / "checkpoints" / "step-00000005" / name)
        b = load_file(tmp_path / "fsdp" / "checkpoints" / "step-00000005" / name)
        assert sorted(a) == sorted(b)
        for k in a:
            torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-4, msg=k)
    # A sharded run resumes from a single-process checkpoint (each rank loads its shard).
    resumed = _torchrun("--steps", "5", "--batch", "8", "--fsdp", "--out", str(tmp_path / "fsdp2"),
                        "--resume-from", str(tmp_path / "one" / "checkpoints" / "step-00000003"))
    assert resumed["resumed_from"] == 3
    assert np.allclose(resumed["losses"], single["losses"][3:], atol=1e-4), (resumed["losses"], single["losses"])


@pytest.mark.slow
def test_fsdp_acceptance_command(tmp_path, tiny_embedded_path):
    """``torchrun --nproc_per_node 2 -m efficientgpt tune --model embedded:tiny --method full --fsdp
    --steps 5 --out F --json``, exactly; the saved (gathered) delta then evaluates like the run said."""
    f = tmp_path / "F"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(29700 + os.getpid() % 1000), "-m", "efficientgpt", "tune", "--model", "embedded:tiny",
                           "--method", "full", "--fsdp", "--steps", "5", "--out", str(f), "--json"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["train_config"]["fsdp"] and res["eval"]["loss_after"] < res["eval"]["loss_before"]
    ev = json.loads(run_cli("eval", "--model", "embedded:tiny", "--delta", str(f), "--data", "embedded:code",
                            "--max-tokens", "65536", "--json").stdout)
    assert ev["loss"] == pytest.approx(res["eval"]["loss_after"], abs=1e-4)
