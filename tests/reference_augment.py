"""REFERENCE for the tests: the per-op augmentation of commit 32004e9, kept verbatim below
this docstring (except this docstring) so that the batched ``rable_nb.engine.augment`` can be
checked against it.

It loops over every operation and, on CPU, gathers the images that chose it (``nonzero``,
``index_copy``: a host synchronisation per operation); on CUDA it computes every operation
on the whole batch. (``random_crop_flip`` is left out: it is unchanged.) Given the same
``torch.Generator`` it consumes the same random numbers in the same order as the batched
module, so both produce the same views. Slow; never import it from the package.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF


# --- ABLE views -------------------------------------------------------------------------
# Images are float N×3×H×W in [0, 1]; every random draw is per image. Geometric steps are
# collected into one affine matrix per image and applied with a single grid_sample.

def _uniform(n: int, lo: float, hi: float, dev, generator=None) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, device=dev, generator=generator)


def _gray(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def _blend(a: torch.Tensor, b: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """factor·a + (1−factor)·b with a per-image factor, clamped to [0, 1]."""
    return (b + factor.view(-1, 1, 1, 1) * (a - b)).clamp(0, 1)


def resized_crop_theta(n: int, dev, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), flip: bool = True,
                       generator=None) -> torch.Tensor:
    """N×2×3 affine matrices of RandomResizedCrop (area ``scale``, aspect ``ratio``) + flip."""
    area = _uniform(n, *scale, dev, generator)
    logr = _uniform(n, torch.log(torch.tensor(ratio[0])).item(),
                    torch.log(torch.tensor(ratio[1])).item(), dev, generator)
    w = (area * logr.exp()).sqrt().clamp(max=1.0)
    h = (area / logr.exp()).sqrt().clamp(max=1.0)
    cx = (2 * torch.rand(n, device=dev, generator=generator) - 1) * (1 - w)
    cy = (2 * torch.rand(n, device=dev, generator=generator) - 1) * (1 - h)
    sign = torch.ones(n, device=dev)
    if flip:
        sign = torch.where(torch.rand(n, device=dev, generator=generator) < 0.5, -sign, sign)
    theta = torch.zeros(n, 2, 3, device=dev)
    theta[:, 0, 0], theta[:, 0, 2] = w * sign, cx
    theta[:, 1, 1], theta[:, 1, 2] = h, cy
    return theta


def warp(x: torch.Tensor, theta: torch.Tensor, fill: float = 0.5) -> torch.Tensor:
    """Apply per-image affine maps (output → input coordinates); outside pixels = ``fill``."""
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    out = F.grid_sample(x - fill, grid, mode="bilinear", padding_mode="zeros",
                        align_corners=False)
    return out + fill


def color_jitter(x: torch.Tensor, b=0.4, c=0.4, s=0.4, h=0.1, p=0.8, generator=None
                 ) -> torch.Tensor:
    """Brightness, contrast, saturation, hue (YIQ rotation) jitter, each image with prob p."""
    n, dev = len(x), x.device
    on = (torch.rand(n, device=dev, generator=generator) < p).float()
    def fac(r):  # factor 1 when the jitter is off for that image
        return 1 + on * _uniform(n, -r, r, dev, generator)
    x = (x * fac(b).view(-1, 1, 1, 1)).clamp(0, 1)
    x = _blend(x, _gray(x).mean((2, 3), keepdim=True), fac(c))
    x = _blend(x, _gray(x), fac(s))
    angle = on * _uniform(n, -h, h, dev, generator) * 2 * torch.pi
    to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322],
                           [0.211, -0.523, 0.312]], device=dev)
    cos, sin = angle.cos(), angle.sin()
    rot = torch.zeros(n, 3, 3, device=dev)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, -sin, sin, cos
    mat = torch.linalg.inv(to_yiq) @ rot @ to_yiq                       # N×3×3
    x = torch.einsum("nij,njhw->nihw", mat.to(x.dtype), x)
    return x.clamp(0, 1)


def random_grayscale(x: torch.Tensor, p: float = 0.2, generator=None) -> torch.Tensor:
    on = torch.rand(len(x), device=x.device, generator=generator) < p
    return torch.where(on.view(-1, 1, 1, 1), _gray(x).expand_as(x), x)


def weak_view(x: torch.Tensor, generator=None) -> torch.Tensor:
    """RandomResizedCrop(32, 0.2–1) + flip + ColorJitter(.4,.4,.4,.1) p=.8 + grayscale p=.2."""
    x = warp(x, resized_crop_theta(len(x), x.device, generator=generator))
    return random_grayscale(color_jitter(x, generator=generator), generator=generator)


# RandAugment-style operations: geometric ones return a 2×3 affine per image given a
# magnitude in [0, 1]; photometric ones map (images, magnitude) → images.
def _affine(n, dev, a=1.0, b=0.0, c=0.0, d=0.0, e=1.0, f=0.0):
    theta = torch.zeros(n, 3, 3, device=dev)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 0, 2] = a, b, c
    theta[:, 1, 0], theta[:, 1, 1], theta[:, 1, 2] = d, e, f
    theta[:, 2, 2] = 1
    return theta


def _signed(m, generator):
    return m * torch.where(torch.rand(len(m), device=m.device, generator=generator) < 0.5, -1, 1)


GEOMETRIC = {
    "rotate": lambda m, g: (lambda r: _affine(len(m), m.device, r.cos(), -r.sin(), 0, r.sin(),
                                              r.cos(), 0))(_signed(m, g) * torch.pi / 6),
    "shear_x": lambda m, g: _affine(len(m), m.device, b=_signed(m, g) * 0.3),
    "shear_y": lambda m, g: _affine(len(m), m.device, d=_signed(m, g) * 0.3),
    "translate_x": lambda m, g: _affine(len(m), m.device, c=_signed(m, g) * 0.6),
    "translate_y": lambda m, g: _affine(len(m), m.device, f=_signed(m, g) * 0.6),
}
PHOTOMETRIC = {
    "identity": lambda x, m: x,
    "autocontrast": lambda x, m: ((x - x.amin((2, 3), keepdim=True))
                                  / (x.amax((2, 3), keepdim=True)
                                     - x.amin((2, 3), keepdim=True)).clamp_min(1e-3)),
    "brightness": lambda x, m: _blend(x, torch.zeros_like(x), 0.05 + 1.9 * m),
    "color": lambda x, m: _blend(x, _gray(x), 0.05 + 1.9 * m),
    "contrast": lambda x, m: _blend(x, _gray(x).mean((2, 3), keepdim=True), 0.05 + 1.9 * m),
    "sharpness": lambda x, m: _blend(x, F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"),
                                                     3, 1), 0.05 + 1.9 * m),
    "posterize": lambda x, m: (lambda bits: torch.floor(x * 255 / 2 ** (8 - bits))
                               * 2 ** (8 - bits) / 255)((4 + 4 * m).round().view(-1, 1, 1, 1)),
    "solarize": lambda x, m: torch.where(x >= m.view(-1, 1, 1, 1), 1 - x, x),
    "equalize": lambda x, m: TF.equalize(x),
}
OPS = list(GEOMETRIC) + list(PHOTOMETRIC)


def rand_augment(x: torch.Tensor, theta: torch.Tensor, n_ops: int = 3, generator=None
                 ) -> torch.Tensor:
    """``n_ops`` random operations per image with random magnitudes, composed with the
    crop/flip map ``theta`` (N×2×3) into one warp; photometric ops follow the warp."""
    n, dev = len(x), x.device
    choice = torch.randint(0, len(OPS), (n, n_ops), device=dev, generator=generator)
    mag = torch.rand(n, n_ops, device=dev, generator=generator)
    full = torch.cat([theta, torch.tensor([0, 0, 1.0], device=dev).expand(n, 1, 3)], 1)
    for k in range(n_ops):
        for i, name in enumerate(GEOMETRIC):
            sel = (choice[:, k] == i).view(-1, 1, 1)
            full = torch.where(sel, full @ GEOMETRIC[name](mag[:, k], generator), full)
    x = warp(x, full[:, :2])
    for k in range(n_ops):
        for i, name in enumerate(PHOTOMETRIC, start=len(GEOMETRIC)):
            sel = choice[:, k] == i
            if x.is_cuda:  # whole batch + select: no host synchronisation
                x = torch.where(sel.view(-1, 1, 1, 1), PHOTOMETRIC[name](x, mag[:, k]), x)
            elif (idx := sel.nonzero().squeeze(1)).numel():  # CPU: only the chosen images
                x = x.index_copy(0, idx, PHOTOMETRIC[name](x[idx], mag[idx, k]))
    return x.clamp(0, 1)


def cutout(x: torch.Tensor, size: int = 16, fill: float = 0.5, generator=None) -> torch.Tensor:
    """Fill one square per image: side drawn in [1, ``size``], centre uniform, clipped."""
    n, _, h, w = x.shape
    cy = torch.randint(0, h, (n, 1, 1), device=x.device, generator=generator)
    cx = torch.randint(0, w, (n, 1, 1), device=x.device, generator=generator)
    side = torch.randint(1, size + 1, (n, 1, 1), device=x.device, generator=generator)
    rows = torch.arange(h, device=x.device).view(1, -1, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, -1)
    lo_r, lo_c = cy - side // 2, cx - side // 2
    box = (rows >= lo_r) & (rows < lo_r + side) & (cols >= lo_c) & (cols < lo_c + side)
    return torch.where(box[:, None], torch.full_like(x, fill), x)


def strong_view(x: torch.Tensor, generator=None) -> torch.Tensor:
    """RandomResizedCrop + flip + 3 RandAugment-style ops + Cutout (side ≤ 16)."""
    theta = resized_crop_theta(len(x), x.device, generator=generator)
    return cutout(rand_augment(x, theta, generator=generator), generator=generator)
