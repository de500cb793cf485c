"""Benchmarks: decode timing (tpot), peers (HF transformers), history, compare, plots."""
