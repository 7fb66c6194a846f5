"""Post-training compression: calibration (:mod:`.calibration`), pruning, low-rank decomposition,
quantization, and saving/loading rewritten models (:mod:`.io`)."""
