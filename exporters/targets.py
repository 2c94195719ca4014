"""One builder per backend a bundle can carry: each takes the injected model, the forward graph
and the export's temporary folder, and returns the backend's ``BackendTarget`` (its manifest
entry and files). ``BUILDERS`` maps an export backend's name to its builder, as the backends'
records (edgepeft.backends) name them."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import onnx

from edgepeft import backends, names
from edgepeft.exporters import executorch_export, gradient_graph, onnx_graph, ort_artifacts
from edgepeft.exporters.stages import BackendTarget, ForwardGraph, InjectedModel

# The manifest entry of the standalone inference model every bundle carries.
ONNX_INFERENCE = "onnx-inference"

Builder = Callable[[InjectedModel, ForwardGraph, Path], BackendTarget]


def build_inference(injected: InjectedModel, forward: ForwardGraph, tmp: Path) -> BackendTarget:
    """inference.onnx: the forward graph with the adapter tensors as optional inputs."""
    path = tmp / names.INFERENCE_MODEL
    onnx.save(onnx_graph.expose_as_inputs(forward.model, injected.trainable_names), path)
    return BackendTarget(ONNX_INFERENCE, {"inference_model": names.INFERENCE_MODEL}, {names.INFERENCE_MODEL: path})


def build_ort(injected: InjectedModel, forward: ForwardGraph, tmp: Path) -> BackendTarget:
    """ONNX Runtime's training artifacts (training and eval graphs, checkpoint)."""
    roles = ort_artifacts.generate(forward.model, injected.trainable_names, list(forward.frozen),
                                   tmp / names.ORT_DIR, loss=injected.plan.loss)
    return BackendTarget(names.BACKEND_ORT, dict(roles), {member: tmp / member for member in roles.values()})


def build_portable(injected: InjectedModel, forward: ForwardGraph, tmp: Path) -> BackendTarget:
    """The standard-ONNX gradient graph any onnxruntime runs."""
    path = tmp / names.PORTABLE_GRADIENT_MODEL
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(gradient_graph.build(injected, path), path)
    return BackendTarget(names.BACKEND_PORTABLE, {"gradient_model": names.PORTABLE_GRADIENT_MODEL},
                         {names.PORTABLE_GRADIENT_MODEL: path})


def build_executorch(injected: InjectedModel, forward: ForwardGraph, tmp: Path) -> BackendTarget:
    """ExecuTorch's training and XNNPACK inference programs at the options' fixed batch size."""
    programs = executorch_export.build(injected, batch_size=injected.plan.options.executorch_batch_size)
    roles = {"training_program": names.EXECUTORCH_TRAINING_PROGRAM,
             "inference_program": names.EXECUTORCH_INFERENCE_PROGRAM}
    files: dict[str, Path] = {}
    for member, data in ((roles["training_program"], programs.training),
                         (roles["inference_program"], programs.inference)):
        (tmp / member).parent.mkdir(parents=True, exist_ok=True)
        (tmp / member).write_bytes(data)
        files[member] = tmp / member
    return BackendTarget(names.BACKEND_EXECUTORCH, {**roles, names.EXECUTORCH_BATCH_SIZE: str(programs.batch_size)},
                         files)


# Export backend -> its builder (the record's ``export`` path; a builder of this module is
# defined above, so the module resolves from itself), in the registry's order, which bundles
# list them in.
BUILDERS: dict[str, Builder] = {name: backends.load(r.export) for name, r in backends.REGISTRY.items()}
# Backends left out with a warning, rather than failing the export, when the caller named no
# backends and the model cannot be turned into one.
BEST_EFFORT = frozenset(name for name, r in backends.REGISTRY.items() if r.best_effort)
