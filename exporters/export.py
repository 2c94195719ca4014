"""export_bundle: PyTorch model -> PEFT injection -> int8 frozen ONNX -> ORT training
artifacts + inference model + initial adapter -> one bundle file."""
from __future__ import annotations

import copy
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import onnx
import torch
import torch.nn as nn

import edgepeft
from edgepeft import names
from edgepeft.adapters import AdapterStore
from edgepeft.bundle import write_bundle
from edgepeft.errors import ExportError, SpecError
from edgepeft.exporters import executorch_export, gradient_graph, onnx_graph, ort_artifacts
from edgepeft.exporters.peft import InjectContext, Trainable, inject
from edgepeft.exporters.memory_card import memory_card
from edgepeft.exporters.peft_import import load_peft_adapter
from edgepeft.exporters.quantize import quantize_frozen
from edgepeft.exporters.zoo import ModelSource, state_sha256
from edgepeft.manifest import IOInfo, Manifest, TensorInfo
from edgepeft.specs import MethodSpec

OPSET = 17
# task -> the loss trained on the device
LOSSES = {"classification": "cross_entropy", "causal-lm": "causal_lm"}
_DTYPES = {torch.int64: "int64", torch.int32: "int32", torch.float32: "float32"}


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

    ``model`` is an eager module (then ``example_inputs`` maps input names to example
    tensors, in forward's argument order) or a zoo ``ModelSource`` that carries them.
    ``init_adapter``: a PEFT adapter folder (e.g. trained on a host with HF PEFT) whose
    values become the bundle's initial adapter. ``backends``: which training graphs to
    write: "ort-training" (ONNX Runtime's training artifacts) and/or "portable" (a standard
    ONNX gradient graph for any onnxruntime). The default, None, writes both, leaving out
    (with a warning) a portable graph the model cannot be turned into. ``sign_key``: a private
    key from ``edgepeft keygen``; the bundle then carries an ed25519 signature over its
    manifest, which devices check with ``Session.open(..., trusted_keys=...)``.
    "executorch" in ``backends`` (never by default: its export is slow) adds ExecuTorch
    training + XNNPACK inference programs built for ``executorch_batch_size`` rows (the
    runtime pads smaller batches and splits larger ones)."""
    if isinstance(model, ModelSource):
        src = model
    else:
        if example_inputs is None:
            raise SpecError("`example_inputs` is required with a plain nn.Module: {input name: example tensor}")
        n_out = _num_outputs(model, example_inputs)
        src = ModelSource(name or type(model).__name__, model, dict(example_inputs),
                          tuple(labels) if labels else tuple(str(i) for i in range(n_out)),
                          tokenizer_json=tokenizer_json, max_length=max_length,
                          dynamic_axes=dynamic_axes or {k: {0: "batch"} for k in example_inputs})
    if src.task not in LOSSES:
        raise SpecError(f"model task {src.task!r} is not supported; tasks: {sorted(LOSSES)}")
    loss = loss or LOSSES[src.task]
    if loss != LOSSES[src.task]:
        raise SpecError(f"`loss` {loss!r} does not fit the model's task {src.task!r} (use {LOSSES[src.task]!r})")
    best_effort = backends is None
    backends = names.DEFAULT_EXPORT_BACKENDS if backends is None else tuple(backends)
    unknown = sorted(set(backends) - set(names.EXPORT_BACKENDS))
    if unknown or not backends:
        raise SpecError(f"`backends` must be some of {list(names.EXPORT_BACKENDS)}, got {list(backends)}")
    if quant not in ("int8", "none"):
        raise SpecError(f"`quant` must be 'int8' or 'none', got {quant!r}")
    if names.BACKEND_EXECUTORCH in backends:
        if isinstance(executorch_batch_size, bool) or not isinstance(executorch_batch_size, int) \
                or executorch_batch_size < 1:
            raise SpecError(f"`executorch_batch_size` must be a positive int, got {executorch_batch_size!r}")
    out = Path(out)

    source_hash = state_sha256(src.model)
    vocab = _output_width(src)
    ref = copy.deepcopy(src.model).eval()  # never mutate the caller's model
    base_params = sum(p.numel() for p in ref.parameters())
    trainables = inject(ref, methods, InjectContext(tokenizer_json=src.tokenizer_json))
    if init_adapter is not None:
        load_peft_adapter(init_adapter, trainables, list(methods))
    trainable_names = [t.name for t in trainables]
    quantized = quantize_frozen(ref, set(trainable_names)) if quant == "int8" else {}

    with tempfile.TemporaryDirectory(prefix="edgepeft-export-") as tmp_s:
        tmp = Path(tmp_s)
        forward = _to_onnx(ref, src, tmp / "forward.onnx")
        inits = {i.name for i in forward.graph.initializer}
        lost = [n for n in trainable_names if n not in inits]
        if lost:
            raise ExportError(f"the exported graph lost the names of trainable tensors {lost[:5]}; "
                              "they must reach ONNX as named initializers")
        onnx_graph.apply_int8(forward, quantized)
        onnx_graph.add_layernorm_stats(forward)
        onnx.checker.check_model(forward)
        card = memory_card(ref, forward, trainable_names, src.example_inputs, src.dynamic_axes, src.max_length,
                           src.task == "causal-lm")
        frozen = sorted({i.name for i in forward.graph.initializer} - set(trainable_names))

        files: dict[str, Path] = {}
        inference = onnx_graph.expose_as_inputs(forward, trainable_names)
        onnx.save(inference, tmp / names.INFERENCE_MODEL)
        files[names.INFERENCE_MODEL] = tmp / names.INFERENCE_MODEL
        bundle_backends: dict[str, dict[str, str]] = {"onnx-inference": {"inference_model": names.INFERENCE_MODEL}}
        if names.BACKEND_ORT in backends:
            roles = ort_artifacts.generate(forward, trainable_names, frozen, tmp / names.ORT_DIR, loss=loss)
            files.update({member: tmp / member for member in roles.values()})
            bundle_backends[names.BACKEND_ORT] = dict(roles)
        if names.BACKEND_PORTABLE in backends:
            grad_path = tmp / names.PORTABLE_GRADIENT_MODEL
            grad_path.parent.mkdir(parents=True, exist_ok=True)
            try:
                grad = gradient_graph.build(ref, src.example_inputs, _example_labels(src), src.dynamic_axes,
                                            trainable_names, src.task == "causal-lm", quantized, grad_path,
                                            src.max_length)
            except ExportError as e:
                if not best_effort:
                    raise
                warnings.warn(f"the bundle has no portable backend: {str(e).splitlines()[0][:300]}", stacklevel=2)
            else:
                onnx.save(grad, grad_path)
                files[names.PORTABLE_GRADIENT_MODEL] = grad_path
                bundle_backends[names.BACKEND_PORTABLE] = {"gradient_model": names.PORTABLE_GRADIENT_MODEL}
        if names.BACKEND_EXECUTORCH in backends:
            programs = executorch_export.build(ref, src.example_inputs, _example_labels(src), src.dynamic_axes,
                                               trainable_names, src.task == "causal-lm", quantized, src.max_length,
                                               executorch_batch_size,
                                               what=f"{src.name} with {'+'.join(m.method for m in methods)}")
            roles = {"training_program": names.EXECUTORCH_TRAINING_PROGRAM,
                     "inference_program": names.EXECUTORCH_INFERENCE_PROGRAM}
            for member, data in ((roles["training_program"], programs.training),
                                 (roles["inference_program"], programs.inference)):
                (tmp / member).parent.mkdir(parents=True, exist_ok=True)
                (tmp / member).write_bytes(data)
                files[member] = tmp / member
            bundle_backends[names.BACKEND_EXECUTORCH] = {
                **roles, names.EXECUTORCH_BATCH_SIZE: str(programs.batch_size)}
        if src.tokenizer_json is not None:
            (tmp / names.TOKENIZER).write_text(src.tokenizer_json)
            files[names.TOKENIZER] = tmp / names.TOKENIZER

        out_shape = ("batch", len(src.labels)) if src.task == "classification" else ("batch", "seq", vocab)
        manifest = Manifest(
            schema_version=names.SCHEMA_VERSION,
            sdk_version=edgepeft.__version__,
            model_name=src.name,
            model_sha256=source_hash,
            task=src.task,
            loss=loss,
            methods=tuple(methods),
            trainable=tuple(TensorInfo(t.name, t.peft_key, tuple(t.param.shape), t.method) for t in trainables),
            inputs=tuple(IOInfo(k, _DTYPES.get(v.dtype, str(v.dtype)),
                                tuple(src.dynamic_axes.get(k, {}).get(i, d) for i, d in enumerate(v.shape)))
                         for k, v in src.example_inputs.items()),
            outputs=(IOInfo(names.LOGITS_OUTPUT, "float32", out_shape),),
            labels=tuple(src.labels),
            max_length=src.max_length,
            quantization={
                "scheme": "int8-symmetric-per-row" if quantized else "none",
                "tensors": sorted(quantized),
                "params": int(sum(q.q.size for q in quantized.values())),
                "int8_bytes": int(sum(q.q.nbytes + q.scale.nbytes for q in quantized.values())),
                "fp32_bytes": int(sum(q.q.size * 4 for q in quantized.values())),
            },
            base_params=base_params,
            backends=bundle_backends,
            memory=card,
        )
        store = AdapterStore(tmp / "adapters", manifest)
        folder = store.save("initial", {t.name: t.param.detach().numpy() for t in trainables},
                            meta={"steps": 0})
        for f in folder.iterdir():
            files[f"{names.INITIAL_ADAPTER_DIR}/{f.name}"] = f
        manifest = write_bundle(out, manifest, files, sign_key=sign_key)
    return ExportResult(out, manifest, ref, trainables)


def _example_labels(src: ModelSource) -> torch.Tensor:
    first = next(iter(src.example_inputs.values()))
    if src.task == "causal-lm":
        return torch.ones(first.shape[:2], dtype=torch.int64)
    return torch.zeros(first.shape[0], dtype=torch.int64)


def _output_width(src: ModelSource) -> int:
    with torch.no_grad():
        return int(src.model(*src.example_inputs.values()).shape[-1])


def _num_outputs(model: nn.Module, example_inputs: dict[str, torch.Tensor]) -> int:
    with torch.no_grad():
        y = model(*example_inputs.values())
    if not isinstance(y, torch.Tensor) or y.dim() != 2:
        raise ExportError("the model must return logits of shape (batch, num_labels) for cross_entropy")
    return int(y.shape[1])


def _to_onnx(model: nn.Module, src: ModelSource, path: Path) -> onnx.ModelProto:
    axes = dict(src.dynamic_axes)
    axes[names.LOGITS_OUTPUT] = {0: "batch", 1: "seq"} if src.task == "causal-lm" else {0: "batch"}
    try:
        with warnings.catch_warnings():
            # Tracer notes on fixed sizes (prompt length, prefix rows) are expected: they are
            # constants of the exported graph by design.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message="Constant folding", category=UserWarning)
            torch.onnx.export(
                model, tuple(src.example_inputs.values()), str(path), dynamo=False, opset_version=OPSET,
                # No folding and no training-mode rewrites: parameters must reach ONNX as named
                # initializers so the trainable ones can be found by name.
                do_constant_folding=False, training=torch.onnx.TrainingMode.EVAL,
                # Initializers as inputs also turns off the pass that merges equal-valued
                # initializers (every zero-initialised lora_B would collapse into one).
                keep_initializers_as_inputs=True,
                input_names=list(src.example_inputs), output_names=[names.LOGITS_OUTPUT], dynamic_axes=axes,
            )
    except Exception as e:  # torch raises many types; the user needs to know export failed here
        raise ExportError(f"torch.onnx.export failed for {src.name!r}: {type(e).__name__}: {e}") from e
    m = onnx.load(str(path))
    inits = {i.name for i in m.graph.initializer}
    kept = [i for i in m.graph.input if i.name not in inits]
    del m.graph.input[:]
    m.graph.input.extend(kept)
    return m
