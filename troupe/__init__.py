"""Troupe: an MLOps platform for role-play (character) language models."""

__version__ = "0.1.0"
