"""Serving: the HTTP app, its OpenAI-compatible routes, model registry, batching engine, guards, metrics, launchers."""
