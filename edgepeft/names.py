"""Names that cross the host/device boundary, defined once (bundle members, manifest keys,
graph input/output names). The exporters write them and the runtime reads them."""

BUNDLE_SUFFIX = ".edgepeft"
SCHEMA_VERSION = 1

MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"
INFERENCE_MODEL = "inference.onnx"
INITIAL_ADAPTER_DIR = "adapters/initial"
# The ed25519 signature over manifest.json (edgepeft.signing): the one member the manifest
# cannot list.
SIGNATURE_MEMBER = "manifest.sig"

# ONNX Runtime training artifacts, under ort/ in the bundle.
ORT_DIR = "ort"
ORT_TRAINING_MODEL = f"{ORT_DIR}/training_model.onnx"
ORT_EVAL_MODEL = f"{ORT_DIR}/eval_model.onnx"
ORT_CHECKPOINT = f"{ORT_DIR}/checkpoint"

# The portable gradient graph (standard ONNX ops: runs on any onnxruntime), under portable/.
PORTABLE_GRADIENT_MODEL = "portable/gradient.onnx"

# ExecuTorch programs, under executorch/: training (joint forward-backward, fixed batch size)
# and inference (lowered to XNNPACK). The batch size is recorded in the backend's manifest entry.
EXECUTORCH_TRAINING_PROGRAM = "executorch/training.pte"
EXECUTORCH_INFERENCE_PROGRAM = "executorch/inference.pte"
EXECUTORCH_BATCH_SIZE = "batch_size"
# The training program names a trainable tensor by this prefix + its manifest name (the
# exporter's loss wrapper and int8-base wrapper each add one "m." level).
EXECUTORCH_PARAM_PREFIX = "m.m."

# Backends a bundle can carry (manifest "backends" keys): the names only; everything else about
# a backend is its record in edgepeft.backends.REGISTRY.
BACKEND_ORT = "ort-training"
BACKEND_PORTABLE = "portable"
BACKEND_EXECUTORCH = "executorch"
# Block-wise training on any onnxruntime (lean/ graphs, weights stored once, memory-mapped).
BACKEND_LEAN = "lean"
# The lean backend's block walk over ExecuTorch programs (XNNPACK, the native runner, no torch).
BACKEND_EXECUTORCH_LEAN = "executorch-lean"

# Graph I/O.
LABELS_INPUT = "labels"
IGNORE_INDEX = -100  # a label that takes no part in the loss (padding, the last position of a sequence)
LOGITS_OUTPUT = "logits"

# Hugging Face PEFT adapter folder layout.
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_META = "edgepeft_adapter.json"
# Optimizer state (moments, step) beside the adapter, for exact resumption; PEFT ignores it.
ADAPTER_OPTIM = "edgepeft_optimizer.safetensors"
PEFT_PREFIX = "base_model.model."

# Suffixes of the int8 tensors that replace a frozen fp32 weight.
Q_SUFFIX = "_q"
SCALE_SUFFIX = "_scale"
ZP_SUFFIX = "_zp"


def __getattr__(attr: str):
    """``DEFAULT_EXPORT_BACKENDS`` (what export_bundle writes when not told) and
    ``EXPORT_BACKENDS`` (all it can write) are the registry's (edgepeft.backends), read from
    it when asked: the registry imports this module, so they cannot be copied here."""
    if attr in ("DEFAULT_EXPORT_BACKENDS", "EXPORT_BACKENDS"):
        from edgepeft import backends

        return getattr(backends, attr)
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")
