"""Export a fitted detector to ONNX and run the file with onnxruntime.

    from clad.export import export_onnx, OnnxDetector
    export_onnx(clad.load_detector("model/"), "model.onnx")   # clad export --model model/ --format onnx --out model.onnx
    result = OnnxDetector("model.onnx").predict(images)       # clad predict --model model.onnx --runtime onnxruntime

Both need the ``onnx`` extra (``pip install onnx onnxruntime``).
"""
from clad.export.exporter import GRAPHS, INPUT_CONTRACT, build_graph, export_onnx, export_problem
from clad.export.runtime import OnnxDetector

__all__ = ["GRAPHS", "INPUT_CONTRACT", "OnnxDetector", "build_graph", "export_onnx", "export_problem"]
