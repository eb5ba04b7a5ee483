"""Interop: export to sentence-transformers / MTEB and to ONNX."""
