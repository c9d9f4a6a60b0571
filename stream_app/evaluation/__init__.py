"""Prequential (test-then-train) evaluation, in the worker and offline over a file."""
