"""Batched, per-image-random augmentation on tensors (runs on the data's device).

Each ABLE view is two calls: ``draw_weak`` / ``draw_strong`` draw every per-image random
parameter at once from a ``torch.Generator`` (a small dataclass of tensors), and
``apply_weak`` / ``apply_strong`` turn a float N×3×H×W batch in [0, 1] into the view with
whole-batch kernels: all geometry (crop, flip, RandAugment's rotate/shear/translate) is
one affine matrix per image, composed on the device and applied by ONE ``grid_sample``;
the colour operations are per-image parameters applied to the whole batch (arithmetic
blends and ``torch.where`` masks); cutout is one mask. Nothing is read back to the host
(no ``.item()``, ``nonzero``, boolean indexing or other data-dependent shapes), so a step
that calls the views can be captured in a CUDA graph.

On CPU the same seed gives the same views, bit for bit, as the per-op implementation
these functions replaced (kept in ``tests/reference_augment.py``), so CPU training numbers
did not change: the parameters are drawn in the same order, and a merged draw such as
``rand(11, n)`` equals eleven ``rand(n)`` calls because the CPU generator fills element by
element. CUDA's generator splits its stream by tensor size, so there the merged draws give
other (equally distributed) numbers than the old per-parameter calls.

Speed, measured on CPU only (no GPU was available; a shared 2-core machine under load,
1 thread, torch 2.14.1; median of 3 runs of
``OMP_NUM_THREADS=1 python scripts/bench_kornia.py --device cpu --batch-size 256 1024``;
images/s at batch 256 [1024]; ops = ATen operations dispatched per call, a proxy for CUDA
kernel launches; syncs = reads of a tensor back to the host):

    view                          images/s       ops              syncs
    weak, this module             7.2k [7.9k]    90 [90]          0
    strong, this module           1.1k [1.2k]    305 [305]        0
    weak, old per-op module       6.8k           113              2
    strong, old per-op module     3.6k           733              29
    weak, kornia 0.9.0            2.2k [2.8k]    949 [2,482]      7
    strong, kornia 0.9.0          3.1k [3.7k]    ~1,000 [~2,600]  7–9

Kept: this module. Kornia's weak view is 3× slower; its strong view is faster on CPU only
because its RandAugment applies the same three ops to the whole batch with one magnitude
(here every image draws its own ops and magnitudes, so all nine photometric ops run on the
whole batch and masks pick each image's result), and it dispatches 3–8× more ops, growing
with the batch, and reads back to the host 7–9 times per call, which rules out graph
capture. The old module's strong view was ~3× faster on CPU, where it ran each op only on
the images that chose it at the price of a host sync per op; its CUDA branch already ran
every op on the whole batch, with 652 ops (counted on CPU with that branch forced) against
278 here on CUDA (where the blur is one ``avg_pool2d`` instead of nine additions). GPU
rates are still to be measured
(``python -m rable_nb bench augment --device cuda --batch-size 256 1024``).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from .profiling import count_ops

CROP_SCALE = (0.2, 1.0)          # RandomResizedCrop area range
CROP_LOG_RATIO = tuple(torch.tensor(r).log().item() for r in (3 / 4, 4 / 3))  # aspect range
JITTER = dict(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, p=0.8)
GRAYSCALE_P = 0.2
N_OPS = 3                        # RandAugment operations per image
CUTOUT_SIZE = 16                 # largest cutout side
FILL = 0.5                       # value of pixels warped in from outside and of the cutout
GEOMETRIC = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")
PHOTOMETRIC = ("identity", "autocontrast", "brightness", "color", "contrast", "sharpness",
               "posterize", "solarize", "equalize")
OPS = GEOMETRIC + PHOTOMETRIC


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


# --- parameters ---------------------------------------------------------------------------
@dataclass
class WeakParams:
    """Per-image parameters of the weak view (tensors with N rows, on the device)."""

    theta: torch.Tensor        # N×3×3 output → input map: RandomResizedCrop + flip
    brightness: torch.Tensor   # multiplicative factors, 1 where the jitter is off
    contrast: torch.Tensor     # blend factors towards the mean grey, 1 where off
    saturation: torch.Tensor   # blend factors towards the grey image, 1 where off
    hue: torch.Tensor          # rotation angles of the YIQ chroma plane (radians), 0 where off
    gray: torch.Tensor         # bool: convert to greyscale


@dataclass
class StrongParams:
    """Per-image parameters of the strong view."""

    theta: torch.Tensor        # N×3×3 RandomResizedCrop + flip
    op: torch.Tensor           # N×N_OPS indices into OPS
    magnitude: torch.Tensor    # N×N_OPS in [0, 1)
    sign: torch.Tensor         # N×N_OPS ±1: direction of a geometric op
    cutout: torch.Tensor       # N×3 (centre row, centre column, side)


def _uniform(u: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * u


def _crop_flip_theta(u: torch.Tensor) -> torch.Tensor:
    """N×3×3 RandomResizedCrop (area CROP_SCALE, log-aspect CROP_LOG_RATIO) + horizontal
    flip matrices from 5×N uniforms (area, aspect, centre x, centre y, flip)."""
    area, logr = _uniform(u[0], *CROP_SCALE), _uniform(u[1], *CROP_LOG_RATIO)
    w = (area * logr.exp()).sqrt().clamp(max=1.0)
    h = (area / logr.exp()).sqrt().clamp(max=1.0)
    cx, cy = (2 * u[2] - 1) * (1 - w), (2 * u[3] - 1) * (1 - h)
    sign = torch.where(u[4] < 0.5, -1.0, 1.0)
    zero, one = torch.zeros_like(w), torch.ones_like(w)
    return torch.stack([w * sign, zero, cx, zero, h, cy, zero, zero, one], 1).view(-1, 3, 3)


def draw_weak(n: int, device, generator: torch.Generator | None = None) -> WeakParams:
    """All random parameters of ``n`` weak views: one generator call."""
    u = torch.rand(11, n, device=device, generator=generator)
    on = (u[5] < JITTER["p"]).float()
    def factor(row, name):  # 1 when the jitter is off for that image
        return 1 + on * _uniform(u[row], -JITTER[name], JITTER[name])
    return WeakParams(theta=_crop_flip_theta(u[:5]), brightness=factor(6, "brightness"),
                      contrast=factor(7, "contrast"), saturation=factor(8, "saturation"),
                      hue=on * _uniform(u[9], -JITTER["hue"], JITTER["hue"]) * 2 * torch.pi,
                      gray=u[10] < GRAYSCALE_P)


def draw_strong(shape, device, generator: torch.Generator | None = None) -> StrongParams:
    """All random parameters of strong views of a batch of ``shape`` (N×C×H×W): seven
    generator calls (crop/flip, ops, magnitudes, signs, cutout row, column and side)."""
    n, _, h, w = shape
    def randint(lo, hi, size):
        return torch.randint(lo, hi, size, device=device, generator=generator)
    theta = _crop_flip_theta(torch.rand(5, n, device=device, generator=generator))
    op = randint(0, len(OPS), (n, N_OPS))
    magnitude = torch.rand(n, N_OPS, device=device, generator=generator)
    # one sign per (operation slot, geometric op, image), as the per-op loop drew them
    signs = torch.rand(N_OPS, len(GEOMETRIC), n, device=device, generator=generator) < 0.5
    chosen = signs.permute(2, 0, 1).gather(2, op.clamp(max=len(GEOMETRIC) - 1)[..., None])[..., 0]
    sign = torch.where(chosen & (op < len(GEOMETRIC)), -1.0, 1.0)
    cutout = torch.cat([randint(0, h, (n, 1)), randint(0, w, (n, 1)),
                        randint(1, CUTOUT_SIZE + 1, (n, 1))], 1)
    return StrongParams(theta, op, magnitude, sign, cutout)


# --- shared image operations -------------------------------------------------------------
def _gray(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def _blend(a: torch.Tensor, b: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """factor·a + (1−factor)·b with a per-image factor, clamped to [0, 1]."""
    return (b + factor.view(-1, 1, 1, 1) * (a - b)).clamp(0, 1)


def _per_image(t: torch.Tensor) -> torch.Tensor:
    return t.view(-1, 1, 1, 1)


def warp(x: torch.Tensor, theta: torch.Tensor, fill: float = FILL) -> torch.Tensor:
    """Apply per-image affine maps (N×2×3 or N×3×3, output → input coordinates); pixels
    from outside the image get ``fill``."""
    grid = F.affine_grid(theta[:, :2].to(x.dtype), list(x.shape), align_corners=False)
    out = F.grid_sample(x - fill, grid, mode="bilinear", padding_mode="zeros",
                        align_corners=False)
    return out + fill


@functools.cache
def _yiq(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """RGB → YIQ matrix and its inverse on ``device``, made once (on the first call, so
    before any CUDA-graph capture; outside inference mode)."""
    with torch.inference_mode(False):
        to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322],
                               [0.211, -0.523, 0.312]])
        return to_yiq.to(device), torch.linalg.inv(to_yiq).to(device)


def _hue_matrices(angle: torch.Tensor) -> torch.Tensor:
    """N×3×3 RGB maps that rotate the YIQ chroma plane by ``angle``."""
    to_yiq, from_yiq = _yiq(angle.device)
    cos, sin = angle.cos(), angle.sin()
    zero, one = torch.zeros_like(angle), torch.ones_like(angle)
    rot = torch.stack([one, zero, zero, zero, cos, -sin, zero, sin, cos], 1).view(-1, 3, 3)
    return from_yiq @ rot @ to_yiq


def apply_weak(x: torch.Tensor, p: WeakParams) -> torch.Tensor:
    """RandomResizedCrop + flip, ColorJitter (brightness, contrast, saturation, hue in this
    order) and random greyscale with the parameters ``p``."""
    x = warp(x, p.theta)
    x = (x * _per_image(p.brightness)).clamp(0, 1)
    x = _blend(x, _gray(x).mean((2, 3), keepdim=True), p.contrast)
    x = _blend(x, _gray(x), p.saturation)
    x = torch.einsum("nij,njhw->nihw", _hue_matrices(p.hue).to(x.dtype), x).clamp(0, 1)
    return torch.where(_per_image(p.gray), _gray(x).expand_as(x), x)


def weak_view(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """RandomResizedCrop(32, 0.2–1) + flip + ColorJitter(.4,.4,.4,.1) p=.8 + grayscale p=.2."""
    return apply_weak(x, draw_weak(len(x), x.device, generator))


# --- strong view: RandAugment-style operations ---------------------------------------------
def _geometric_matrices(is_op: torch.Tensor, magnitude: torch.Tensor, sign: torch.Tensor
                        ) -> torch.Tensor:
    """N×K×3×3 maps of the geometric ops (rotate ±30°, shear ±0.3, translate ±0.3 of the
    image); the identity where a slot holds a photometric op. ``is_op``: N×K×len(OPS)."""
    s = magnitude * sign
    r = s * torch.pi / 6
    cos, sin = r.cos(), r.sin()
    rotate, shear_x, shear_y, translate_x, translate_y = is_op[..., :len(GEOMETRIC)].unbind(-1)
    zero, one = torch.zeros_like(s), torch.ones_like(s)
    a = torch.where(rotate, cos, one)
    b = torch.where(rotate, -sin, torch.where(shear_x, s * 0.3, zero))
    c = torch.where(translate_x, s * 0.6, zero)
    d = torch.where(rotate, sin, torch.where(shear_y, s * 0.3, zero))
    f = torch.where(translate_y, s * 0.6, zero)
    return torch.stack([a, b, c, d, a, f, zero, zero, one], -1).view(*s.shape, 3, 3)


def _photometric_settings(is_op: torch.Tensor, magnitude: torch.Tensor) -> list[dict]:
    """Per slot, the per-image masks and parameters of the photometric ops (N×1×1×1
    tensors), all computed at once from N×K×len(OPS) ``is_op`` and N×K magnitudes."""
    def index(name):
        return OPS.index(name)
    every = {name: is_op[..., index(name)] for name in PHOTOMETRIC}
    every["blend"] = is_op[..., index("brightness"):index("sharpness") + 1].any(-1)
    every["threshold"] = torch.where(every["solarize"], magnitude, math.inf)
    every["factor"] = 0.05 + 1.9 * magnitude
    every["step"] = 2 ** (8 - (4 + 4 * magnitude).round())  # posterize to 4–8 bits
    return [{name: _per_image(t[:, k]) for name, t in every.items()}
            for k in range(magnitude.shape[1])]


def _autocontrast(x: torch.Tensor, on: torch.Tensor) -> torch.Tensor:
    """Stretch each channel to [0, 1] where ``on``; elsewhere (x − 0) / 1, exactly x."""
    lo, hi = x.amin((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)
    return (x - torch.where(on, lo, 0.0)) / torch.where(on, (hi - lo).clamp_min(1e-3), 1.0)


def _box_blur(x: torch.Tensor) -> torch.Tensor:
    """3×3 mean with replicated borders. Equal to ``F.avg_pool2d`` (same sums in the same
    order); on CPU the nine shifted-slice additions are ~2.5× faster than its kernel."""
    padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
    if x.is_cuda:
        return F.avg_pool2d(padded, 3, 1)
    h, w = x.shape[2:]
    total = padded[:, :, :h, :w].clone()
    for i, j in [(i, j) for i in range(3) for j in range(3)][1:]:
        total += padded[:, :, i:i + h, j:j + w]
    return total / 9


def _blend_base(x: torch.Tensor, s: dict) -> torch.Tensor:
    """What brightness (black), contrast (mean grey), color (grey image) and sharpness
    (3×3 blur) blend away from, per image."""
    gray = _gray(x)
    flat = torch.where(s["brightness"], 0.0, gray.mean((2, 3), keepdim=True))
    return torch.where(s["sharpness"], _box_blur(x), torch.where(s["color"], gray, flat))


def _photometric(x: torch.Tensor, s: dict) -> torch.Tensor:
    """One photometric op per image with the settings ``s`` of one slot (images whose slot
    holds a geometric op or identity come back unchanged).

    Every op runs on the whole batch with per-image parameters, and masks keep each
    image's own result: neutral parameters (autocontrast, solarize) or ``torch.where``.
    """
    y = _autocontrast(x, s["autocontrast"])
    y = torch.where(y >= s["threshold"], 1 - y, y)                            # solarize
    y = torch.where(s["blend"], _blend(x, _blend_base(x, s), s["factor"]), y)
    y = torch.where(s["posterize"], torch.floor(x * 255 / s["step"]) * s["step"] / 255, y)
    return torch.where(s["equalize"], TF.equalize(x), y)


def _cutout_mask(p: StrongParams, h: int, w: int) -> torch.Tensor:
    """N×1×H×W bool: one square per image, side in [1, CUTOUT_SIZE], clipped at the border."""
    cy, cx, side = (p.cutout[:, i].view(-1, 1, 1) for i in range(3))
    rows = torch.arange(h, device=cy.device).view(1, -1, 1)
    cols = torch.arange(w, device=cy.device).view(1, 1, -1)
    lo_r, lo_c = cy - side // 2, cx - side // 2
    return ((rows >= lo_r) & (rows < lo_r + side) & (cols >= lo_c) & (cols < lo_c + side)
            )[:, None]


def apply_strong(x: torch.Tensor, p: StrongParams) -> torch.Tensor:
    """Crop + flip composed with the geometric ops into one warp, then the photometric ops
    slot by slot, then cutout (filled with FILL)."""
    is_op = p.op[..., None] == torch.arange(len(OPS), device=p.op.device)   # N×K×len(OPS)
    full = p.theta
    for m in _geometric_matrices(is_op, p.magnitude, p.sign).unbind(1):
        full = full @ m
    x = warp(x, full)
    for settings in _photometric_settings(is_op, p.magnitude):
        x = _photometric(x, settings)
    x = x.clamp(0, 1)
    return torch.where(_cutout_mask(p, *x.shape[2:]), FILL, x)


def strong_view(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """RandomResizedCrop + flip + 3 RandAugment-style ops + Cutout (side ≤ 16)."""
    return apply_strong(x, draw_strong(x.shape, x.device, generator))


# Views a method can ask for by name: augmented images (per-image randomness from the
# epoch's generator), or the inputs as they are ("plain": e.g. feature vectors, which have
# no augmentation). The recipe may swap them (rable_nb/engine/recipe.py).
VIEWS = {"weak": weak_view, "strong": strong_view, "plain": lambda x, generator=None: x}


# --- benchmark ----------------------------------------------------------------------------
def bench(device: str = "auto", batch_sizes=None, views=None) -> dict:
    """Images/s and dispatched ops of each view (``views``: name → fn(x, generator);
    default the weak and strong view) on random images, per batch size (default 256)."""
    from torch.utils.benchmark import Timer

    from .networks import device_name, pick_device
    dev = pick_device(device)
    views = views or {"weak": weak_view, "strong": strong_view}
    rows = []
    for bs in batch_sizes or [256]:
        gen = torch.Generator(device=dev).manual_seed(0)
        x = torch.rand(bs, 3, 32, 32, device=dev, generator=gen)
        row = {"batch_size": bs}
        for name, view in views.items():
            timer = Timer("view(x, generator=gen)", globals=dict(view=view, x=x, gen=gen))
            row[f"{name}_images_per_s"] = bs / timer.blocked_autorange(min_run_time=1).median
            row.update({f"{name}_{k}": v for k, v in count_ops(view, x, generator=gen).items()})
        rows.append(row)
    return {"what": "augment", "device": device_name(dev), "threads": torch.get_num_threads(),
            "results": rows, **rows[0]}
