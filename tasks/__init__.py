"""Prefect tasks: thin wrappers that build stage specs, skip what exists, launch jobs, track them."""
