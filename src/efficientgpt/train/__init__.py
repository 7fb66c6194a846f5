"""The one training loop (:class:`~efficientgpt.train.trainer.Trainer`), its checkpoints and DDP."""

from efficientgpt.train.trainer import TrainConfig, Trainer, TrainResult

__all__ = ["TrainConfig", "Trainer", "TrainResult"]
