"""S4 / PEFT design spaces (Chen et al., ICLR 2023): the grouping rule, uniform allocation, the S4 preset's
children, compositions of every registered PEFT method checked against stacking the same deltas by
hand, identity at init, merge, save/load, training, the clear errors, and the per-layer prefix it needs."""

from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch

from adaptation import adapt_to_descending, ascending_model
from conftest import FAMILIES
from efficientgpt import registry
from efficientgpt.errors import ConfigError, UserError
from efficientgpt.models.tiny import tiny_model
from efficientgpt.peft import core
from efficientgpt.peft.lora import LoraConfig
from efficientgpt.peft.prefix_tuning import PrefixTuningConfig
from efficientgpt.peft.s4 import S4Config, group_sizes, split_layers
from efficientgpt.train.losses import causal_lm_loss

IDS = torch.randint(2, 128, (2, 9), generator=torch.Generator().manual_seed(0))
S4_ASSIGNMENT = [{"adapter_houlsby", "lora"}, {"adapter_houlsby", "prefix_tuning"},
                 {"adapter_houlsby", "prefix_tuning", "bitfit"}, {"prefix_tuning", "bitfit", "lora"}]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models run faster on one thread than on oversubscribed shared cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers deprecation chatter
        yield


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def _perturb(delta, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in delta.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g).to(p.dtype))


def _layers_of(paths):
    return {int(re.search(r"\.(\d+)\.", p).group(1)) for p in paths}


def _groupable():
    """Registered PEFT methods that can act on a group of layers (their config has ``layers``)."""
    import dataclasses

    return sorted(s.name for s in registry.methods("peft") if s.name not in ("s4", "full")
                  and "layers" in {f.name for f in dataclasses.fields(s.config_cls)})


def _model_level():
    import dataclasses

    return sorted(s.name for s in registry.methods("peft") if s.name not in ("s4", "full")
                  and "layers" not in {f.name for f in dataclasses.fields(s.config_cls)})


# ---- grouping -----------------------------------------------------------------------------------------
def test_spindle_grouping_closed_form():
    # weights 1, 2, 2, 1: L/6, L/3, L/3, L/6 layers
    assert split_layers(12, 4, "spindle") == [[0, 1], [2, 3, 4, 5], [6, 7, 8, 9], [10, 11]]
    assert group_sizes(24, 4, "spindle") == [4, 8, 8, 4]
    assert group_sizes(12, 4, "uniform") == [3, 3, 3, 3]
    assert group_sizes(12, 4, "increasing") == [1, 2, 4, 5]  # 1.2, 2.4, 3.6, 4.8: two largest remainders +1
    assert group_sizes(12, 4, "decreasing") == [5, 4, 2, 1]
    assert group_sizes(12, 4, "bowl") == [4, 2, 2, 4]
    assert group_sizes(10, 4, "spindle") == [2, 3, 3, 2]  # 1.67, 3.33, 3.33, 1.67
    assert group_sizes(5, 3, "spindle") == [1, 3, 1]  # 1.25, 2.5, 1.25


@pytest.mark.parametrize("pattern", ["spindle", "uniform", "increasing", "decreasing", "bowl"])
def test_grouping_partitions_the_layers_in_proportion(pattern):
    weights = {"spindle": [1, 2, 2, 1], "uniform": [1, 1, 1, 1], "increasing": [1, 2, 3, 4],
               "decreasing": [4, 3, 2, 1], "bowl": [2, 1, 1, 2]}[pattern]
    for n in range(4, 41):
        groups = split_layers(n, 4, pattern)
        assert [x for g in groups for x in g] == list(range(n))  # consecutive, disjoint, complete
        for g, w in zip(groups, weights):
            assert abs(len(g) - n * w / sum(weights)) < 1  # rounding moves no group by a whole layer


# ---- the preset -------------------------------------------------------------------------------------------
def test_s4_preset_attaches_the_papers_strategies_to_the_spindle_groups():
    model = tiny_model("llama", layers=12)
    delta = core.apply(model, "s4", S4Config(budget=1500))
    assert delta.layer_groups == [[0, 1], [2, 3, 4, 5], [6, 7, 8, 9], [10, 11]]
    by_group = {}
    for c in delta.children.values():
        by_group.setdefault(c.group, set()).add(c.method)
        i = int(c.group[1:]) - 1
        assert c.layers == delta.layer_groups[i] and c.delta.config.layers == delta.layer_groups[i]
        if c.method == "prefix_tuning":
            assert c.delta.selected == delta.layer_groups[i]
        else:
            assert _layers_of(c.delta.targets()) == set(delta.layer_groups[i]), (c.key, c.delta.targets())
    assert [by_group[f"G{i + 1}"] for i in range(4)] == S4_ASSIGNMENT
    assert core.deltas(model) == {"default": delta}  # the children are not separate deltas
    names = {c.delta.name for c in delta.children.values()}
    assert "default/G3/bitfit" in names and "default/G1/adapter_houlsby" in names


def test_preset_fills_only_what_is_not_given():
    cfg = S4Config()
    cfg.validate()
    assert (cfg.grouping, cfg.num_groups, cfg.budget, cfg.budget_unit) == ("spindle", 4, 0.005, "fraction")
    assert [set(s) for s in cfg.strategies] == S4_ASSIGNMENT
    cfg = S4Config(grouping="uniform", strategies="A+L,P+B", budget=300)  # command-line style strings
    cfg.validate()
    assert (cfg.num_groups, cfg.budget_unit) == (2, "layer")
    assert cfg.strategies == [["adapter_houlsby", "lora"], ["prefix_tuning", "bitfit"]]
    cfg = S4Config(preset="none", groups=[{"layers": [0], "strategies": ["lora"]}],
                   options='{"lora": {"rank": 2}}')
    cfg.validate()
    assert cfg.budget is None and cfg.options == {"lora": {"rank": 2}}


def test_a_too_shallow_model_leaves_outer_spindle_groups_untuned():
    model = tiny_model("gpt2")  # 2 layers: spindle sizes 0, 1, 1, 0
    with pytest.warns(UserWarning, match="G1, G4 no layer"):
        delta = core.apply(model, "s4", S4Config())
    assert {c.group for c in delta.children.values()} == {"G2", "G3"}


# ---- uniform allocation -------------------------------------------------------------------------------------
def _shapes(model):
    c = model.config
    d, heads = c.hidden_size, c.num_attention_heads
    kv = getattr(c, "num_key_value_heads", None) or heads
    hd = d // heads
    inter = getattr(c, "intermediate_size", None) or getattr(c, "ffn_dim", None) or getattr(c, "n_inner", None)
    return d, heads, kv, hd, inter


def _per_layer(model, method, child_cfg):
    """(count of one layer, size step u) by the methods' closed forms; u = 0 for fixed-size methods."""
    d, heads, kv, hd, inter = _shapes(model)
    if method == "lora":  # default targets q, v
        u = (d + heads * hd) + (d + kv * hd)
        return child_cfg.rank * u, u
    if method == "adapter_houlsby":  # two adapters, (d·m + m) + (m·d + d) each
        u = 2 * (2 * d + 1)
        return child_cfg.bottleneck * u + 2 * d, u
    if method == "prefix_tuning":  # P trained directly
        u = 2 * kv * hd
        return child_cfg.num_virtual_tokens * u, u
    if method == "bitfit":  # every linear bias, and the two LayerNorm biases where there are any
        gated = model.config.model_type in ("llama", "qwen2")
        norms = 0 if model.config.model_type in ("llama", "qwen2") else 2 * d
        return heads * hd + 2 * kv * hd + d + inter + d + (inter if gated else 0) + norms, 0
    raise AssertionError(method)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_uniform_allocation_gives_every_layer_the_budget(family):
    model = tiny_model(family, layers=12)
    b = 1500
    delta = core.apply(model, "s4", S4Config(budget=b, budget_unit="layer"))
    total = 0
    for i, layers in enumerate(delta.layer_groups):
        children = [c for c in delta.children.values() if c.group == f"G{i + 1}"]
        parts = [_per_layer(model, c.method, c.delta.config) for c in children]
        count = sum(n for n, _ in parts)
        tolerance = sum(u for _, u in parts) / 2  # each sized strategy is off by at most half a size step
        assert abs(count - b) <= tolerance, (f"G{i + 1}", count, tolerance)
        for c in children:  # the closed form is what the child really trains
            assert sum(p.numel() for p in c.delta.parameters()) == len(layers) * _per_layer(model, c.method,
                                                                                            c.delta.config)[0]
        total += len(layers) * count
    assert core.count_parameters(model)["trainable"] == total

    def sizes(cfg):
        m = tiny_model(family, layers=12)
        d = core.apply(m, "s4", cfg)
        return {k: c.delta.config for k, c in d.children.items()}

    n_base = sum(p.numel() for p in {id(p): p for p in tiny_model(family, layers=12).parameters()}.values())
    reference = {k: c.delta.config for k, c in delta.children.items()}
    assert sizes(S4Config(budget=12 * b, budget_unit="total")) == reference
    assert sizes(S4Config(budget=12 * b / n_base, budget_unit="fraction")) == reference


# ---- compositions -------------------------------------------------------------------------------------------
def _stacked(family, delta, layers):
    """The reference: the S4 delta's children attached one by one as ordinary deltas, same seed and order."""
    model = tiny_model(family, layers=layers)
    torch.manual_seed(0)
    for c in delta.children.values():
        core.apply(model, c.method, copy.deepcopy(c.config), name=c.key)
    return model


COMBOS = {
    "lora+ia3+bitfit": dict(groups=[{"layers": [0, 1], "strategies": ["lora", "ia3", "bitfit"]},
                                    {"layers": [3], "strategies": ["dylora"]}]),
    "adapters+prefix+prompt": dict(groups=[{"layers": [0], "strategies": ["adapter_pfeiffer"]},
                                           {"layers": [1, 2], "strategies": ["adapter_houlsby", "prefix_tuning"]}],
                                   model_strategies=["prompt_tuning"],
                                   options={"prefix_tuning": {"num_virtual_tokens": 2},
                                            "prompt_tuning": {"num_virtual_tokens": 3}}),
}


@pytest.mark.parametrize("family", ["gpt2", "qwen2"])
@pytest.mark.parametrize("combo", sorted(COMBOS))
def test_a_composition_equals_stacking_its_children_by_hand(combo, family, tmp_path):
    model = tiny_model(family, layers=4)
    base = _logits(model)
    torch.manual_seed(0)
    delta = core.apply(model, "s4", S4Config(preset=None, **COMBOS[combo]))
    reference = _stacked(family, delta, 4)
    torch.testing.assert_close(_logits(model), _logits(reference), atol=1e-6, rtol=0)
    assert core.count_parameters(model)["trainable"] == core.count_parameters(reference)["trainable"]
    _perturb(delta)
    tuned = _logits(model)
    assert (tuned - base).abs().max() > 1e-4
    core.save_delta(delta, tmp_path / "d")
    fresh = tiny_model(family, layers=4)
    loaded = core.load_delta(fresh, tmp_path / "d")
    assert list(loaded.children) == list(delta.children)
    torch.testing.assert_close(_logits(fresh), tuned, atol=1e-6, rtol=0)
    prompt = IDS[:1, :4]
    cached = fresh.generate(prompt, max_new_tokens=4, do_sample=False, use_cache=True, pad_token_id=1)
    uncached = fresh.generate(prompt, max_new_tokens=4, do_sample=False, use_cache=False, pad_token_id=1)
    assert torch.equal(cached, uncached)
    core.remove(fresh)
    torch.testing.assert_close(_logits(fresh), base, atol=1e-6, rtol=0)
    assert not hasattr(fresh, core.DELTA_ROOT)


def test_every_registered_peft_method_composes_in_one_design():
    """All groupable methods in one group, LoRA in another, every model-level method on the whole model."""
    groupable, model_level = _groupable(), _model_level()
    assert {"lora", "bitfit", "ia3", "prefix_tuning", "adapter_houlsby"} <= set(groupable)
    assert "prompt_tuning" in model_level
    cfg = S4Config(preset=None, groups=[{"layers": [0, 1], "strategies": groupable},
                                        {"layers": [3], "strategies": ["lora"]}],
                   model_strategies=model_level,
                   options={"prefix_tuning": {"num_virtual_tokens": 2}, "prompt_tuning": {"num_virtual_tokens": 2},
                            # ATTEMPT's source prompts come from earlier runs; num_sources builds their slots
                            "attempt": {"num_virtual_tokens": 2, "num_sources": 2}})
    model = tiny_model("llama", layers=4)
    base = _logits(model)
    torch.manual_seed(0)
    delta = core.apply(model, "s4", cfg)
    assert {c.method for c in delta.children.values()} == set(groupable) | set(model_level)
    reference = _stacked("llama", delta, 4)
    torch.testing.assert_close(_logits(model), _logits(reference), atol=1e-6, rtol=0)
    assert core.count_parameters(model)["trainable"] == core.count_parameters(reference)["trainable"]
    model.train()
    delta.on_step_begin(0)
    loss, n = causal_lm_loss(model, {"input_ids": IDS})
    (loss / n).backward()
    assert any(p.grad is not None for p in delta.parameters())
    assert all(p.grad is None for n_, p in model.named_parameters() if not n_.startswith(core.DELTA_ROOT))
    model.eval()
    core.remove(model)
    torch.testing.assert_close(_logits(model), base, atol=1e-6, rtol=0)


IDENTITY = ["lora", "dylora", "ia3", "bitfit", "adapter_houlsby", "adapter_pfeiffer"]


@pytest.mark.parametrize("family", FAMILIES)
def test_identity_at_init_when_every_child_is(family):
    model = tiny_model(family, layers=4)
    base = _logits(model)
    delta = core.apply(model, "s4", S4Config(grouping="bowl", strategies=[IDENTITY[:2], IDENTITY[2:4], IDENTITY[4:],
                                                                          IDENTITY], budget=400))
    torch.testing.assert_close(_logits(model), base, atol=1e-6, rtol=0)
    assert len(delta.children) == 12


# ---- merge, activity, saving ------------------------------------------------------------------------------
def test_merge_works_exactly_when_every_child_is_mergeable():
    model = tiny_model("llama", layers=4)
    delta = core.apply(model, "s4", S4Config(**COMBOS["lora+ia3+bitfit"], preset=None))
    assert delta.mergeable
    _perturb(delta)
    tuned = _logits(model)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    delta.merge()
    torch.testing.assert_close(_logits(model), tuned, atol=1e-5, rtol=0)
    delta.unmerge()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, weights[n], atol=1e-6, rtol=0, msg=n)
    merged = core.merge_and_unload(model)
    assert not hasattr(merged, core.DELTA_ROOT) and not core.deltas(merged)
    torch.testing.assert_close(_logits(merged), tuned, atol=1e-5, rtol=0)

    model = tiny_model("llama", layers=4)
    delta = core.apply(model, "s4", S4Config(budget=300))
    assert not delta.mergeable
    with pytest.raises(UserError, match=r"s4 is not mergeable here: its children default/G1/adapter_houlsby "
                                        r"\(adapter_houlsby\)"):
        delta.merge()
    with pytest.raises(UserError, match="cannot merge: default \\(s4\\)"):
        core.merge_and_unload(model)


def test_a_failing_child_merge_rolls_back_the_children_merged_before_it():
    model = tiny_model("qwen2", layers=2)  # BitFit cannot merge into Qwen2's bias-free o_proj
    delta = core.apply(model, "s4", S4Config(preset=None, groups=[{"layers": [0], "strategies": ["lora"]},
                                                                  {"layers": [1], "strategies": ["bitfit"]}]))
    _perturb(delta)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(UserError, match="cannot merge BitFit into this qwen2 model"):
        delta.merge()
    assert not delta.merged and not any(c.delta.merged for c in delta.children.values())
    for n, p in model.named_parameters():  # LoRA's merge was undone (up to float rounding of W + ΔW - ΔW)
        torch.testing.assert_close(p, weights[n], atol=1e-6, rtol=0, msg=n)
    assert all(c.delta._handles for c in delta.children.values())  # and its hooks are back


def test_disable_and_set_active_switch_every_child():
    model = tiny_model("gpt2", layers=4)
    base = _logits(model)
    delta = core.apply(model, "s4", S4Config(budget=400))
    other = core.apply(model, "lora", LoraConfig(rank=2), name="other")
    _perturb(delta)
    _perturb(other, seed=1)
    with core.disable(model):
        torch.testing.assert_close(_logits(model), base, atol=1e-6, rtol=0)
    core.set_active(model, "other")
    assert not any(c.delta.enabled for c in delta.children.values())
    assert not any(p.requires_grad for p in delta.parameters())
    only_other = _logits(model)
    core.remove(model, "default")
    torch.testing.assert_close(_logits(model), only_other, atol=1e-6, rtol=0)
    core.set_active(model, [])
    torch.testing.assert_close(_logits(model), base, atol=1e-6, rtol=0)


def test_save_records_the_folded_prefix_and_reloads_the_same_children(tmp_path):
    model = tiny_model("opt", layers=4)
    cfg = S4Config(grouping="spindle", strategies=[["lora"], ["prefix_tuning"], ["prefix_tuning", "bitfit"], []],
                   budget=500, options={"prefix_tuning": {"reparam": True, "hidden": 8}})
    delta = core.apply(model, "s4", cfg)
    _perturb(delta)
    tuned = _logits(model)
    core.save_delta(delta, tmp_path / "d")
    saved = core.read_delta_config(tmp_path / "d")["config"]
    assert saved["options"]["prefix_tuning"] == {"reparam": True, "hidden": 8, "folded": True}
    torch.testing.assert_close(_logits(model), tuned, atol=1e-6, rtol=0)
    fresh = tiny_model("opt", layers=4)
    loaded = core.load_delta(fresh, tmp_path / "d")
    assert {k: c.delta.config for k, c in loaded.children.items()} == \
        {k: c.delta.config for k, c in delta.children.items()}
    assert "G4__bitfit" not in loaded.children  # the fourth group is not tuned
    torch.testing.assert_close(_logits(fresh), tuned, atol=1e-6, rtol=0)


# ---- training --------------------------------------------------------------------------------------------
def test_training_lowers_the_loss_and_moves_only_the_composite():
    """A 4-layer Llama pretrained briefly on ascending sequences (a random base's LM head is too small for
    a frozen-head method to move the loss), then adapted to descending ones by the S4 preset alone."""
    model = ascending_model(layers=4)
    torch.manual_seed(0)
    delta = core.apply(model, "s4", S4Config(budget=800))
    before, after = adapt_to_descending(model)
    assert after < before - 0.1, (before, after)
    assert delta.children  # every child trained something
    for c in delta.children.values():
        assert any(torch.count_nonzero(p) > 0 for p in c.delta.parameters()), c.key


# ---- bad input ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(strategies=[["lora", "lorra"]], grouping="uniform"),
     r"group G1: 'lorra' is not a registered PEFT method; registered PEFT methods: .*bitfit.*lora.*prefix_tuning"),
    (dict(preset=None, groups=[{"layers": [0, 1], "strategies": ["lora"]}, {"layers": [1, 2], "strategies": ["ia3"]}]),
     r"layer 1 is in two groups \(G1 and G2\); groups must not overlap"),
    (dict(preset=None, groups=[{"layers": [], "strategies": ["lora"]}]), r"groups\[0\].layers is empty or missing"),
    (dict(preset=None, groups=[{"layers": [0], "strategies": ["prompt_tuning"]}]),
     r"'prompt_tuning' has no per-layer placement .* S4Config.model_strategies"),
    (dict(model_strategies=["full"]), r"'full' cannot be part of a design space: full fine-tuning trains the base"),
    (dict(strategies=[["lora", "lora"]], grouping="uniform"), r"names 'lora' twice"),
    (dict(strategies=[["lora"]], grouping="uniform", num_groups=2), r"strategies has 1 entries but num_groups is 2"),
    (dict(strategies=[["lora"]], grouping="zigzag"), r"grouping = 'zigzag' is not allowed"),
    (dict(options={"lora": {"rnak": 2}}), r"options\['lora'\]: LoraConfig has no field\(s\) rnak"),
    (dict(options={"lora": {"layers": [0]}}), r"options\['lora'\] sets 'layers', which the groups decide"),
    (dict(options={"ia3": {}}), r"options names 'ia3', which no group or model strategy uses"),
    (dict(grouping="uniform", strategies=[[], []]), r"tunes nothing"),
    (dict(budget=2.0, budget_unit="fraction"), r"budget = 2.0 is a fraction .* must be < 1"),
    (dict(preset=None, groups=[{"layers": [0]}], grouping="uniform"), r"groups lists the groups itself"),
])
def test_bad_designs_are_refused_before_anything_is_attached(kwargs, match):
    model = tiny_model("llama", layers=4)
    with pytest.raises(ConfigError, match=match):
        core.apply(model, "s4", S4Config(**kwargs))
    assert not core.deltas(model) and not hasattr(model, core.DELTA_ROOT)


def test_layers_out_of_range_and_failing_children_leave_nothing_behind():
    model = tiny_model("gpt2", layers=4)
    with pytest.raises(ConfigError, match=r"groups\[1\].layers \[4\] out of range: the model has 4 layers"):
        core.apply(model, "s4", S4Config(preset=None, groups=[{"layers": [0], "strategies": ["lora"]},
                                                              {"layers": [4], "strategies": ["bitfit"]}]))
    with pytest.raises(ConfigError, match=r"layer 3 is in two groups"):  # -1 is layer 3
        core.apply(model, "s4", S4Config(preset=None, groups=[{"layers": [3], "strategies": ["lora"]},
                                                              {"layers": [-1], "strategies": ["bitfit"]}]))
    # the second child fails at attach (a bottleneck wider than the model): the first is detached again
    with pytest.raises(ConfigError, match=r"bottleneck = 64 is larger than the hidden size 32"):
        core.apply(model, "s4", S4Config(preset=None, groups=[{"layers": [0], "strategies": ["lora"]},
                                                              {"layers": [1], "strategies": ["adapter_pfeiffer"]}],
                                         options={"adapter_pfeiffer": {"bottleneck": 64}}))
    assert not core.deltas(model) and not hasattr(model, core.DELTA_ROOT)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


# ---- prefix tuning on some layers only ----------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_on_some_layers_is_invisible_to_the_others(family):
    """Eager attention shows it: the other layers give the prefix slots exactly zero weight."""
    model = tiny_model(family, layers=3)
    model.set_attn_implementation("eager")
    torch.manual_seed(0)
    core.apply(model, "prefix_tuning", PrefixTuningConfig(num_virtual_tokens=3, reparam=False, layers=[1]))
    with torch.no_grad():
        attn = model(IDS, output_attentions=True).attentions  # per layer (B, heads, T, 3 + T)
    assert attn[0][..., :3].abs().max() == 0 and attn[2][..., :3].abs().max() == 0
    assert attn[1][..., :3].abs().max() > 1e-3
    for a in attn:
        torch.testing.assert_close(a.sum(-1), torch.ones_like(a.sum(-1)))


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_layers_before_the_prefix_compute_what_the_base_computes(family):
    # rotary positions: the real tokens' relative positions do not move, so layers 0-1 are exactly the base's
    model = tiny_model(family, layers=3)
    with torch.no_grad():
        base = model(IDS, output_hidden_states=True).hidden_states
    core.apply(model, "prefix_tuning", PrefixTuningConfig(num_virtual_tokens=3, layers=[2], hidden=8))
    with torch.no_grad():
        out = model(IDS, output_hidden_states=True).hidden_states
    torch.testing.assert_close(out[2], base[2], atol=1e-6, rtol=0)
    assert (out[3] - base[3]).abs().max() > 1e-4


@pytest.mark.parametrize("family", ["gpt2", "qwen2"])
def test_prefix_on_every_layer_listed_equals_the_default(family):
    outs = []
    for layers in (None, [0, 1]):
        model = tiny_model(family)
        torch.manual_seed(0)
        core.apply(model, "prefix_tuning", PrefixTuningConfig(num_virtual_tokens=2, hidden=8, layers=layers))
        outs.append(_logits(model))
    torch.testing.assert_close(outs[1], outs[0], atol=0, rtol=0)


def test_prefix_layers_are_checked():
    with pytest.raises(ConfigError, match=r"PrefixTuningConfig.layers \[5\] out of range: the model has 2 layers"):
        core.apply(tiny_model("llama"), "prefix_tuning", PrefixTuningConfig(layers=[5]))
    with pytest.raises(ConfigError, match=r"PrefixTuningConfig.layers is empty"):
        PrefixTuningConfig(layers=[]).validate()


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ["gpt2", "qwen2"])
def test_prefix_on_some_layers_decodes_step_by_step_as_in_one_pass(family, impl):
    # sdpa's decoding step passes no mask at all: the hidden slots need an explicit one there
    model = tiny_model(family, layers=3)
    model.set_attn_implementation(impl)
    torch.manual_seed(0)
    core.apply(model, "prefix_tuning", PrefixTuningConfig(num_virtual_tokens=3, reparam=False, layers=[0]))
    with torch.no_grad():
        full = model(IDS).logits[:, -1]
        past = model(IDS[:, :-1], use_cache=True).past_key_values
        step = model(IDS[:, -1:], past_key_values=past, use_cache=True).logits[:, -1]
    torch.testing.assert_close(step, full, atol=1e-5, rtol=1e-4)


def test_hiding_virtual_tokens_without_a_mask_makes_a_causal_one():
    from transformers.cache_utils import DynamicCache

    from efficientgpt.peft.kv_prefix import MARK, hide_virtual_tokens

    cache = DynamicCache()
    cache.update(torch.zeros(1, 1, 5, 4), torch.zeros(1, 1, 5, 4), 0)  # 2 + 3 virtual tokens cached
    setattr(cache, MARK, {"a": 2, "b": 3})
    hidden = torch.zeros(1, 2, 8)  # two new tokens: keys 0..6
    allowed = torch.tensor([[1, 1, 0, 0, 0, 1, 0], [1, 1, 0, 0, 0, 1, 1]], dtype=torch.bool)  # b's slots hidden
    mask = hide_virtual_tokens({"cache": cache, "attention_mask": None}, "b", hidden, 0, additive=False)
    assert torch.equal(mask["attention_mask"], allowed[None, None])
    mask = hide_virtual_tokens({"cache": cache, "attention_mask": None}, "b", hidden, 0, additive=True)
    expected = torch.zeros(2, 7).masked_fill(~allowed, torch.finfo(torch.float32).min)
    assert torch.equal(mask["attention_mask"], expected[None, None])
    untouched = {"cache": cache, "attention_mask": None}
    assert hide_virtual_tokens(untouched, "c", hidden, 0, additive=False) is untouched  # not in this cache
