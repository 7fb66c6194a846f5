"""T-Few: (IA)^3 trained with T-Few's losses and scored by rank classification (Liu et al., NeurIPS 2022).

From "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning"
(Liu, Tam, Muqeeth, Mohta, Huang, Bansal and Raffel, NeurIPS 2022), §3.2-3.5. The recipe:

* the parameters are (IA)^3's (§3.3): learned vectors ``l_k``, ``l_v``, ``l_ff`` rescaling keys,
  values and the FFN activation, initialised to ones; this delta *is* :class:`~efficientgpt.peft.ia3.IA3Delta`
  (same tensors, hooks, exact merging), registered under its own name with its own config;
* the objective is ``L = L_LM + L_UL + L_LN`` (§3.2): the gold answer's cross-entropy, unlikelihood
  on the wrong answer options (Eq. 2) and a softmax over the options of their length-normalised
  log-probabilities (Eq. 3); :mod:`efficientgpt.train.tfew_losses` implements them for the shared
  :class:`~efficientgpt.train.trainer.Trainer` and :meth:`TFewDelta.training_objective` hands them,
  with batches holding every option of each example, to :func:`efficientgpt.pipeline.tune`;
* prediction is rank classification (§3.2): the option with the lowest length-normalised NLL wins,
  which is how the task suite scores every choice task (:func:`efficientgpt.eval.tasks.rank_classify`).

``losses`` picks any subset of lm, ul, ln with a weight each (the paper: all three, weights 1).
Training data must be a task (``--data task:NAME``, few-shot ``task:NAME@K``); on plain text, which has
no answer options, only ``L_LM`` applies (the run warns), and without ``lm`` it is refused.

Departures from the paper and the official code (github.com/r-three/t-few):

* The base model is a decoder-only causal LM, not T0 (an encoder-decoder); the prompt is read once
  per option. On rotary models ``l_k`` scales the keys before the rotary embedding (see
  :mod:`efficientgpt.peft.ia3`).
* Not implemented: pre-training the (IA)^3 vectors on the P3 multitask mixture (§3.4) before
  few-shot fine-tuning; the vectors start at ones. The optimizer is the Trainer's AdamW, not
  Adafactor (the paper: lr 3e-3, batch 8, 1000 steps).
* ``ul_epsilon`` (default 0.01) is the official code's ``log(1 - p + 0.01)``; the paper's Eq. 2 has
  no constant (``ul_epsilon=0``).

Measured on ``embedded:tiny`` (CPU), ``task:code_or_prose@32``, 30 steps of batch 8 at lr 0.5, first 100
validation examples: rank-classification accuracy 0.70 (the label prior) -> 0.88, 0.88, 0.84 for
training seeds 0, 1, 2 with all three losses; 0.85, 0.70, 0.73 with ``L_LM`` alone; 0.96, 0.90, 0.92 with
``L_LN`` alone (``tests/test_tfew.py`` checks seed 0 with all three).
"""

from __future__ import annotations

import dataclasses

from efficientgpt import registry
from efficientgpt.config import field
from efficientgpt.errors import ConfigError
from efficientgpt.peft import core
from efficientgpt.peft.ia3 import IA3Config, IA3Delta
from efficientgpt.train import tfew_losses


@dataclasses.dataclass
class TFewConfig(IA3Config):
    """T-Few (Liu et al., 2022): (IA)^3's vectors and which of the paper's losses train them."""

    losses: list[str] = field(list(tfew_losses.LOSSES), "training losses, a subset of lm (gold answer "
                              "cross-entropy), ul (unlikelihood of wrong options, Eq. 2) and ln (softmax over "
                              "length-normalised option scores, Eq. 3); the paper uses all three",
                              choices=tfew_losses.LOSSES)
    lm_weight: float = field(1.0, "weight of L_LM in the total loss", minimum=0.0)
    ul_weight: float = field(1.0, "weight of L_UL in the total loss", minimum=0.0)
    ln_weight: float = field(1.0, "weight of L_LN in the total loss", minimum=0.0)
    ul_epsilon: float = field(tfew_losses.UL_EPSILON, "constant inside L_UL's log(1 - p + ε) (the official "
                              "code's 0.01; 0 is Eq. 2 as printed)", minimum=0.0, maximum=1.0)

    def validate(self) -> None:
        if isinstance(self.losses, str):
            self.losses = [t.strip() for t in self.losses.split(",") if t.strip()]
        self.losses = list(self.losses)
        super().validate()
        if not self.losses or len(set(self.losses)) != len(self.losses):
            raise ConfigError(f"TFewConfig.losses = {self.losses!r}: give each of {', '.join(tfew_losses.LOSSES)} "
                              "at most once, at least one")
        if all(self.weights[k] == 0 for k in self.losses):
            raise ConfigError(f"TFewConfig: every chosen loss ({', '.join(self.losses)}) has weight 0, so nothing "
                              "would train; give one of them a positive weight")

    @property
    def weights(self) -> dict[str, float]:
        return {"lm": self.lm_weight, "ul": self.ul_weight, "ln": self.ln_weight}


class TFewDelta(IA3Delta):
    """(IA)^3's vectors; :meth:`training_objective` supplies T-Few's batches and losses to the trainer."""

    method = "tfew"
    mergeable = True

    def training_objective(self, source, train_config, rank: int = 0, world: int = 1):
        """``(train_batches, loss_fn)`` for the Trainer on data ``source`` (see :mod:`tfew_losses`)."""
        cfg: TFewConfig = self.config
        return tfew_losses.objective(source, cfg.losses, cfg.weights, cfg.ul_epsilon, train_config, rank, world)

    def make_loss(self):
        """The configured weighted sum of T-Few's losses, for batches of :mod:`tfew_losses`."""
        cfg: TFewConfig = self.config
        return tfew_losses.tfew_loss(cfg.losses, cfg.weights, cfg.ul_epsilon)


def apply(model, config: TFewConfig, name: str = "default") -> TFewDelta:
    return core.apply(model, TFewDelta, config, name)


SPEC = registry.register(registry.MethodSpec(
    name="tfew", family="peft", config_cls=TFewConfig, apply=apply, paper="t-few",
    summary="(IA)^3 trained with T-Few's unlikelihood and length-normalised losses, rank classification "
            "(Liu et al., NeurIPS 2022)",
    mergeable=True,
))
