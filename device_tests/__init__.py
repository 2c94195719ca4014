"""Validation of the device side away from the dev environment: device virtualenvs with only
the runtime's dependencies (and, in later work, ARM64 emulation and boards over SSH)."""
