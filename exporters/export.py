"""export_bundle: PyTorch model -> PEFT injection -> int8 frozen ONNX -> each backend's training
graph + inference model + initial adapter -> one bundle file. The stages themselves are in
``edgepeft.exporters.pipeline``; this is the entry point that runs them."""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import torch
import torch.nn as nn

from edgepeft.exporters import pipeline
from edgepeft.exporters.options import ExportOptions
from edgepeft.exporters.peft import Trainable
from edgepeft.exporters.zoo import ModelSource
from edgepeft.manifest import Manifest
from edgepeft.specs import MethodSpec


@dataclass
class ExportResult:
    path: Path
    manifest: Manifest
    # The injected eager model with exactly the bundle's weights (int8 ones dequantized): the
    # reference that runtime parity is checked against.
    reference: nn.Module
    trainables: list[Trainable]


def export_bundle(
    model: nn.Module | ModelSource,
    example_inputs: dict[str, torch.Tensor] | None = None,
    *,
    methods: Sequence[MethodSpec],
    out: str | Path,
    loss: Literal["cross_entropy", "causal_lm"] | None = None,
    quant: Literal["int8", "none"] = "int8",
    labels: Sequence[str] | None = None,
    tokenizer_json: str | None = None,
    max_length: int = 128,
    dynamic_axes: dict[str, dict[int, str]] | None = None,
    name: str | None = None,
    init_adapter: str | Path | None = None,
    backends: Sequence[str] | None = None,
    sign_key: str | Path | None = None,
    executorch_batch_size: int = 8,
) -> ExportResult:
    """Export ``model`` with ``methods`` injected into the bundle file ``out``.

    Args:
        model (nn.Module | ModelSource): an eager module, or a zoo ``ModelSource`` (which
            carries its example inputs, labels, tokenizer, task and axes: the options marked
            "plain module" below are then not used).
        example_inputs (dict[str, torch.Tensor] | None): with a plain module, input name ->
            example tensor, in forward's argument order. Required for a plain module.
        methods (Sequence[MethodSpec]): the PEFT methods to inject, e.g. ``[LoraSpec(rank=8)]``.
        out (str | Path): the bundle file to write.
        loss (str | None): "cross_entropy" or "causal_lm"; None: the one the model's task
            implies. For a plain module the loss chooses the task: "causal_lm" trains a
            next-token model returning (batch, seq, vocab) logits on token-id labels that the
            data pipeline shifted by one (no tokenizer needed). Default: None.
        quant (str): "int8" stores frozen 2-D weights as int8 + per-row scale; "none" keeps
            fp32. Default: "int8".
        labels (Sequence[str] | None): plain module: class names (default "0".."n-1").
        tokenizer_json (str | None): plain module: a tokenizer.json text to ship.
        max_length (int): plain module: the longest sequence. Default: 128.
        dynamic_axes (dict[str, dict[int, str]] | None): plain module: input name ->
            {axis: symbolic name}. Default: the batch axis (and the sequence axis of a causal LM).
        name (str | None): plain module: the model's name in the manifest (default: its class).
        init_adapter (str | Path | None): a PEFT adapter folder (e.g. trained on a host with
            HF PEFT) whose values become the bundle's initial adapter.
        backends (Sequence[str] | None): training graphs to write: "ort-training" (ONNX
            Runtime's training artifacts), "portable" (a standard ONNX gradient graph for any
            onnxruntime), "executorch" (training + XNNPACK inference programs; never by
            default: its export is slow). None writes ort-training and portable, leaving out
            (with a warning) a portable graph the model cannot be turned into. Default: None.
        sign_key (str | Path | None): a private key from ``edgepeft keygen``; the bundle then
            carries an ed25519 signature over its manifest, which devices check with
            ``Session.open(..., trusted_keys=...)``.
        executorch_batch_size (int): the rows the ExecuTorch programs are built for (the
            runtime pads smaller batches and splits larger ones). Default: 8.

    Returns:
        ExportResult: the bundle's path and manifest, the injected eager reference model and
        its trainable tensors.

    Raises:
        SpecError: an option or method spec is invalid.
        ExportError: the model cannot be exported (the message says which stage failed).
    """
    options = ExportOptions(loss=loss, quant=quant, labels=labels, tokenizer_json=tokenizer_json,
                            max_length=max_length, dynamic_axes=dynamic_axes, name=name, init_adapter=init_adapter,
                            backends=backends, sign_key=sign_key, executorch_batch_size=executorch_batch_size)
    plan = pipeline.validate_plan(model, example_inputs, methods, options)
    injected = pipeline.inject_and_quantize(plan)
    with tempfile.TemporaryDirectory(prefix="edgepeft-export-") as tmp_s:
        tmp = Path(tmp_s)
        forward = pipeline.export_forward(injected, tmp)
        targets = pipeline.build_targets(injected, forward, tmp)
        manifest = pipeline.build_manifest(injected, forward, targets)
        manifest = pipeline.write_bundle(Path(out), manifest, injected=injected, targets=targets, tmp=tmp)
    return ExportResult(Path(out), manifest, injected.model, list(injected.trainables))
