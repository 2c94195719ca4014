"""Device side of edgepeft (no torch, no onnx, no exporters): open a bundle, train, evaluate,
infer, save and hot-swap adapters inside a memory budget. Imported as ``edgepeft.runtime``."""
from edgepeft.data import Batch, Example, read_jsonl
from edgepeft.optim import OptimizerSpec
from edgepeft.errors import NumericalError
from edgepeft.runtime.guard import UpdateGuard
from edgepeft.runtime.session import EvalResult, Session
from edgepeft.runtime.personalizer import Personalizer, PersonalizerConfig, RoundResult

__all__ = ["Batch", "EvalResult", "Example", "NumericalError", "OptimizerSpec", "Personalizer", "PersonalizerConfig",
           "RoundResult", "Session", "UpdateGuard", "read_jsonl"]
