"""Sparse-to-sparse training: pure functions (distribution, topology, schedule) and one stateful manager."""

from sgtrain.sparse.manager import MaskDivergenceError, MaskManager, masked_parameters

__all__ = ["MaskDivergenceError", "MaskManager", "masked_parameters"]
