"""Efficient attention: backend selection, MHA → GQA/MQA conversion, and bounded KV caches.

Three independent tools that make attention cheaper in time or memory:

**Attention backends.** :func:`set_attention_backend` switches a loaded model between the attention
kernels that transformers dispatches through its ``attn_implementation`` setting: ``eager`` (the
explicit ``softmax(QKᵀ/√d)V`` in PyTorch ops, materialising the ``T x T`` score matrix), ``sdpa``
(``torch.nn.functional.scaled_dot_product_attention``, which picks a fused kernel: FlashAttention-style
or memory-efficient on CUDA, a fused C++ kernel on CPU), ``flash_attention_2/3/4`` (Dao et al.,
"FlashAttention", NeurIPS 2022; Dao, "FlashAttention-2", ICLR 2024; only where the ``flash_attn``
package is installed and the model is on a CUDA device) and ``flex_attention`` (CUDA only here: on
CPU it has no backward). All compute the same function; :func:`available_backends` says which the
model can use and why not the others.

**MHA → GQA / MQA** (method ``gqa``). Ainslie et al., "GQA: Training Generalized Multi-Query
Transformer Models from Multi-Head Checkpoints" (EMNLP 2023). Grouped-query attention (§2.2) splits
the ``H`` query heads into ``G`` groups that share one key head and one value head (``G = 1`` is
multi-query attention, Shazeer 2019; ``G = H`` is multi-head attention). §2.1 converts a multi-head
checkpoint by *mean-pooling* the key and value projection matrices of the heads in each group
(Figure 1), then *uptrains* the converted model for a fraction ``α`` of the original pretraining
steps (the paper uses α = 0.05) on the pretraining recipe. Here, for head ``h`` with key projection
``W_k^{(h)}`` (``head_dim x d`` rows of ``k_proj``)::

    W_k^{(g)} ← (G / H) Σ_{h ∈ group g} W_k^{(h)},    group g = heads g·H/G … (g+1)·H/G - 1

and likewise ``W_v`` and the k/v biases (Qwen2). Contiguous groups match how transformers maps query
heads onto key/value heads (``repeat_kv``: query head ``h`` reads kv head ``h // (H/G)``). A model that
is already grouped (``K`` kv heads, Llama 2/3, Qwen2) is converted to ``G`` groups by the same mean over
its *per-query-head* keys (each old kv head counted once per query head it serves); when ``G`` divides
``K`` this is the plain mean of the old kv heads in each new group. ``G`` must divide ``H`` and be at
most ``K``. The rewrite is shape-only: ``k_proj``/``v_proj`` become smaller ``nn.Linear`` layers and
the config's ``num_key_value_heads`` is set to ``G``, so the result saves with ``save_pretrained`` and
reloads with plain ``AutoModelForCausalLM``. Optional uptraining (``uptrain_steps`` > 0) runs the
shared :class:`~efficientgpt.train.trainer.Trainer` (AdamW, warmup then cosine) on windows of
``uptrain_data`` (embedded prose by default) for that many steps, updating all parameters as §2.1 does.

Families: Llama, Mistral, Qwen2 and Qwen3 (their attention takes ``num_key_value_heads``). GPT-2, OPT
and GPT-NeoX are refused: transformers' attention for these families has no key/value head count, so a
grouped model could not be saved as, and reloaded into, a standard model class; and re-expressing them
as Llama is not exact (LayerNorm vs RMSNorm, GELU/ReLU MLPs vs SwiGLU, learned or partial-rotary
positions vs full RoPE, fused ``c_attn``/``query_key_value``), so it would be a different network.

**KV-cache policies.** :class:`SinkCache` follows Xiao et al., "Efficient Streaming Language Models
with Attention Sinks" (ICLR 2024), §3.2: the rolling KV cache keeps the first ``sink`` tokens (the
"attention sinks"; the paper uses 4) plus the ``window`` most recent tokens and evicts the middle, so
memory stays at ``sink + window`` tokens per layer however long generation runs. :class:`SlidingWindowCache`
is the same with no sinks (the paper's "window attention" baseline, which degrades once the first
tokens are evicted). Positions (§3.2, "Positional Encoding"): StreamingLLM assigns positions *within the
cache*, so the distances a query sees never exceed the cache size. For RoPE models both caches do this
by re-rotating cached keys: once ``e`` tokens have been evicted, the sink keys (cached at their original
positions ``0 … sink-1``) are rotated by ``+e`` before attention, which places them directly before the
window; the window keys already sit at consecutive positions ending just before the query. Every
query-key distance then equals the distance of the two slots in the cache, as in the paper. The sink
keys are re-rotated from their stored originals on each step (no accumulated rounding).

:func:`kv_cache_bytes` is the closed form ``2 · layers · kv_heads · head_dim · bytes · tokens``;
:func:`cache_nbytes` measures a cache's stored tensors.

Departures from the papers and the official code:

* GQA uptraining uses this project's Trainer (AdamW, cosine schedule) on the given data for a fixed
  number of steps, not the paper's T5 pretraining recipe (Adafactor, C4) for α of the original steps.
* GQA conversion of an already-grouped model (``K`` < ``H``) is an extension: the paper converts
  multi-head checkpoints only.
* The official StreamingLLM code (mit-han-lab/streaming-llm) caches keys *before* RoPE and rotates all
  cached keys with positions ``0 … L-1`` at every step, the query at ``L``. Here keys are cached after
  RoPE as transformers computes them, the query keeps the absolute position the model gives it
  (``generate`` passes absolute ``position_ids``), and only the sink keys are re-rotated. Attention
  scores under RoPE depend only on query-key distances, which are the paper's, so the result is the
  same up to float rounding; in fp32 the rotation angle of a large absolute position carries the same
  rounding as in the dense model at that position.
* Models with learned absolute positions (GPT-2, OPT) cannot re-assign positions (the position is
  added to the input, not applied to keys): their caches keep the original positions
  (``rolling=False``), which bounds memory but not the position table, so generation stays within
  ``max_position_embeddings``. RoPE variants whose frequencies change with length (``dynamic``,
  ``longrope``) are refused for rolling positions.
* A prefill longer than ``sink + window`` attends to the whole prompt in one pass and is then evicted
  down to ``sink + window`` (the official code likewise evicts only between inputs). Batches must not
  be left-padded (the eviction does not track per-row padding).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from efficientgpt import registry
from efficientgpt.compress.report import CompressionResult
from efficientgpt.config import ConfigBase, field
from efficientgpt.errors import UserError, closest
from efficientgpt.models import arch

# ---- attention backends -------------------------------------------------------------------------

#: Backends transformers can dispatch a model's attention to (``attn_implementation`` values).
BACKENDS = ("eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3", "flash_attention_4")
#: Short names: ``flash`` is the first installed FlashAttention version, ``flex`` is ``flex_attention``.
ALIASES = {"flex": "flex_attention"}
_FLASH = ("flash_attention_2", "flash_attention_3", "flash_attention_4")


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _flash_installed(name: str) -> bool:
    import transformers.utils as tu

    check = getattr(tu, f"is_flash_attn_{name[-1]}_available", None)
    try:
        return bool(check and check())
    except Exception:  # an installed but broken flash_attn build counts as absent
        return False


def available_backends(model: nn.Module) -> dict[str, str | None]:
    """Every backend in :data:`BACKENDS` mapped to ``None`` if ``model`` can use it now, else the reason."""
    cls = type(model).__name__
    on_cuda = _model_device(model).type == "cuda"
    can_set = getattr(model, "_can_set_attn_implementation", lambda: True)()
    out: dict[str, str | None] = {}
    for name in BACKENDS:
        reason = None
        if name == "eager":
            pass
        elif not can_set:
            reason = f"{cls} does not route attention through transformers' AttentionInterface"
        elif name == "sdpa":
            if not getattr(model, "_supports_sdpa", False):
                reason = f"{cls} does not support sdpa"
        elif name == "flex_attention":
            if not getattr(model, "_supports_flex_attn", False):
                reason = f"{cls} does not support flex attention"
            elif not on_cuda:
                reason = "needs a CUDA device (on CPU flex attention has no backward)"
        else:  # flash_attention_N
            if not getattr(model, "_supports_flash_attn", False):
                reason = f"{cls} does not support FlashAttention"
            elif not _flash_installed(name):
                reason = f"the FlashAttention {name[-1]} package is not installed"
            elif not on_cuda:
                reason = "needs the model on a CUDA device"
        out[name] = reason
    return out


def attention_backend(model: nn.Module) -> str:
    """The backend ``model`` currently dispatches to."""
    return model.config._attn_implementation


def set_attention_backend(model: nn.Module, name: str) -> str:
    """Switch ``model``'s attention to backend ``name`` (see :data:`BACKENDS`; ``flash`` picks the first
    installed FlashAttention version); returns the backend now in use. An unknown or unavailable backend
    is refused with the list of the available ones (and why the others are not)."""
    avail = available_backends(model)
    usable = [b for b, why in avail.items() if why is None]
    if name == "flash":
        name = next((b for b in _FLASH if avail[b] is None), next((b for b in _FLASH if _flash_installed(b)),
                                                                   "flash_attention_2"))
    name = ALIASES.get(name, name)
    if name not in avail:
        raise UserError(f"unknown attention backend {name!r}{closest(name, list(BACKENDS))}; available for this "
                        f"model: {', '.join(usable)} (known: {', '.join(BACKENDS)}, aliases: flash, flex)")
    if avail[name] is not None:
        raise UserError(f"attention backend {name!r} is not available: {avail[name]}; available for this model: "
                        + ", ".join(usable))
    model.set_attn_implementation(name)
    if attention_backend(model) != name:  # transformers only warns when a class cannot switch
        raise UserError(f"{type(model).__name__} did not switch to {name!r} (still {attention_backend(model)!r})")
    return name


# ---- KV-cache accounting ------------------------------------------------------------------------


def _dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def kv_cache_bytes(model: nn.Module, tokens: int = 1, dtype: torch.dtype | None = None, batch: int = 1) -> int:
    """Bytes of a full KV cache holding ``tokens`` tokens (per sequence, ``batch`` sequences):
    ``2 · layers · kv_heads · head_dim · bytes · tokens · batch`` (keys and values, every layer).
    ``dtype`` defaults to the model's parameter dtype."""
    _, kv_heads, head_dim = arch.head_dims(model)
    layers = model.config.get_text_config().num_hidden_layers
    dtype = dtype or next(model.parameters()).dtype
    return 2 * layers * kv_heads * head_dim * _dtype_bytes(dtype) * tokens * batch


def cache_nbytes(cache: Cache) -> int:
    """Bytes of the key and value tensors a transformers ``Cache`` holds now (measured, not computed)."""
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


# ---- MHA -> GQA / MQA ---------------------------------------------------------------------------

#: Model types whose attention takes ``num_key_value_heads`` (all use the Llama role table).
GQA_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclasses.dataclass
class GQAConfig(ConfigBase):
    """Mean-pool key/value heads into ``kv_heads`` groups (GQA §2.1), optionally uptrain."""

    kv_heads: int = field(1, "key/value heads G after conversion (1 = multi-query attention); must divide the "
                             "number of attention heads and be at most the current number of kv heads", minimum=1)
    uptrain_steps: int = field(0, "optimizer steps of uptraining after the conversion (0: none)", minimum=0)
    uptrain_data: str = field("embedded:prose", "data spec whose train split the uptraining reads")
    uptrain_lr: float = field(3e-4, "peak learning rate of the uptraining (AdamW, warmup then cosine)",
                              minimum=0.0, exclusive_minimum=True)
    uptrain_batch_size: int = field(8, "sequences per uptraining step", minimum=1)
    uptrain_seq_len: int | None = field(None, "tokens per uptraining sequence (default: min(128, context))",
                                        minimum=2)
    uptrain_seed: int = field(0, "seed of the uptraining data order")


def mean_pool_heads(t: torch.Tensor, heads: int, kv_heads: int, groups: int) -> torch.Tensor:
    """Pool a k/v projection's rows (or bias) from ``kv_heads`` to ``groups`` heads.

    ``t`` is ``(kv_heads · head_dim, *rest)``; the result ``(groups · head_dim, *rest)``. Each kv head is
    first expanded to the query heads it serves (as ``repeat_kv`` does), then the per-query-head
    projections are averaged over the ``heads / groups`` heads of each contiguous group (GQA §2.1).
    """
    rest = t.shape[1:]
    head_dim = t.shape[0] // kv_heads
    per_kv = t.reshape(kv_heads, head_dim, *rest)  # (K, hd, *rest)
    per_q = per_kv.repeat_interleave(heads // kv_heads, dim=0)  # (H, hd, *rest)
    grouped = per_q.reshape(groups, heads // groups, head_dim, *rest)  # (G, H/G, hd, *rest)
    return grouped.mean(dim=1).reshape(groups * head_dim, *rest)  # (G·hd, *rest)


def _check_gqa(model: nn.Module, config: GQAConfig) -> tuple[int, int, int]:
    config.validate()
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in GQA_MODEL_TYPES:
        raise UserError(
            f"gqa supports model types {', '.join(GQA_MODEL_TYPES)}, not {model_type!r}: transformers' GPT-2, OPT "
            "and GPT-NeoX attention has no key/value head count, so a grouped model could not be saved and "
            "reloaded as a standard model, and re-expressing it as Llama would change its norms, MLP and "
            "position encoding")
    heads, kv, _ = arch.head_dims(model)
    g = config.kv_heads
    if heads % g or g > kv:
        allowed = [d for d in range(1, kv + 1) if heads % d == 0]
        raise UserError(f"GQAConfig.kv_heads = {g} is not allowed for this model ({heads} attention heads, {kv} "
                        f"key/value heads): it must divide {heads} and be at most {kv}; allowed: "
                        + ", ".join(map(str, allowed)))
    for i in range(arch.num_layers(model)):
        for role in ("k", "v"):
            m = arch.block_module(model, i, role)
            if type(m) is not nn.Linear:
                raise UserError(f"gqa needs plain nn.Linear key/value projections; layer {i} {role}_proj is a "
                                f"{type(m).__name__} (convert before other compression)")
    return heads, kv, g


def _pooled_linear(old: nn.Linear, heads: int, kv: int, g: int) -> tuple[nn.Linear, float]:
    """The pooled projection and the relative Frobenius distance of the old per-query-head weights
    from their group means (0 when the heads of every group were already equal)."""
    w = old.weight.detach().double()  # (K·hd, d)
    pooled = mean_pool_heads(w, heads, kv, g)  # (G·hd, d)
    hd = w.shape[0] // kv
    per_q = w.reshape(kv, hd, -1).repeat_interleave(heads // kv, 0)  # (H, hd, d)
    back = pooled.reshape(g, 1, hd, -1).expand(g, heads // g, hd, w.shape[1]).reshape(heads, hd, -1)
    err = float(torch.linalg.norm(per_q - back) / torch.linalg.norm(per_q).clamp_min(1e-300))
    new = nn.Linear(old.in_features, g * hd, bias=old.bias is not None, device=old.weight.device,
                    dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(pooled)
        if old.bias is not None:
            new.bias.copy_(mean_pool_heads(old.bias.detach().double(), heads, kv, g))
    new.weight.requires_grad_(old.weight.requires_grad)
    if new.bias is not None:
        new.bias.requires_grad_(old.bias.requires_grad)
    return new, err


def convert_to_gqa(model: nn.Module, kv_heads: int) -> dict[str, dict[str, Any]]:
    """Mean-pool every layer's key/value heads into ``kv_heads`` groups and rewrite the config.

    Returns per-layer details. Checks everything before any weight changes (see :func:`apply`).
    """
    heads, kv, g = _check_gqa(model, GQAConfig(kv_heads=kv_heads))
    fam = arch.family_of(model)
    per_layer: dict[str, dict[str, Any]] = {}
    for i, block in enumerate(arch.blocks(model)):
        info: dict[str, Any] = {"kv_heads_before": kv, "kv_heads_after": g}
        for role in ("k", "v"):
            path = fam.block_roles[role]
            new, err = _pooled_linear(block.get_submodule(path), heads, kv, g)
            parent, _, child = path.rpartition(".")
            setattr(block.get_submodule(parent), child, new)
            info[f"{role}_pool_error"] = err
        attn = arch.block_module(model, i, "attn")
        # The attention modules cache the group size at construction; repeat_kv and sdpa read it.
        if hasattr(attn, "num_key_value_groups"):
            attn.num_key_value_groups = heads // g
        if hasattr(attn, "num_key_value_heads"):
            attn.num_key_value_heads = g
        per_layer[f"{fam.blocks}.{i}"] = info
    model.config.num_key_value_heads = g
    return per_layer


def _model_tokenizer(model: nn.Module):
    from transformers import AutoTokenizer

    path = getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "")
    if not path or not os.path.isdir(path):
        raise UserError("gqa uptraining needs the model's tokenizer, but the model was not loaded from a local "
                        f"directory (name_or_path {path!r}); pass apply(..., tokenizer=TOKENIZER)")
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise UserError(f"gqa uptraining: no loadable tokenizer at {path}: {err}") from None


def _uptrain(model: nn.Module, config: GQAConfig, source, progress: bool) -> dict[str, Any]:
    from efficientgpt.eval.perplexity import default_seq_len
    from efficientgpt.train.config import TrainConfig
    from efficientgpt.train.trainer import Trainer

    steps = config.uptrain_steps
    cfg = TrainConfig(steps=steps, batch_size=config.uptrain_batch_size, lr=config.uptrain_lr,
                      seq_len=config.uptrain_seq_len or min(128, default_seq_len(model)),
                      warmup_steps=min(10, steps // 10), seed=config.uptrain_seed, progress=progress,
                      log_every=max(1, steps // 20))
    # §2.1 uptrains the whole converted model, not only the pooled projections.
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(True)
    try:
        result = Trainer(model, cfg, source.train_batches(cfg)).train()
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags.get(n, p.requires_grad))
    model.eval()
    return {"steps": steps, "seq_len": cfg.seq_len, "batch_size": cfg.batch_size, "lr": cfg.lr,
            "tokens": result.tokens, "final_loss": result.final_loss, "curve": result.curve}


def apply(model: nn.Module, config: GQAConfig, windows: torch.Tensor | None = None, progress: bool = False,
          tokenizer=None) -> CompressionResult:
    """Convert ``model``'s attention to ``config.kv_heads`` key/value heads, then uptrain if asked.

    Every check (model type, head counts, module types, and for uptraining the tokenizer and the data)
    runs before any weight changes. ``achieved`` reports the head counts, the KV-cache bytes per token
    before and after (model dtype) and the k/v parameters removed, all measured on the model.
    """
    heads, kv, g = _check_gqa(model, config)
    source = None
    if config.uptrain_steps:
        from efficientgpt.pipeline import TextSource

        tok = tokenizer if tokenizer is not None else _model_tokenizer(model)
        if len(tok) > model.get_input_embeddings().num_embeddings:
            raise UserError(f"gqa uptraining: the tokenizer has {len(tok)} tokens, more than the model's "
                            f"{model.get_input_embeddings().num_embeddings} embeddings")
        source = TextSource(config.uptrain_data, tok, eval_tokens=None)
    kv_params = _kv_parameters(model)
    bytes_before = kv_cache_bytes(model, 1)
    per_layer = convert_to_gqa(model, g)
    _, kv_after, head_dim = arch.head_dims(model)
    bytes_after = kv_cache_bytes(model, 1)
    achieved: dict[str, Any] = {
        "heads": heads,
        "kv_heads_before": kv,
        "kv_heads": kv_after,
        "group_size": heads // kv_after,
        "head_dim": head_dim,
        "kv_bytes_per_token_before": bytes_before,
        "kv_bytes_per_token_after": bytes_after,
        "kv_cache_ratio": bytes_after / bytes_before,
        "kv_parameters_before": kv_params,
        "kv_parameters_after": _kv_parameters(model),
        "k_pool_error_mean": sum(v["k_pool_error"] for v in per_layer.values()) / len(per_layer),
        "v_pool_error_mean": sum(v["v_pool_error"] for v in per_layer.values()) / len(per_layer),
        "uptrain_steps": config.uptrain_steps,
    }
    notes = [f"{heads} query heads share {kv_after} key/value head(s) (groups of {heads // kv_after}); "
             f"KV cache {bytes_before} -> {bytes_after} bytes per token ({next(model.parameters()).dtype})",
             "k_pool_error: relative distance of the original per-head key projections from their group "
             "means (0: the heads of each group were equal)"]
    if source is not None:
        up = _uptrain(model, config, source, progress)
        achieved["uptrain_final_loss"] = up["final_loss"]
        achieved["uptrain_tokens"] = up["tokens"]
        notes.append(f"uptrained {up['steps']} steps ({up['tokens']} tokens) on {config.uptrain_data} (train split); "
                     f"training loss of the last step {up['final_loss']:.4f}")
        per_layer["uptrain"] = up
    else:
        notes.append("no uptraining (uptrain_steps 0): GQA §2.1 recommends uptraining ~5% of the pretraining steps")
    return CompressionResult(method="gqa", achieved=achieved, per_layer=per_layer, notes=notes)


def _kv_parameters(model: nn.Module) -> int:
    return sum(p.numel() for t in arch.resolve(model, ["k", "v"]) for p in t.module.parameters())


# ---- bounded KV caches --------------------------------------------------------------------------

#: Model types using transformers' ``rotate_half`` RoPE (possibly partial, GPT-NeoX), which the caches
#: know how to re-rotate.
ROPE_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gpt_neox")
#: Model types with learned absolute positions (no rolling positions possible).
LEARNED_POSITION_MODEL_TYPES = ("gpt2", "opt")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rerotate(keys: torch.Tensor, shift: int, inv_freq: torch.Tensor) -> torch.Tensor:
    """Keys rotated by RoPE at position ``p`` → the same keys rotated at ``p + shift``.

    ``keys`` is ``(B, kv_heads, n, head_dim)``; the first ``2 · len(inv_freq)`` features are rotated
    (the rest pass through, as in GPT-NeoX's partial rotary). RoPE rotations compose additively, and a
    scaled rotation ``s·R(p)`` (YaRN's attention factor) stays ``s·R(p + shift)``.
    """
    rot = 2 * inv_freq.numel()
    angle = shift * inv_freq.to(device=keys.device, dtype=torch.float32)  # (rot/2,)
    emb = torch.cat((angle, angle))  # (rot,)
    k = keys[..., :rot].float()  # (B, kv, n, rot)
    out = k * emb.cos() + _rotate_half(k) * emb.sin()
    return torch.cat((out.to(keys.dtype), keys[..., rot:]), dim=-1)


def _rope_inv_freq(model: nn.Module) -> torch.Tensor:
    rotaries = [m for m in model.modules() if isinstance(getattr(m, "inv_freq", None), torch.Tensor)]
    if not rotaries:
        raise UserError(f"{model.config.model_type}: no rotary embedding (inv_freq) found; use rolling=False")
    kind = getattr(rotaries[0], "rope_type", "default")
    if kind in ("dynamic", "longrope"):
        raise UserError(f"rolling positions need fixed RoPE frequencies; rope_type {kind!r} changes them with the "
                        "sequence length (use rolling=False)")
    return rotaries[0].inv_freq.detach().clone()


class SinkCacheLayer(DynamicLayer):
    """One layer of a :class:`SinkCache`: the first ``sink`` tokens plus the ``window`` most recent.

    Stores at most ``sink + window`` keys and values ``(B, kv_heads, ≤ sink + window, head_dim)``.
    ``update`` returns the stored tokens followed by the new ones (attention of the new tokens sees the
    whole kept cache), then evicts down to ``sink + window``. With ``inv_freq`` (RoPE models) the sink
    keys returned for attention are rotated forward by the number of evicted tokens (module docstring).
    """

    is_croppable = False

    def __init__(self, sink: int, window: int, inv_freq: torch.Tensor | None = None):
        super().__init__()
        self.sink, self.window = sink, window
        self.inv_freq = inv_freq
        self.cumulative_length = 0

    def stored_length(self) -> int:
        return 0 if not self.is_initialized or self.keys.numel() == 0 else self.keys.shape[-2]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        stored = self.stored_length()
        evicted = self.cumulative_length - stored
        self.cumulative_length += key_states.shape[-2]
        keys = self.keys if stored else self.keys.new_empty((*key_states.shape[:2], 0, key_states.shape[-1]))
        values = self.values if stored else self.values.new_empty((*value_states.shape[:2], 0, value_states.shape[-1]))
        full_k = torch.cat([keys, key_states], dim=-2)  # (B, kv, stored + q, hd)
        full_v = torch.cat([values, value_states], dim=-2)
        attn_k = full_k
        n = min(self.sink, stored)
        if self.inv_freq is not None and evicted > 0 and n > 0:
            # The sink tokens are the stream's first tokens, cached at positions 0..n-1; moving them by the
            # eviction count puts them right before the window (positions within the cache, §3.2).
            attn_k = torch.cat([rerotate(full_k[:, :, :n], evicted, self.inv_freq), full_k[:, :, n:]], dim=-2)
        cap = self.sink + self.window
        if full_k.shape[-2] > cap:
            tail = full_k.shape[-2] - self.window
            self.keys = torch.cat([full_k[:, :, : self.sink], full_k[:, :, tail:]], dim=-2)
            self.values = torch.cat([full_v[:, :, : self.sink], full_v[:, :, tail:]], dim=-2)
        else:
            self.keys, self.values = full_k, full_v
        return attn_k, full_v

    def get_mask_sizes(self, query_length: int | torch.Tensor) -> tuple[int, int]:
        if isinstance(query_length, torch.Tensor):  # transformers < 5.2x passes cache_position (q,)
            query_length = query_length.shape[-1]
        # The kept tokens all precede the query; an offset of (seen - stored) lines the last stored token
        # up with the position just before the query, so the causal mask keeps all of them and stays
        # causal among the new tokens.
        stored = self.stored_length()
        return stored + query_length, self.cumulative_length - stored

    def get_seq_length(self) -> int:
        """Tokens seen (the position of the next token), not tokens stored: see :meth:`stored_length`."""
        return self.cumulative_length

    def get_max_length(self) -> int:
        return self.sink + self.window

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a SinkCache evicts tokens and cannot be cropped (no assisted decoding)")


class SinkCache(DynamicCache):
    """StreamingLLM's rolling KV cache (Xiao et al., ICLR 2024, §3.2): ``sink`` first tokens + ``window`` recent.

    ``SinkCache(model, window=1020, sink=4)``; pass it as ``model(..., cache=c)`` or
    ``model.generate(..., cache=c)``. ``rolling`` (default: on for RoPE models, off for learned absolute
    positions) assigns positions within the cache by re-rotating the sink keys. Memory stays at
    ``sink + window`` tokens per layer: :meth:`stored_length` never exceeds it.
    """

    def __init__(self, model: nn.Module, window: int, sink: int = 4, rolling: bool | None = None):
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise UserError(f"window = {window!r} is not allowed: must be an integer >= 1")
        if isinstance(sink, bool) or not isinstance(sink, int) or sink < 0:
            raise UserError(f"sink = {sink!r} is not allowed: must be an integer >= 0")
        cfg = model.config.get_text_config()
        model_type = cfg.model_type
        if rolling is None:
            if model_type in ROPE_MODEL_TYPES:
                rolling = True
            elif model_type in LEARNED_POSITION_MODEL_TYPES:
                rolling = False
            else:
                raise UserError(f"model type {model_type!r}: say whether positions roll within the cache "
                                f"(rolling=True for RoPE models of types {', '.join(ROPE_MODEL_TYPES)}) or not "
                                "(rolling=False)")
        if rolling and model_type not in ROPE_MODEL_TYPES:
            raise UserError(f"rolling positions need RoPE keys; model type {model_type!r} is not one of "
                            f"{', '.join(ROPE_MODEL_TYPES)} (learned positions: use rolling=False)")
        inv_freq = _rope_inv_freq(model) if rolling and sink > 0 else None
        self.sink, self.window, self.rolling = sink, window, bool(rolling)
        layers = [SinkCacheLayer(sink, window, inv_freq) for _ in range(cfg.num_hidden_layers)]
        Cache.__init__(self, layers=layers)

    def stored_length(self, layer_idx: int = 0) -> int:
        """Tokens held by layer ``layer_idx`` (at most ``sink + window``)."""
        return self.layers[layer_idx].stored_length() if layer_idx < len(self.layers) else 0

    def nbytes(self) -> int:
        return cache_nbytes(self)


class SlidingWindowCache(SinkCache):
    """A rolling KV cache of the ``window`` most recent tokens (StreamingLLM's "window attention" baseline)."""

    def __init__(self, model: nn.Module, window: int, rolling: bool | None = None):
        super().__init__(model, window=window, sink=0, rolling=rolling)


# ---- registration -------------------------------------------------------------------------------

SPEC = registry.register(registry.MethodSpec(
    name="gqa", family="attention", config_cls=GQAConfig, apply=apply, paper="gqa",
    summary="MHA -> grouped/multi-query attention: mean-pool k/v heads per group, optional uptraining "
            "(Ainslie et al., EMNLP 2023)",
))

__all__ = [
    "ALIASES", "BACKENDS", "GQAConfig", "SPEC", "SinkCache", "SinkCacheLayer", "SlidingWindowCache", "apply",
    "available_backends", "attention_backend", "cache_nbytes", "convert_to_gqa", "kv_cache_bytes",
    "mean_pool_heads", "rerotate", "set_attention_backend",
]
