"""Runnable examples of on-device personalization loops on real models and data, offline.
Each is one command: ``python -m examples.<name>`` (``--smoke`` for a seconds-long run)."""
