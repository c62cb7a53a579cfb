"""The integer-only graph: every tensor between the input quantiser and the last layer is an integer.

Derived from the integer graph (:func:`graphs.qcdq_to_integer`), where each quantised Conv /
Linear already accumulates exactly in int32 (``acc``) but the float chain after it,

    f(acc) = Quant(BN(s_x s_w acc + b))      (Cast, Mul, [Add], [BatchNormalization], [Relu],
                                               QuantizeLinear [+ Clip], or the sign of a binary
                                               quantiser: GreaterOrEqual -> Where)

is still float. Every such ``f`` is monotone in ``acc`` per output channel ``c`` (each step is:
a product with a constant, a sum, round half to even, a clip, a sign), so it is a staircase in
the integer ``acc`` and equals, exactly,

    f(acc) = v_0 + sum_k w_k [s_c acc >= T_ck]

with direction ``s_c = +-1`` (the sign of the channel's gain), the lowest level ``v_0``, the
level steps ``w_k`` and integer thresholds ``T_ck`` (FINN's MultiThreshold, as its streamlining
builds; here with standard ONNX ops: Mul by ``s_c`` where a gain is negative, one
GreaterOrEqual + Cast per threshold column (a ``C x K`` table compared at once with ReduceSum
beyond ``UNROLL_MAX`` columns), Add, Cast). The thresholds are not derived from a rounded
scale: ``T_ck`` is the smallest ``s_c acc`` at which the chain *as onnxruntime computes it in
float32* reaches level ``k``, found by bisection over the accumulator's reachable range
(``sum_i min(w_ci x_lo, w_ci x_hi, 0)`` to the same with ``max``), so the integer-only graph
gives the integer graph's integers for every reachable ``acc``, including the ones exactly on a
threshold. Thresholds of levels a channel never reaches sit just outside that range.

Max-pool, flatten and reshape run on the integers as in the integer graph. The layer whose float
chain reaches the graph output without another quantiser (the classifier, and anything after it
such as CNV's TensorNorm) keeps it: only the last layer dequantises.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from brevitas_ana.export.graphs import ExportError, Graph, Layer, _finish

# Float ops that may sit between an accumulator and its activation quantiser: monotone per
# channel, with constant parameters.
CHAIN_OPS = ("Cast", "Mul", "Add", "Sub", "Div", "BatchNormalization", "Relu", "GreaterOrEqual",
             "Where", "QuantizeLinear", "Clip")
INTEGER_TYPES = {TensorProto.INT8, TensorProto.UINT8, TensorProto.INT16, TensorProto.UINT16,
                 TensorProto.INT32, TensorProto.UINT32, TensorProto.INT64, TensorProto.UINT64,
                 TensorProto.BOOL}


@dataclass
class Thresholds:
    """One accumulator -> activation chain as thresholds: ``out = base + sum_k weight_k
    [sign_c acc >= table_ck]`` (table ``C x K``)."""
    layer: str
    quantiser: str
    sign: np.ndarray      # (C,) +-1
    table: np.ndarray     # (C, K) int32
    weight: np.ndarray    # (K,) int32
    base: int
    dtype: str


def _consumers(model: onnx.ModelProto) -> Dict[str, list]:
    out: Dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            out.setdefault(i, []).append(n)
    return out


def _feeds_integer_layer(t: str, consumers, kernels) -> bool:
    """Whether any integer kernel lies downstream of tensor ``t``."""
    seen, todo = set(), [t]
    while todo:
        t = todo.pop()
        for n in consumers.get(t, []):
            if n.name in kernels:
                return True
            for o in n.output:
                if o not in seen:
                    seen.add(o)
                    todo.append(o)
    return False


def _chain(graph: Graph, consumers, acc: str, layer: Layer, kernels, outputs) -> Optional[list]:
    """The float nodes from ``acc`` to its activation quantiser (QuantizeLinear [+ Clip]), or
    None when the float values reach the graph output with no integer layer after them."""
    chain, t = [], acc
    while True:
        users = consumers.get(t, [])
        if t in outputs or not users:
            if chain and not _feeds_integer_layer(acc, consumers, kernels):
                return None
            raise ExportError(f"{layer.name}: its output reaches the graph output in float but "
                              f"an integer layer follows it")
        node = users[0]
        tail = not _feeds_integer_layer(t, consumers, kernels)
        if node.op_type not in CHAIN_OPS or len(users) > 1:
            if tail:
                return None
            what = (f"{node.op_type} node {node.name}" if len(users) == 1 else
                    f"tensor {t} (read by {len(users)} nodes: {', '.join(u.name for u in users)})")
            raise ExportError(
                f"{what}: between the accumulator of {layer.name} and its activation quantiser; "
                f"the integer-only graph expresses only BatchNormalization, a constant scale / "
                f"bias and ReLU there (thresholds of a monotone function)")
        others = [i for i in node.input[1:] if i and graph.const(i) is None]
        if node.op_type in ("Mul", "Add", "Sub", "Div", "GreaterOrEqual", "Where") and (
                others or (node.input[0] != t and node.op_type != "Where")):
            if tail:
                return None
            raise ExportError(f"{node.op_type} node {node.name}: between the accumulator of "
                              f"{layer.name} and its activation quantiser with a non-constant "
                              f"operand; the integer-only graph cannot express it")
        if node.op_type == "Where" and (node.input[0] != t or others):
            raise ExportError(f"Where node {node.name}: not the sign of a binary quantiser")
        chain.append(node)
        if node.op_type == "QuantizeLinear":
            scale = graph.const(node.input[1])
            if scale is None or scale.size != 1:
                raise ExportError(f"QuantizeLinear node {node.name}: per-channel activation scale "
                                  f"after {layer.name}; the next layer's accumulator would not be "
                                  f"an integer sum (the integer-only graph needs one scale per "
                                  f"tensor)")
            nxt = consumers.get(node.output[0], [])
            if len(nxt) == 1 and nxt[0].op_type == "Clip":
                chain.append(nxt[0])
            return chain
        t = node.output[0]


def _evaluator(graph: Graph, chain: list, acc_shape: List[int]):
    """f(acc): the chain as an onnxruntime session on an int32 input of ``acc_shape``: the same
    nodes and constants, so the same float32 arithmetic as the integer graph."""
    from brevitas_ana.export import runtime
    used = {i for n in chain for i in n.input}
    inits = [numpy_helper.from_array(v, k) for k, v in graph.inits.items() if k in used]
    x = helper.make_tensor_value_info(chain[0].input[0], TensorProto.INT32, acc_shape)
    y = helper.make_tensor_value_info(chain[-1].output[0], _out_type(graph, chain), None)
    sub = helper.make_model(helper.make_graph([copy.deepcopy(n) for n in chain], "chain", [x], [y],
                                              inits),
                            opset_imports=[helper.make_opsetid("", 13)])
    sess = runtime.session(sub, threads=1)
    return lambda a: sess.run(None, {chain[0].input[0]: a.astype(np.int32)})[0]


def _acc_bounds(graph: Graph, layer: Layer) -> Tuple[np.ndarray, np.ndarray]:
    """Per output channel [lo, hi] of ``sum_i (w_ci - z_w)(x_i - z_x)`` over x in the layer's
    input range (0 included: padding)."""
    w = graph.const(layer.weight).astype(np.int64) - layer.w_zero_point
    w = w.reshape(w.shape[0], -1) if layer.kernel == "ConvInteger" else w.T
    x_lo, x_hi = layer.x_range
    terms = np.stack([w * x_lo, w * x_hi, np.zeros_like(w)])
    lo, hi = terms.min(0).sum(1), terms.max(0).sum(1)
    if max(-lo.min(), hi.max()) >= 2 ** 31 - 1:
        raise ExportError(f"{layer.name}: accumulator range [{lo.min()}, {hi.max()}] exceeds int32")
    return lo, hi


def thresholds(graph: Graph, chain: list, layer: Layer) -> Thresholds:
    """The thresholds of one chain (module docstring), by bisection on onnxruntime's f."""
    lo, hi = _acc_bounds(graph, layer)
    channels = len(lo)
    conv = layer.kernel == "ConvInteger"

    def run(acc: np.ndarray) -> np.ndarray:  # acc (C, M) -> f (C, M)
        m = acc.shape[1]
        if conv:
            return f_conv(acc.reshape(1, channels, m, 1)).reshape(channels, m).astype(np.int64)
        return f_mat(acc.T).T.astype(np.int64)

    f_conv = _evaluator(graph, chain, [1, channels, None, 1]) if conv else None
    f_mat = None if conv else _evaluator(graph, chain, [None, channels])
    ends = run(np.stack([lo, hi], 1))
    sign = np.where(ends[:, 1] < ends[:, 0], -1, 1)
    # search s_c * acc in [lo', hi'] where f is non-decreasing
    lo_s, hi_s = np.where(sign > 0, lo, -hi), np.where(sign > 0, hi, -lo)
    v_min, v_max = int(ends.min()), int(ends.max())
    levels = np.arange(v_min + 1, v_max + 1)
    if not len(levels):  # constant layer: one empty comparison keeps the graph uniform
        levels = np.array([v_max + 1])
    low = np.repeat(lo_s[:, None], len(levels), 1)
    high = np.repeat(hi_s[:, None] + 1, len(levels), 1)
    while np.any(low < high):
        mid = (low + high) // 2
        reached = run(sign[:, None] * np.minimum(mid, hi_s[:, None])) >= levels[None, :]
        reached &= mid <= hi_s[:, None]
        high = np.where(reached & (low < high), mid, high)
        low = np.where(~reached & (low < high), mid + 1, low)
    table = low
    # levels no channel produces on its own (binary: only v_min and v_max) share a threshold
    # with the level above in every channel: one comparison with a larger step
    keep, weight = [], []
    for k in range(len(levels)):
        if keep and np.array_equal(table[:, k], table[:, keep[-1]]):
            weight[-1] += 1
        else:
            keep.append(k)
            weight.append(1)
    q = chain[-1]
    dtype = "uint8" if _out_type(graph, chain) == TensorProto.UINT8 else "int8"
    return Thresholds(layer.name, q.name, sign.astype(np.int32),
                      table[:, keep].astype(np.int32), np.array(weight, np.int32), v_min, dtype)


def _out_type(graph: Graph, chain) -> int:
    q = next(n for n in chain if n.op_type == "QuantizeLinear")
    z = graph.const(q.input[2]) if len(q.input) > 2 and q.input[2] else None
    return TensorProto.INT8 if z is not None and z.dtype == np.int8 else TensorProto.UINT8


# Up to this many thresholds per quantiser the comparisons are unrolled (one GreaterOrEqual per
# threshold, channel thresholds broadcast): onnxruntime ran that 5x faster than one broadcast
# comparison against a C x K table followed by ReduceSum (CNV W2A2, this project's CPU).
UNROLL_MAX = 16


def _threshold_nodes(graph: Graph, th: Thresholds, acc: str, out: str, conv: bool) -> list:
    """``out = Cast(base + sum_k weight_k * [sign * acc >= table[:, k]])``."""
    name, nodes = th.layer, []
    shape = [1, -1, 1, 1] if conv else [-1]
    x = acc
    if np.any(th.sign < 0):
        s = graph.add_init(f"{name}_th_sign", th.sign.reshape(shape))
        x = graph.fresh(f"{name}_signed_acc")
        nodes.append(helper.make_node("Mul", [acc, s], [x], name=f"{name}_th_sign"))
    terms = []
    if th.table.shape[1] <= UNROLL_MAX:
        for k in range(th.table.shape[1]):
            t = graph.add_init(f"{name}_threshold_{k}", th.table[:, k].reshape(shape))
            ge, c = graph.fresh(f"{name}_ge{k}"), graph.fresh(f"{name}_ge{k}_i")
            nodes += [helper.make_node("GreaterOrEqual", [x, t], [ge], name=f"{name}_th{k}"),
                      helper.make_node("Cast", [ge], [c], to=TensorProto.INT32,
                                       name=f"{name}_th{k}_cast")]
            if th.weight[k] != 1:
                w, cw = graph.add_init(f"{name}_th{k}_step", th.weight[k]), graph.fresh(f"{c}_w")
                nodes.append(helper.make_node("Mul", [c, w], [cw], name=f"{name}_th{k}_step"))
                c = cw
            terms.append(c)
    else:
        axes = graph.add_init(f"{name}_th_axes", np.array([-1], np.int64))
        unsq, ge, c = (graph.fresh(f"{name}_{s}") for s in ("acc_k", "ge", "ge_i"))
        table = th.table.reshape(th.table.shape[0], 1, 1, -1) if conv else th.table
        t = graph.add_init(f"{name}_thresholds", table)
        nodes += [helper.make_node("Unsqueeze", [x, axes], [unsq], name=f"{name}_th_unsqueeze"),
                  helper.make_node("GreaterOrEqual", [unsq, t], [ge], name=f"{name}_th"),
                  helper.make_node("Cast", [ge], [c], to=TensorProto.INT32, name=f"{name}_th_cast")]
        if np.any(th.weight != 1):
            w, cw = graph.add_init(f"{name}_th_step", th.weight), graph.fresh(f"{c}_w")
            nodes.append(helper.make_node("Mul", [c, w], [cw], name=f"{name}_th_step"))
            c = cw
        total = graph.fresh(f"{name}_count")
        nodes.append(helper.make_node("ReduceSum", [c, axes], [total], keepdims=0,
                                      name=f"{name}_th_sum"))
        terms.append(total)
    base = graph.add_init(f"{name}_th_base", np.array(th.base, np.int32))
    for i, term in enumerate(terms):
        acc_sum = graph.fresh(f"{name}_level")
        nodes.append(helper.make_node("Add", [base, term], [acc_sum], name=f"{name}_th_add{i}"))
        base = acc_sum
    to = TensorProto.UINT8 if th.dtype == "uint8" else TensorProto.INT8
    nodes.append(helper.make_node("Cast", [base], [out], name=f"{name}_th_out", to=to))
    return nodes


def integer_to_int_only(model: onnx.ModelProto, layers: List[Layer]):
    """(integer-only graph, [Thresholds]) of an integer graph and its layers (module docstring).
    Raises :class:`ExportError` naming the node or layer it cannot express."""
    model = copy.deepcopy(model)
    graph = Graph(model)
    for n in model.graph.node:  # checked first: it is why the next layer is not integer
        scale = graph.const(n.input[1]) if n.op_type == "QuantizeLinear" else None
        if scale is not None and scale.size > 1 and graph.const(n.input[0]) is None:
            raise ExportError(f"QuantizeLinear node {n.name}: per-channel activation scale; the "
                              f"next layer's accumulator would not be an integer sum (the "
                              f"integer-only graph needs one scale per activation tensor)")
    floats = [l for l in layers if not l.integer]
    if floats:
        raise ExportError(f"{floats[0].name}: not an integer layer ({floats[0].reason}); the "
                          f"integer-only graph needs every quantised layer as an integer kernel")
    consumers = _consumers(model)
    kernels = {f"{l.name}_integer" for l in layers}
    outputs = {o.name for o in model.graph.output}
    by_kernel = {n.name: n for n in model.graph.node if n.name in kernels}
    names = [n.name for n in model.graph.node]
    if len(set(names)) != len(names) or not all(names):
        raise ExportError("the integer graph's nodes need unique names")
    replaced, new_nodes, specs = set(), {}, []
    for layer in layers:
        kernel = by_kernel[f"{layer.name}_integer"]
        chain = _chain(graph, consumers, kernel.output[0], layer, kernels, outputs)
        if chain is None:
            continue
        th = thresholds(graph, chain, layer)
        specs.append(th)
        replaced |= {n.name for n in chain}
        new_nodes[chain[0].name] = _threshold_nodes(graph, th, kernel.output[0],
                                                   chain[-1].output[0],
                                                   layer.kernel == "ConvInteger")
    nodes = []
    for n in model.graph.node:
        if n.name in new_nodes:
            nodes += new_nodes[n.name]
        elif n.name not in replaced:
            nodes.append(n)
    out = _finish(model, nodes, graph.inits)
    return out, specs


def float_tensors_between(model: onnx.ModelProto) -> List[str]:
    """Tensors (as ``name (op)``) on a path from an input quantiser (a QuantizeLinear of float
    values) to the last integer kernel whose type is not an integer: empty for an integer-only
    graph."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {vi.name: vi.type.tensor_type.elem_type for vi in
             list(inferred.graph.value_info) + list(inferred.graph.output)}
    producer = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name for i in model.graph.initializer}
    kernels = [n for n in model.graph.node if n.op_type in ("ConvInteger", "MatMulInteger")]
    if not kernels:
        return []
    starts = {n.output[0] for n in model.graph.node if n.op_type == "QuantizeLinear"
              and types.get(n.input[0], TensorProto.FLOAT) == TensorProto.FLOAT
              and not _has_quantised_ancestor(n.input[0], producer)}
    # ancestors of the last kernel's accumulator, back to the input quantisers
    between, todo = set(), [kernels[-1].output[0]]
    while todo:
        t = todo.pop()
        if t in between or t in inits or t in starts:
            continue
        between.add(t)
        node = producer.get(t)
        if node is not None:
            todo.extend(i for i in node.input if i)
    return sorted(f"{t} ({producer[t].op_type})" for t in between
                  if t in producer and types.get(t) not in INTEGER_TYPES)


def _has_quantised_ancestor(t: str, producer) -> bool:
    seen, todo = set(), [t]
    while todo:
        t = todo.pop()
        node = producer.get(t)
        if node is None or t in seen:
            continue
        seen.add(t)
        if node.op_type in ("QuantizeLinear", "ConvInteger", "MatMulInteger"):
            return True
        todo.extend(i for i in node.input if i)
    return False
