"""Role tables: every family resolves its roles, fused projections split exactly as the model does."""

from __future__ import annotations

import pytest
import torch

from conftest import FAMILIES
from efficientgpt.errors import UserError
from efficientgpt.models import arch
from efficientgpt.models.tiny import tiny_model


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_resolves_attention_and_mlp_roles(family):
    model = tiny_model(family)
    targets = arch.resolve(model, "all-linear")
    roles = {t.role for t in targets}
    assert {"q", "k", "v", "o", "up", "down"} <= roles
    assert ("gate" in roles) == (family in ("llama", "qwen2"))
    assert {t.layer for t in targets} == {0, 1}
    for t in targets:
        assert t.in_features == arch.linear_weight(t.module).shape[1]
    assert arch.model_module(model, "lm_head") is model.get_output_embeddings()
    assert arch.model_module(model, "embed") is model.get_input_embeddings()
    assert isinstance(arch.block_module(model, 0, "attn"), torch.nn.Module)


def _qkv_reference(model, family, x):
    """q, k, v as the model's own attention code computes them, for one layer's input ``x``."""
    heads, kv, hd = arch.head_dims(model)
    block = arch.blocks(model)[0]
    if family == "gpt2":
        return block.attn.c_attn(x).split(heads * hd, dim=-1)
    if family == "gpt_neox":
        qkv = block.attention.query_key_value(x).view(*x.shape[:-1], heads, 3 * hd)
        return tuple(t.reshape(*x.shape[:-1], heads * hd) for t in qkv.chunk(3, dim=-1))
    attn = block.self_attn
    return attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_slices_match_the_models_own_split(family):
    model = tiny_model(family)
    x = torch.randn(2, 5, model.config.hidden_size)
    ref = _qkv_reference(model, family, x)
    for role, expected in zip("qkv", ref):
        (t,) = arch.resolve(model, [role], layers=[0])
        y = t.module(x)
        if t.out_index is not None:
            y = y[..., t.out_index]
        torch.testing.assert_close(y, expected)
        assert t.out_features == expected.shape[-1]


def test_conv1d_is_transposed_linear():
    model = tiny_model("gpt2")
    (t,) = arch.resolve(model, ["o"], layers=[0])
    assert t.transposed
    x = torch.randn(3, model.config.hidden_size)
    w = arch.linear_weight(t.module)  # (out, in)
    torch.testing.assert_close(t.module(x), x @ w.T + t.module.bias)


def test_patterns_layers_and_exclude():
    model = tiny_model("llama", layers=3)
    assert [t.name for t in arch.resolve(model, ["re:.*layers\\.1\\.mlp\\..*_proj"])] == [
        f"model.layers.1.mlp.{n}_proj" for n in ("gate", "up", "down")
    ]
    got = arch.resolve(model, "q,v", layers=[-1])
    assert [(t.role, t.layer) for t in got] == [("q", 2), ("v", 2)]
    got = arch.resolve(model, "all-linear", exclude=["re:.*mlp.*"])
    assert {t.role for t in got} == {"q", "k", "v", "o"}


def test_bad_targets_name_the_choices():
    model = tiny_model("opt")
    with pytest.raises(UserError, match=r"match no module; roles: q, k, v, o, gate, up, down.*fc1"):
        arch.resolve(model, ["nonexistent"])
    with pytest.raises(UserError, match=r"layers \[5\] out of range: the model has 2 layers"):
        arch.resolve(model, ["q"], layers=[5])
    with pytest.raises(UserError, match="match no module"):
        arch.resolve(model, ["gate"])  # OPT's MLP has no gate
