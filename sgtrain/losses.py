"""Hinge loss (Lim & Ye 2017; used by SAGAN and BigGAN). Logits are cast to fp32 so bf16 runs lose nothing here."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def d_hinge(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Discriminator hinge terms ``mean(relu(1 - D(x)))`` and ``mean(relu(1 + D(G(z))))`` for logits ``[B]``."""
    return F.relu(1.0 - real_logits.float()).mean(), F.relu(1.0 + fake_logits.float()).mean()


def g_hinge(fake_logits: torch.Tensor) -> torch.Tensor:
    """Generator loss ``-mean(D(G(z)))``."""
    return -fake_logits.float().mean()
