"""python -m benchmarks [NAME ...] [options]: run the comparisons (all by default), each writing
benchmarks/results/<name>.json + .md + .png.

    python -m benchmarks                      # all, Table 2 first (longest, not timing-sensitive)
    python -m benchmarks train_step --reps 3  # one, with its own options
    python -m benchmarks --tiny               # all, tiny models, a few steps (the smoke test)"""
from __future__ import annotations

import importlib
import sys

# Table 2 (accuracy) first; the timing comparisons after it, so they run as late as possible.
MODULES = ("table2", "sizes", "export_time", "swap", "train_step")
# Run by name only (real LLMs, minutes each): python -m benchmarks llm_memory --model smollm2-135m
BY_NAME = ("llm_memory", "quant_accuracy")


def main(argv: list[str]) -> None:
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        print("benchmarks:", ", ".join(MODULES + BY_NAME), "(python -m benchmarks NAME --help for options)")
        return
    if argv and argv[0] in MODULES + BY_NAME:
        importlib.import_module(f"benchmarks.{argv[0]}").main(argv[1:])
        return
    if argv and not argv[0].startswith("-"):
        sys.exit(f"unknown benchmark {argv[0]!r}; benchmarks: {', '.join(MODULES + BY_NAME)}")
    for name in MODULES:  # shared options (e.g. --tiny, --out) go to every module
        print(f"== {name}", flush=True)
        importlib.import_module(f"benchmarks.{name}").main(list(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
