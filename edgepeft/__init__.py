"""edgepeft: parameter-efficient fine-tuning on the device.

This package is the torch-free core shared by the host side (``edgepeft.exporters``) and the
device side (``edgepeft.runtime``): specs, manifest and bundle, adapter files, memory
accounting and errors. It imports neither side; the command line and host tooling live in
``edgepeft.cli``, the one subpackage that imports both."""

__version__ = "0.1.0"

from edgepeft.errors import EdgePeftError  # noqa: E402
from edgepeft.specs import (  # noqa: E402
    BitFitSpec, BottleneckSpec, LoraSpec, PrefixSpec, PromptSpec, SelectiveSpec,
)

__all__ = ["BitFitSpec", "BottleneckSpec", "EdgePeftError", "LoraSpec", "PrefixSpec", "PromptSpec",
           "SelectiveSpec", "__version__"]
