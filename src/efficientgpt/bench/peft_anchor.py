"""Hugging Face PEFT's implementation of a method, run through our pipeline as a reference point.

``efficientgpt bench --with-peft`` runs, next to our implementation of LoRA, (IA)^3, prompt tuning,
prefix tuning (and LLaMA-Adapter when it is registered), PEFT's implementation of the same method on a
copy of the same base model, with the same data, seed, token budget, learning rate and
:class:`~efficientgpt.train.trainer.Trainer`, evaluated by the same perplexity code. Only the module
that adapts the model differs, so the ratios ours/PEFT of step time, peak memory and perplexity
measure the implementations.

How each of our configs maps to PEFT's (:func:`peft_config`):

* LoRA: ``r``, ``lora_alpha``, ``lora_dropout``, ``use_rslora`` and the initialisation carry over, and
  ``target_modules`` lists the full paths of the modules our roles resolve to. PEFT adapts whole
  modules: where a role is a slice of a fused projection (GPT-2's ``c_attn`` holds q, k and v) PEFT can
  only adapt the whole fused module, so its LoRA is larger than ours there; the run says so in its notes.
* (IA)^3: PEFT's per-family defaults, compared with ours under ``peft_compatible=True`` (the same
  modules; the paper's targets differ from PEFT's).
* Prompt tuning: ``num_virtual_tokens`` equal; ``init="vocab"`` maps to PEFT's ``SAMPLE_VOCAB``. PEFT
  returns logits for the ``n`` virtual positions too (``n + T``); :class:`LastPositions` keeps the last
  ``T`` so the loss and the perplexity score the same tokens as ours.
* Prefix tuning: ``num_virtual_tokens`` equal; ``reparam``/``hidden`` map to ``prefix_projection`` /
  ``encoder_hidden_size``.
* LLaMA-Adapter: ``adapter_len`` and ``adapter_layers`` carry over to PEFT's ``AdaptionPromptConfig``,
  compared with ours under ``peft_compatible=True`` (PEFT's variant of the method).
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from efficientgpt.errors import UserError

#: Methods that HF PEFT also implements, in the order the bench runs them.
ANCHORED = ("lora", "ia3", "prompt_tuning", "prefix_tuning", "llama_adapter")


def available() -> bool:
    try:
        import peft  # noqa: F401
    except ImportError:
        return False
    return True


def ours_config(method: str, config, model=None):
    """Our config that PEFT's is compared with: ``config`` itself, except (IA)^3 where PEFT's defaults
    are compared with ours under ``peft_compatible=True`` (unless, on ``model``, both pick the same modules),
    and LLaMA-Adapter, where PEFT's AdaptionPrompt is what ours computes under ``peft_compatible=True``."""
    if method == "llama_adapter" and not config.peft_compatible:
        return dataclasses.replace(config, peft_compatible=True)
    if method == "ia3" and not getattr(config, "peft_compatible", True):
        compat = dataclasses.replace(config, peft_compatible=True)
        if model is not None and _ia3_modules(model, config) == _ia3_modules(model, compat):
            return config
        return compat
    return config


def _ia3_modules(model, config) -> set[tuple[str, str, bool]] | None:
    from efficientgpt.peft import ia3

    try:
        targets, feedforward = ia3.effective_targets(model, config)
        scaled = ia3.classify(model, targets, feedforward, config.layers, config.exclude)
    except UserError:
        return None
    return {(s.target.name, str(s.target.out_index), bool(s.feedforward)) for s in scaled}


def peft_config(method: str, config, model) -> tuple[Any, list[str]]:
    """PEFT's config equivalent to our ``config`` of ``method`` on ``model``, and notes on what differs."""
    import peft

    from efficientgpt.models import arch

    notes: list[str] = []
    if method == "lora":
        targets = arch.resolve(model, list(config.targets), config.layers, list(config.exclude))
        names = sorted({t.name for t in targets})
        fused = sorted({t.name.rsplit(".", 1)[-1] for t in targets if t.out_index is not None})
        if fused:
            notes.append(f"PEFT adapts the whole fused module ({', '.join(fused)}: q, k and v together); ours "
                         f"adapts only the {', '.join(config.targets)} slice(s)")
        conv1d = any(arch.is_conv1d(t.module) for t in targets)
        return peft.LoraConfig(task_type="CAUSAL_LM", r=config.rank, lora_alpha=config.alpha,
                               lora_dropout=config.dropout, target_modules=names, use_rslora=config.rslora,
                               init_lora_weights=True if config.init == "kaiming" else "gaussian",
                               fan_in_fan_out=conv1d), notes
    if method == "ia3":
        notes.append("PEFT's default (IA)^3 targets vs ours with peft_compatible=True" if config.peft_compatible
                     else "on this model the paper's (IA)^3 targets are PEFT's defaults")
        return peft.IA3Config(task_type="CAUSAL_LM"), notes
    if method == "prompt_tuning":
        init = config.init
        if init == "vocab":
            peft_init = peft.PromptTuningInit.SAMPLE_VOCAB
            notes.append("PEFT's SAMPLE_VOCAB draws from the whole vocabulary; ours from the first vocab_pool ids")
        else:
            peft_init = peft.PromptTuningInit.RANDOM
            notes.append(f"ours init={init}, PEFT RANDOM (N(0, 1))")
        return peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=config.num_virtual_tokens,
                                       prompt_tuning_init=peft_init), notes
    if method == "prefix_tuning":
        if config.dropout:
            notes.append(f"ours applies dropout {config.dropout} to the prefix; PEFT has no such option")
        return peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=config.num_virtual_tokens,
                                       prefix_projection=config.reparam, encoder_hidden_size=config.hidden), notes
    if method == "llama_adapter":
        layers = config.adapter_layers or model.config.num_hidden_layers  # None: every layer
        notes.append("PEFT's AdaptionPrompt vs ours with peft_compatible=True")
        return peft.AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=config.adapter_len,
                                         adapter_layers=layers), notes
    raise UserError(f"HF PEFT has no counterpart of {method!r} here; anchored methods: {', '.join(ANCHORED)}")


class LastPositions(nn.Module):
    """A PEFT model whose logits cover only the real tokens (prompt tuning prepends ``n`` positions)."""

    def __init__(self, peft_model: nn.Module):
        super().__init__()
        self.inner = peft_model

    def forward(self, input_ids=None, **kwargs):
        out = self.inner(input_ids=input_ids, **kwargs)
        T = input_ids.shape[1]
        if out.logits.shape[1] != T:
            out.logits = out.logits[:, -T:]  # (B, n + T, V) -> (B, T, V)
        return out

    @property
    def config(self):
        """The base model's config (evaluation reads the context length from it)."""
        return self.inner.config

    def generate(self, *args, **kwargs):
        return self.inner.generate(*args, **kwargs)


def run(method: str, config, loaded, source, train_cfg, out_dir=None, dist=None,
        fingerprint: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train PEFT's ``method`` (equivalent to our ``config``) on ``loaded.model`` exactly as :func:`tune` would.

    ``loaded.model`` is modified (it becomes the PEFT model's base); pass a copy. Returns a summary with
    the keys :func:`efficientgpt.pipeline.tune` returns for the same measurements, and ``model`` (the
    wrapped PEFT model, for generation).
    """
    import peft

    from efficientgpt.train import distributed
    from efficientgpt.train.trainer import Trainer

    dist = dist or distributed.current()
    model = loaded.model
    before = source.evaluate(model, train_cfg) if dist.is_main else None
    torch.manual_seed(train_cfg.seed)
    base_params = sum(p.numel() for p in model.parameters())
    pcfg, notes = peft_config(method, config, model)
    pm = peft.get_peft_model(model, pcfg)
    wrapped = LastPositions(pm)
    trainable = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    trainer = Trainer(wrapped, train_cfg, source.train_batches(train_cfg, dist.rank, dist.world), out_dir=out_dir,
                      eval_fn=(lambda m: source.evaluate(m, train_cfg)["loss"]) if dist.is_main else None,
                      fingerprint={**(fingerprint or {}), "peft": pcfg.to_dict()}, dist=dist)
    result = trainer.train()
    summary: dict[str, Any] = {
        "config": json_config(pcfg),
        "parameters": {"base": base_params, "total": base_params + trainable, "trainable": trainable},
        "train": result.to_dict(),
        "notes": notes,
        "model": wrapped,
    }
    if dist.is_main:
        after = source.evaluate(wrapped, train_cfg)
        summary["eval"] = {"before": before, "after": after}
        if out_dir is not None:
            pm.save_pretrained(str(Path(out_dir) / "adapter"), safe_serialization=True)
            summary["artifact_bytes"] = sum(f.stat().st_size for f in (Path(out_dir) / "adapter").glob("*.safetensors"))
    return summary


def json_config(pcfg) -> dict[str, Any]:
    """PEFT's config as plain JSON values (sets and enums become lists and strings)."""
    d = copy.deepcopy(pcfg.to_dict())
    out = {}
    for k, v in d.items():
        if isinstance(v, set):
            v = sorted(v)
        elif hasattr(v, "value"):
            v = v.value
        out[k] = v
    return out
