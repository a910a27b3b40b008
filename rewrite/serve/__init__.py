"""Serving an exported model: its text encoding read from metadata, prediction, and generation with the
cache."""
