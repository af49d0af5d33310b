"""Benchmarks behind `biformer bench`: the BRA op per backend, and whole models against timm peers."""
