"""RABLE notebooks: helpers for the executable report (one module per pipeline stage)."""

__version__ = "0.1.0"
