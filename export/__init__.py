"""The export stage: a trained QNN to QONNX (FINN), QCDQ ONNX, integer and integer-only ONNX
for onnxruntime, each validated against the PyTorch model.

- :mod:`graphs`: how each graph is derived (QONNX -> QCDQ -> integer), FINN-readiness, the
  output quantum;
- :mod:`int_only`: the integer-only graph (BatchNorm + quantiser as integer thresholds);
- :mod:`finn_check`: FINN's own front end on a QONNX file, stage by stage, in its own venv;
- :mod:`runtime`: onnxruntime / qonnx execution, executed kernels, saturation probe, latency;
- :mod:`validate`: the comparison figures and the report table;
- :mod:`export_qnn`: :func:`export_qnn`, which writes and validates every file;
  :func:`export_float`, the float ONNX of a float network (a QNN's float twin), validated the
  same way.

It takes a model and a batch of images and knows no recipe, run directory or data set: the
command that exports a recipe run (``brevitas-ana-export``) lives in ``recipes/export_run.py``.
"""
from brevitas_ana.export.export_qnn import export_float, export_qnn
from brevitas_ana.export.graphs import ExportError
from brevitas_ana.export.validate import Tolerance

__all__ = ["export_qnn", "export_float", "ExportError", "Tolerance"]
