"""Rendering: the only place where tensors become NumPy arrays, images and figures."""

from vizcnn.render import figures

__all__ = ["figures"]
