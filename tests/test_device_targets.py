"""device_tests: the device scenario on an emulated ARM64 board (qemu, the device's CPU model),
under the device's real memory cap (cgroup v1), and on a "board" over SSH (a loopback sshd),
each compared with this host's run of the same bundle and seed.

`make test` runs the emulated Raspberry Pi 4 parity check (tiny encoder, 3 steps); the rest
is marked `device` and runs with `make device-test` (EDGEPEFT_DEVICE_TESTS=1): the emulated
Pi 5, MiniLM on capped:rpi4-2gb and under a cap below its predicted need, and SSH."""
from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgepeft import devices, memory_model
from edgepeft.adapters import AdapterStore
from edgepeft.bundle import read_manifest
from edgepeft.errors import SpecError
from edgepeft.runtime import scenario as scenario_mod
from edgepeft.specs import LoraSpec

from device_tests import parity, runner, scenarios
from device_tests import targets as T
from device_tests.__main__ import main as cli

DEVICE_RUN = os.environ.get("EDGEPEFT_DEVICE_TESTS") == "1"
device_only = [pytest.mark.device,
               pytest.mark.skipif(not DEVICE_RUN, reason="long device campaign: `make device-test` runs it")]
linux_x86 = pytest.mark.skipif(sys.platform != "linux" or platform.machine() != "x86_64",
                               reason="qemu user-mode emulation of ARM64 is set up for x86_64 Linux hosts")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """The tiny encoder with the portable graph only: targets have plain onnxruntime."""
    from edgepeft.exporters import export_bundle, load_model

    out = tmp_path_factory.mktemp("device-tiny") / "tiny.edgepeft"
    return export_bundle(load_model("tiny-encoder", labels=("neg", "pos")),
                         methods=[LoraSpec(rank=4, modules_to_save=("classifier",))], out=out,
                         backends=("portable",)).path


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    from device_tests.venv import build_wheel

    return build_wheel(tmp_path_factory.mktemp("wheel"))


# -- fast checks ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec, kind, extra", [
    ("host", "host", {}),
    ("emu:rpi4-2gb", "emu", {"qemu": "cortex-a72"}),
    ("emu:rpi5-4gb", "emu", {"qemu": "cortex-a76"}),
    ("capped:rpi4-2gb", "capped", {"budget": devices.get("rpi4-2gb").budget}),
    ("ssh://pi@board.local:2222", "ssh", {"address": "pi@board.local", "port": 2222}),
    ("ssh://pi@board.local", "ssh", {"port": 22}),
])
def test_targets_parse(spec, kind, extra):
    t = T.parse(spec)
    assert t.kind == kind
    if "qemu" in extra:
        assert t.device.qemu_cpu == extra["qemu"]
    if "budget" in extra:
        assert t.device.budget == extra["budget"]
    if "address" in extra:
        assert t.address == extra["address"]
    if "port" in extra:
        assert t.port == extra["port"]


@pytest.mark.parametrize("spec, says", [
    ("board", "use host, emu:<device>"),
    ("emu:nokia-3310", "unknown device"),
    ("emu:host", "no ARM64 CPU model"),
    ("ssh://", "cannot read SSH target"),
])
def test_bad_targets_say_what_to_do(spec, says):
    with pytest.raises(SpecError, match=says):
        T.parse(spec)


def test_scenario_report_on_the_host(tiny, tmp_path):
    """The report a target sends back: what was run, losses, outputs, timings, memory, platform."""
    r = scenario_mod.run(tiny, steps=3, seed=0, batch=2, seq=16, store=tmp_path / "store", cache_dir=tmp_path / "c")
    assert r["backend"] == "portable" and len(r["losses"]) == 3 and r["losses"][-1] < r["losses"][0]
    assert r["swap_restored"] is True and r["eval"]["second"] != r["eval"]["back"]
    assert r["outputs"]["shape"] == [2, 2] and len(r["seconds"]["train_step"]) == 3
    assert r["peak_rss"] > 0 and r["platform"]["machine"] == platform.machine()
    # The adapter it saved is in the store, intact.
    store = AdapterStore(tmp_path / "store", read_manifest(tiny))
    assert store.load("scenario")[1]["steps"] == 3
    # Same seed, same numbers (a fresh process would give the same: inputs are synthetic by seed).
    again = scenario_mod.run(tiny, steps=3, seed=0, batch=2, seq=16, cache_dir=tmp_path / "c")
    assert again["losses"] == r["losses"] and again["outputs"]["sha256"] == r["outputs"]["sha256"]


def test_scenario_refused_by_the_memory_model_prints_the_error(tiny, capsys):
    assert scenario_mod.main([str(tiny), "--memory-budget", "1KB", "--json"]) == 2
    out = json.loads(capsys.readouterr().out)
    assert out["type"] == "MemoryBudgetError" and "budget" in out["error"]


def test_parity_lists_each_difference(tiny, tmp_path):
    host = scenario_mod.run(tiny, steps=2, seed=0, batch=2, seq=16, cache_dir=tmp_path)
    assert parity.compare(host, host).ok
    bad = json.loads(json.dumps(host))
    bad["losses"][1] += 1e-3
    bad["outputs"]["values"][0][1] += 1e-2
    p = parity.compare(bad, host)
    assert not p.ok and p.max_output_diff == pytest.approx(1e-2, rel=1e-3)
    assert any(d.startswith("loss[1]:") for d in p.diffs) and any(d.startswith("outputs: max diff") for d in p.diffs)


# -- emulated ARM64 boards -----------------------------------------------------------------------------
def _emulator_or_skip(cpu: str) -> None:
    """Build (or reuse) the emulated Python; skip with the reason when its parts cannot be had."""
    from device_tests import armemu

    try:
        armemu.build(cpu)
    except armemu.EmulatorUnavailable as e:
        pytest.skip(f"emulated board unavailable (`make test` needs only the package registries: Debian's "
                    f"qemu-user-static and arm64 python3.11, PyPI's aarch64 wheels): {e}")


def test_an_emulator_that_cannot_be_had_is_said_so(monkeypatch, tmp_path):
    """No qemu and no way to install it, or a registry that cannot be reached: EmulatorUnavailable
    (the emulated test skips with its message); other failures stay errors."""
    from device_tests import armemu
    from edgepeft.errors import BackendError

    monkeypatch.setenv("EDGEPEFT_ARMEMU_DIR", str(tmp_path))
    monkeypatch.setattr(armemu.shutil, "which", lambda name: None)
    monkeypatch.setattr(armemu.os, "geteuid", lambda: 1000)
    with pytest.raises(armemu.EmulatorUnavailable, match="qemu-aarch64-static is missing"):
        armemu.build("cortex-a72")
    monkeypatch.setattr(armemu, "ensure_qemu", lambda: Path("/bin/true"))
    monkeypatch.setattr(armemu.subprocess, "run", lambda cmd, **kw: subprocess_result(cmd, 100, "no network"))
    with pytest.raises(armemu.EmulatorUnavailable, match="cannot fetch .* no network"):
        armemu.build("cortex-a72")
    with pytest.raises(BackendError) as e:
        armemu._run(["dpkg", "-x", "a.deb", "b"])
    assert not isinstance(e.value, armemu.EmulatorUnavailable)


def subprocess_result(cmd, code: int, stderr: str):
    import subprocess

    return subprocess.CompletedProcess(cmd, code, "", stderr)


def _cli_run(*args: str) -> dict:
    res = CliRunner().invoke(cli, ["run", *args, "--json"], catch_exceptions=False)
    assert res.exit_code in (0, 1), res.output
    return json.loads(res.output.strip().splitlines()[-1])


@linux_x86
@pytest.mark.device
@pytest.mark.parametrize("device", [
    "rpi4-2gb",
    pytest.param("rpi5-4gb", marks=device_only),
])
def test_emulated_board_matches_the_host(tiny, device):
    """The scenario on an aarch64 Python under qemu (the device's CPU model, plain onnxruntime
    from PyPI's aarch64 wheels) gives the host's losses and outputs. Where qemu, Debian's arm64
    packages or the aarch64 wheels cannot be had, it skips and says which (not a pass)."""
    _emulator_or_skip(devices.get(device).qemu_cpu)
    out = _cli_run("--target", f"emu:{device}", "--bundle", str(tiny), "--scenario", "smoke")
    target = out["target"]
    print(f"\nemu:{device}: parity {out['parity']['ok']}, max loss diff {out['parity']['max_loss_diff']:.3g}, "
          f"max output diff {out['parity']['max_output_diff']:.3g}; emulated wall {target['wall_seconds']:.1f} s "
          f"(sysroot ready in {target['details'].get('sysroot_ready_seconds')} s)")
    assert target["outcome"] == "completed", target.get("stderr_tail")
    rep = target["report"]
    assert rep["platform"]["machine"] == "aarch64"
    part = {"cortex-a72": "0xd08", "cortex-a76": "0xd0b"}[devices.get(device).qemu_cpu]
    assert rep["platform"]["cpu_part"] == part
    assert rep["backend"] == "portable" and rep["swap_restored"] is True
    assert out["host"]["report"]["platform"]["machine"] == "x86_64"
    assert out["parity"]["ok"], out["parity"]["diffs"]
    assert out["ok"]
    # Emulated timings and memory are labelled as such (never device figures).
    assert target["figures"].startswith("emulated") and "never device figures" in target["figures"]


# -- memory caps (MiniLM) ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def minilm(tmp_path_factory) -> Path:
    from edgepeft.exporters import export_bundle, load_model

    out = tmp_path_factory.mktemp("device-minilm") / "minilm.edgepeft"
    return export_bundle(load_model("minilm", labels=("business", "sport", "tech")),
                         methods=[LoraSpec(rank=8, alpha=16, targets=("query", "value"),
                                           modules_to_save=("classifier",))],
                         out=out, backends=("portable",)).path


@pytest.mark.device
@pytest.mark.skipif(not DEVICE_RUN, reason="long device campaign: `make device-test` runs it")
@pytest.mark.skipif(not Path("/sys/fs/cgroup/memory").is_dir(), reason="needs the cgroup v1 memory controller")
def test_minilm_under_device_caps(minilm, tmp_path):
    """capped:rpi4-2gb survives and matches the host; under a cap below the predicted need the
    memory model refuses it before allocating (with a budget) or the kernel kills it (without),
    and the adapter saved before is intact either way."""
    store = tmp_path / "store"
    sc = scenarios.get("standard")
    ok = runner.run(T.parse("capped:rpi4-2gb"), minilm, sc, store=store)
    print("\n" + runner.summary(ok))
    assert ok.run.outcome == "completed", ok.run.stderr_tail
    assert ok.parity.ok, ok.parity.diffs
    d = ok.run.details
    assert d["cap_method"] == "cgroup-v1" and d["predicted_fits"] and d["as_predicted"]
    assert d["max_usage_bytes"] <= d["cap_bytes"]
    saved_sha = ok.run.report["saved"]["weights_sha256"]

    predicted = d["predicted_peak_bytes"]
    low = int(predicted * 0.6) // 2**20 * 2**20
    assert low < d["max_usage_bytes"], "the low cap must be below what the run really used"
    refused = runner.run_target(T.parse("capped:rpi4-2gb"), minilm, sc, cap=low, memory_budget=str(low), store=store)
    print(f"cap {low / 2**20:.0f} MiB with budget: {refused.outcome} ({refused.refused}); "
          f"peak {refused.details['max_usage_bytes'] / 2**20:.0f} MiB")
    assert refused.outcome == "refused" and "MemoryBudgetError" in refused.refused and not refused.killed
    assert refused.details["as_predicted"] and not refused.details["predicted_fits"]

    killed = runner.run_target(T.parse("capped:rpi4-2gb"), minilm, sc, cap=low, store=store)
    print(f"cap {low / 2**20:.0f} MiB without budget: {killed.outcome} (exit {killed.returncode}); "
          f"peak {killed.details['max_usage_bytes'] / 2**20:.0f} MiB")
    assert killed.outcome == "killed" and killed.killed and killed.details["as_predicted"]

    # Nothing saved was corrupted: the adapter of the first run loads, with its weights and steps.
    from edgepeft.fsutil import sha256_file

    st = AdapterStore(store, read_manifest(minilm))
    tensors, meta = st.load("scenario")
    assert meta["steps"] == sc.steps and st.load_optimizer("scenario") is not None
    assert sha256_file(st.folder("scenario") / "adapter_model.safetensors") == saved_sha
    assert st.names() == ["scenario"]
    assert memory_model.predict(read_manifest(minilm), backend="portable", batch=sc.batch).peak == predicted


# -- a board over SSH ------------------------------------------------------------------------------------
@pytest.mark.device
@pytest.mark.skipif(not DEVICE_RUN, reason="long device campaign: `make device-test` runs it")
@pytest.mark.skipif(os.geteuid() != 0, reason="starts sshd on loopback with root login by a throwaway key")
def test_board_over_ssh(tiny, wheel, tmp_path):
    """ssh://root@127.0.0.1:PORT: the wheel and bundle are copied, the board's python3 makes a
    venv with the device dependencies from PyPI, runs the scenario, and the report comes back."""
    from device_tests.ssh import SshOptions
    from device_tests.sshd import loopback_sshd

    with loopback_sshd(tmp_path / "sshd") as board:
        res = runner.run(T.parse(board.target), tiny, scenarios.get("smoke"), wheel=wheel,
                         ssh=SshOptions(board.identity, str(tmp_path / "board"), trust_new_hosts=True))
    print("\n" + runner.summary(res))
    assert res.run.outcome == "completed", res.run.stderr_tail
    assert res.parity.ok, res.parity.diffs
    assert res.run.details["python"].endswith("venv/bin/python")
    rep = res.run.report
    assert rep["backend"] == "portable" and rep["swap_restored"]
    # The board ran plain onnxruntime from PyPI, not the host's training build.
    assert rep["platform"]["onnxruntime"] != res.host.report["platform"]["onnxruntime"]


@pytest.mark.device
@pytest.mark.skipif(not DEVICE_RUN, reason="long device campaign: `make device-test` runs it")
@pytest.mark.skipif(not Path("/sys/fs/cgroup/memory").is_dir(), reason="needs the cgroup v1 memory controller")
def test_smollm2_lean_trains_inside_a_pi_zero(tmp_path):
    """SmolLM2-135M, LoRA r8 q/v, batch 4 x 128 on the lean backend: predicted and measured to
    fit the Pi Zero 2 W's 320 MiB, and the whole run survives under that hard cap."""
    import json
    import subprocess

    from edgepeft.exporters import export_bundle, load_model
    from edgepeft.specs import LoraSpec

    bundle = tmp_path / "lm.edgepeft"
    export_bundle(load_model("smollm2-135m", max_length=128), methods=[LoraSpec(rank=8, alpha=16,
                  targets=("q_proj", "v_proj"))], out=bundle, backends=("lean",))
    out = subprocess.run([sys.executable, "-m", "edgepeft.cli", "profile", str(bundle), "--device", "rpi-zero-2w",
                          "--enforce", "--backend", "lean", "--batch", "4", "--seq", "128", "--threads", "2", "--json"],
                         capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout)
    pi = next(d for d in report["devices"] if d["name"] == "rpi-zero-2w")
    assert pi["fits"] and pi["enforce"]["survived"] and not pi["enforce"]["oom_killed"], pi
    assert max(report["measured"]["phases"][p] for p in ("train_step", "evaluate", "infer")) <= 320 * 2**20
