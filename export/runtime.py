"""Running exported graphs: onnxruntime sessions, the kernels onnxruntime actually executes, the
integer-saturation probe, latency; qonnx's executor for QONNX graphs."""
from __future__ import annotations

import os
import tempfile
import time
from typing import Dict, List

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

# onnxruntime kernels that multiply integers (after its own fusions, contrib ops included).
INTEGER_KERNELS = ("ConvInteger", "MatMulInteger", "QLinearConv", "QLinearMatMul", "QGemm",
                   "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "MatMulInteger16")


# onnxruntime turns DequantizeLinear -> MatMul into MatMulNBits, which by default (accuracy level
# 4) quantises its float input to int8 blocks: an approximation of the graph. Level 0 computes
# what the graph says; deployments of model_qcdq.onnx should set it too.
SESSION_CONFIG = {"session.qdq_matmulnbits_accuracy_level": "0"}


def session(model: onnx.ModelProto, optimized_path: str = None, threads: int = 0):
    """An onnxruntime CPU session with all graph optimisations (ORT_ENABLE_ALL, its default) and
    SESSION_CONFIG; ``optimized_path`` saves the graph it will execute."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    for key, value in SESSION_CONFIG.items():
        so.add_session_config_entry(key, value)
    so.intra_op_num_threads = threads
    so.log_severity_level = 3  # the "hardware-specific optimised model" warning is expected here
    if optimized_path:
        so.optimized_model_filepath = optimized_path
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def run_onnxruntime(model: onnx.ModelProto, images: np.ndarray, batch_size: int,
                    progress=None) -> np.ndarray:
    sess = session(model)
    name = sess.get_inputs()[0].name
    outs = []
    for i in range(0, len(images), batch_size):
        batch = images[i:i + batch_size]
        outs.append(sess.run(None, {name: batch})[0])
        if progress:
            progress(len(batch))
    return np.concatenate(outs)


def run_qonnx(model: onnx.ModelProto, images: np.ndarray, batch_size: int,
              progress=None, fixed: bool = False) -> np.ndarray:
    """Outputs of qonnx's reference executor (Quant / BipolarQuant in numpy, standard ops one by
    one in onnxruntime). It checks concrete shapes, so each batch size gets its own copy of the
    graph (symbolic batch) with shapes inferred for it; ``fixed=True`` runs the graph as it
    stands (its own static shapes)."""
    import warnings
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx
    from qonnx.transformation.infer_shapes import InferShapes

    def concrete(batch):
        wrapper = ModelWrapper(onnx.ModelProto.FromString(model.SerializeToString()))
        if fixed:
            return wrapper
        del wrapper.graph.value_info[:]
        for vi in list(wrapper.graph.input) + list(wrapper.graph.output):
            dim = vi.type.tensor_type.shape.dim[0]
            dim.Clear()
            dim.dim_value = batch
        return wrapper.transform(InferShapes())

    graphs = {}
    outs = []
    for i in range(0, len(images), batch_size):
        batch = images[i:i + batch_size]
        if len(batch) not in graphs:
            graphs[len(batch)] = concrete(len(batch))
        wrapper = graphs[len(batch)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = execute_onnx(wrapper, {wrapper.graph.input[0].name: batch})
        outs.append(result[wrapper.graph.output[0].name])
        if progress:
            progress(len(batch))
    return np.concatenate(outs)


def session_and_graph(model: onnx.ModelProto, threads: int = 0):
    """(session, the graph it executes after onnxruntime's optimisations: fusions, layouts)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "optimized.onnx")
        sess = session(model, optimized_path=path, threads=threads)
        return sess, onnx.load(path)


def executed_graph(model: onnx.ModelProto) -> onnx.ModelProto:
    return session_and_graph(model)[1]


def kernels_per_layer(model: onnx.ModelProto, layers, weight: str = "weight") -> List[dict]:
    """For every quantised layer: the onnxruntime kernel that consumes its integer weights (the
    initializer named by ``layer.<weight>``) in the executed graph, else (weights renamed when
    repacked, or only dequantised) the node that kept the layer's name, and whether that is an
    integer kernel. A layer found neither way is reported as "-", not integer. Operand types
    are those of the same graph (``qcdq_x_dtype`` ... for ``weight="qcdq_weight"``)."""
    prefix = weight[:-len("weight")]
    executed = executed_graph(model)
    by_input, by_name = {}, {n.name: n for n in executed.graph.node}
    for node in executed.graph.node:
        for i in node.input:
            by_input.setdefault(i, node)
    rows = []
    for layer in layers:
        node = by_input.get(getattr(layer, weight)) if getattr(layer, weight) else None
        if node is None or node.op_type == "DequantizeLinear":  # not fused: the layer's own op
            node = by_name.get(layer.name, node)
        kernel = node.op_type if node is not None else "-"
        rows.append({"layer": layer.name, "op": layer.op, "kernel": kernel,
                     "integer": kernel in INTEGER_KERNELS,
                     "x_dtype": getattr(layer, prefix + "x_dtype"),
                     "w_dtype": getattr(layer, prefix + "w_dtype"), "x_range": layer.x_range,
                     "w_range": layer.w_range, "reason": layer.reason})
    return rows


# Kernels onnxruntime builds itself from QuantizeLinear / DequantizeLinear around Conv / MatMul.
QDQ_KERNELS = ("QLinearConv", "QLinearMatMul", "QGemm", "MatMulIntegerToFloat")


def _probe_model(kernel: str, x_dtype: str, x_zero_point: int, w_dtype: str, w_zero_point: int,
                 w_value: int, channels: int, out_scale: float) -> onnx.ModelProto:
    """One layer with C input channels and constant weights all equal to ``w_value`` (centred),
    built so that onnxruntime runs it with ``kernel``: ConvInteger / MatMulInteger followed by
    Cast and Mul(1) as in the integer graph (input: the integers), or, for the kernels it fuses
    itself (QDQ_KERNELS), Quantize/DequantizeLinear around a float Conv / MatMul as in the QCDQ
    graph (input: the centred values as floats; QLinear* outputs requantised with
    ``out_scale``)."""
    types = {"int8": TensorProto.INT8, "uint8": TensorProto.UINT8}
    xt, wt = types[x_dtype], types[w_dtype]
    conv = "Conv" in kernel
    x_shape, w_shape = ([1, channels, 1, 1], [2, channels, 1, 1]) if conv else \
        ([1, channels], [channels, 2])
    inits = [helper.make_tensor("w", wt, w_shape,
                                [w_value + w_zero_point] * int(np.prod(w_shape))),
             helper.make_tensor("zx", xt, [], [x_zero_point]),
             helper.make_tensor("zw", wt, [], [w_zero_point]),
             helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])]
    if kernel not in QDQ_KERNELS:
        x_type = xt
        nodes = [helper.make_node(kernel, ["x", "w", "zx", "zw"], ["acc"]),
                 helper.make_node("Cast", ["acc"], ["acc_f"], to=TensorProto.FLOAT),
                 helper.make_node("Mul", ["acc_f", "one"], ["y"])]
    else:
        x_type = TensorProto.FLOAT
        nodes = [helper.make_node("QuantizeLinear", ["x", "one", "zx"], ["xq"]),
                 helper.make_node("DequantizeLinear", ["xq", "one", "zx"], ["xd"]),
                 helper.make_node("DequantizeLinear", ["w", "one", "zw"], ["wd"]),
                 helper.make_node("Conv" if conv else "MatMul", ["xd", "wd"],
                                  ["y" if kernel == "MatMulIntegerToFloat" else "acc"])]
        if kernel != "MatMulIntegerToFloat":
            inits += [helper.make_tensor("s_out", TensorProto.FLOAT, [], [out_scale]),
                      helper.make_tensor("z_out", TensorProto.INT8, [], [0])]
            nodes += [helper.make_node("QuantizeLinear", ["acc", "s_out", "z_out"], ["yq"]),
                      helper.make_node("DequantizeLinear", ["yq", "s_out", "z_out"], ["y"])]
    graph = helper.make_graph(nodes, "probe", [helper.make_tensor_value_info("x", x_type, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def saturation_probe(layers, channels: int = 64) -> List[dict]:
    """Runs every (kernel, operand types and zero points, input range, weight range) of
    ``layers`` with all-equal extreme inputs and weights (where a saturating pairwise int16 sum
    shows first) and compares with the exact ``channels * (x_q - z_x) (w_q - z_w)`` (within half
    an output step for kernels that requantise their output). One row per configuration,
    ``exact`` False where onnxruntime is wrong on this machine; ``ran`` is the kernel the probe
    actually ran as (onnxruntime decides its own fusions)."""
    configs = sorted({(l.kernel, l.x_dtype, l.x_zero_point, l.w_dtype, l.w_zero_point,
                       tuple(l.x_range), tuple(l.w_range)) for l in layers if l.integer})
    rows = []
    for kernel, x_dtype, zx, w_dtype, zw, x_range, w_range in configs:
        biggest = channels * max(abs(v) for v in x_range) * max(abs(v) for v in w_range)
        out_scale = 2.0 ** np.ceil(np.log2(max(biggest, 1) / 127))  # exact result fits int8
        allowed = float(out_scale) / 2 if kernel in QDQ_KERNELS[:3] else 0.0
        worst, ran = 0.0, set()
        for wv in sorted(set(w_range)):
            model = _probe_model(kernel, x_dtype, zx, w_dtype, zw, wv, channels, out_scale)
            sess, executed = session_and_graph(model, threads=1)
            ran |= {n.op_type for n in executed.graph.node if n.op_type in INTEGER_KERNELS}
            shape = sess.get_inputs()[0].shape
            for xv in sorted(set(x_range)):
                x = (np.full(shape, xv + zx, np.dtype(x_dtype)) if kernel not in QDQ_KERNELS
                     else np.full(shape, xv, np.float32))
                got = sess.run(None, {"x": x})[0]
                worst = max(worst, float(np.abs(got - channels * xv * wv).max()))
        rows.append({"kernel": kernel, "ran": sorted(ran), "x_dtype": x_dtype,
                     "x_zero_point": zx, "w_dtype": w_dtype, "w_zero_point": zw,
                     "x_range": list(x_range), "w_range": list(w_range),
                     "exact": bool(worst <= allowed), "max_error": worst})
    return rows


def latency(model: onnx.ModelProto, images: np.ndarray, batch: int, repeats: int,
            threads: int = 0) -> float:
    """Median seconds per image over ``repeats`` runs of one ``batch``-sized input (after
    warm-up)."""
    sess = session(model, threads=threads)
    name = sess.get_inputs()[0].name
    x = np.ascontiguousarray(images[:batch])
    if len(x) < batch:
        x = np.resize(x, (batch,) + x.shape[1:])
    for _ in range(3):
        sess.run(None, {name: x})
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        sess.run(None, {name: x})
        times.append(time.perf_counter() - t)
    return float(np.median(times)) / batch


def latencies(models: Dict[str, onnx.ModelProto], images, batch: int, repeats: int,
              rounds: int = 3, threads: int = 0) -> Dict[str, float]:
    """Seconds per image of several graphs, measured in interleaved rounds (best median)."""
    best = {k: float("inf") for k in models}
    for _ in range(rounds):
        for name, model in models.items():
            best[name] = min(best[name], latency(model, images, batch, repeats, threads))
    return best
