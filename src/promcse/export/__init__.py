"""Interop: export to sentence-transformers / MTEB and to ONNX."""

from promcse._moved import moved_names

# promcse 0.1's docs imported MTEBEncoder from ``promcse.export``, then a module, now this folder.
__getattr__ = moved_names("promcse.export", {"MTEBEncoder": "promcse.export.sentence_transformers"})
