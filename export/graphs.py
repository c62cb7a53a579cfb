"""The exported graphs of a Brevitas QNN and how each is derived from the one before.

1. **QONNX** (FINN and other FPGA toolchains): Brevitas' ``export_qonnx`` (TorchScript exporter,
   opset 13), cleaned with qonnx, every shape static with batch 1, as FINN's front end needs
   (:func:`finn_problems` lists what it checks; a symbolic batch gave FINN's hardware layers
   zero input vectors). The graphs below derive from its twin with a symbolic batch. Its
   quantisers are
   ``Quant(x, s, z, b) = s * (clip(round(x / s + z), lo, hi) - z)`` and
   ``BipolarQuant(x, s) = s * (+1 if x >= 0 else -1)``.
2. **QCDQ** (onnxruntime and any ONNX runtime), derived from the QONNX graph: each activation
   ``Quant`` becomes ``QuantizeLinear -> Clip(lo, hi) -> DequantizeLinear`` (the Clip only when
   [lo, hi] is narrower than int8/uint8); each weight ``Quant`` is folded to an integer initializer
   followed by ``DequantizeLinear``. Binary (+-1) tensors are narrow 2-bit integers:
   ``BipolarQuant(x, s)`` becomes ``Where(x >= 0, 1, -1) -> QuantizeLinear(1) ->
   DequantizeLinear(s)``, binary weights int8 +-1 with scale s. Stock Brevitas refuses both.
3. **integer**, derived from the QCDQ graph: every Conv / MatMul / Gemm whose input and weight are
   dequantised integers runs as ``ConvInteger`` / ``MatMulInteger`` on those integers, then
   ``y = (s_x * s_w) * float(acc) + bias`` with ``acc = sum (x_q - z_x) (w_q - z_w)`` computed
   exactly in int32 (the float graph computes the same sum in float). Layout ops between the
   input's DequantizeLinear and the layer (MaxPool, Reshape, Flatten, Transpose) move to the
   integer side: they commute with ``s * (q - z)`` for ``s > 0``.

   With ``unsigned_operands=True`` (the default) both operands are given to the kernels as
   uint8: int8 integers and their zero points are
   shifted by +128 (the same real values; activations by rewriting their QuantizeLinear / Clip /
   DequantizeLinear in uint8, weights offline). onnxruntime's u8 x s8 kernels on x86 CPUs
   without VNNI sum pairs of products in int16 with saturation, wrong once
   ``2 * x_q * |w_q| > 32767`` (8-bit activations with 8-bit weights); its u8 x u8 kernels do
   not saturate (and were 4x faster than the s8 ones for ConvInteger on this project's AVX2
   CPU). :mod:`runtime` checks every kernel configuration the graph uses on
   the running machine anyway.
4. **integer-only** (:mod:`int_only`), derived from the integer graph: BatchNorm and the
   activation quantiser after each accumulator become exact integer thresholds, so every tensor
   between the input quantiser and the last layer is an integer.
5. **float**: the same network with dequantised float weights and no activation quantisers, for
   latency comparisons only (its outputs differ from the QNN's).
"""
from __future__ import annotations

import copy
import os
import re
import tempfile
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 13
# Ops that only move or select values: they commute with dequantisation s * (q - z), s > 0.
LAYOUT_OPS = ("MaxPool", "Reshape", "Flatten", "Transpose", "Identity", "Squeeze", "Unsqueeze")
LAYER_OPS = ("Conv", "MatMul", "Gemm")


class ExportError(ValueError):
    """A model or graph that cannot be exported in the requested form; the message names it."""


# --- small graph helpers --------------------------------------------------------------------

class Graph:
    """Initializers (as numpy arrays), the producer of each tensor and inferred shapes of one
    ONNX graph; new initializers are collected here until :func:`_finish` writes them."""

    def __init__(self, model: onnx.ModelProto):
        self.inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        self.producer = {o: n for n in model.graph.node for o in n.output}
        self.shapes = {}
        inferred = onnx.shape_inference.infer_shapes(model)
        for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + \
                list(inferred.graph.output):
            t = vi.type.tensor_type
            if t.HasField("shape"):
                self.shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None
                                        for d in t.shape.dim]
        self._count = 0

    def const(self, name: str) -> Optional[np.ndarray]:
        return self.inits.get(name)

    def rank(self, name: str) -> Optional[int]:
        if name in self.inits:
            return self.inits[name].ndim
        return len(self.shapes[name]) if name in self.shapes else None

    def fresh(self, base: str) -> str:
        self._count += 1
        return f"{base}__{self._count}"

    def add_init(self, base: str, value: np.ndarray, exact_name: bool = False) -> str:
        name = base if exact_name else self.fresh(base)
        self.inits[name] = np.asarray(value)
        return name


def _attrs(node) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _finish(model: onnx.ModelProto, nodes, inits: Dict[str, np.ndarray]) -> onnx.ModelProto:
    """Replace the graph's nodes and initializers, drop nodes whose outputs nobody uses, set the
    default-domain opset to 13 (no QONNX domain left) and check the result."""
    g = model.graph
    outputs = {o.name for o in g.output}
    while True:
        used = {i for n in nodes for i in n.input} | outputs
        kept = [n for n in nodes if any(o in used for o in n.output)]
        if len(kept) == len(nodes):
            break
        nodes = kept
    used = {i for n in nodes for i in n.input} | outputs
    del g.node[:]
    g.node.extend(nodes)
    del g.initializer[:]
    g.initializer.extend(numpy_helper.from_array(v, k) for k, v in inits.items() if k in used)
    del g.value_info[:]
    ops = [o for o in model.opset_import
           if o.domain not in ("", "ai.onnx", "qonnx.custom_op.general")]
    del model.opset_import[:]
    model.opset_import.extend([helper.make_opsetid("", OPSET)] + ops)
    onnx.checker.check_model(model)
    return model


# --- PyTorch -> QONNX ------------------------------------------------------------------------

INPUT, OUTPUT = "x", "logits"  # for the exporter; qonnx's cleanup names them global_in/out


def qonnx_from_torch(model, example_input, dynamic_batch: bool = False) -> onnx.ModelProto:
    """QONNX graph of ``model`` in eval mode (a copy with stock quantisers: ANA twins are stock
    quantisers once noise-free), cleaned by qonnx. By default every shape is static with batch
    1, as FINN's front end needs (:func:`finn_problems`); ``dynamic_batch=True`` gives the same
    graph with a symbolic batch ``N``, from which the onnxruntime graphs are derived."""
    import brevitas_ana
    from brevitas.export import export_qonnx
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.util.cleanup import cleanup_model

    net = brevitas_ana.to_stock(copy.deepcopy(model)).eval().cpu()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "qonnx.onnx")
        try:
            export_qonnx(net, args=example_input[:1].detach().cpu().float(), export_path=path,
                         dynamo=False, opset_version=OPSET, input_names=[INPUT],
                         output_names=[OUTPUT],
                         dynamic_axes={INPUT: {0: "N"}, OUTPUT: {0: "N"}} if dynamic_batch
                         else None)
        except Exception as e:  # torch's exporter: one line naming the operator, not its trace
            text = " ".join(str(e).split())
            op = re.search(r"(aten::\w+|prim::\w+|onnx::\w+)", text)
            what = f"operator {op.group(1)}" if op else f"this model ({text[:200]})"
            raise ExportError(
                f"the ONNX exporter (TorchScript, opset {OPSET}) cannot export {what}; replace "
                f"the module that calls it with one made of exportable ops (timm attention: "
                f"create the model with fused_attn=False, or set block.attn.fused_attn = "
                f"False), or export the network without it") from None
        return cleanup_model(ModelWrapper(path)).model


QONNX_DOMAIN = "qonnx.custom_op.general"
QONNX_OPS = ("Quant", "BipolarQuant", "Trunc")


def finn_problems(model: onnx.ModelProto) -> List[str]:
    """What FINN's front end (ConvertQONNXtoFINN, streamlining, conversion to hardware layers)
    expects of a QONNX file and this one lacks; empty when the file is FINN-ready: one input and
    one output; every tensor shape static, batch 1 (FINN sizes its hardware layers from them);
    default-domain opset 13 and QONNX ops in the ``qonnx.custom_op.general`` domain; the
    quantisers' scale, zero point and bit width constant initializers; no initializer listed as
    a graph input; unique, non-empty node names; weights inside the file."""
    problems = []
    g = model.graph
    if len(g.input) != 1 or len(g.output) != 1:
        problems.append(f"{len(g.input)} inputs and {len(g.output)} outputs (FINN takes one each)")
    inits = {i.name for i in g.initializer}
    if any(i.name in inits for i in g.input):
        problems.append("initializers listed as graph inputs")
    if any(i.data_location == TensorProto.EXTERNAL for i in g.initializer):
        problems.append("weights stored outside the file")
    opsets = {o.domain: o.version for o in model.opset_import}
    if opsets.get("", opsets.get("ai.onnx")) != OPSET:
        problems.append(f"default opset {opsets.get('', opsets.get('ai.onnx'))}, not {OPSET}")
    names = [n.name for n in g.node]
    if not all(names) or len(set(names)) != len(names):
        problems.append("node names missing or repeated")
    for n in g.node:
        if n.op_type in QONNX_OPS:
            if n.domain != QONNX_DOMAIN:
                problems.append(f"{n.name}: {n.op_type} in domain {n.domain!r}, not "
                                f"{QONNX_DOMAIN!r}")
            if any(i not in inits for i in n.input[1:]):
                problems.append(f"{n.name}: quantiser parameters are not constant initializers")
        elif n.domain not in ("", "ai.onnx"):
            problems.append(f"{n.name}: op {n.domain}.{n.op_type} unknown to FINN's front end")
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    except Exception as e:  # the custom ops leave their outputs to qonnx: checked below
        inferred = model
        problems.append(f"shape inference fails: {str(e).splitlines()[0]}")
    values = list(inferred.graph.input) + list(inferred.graph.output) + \
        list(inferred.graph.value_info)
    for vi in values:
        dims = vi.type.tensor_type.shape.dim
        if not all(d.HasField("dim_value") and d.dim_value > 0 for d in dims):
            shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                     for d in dims]
            problems.append(f"tensor {vi.name} has shape {shape}, not static")
            break
    for vi in list(g.input) + list(g.output):
        dims = vi.type.tensor_type.shape.dim
        if not dims or dims[0].dim_value != 1:
            problems.append(f"{vi.name}: batch dimension is not 1")
    return problems


# --- QONNX -> QCDQ --------------------------------------------------------------------------

@dataclass
class QuantSpec:
    """One QONNX quantiser with constant parameters: integer range [lo, hi] of ``q``, scale ``s``
    and zero point ``z`` along ``axis`` (None: per tensor)."""
    scale: np.ndarray
    zero_point: np.ndarray
    lo: int
    hi: int
    signed: bool
    axis: Optional[int]

    @property
    def dtype(self):
        return np.int8 if self.signed else np.uint8

    def quantise(self, x: np.ndarray) -> np.ndarray:
        """clip(round(x / s + z), lo, hi), round half to even as Brevitas and QONNX do."""
        s, z = self._broadcast(self.scale, x.ndim), self._broadcast(self.zero_point, x.ndim)
        return np.clip(np.round(x.astype(np.float32) / s + z), self.lo, self.hi).astype(self.dtype)

    def dequantise(self, q: np.ndarray) -> np.ndarray:
        s, z = self._broadcast(self.scale, q.ndim), self._broadcast(self.zero_point, q.ndim)
        return (s * (q.astype(np.float32) - z)).astype(np.float32)

    def _broadcast(self, v, ndim):
        if self.axis is None:
            return np.float32(v)
        shape = [1] * ndim
        shape[self.axis] = -1
        return v.astype(np.float32).reshape(shape)


def _per_axis(node, value: np.ndarray, rank: Optional[int]):
    """(axis, 1-D values) of a scale/zero point stored in broadcast form; axis None: scalar."""
    if value.size == 1:
        return None, value.reshape(())
    big = [i for i, d in enumerate(value.shape) if d > 1]
    if len(big) != 1 or rank is None:
        raise ExportError(f"{node.name}: scale/zero point of shape {list(value.shape)} is not per "
                          f"tensor or per channel; QuantizeLinear cannot express it")
    return rank - value.ndim + big[0], value.reshape(-1)


def quant_spec(graph: Graph, node) -> QuantSpec:
    """The constant parameters of a QONNX ``Quant`` or ``BipolarQuant`` node."""
    params = [graph.const(n) for n in node.input[1:]]
    if any(p is None for p in params):
        raise ExportError(f"{node.name}: quantiser parameters are not constant (was the model in "
                          f"eval mode with trained scales?)")
    rank = graph.rank(node.input[0])
    if node.op_type == "BipolarQuant":
        axis, scale = _per_axis(node, params[0], rank)
        return QuantSpec(scale.astype(np.float32), np.zeros_like(scale, dtype=np.float32),
                         -1, 1, True, axis)
    scale, zero_point, bits = params
    attrs = _attrs(node)
    rounding = attrs.get("rounding_mode", b"ROUND")
    rounding = rounding.decode() if isinstance(rounding, bytes) else rounding
    if rounding.upper() != "ROUND":
        raise ExportError(f"{node.name}: rounding mode {rounding} has no QuantizeLinear equivalent "
                          f"(round half to even)")
    b = float(np.asarray(bits).reshape(-1)[0])
    if bits.size != 1 or b != int(b) or not 1 < b <= 8:
        raise ExportError(f"{node.name}: bit width {bits.reshape(-1).tolist()} is not an integer "
                          f"in 2..8; QuantizeLinear holds int8/uint8")
    b, signed, narrow = int(b), bool(attrs.get("signed", 1)), bool(attrs.get("narrow", 0))
    lo = -(2 ** (b - 1)) + narrow if signed else 0
    hi = 2 ** (b - 1) - 1 if signed else 2 ** b - 1 - narrow
    axis, s = _per_axis(node, scale, rank)
    z_axis, z = _per_axis(node, zero_point, rank)
    if z_axis is not None and z_axis != axis:
        raise ExportError(f"{node.name}: zero point and scale vary along different axes")
    if np.any(z != np.round(z)):
        raise ExportError(f"{node.name}: zero point {z.tolist()} is not an integer")
    z = np.broadcast_to(z, s.shape).astype(np.float32)
    return QuantSpec(s.astype(np.float32), z, lo, hi, signed, axis)


def _q_dq(graph: Graph, name: str, spec: QuantSpec, scale=None):
    """(scale, zero point) initializers for QuantizeLinear/DequantizeLinear and the axis attr."""
    s = graph.add_init(f"{name}_scale", (spec.scale if scale is None else scale).astype(np.float32))
    z = graph.add_init(f"{name}_zero_point", spec.zero_point.astype(spec.dtype))
    return s, z, ({} if spec.axis is None else {"axis": spec.axis})


def qonnx_to_qcdq(model: onnx.ModelProto) -> onnx.ModelProto:
    """The QCDQ graph of a QONNX graph (module docstring, item 2)."""
    model = copy.deepcopy(model)
    graph = Graph(model)
    nodes = []
    for node in model.graph.node:
        if node.domain.startswith("qonnx") and node.op_type not in ("Quant", "BipolarQuant"):
            raise ExportError(f"{node.name}: QONNX op {node.op_type} has no QCDQ form")
        if node.op_type not in ("Quant", "BipolarQuant"):
            nodes.append(node)
            continue
        spec = quant_spec(graph, node)
        x, y, name = node.input[0], node.output[0], node.name
        weight = graph.const(x)
        if weight is not None:  # constant: fold to integers
            q = (np.where(weight >= 0, 1, -1).astype(np.int8) if node.op_type == "BipolarQuant"
                 else spec.quantise(weight))
            s, z, axis = _q_dq(graph, name, spec)
            q_name = graph.add_init(f"{name}_int", q, exact_name=True)
            nodes.append(helper.make_node("DequantizeLinear", [q_name, s, z], [y],
                                          name=f"{name}_dq", **axis))
            continue
        if node.op_type == "BipolarQuant":
            ge, sign = graph.fresh(f"{name}_ge"), graph.fresh(f"{name}_sign")
            zero = graph.add_init(f"{name}_zero", np.array(0, np.float32))
            plus = graph.add_init(f"{name}_plus", np.array(1, np.float32))
            minus = graph.add_init(f"{name}_minus", np.array(-1, np.float32))
            nodes += [helper.make_node("GreaterOrEqual", [x, zero], [ge], name=f"{name}_ge"),
                      helper.make_node("Where", [ge, plus, minus], [sign], name=f"{name}_sign")]
            q_in, q_scale = sign, np.ones_like(spec.scale)
        else:
            q_in, q_scale = x, spec.scale
        s_q, z_q, axis = _q_dq(graph, f"{name}_q", spec, q_scale)
        q = graph.fresh(f"{name}_q")
        nodes.append(helper.make_node("QuantizeLinear", [q_in, s_q, z_q], [q], name=f"{name}_q",
                                      **axis))
        info = np.iinfo(spec.dtype)
        if (spec.lo, spec.hi) != (info.min, info.max):
            lo = graph.add_init(f"{name}_lo", np.array(spec.lo, spec.dtype))
            hi = graph.add_init(f"{name}_hi", np.array(spec.hi, spec.dtype))
            clipped = graph.fresh(f"{name}_clip")
            nodes.append(helper.make_node("Clip", [q, lo, hi], [clipped], name=f"{name}_clip"))
            q = clipped
        s, z, axis = _q_dq(graph, name, spec)
        nodes.append(helper.make_node("DequantizeLinear", [q, s, z], [y], name=f"{name}_dq", **axis))
    return _finish(model, nodes, graph.inits)


# --- QCDQ -> integer ------------------------------------------------------------------------

@dataclass
class Layer:
    """One quantised Conv / MatMul / Gemm of the network and how the integer graph runs it."""
    name: str
    op: str
    output: str
    integer: bool = False
    kernel: str = ""                 # ConvInteger | MatMulInteger, when integer
    weight: str = ""                 # name of its integer weight initializer in the integer graph
    x_dtype: str = ""                # operand types and zero points the kernel receives
    x_zero_point: int = 0
    w_dtype: str = ""
    w_zero_point: int = 0
    x_range: List[int] = field(default_factory=list)   # range of x_q - z_x
    w_range: List[int] = field(default_factory=list)   # range of w_q - z_w
    reason: str = ""                 # why it stays float, when not integer
    # the same layer in the QCDQ graph: its weight initializer and its input's type / zero point
    qcdq_weight: str = ""
    qcdq_x_dtype: str = ""
    qcdq_x_zero_point: int = 0
    qcdq_w_dtype: str = ""
    qcdq_w_zero_point: int = 0
    out_scale: Optional[np.ndarray] = None  # s_x * s_w, broadcast like the layer output


def _dq_params(graph: Graph, dq):
    """(scale, zero point, axis) of a DequantizeLinear with constant parameters."""
    s = graph.const(dq.input[1])
    z = graph.const(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else None
    if s is None:
        raise ExportError(f"{dq.name}: DequantizeLinear scale is not a constant")
    z = np.zeros(s.shape, np.int8) if z is None else z
    return s, z, _attrs(dq).get("axis", 1)


def _activation_chain(graph: Graph, dq):
    """(QuantizeLinear, Clip or None) that produce the integers a DequantizeLinear reads."""
    clip = graph.producer.get(dq.input[0])
    q = clip
    if clip is not None and clip.op_type == "Clip":
        q = graph.producer.get(clip.input[0])
    else:
        clip = None
    if q is None or q.op_type != "QuantizeLinear" or len(q.input) < 3:
        return None
    return q, clip


def _int_range(graph: Graph, chain, dtype) -> List[int]:
    """[lo, hi] of the integers: the Clip bounds, +-1 after a sign (binary), else the dtype's."""
    q, clip = chain
    if clip is not None:
        return [int(graph.const(clip.input[1])), int(graph.const(clip.input[2]))]
    if q.input[0] in graph.producer and graph.producer[q.input[0]].op_type == "Where":
        return [-1, 1]
    info = np.iinfo(dtype)
    return [int(info.min), int(info.max)]


def _make_unsigned(graph: Graph, dq, chain):
    """Re-express an int8 QuantizeLinear -> [Clip] -> DequantizeLinear chain in uint8 with every
    integer and zero point shifted by +128: the same real values, in place (a second layer
    reading the same chain then finds it unsigned already)."""
    q, clip = chain
    for node, index in [(q, 2), (dq, 2)]:
        z = graph.const(node.input[index]).astype(np.int16) + 128
        node.input[index] = graph.add_init(f"{node.name}_zero_point_u8", z.astype(np.uint8))
    if clip is not None:
        for index in (1, 2):
            bound = int(graph.const(clip.input[index])) + 128
            clip.input[index] = graph.add_init(f"{clip.name}_bound_u8", np.array(bound, np.uint8))


@dataclass
class _Operands:
    """What the integer kernel of one layer reads: the input's DequantizeLinear and the chain
    that makes its integers, the layout ops between them and the layer, the integer weight and
    the scales and zero points of both."""
    x_dq: object
    chain: tuple
    layout: list
    s_x: np.ndarray
    z_x: np.ndarray
    w_dq: object
    w_q: np.ndarray
    s_w: np.ndarray
    z_w: np.ndarray
    attrs: dict


def _operands(graph: Graph, node, layer: Layer) -> Optional[_Operands]:
    """The operands of a quantised layer, or None with ``layer.reason`` saying why the
    integer graph keeps it in float."""
    w_dq = graph.producer.get(node.input[1])
    # the input: DequantizeLinear of quantised integers, possibly behind layout ops
    layout, t = [], node.input[0]
    while t in graph.producer and graph.producer[t].op_type in LAYOUT_OPS:
        layout.append(graph.producer[t])
        t = graph.producer[t].input[0]
    x_dq = graph.producer.get(t)
    chain = _activation_chain(graph, x_dq) if x_dq is not None and \
        x_dq.op_type == "DequantizeLinear" else None
    if chain is None:
        layer.reason = "input not quantised"
        return None
    s_x, z_x, _ = _dq_params(graph, x_dq)
    if s_x.size != 1:
        layer.reason = "input scale not per tensor"
        return None
    w_q = graph.const(w_dq.input[0])
    s_w, z_w, w_axis = _dq_params(graph, w_dq)
    attrs = _attrs(node)
    if node.op_type == "Gemm":
        if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
            layer.reason = "Gemm with transA/alpha/beta"
            return None
        if attrs.get("transB", 0):
            w_q, w_axis = w_q.T, (1 - w_axis if s_w.size > 1 else w_axis)
    out_axis = 0 if node.op_type == "Conv" else 1
    if s_w.size > 1 and w_axis % w_q.ndim != out_axis:
        layer.reason = "weight scale varies along the input axis"
        return None
    if np.any(z_w != z_w.reshape(-1)[0]):
        layer.reason = "weight zero point varies per channel"
        return None
    return _Operands(x_dq, chain, layout, s_x, z_x, w_dq, w_q, s_w, z_w, attrs)


def _to_integer(graph: Graph, qcdq: Graph, node, nodes: list,
                unsigned_operands: bool) -> Optional[Layer]:
    """The Layer of a Conv / MatMul / Gemm, its integer kernel appended to ``nodes`` when it can
    run as one; None for a layer whose weight is not quantised (a float layer of the network)."""
    w_dq = graph.producer.get(node.input[1])
    if w_dq is None or w_dq.op_type != "DequantizeLinear" or graph.const(w_dq.input[0]) is None:
        return None
    layer = Layer(node.name, node.op_type, node.output[0])
    ops = _operands(graph, node, layer)
    if ops is None:
        return layer
    zx, zw = int(ops.z_x.reshape(())), int(ops.z_w.reshape(-1)[0])
    x_lo, x_hi = _int_range(graph, ops.chain, ops.z_x.dtype)
    w_q = ops.w_q
    layer.x_range = [x_lo - zx, x_hi - zx]
    layer.w_range = [int(w_q.astype(np.int64).min()) - zw, int(w_q.astype(np.int64).max()) - zw]
    qcdq_z = qcdq.const(qcdq.producer[ops.x_dq.output[0]].input[2])  # before any shift below
    layer.qcdq_weight = ops.w_dq.input[0]
    layer.qcdq_x_dtype, layer.qcdq_x_zero_point = qcdq_z.dtype.name, int(qcdq_z.reshape(()))
    layer.qcdq_w_dtype, layer.qcdq_w_zero_point = w_q.dtype.name, zw

    # Operands as uint8 (module docstring, item 3): shift int8 integers and zero points by 128.
    if unsigned_operands and ops.z_x.dtype == np.int8:
        _make_unsigned(graph, ops.x_dq, ops.chain)
        zx += 128
    if unsigned_operands and w_q.dtype == np.int8:
        w_q, zw = (w_q.astype(np.int16) + 128).astype(np.uint8), zw + 128
    x_dtype = np.uint8 if (unsigned_operands or ops.z_x.dtype == np.uint8) else np.int8
    layer.x_dtype, layer.x_zero_point = np.dtype(x_dtype).name, zx
    layer.w_dtype, layer.w_zero_point = w_q.dtype.name, zw
    _emit_integer(graph, node, layer, ops, w_q, x_dtype, zx, zw, nodes)
    return layer


def _emit_integer(graph: Graph, node, layer: Layer, ops: _Operands, w_q, x_dtype, zx: int,
                  zw: int, nodes: list):
    """The layer as ``Cast(ConvInteger | MatMulInteger) * (s_x s_w) [+ bias]``, its input's layout
    ops replayed on the integers."""
    name = node.name
    x_int = ops.x_dq.input[0]
    for op in reversed(ops.layout):  # the same layout ops, on the integers
        out = graph.fresh(f"{op.name}_int_{name}")
        nodes.append(helper.make_node(op.op_type, [x_int] + list(op.input[1:]), [out],
                                      name=graph.fresh(f"{op.name}_int"), **_attrs(op)))
        x_int = out
    x_zp = graph.add_init(f"{name}_x_zero_point", np.array(zx, x_dtype))
    w_name = graph.add_init(f"{name}_w_int", np.ascontiguousarray(w_q), exact_name=True)
    w_zp = graph.add_init(f"{name}_w_zero_point", np.array(zw, w_q.dtype))
    acc, acc_f = graph.fresh(f"{name}_acc"), graph.fresh(f"{name}_acc_f")
    if node.op_type == "Conv":
        kernel, kernel_attrs = "ConvInteger", ops.attrs
        scale_shape = [1, -1] + [1] * (w_q.ndim - 2)
    else:
        kernel, kernel_attrs = "MatMulInteger", {}
        scale_shape = [-1]
    nodes.append(helper.make_node(kernel, [x_int, w_name, x_zp, w_zp], [acc],
                                  name=f"{name}_integer", **kernel_attrs))
    out_scale = np.float32(ops.s_x.reshape(())) * ops.s_w.astype(np.float32).reshape(-1)
    out_scale = out_scale.reshape(scale_shape) if out_scale.size > 1 else out_scale.reshape(())
    scale = graph.add_init(f"{name}_out_scale", out_scale.astype(np.float32))
    bias = _bias(graph, node)
    scaled = graph.fresh(f"{name}_scaled") if bias is not None else node.output[0]
    nodes += [helper.make_node("Cast", [acc], [acc_f], to=TensorProto.FLOAT, name=f"{name}_cast"),
              helper.make_node("Mul", [acc_f, scale], [scaled], name=f"{name}_rescale")]
    if bias is not None:
        b = graph.add_init(f"{name}_bias", bias.reshape(scale_shape if bias.size > 1 else ()))
        nodes.append(helper.make_node("Add", [scaled, b], [node.output[0]], name=f"{name}_bias"))
    layer.integer, layer.kernel, layer.weight = True, kernel, w_name
    layer.out_scale = out_scale


def _bias(graph: Graph, node) -> Optional[np.ndarray]:
    """The layer's bias as float32 (a constant, or a DequantizeLinear of constant integers)."""
    index = 2 if node.op_type in ("Conv", "Gemm") else None
    if index is None or len(node.input) <= index or not node.input[index]:
        return None
    b = graph.const(node.input[index])
    if b is not None:
        return b.astype(np.float32)
    dq = graph.producer.get(node.input[index])
    if dq is not None and dq.op_type == "DequantizeLinear" and graph.const(dq.input[0]) is not None:
        s, z, _ = _dq_params(graph, dq)
        q = graph.const(dq.input[0]).astype(np.float32)
        return (s.astype(np.float32) * (q - z.astype(np.float32))).astype(np.float32)
    raise ExportError(f"{node.name}: bias is neither constant nor dequantised constant integers")


def qcdq_to_integer(model: onnx.ModelProto, unsigned_operands: bool = True):
    """(integer graph, [Layer]) of a QCDQ graph (module docstring, item 3). ``unsigned_operands``
    gives the integer kernels uint8 operands (int8 integers and zero points shifted by 128, the
    same real values); False keeps the quantisers' own types (int8 weights, int8 / uint8
    activations: onnxruntime's u8 x s8 and s8 x s8 kernels, which saturate on x86 CPUs without
    VNNI)."""
    qcdq = Graph(model)
    model = copy.deepcopy(model)
    graph = Graph(model)
    nodes, layers = [], []
    for node in model.graph.node:
        if node.op_type not in LAYER_OPS:
            nodes.append(node)
            continue
        layer = _to_integer(graph, qcdq, node, nodes, unsigned_operands)
        if layer is None:
            nodes.append(node)  # a float layer of the network, not a quantised one
            continue
        layers.append(layer)
        if not layer.integer:
            nodes.append(node)
    return _finish(model, nodes, graph.inits), layers


# --- QONNX -> float (latency baseline) ------------------------------------------------------

def qonnx_to_float(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same network without quantisation: weights dequantised, activation quantisers removed."""
    model = copy.deepcopy(model)
    graph = Graph(model)
    nodes = []
    for node in model.graph.node:
        if node.op_type not in ("Quant", "BipolarQuant"):
            nodes.append(node)
            continue
        weight = graph.const(node.input[0])
        if weight is None:
            nodes.append(helper.make_node("Identity", [node.input[0]], [node.output[0]],
                                          name=node.name))
            continue
        spec = quant_spec(graph, node)
        q = (np.where(weight >= 0, 1, -1) if node.op_type == "BipolarQuant"
             else spec.quantise(weight))
        graph.add_init(node.output[0], spec.dequantise(q), exact_name=True)
    return _finish(model, nodes, graph.inits)


# --- the output quantum ---------------------------------------------------------------------

def output_quantum(model: onnx.ModelProto, layers: List[Layer]) -> np.ndarray:
    """One step of the last quantised tensor, as seen at the graph output, per output channel.

    Walks back from the (QCDQ) graph's output through per-channel affine ops (Add/Sub of a
    constant: gain 1; Mul/Div by c: gain |c| or 1/|c|; BatchNormalization: |gamma| /
    sqrt(var + eps); layout ops) to a quantised layer (step ``s_x * s_w``) or a
    DequantizeLinear (step ``s``). Returns |step * gain| broadcast to the output's channels."""
    graph = Graph(model)
    by_output = {l.output: l for l in layers if l.integer}
    out = model.graph.output[0].name
    channels = graph.shapes.get(out, [None, None])[-1]
    gain, t = np.float32(1.0), out
    while True:
        if t in by_output:
            step = by_output[t].out_scale
            break
        node = graph.producer.get(t)
        if node is None:
            raise ExportError(f"output quantum: {out} does not come from a quantised tensor")
        consts = [graph.const(i) for i in node.input]
        if node.op_type == "DequantizeLinear":
            s, _, axis = _dq_params(graph, node)
            step = s if s.size == 1 else s.reshape([-1] + [1] * (graph.rank(t) - 1 - axis))
            break
        affine = node.op_type in ("Add", "Sub", "Mul") or (node.op_type == "Div"
                                                            and consts[0] is None)
        if affine and sum(c is not None for c in consts) == 1:
            c = next(c for c in consts if c is not None).astype(np.float32)
            t = next(i for i, v in zip(node.input, consts) if v is None)
            if node.op_type == "Mul":
                gain = gain * np.abs(c)
            elif node.op_type == "Div":
                gain = gain / np.abs(c)
            continue
        if node.op_type == "BatchNormalization":
            gamma, var = consts[1], consts[4]
            eps = _attrs(node).get("epsilon", 1e-5)
            g = np.abs(gamma) / np.sqrt(var + eps)
            rank = graph.rank(node.input[0]) or 2
            gain = gain * g.reshape([-1] + [1] * (rank - 2)).astype(np.float32)
            t = node.input[0]
            continue
        if node.op_type in LAYOUT_OPS:
            gain = np.float32(np.min(gain))  # per-channel layout lost: take the finest step
            t = node.input[0]
            continue
        raise ExportError(f"output quantum: cannot follow {node.op_type} node {node.name} between "
                          f"the last quantised tensor and the output")
    q = np.abs(np.asarray(step, np.float32) * gain)
    if q.ndim > 2:  # per-channel step of a conv output reaching a 2-D output
        q = q.reshape(q.shape[:2])
    if channels is None:
        return q.reshape(-1)
    return np.broadcast_to(q.reshape(1, -1) if q.size > 1 else q, (1, channels))[0].copy()
