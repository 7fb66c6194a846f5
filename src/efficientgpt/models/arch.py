"""Roles, not module names: one table per model family maps roles to concrete modules.

A method asks for roles (``q``, ``k``, ``v``, ``o``, ``up``, ``gate``, ``down``, ...) and
:func:`resolve` returns :class:`Target` objects naming the module, the decoder layer it sits in and,
for fused projections, which output features belong to the role:

* GPT-2 ``attn.c_attn`` is one ``Conv1D`` computing ``[q | k | v]`` (contiguous thirds of the
  output). ``Conv1D`` stores its weight as ``(in, out)``, the transpose of ``nn.Linear``.
* GPT-NeoX ``attention.query_key_value`` is one ``Linear`` whose output is viewed as
  ``(heads, 3 * head_size)``: q, k and v are interleaved per head, so a role's output features are
  a strided index set, not a slice.

Adding a model family is one :class:`Family` entry in :data:`FAMILIES`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from efficientgpt.errors import UserError

#: Roles of linear maps inside a decoder block.
LINEAR_ROLES = ("q", "k", "v", "o", "gate", "up", "down")
#: Roles of whole modules (not linear maps a delta wraps).
MODULE_ROLES = ("attn", "mlp", "norm_attn", "norm_mlp", "block")
#: Model-level roles.
MODEL_ROLES = ("embed", "pos_embed", "lm_head", "final_norm", "blocks")
#: Role groups accepted wherever a list of roles is.
ROLE_GROUPS = {
    "attn-linear": ("q", "k", "v", "o"),
    "mlp-linear": ("gate", "up", "down"),
    "all-linear": ("q", "k", "v", "o", "gate", "up", "down"),
    "qkv": ("q", "k", "v"),
}


@dataclasses.dataclass(frozen=True)
class Family:
    """How one Hugging Face model family lays out its modules."""

    name: str
    model_types: tuple[str, ...]
    blocks: str
    """Path of the ``ModuleList`` of decoder blocks."""
    block_roles: dict[str, str]
    """Role -> path inside a block (linear and module roles)."""
    model_roles: dict[str, str]
    """Role -> path inside the model (embed, lm_head, final_norm, pos_embed)."""
    fused_qkv: str | None = None
    """Block-relative path of a fused q/k/v projection, if the family has one."""
    fused_layout: str = ""
    """``"thirds"`` (GPT-2: ``[q|k|v]``) or ``"per_head"`` (GPT-NeoX: ``(heads, [q|k|v])``)."""
    has_bias: bool = True
    """Whether the family's linear layers carry biases by default."""


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            name="gpt2",
            model_types=("gpt2",),
            blocks="transformer.h",
            block_roles={
                "o": "attn.c_proj",
                "up": "mlp.c_fc",
                "down": "mlp.c_proj",
                "attn": "attn",
                "mlp": "mlp",
                "norm_attn": "ln_1",
                "norm_mlp": "ln_2",
            },
            model_roles={
                "embed": "transformer.wte",
                "pos_embed": "transformer.wpe",
                "lm_head": "lm_head",
                "final_norm": "transformer.ln_f",
            },
            fused_qkv="attn.c_attn",
            fused_layout="thirds",
        ),
        Family(
            name="llama",
            model_types=("llama", "mistral", "qwen2", "qwen3"),
            blocks="model.layers",
            block_roles={
                "q": "self_attn.q_proj",
                "k": "self_attn.k_proj",
                "v": "self_attn.v_proj",
                "o": "self_attn.o_proj",
                "gate": "mlp.gate_proj",
                "up": "mlp.up_proj",
                "down": "mlp.down_proj",
                "attn": "self_attn",
                "mlp": "mlp",
                "norm_attn": "input_layernorm",
                "norm_mlp": "post_attention_layernorm",
            },
            model_roles={"embed": "model.embed_tokens", "lm_head": "lm_head", "final_norm": "model.norm"},
            has_bias=False,
        ),
        Family(
            name="opt",
            model_types=("opt",),
            blocks="model.decoder.layers",
            block_roles={
                "q": "self_attn.q_proj",
                "k": "self_attn.k_proj",
                "v": "self_attn.v_proj",
                "o": "self_attn.out_proj",
                "up": "fc1",
                "down": "fc2",
                "attn": "self_attn",
                "norm_attn": "self_attn_layer_norm",
                "norm_mlp": "final_layer_norm",
            },
            model_roles={
                "embed": "model.decoder.embed_tokens",
                "pos_embed": "model.decoder.embed_positions",
                "lm_head": "lm_head",
                "final_norm": "model.decoder.final_layer_norm",
            },
        ),
        Family(
            name="gpt_neox",
            model_types=("gpt_neox",),
            blocks="gpt_neox.layers",
            block_roles={
                "o": "attention.dense",
                "up": "mlp.dense_h_to_4h",
                "down": "mlp.dense_4h_to_h",
                "attn": "attention",
                "mlp": "mlp",
                "norm_attn": "input_layernorm",
                "norm_mlp": "post_attention_layernorm",
            },
            model_roles={
                "embed": "gpt_neox.embed_in",
                "lm_head": "lm_head",
                "final_norm": "gpt_neox.final_layer_norm",
            },
            fused_qkv="attention.query_key_value",
            fused_layout="per_head",
        ),
    )
}
# Qwen2 shares Llama's layout (biases on q/k/v only); it is its own tiny-factory family.
_MODEL_TYPE_TO_FAMILY = {mt: f for f in FAMILIES.values() for mt in f.model_types}


@dataclasses.dataclass(frozen=True)
class Target:
    """One module a method acts on, resolved from a role (or a name pattern)."""

    name: str
    """Dotted path from the model root, e.g. ``model.layers.3.self_attn.q_proj``."""
    module: nn.Module
    role: str | None
    """The role this target plays (``None`` for a module matched by name pattern)."""
    layer: int | None
    """Index of the decoder block, or ``None`` for model-level modules."""
    out_index: torch.Tensor | None = None
    """For a fused projection: the output features of this role (``LongTensor``); else ``None``."""

    @property
    def transposed(self) -> bool:
        """GPT-2's ``Conv1D`` stores ``weight`` as ``(in, out)``."""
        return is_conv1d(self.module)

    @property
    def in_features(self) -> int:
        return linear_shape(self.module)[0]

    @property
    def out_features(self) -> int:
        """Output width of this role (the slice's width for a fused projection)."""
        return len(self.out_index) if self.out_index is not None else linear_shape(self.module)[1]


def is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of an ``nn.Linear`` or a GPT-2 ``Conv1D``."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if is_conv1d(module):
        return module.weight.shape[0], module.weight.shape[1]
    raise TypeError(f"{type(module).__name__} is not a linear layer")


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight in ``nn.Linear`` orientation, ``(out, in)`` (a view for ``Conv1D``)."""
    return module.weight.t() if is_conv1d(module) else module.weight


def family_of(model: nn.Module) -> Family:
    """The :class:`Family` of a Hugging Face causal LM; unknown types are refused with the list."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    fam = _MODEL_TYPE_TO_FAMILY.get(model_type)
    if fam is None:
        known = sorted(_MODEL_TYPE_TO_FAMILY)
        raise UserError(
            f"model type {model_type!r} has no role table; supported model types: {', '.join(known)} "
            "(module-name patterns still work for any model)"
        )
    return fam


def blocks(model: nn.Module) -> nn.ModuleList:
    return model.get_submodule(family_of(model).blocks)


def num_layers(model: nn.Module) -> int:
    return len(blocks(model))


def model_module(model: nn.Module, role: str) -> nn.Module:
    """A model-level module by role: ``embed``, ``pos_embed``, ``lm_head``, ``final_norm``, ``blocks``."""
    fam = family_of(model)
    if role == "blocks":
        return blocks(model)
    # The HF accessors stay right across renames (GPT-NeoX's head was once ``embed_out``).
    if role == "embed":
        return model.get_input_embeddings()
    if role == "lm_head":
        return model.get_output_embeddings()
    if role not in fam.model_roles:
        raise UserError(f"model family {fam.name!r} has no {role!r} module; it has: {', '.join(fam.model_roles)}")
    return model.get_submodule(fam.model_roles[role])


def block_module(model: nn.Module, layer: int, role: str) -> nn.Module:
    """A module of decoder block ``layer`` by role (``attn``, ``mlp``, ``norm_attn``, ``q``, ...)."""
    fam = family_of(model)
    block = blocks(model)[layer]
    if role == "block":
        return block
    if role in fam.block_roles:
        return block.get_submodule(fam.block_roles[role])
    if role in ("q", "k", "v") and fam.fused_qkv:
        return block.get_submodule(fam.fused_qkv)
    if role == "mlp" and fam.name == "opt":
        raise UserError("OPT has no MLP submodule: its fc1/fc2 sit directly in the decoder layer")
    raise UserError(f"model family {fam.name!r} has no {role!r} module in its blocks")


def head_dims(model: nn.Module) -> tuple[int, int, int]:
    """``(num_heads, num_kv_heads, head_dim)`` of the model's attention."""
    cfg = model.config
    hidden = cfg.hidden_size
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    return heads, kv, head_dim


def fused_out_index(model: nn.Module, role: str) -> torch.Tensor:
    """Output features of ``role`` in the family's fused q/k/v projection."""
    fam = family_of(model)
    heads, _, hd = head_dims(model)
    part = ("q", "k", "v").index(role)
    if fam.fused_layout == "thirds":  # [q | k | v], each heads*hd wide
        width = heads * hd
        return torch.arange(part * width, (part + 1) * width)
    if fam.fused_layout == "per_head":  # (heads, [q | k | v]) flattened
        base = torch.arange(heads) * (3 * hd) + part * hd  # (heads,)
        return (base[:, None] + torch.arange(hd)[None, :]).reshape(-1)  # (heads * hd,)
    raise ValueError(f"family {fam.name!r} has no fused q/k/v layout")


def expand_roles(roles: Iterable[str] | str) -> list[str]:
    """Expand role groups (``all-linear``, ``attn-linear``, ...) and comma lists into roles."""
    if isinstance(roles, str):
        roles = [r.strip() for r in roles.split(",") if r.strip()]
    out: list[str] = []
    for r in roles:
        for x in ROLE_GROUPS.get(r, (r,)):
            if x not in out:
                out.append(x)
    return out


def resolve(
    model: nn.Module,
    targets: Sequence[str] | str,
    layers: Sequence[int] | None = None,
    exclude: Sequence[str] = (),
) -> list[Target]:
    """Resolve roles or module-name patterns to :class:`Target` objects.

    ``targets`` holds roles (``q``, ``v``, ``all-linear``, ...) or module-name patterns: a plain name
    matches modules whose path ends with it (``c_fc``), a pattern starting with ``re:`` is a regular
    expression matched against the full path. ``layers`` keeps only those decoder blocks; ``exclude``
    drops targets whose path matches any of its patterns. An empty result is an error that lists the
    roles and a sample of module names.
    """
    wanted = expand_roles(targets)
    fam = None
    try:
        fam = family_of(model)
    except UserError:
        pass
    n_layers = num_layers(model) if fam else None
    if layers is not None and n_layers is not None:
        bad = [i for i in layers if not (-n_layers <= i < n_layers)]
        if bad:
            raise UserError(f"layers {bad} out of range: the model has {n_layers} layers (0..{n_layers - 1})")
        layers = sorted({i % n_layers for i in layers})
    found: list[Target] = []
    patterns = [t for t in wanted if t not in LINEAR_ROLES]
    roles = [t for t in wanted if t in LINEAR_ROLES]
    if roles and fam is None:
        family_of(model)  # raises the clear "no role table" error
    if fam is not None:
        for i in range(n_layers):
            if layers is not None and i not in layers:
                continue
            for role in roles:
                found.extend(_role_targets(model, fam, i, role))
    if patterns:
        layer_of = _layer_index_map(model) if fam else {}
        for name, module in model.named_modules():
            if not _is_linear(module) or not any(_matches(p, name) for p in patterns):
                continue
            layer = layer_of.get(name)
            if layers is not None and layer not in layers:
                continue
            found.append(Target(name=name, module=module, role=None, layer=layer))
    found = [t for t in found if not any(_matches(p, t.name) for p in exclude)]
    if not found:
        sample = [n for n, m in model.named_modules() if _is_linear(m)][:12]
        raise UserError(
            f"targets {list(targets) if not isinstance(targets, str) else targets!r} match no module; "
            f"roles: {', '.join(LINEAR_ROLES)} or groups {', '.join(ROLE_GROUPS)}"
            + (f" (family {fam.name!r} has: {', '.join(available_roles(model))})" if fam else "")
            + f"; module names look like: {', '.join(sample)}"
        )
    return found


def available_roles(model: nn.Module) -> list[str]:
    fam = family_of(model)
    roles = [r for r in LINEAR_ROLES if r in fam.block_roles]
    if fam.fused_qkv:
        roles = ["q", "k", "v"] + roles
    return [r for r in LINEAR_ROLES if r in roles]


def _role_targets(model: nn.Module, fam: Family, layer: int, role: str) -> list[Target]:
    prefix = f"{fam.blocks}.{layer}"
    if role in fam.block_roles:
        path = fam.block_roles[role]
        return [Target(f"{prefix}.{path}", blocks(model)[layer].get_submodule(path), role, layer)]
    if role in ("q", "k", "v") and fam.fused_qkv:
        module = blocks(model)[layer].get_submodule(fam.fused_qkv)
        return [Target(f"{prefix}.{fam.fused_qkv}", module, role, layer, fused_out_index(model, role))]
    return []  # e.g. "gate" on a family whose MLP has no gate


def _layer_index_map(model: nn.Module) -> dict[str, int]:
    fam = family_of(model)
    out = {}
    for i, block in enumerate(blocks(model)):
        for sub, _ in block.named_modules():
            out[f"{fam.blocks}.{i}.{sub}" if sub else f"{fam.blocks}.{i}"] = i
    return out


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def _matches(pattern: str, name: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern)
