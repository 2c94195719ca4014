"""Names that cross the host/device boundary, defined once (bundle members, manifest keys,
graph input/output names). The exporters write them and the runtime reads them."""

BUNDLE_SUFFIX = ".edgepeft"
SCHEMA_VERSION = 1

MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"
INFERENCE_MODEL = "inference.onnx"
INITIAL_ADAPTER_DIR = "adapters/initial"

# ONNX Runtime training artifacts, under ort/ in the bundle.
ORT_DIR = "ort"
ORT_TRAINING_MODEL = f"{ORT_DIR}/training_model.onnx"
ORT_EVAL_MODEL = f"{ORT_DIR}/eval_model.onnx"
ORT_CHECKPOINT = f"{ORT_DIR}/checkpoint"

# The portable gradient graph (standard ONNX ops: runs on any onnxruntime), under portable/.
PORTABLE_GRADIENT_MODEL = "portable/gradient.onnx"

# Backends a bundle can carry (manifest "backends" keys).
BACKEND_ORT = "ort-training"
BACKEND_PORTABLE = "portable"
EXPORT_BACKENDS = (BACKEND_ORT, BACKEND_PORTABLE)

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
