"""The memory planner: parameter counts, the activation model term by term, measured peaks, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from efficientgpt import plan, registry
from efficientgpt.errors import UserError
from efficientgpt.models.tiny import tiny_model
from efficientgpt.peft import core
from efficientgpt.train.losses import causal_lm_loss


# ---- parameters ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(plan.PRESETS))
def test_preset_parameter_counts_equal_the_transformers_models(name):
    from transformers import AutoModelForCausalLM, GPT2Config, GPTNeoXConfig, LlamaConfig, OPTConfig, Qwen2Config

    s = plan.PRESETS[name]
    if s.family == "gpt2":
        cfg = GPT2Config(n_embd=s.hidden, n_layer=s.layers, n_head=s.heads)
    elif s.family == "llama":
        cls = Qwen2Config if s.qkv_bias else LlamaConfig
        cfg = cls(vocab_size=s.vocab, hidden_size=s.hidden, num_hidden_layers=s.layers, num_attention_heads=s.heads,
                  num_key_value_heads=s.kv_heads, intermediate_size=s.intermediate, tie_word_embeddings=s.tied)
    elif s.family == "opt":
        cfg = OPTConfig(hidden_size=s.hidden, num_hidden_layers=s.layers, num_attention_heads=s.heads,
                        ffn_dim=s.intermediate, word_embed_proj_dim=s.hidden)
    else:
        cfg = GPTNeoXConfig(vocab_size=s.vocab, hidden_size=s.hidden, num_hidden_layers=s.layers,
                            num_attention_heads=s.heads, intermediate_size=s.intermediate, tie_word_embeddings=False)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    assert s.parameters()["total"] == sum(p.numel() for p in model.parameters())
    assert plan.shape_from_config(cfg).parameters()["total"] == s.parameters()["total"]


def test_published_sizes():
    # The sizes the model cards state, to the nearest million.
    sizes = {"gpt2": 124, "gpt2-medium": 355, "llama-7b": 6738, "llama-13b": 13016, "llama-70b": 68977,
             "qwen2-0.5b": 494, "llama3-8b": 8030}
    for name, millions in sizes.items():
        assert round(plan.PRESETS[name].parameters()["total"] / 1e6) == millions, name


# ---- activations: the model against what autograd keeps -----------------------------------------------
def _kept_bytes(model, ids, autocast: bool) -> int:
    """Bytes of the distinct tensors autograd saves for the backward (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen.setdefault(st.data_ptr(), st.nbytes())
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        causal_lm_loss(model, {"input_ids": ids})
    return sum(seen.values())


CASES = [(fam, method, prec, targets) for fam in ("llama", "qwen2", "gpt2") for method in ("full", "lora", "qlora")
         for prec in ("fp32", "bf16-mixed") for targets in (["q", "v"], ["all-linear"])
         if method != "full" or targets == ["q", "v"]]


@pytest.mark.parametrize(("family", "method", "precision", "targets"), CASES)
def test_activation_model_counts_what_autograd_keeps(family, method, precision, targets):
    if method == "qlora":
        pytest.importorskip("bitsandbytes")
    B, T, V = 3, 16, 256
    model = tiny_model(family, seed=0, vocab_size=V, hidden=32, heads=4, intermediate=80, layers=2)
    shape = plan.shape_from_config(model.config)
    if method == "qlora":
        from efficientgpt.train.quantize import quantize_model

        quantize_model(model)
    if method != "full":
        core.apply(model, "lora", registry.get("lora").config_cls(rank=2, targets=targets))
    ids = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(0))
    measured = _kept_bytes(model, ids, precision != "fp32")
    cfg = plan.PlanConfig(method=method, batch=B, seq=T, precision=precision, rank=2, targets=targets)
    cfg.validate()
    tr = plan.Training(full=method == "full", lora=tuple(cfg.targets) if method != "full" else (), rank=2,
                       quantized=method == "qlora")
    act = plan.activation_bytes(shape, tr, plan.Bytes.of(precision), method, B, T, checkpointing=False)
    shifted = B * (T - 1)
    # The loss keeps its float32 log-probabilities, the int64 targets and the token count.
    predicted = act["kept"] + shifted * V * 4 + shifted * 8 + 4
    assert predicted == pytest.approx(measured, rel=0.003), (predicted, measured)


# ---- the measured peak of a step --------------------------------------------------------------------------
TINY = {"model_type": "llama", "vocab_size": 4096, "hidden_size": 64, "intermediate_size": 172,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 64,
        "tie_word_embeddings": True}  # the embedded:tiny architecture, random weights


def _measure(spec):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    proc = subprocess.run([sys.executable, "-m", "efficientgpt.plan", "--measure", json.dumps(spec)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_bytes"]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_predicted_step_peak_is_within_15_percent_of_measured(method):
    """The first optimizer step's peak above the memory held after building model and optimizer,
    measured as resident memory in a fresh process, against the planner's prediction."""
    if method == "qlora":
        pytest.importorskip("bitsandbytes")
    from transformers import AutoConfig

    spec = {"config": TINY, "method": method, "precision": "fp32", "batch": 16, "seq": 64}
    measured = _measure(spec)
    shape = plan.shape_from_config(AutoConfig.for_model(**TINY))
    predicted = plan.plan(shape, plan.PlanConfig(method=method, batch=16, seq=64, precision="fp32",
                                                 device="cpu"))["memory"]["first_step_above_baseline"]
    assert abs(predicted - measured) <= 0.15 * measured, (predicted, measured)


# ---- the plan itself -----------------------------------------------------------------------------------------
def test_flops_follow_the_closed_forms():
    s = plan.PRESETS["llama-7b"]
    L, H, I, V, T = 32, 4096, 11008, 32000, 2048
    n_mm = L * (4 * H * H + 3 * H * I) + V * H
    full = plan.plan(s, plan.PlanConfig(method="full", batch=4, seq=T))["flops"]
    fwd = 2 * n_mm + 4 * L * T * H
    assert full["forward_per_token"] == fwd and full["training_per_token"] == 3 * fwd
    assert full["six_n_per_step"] == 6 * s.parameters()["total"] * 4 * T
    lora = plan.plan(s, plan.PlanConfig(method="lora", batch=4, seq=T, rank=8))["flops"]
    n_lora = L * 2 * 8 * (H + H)  # q and v: r (d_in + d_out) each
    lora_fwd = fwd + 2 * n_lora
    # Forward, input gradients (matrices as the forward, attention twice), factor gradients: 4N + 6 N_lora.
    assert lora["forward_per_token"] == lora_fwd
    assert lora["training_per_token"] == 2 * lora_fwd + 4 * L * T * H + 2 * n_lora
    ckpt = plan.plan(s, plan.PlanConfig(method="full", batch=4, seq=T, gradient_checkpointing=True))["flops"]
    assert ckpt["training_per_token"] == 4 * fwd


def test_memory_terms_follow_the_closed_forms():
    s = plan.PRESETS["llama-70b"]
    n = s.parameters()["total"]
    r = plan.plan(s, plan.PlanConfig(method="full", batch=8, seq=4096, precision="bf16-mixed", devices=8))
    mem = r["memory"]
    assert mem["weights"] == 4 * n and mem["gradients"] == 4 * n and mem["optimizer"] == 8 * n
    assert r["inference"]["kv_cache"] == 2 * 80 * 8 * 128 * 4096 * 8 * 2  # GQA: 8 key/value heads of 128
    rows = {(d["devices"], d["strategy"]): d for d in r["devices"]}
    assert rows[(8, "fsdp")]["weights"] == mem["weights"] / 8 and rows[(8, "fsdp")]["optimizer"] == mem["optimizer"] / 8
    assert rows[(8, "ddp")]["weights"] == mem["weights"] and rows[(8, "ddp")]["micro_batch"] == 1
    assert rows[(8, "fsdp")]["peak"] < rows[(8, "ddp")]["peak"] < mem["peak"]
    # LoRA and 8-bit states: AdamW's 8 bytes per trainable parameter become 2 (+ block maxima).
    q = plan.plan(s, plan.PlanConfig(method="qlora", batch=1, seq=512, optimizer="adamw8bit", precision="bf16"))
    lora_n = q["parameters"]["lora"]
    assert q["memory"]["optimizer"] == pytest.approx(2 * lora_n, rel=0.02)
    assert q["memory"]["weights"] < 0.3 * 2 * n  # NF4 blocks: ~4.13 bits of 16
    ck = plan.plan(s, plan.PlanConfig(method="full", batch=8, seq=4096, gradient_checkpointing=True))
    assert ck["memory"]["activations"] < 0.2 * mem["activations"]


def test_bad_input_is_refused_clearly():
    with pytest.raises(UserError, match=r"unknown model preset 'llama-9b'; presets: gpt2, .*llama-7b, llama-13b"):
        plan.load_shape("llama-9b")
    with pytest.raises(UserError, match="PlanConfig.rank = 0 is out of range"):
        plan.plan(plan.PRESETS["gpt2"], plan.PlanConfig(method="lora", rank=0))
    with pytest.raises(UserError, match="'w' is not a role"):
        plan.plan(plan.PRESETS["gpt2"], plan.PlanConfig(method="lora", targets=["w"]))
    with pytest.raises(UserError, match="method = 'dora' is not allowed; choose one of full, lora, qlora"):
        plan.plan(plan.PRESETS["gpt2"], plan.PlanConfig(method="dora"))
    with pytest.raises(UserError, match="needs device cuda"):
        plan.plan(plan.PRESETS["gpt2"], plan.PlanConfig(optimizer="paged_adamw8bit", device="cpu"))


def test_local_directory_and_embedded_specs(tmp_path):
    tiny_model("qwen2").config.save_pretrained(tmp_path)
    s = plan.load_shape(str(tmp_path))
    assert (s.family, s.hidden, s.kv_heads, s.qkv_bias, s.source) == ("llama", 32, 2, True, "local")
    e = plan.load_shape("embedded:tiny")
    assert (e.hidden, e.layers, e.intermediate, e.tied) == (64, 2, 172, True)


def test_plan_acceptance_command(capsys, monkeypatch):
    """``efficientgpt plan --model llama-7b --method lora --batch 4 --seq 2048 --json``, exactly."""
    from efficientgpt import cli

    if "efficientgpt.commands.plan" not in cli.COMMAND_MODULES:
        monkeypatch.setattr(cli, "COMMAND_MODULES", (*cli.COMMAND_MODULES, "efficientgpt.commands.plan"))
    code = cli.main(["plan", "--model", "llama-7b", "--method", "lora", "--batch", "4", "--seq", "2048", "--json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    r = json.loads(out.out)
    assert r["parameters"]["trainable"] == 32 * 2 * 8 * (4096 + 4096)
    assert r["config"]["batch"] == 4 and r["config"]["seq"] == 2048
    assert r["memory"]["peak"] > r["memory"]["weights"] > 0
    code = cli.main(["plan", "--model", "llama-9b", "--method", "lora"])
    assert code == 1 and "presets: gpt2" in capsys.readouterr().err
