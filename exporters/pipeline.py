"""The export, stage by stage (``export_bundle`` runs them in this order):

    plan = validate_plan(model, example_inputs, methods, options)      -> ExportPlan
    injected = inject_and_quantize(plan)                                -> InjectedModel
    forward = export_forward(injected, tmp)                             -> ForwardGraph
    targets = build_targets(injected, forward, tmp)                     -> {backend: BackendTarget}
    manifest = build_manifest(injected, forward, targets)               -> Manifest
    manifest = write_bundle(out, manifest, injected=..., targets=..., tmp=...)

Each stage takes the previous stages' records (``edgepeft.exporters.stages``) and nothing else."""
from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Mapping, Sequence

import onnx
import torch
import torch.nn as nn

import edgepeft
from edgepeft import bundle, names
from edgepeft.adapters import AdapterStore
from edgepeft.errors import ExportError, SpecError
from edgepeft.exporters import onnx_graph
from edgepeft.exporters.memory_card import memory_card
from edgepeft.exporters.options import CAUSAL_LM, LOSSES, TASKS, ExportOptions
from edgepeft.exporters.peft import InjectContext, inject
from edgepeft.exporters.peft.fast_paths import fast_paths_off
from edgepeft.exporters.peft_import import load_peft_adapter
from edgepeft.exporters.quantize import INT4_BLOCK, Int4Tensor, QuantizedTensor, quantize_frozen
from edgepeft.exporters.stages import BackendTarget, ExportPlan, ForwardGraph, InjectedModel
from edgepeft.exporters.targets import BEST_EFFORT, BUILDERS, build_inference
from edgepeft.exporters.zoo import ModelSource, state_sha256
from edgepeft.manifest import IOInfo, Manifest, TensorInfo
from edgepeft.specs import MethodSpec

_DTYPES = {torch.int64: "int64", torch.int32: "int32", torch.float32: "float32"}


# -- 1. plan -----------------------------------------------------------------------------------
def validate_plan(model: nn.Module | ModelSource, example_inputs: Mapping[str, torch.Tensor] | None,
                  methods: Sequence[MethodSpec], options: ExportOptions) -> ExportPlan:
    """Check that the model, its task and the options fit together; nothing is exported yet."""
    if isinstance(model, ModelSource):
        src = model
        shape = _output_shape(src.model, src.example_inputs)
    else:
        if example_inputs is None:
            raise SpecError("`example_inputs` is required with a plain nn.Module: {input name: example tensor}")
        shape = _output_shape(model, example_inputs)
        src = _plain_source(model, dict(example_inputs), shape, options)
    if src.task not in LOSSES:
        raise SpecError(f"model task {src.task!r} is not supported; tasks: {sorted(LOSSES)}")
    loss = options.loss or LOSSES[src.task]
    if loss != LOSSES[src.task]:
        raise SpecError(f"`loss` {loss!r} does not fit the model's task {src.task!r} (use {LOSSES[src.task]!r})")
    return ExportPlan(src, tuple(methods), options, loss, shape[-1])


def _plain_source(model: nn.Module, example_inputs: dict[str, torch.Tensor], shape: tuple[int, ...],
                  options: ExportOptions) -> ModelSource:
    """A ModelSource for a user's nn.Module whose output has ``shape``; ``options.loss`` chooses
    its task (cross_entropy: classification, causal_lm: next-token prediction)."""
    task = TASKS[options.loss or "cross_entropy"]
    first = next(iter(example_inputs.values()))
    if task == CAUSAL_LM and (len(shape) != 3 or shape[:2] != tuple(first.shape[:2])):
        raise ExportError(f"for causal_lm the model must return logits of shape (batch, seq, vocab) over its "
                          f"(batch, seq) token ids {tuple(first.shape)}, got {shape}")
    if task != CAUSAL_LM and len(shape) != 2:
        raise ExportError("the model must return logits of shape (batch, num_labels) for cross_entropy "
                          "(for (batch, seq, vocab) next-token logits, export with loss='causal_lm')")
    labels = options.labels or (() if task == CAUSAL_LM else tuple(str(i) for i in range(shape[1])))
    axes = options.dynamic_axes or {k: _default_axes(v, task) for k, v in example_inputs.items()}
    return ModelSource(options.name or type(model).__name__, model, example_inputs, labels,
                       tokenizer_json=options.tokenizer_json, max_length=options.max_length, task=task,
                       dynamic_axes=axes)


def _default_axes(example: torch.Tensor, task: str) -> dict[int, str]:
    """The batch axis; for a causal LM also the sequence axis of (batch, seq) inputs."""
    return {0: "batch", 1: "seq"} if task == CAUSAL_LM and example.dim() >= 2 else {0: "batch"}


def _output_shape(model: nn.Module, example_inputs: Mapping[str, torch.Tensor]) -> tuple[int, ...]:
    with torch.no_grad():
        try:
            y = model(*example_inputs.values())
        except Exception as e:  # the user's forward: any error type; nothing is exported yet
            raise ExportError(f"the model failed on its example inputs {_shapes(example_inputs)}: "
                              f"{type(e).__name__}: {e}. `example_inputs` must be {{forward's argument name: "
                              "tensor}} in forward's argument order, one batch the model accepts") from e
    if not isinstance(y, torch.Tensor):
        raise ExportError(f"the model must return one logits tensor, got {type(y).__name__}")
    return tuple(y.shape)


def _shapes(inputs: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__ for k, v in inputs.items()}


# -- 2. inject and quantize ----------------------------------------------------------------------
def inject_and_quantize(plan: ExportPlan) -> InjectedModel:
    """A copy of the model (the caller's is never touched) with the methods injected, the
    initial adapter loaded, and the frozen weights quantized when the options say so."""
    src = plan.source
    source_hash = state_sha256(src.model)
    ref = copy.deepcopy(src.model).eval()
    base_params = sum(p.numel() for p in ref.parameters())
    trainables = inject(ref, plan.methods, InjectContext(tokenizer_json=src.tokenizer_json))
    if plan.options.init_adapter is not None:
        load_peft_adapter(plan.options.init_adapter, trainables, list(plan.methods))
    trainable = {t.name for t in trainables}
    quant = plan.options.quant
    quantized = quantize_frozen(ref, trainable, quant) if quant != "none" else {}
    return InjectedModel(plan, ref, tuple(trainables), quantized, source_hash, base_params)


# -- 3. forward graph --------------------------------------------------------------------------
def export_forward(injected: InjectedModel, tmp: Path) -> ForwardGraph:
    """The ONNX forward graph every target starts from (int8 frozen weights, LayerNorm outputs
    ORT's gradient builder needs) and the memory card measured on it."""
    src, trainable = injected.plan.source, injected.trainable_names
    with fast_paths_off():
        forward = onnx_graph.torch_to_onnx(injected.model, src, tmp / "forward.onnx")
    inits = {i.name for i in forward.graph.initializer}
    lost = [n for n in trainable if n not in inits]
    if lost:
        raise ExportError(f"the exported graph lost the names of trainable tensors {lost[:5]}; "
                          "they must reach ONNX as named initializers")
    int4 = {k: v for k, v in injected.quantized.items() if isinstance(v, Int4Tensor)}
    # int4 weights stay float32 here (their dequantized values): only the lean graphs, which
    # unpack them themselves, are exported with int4 (ExportOptions refuses the others).
    onnx_graph.apply_int8(forward, {k: v for k, v in injected.quantized.items() if k not in int4})
    onnx_graph.add_layernorm_stats(forward)
    onnx_graph.spell_out_hard_activations(forward)
    onnx.checker.check_model(forward)
    try:
        card = memory_card(injected.model, forward, trainable, src.example_inputs, src.dynamic_axes, src.max_length,
                           injected.plan.causal)
    except RuntimeError as e:  # the user's forward on resized inputs (shape errors are RuntimeErrors)
        raise ExportError(f"{src.name!r} failed on inputs resized along their dynamic axes {src.dynamic_axes} up to "
                          f"max_length={src.max_length} (to measure its activation memory): {e}. Pass the longest "
                          "sequence the model takes as `max_length`, or fix the sequence axis in `dynamic_axes`") from e
    card = _int4_card(card, forward, int4)
    frozen = sorted({i.name for i in forward.graph.initializer} - set(trainable))
    return ForwardGraph(forward, tuple(frozen), card)


def _int4_card(card: dict, forward: onnx.ModelProto, int4: dict[str, Int4Tensor]) -> dict:
    """The memory card's weights as stored: int4 weights count their packed bytes, and their
    float32 bytes where a reader other than a row gather dequantizes the whole tensor."""
    if not int4:
        return card
    stored = sum(qt.nbytes - 4 * qt.numel for qt in int4.values())
    whole = sum(4 * qt.numel for name, qt in int4.items()
                if any(not onnx_graph.is_row_gather(n, name) for n in forward.graph.node if name in n.input))
    return {**card, "frozen_bytes": card["frozen_bytes"] + stored,
            "dequant_fp32_bytes": card["dequant_fp32_bytes"] + whole}


# -- 4. targets --------------------------------------------------------------------------------
# Backends that read the standalone inference.onnx: portable evaluates and infers with it, and
# ort-training bundles have always shipped it as the plain-onnxruntime inference model (the
# parity tests and the sizes benchmark read it there). The lean backend runs its own graphs and
# ExecuTorch its own inference program, so a bundle of those only keeps one copy of the weights.
INFERENCE_READERS = frozenset({names.BACKEND_PORTABLE, names.BACKEND_ORT})


def build_targets(injected: InjectedModel, forward: ForwardGraph, tmp: Path) -> dict[str, BackendTarget]:
    """The inference model (when a backend of the bundle reads it), then each asked-for
    backend's target, in ``BUILDERS`` order."""
    plan = injected.plan
    missing = [b for b in plan.backends if b not in BUILDERS]
    if missing:  # a backend named in edgepeft.names without a builder in targets.BUILDERS
        raise ExportError(f"this edgepeft cannot export backend(s) {missing} yet; export some of {list(BUILDERS)}")
    needs_inference = INFERENCE_READERS & set(plan.backends)
    targets = {t.name: t for t in [build_inference(injected, forward, tmp)] if needs_inference}
    for name, builder in BUILDERS.items():
        if name not in plan.backends:
            continue
        try:
            with fast_paths_off():  # torch.export traces the layers too
                targets[name] = builder(injected, forward, tmp)
        except ExportError as e:
            if not (plan.options.best_effort and name in BEST_EFFORT):
                raise
            # stacklevel 3: the warning points at export_bundle's caller.
            warnings.warn(f"the bundle has no {name} backend: {str(e).splitlines()[0][:300]}", stacklevel=3)
    return targets


# -- 5. manifest -------------------------------------------------------------------------------
def build_manifest(injected: InjectedModel, forward: ForwardGraph, targets: Mapping[str, BackendTarget]) -> Manifest:
    """The manifest of the bundle (its ``members`` are filled in when it is written)."""
    plan, src, quantized = injected.plan, injected.plan.source, injected.quantized
    out_shape = ("batch", len(src.labels)) if not plan.causal else ("batch", "seq", plan.output_width)
    return Manifest(
        schema_version=names.SCHEMA_VERSION,
        sdk_version=edgepeft.__version__,
        model_name=src.name,
        model_sha256=injected.source_sha256,
        task=src.task,
        loss=plan.loss,
        methods=plan.methods,
        trainable=tuple(TensorInfo(t.name, t.peft_key, tuple(t.param.shape), t.method) for t in injected.trainables),
        inputs=tuple(IOInfo(k, _DTYPES.get(v.dtype, str(v.dtype)),
                            tuple(src.dynamic_axes.get(k, {}).get(i, d) for i, d in enumerate(v.shape)))
                     for k, v in src.example_inputs.items()),
        outputs=(IOInfo(names.LOGITS_OUTPUT, "float32", out_shape),),
        labels=tuple(src.labels),
        max_length=src.max_length,
        quantization=_quantization(quantized),
        base_params=injected.base_params,
        backends={name: dict(t.entry) for name, t in targets.items()},
        memory={**forward.memory_card, **{k: v for t in targets.values() for k, v in t.memory.items()}},
    )


def _quantization(quantized: Mapping[str, QuantizedTensor | Int4Tensor]) -> dict:
    """The manifest's ``quantization``: scheme, tensors, parameters and bytes as stored. An int4
    bundle lists its int4 tensors (the rest of ``tensors`` fell back to int8 per row)."""
    int4 = {k: v for k, v in quantized.items() if isinstance(v, Int4Tensor)}
    int8 = [v for k, v in quantized.items() if k not in int4]
    out = {
        "scheme": ("int4-asymmetric-block32" if int4 else "int8-symmetric-per-row") if quantized else "none",
        "tensors": sorted(quantized),
        "params": int(sum(q.numel for q in quantized.values())),
        "int8_bytes": int(sum(q.nbytes for q in int8)),
        "fp32_bytes": int(sum(q.numel * 4 for q in quantized.values())),
    }
    if int4:
        out.update({"int4_tensors": sorted(int4), "int4_bytes": int(sum(q.nbytes for q in int4.values())),
                    "block_size": INT4_BLOCK,
                    "scale_dtypes": sorted({str(q.scale.dtype) for q in int4.values()})})
    return out


# -- 6. write ----------------------------------------------------------------------------------
def write_bundle(out: Path, manifest: Manifest, *, injected: InjectedModel,
                 targets: Mapping[str, BackendTarget], tmp: Path) -> Manifest:
    """The bundle file ``out``: the targets' files, the tokenizer and the initial adapter,
    signed when the options carry a key. Returns the manifest as written (with members)."""
    files: dict[str, Path] = {}
    for target in targets.values():
        files.update(target.files)
    src = injected.plan.source
    if src.tokenizer_json is not None:
        (tmp / names.TOKENIZER).write_text(src.tokenizer_json)
        files[names.TOKENIZER] = tmp / names.TOKENIZER
    store = AdapterStore(tmp / "adapters", manifest)
    folder = store.save("initial", {t.name: t.param.detach().numpy() for t in injected.trainables}, meta={"steps": 0})
    for f in folder.iterdir():
        files[f"{names.INITIAL_ADAPTER_DIR}/{f.name}"] = f
    return bundle.write_bundle(out, manifest, files, sign_key=injected.plan.options.sign_key)
