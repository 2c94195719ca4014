"""The ExecuTorch backend on an emulated ARM64 board (qemu user mode, Cortex-A72): the native
runner cross-built against the aarch64 executorch wheel's own libraries, five training steps on
a tiny-encoder bundle, losses and logits against the same steps on this x86_64 host. Parity
only: emulation says nothing about speed or memory.

    edgepeft export --model tiny-encoder --backend executorch --out out/bench/tiny-executorch.edgepeft
    python -m benchmarks.executorch_arm64 --bundle out/bench/tiny-executorch.edgepeft
    edgepeft export --model tiny-encoder --backend executorch-lean --out out/bench/tiny-executorch-lean.edgepeft
    python -m benchmarks.executorch_arm64 --bundle out/bench/tiny-executorch-lean.edgepeft --backend executorch-lean \
        --out benchmarks/results/executorch_lean

Needs aarch64-linux-gnu-g++ (Debian's g++-aarch64-linux-gnu) and the registry (the aarch64
executorch==1.5.1 wheel, the emulated Python of device_tests.armemu)."""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from benchmarks.common import RESULTS, Run, md_table

NAME = "executorch_arm64"
# Run by both interpreters: the device loop, printing what the comparison needs.
STEPS = """
import json, platform, sys
from edgepeft.runtime import Example, OptimizerSpec, Session
s = Session.open(sys.argv[1], adapter="arm", store=sys.argv[2], cache_dir=sys.argv[3], backend=sys.argv[4],
                 threads=1, optimizer=OptimizerSpec(lr=1e-2))
b = s.encoder.batch([Example(t, l) for t, l in [("good film", "pos"), ("bad plot", "neg"), ("great story", "pos"),
                                               ("awful acting", "neg"), ("fine", "pos"), ("meh", "neg")]])
losses = [s.train_step(b) for _ in range(5)]
print(json.dumps({"machine": platform.machine(), "losses": losses, "logits": s.infer(b.feeds).tolist(),
                  "torch": "torch" in sys.modules, "executorch": "executorch" in sys.modules}))
"""


def _aarch64_executorch(work: Path) -> Path:
    """lib/ and include/ of the aarch64 executorch wheel (the version installed here)."""
    from importlib.metadata import version

    v = version("executorch")
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--platform",
                    "manylinux_2_28_aarch64", "--python-version", "3.11", f"executorch=={v}", "-d", str(work)],
                   check=True)
    wheel = next(work.glob(f"executorch-{v}-*aarch64.whl"))
    with zipfile.ZipFile(wheel) as z:
        z.extractall(work / "x", [n for n in z.namelist() if n.startswith(("executorch/lib/", "executorch/include/"))])
    return work / "x" / "executorch"


def _run(cmd: list[str], env: dict | None = None) -> dict:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"{cmd[0]} exited {r.returncode}: {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> Path:
    from device_tests import armemu

    ap = argparse.ArgumentParser(prog="python -m benchmarks.executorch_arm64")
    ap.add_argument("--bundle", type=Path, required=True, help="a bundle with the executorch backend")
    ap.add_argument("--backend", default="executorch", choices=["executorch", "executorch-lean"])
    ap.add_argument("--out", type=Path, default=RESULTS / "executorch")
    a = ap.parse_args(argv)
    run = Run(NAME, argv)
    work = Path(tempfile.mkdtemp(prefix="et-arm64-"))
    et = _aarch64_executorch(work)
    env = dict(os.environ, CXX="aarch64-linux-gnu-g++", EDGEPEFT_EXECUTORCH_DIR=str(et),
               EDGEPEFT_NATIVE_CACHE=str(work / "native"))
    runner = subprocess.run([sys.executable, "-m", "edgepeft.runtime.native.build"], env=env, check=True,
                            capture_output=True, text=True).stdout.strip()
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(work / "whl"), str(Path(__file__).resolve().parents[1])], check=True)
    py = armemu.build("cortex-a72", wheel=next((work / "whl").glob("*.whl")))
    (work / "steps.py").write_text(STEPS)
    args = [str(work / "steps.py"), str(a.bundle)]
    host = _run([sys.executable, *args, str(work / "host-store"), str(work / "host-cache"), a.backend])
    arm = _run(py.command(*args, str(work / "arm-store"), str(work / "arm-cache"), a.backend),
               env={**py.env(), "EDGEPEFT_ET_RUNNER": runner})
    diff = {"loss": max(abs(x - y) for x, y in zip(host["losses"], arm["losses"])),
            "logits": max(abs(x - y) for hr, ar in zip(host["logits"], arm["logits"]) for x, y in zip(hr, ar))}
    md = md_table(["", "machine", "losses (5 steps)", "torch / executorch imported"],
                  [[k, r["machine"], " ".join(f"{x:.6f}" for x in r["losses"]), f"{r['torch']} / {r['executorch']}"]
                   for k, r in (("host", host), ("emulated Cortex-A72", arm))])
    md += (f"\n\nLargest difference, host vs emulated: loss {diff['loss']:.2e}, logits {diff['logits']:.2e}. The "
           f"runner was cross-built ({runner}) against the aarch64 executorch wheel's lib/ and include/; "
           f"host {platform.machine()}.")
    out = run.write({"backend": a.backend, "host": host, "arm64": arm, "max_abs_diff": diff}, md, a.out)
    print(md)
    return out


if __name__ == "__main__":
    main()
