"""Evaluation of any encode function: the STS protocol, Crisscrossed Captions, BEIR retrieval (with its corpus
embedding cache and paired comparisons) and result plots."""
