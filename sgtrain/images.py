"""Image grids without torchvision (which does not import beside the CPU torch build)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def save_grid(images: torch.Tensor, path: str | Path, *, nrow: int, pad: int = 2) -> None:
    """Save images ``[N, 3, H, W]`` in [-1, 1] as one PNG with ``nrow`` images per row."""
    n, c, h, w = images.shape
    rows = (n + nrow - 1) // nrow
    pixels = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i, image in enumerate(pixels.permute(0, 2, 3, 1).numpy()):
        r, col = divmod(i, nrow)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[top : top + h, left : left + w] = image
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(grid).save(tmp, format="PNG")
    tmp.replace(path)
