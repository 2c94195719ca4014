"""Host side of edgepeft (needs torch): PEFT injection, the model zoo, int8 quantization and
export of a bundle for the device. Imported as ``edgepeft.exporters``."""
from edgepeft.exporters.export import ExportResult, export_bundle
from edgepeft.exporters.zoo import ModelSource, load_model

__all__ = ["ExportResult", "ModelSource", "export_bundle", "load_model"]
