"""Batched, per-sample-random image augmentation on tensors (runs on the data's device)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def random_crop_flip(x: torch.Tensor, pad: int = 4, generator: torch.Generator | None = None
                     ) -> torch.Tensor:
    """Reflect-pad by ``pad``, take an independent random 32×32 crop and flip per image.

    ``x``: float N×C×H×W. Each image draws its own offsets and flip.
    """
    n, c, h, w = x.shape
    dev = x.device
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    top = torch.randint(0, 2 * pad + 1, (n, 1), device=dev, generator=generator)
    left = torch.randint(0, 2 * pad + 1, (n, 1), device=dev, generator=generator)
    rows = (top + torch.arange(h, device=dev))[:, None, :, None]
    cols = (left + torch.arange(w, device=dev))[:, None, None, :]
    out = padded[torch.arange(n, device=dev)[:, None, None, None],
                 torch.arange(c, device=dev)[None, :, None, None], rows, cols]
    flip = torch.rand(n, device=dev, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(3), out)
