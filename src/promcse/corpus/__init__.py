"""Corpus scale: vectors on disk (shards), corpus encoding (local and Ray), index kinds, search and hard-negative mining."""

from promcse._moved import moved_names

# promcse 0.1's docs imported EncodeJob from ``promcse.corpus``, then a module, now this folder.
__getattr__ = moved_names("promcse.corpus", {"EncodeJob": "promcse.corpus.encode"})
