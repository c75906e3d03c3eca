"""Prefect flows: the pipeline as a reader would draw it."""
