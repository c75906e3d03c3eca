"""Shared compute code for the stages."""
