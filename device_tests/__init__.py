"""Validation of the device side away from the dev environment: device-like virtualenvs
(venv.py), the scenario on emulated ARM64 boards (armemu.py), under a device's memory cap, and
on real boards over SSH (targets.py, ssh.py), compared with this host (parity.py).
``python -m device_tests run --target TARGET --bundle B``."""
