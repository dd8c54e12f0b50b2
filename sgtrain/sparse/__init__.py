"""Sparse-to-sparse training: pure functions (distribution, topology, schedule) and one stateful manager."""

from sgtrain.sparse.manager import MaskManager, masked_parameters
from sgtrain.sparse.sync import MaskDivergenceError

__all__ = ["MaskDivergenceError", "MaskManager", "masked_parameters"]
