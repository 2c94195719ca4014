"""The one Protocol every runtime backend implements (numpy tensors in and out), and the
checks every backend makes on what it is given.

A backend computes; the session owns the adapter tensors and the optimizer, so that every
backend trains the same way and adapters move between backends unchanged."""
from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Iterator, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np

from edgepeft.bundle import OpenedBundle
from edgepeft.data import Batch
from edgepeft.errors import BackendError, BundleError, DataError, EdgePeftError
from edgepeft.manifest import BackendEntry


# "/onnxruntime_src/.../module.cc:304 onnxruntime::...Module(...) " before "[ONNXRuntimeError]".
_CPP_FRAME = re.compile(r"/onnxruntime_src/\S+:\d+ [^\[]*?(?=\[ONNXRuntimeError\])")


@runtime_checkable
class Backend(Protocol):
    name: str

    def forward_backward(self, batch: Batch) -> tuple[float, dict[str, np.ndarray]]:
        """Loss and the gradient of every trainable tensor (by manifest name); no update."""

    def eval_step(self, batch: Batch) -> tuple[float, np.ndarray]:
        """Loss and logits, no gradients."""

    def infer(self, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        """Logits for model inputs (no labels)."""

    def named_parameters(self) -> dict[str, np.ndarray]:
        """Copies of the trainable tensors as the backend holds them."""

    def load_parameters(self, tensors: Mapping[str, np.ndarray]) -> None:
        """Assign trainable tensors in place (the frozen base is not reloaded)."""

    def close(self) -> None: ...


def backend_entry(bundle: OpenedBundle, name: str, what: str) -> BackendEntry:
    """The manifest's entry for backend ``name`` (its member files and settings); BackendError
    naming ``what`` is missing when the bundle was exported without that backend."""
    entry = bundle.manifest.backends.get(name)
    if entry is None:
        raise BackendError(f"bundle {str(bundle.source)!r} has no {what} (it has "
                           f"{sorted(bundle.manifest.backends)}); re-export it with the {name!r} backend")
    return entry


def check_inputs(feeds: Mapping[str, np.ndarray], inputs: Sequence[str]) -> None:
    """DataError unless ``feeds`` has every one of the graph's ``inputs``."""
    missing = [n for n in inputs if n not in feeds]
    if missing:
        raise DataError(f"batch lacks model inputs {missing}; the bundle takes {list(inputs)}")


def eval_predictions(backend: Backend, batch) -> tuple[float, np.ndarray]:
    """Loss and top-1 prediction per position. A backend may provide ``eval_predictions`` itself
    (the lean backend does, so that a causal LM's full logits never exist); others go through
    ``eval_step``'s logits."""
    own = getattr(backend, "eval_predictions", None)
    if own is not None:
        return own(batch)
    loss, logits = backend.eval_step(batch)
    return loss, logits.argmax(axis=-1)


@contextmanager
def engine_errors(backend: str, phase: str, *, members: Sequence[str] = ()) -> Iterator[None]:
    """Translate what an engine (onnxruntime, ExecuTorch, numpy on its outputs) raises inside
    the ``with`` body into the error family, keeping its type and message (and chaining it):
    BundleError naming ``members`` while they are being loaded (a graph, checkpoint or program
    that does not load is a corrupted or mismatched bundle), else BackendError naming
    ``phase``. EdgePeftErrors pass through unchanged. Usable as a decorator too."""
    try:
        yield
    except EdgePeftError:
        raise
    except Exception as e:
        raise engine_error(backend, phase, e, members=members) from e


def engine_error(backend: str, phase: str, e: BaseException, *, members: Sequence[str] = ()) -> EdgePeftError:
    """The EdgePeftError ``engine_errors`` raises for ``e`` (for code that cannot use a ``with``)."""
    what = f"{type(e).__name__}: {_first_lines(str(e))}"
    # onnxruntime says which file it failed to load ("Load model from <path> failed"): name that one.
    members = [m for m in members if m in str(e)] or list(members)
    if members:
        which = f"member{'s' if len(members) > 1 else ''} {', '.join(map(repr, members))}"
        return BundleError(f"{backend}: bundle {which} failed to load in {phase} "
                           f"({what}); the bundle is corrupted or was altered: re-export or re-download it")
    return BackendError(f"{backend}: {phase} failed ({what}); check that the inputs match the bundle's "
                        "signature (`edgepeft inspect`), else the bundle's graphs are damaged: re-export it")


def _first_lines(text: str, limit: int = 600) -> str:
    """An engine's message, on one line and bounded, without onnxruntime's C++ source locations
    and signatures (the chained exception keeps them)."""
    one = " ".join(_CPP_FRAME.sub("", text).split())
    return one if len(one) <= limit else one[:limit] + " ..."
