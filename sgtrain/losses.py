"""GAN losses: hinge (Lim & Ye 2017; SAGAN, BigGAN) and non-saturating. Logits are cast to fp32 so bf16 runs lose
nothing here."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def d_hinge(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Discriminator hinge terms ``mean(relu(1 - D(x)))`` and ``mean(relu(1 + D(G(z))))`` for logits ``[B]``."""
    return F.relu(1.0 - real_logits.float()).mean(), F.relu(1.0 + fake_logits.float()).mean()


def g_hinge(fake_logits: torch.Tensor) -> torch.Tensor:
    """Generator loss ``-mean(D(G(z)))``."""
    return -fake_logits.float().mean()


def d_nonsaturating(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The original GAN's discriminator terms ``-log sigmoid(D(x))`` and ``-log(1 - sigmoid(D(G(z))))``, means, in
    their stable softplus form."""
    return F.softplus(-real_logits.float()).mean(), F.softplus(fake_logits.float()).mean()


def g_nonsaturating(fake_logits: torch.Tensor) -> torch.Tensor:
    """The non-saturating generator loss ``-log sigmoid(D(G(z)))``, mean (Goodfellow et al. 2014)."""
    return F.softplus(-fake_logits.float()).mean()


@dataclass(frozen=True)
class GanLoss:
    """A GAN objective: D's (real term, fake term) from its logits, and G's loss from D's logits of the fakes."""

    discriminator: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    generator: Callable[[torch.Tensor], torch.Tensor]


HINGE = GanLoss(d_hinge, g_hinge)  # BigGAN's and the STU-GAN authors'
NON_SATURATING = GanLoss(d_nonsaturating, g_nonsaturating)
