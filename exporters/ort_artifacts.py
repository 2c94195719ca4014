"""ONNX Runtime on-device training artifacts (training/eval/optimizer models + checkpoint)."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

import onnx

from edgepeft import names
from edgepeft.errors import ExportError


@contextlib.contextmanager
def quiet_fds() -> Iterator[Path]:
    """Send fd 1/2 to a log file: ORT's artifact builder prints thousands of `[I:onnxruntime`
    lines that no logger setting silences. The log is shown if the build fails."""
    log = Path(tempfile.mkstemp(prefix="edgepeft-ort-", suffix=".log")[1])
    saved = [os.dup(1), os.dup(2)]
    fd = os.open(log, os.O_WRONLY | os.O_TRUNC)
    try:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        yield log
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for f in (*saved, fd):
            os.close(f)


def generate(forward: onnx.ModelProto, trainable: list[str], frozen: list[str], out_dir: Path) -> dict[str, str]:
    """Build the artifacts into ``out_dir``; returns role -> bundle member name."""
    from onnxruntime.training import artifacts

    out_dir.mkdir(parents=True, exist_ok=True)
    with quiet_fds() as log:
        try:
            artifacts.generate_artifacts(
                forward, requires_grad=trainable, frozen_params=frozen,
                # No ORT optimizer graph: its state cannot be reset or kept per adapter, so the
                # runtime steps in numpy (edgepeft.optim) from the gradients the graph returns.
                loss=artifacts.LossType.CrossEntropyLoss, optimizer=None,
                artifact_directory=str(out_dir), additional_output_names=[names.LOGITS_OUTPUT],
            )
            ok = True
        except Exception as e:  # ORT raises bare RuntimeError/IndexError from its C++ builder
            ok, err = False, e
    text = log.read_text(errors="replace")
    log.unlink()
    if not ok:
        tail = "\n".join(text.splitlines()[-15:])
        raise ExportError(f"ONNX Runtime could not build the training artifacts: {err}\n{tail}")
    roles = {"training_model": names.ORT_TRAINING_MODEL, "eval_model": names.ORT_EVAL_MODEL,
             "checkpoint": names.ORT_CHECKPOINT}
    for member in roles.values():
        if not (out_dir.parent / member).is_file():
            raise ExportError(f"ONNX Runtime did not write {member}")
    return roles
