"""The lean backend: block-wise training on any onnxruntime, for memory first.

The bundle's ``lean/`` graphs (see edgepeft.exporters.lean) cut the model into embeddings,
blocks and a suffix, each with a forward and a vector-Jacobian graph whose frozen weights are
graph inputs. A training step runs the blocks forward keeping only each block's input, then
backward one block at a time (the VJP graph recomputes the block's inside: per-block activation
checkpointing), so one block's activations and one block's dequantized weights live at a time.
A causal LM's head runs in vocabulary chunks in numpy (runtime.lean_head): the full logits never
exist in training or evaluation. The frozen weights are stored once, in
``lean/weights.safetensors``, memory-mapped (read-only pages the kernel may drop and re-read)
and fed to every graph without copies."""
from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path
from typing import Mapping

import numpy as np

from edgepeft import names
from edgepeft.bundle import OpenedBundle
from edgepeft.data import Batch
from edgepeft.errors import BackendError, BundleError
from edgepeft.runtime import lean_head
from edgepeft.runtime.backends._ort_import import onnxruntime
from edgepeft.runtime.backends.base import backend_entry, check_inputs, engine_errors
from edgepeft.runtime.losses import cross_entropy

_DTYPES = {"F32": np.float32, "I8": np.int8, "U8": np.uint8, "I64": np.int64, "F16": np.float16, "I32": np.int32}


def _libc_trim():
    """glibc's malloc_trim, or a no-op where there is none (macOS, musl)."""
    import ctypes
    import ctypes.util

    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return lambda: None
    fn.argtypes = [ctypes.c_size_t]
    return lambda: fn(0)


_trim_heap = _libc_trim()


class MappedWeights(dict):
    """Read-only arrays over a safetensors file's pages (layout: 8-byte header length, JSON
    header of dtype/shape/offsets, then the data), so the weights are never copied into the
    process. ``release()`` drops the pages from this process's resident set: they stay in the
    page cache (clean, reclaimable, re-read from the bundle if the kernel evicted them), so a
    step holds one block's weights at a time, not the whole base."""

    def __init__(self, path: Path):
        super().__init__()
        with open(path, "rb") as f:
            self._buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            (n,) = struct.unpack("<Q", self._buf[:8])
            for name, info in json.loads(self._buf[8:8 + n]).items():
                if name != "__metadata__":
                    self[name] = self._array(info, 8 + n)
        except (KeyError, ValueError, TypeError, struct.error) as e:
            raise BundleError(f"{path.name} is not a valid safetensors file ({e}); re-export the bundle") from None

    def _array(self, info: dict, base: int) -> np.ndarray:
        dtype = np.dtype(_DTYPES[info["dtype"]])
        lo, hi = info["data_offsets"]
        return np.frombuffer(self._buf, dtype=dtype, count=(hi - lo) // dtype.itemsize, offset=base + lo).reshape(
            info["shape"])

    def release(self) -> None:
        self._buf.madvise(mmap.MADV_DONTNEED)


class _OrtGraph:
    """One lean ONNX graph on onnxruntime: inputs and outputs by the graph's own names."""

    def __init__(self, session):
        self._s = session
        self.inputs = [i.name for i in session.get_inputs()]
        self.outputs = [o.name for o in session.get_outputs()]

    def run(self, feeds: list[np.ndarray]) -> list[np.ndarray]:
        return self._s.run(None, dict(zip(self.inputs, feeds)))


class LeanBackend:
    """The block walk over a plan's parts. Subclasses run the parts on another engine by
    overriding ``_open_graph`` (edgepeft.runtime.backends.executorch_lean)."""

    name = names.BACKEND_LEAN
    # Drop the weights' pages from the resident set after each graph (off: the ablation that
    # keeps the whole base resident, as a copied-in base would be).
    release_weights = True

    def __init__(self, bundle: OpenedBundle, *, threads: int | None = None):
        entry = backend_entry(bundle, self.name, "lean graphs")
        self._entry = entry
        self._bundle = bundle
        with engine_errors(self.name, "reading the plan", members=[entry.members["plan"]]):
            self._plan = json.loads(bundle.path(entry.members["plan"]).read_text(encoding="utf-8"))
        with engine_errors(self.name, "mapping the weights", members=[entry.members["weights"]]):
            self._weights = MappedWeights(bundle.path(entry.members["weights"]))
        self._sessions: dict[str, object] = {}
        self._trainable = bundle.manifest.trainable_names
        self._inputs = [i.name for i in bundle.manifest.inputs]
        self._params: dict[str, np.ndarray] = {}
        with engine_errors(self.name, "building the LM head", members=list(entry.members.values())):
            self._head = self._make_head()
        self._prepare(threads)

    def _prepare(self, threads: int | None) -> None:
        """The engine, ready at open (so open's memory includes it, as the memory model says)."""
        self._opts = self._options(threads)

    def _make_head(self) -> lean_head.Head | None:
        """The LM head as stored: int4 (the plan names its packed codes, scales and mins), int8
        rows + scales, or fp32."""
        head, int4 = self._plan["head"], self._plan.get("head_int4")
        if head is None:
            return None
        if int4 is not None:
            return lean_head.Head(self._weights[int4["q"]], self._weights[int4["scale"]], self._weights[int4["min"]],
                                  block=int(int4["block"]), drop=self._drop_pages)
        return lean_head.Head(self._weights.get(head + names.Q_SUFFIX, self._weights.get(head)),
                              self._weights.get(head + names.SCALE_SUFFIX), drop=self._drop_pages)

    def _drop_pages(self) -> None:
        if self.release_weights:
            self._weights.release()

    @staticmethod
    def _options(threads: int | None):
        ort = onnxruntime()
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        # Shapes vary per batch, and every graph is small: no pre-planned blocks, no arena
        # keeping a step's high-water mark between graphs.
        opts.enable_mem_pattern = False
        opts.enable_cpu_mem_arena = False
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
        return opts

    def _graph(self, member: str):
        s = self._sessions.get(member)
        if s is None:
            with engine_errors(self.name, "loading a lean graph", members=[member]):
                s = self._sessions[member] = self._open_graph(member)
        return s

    def _open_graph(self, member: str) -> _OrtGraph:
        # No constant folding: it would turn DequantizeLinear of a constant into fp32 copies
        # (there are none here, weights are inputs, but keep int8 honest), and no CSE.
        return _OrtGraph(onnxruntime().InferenceSession(
            str(self._bundle.path(member)), self._opts, providers=["CPUExecutionProvider"],
            disabled_optimizers=["ConstantFolding", "CommonSubexpressionElimination"]))

    def _free(self) -> None:
        """After each graph: drop the weights' pages from the resident set, and hand the freed
        heap back to the system (glibc keeps freed blocks otherwise: measured on SmolLM2 at
        4 x 128, the raw step's peak fell 178 -> 130 MiB)."""
        if self.release_weights:
            self._weights.release()
            _trim_heap()

    def _run(self, member: str, prefix: str, acts: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        s = self._graph(member)
        feeds = []
        for n in s.inputs:
            key = prefix + n
            if n in acts:
                feeds.append(acts[n])
            elif key in self._params:
                feeds.append(self._params[key])
            elif key in self._weights:
                feeds.append(self._weights[key])
            else:
                raise BundleError(f"lean graph {member} needs {key!r}, which the bundle's weights lack; re-export")
        out = dict(zip(s.outputs, s.run(feeds)))
        self._free()
        return out

    # -- forward -------------------------------------------------------------------------------
    def _forward(self, feeds: Mapping[str, np.ndarray], keep: bool):
        check_inputs(feeds, self._inputs)
        if not self._params:
            raise BackendError("no adapter loaded")
        inputs = {n: feeds[n] for n in self._inputs}
        pre = self._run(self._plan["pre"]["fwd"], "", inputs)
        h, ctx = pre["out0"], {f"ctx{k}": pre[f"out{k + 1}"] for k in range(self._plan["n_ctx"])}
        saved = []
        for b in self._plan["blocks"]:
            if keep:
                saved.append(h)
            h = self._run(self._plan["graphs"][b["graph"]]["fwd"], b["prefix"], {"h": h, **ctx})["out0"]
        return inputs, ctx, saved, h

    # -- Backend protocol ------------------------------------------------------------------------
    def forward_backward(self, batch: Batch) -> tuple[float, dict[str, np.ndarray]]:
        with engine_errors(self.name, "the train step"):
            return self._forward_backward(batch)

    def _forward_backward(self, batch: Batch) -> tuple[float, dict[str, np.ndarray]]:
        inputs, ctx, saved, h = self._forward(batch.feeds, keep=True)
        grads: dict[str, np.ndarray] = {}
        post = self._plan["post"]
        if self._head is not None:
            hidden = self._run(post["fwd"], "", {"h": h, **inputs})["out0"]
            loss, g_hidden = lean_head.loss_and_grad(self._head, hidden, batch.labels)
            self._free()
            del hidden
            out = self._run(post["vjp"], "", {"h": h, **inputs, "g": g_hidden})
        else:
            out = self._run(post["vjp"], "", {"h": h, **inputs, names.LABELS_INPUT: batch.labels})
            loss = float(out["loss"])
        del h
        g = self._collect(out, "", grads)
        for b in reversed(self._plan["blocks"]):
            out = self._run(self._plan["graphs"][b["graph"]]["vjp"], b["prefix"], {"h": saved.pop(), "g": g, **ctx})
            g = self._collect(out, b["prefix"], grads)
        if self._plan["pre"]["vjp"]:
            self._collect(self._run(self._plan["pre"]["vjp"], "", {**inputs, "g": g}), "", grads)
        missing = [n for n in self._trainable if n not in grads]
        if missing:
            raise BundleError(f"lean graphs gave no gradient for {missing[:4]}; re-export the bundle")
        return loss, {n: grads[n] for n in self._trainable}

    @staticmethod
    def _collect(out: dict[str, np.ndarray], prefix: str, grads: dict[str, np.ndarray]) -> np.ndarray | None:
        for k, v in out.items():
            if k.endswith("/grad"):
                grads[prefix + k[:-len("/grad")]] = v
        return out.get("g_h")

    def _hidden(self, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        inputs, _, _, h = self._forward(feeds, keep=False)
        return self._run(self._plan["post"]["fwd"], "", {"h": h, **inputs})["out0"]

    def eval_step(self, batch: Batch) -> tuple[float, np.ndarray]:
        logits = self.infer(batch.feeds)
        return cross_entropy(logits, batch.labels), logits

    def eval_predictions(self, batch: Batch) -> tuple[float, np.ndarray]:
        """Loss and top-1 predictions without a causal LM's full logits."""
        with engine_errors(self.name, "evaluation"):
            return self._eval_predictions(batch)

    def _eval_predictions(self, batch: Batch) -> tuple[float, np.ndarray]:
        if self._head is None:
            loss, logits = self.eval_step(batch)
            return loss, logits.argmax(axis=-1)
        out = lean_head.loss_and_argmax(self._head, self._hidden(batch.feeds), batch.labels)
        self._free()
        return out

    def infer(self, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        with engine_errors(self.name, "inference"):
            return self._infer(feeds)

    def _infer(self, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        out = self._hidden(feeds)
        if self._head is None:
            return out
        logits = lean_head.logits(self._head, out)
        self._free()
        return logits

    def named_parameters(self) -> dict[str, np.ndarray]:
        return {n: v.copy() for n, v in self._params.items()}

    def load_parameters(self, tensors: Mapping[str, np.ndarray]) -> None:
        self._params = {n: np.ascontiguousarray(tensors[n], dtype=np.float32) for n in self._trainable}

    def close(self) -> None:
        self._sessions.clear()
