"""Evaluation of any encode function: the STS protocol, Crisscrossed Captions and result plots."""
