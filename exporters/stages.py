"""The records the export stages hand each other (``edgepeft.exporters.pipeline``), one type
per stage so that no step can run on the output of the wrong one:

    ExportPlan -> InjectedModel -> ForwardGraph -> {backend: BackendTarget} -> Manifest
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import torch
import torch.nn as nn

from edgepeft.exporters.options import CAUSAL_LM, ExportOptions
from edgepeft.exporters.peft import Trainable
from edgepeft.exporters.quantize import QuantizedTensor
from edgepeft.exporters.zoo import ModelSource
from edgepeft.specs import MethodSpec


@dataclass(frozen=True)
class ExportPlan:
    """What to export, checked: the model and its example inputs, the methods, the options and
    the loss they resolve to."""

    source: ModelSource
    methods: tuple[MethodSpec, ...]
    options: ExportOptions
    loss: str
    # Width of the model's output's last axis (labels, or the vocabulary of a causal LM).
    output_width: int

    @property
    def causal(self) -> bool:
        return self.source.task == CAUSAL_LM

    @property
    def backends(self) -> tuple[str, ...]:
        return self.options.export_backends

    @property
    def what(self) -> str:
        """The model and its methods, for error messages."""
        return f"{self.source.name} with {'+'.join(m.method for m in self.methods)}"


@dataclass(frozen=True)
class InjectedModel:
    """The plan's model, copied, with the methods injected (``model``: exactly the bundle's
    weights, int8 ones dequantized: the reference runtime parity is checked against)."""

    plan: ExportPlan
    model: nn.Module
    trainables: tuple[Trainable, ...]
    # Frozen weights stored as int8 (empty with quant="none").
    quantized: dict[str, QuantizedTensor]
    source_sha256: str
    base_params: int

    @property
    def trainable_names(self) -> list[str]:
        return [t.name for t in self.trainables]

    @property
    def example_inputs(self) -> dict[str, torch.Tensor]:
        return self.plan.source.example_inputs

    @property
    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return self.plan.source.dynamic_axes

    def example_labels(self) -> torch.Tensor:
        """Labels fitting the example inputs (a token per position for a causal LM)."""
        first = next(iter(self.example_inputs.values()))
        if self.plan.causal:
            return torch.ones(first.shape[:2], dtype=torch.int64)
        return torch.zeros(first.shape[0], dtype=torch.int64)


@dataclass(frozen=True)
class ForwardGraph:
    """The exported ONNX forward graph (int8 frozen weights, trainable tensors as named
    initializers) and what was measured on it."""

    model: onnx.ModelProto
    frozen: tuple[str, ...]
    # The manifest's memory card (edgepeft.memory_model).
    memory_card: dict[str, Any]


@dataclass(frozen=True)
class BackendTarget:
    """One backend's part of the bundle: its manifest entry and the files it adds."""

    name: str
    # The manifest's ``backends[name]`` entry: role -> bundle member, plus settings.
    entry: dict[str, str]
    # Bundle member name -> file written under the export's temporary folder.
    files: dict[str, Path] = field(default_factory=dict)
    # What this backend adds to the manifest's memory card (under its own key).
    memory: dict[str, Any] = field(default_factory=dict)
