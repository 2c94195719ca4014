"""The exported ONNX forward graph and its rewrites: int8 and int4 frozen weights, ORT-trainable
LayerNorm, and overridable adapter inputs for the inference model."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn as nn
from onnx import TensorProto, helper, numpy_helper

from edgepeft import names
from edgepeft.errors import ExportError
from edgepeft.exporters.quantize import INT4_BLOCK, MIN_SUFFIX, Int4Tensor, QuantizedTensor
from edgepeft.exporters.zoo import ModelSource

OPSET = 17  # >= 17 for LayerNormalization; its missing outputs are added by add_layernorm_stats


def torch_to_onnx(model: nn.Module, src: ModelSource, path: Path) -> onnx.ModelProto:
    """``model`` (``src``'s model, injected) as an ONNX forward graph at ``path``, whose
    parameters are named initializers (graph inputs: the model inputs only)."""
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


def _consumers(graph: onnx.GraphProto, name: str) -> list[onnx.NodeProto]:
    return [n for n in graph.node if name in n.input]


def is_row_gather(node: onnx.NodeProto, name: str) -> bool:
    axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
    return node.op_type == "Gather" and node.input[0] == name and axis == 0


def apply_int8(model: onnx.ModelProto, quantized: dict[str, QuantizedTensor]) -> list[str]:
    """Replace each fp32 initializer in ``quantized`` by int8 + per-row scale.

    Row Gathers of a table (embeddings) read int8 rows and scale them after the gather, so a
    table only gathered never exists in fp32 at run time. Every other reader gets the output
    of a DequantizeLinear that keeps the weight's name. Returns the new initializer names
    (to list as frozen, or ORT's artifact builder folds them back to fp32)."""
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    added: list[str] = []
    new_nodes: list[onnx.NodeProto] = []
    for name, qt in quantized.items():
        if name not in inits:
            raise ExportError(f"quantized weight {name!r} is not an initializer of the exported graph")
        g.initializer.remove(inits[name])
        q_name, s_name = name + names.Q_SUFFIX, name + names.SCALE_SUFFIX
        g.initializer.extend([numpy_helper.from_array(qt.q, q_name), numpy_helper.from_array(qt.scale, s_name)])
        added += [q_name, s_name]
        users = _consumers(g, name)
        gathers = [n for n in users if is_row_gather(n, name)]
        if gathers:
            for k, node in enumerate(gathers):
                idx, out = node.input[1], node.output[0]
                tag = f"{name}/int8_gather{k}"
                node.input[0] = q_name
                node.output[0] = tag + "/q"
                new_nodes += [
                    helper.make_node("Cast", [tag + "/q"], [tag + "/f"], to=TensorProto.FLOAT, name=tag + "/cast"),
                    helper.make_node("Gather", [s_name, idx], [tag + "/s"], axis=0, name=tag + "/gather_scale"),
                    helper.make_node("Unsqueeze", [tag + "/s", tag + "/axes"], [tag + "/su"], name=tag + "/unsq"),
                    helper.make_node("Mul", [tag + "/f", tag + "/su"], [out], name=tag + "/mul"),
                ]
                g.initializer.append(numpy_helper.from_array(np.array([-1], dtype=np.int64), tag + "/axes"))
                added.append(tag + "/axes")
        if len(gathers) < len(users):  # other readers (e.g. a tied LM head) get the dequantized table
            zp_name = name + names.ZP_SUFFIX
            g.initializer.append(numpy_helper.from_array(np.zeros(qt.scale.shape, np.int8), zp_name))
            added.append(zp_name)
            new_nodes.append(helper.make_node("DequantizeLinear", [q_name, s_name, zp_name], [name], axis=0,
                                              name=name + "/dequantize"))
    # Producers first keeps the graph topologically sorted.
    nodes = new_nodes + list(g.node)
    del g.node[:]
    g.node.extend(_toposort(nodes, {i.name for i in g.input} | {i.name for i in g.initializer}))
    return added


def apply_int4(model: onnx.ModelProto, quantized: dict[str, Int4Tensor]) -> list[str]:
    """Replace each fp32 initializer in ``quantized`` by its packed 4-bit codes (uint8), block
    scales and block mins, unpacked inside the graph with standard ops (no int4 tensor type:
    onnxruntime 1.19's Python API cannot feed one, and the lean graphs take weights as inputs).

    As in ``apply_int8``: row Gathers of a table gather packed rows, scales and mins, and unpack
    only those rows; every other reader gets the whole weight unpacked under its own name.
    Returns the new initializer names."""
    if not quantized:
        return []
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    added: list[str] = []
    new_nodes: list[onnx.NodeProto] = []
    consts = {"/int4/low": np.array(0x0F, np.uint8), "/int4/four": np.array(4, np.uint8),
              "/int4/last": np.array([-1], np.int64)}
    for i, (name, qt) in enumerate(quantized.items()):
        if name not in inits:
            raise ExportError(f"quantized weight {name!r} is not an initializer of the exported graph")
        g.initializer.remove(inits[name])
        q_name, s_name, m_name = name + names.Q_SUFFIX, name + names.SCALE_SUFFIX, name + MIN_SUFFIX
        g.initializer.extend([numpy_helper.from_array(qt.packed, q_name), numpy_helper.from_array(qt.scale, s_name),
                              numpy_helper.from_array(qt.min, m_name)])
        added += [q_name, s_name, m_name]
        rows, cols = qt.shape
        tag = f"int4_{i}"  # short: intermediate names are a good part of a small graph's bytes
        consts[f"{tag}/tail"] = np.array([cols // INT4_BLOCK, INT4_BLOCK], np.int64)
        consts[f"{tag}/cols"] = np.array([cols], np.int64)
        users = _consumers(g, name)
        gathers = [n for n in users if is_row_gather(n, name)]
        for k, node in enumerate(gathers):
            idx, out, t = node.input[1], node.output[0], f"{tag}g{k}"
            node.input[0], node.output[0] = q_name, t + "/q"
            new_nodes += [helper.make_node("Gather", [src, idx], [f"{t}/{part}"], axis=0, name=f"{t}/gather_{part}")
                          for src, part in ((s_name, "s"), (m_name, "m"))]
            new_nodes.append(helper.make_node("Shape", [idx], [t + "/lead"], name=t + "/lead"))
            new_nodes += _unpack_int4(t, t + "/q", t + "/s", t + "/m", t + "/lead", tag, out)
        if len(gathers) < len(users):
            consts[f"{tag}/rows"] = np.array([rows], np.int64)
            new_nodes += _unpack_int4(tag, q_name, s_name, m_name, f"{tag}/rows", tag, name)
    g.initializer.extend(numpy_helper.from_array(v, k) for k, v in consts.items())
    added += list(consts)
    nodes = new_nodes + list(g.node)
    del g.node[:]
    g.node.extend(_toposort(nodes, {i.name for i in g.input} | {i.name for i in g.initializer}))
    return added


def _unpack_int4(tag: str, q: str, s: str, m: str, lead: str, shapes: str, out: str) -> list[onnx.NodeProto]:
    """Nodes turning packed codes ``q`` (*lead, cols/2), scales ``s`` and mins ``m`` (*lead,
    blocks) into ``out`` = q * s + m (*lead, cols) in float32: low nibble first, then the high
    one, interleaved; then per block (the same two float32 operations as the numpy reference).
    ``shapes``: the prefix of the weight's (blocks, block) and (cols,) shape constants."""
    def node(op, ins, outs, **kw):
        return helper.make_node(op, ins, [f"{tag}/{o}" if o != out else o for o in outs], name=f"{tag}/{outs[0]}", **kw)

    t = lambda n: f"{tag}/{n}"  # noqa: E731
    return [
        node("BitwiseAnd", [q, "/int4/low"], ["lo"]),
        node("BitShift", [q, "/int4/four"], ["hi"], direction="RIGHT"),
        node("Unsqueeze", [t("lo"), "/int4/last"], ["lo1"]),
        node("Unsqueeze", [t("hi"), "/int4/last"], ["hi1"]),
        node("Concat", [t("lo1"), t("hi1")], ["pairs"], axis=-1),
        node("Cast", [t("pairs")], ["codes"], to=TensorProto.FLOAT),
        node("Concat", [lead, f"{shapes}/tail"], ["blocks_shape"], axis=0),
        node("Reshape", [t("codes"), t("blocks_shape")], ["blocks"]),
        node("Cast", [s], ["scale"], to=TensorProto.FLOAT),
        node("Unsqueeze", [t("scale"), "/int4/last"], ["scale1"]),
        node("Cast", [m], ["min"], to=TensorProto.FLOAT),
        node("Unsqueeze", [t("min"), "/int4/last"], ["min1"]),
        node("Mul", [t("blocks"), t("scale1")], ["scaled"]),
        node("Add", [t("scaled"), t("min1")], ["shifted"]),
        node("Concat", [lead, f"{shapes}/cols"], ["out_shape"], axis=0),
        node("Reshape", [t("shifted"), t("out_shape")], [out]),
    ]


def _toposort(nodes: list[onnx.NodeProto], available: set[str]) -> list[onnx.NodeProto]:
    ready, pending, out = set(available) | {""}, list(nodes), []
    while pending:
        progressed = False
        rest = []
        for n in pending:
            if all(i in ready for i in n.input):
                out.append(n)
                ready.update(n.output)
                progressed = True
            else:
                rest.append(n)
        if not progressed:
            raise ExportError(f"graph rewrite left {len(rest)} nodes with unresolved inputs (e.g. {rest[0].name})")
        pending = rest
    return out


def add_layernorm_stats(model: onnx.ModelProto) -> None:
    """ORT's LayerNormalization gradient needs the Mean and InvStdDev outputs, which the
    opset-17 exporter omits."""
    for node in model.graph.node:
        if node.op_type == "LayerNormalization" and len(node.output) == 1:
            node.output.extend([node.output[0] + "/mean", node.output[0] + "/inv_std"])


def spell_out_hard_activations(model: onnx.ModelProto) -> None:
    """HardSigmoid and HardSwish (torch's hardsigmoid/hardswish, MobileNetV3) have no gradient in
    ORT's training build: spell them with Relu, which has one. hardsigmoid(x) = clamp(t, 0, 1) =
    Relu(t) - Relu(t - 1) with t = alpha x + beta; hardswish(x) = x * hardsigmoid(x)."""
    g = model.graph
    nodes: list[onnx.NodeProto] = []
    for k, node in enumerate(g.node):
        if node.op_type not in ("HardSigmoid", "HardSwish"):
            nodes.append(node)
            continue
        attrs = {a.name: a.f for a in node.attribute}
        alpha, beta = attrs.get("alpha", 1 / 6 if node.op_type == "HardSwish" else 0.2), attrs.get("beta", 0.5)
        x, tag = node.input[0], f"{node.name or node.op_type}/spelled{k}"
        consts = {"alpha": alpha, "beta": beta, "one": 1.0}
        g.initializer.extend(numpy_helper.from_array(np.array(v, np.float32), f"{tag}/{n}") for n, v in consts.items())
        hsig = node.output[0] if node.op_type == "HardSigmoid" else tag + "/hsig"
        nodes += [helper.make_node("Mul", [x, tag + "/alpha"], [tag + "/ax"]),
                  helper.make_node("Add", [tag + "/ax", tag + "/beta"], [tag + "/t"]),
                  helper.make_node("Sub", [tag + "/t", tag + "/one"], [tag + "/t1"]),
                  helper.make_node("Relu", [tag + "/t"], [tag + "/r"]),
                  helper.make_node("Relu", [tag + "/t1"], [tag + "/r1"]),
                  helper.make_node("Sub", [tag + "/r", tag + "/r1"], [hsig])]
        if node.op_type == "HardSwish":
            nodes.append(helper.make_node("Mul", [x, hsig], [node.output[0]]))
    del g.node[:]
    g.node.extend(nodes)


def freeze_batchnorm(model: onnx.ModelProto) -> None:
    """Inference-mode BatchNormalization spelled as y = x * a + (bias - mean * a), a = weight /
    sqrt(var + eps) (ATen's own order), per channel. ORT's artifact builder would otherwise turn
    it into its training kernel, which normalises with the batch's statistics and updates the
    running ones: a frozen BatchNorm must keep its running statistics (as eager eval() does)."""
    ranks = _ranks(model)
    nodes: list[onnx.NodeProto] = []
    for k, n in enumerate(model.graph.node):
        if n.op_type != "BatchNormalization" or n.input[0] not in ranks:
            nodes.append(n)
            continue
        x, w, b, mean, var = n.input
        eps = next((a.f for a in n.attribute if a.name == "epsilon"), 1e-5)
        t = f"{n.name or 'bn'}/frozen{k}"
        shape = np.array([-1] + [1] * (ranks[x] - 2), np.int64)
        nodes += [_const(t + "/eps", np.array(eps, np.float32)), _const(t + "/shape", shape),
                  helper.make_node("Add", [var, t + "/eps"], [t + "/var_eps"]),
                  helper.make_node("Sqrt", [t + "/var_eps"], [t + "/std"]),
                  helper.make_node("Div", [w, t + "/std"], [t + "/a"]),
                  helper.make_node("Mul", [mean, t + "/a"], [t + "/mean_a"]),
                  helper.make_node("Sub", [b, t + "/mean_a"], [t + "/c"]),
                  helper.make_node("Reshape", [t + "/a", t + "/shape"], [t + "/a_c"]),
                  helper.make_node("Reshape", [t + "/c", t + "/shape"], [t + "/c_c"]),
                  helper.make_node("Mul", [x, t + "/a_c"], [t + "/xa"]),
                  helper.make_node("Add", [t + "/xa", t + "/c_c"], [n.output[0]])]
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def _const(name: str, value: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value, name))


def _ranks(model: onnx.ModelProto) -> dict[str, int]:
    """Rank of every tensor shape inference can tell."""
    g = onnx.shape_inference.infer_shapes(model).graph
    return {v.name: len(v.type.tensor_type.shape.dim) for v in [*g.value_info, *g.input, *g.output]
            if v.type.tensor_type.HasField("shape")}


def expose_as_inputs(model: onnx.ModelProto, tensor_names: list[str]) -> onnx.ModelProto:
    """A copy whose ``tensor_names`` initializers are also graph inputs: ONNX Runtime uses the
    stored values unless the caller feeds others, so any adapter can be fed at run time."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {i.name: i for i in m.graph.initializer}
    for n in tensor_names:
        t = inits[n]
        m.graph.input.append(helper.make_tensor_value_info(n, t.data_type, list(t.dims)))
    return m
