"""Benchmarks: each comparison runs its alternatives side by side in one run, each in its own
process, and writes JSON + a markdown table to benchmarks/results/."""
