"""Inputs on disk: strict file readers and writers, the schema of every artifact, training data and its sources."""
