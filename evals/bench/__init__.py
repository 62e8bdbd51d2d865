"""Benchmarks (``sae-gba bench``)."""
