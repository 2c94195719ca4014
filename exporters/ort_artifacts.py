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
from edgepeft.exporters.onnx_graph import freeze_batchnorm


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


def _loss_block(loss: str):
    """The loss ORT appends to the forward graph (output 0 of the training graph)."""
    from onnxruntime.training import artifacts, onnxblock

    if loss == "cross_entropy":
        return artifacts.LossType.CrossEntropyLoss

    class CausalLMLoss(onnxblock.Block):
        """Mean token cross-entropy of logits (B, T, V) against labels (B, T) that the data
        pipeline already shifted by one; names.IGNORE_INDEX positions are left out. ORT's
        CrossEntropyLoss block takes classes in dim 1, hence the transpose to (B, V, T)."""

        def build(self, logits_name: str) -> str:
            g = self.base.graph
            labels = onnx.helper.make_tensor_value_info(names.LABELS_INPUT, onnx.TensorProto.INT64, ["batch", "seq"])
            g.input.append(labels)
            t = "causal_lm/logits_bvt"
            g.node.append(onnx.helper.make_node("Transpose", [logits_name], [t], perm=[0, 2, 1],
                                                name="causal_lm/transpose"))
            out = "causal_lm/loss"
            # The log_prob output is declared, as ORT's own CrossEntropyLoss block does: its
            # gradient reads it, and ORT's pass that adds it when missing skips some graphs
            # (a plain embedding + linear LM failed in the gradient builder without it).
            g.node.append(onnx.helper.make_node("SoftmaxCrossEntropyLoss", [t, names.LABELS_INPUT],
                                                [out, t + "_log_prob"], reduction="mean",
                                                ignore_index=names.IGNORE_INDEX, name="causal_lm/sce"))
            return out

    if loss == "causal_lm":
        return CausalLMLoss()
    raise ExportError(f"no ORT loss for {loss!r}")


# Recurrent ops whose training kernels (GRUTraining/LSTMTraining) crash onnxruntime-training 1.19.2
# (a segfault in the first step, seen with torch's nn.GRU and nn.LSTM exports).
_RNN_OPS = frozenset({"GRU", "LSTM", "RNN"})


def check_trainable_through(forward: onnx.ModelProto, trainable: list[str]) -> None:
    """Refuse a graph whose training would need a gradient through a recurrent op."""
    live = set(trainable)
    for node in forward.graph.node:  # topologically sorted
        if not any(i in live for i in node.input):
            continue
        if node.op_type in _RNN_OPS:
            raise ExportError(
                f"the ort-training backend cannot train through the recurrent layer {node.name!r} "
                f"({node.op_type}): ONNX Runtime's {node.op_type} training kernel crashes. Export it for the portable "
                "backend (backends=('portable',)), which trains it, or train only layers after it (e.g. the head)")
        live.update(node.output)


def generate(forward: onnx.ModelProto, trainable: list[str], frozen: list[str], out_dir: Path,
             loss: str = "cross_entropy") -> dict[str, str]:
    """Build the artifacts into ``out_dir``; returns role -> bundle member name."""
    from onnxruntime.training import artifacts

    check_trainable_through(forward, trainable)
    out_dir.mkdir(parents=True, exist_ok=True)
    frozen_bn = onnx.ModelProto()
    frozen_bn.CopyFrom(forward)
    freeze_batchnorm(frozen_bn)
    with quiet_fds() as log:
        try:
            artifacts.generate_artifacts(
                frozen_bn, requires_grad=trainable, frozen_params=frozen,
                # No ORT optimizer graph: its state cannot be reset or kept per adapter, so the
                # runtime steps in numpy (edgepeft.optim) from the gradients the graph returns.
                loss=_loss_block(loss), optimizer=None,
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
