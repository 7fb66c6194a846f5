"""The one training loop (:class:`~efficientgpt.train.trainer.Trainer`), its config, checkpoints and DDP."""
