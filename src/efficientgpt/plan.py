"""The memory planner: what a training (or inference) configuration needs, before it runs.

Given a model's shape (a preset with the published dimensions, a hub id or a local directory), a
method (``full``, ``lora``, ``qlora``), a batch shape, precision, optimizer and gradient checkpointing,
:func:`plan` returns the expected bytes of weights, gradients, optimizer states and activations, the
peak of one optimizer step, the KV cache of inference, and FLOPs per step, for 1..N devices under DDP
(replicated) and FSDP (sharded weights, gradients and optimizer states).

What is predicted
-----------------
*Parameters* are counted in closed form from the shape (checked against the Hugging Face models built
on the meta device in the tests).

*Activations* are the tensors autograd keeps between forward and backward. They are counted per
token and per decoder layer, term by term, for the transformers implementations (the
``eager``-free SDPA path: ``F.scaled_dot_product_attention`` with the causal flag, which keeps q, k,
v, the output and one float32 log-sum-exp per head and token, never the T x T probabilities). A
tensor is counted once however many ops keep it, and only when some kept gradient needs it: a frozen
linear layer keeps its weight, not its input, so LoRA (frozen base) keeps far less than full
fine-tuning. Per layer and token, in elements (``H`` hidden, ``Hkv`` key/value width, ``I`` MLP
width, ``nh`` heads; "f32" always float32, "c" the compute dtype, "r" the residual stream's dtype):

========================= =========================================================================
Llama / Qwen2 / Mistral   RMSNorm: input (H, f32) and 1/rms (1, f32) when the stream needs grad,
                          the normalised input (H, r) when the norm weight trains; twice per layer.
                          Linear inputs: the attention input (H) and MLP input (H) when a consumer
                          trains (its weight, or a LoRA on it); attention output (H) and SwiGLU
                          product (I) likewise. SDPA: q (H), k, v (Hkv each), output (H, shared
                          with o_proj's input), log-sum-exp (nh, f32). SwiGLU: gate, SiLU(gate),
                          up (I each).
GPT-2                     LayerNorm: input (H, r) + mean and rstd (2, f32), twice. Linear inputs as
                          above (c_attn, c_proj, c_fc, the MLP's c_proj). SDPA: 5H (q and one of k/v
                          are made contiguous, and the fused qkv buffer (3H) stays alive through
                          the other view), output (H), log-sum-exp (nh). gelu_new (tanh formula):
                          4I (input, tanh, 0.5x, 1 + tanh).
OPT, GPT-NeoX             the same terms for their layouts (ReLU keeps I; exact GELU keeps I;
                          NeoX's fused qkv keeps 3H); marked "approximate": not checked term by
                          term.
========================= =========================================================================

Under mixed precision (``bf16-mixed``, the Trainer's ``--bf16`` autocast) the residual stream and
norms stay float32 while every linear layer casts its input to bfloat16 itself (autocast caches only
weight casts), so a float32 input feeding k consumers keeps k bf16 copies; each linear layer's bf16
weight copy is kept for the input gradient (2 bytes per linear parameter, frozen ones included). A
LoRA adds its rank-r intermediate (r elements per token) and its own cast of the input.

Outside the layers: the final norm, the LM head's input when the head trains, and the loss. The
loss (:func:`efficientgpt.train.losses.causal_lm_loss`) shifts and flattens the logits (a copy) and
computes ``log_softmax`` in float32; its output is kept. The peak around the loss holds three
logits-sized tensors: in the forward the logits, the shifted copy and the log-probabilities; in
the backward the log-probabilities, their gradient and the logits' gradient (float32) — 12 bytes per
logit in float32 and under bf16 autocast alike.

Gradient checkpointing (non-reentrant, one checkpoint per decoder layer) keeps only each layer's
input (H, r); the backward then recomputes one layer at a time, so one layer's activations return.

The peak of a step
------------------
``phase A`` (the loss, no gradients yet): kept activations + the loss's three logits tensors.
``phase B`` (the optimizer step): gradients + optimizer states + the optimizer's temporaries (torch
AdamW: two largest-tensor temporaries on CPU (per-tensor loop), one state-sized temporary on CUDA
(``foreach``); bitsandbytes 8-bit: none on CUDA, four float32 tensors of the largest tensor's size on
CPU: both moments dequantized, the scaled gradient, the denominator).
Steady-state peak = weights + optimizer states + max(phase A, gradients + temporaries).
:data:`VALIDATED` names what the tests compare with measurements: the first step's peak above the
memory held after building the model and optimizer, ``max(phase A, phase B)`` (optimizer states are
created in the first step), measured as resident memory on CPU (``efficientgpt.bench.measure``).

FLOPs
-----
Forward per token: ``2 N_mm`` (N_mm: the parameters of matrix products, LM head included, embedding
lookups excluded) plus attention ``4 L T H`` (QK^T and AV over the whole context, not halved for the
causal mask, the PaLM convention). Training: the backward costs twice the forward where weights
train (``6 N``) and only the input-gradient half where they are frozen (LoRA/QLoRA: ``4 N + 6 N_lora``
plus three times the attention term); gradient checkpointing adds one forward. ``6 N tokens`` is reported alongside as the usual rule.

Inference: weights + KV cache (``2 L Hkv`` values per token in the compute dtype) for ``batch``
sequences of ``seq`` tokens, plus the prefill's largest transient (one layer's MLP, the last logits).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from efficientgpt.config import ConfigBase, field
from efficientgpt.errors import ConfigError, UserError

METHODS = ("full", "lora", "qlora")
PRECISIONS = ("fp32", "bf16-mixed", "fp16-mixed", "bf16", "fp16")
OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw", "paged_adamw8bit", "sgd")
DEVICES = ("cuda", "cpu")
#: What the validation tests measure and compare (see the module docstring).
VALIDATED = "first_step_above_baseline"
GIB = 1024**3
#: Bits per NF4 weight with double quantization (QLoRA §3; see efficientgpt.train.quantize).
NF4_BITS = 4 + 8 / 64 + 32 / (64 * 256)


# ---- model shapes ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ModelShape:
    """The dimensions that decide memory and compute."""

    name: str
    family: str
    """``llama`` (also Qwen2, Mistral), ``gpt2``, ``opt`` or ``gpt_neox``."""
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    max_positions: int
    tied: bool
    qkv_bias: bool = False
    """Biases on q, k, v only (Qwen2)."""
    linear_bias: bool = False
    """Biases on every linear layer of the blocks (GPT-2, OPT, GPT-NeoX)."""
    learned_positions: int = 0
    """Rows of a learned position embedding (GPT-2: n_positions; OPT: max_positions + 2)."""
    source: str = "preset"

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def mlp(self) -> str:
        return {"llama": "swiglu", "gpt2": "gelu_tanh", "opt": "relu", "gpt_neox": "gelu"}[self.family]

    def linears(self) -> dict[str, tuple[int, int]]:
        """Per decoder layer: module -> (d_in, d_out); GPT-2/NeoX have one fused ``qkv`` module."""
        H, K, I = self.hidden, self.kv_width, self.intermediate
        attn = ({"qkv": (H, 3 * H)} if self.family in ("gpt2", "gpt_neox")
                else {"q": (H, H), "k": (H, K), "v": (H, K)})
        mlp = {"gate": (H, I), "up": (H, I), "down": (I, H)} if self.mlp == "swiglu" else {"up": (H, I),
                                                                                          "down": (I, H)}
        return {**attn, "o": (H, H), **mlp}

    def layer_parameters(self) -> dict[str, int]:
        """Per decoder layer: linear weights, biases, norm parameters."""
        lin = self.linears()
        weights = sum(a * b for a, b in lin.values())
        if self.linear_bias:
            biases = sum(b for _, b in lin.values())
        elif self.qkv_bias:
            biases = self.hidden + 2 * self.kv_width
        else:
            biases = 0
        norm = self.hidden if self.family == "llama" else 2 * self.hidden  # RMSNorm: weight; LayerNorm: +bias
        return {"linear_weights": weights, "biases": biases, "norms": 2 * norm}

    def parameters(self) -> dict[str, int]:
        layer = self.layer_parameters()
        per_layer = sum(layer.values())
        embed = self.vocab * self.hidden
        final_norm = self.hidden if self.family == "llama" else 2 * self.hidden
        head = 0 if self.tied else self.vocab * self.hidden
        pos = self.learned_positions * self.hidden
        total = embed + pos + self.layers * per_layer + final_norm + head
        return {"total": total, "embedding": embed, "position_embedding": pos, "per_layer": per_layer,
                "blocks": self.layers * per_layer, "block_linear_weights": self.layers * layer["linear_weights"],
                "final_norm": final_norm, "lm_head": head, "matmul": self.layers * layer["linear_weights"]
                + self.vocab * self.hidden}

    def describe(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["parameters"] = self.parameters()["total"]
        return d


def _llama(name, vocab, hidden, layers, heads, kv, inter, ctx, tied=False, qkv_bias=False):
    return ModelShape(name, "llama", vocab, hidden, layers, heads, kv, inter, ctx, tied, qkv_bias=qkv_bias)


def _gpt2(name, hidden, layers, heads):
    return ModelShape(name, "gpt2", 50257, hidden, layers, heads, heads, 4 * hidden, 1024, True,
                      linear_bias=True, learned_positions=1024)


#: Published dimensions (the models' config.json files on the Hugging Face hub).
PRESETS: dict[str, ModelShape] = {s.name: s for s in (
    _gpt2("gpt2", 768, 12, 12),
    _gpt2("gpt2-medium", 1024, 24, 16),
    _gpt2("gpt2-large", 1280, 36, 20),
    _gpt2("gpt2-xl", 1600, 48, 25),
    _llama("llama-7b", 32000, 4096, 32, 32, 32, 11008, 4096),
    _llama("llama-13b", 32000, 5120, 40, 40, 40, 13824, 4096),
    _llama("llama-70b", 32000, 8192, 80, 64, 8, 28672, 4096),
    _llama("llama3-8b", 128256, 4096, 32, 32, 8, 14336, 8192),
    _llama("qwen2-0.5b", 151936, 896, 24, 14, 2, 4864, 32768, tied=True, qkv_bias=True),
    _llama("qwen2-1.5b", 151936, 1536, 28, 12, 2, 8960, 32768, tied=True, qkv_bias=True),
    _llama("qwen2-7b", 152064, 3584, 28, 28, 4, 18944, 32768, qkv_bias=True),
    ModelShape("opt-125m", "opt", 50272, 768, 12, 12, 12, 3072, 2048, True, linear_bias=True,
               learned_positions=2050),
    ModelShape("opt-1.3b", "opt", 50272, 2048, 24, 32, 32, 8192, 2048, True, linear_bias=True,
               learned_positions=2050),
    ModelShape("pythia-160m", "gpt_neox", 50304, 768, 12, 12, 12, 3072, 2048, False, linear_bias=True),
    ModelShape("pythia-1.4b", "gpt_neox", 50304, 2048, 24, 16, 16, 8192, 2048, False, linear_bias=True),
)}


def shape_from_config(config, name: str = "", source: str = "config") -> ModelShape:
    """A :class:`ModelShape` from a transformers config (Llama, Qwen2, Mistral, GPT-2, OPT, GPT-NeoX)."""
    mt = getattr(config, "model_type", None)
    g = lambda *names, default=None: next((getattr(config, n) for n in names if getattr(config, n, None)  # noqa: E731
                                           is not None), default)
    tied = bool(g("tie_word_embeddings", default=True))
    if mt in ("llama", "mistral", "qwen2", "qwen3"):
        heads = config.num_attention_heads
        return ModelShape(name or mt, "llama", config.vocab_size, config.hidden_size, config.num_hidden_layers,
                          heads, g("num_key_value_heads", default=heads), config.intermediate_size,
                          g("max_position_embeddings", default=2048), tied,
                          qkv_bias=mt == "qwen2" or bool(g("attention_bias", default=False)), source=source)
    if mt == "gpt2":
        return ModelShape(name or mt, "gpt2", config.vocab_size, config.n_embd, config.n_layer, config.n_head,
                          config.n_head, g("n_inner", default=4 * config.n_embd), config.n_positions, tied,
                          linear_bias=True, learned_positions=config.n_positions, source=source)
    if mt == "opt":
        if config.word_embed_proj_dim != config.hidden_size:
            raise UserError(f"OPT with word_embed_proj_dim {config.word_embed_proj_dim} != hidden_size "
                            f"{config.hidden_size} (opt-350m) has projection layers the planner does not model")
        return ModelShape(name or mt, "opt", config.vocab_size, config.hidden_size, config.num_hidden_layers,
                          config.num_attention_heads, config.num_attention_heads, config.ffn_dim,
                          config.max_position_embeddings, tied, linear_bias=bool(g("enable_bias", default=True)),
                          learned_positions=config.max_position_embeddings + 2, source=source)
    if mt == "gpt_neox":
        return ModelShape(name or mt, "gpt_neox", config.vocab_size, config.hidden_size, config.num_hidden_layers,
                          config.num_attention_heads, config.num_attention_heads, config.intermediate_size,
                          config.max_position_embeddings, bool(g("tie_word_embeddings", default=False)),
                          linear_bias=True, source=source)
    raise UserError(f"model type {mt!r} is not modelled by the planner; it knows llama, mistral, qwen2, gpt2, opt "
                    "and gpt_neox configs")


def load_shape(spec: str, trust_remote_code: bool = False) -> ModelShape:
    """A preset name, ``embedded``/``embedded:tiny``, a local directory with config.json, or a hub id."""
    import os

    if spec in PRESETS:
        return PRESETS[spec]
    if spec == "embedded" or spec.startswith("embedded:"):
        from efficientgpt.models.embedded import preset_of

        p = preset_of(spec)
        return ModelShape(spec, "llama", p.vocab_size, p.hidden, p.layers, p.heads, p.heads, p.intermediate,
                          p.seq_len, True, source="embedded")
    path = os.path.expanduser(spec)
    looks_local = os.path.isdir(path) or spec.startswith((".", "/", "~"))
    if not looks_local and (spec.count("/") != 1 or spec.startswith("-")):
        raise UserError(f"unknown model preset {spec!r}; presets: {', '.join(PRESETS)}; or give a hub id "
                        "(owner/name) or a local model directory with a config.json")
    try:
        from transformers import AutoConfig

        from efficientgpt import hub

        source = path if looks_local else hub.source_for(spec)  # NotCachedError is an OSError
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"could not read the config of {spec!r} ({first}); presets: {', '.join(PRESETS)}") from None
    return shape_from_config(config, name=spec, source="local" if looks_local else "hub")


# ---- the configuration -----------------------------------------------------------------------------
@dataclasses.dataclass
class PlanConfig(ConfigBase):
    """What to plan for."""

    method: str = field("full", "full fine-tuning, lora, or qlora (LoRA over an NF4 base)", choices=METHODS)
    batch: int = field(8, "sequences per optimizer step, summed over devices", minimum=1)
    seq: int = field(0, "tokens per sequence (0: min(2048, the model's context))", minimum=0)
    grad_accum: int = field(1, "micro-batches per optimizer step (activations are those of one)", minimum=1)
    precision: str = field("bf16-mixed", "fp32; bf16-mixed/fp16-mixed (float32 weights, autocast); bf16/fp16 "
                                         "(16-bit weights, states and activations)", choices=PRECISIONS)
    optimizer: str = field("adamw", "adamw, adamw8bit, paged_adamw, paged_adamw8bit (bitsandbytes) or sgd",
                           choices=OPTIMIZERS)
    gradient_checkpointing: bool = field(False, "recompute each decoder layer in the backward")
    rank: int = field(8, "LoRA rank", minimum=1)
    targets: list[str] = field(["q", "v"], "LoRA target roles (q,k,v,o,gate,up,down; all-linear, attn-linear, "
                                           "mlp-linear)")
    devices: int = field(1, "plan for 1..N devices", minimum=1)
    device: str = field("cuda", "cuda or cpu: decides the optimizer's temporaries (foreach on CUDA)",
                        choices=DEVICES)

    def validate(self) -> None:
        super().validate()
        if isinstance(self.targets, str):
            self.targets = [t.strip() for t in self.targets.split(",") if t.strip()]
        self.targets = list(_expand_targets(self.targets))
        if self.batch % self.grad_accum:
            raise ConfigError(f"PlanConfig.batch = {self.batch} is not divisible by grad_accum = {self.grad_accum}")
        if self.optimizer.startswith("paged") and self.device != "cuda":
            raise ConfigError(f"PlanConfig.optimizer = {self.optimizer!r} pages states to host memory and needs "
                              "device cuda")


_GROUPS = {"all-linear": ("q", "k", "v", "o", "gate", "up", "down"), "attn-linear": ("q", "k", "v", "o"),
           "mlp-linear": ("gate", "up", "down"), "qkv": ("q", "k", "v")}


def _expand_targets(targets: list[str]) -> tuple[str, ...]:
    out: list[str] = []
    for t in targets:
        for r in _GROUPS.get(t, (t,)):
            if r not in ("q", "k", "v", "o", "gate", "up", "down"):
                raise ConfigError(f"PlanConfig.targets: {r!r} is not a role; roles: q, k, v, o, gate, up, down "
                                  f"(groups: {', '.join(_GROUPS)})")
            if r not in out:
                out.append(r)
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class Bytes:
    """Bytes per element of the parameters, the compute (matrix products) and the residual stream."""

    param: int
    compute: int
    resid: int
    mixed: bool

    @classmethod
    def of(cls, precision: str) -> Bytes:
        if precision == "fp32":
            return cls(4, 4, 4, False)
        if precision.endswith("-mixed"):
            return cls(4, 2, 4, True)
        return cls(2, 2, 2, False)


# ---- what trains ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Training:
    """Which parameters train, as the activation model needs it."""

    full: bool
    lora: tuple[str, ...]
    """Roles carrying a LoRA (per layer)."""
    rank: int
    quantized: bool = False
    """QLoRA: the block linear layers are bitsandbytes ``Linear4bit``, whose outputs keep the input's
    dtype (float32 under autocast), so the MLP's elementwise tensors stay float32."""

    def module_roles(self, shape: ModelShape, module: str) -> tuple[str, ...]:
        return ("q", "k", "v") if module == "qkv" else ("gate",) if module == "gate" else (module,)

    def weight_trains(self, module: str) -> bool:
        return self.full

    def lora_on(self, shape: ModelShape, module: str) -> bool:
        return any(r in self.lora for r in self.module_roles(shape, module))

    def lora_width(self, shape: ModelShape, module: str) -> int:
        """Per token: the rank-r intermediates of the LoRAs on ``module`` (fused: one per role)."""
        return self.rank * sum(r in self.lora for r in self.module_roles(shape, module))


def _lora_parameters(shape: ModelShape, roles: tuple[str, ...], rank: int) -> list[int]:
    """Sizes of the LoRA tensors (A: r x d_in, B: d_out x r) of every layer."""
    H, K, I = shape.hidden, shape.kv_width, shape.intermediate
    dims = {"q": (H, H), "k": (H, K), "v": (H, K), "o": (H, H), "gate": (H, I), "up": (H, I), "down": (I, H)}
    if shape.mlp != "swiglu":
        dims.pop("gate")
    sizes = []
    for r in roles:
        if r in dims:
            d_in, d_out = dims[r]
            sizes += [rank * d_in, d_out * rank]
    return sizes * shape.layers


# ---- activations ----------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Acc:
    """Bytes per token of one layer, by term (for the breakdown)."""

    terms: dict[str, float] = dataclasses.field(default_factory=dict)

    def add(self, name: str, elements: float, nbytes: int) -> None:
        if elements:
            self.terms[name] = self.terms.get(name, 0.0) + elements * nbytes

    @property
    def total(self) -> float:
        return sum(self.terms.values())


def _linear_input(acc: _Acc, name: str, width: int, input_bytes: int, consumers: list[str], shape: ModelShape,
                  tr: Training, b: Bytes) -> None:
    """A tensor feeding the linear modules ``consumers``: kept when a consumer needs its input.

    One tensor is kept for all consumers, except under autocast, where each consuming matrix product
    casts a float32 input to 16 bits itself (a copy each), and a LoRA (float32 factors) turns a
    16-bit input to float32 and autocast casts it back (one more copy).
    """
    trainable = [m for m in consumers if tr.weight_trains(m)]
    loras = [m for m in consumers if tr.lora_on(shape, m)]
    if not trainable and not loras:
        return
    if b.mixed and input_bytes == 4:
        acc.add(name + " (16-bit casts)", width * (len(trainable) + len(loras)), b.compute)
    elif b.mixed:
        acc.add(name, width * bool(trainable), input_bytes)
        acc.add(name + " (LoRA casts)", width * len(loras), b.compute)
    else:
        acc.add(name, width, input_bytes)


def _norm(acc: _Acc, name: str, shape: ModelShape, tr: Training, b: Bytes, stream_grad: bool) -> None:
    H = shape.hidden
    if shape.family == "llama":  # RMSNorm computes in float32: input (a float32 copy in 16-bit models), 1/rms
        if stream_grad:
            acc.add(f"{name} input", H, 4)
            acc.add(f"{name} 1/rms", 1, 4)
        if tr.full:
            acc.add(f"{name} normalised", H, b.resid)
    elif stream_grad or tr.full:  # LayerNorm keeps its input and the per-token mean and rstd
        acc.add(f"{name} input", H, b.resid)
        acc.add(f"{name} mean, rstd", 2, 4)


def layer_activations(shape: ModelShape, tr: Training, b: Bytes, stream_grad: bool = True) -> _Acc:
    """Bytes per token that one decoder layer keeps for the backward (see the module docstring)."""
    acc = _Acc()
    H, K, I, nh = shape.hidden, shape.kv_width, shape.intermediate, shape.heads
    c, r = b.compute, b.resid
    fam = shape.family
    # Attention half.
    _norm(acc, "attn norm", shape, tr, b, stream_grad)
    qkv = ["qkv"] if fam in ("gpt2", "gpt_neox") else ["q", "k", "v"]
    _linear_input(acc, "attn input", H, r, qkv, shape, tr, b)
    for m in qkv:
        acc.add(f"lora {m} intermediate", tr.lora_width(shape, m), c)
    if fam == "gpt2" and tr.quantized and b.mixed:  # float32 qkv: autocast casts q, k, v (copies)
        acc.add("sdpa q, k, v (16-bit casts)", 3 * H, c)
    elif fam == "gpt2":
        acc.add("sdpa q, k/v copies + fused qkv", 5 * H, c)
    elif fam == "gpt_neox":
        acc.add("sdpa q, k (rotary) + fused qkv", 5 * H, c)
    else:
        acc.add("sdpa q, k, v", H + 2 * K, c)
    acc.add("sdpa output", H, c)
    acc.add("sdpa log-sum-exp", nh, 4)
    # o's input is the SDPA output kept above (its (B, T, nh, hd) layout makes the reshape a view).
    _linear_input(acc, "o input", 0 if not tr.lora_on(shape, "o") or not b.mixed else H, c, ["o"], shape, tr, b)
    acc.add("lora o intermediate", tr.lora_width(shape, "o"), c)
    # MLP half (GPT-NeoX's parallel residual normalises the same input: its input is counted once).
    if fam == "gpt_neox":
        if tr.full:
            acc.add("mlp norm mean, rstd", 2, 4)
    else:
        _norm(acc, "mlp norm", shape, tr, b, True)
    ups = ["gate", "up"] if shape.mlp == "swiglu" else ["up"]
    _linear_input(acc, "mlp input", H, r, ups, shape, tr, b)
    for m in ups:
        acc.add(f"lora {m} intermediate", tr.lora_width(shape, m), c)
    kept = {"swiglu": 3, "gelu_tanh": 4, "relu": 1, "gelu": 1}[shape.mlp]
    mlp_bytes = 4 if tr.quantized and b.mixed else c
    acc.add(f"mlp activation ({shape.mlp})", kept * I, mlp_bytes)
    # The down projection's input: ReLU's kept output is the same tensor; the others make a new one.
    _linear_input(acc, "down input", I if shape.mlp != "relu" else 0, mlp_bytes, ["down"], shape, tr, b)
    acc.add("lora down intermediate", tr.lora_width(shape, "down"), c)
    return acc


def _lora_constants(shape: ModelShape, tr: Training, b: Bytes) -> int:
    """Per layer, independent of tokens: a LoRA on several roles of GPT-NeoX's fused projection (heads
    interleaved) builds its stacked factors and their scatter indices each forward; GPT-2's roles are
    contiguous blocks, updated one by one; under autocast every LoRA factor's 16-bit copy is kept."""
    total = 0
    for m, (d_in, d_out) in shape.linears().items():
        roles = [r for r in tr.module_roles(shape, m) if r in tr.lora]
        if not roles:
            continue
        r_sum = tr.rank * len(roles)
        if m == "qkv" and len(roles) > 1 and shape.family == "gpt_neox":
            width = {"q": shape.hidden, "k": shape.kv_width, "v": shape.kv_width}
            total += 2 * 8 * sum(width[r] * tr.rank for r in roles) + (r_sum * d_in + d_out * r_sum) * b.compute
        elif b.mixed:
            out = d_out // 3 if m == "qkv" else d_out
            total += (r_sum * d_in + out * r_sum) * b.compute
    return total


def _weight_copies(shape: ModelShape, method: str, b: Bytes) -> int:
    """Mixed precision keeps each linear layer's 16-bit weight copy for the input gradient."""
    if not b.mixed:
        return 0
    p = shape.parameters()
    quantized = p["block_linear_weights"] if method == "qlora" else 0  # bitsandbytes dequantizes per call
    return (p["matmul"] - quantized) * b.compute


def activation_bytes(shape: ModelShape, tr: Training, b: Bytes, method: str, batch: int, seq: int,
                     checkpointing: bool) -> dict[str, Any]:
    """Kept activations of one micro-batch, the loss's logits peak, and the per-layer breakdown."""
    tokens = batch * seq
    per_layer = layer_activations(shape, tr, b)
    first = layer_activations(shape, tr, b, stream_grad=tr.full)  # frozen embeddings: layer 0's input needs none
    head = _Acc()
    H, V = shape.hidden, shape.vocab
    _norm(head, "final norm", shape, tr, b, True)
    if tr.full:
        head.add("lm head input (16-bit cast)" if b.mixed else "lm head input", H, b.compute if b.mixed else b.resid)
    rope = 2 * seq * shape.head_dim * 4 if shape.family in ("llama", "gpt_neox") else 0
    ids = (tokens * 8 if tr.full else 0) + (seq * 8 if shape.learned_positions and tr.full else 0)
    if checkpointing:
        layers = shape.layers * tokens * H * b.resid + tokens * per_layer.total  # inputs + one recomputed layer
    else:
        layers = tokens * (first.total + (shape.layers - 1) * per_layer.total)
    constants = shape.layers * _lora_constants(shape, tr, b)
    if not tr.full:
        # Layer 0's attention input needs no gradient under PEFT: its matrix products keep no 16-bit
        # weight copy for an input gradient, and its LoRAs keep no (16-bit or stacked) copy of A.
        for m, (d_in, d_out) in shape.linears().items():
            if m in ("q", "k", "v", "qkv"):
                stacked = m == "qkv" and tr.lora_width(shape, m) > tr.rank
                if b.mixed and not tr.quantized:
                    constants -= d_in * d_out * b.compute
                if b.mixed or stacked:
                    constants -= tr.lora_width(shape, m) * d_in * b.compute
    kept = layers + tokens * head.total + rope + ids + constants + _weight_copies(shape, method, b)
    shifted = batch * (seq - 1) * V
    logit_bytes = b.compute
    if logit_bytes == 4:  # logits, their shifted copy, log-probabilities
        logits_fwd = tokens * V * 4 + 2 * shifted * 4
    else:  # 16-bit logits; the 16-bit shifted copy is freed once .float() made the float32 one
        logits_fwd = tokens * V * logit_bytes + 2 * shifted * 4
    logits_bwd = 3 * shifted * 4  # log-probabilities, their gradient, the logits' gradient (float32)
    targets = batch * (seq - 1) * 8
    return {
        "kept": kept, "layers": layers, "head": tokens * head.total, "weight_copies": _weight_copies(shape, method, b),
        "loss_peak": max(logits_fwd, logits_bwd) + targets,
        "per_layer_per_token": per_layer.terms, "per_layer_per_token_total": per_layer.total,
        "head_per_token": head.terms,
    }


# ---- optimizer -------------------------------------------------------------------------------------------
def optimizer_bytes(sizes: list[int], optimizer: str, param_bytes: int) -> int:
    """Optimizer states of tensors of ``sizes`` elements."""
    if optimizer == "sgd":
        return 0
    if optimizer in ("adamw8bit", "paged_adamw8bit"):
        # bitsandbytes: uint8 codes + one float32 maximum per 256 values, for each of the two moments;
        # tensors under 4096 elements keep float32 moments (min_8bit_size).
        return sum(2 * n + 2 * 4 * math.ceil(n / 256) if n >= 4096 else 8 * n for n in sizes)
    if optimizer == "paged_adamw":
        return 8 * sum(sizes)
    return 2 * param_bytes * sum(sizes)  # torch AdamW keeps exp_avg and exp_avg_sq in the parameter dtype


def optimizer_temporaries(sizes: list[int], optimizer: str, param_bytes: int, device: str) -> int:
    if not sizes or optimizer == "sgd":
        return 0
    if optimizer == "adamw":
        return param_bytes * sum(sizes) if device == "cuda" else 2 * param_bytes * max(sizes)
    # bitsandbytes: fused kernels on CUDA; its CPU path dequantizes both moments to float32 and makes a
    # scaled gradient and the denominator, one tensor at a time.
    return 0 if device == "cuda" else 4 * 4 * max(sizes)


# ---- FLOPs ---------------------------------------------------------------------------------------------------
def flops(shape: ModelShape, tokens: int, seq: int, lora_params: int, full: bool,
          checkpointing: bool) -> dict[str, float]:
    """FLOPs per token and per step (multiply-add = 2 FLOPs; see the module docstring)."""
    p = shape.parameters()
    n_mm = p["matmul"] + lora_params
    attn_fwd = 4 * shape.layers * seq * shape.hidden  # per token
    fwd = 2 * n_mm + attn_fwd
    if full:
        bwd = 2 * fwd
    else:  # input gradients everywhere (attention's twice its forward), weight gradients of the factors only
        bwd = fwd + attn_fwd + 2 * lora_params
    train = fwd + bwd + (fwd if checkpointing else 0)
    return {"forward_per_token": fwd, "training_per_token": train, "forward_per_step": fwd * tokens,
            "training_per_step": train * tokens, "six_n_per_step": 6 * p["total"] * tokens,
            "attention_share": attn_fwd / fwd}


# ---- the plan ------------------------------------------------------------------------------------------------
def plan(shape: ModelShape, cfg: PlanConfig) -> dict[str, Any]:
    """Memory and FLOPs of ``cfg`` on ``shape`` (see the module docstring)."""
    cfg.validate()
    b = Bytes.of(cfg.precision)
    seq = cfg.seq or min(2048, shape.max_positions)
    if seq < 2:
        raise ConfigError(f"PlanConfig.seq = {seq} is out of range: must be >= 2")
    p = shape.parameters()
    total = p["total"]
    lora = cfg.method in ("lora", "qlora")
    tr = Training(full=not lora, lora=cfg.targets if lora else (), rank=cfg.rank, quantized=cfg.method == "qlora")
    lora_sizes = _lora_parameters(shape, tr.lora, cfg.rank) if lora else []
    n_lora = sum(lora_sizes)
    if lora:
        trainable_sizes = lora_sizes
    else:
        layer = shape.linears()
        per_layer_sizes = [a * c for a, c in layer.values()]
        trainable_sizes = per_layer_sizes * shape.layers + [p["embedding"]] + ([p["lm_head"]] if p["lm_head"] else [])
        trainable_sizes += [total - sum(trainable_sizes)]  # biases, norms, positions: small tensors, one entry
    trainable = sum(trainable_sizes)
    quantized = p["block_linear_weights"] if cfg.method == "qlora" else 0
    weights = (total - quantized) * b.param + quantized * NF4_BITS / 8 + n_lora * b.param
    grads = trainable * b.param
    opt = optimizer_bytes(trainable_sizes, cfg.optimizer, b.param)
    temps = optimizer_temporaries(trainable_sizes, cfg.optimizer, b.param, cfg.device)

    def per_device(n: int, strategy: str) -> dict[str, Any]:
        micro = math.ceil(cfg.batch / n / cfg.grad_accum)
        act = activation_bytes(shape, tr, b, cfg.method, micro, seq, cfg.gradient_checkpointing)
        dequant = max(a * c for a, c in shape.linears().values()) * b.compute * 2 if cfg.method == "qlora" else 0
        phase_a = act["kept"] + act["loss_peak"] + dequant
        if strategy == "fsdp" and n > 1:
            block = p["per_layer"] * b.param
            root = (total - p["blocks"]) * b.param + n_lora * b.param
            w, g, o, t = weights / n, grads / n, opt / n, temps / n
            extra = root + 2 * block + (block if not lora else 0)  # gathered root + 2 blocks, one block's grads
        else:
            w, g, o, t = weights, grads, opt, temps
            extra = grads if (strategy == "ddp" and n > 1) else 0  # DDP's gradient buckets (a copy)
        phase_b = g + o + t
        steady = w + o + extra + max(phase_a, g + t)
        return {"devices": n, "strategy": strategy, "micro_batch": micro, "weights": w, "gradients": g,
                "optimizer": o, "activations": act["kept"], "loss_peak": act["loss_peak"],
                "communication_buffers": extra, "optimizer_temporaries": t, "peak": steady,
                "first_step_above_baseline": max(phase_a, phase_b),
                "phase_a": phase_a, "phase_b": phase_b, "activation_detail": act}

    single = per_device(1, "single")
    counts = [n for n in range(1, cfg.devices + 1) if cfg.devices <= 8 or n in (1, cfg.devices) or n & (n - 1) == 0]
    table = [single] + [per_device(n, s) for n in counts if n > 1 for s in ("ddp", "fsdp")]
    kv = 2 * shape.layers * shape.kv_width * seq * cfg.batch * b.compute
    inf_weights = (total - quantized) * b.compute + quantized * NF4_BITS / 8
    inf_transient = cfg.batch * seq * max(3 * shape.intermediate, 4 * shape.hidden) * b.compute + \
        cfg.batch * shape.vocab * 4
    f = flops(shape, cfg.batch * seq, seq, n_lora, not lora, cfg.gradient_checkpointing)
    detail = single.pop("activation_detail")
    for row in table[1:]:
        row.pop("activation_detail")
    return {
        "model": shape.describe(),
        "config": {**cfg.to_dict(), "seq": seq},
        "parameters": {"total": total, "trainable": trainable, "trainable_pct": 100 * trainable / total,
                       "quantized_nf4": quantized, "lora": n_lora},
        "memory": {k: single[k] for k in ("weights", "gradients", "optimizer", "activations", "loss_peak",
                                          "optimizer_temporaries", "peak", "first_step_above_baseline")},
        "activations": {k: v for k, v in detail.items() if k not in ("per_layer_per_token", "head_per_token")},
        "activation_terms_per_layer_per_token": detail["per_layer_per_token"],
        "devices": table,
        "inference": {"weights": inf_weights, "kv_cache": kv, "transient": inf_transient,
                      "peak": inf_weights + kv + inf_transient},
        "flops": f,
        "approximate": shape.family in ("opt", "gpt_neox"),
        "validated_quantity": VALIDATED,
    }


def gib(x: float) -> str:
    return f"{x / GIB:,.2f} GiB" if x >= 0.1 * GIB else f"{x / 1024**2:,.1f} MiB"


def render(result: dict[str, Any]) -> str:
    """The plan as a short human-readable report."""
    m, c, p, mem = result["model"], result["config"], result["parameters"], result["memory"]
    lines = [
        f"{m['name']} ({m['family']}, {p['total'] / 1e6:,.1f}M parameters), {c['method']}, batch {c['batch']} x "
        f"{c['seq']} tokens, {c['precision']}, {c['optimizer']}"
        + (", gradient checkpointing" if c["gradient_checkpointing"] else ""),
        f"  trainable      {p['trainable']:,} ({p['trainable_pct']:.3f}%)",
        f"  weights        {gib(mem['weights'])}",
        f"  gradients      {gib(mem['gradients'])}",
        f"  optimizer      {gib(mem['optimizer'])}",
        f"  activations    {gib(mem['activations'])} kept + {gib(mem['loss_peak'])} at the loss",
        f"  peak           {gib(mem['peak'])} (one device)",
        f"  inference      {gib(result['inference']['weights'])} weights + {gib(result['inference']['kv_cache'])} "
        f"KV cache = {gib(result['inference']['peak'])} peak",
        f"  FLOPs/step     {result['flops']['training_per_step']:.3e} training "
        f"(6N rule {result['flops']['six_n_per_step']:.3e}), {result['flops']['forward_per_step']:.3e} forward",
    ]
    if len(result["devices"]) > 1:
        lines.append("  devices  strategy  micro-batch  per-device peak")
        for row in result["devices"][1:]:
            lines.append(f"  {row['devices']:>7}  {row['strategy']:<8}  {row['micro_batch']:>11}  {gib(row['peak'])}")
    if result["approximate"]:
        lines.append("  (activation terms of this family are approximate)")
    return "\n".join(lines)



# ---- validation: measuring what the planner predicts ---------------------------------------------------
def measure_step(spec: dict[str, Any]) -> dict[str, Any]:
    """Build the model ``spec["config"]`` describes (random init), run one optimizer step of the shared
    Trainer and return its peak memory above the memory held before it (:data:`VALIDATED`).

    Run it in a fresh process (``python -m efficientgpt.plan --measure JSON``): on CPU the peak is
    the resident set size sampled by :class:`efficientgpt.bench.measure.PeakMemory`, and glibc should
    return freed blocks to the system (``MALLOC_MMAP_THRESHOLD_=65536``) so that the resident size
    follows the live tensors. The baseline is taken after building the model and the optimizer and
    after one small warm-up forward and backward (thread pools and kernels initialised; gradients
    then dropped), so it holds the weights and nothing that the step itself allocates.
    """
    import gc

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from efficientgpt import registry
    from efficientgpt.bench.measure import PeakMemory
    from efficientgpt.peft import core
    from efficientgpt.train.config import TrainConfig
    from efficientgpt.train.trainer import Trainer

    torch.set_num_threads(int(spec.get("threads", 1)))
    device = torch.device(spec.get("device", "cpu"))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    config = AutoConfig.for_model(**spec["config"])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(device)
    method = spec.get("method", "full")
    if method == "qlora":
        from efficientgpt.train.quantize import quantize_model

        quantize_model(model, compute_dtype=spec.get("compute_dtype", "auto"))
    lora_cfg = registry.get("lora").config_cls(rank=spec.get("rank", 8), targets=spec.get("targets", ["q", "v"]))
    core.apply(model, "lora" if method in ("lora", "qlora") else "full",
               lora_cfg if method != "full" else registry.get("full").config_cls(keep_base=False))
    batch, seq = spec["batch"], spec["seq"]
    vocab = config.vocab_size
    gen = torch.Generator().manual_seed(1)
    data = torch.randint(0, vocab, (batch, seq), generator=gen)
    cfg = TrainConfig(steps=1, batch_size=batch, seq_len=seq, warmup_steps=0, optimizer=spec.get("optimizer", "adamw"),
                      bf16=spec.get("precision") == "bf16-mixed", progress=False, log_every=1,
                      gradient_checkpointing=bool(spec.get("gradient_checkpointing")))
    trainer = Trainer(model, cfg, lambda step: {"input_ids": data}, fingerprint={})
    model.train()
    with trainer._autocast():  # warm-up: kernels and thread pools, not the step's memory
        trainer.loss_fn(model, {"input_ids": data[:1, :8].to(device)})[0].backward()
    trainer.optimizer.zero_grad(set_to_none=True)
    gc.collect()
    with PeakMemory(device) as m:
        trainer.train()
    out = {"peak_bytes": m.peak_bytes, "base_bytes": m.base_bytes, "device": str(device)}
    if spec.get("time_steps"):
        from efficientgpt.bench.measure import time_steps

        out["step_time"] = time_steps(trainer.train, int(spec["time_steps"]), warmup=1, device=device)
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
    return out


def _main(argv: list[str] | None = None) -> int:
    import json
    import sys

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] != "--measure":
        print("usage: python -m efficientgpt.plan --measure JSON (use 'efficientgpt plan' to plan)", file=sys.stderr)
        return 2
    print(json.dumps(measure_step(json.loads(argv[1]))))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
