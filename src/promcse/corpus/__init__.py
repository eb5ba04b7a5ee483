"""Corpus scale: vectors on disk (shards), corpus encoding (local and Ray), index kinds, search and hard-negative mining."""
