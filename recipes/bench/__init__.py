"""Benchmarks and studies of the optimizers, each beside the results it made."""
