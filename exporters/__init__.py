"""ONNX export and runtime helpers (installed as ``otmel.exporters``)."""
