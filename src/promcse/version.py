"""The package version: one string, below every stage, so that any module can name it without importing the package."""

__version__ = "0.2.0"
