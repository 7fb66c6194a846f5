"""Benchmarking: measurement of time and memory (:mod:`.measure`)."""
