"""Backbones: CIFAR ResNet-18 (3×3 stride-1 stem, no max-pool) and small CNNs.

Every backbone maps a normalised N×3×32×32 batch to N×feat_dim features.
"""
from __future__ import annotations

import contextlib
import functools
import json

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torchvision.models import resnet18

from ..config import write_atomic

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
EVAL_BATCH = {"cpu": 1000, "cuda": 4096}   # default batch of batched_logits per device type
# Arithmetic of the network's forward passes (PRECISION): bf16 autocast on CUDA (fp32
# outputs), or fp32 everywhere, as the official LT-PLL code runs. CPU passes are fp32.
PRECISIONS = ("bf16", "fp32")


def autocast_dtype(device_type: str, precision: str = "bf16") -> torch.dtype | None:
    """The autocast dtype of forward passes on ``device_type`` at ``precision`` (None:
    no autocast, fp32)."""
    if precision not in PRECISIONS:
        raise ValueError(f"PRECISION={precision!r} is invalid: choose one of {PRECISIONS}.")
    return torch.bfloat16 if device_type == "cuda" and precision == "bf16" else None


def used_precision(device_type: str, precision: str = "bf16") -> str:
    """What the passes actually run in: ``'bf16'`` or ``'fp32'`` (always on CPU)."""
    return "fp32" if autocast_dtype(device_type, precision) is None else "bf16"


def autocast(device_type: str, precision: str = "bf16", **kwargs):
    """The autocast context of forward passes at ``precision`` (disabled for fp32 and on
    CPU); ``kwargs`` go to ``torch.autocast``."""
    dtype = autocast_dtype(device_type, precision)
    return torch.autocast(device_type, dtype=dtype or torch.bfloat16, enabled=dtype is not None,
                          **kwargs)


def cifar_resnet18() -> nn.Module:
    """torchvision ResNet-18 adapted to 32×32 inputs; returns 512-d features."""
    net = resnet18(num_classes=10)
    net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    net.feat_dim = 512
    return net


def _conv_block(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def small_cnn(width: int = 64) -> nn.Module:
    """A fast VGG-style CNN for CPU ('quick' profile): 3 stages, global pooling."""
    w = width
    net = nn.Sequential(*_conv_block(3, w), *_conv_block(w, w), nn.MaxPool2d(2),
                        *_conv_block(w, 2 * w), *_conv_block(2 * w, 2 * w), nn.MaxPool2d(2),
                        *_conv_block(2 * w, 4 * w), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    net.feat_dim = 4 * w
    return net


def tiny_cnn() -> nn.Module:
    """A network for the 'smoke' profile: seconds on CPU."""
    net = nn.Sequential(*_conv_block(3, 16), nn.MaxPool2d(2), *_conv_block(16, 32),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten())
    net.feat_dim = 32
    return net


def mini_cnn() -> nn.Module:
    """``small_cnn`` at width 16: ~20× cheaper, the 'quick' profile's training network."""
    return small_cnn(width=16)


BACKBONES = {"resnet18": cifar_resnet18, "small_cnn": small_cnn, "mini_cnn": mini_cnn,
             "tiny_cnn": tiny_cnn}


def build_backbone(arch: str) -> nn.Module:
    """Backbone by name (see ``BACKBONES``); raises ``ValueError`` for unknown names."""
    if arch not in BACKBONES:
        raise ValueError(f"Unknown architecture {arch!r}; choose one of {sorted(BACKBONES)}.")
    return BACKBONES[arch]()


def to_unit(x_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 N×C×H×W (or N×H×W×C), C = 3 or 1 → float in [0, 1], N×3×H×W: a greyscale
    image (C = 1, e.g. Fashion-MNIST) is repeated into three equal channels, so every
    network, augmentation and normalisation here takes it unchanged."""
    if x_uint8.shape[-1] in (1, 3):
        x_uint8 = x_uint8.permute(0, 3, 1, 2)
    if x_uint8.shape[1] == 1:
        x_uint8 = x_uint8.expand(-1, 3, -1, -1)
    return x_uint8.float().div_(255)


@functools.cache
def _cifar_stats(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10 channel mean and std as 1×3×1×1 tensors on ``device``, made once (outside
    inference mode, so that training can use them): a fresh host-to-GPU copy on every call
    would wait for the GPU each time."""
    with torch.inference_mode(False):
        return tuple(torch.tensor(v).view(1, 3, 1, 1).to(device) for v in (CIFAR_MEAN, CIFAR_STD))


def standardize(x: torch.Tensor) -> torch.Tensor:
    """Float N×3×H×W in [0, 1] → standardised with the CIFAR-10 channel statistics."""
    mean, std = _cifar_stats(x.device)
    return (x - mean) / std


def normalize(x_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 N×H×W×C (or N×C×H×W) → float N×3×H×W normalised with CIFAR statistics."""
    return standardize(to_unit(x_uint8))


def _eval_batches(modules, x_uint8, batch: int | None, fn, precision: str = "bf16") -> list:
    """``fn(x)`` for every batch ``x`` of uint8 images, normalised, with ``modules`` in
    evaluation mode (restored afterwards). On CUDA: autocast at ``precision`` (bf16 by
    default), channels_last, batches of ``EVAL_BATCH["cuda"]``, the images copied to the
    GPU once; on CPU: fp32."""
    was_training = [m.training for m in modules]
    for m in modules:
        m.eval()
    dev = next(modules[0].parameters()).device
    cuda = dev.type == "cuda"
    batch = batch or EVAL_BATCH["cuda" if cuda else "cpu"]
    images = torch.as_tensor(x_uint8).to(dev)
    out = []
    for i in range(0, len(images), batch):
        x = normalize(images[i:i + batch])
        if cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(dev.type, precision):
            out.append(fn(x))
    for m, mode in zip(modules, was_training):
        m.train(mode)
    return out


@torch.inference_mode()
def batched_logits(net: nn.Module, x_uint8, log_prior: torch.Tensor | None = None,
                   batch: int | None = None, precision: str = "bf16") -> torch.Tensor:
    """Float logits (on the net's device) of uint8 images in evaluation mode, minus
    ``log_prior`` when given (test-time adjustment).

    On CUDA: autocast at ``precision`` (see ``PRECISIONS``; bf16 by default), channels_last, batches of ``EVAL_BATCH["cuda"]``; the images
    go to the GPU in one copy and nothing comes back per batch, so the caller's transfer
    of the result is the only wait. On CPU: fp32, batches of ``EVAL_BATCH["cpu"]``.
    Returns an inference tensor (no autograd).
    """
    dev = next(net.parameters()).device
    prior = log_prior.to(dev) if log_prior is not None else None
    out = _eval_batches([net], x_uint8, batch,
                        lambda x: net(x).float() - prior if prior is not None else net(x).float(),
                        precision)
    return torch.cat(out) if out else torch.zeros(0, device=dev)


@torch.inference_mode()
def batched_features(backbone: nn.Module, classifier: nn.Module, x_uint8,
                     batch: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(float features, logits) of uint8 images: ``backbone`` then ``classifier``, both in
    evaluation mode, batched as :func:`batched_logits` (bf16 autocast on CUDA)."""
    def both(x):
        f = backbone(x)
        return f.float(), classifier(f).float()
    out = _eval_batches([backbone, classifier], x_uint8, batch, both)
    if not out:
        dev = next(backbone.parameters()).device
        return torch.zeros(0, backbone.feat_dim, device=dev), torch.zeros(0, device=dev)
    return torch.cat([f for f, _ in out]), torch.cat([c for _, c in out])


@contextlib.contextmanager
def batch_statistics_of(net: nn.Module, rows: torch.Tensor | None):
    """Within this context every BatchNorm layer of ``net`` that uses batch statistics
    (training mode) takes them from the batch rows where ``rows`` (a bool mask over the
    batch) is True, and only those: its running mean and variance are updated with them,
    and every row is normalised with them. ``rows=None``: no change.

    A forward pass of B rows under it gives the selected rows the outputs, running
    statistics and (with the other rows out of the loss) gradients of a pass over the
    selected rows alone, in networks whose other layers treat rows independently (every
    backbone here): an exact stand-in for indexing the selected rows that keeps the shapes
    static (CUDA graphs) and reads nothing back to the host. At least one row must be
    selected. The statistics are computed in fp32 as in ``nn.BatchNorm2d``, summed in
    another order (agreement to float rounding, not bit for bit).
    """
    if rows is None:
        yield
        return
    layers = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in layers:
        m.forward = functools.partial(_masked_batch_norm, m, rows)
    try:
        yield
    finally:
        for m in layers:
            del m.forward             # back to the class's forward


def _masked_batch_norm(m: nn.modules.batchnorm._BatchNorm, rows: torch.Tensor,
                       x: torch.Tensor) -> torch.Tensor:
    """``m(x)`` with the batch statistics of the rows ``rows`` (see
    :func:`batch_statistics_of`)."""
    if not (m.training or m.running_mean is None):        # running statistics: unchanged
        return type(m).forward(m, x)
    m._check_input_dim(x)
    dims = [0, *range(2, x.dim())]
    shape = [1, -1] + [1] * (x.dim() - 2)
    xf = x.to(torch.promote_types(x.dtype, torch.float32))   # bf16 inputs: fp32 statistics
    w = rows.to(xf.dtype).reshape(-1, *[1] * (x.dim() - 1))
    count = w.sum().clamp_min(1) * x[0, 0].numel()        # values per channel
    mean = (xf * w).sum(dims) / count
    centred = xf - mean.reshape(shape)
    var = (centred.square() * w).sum(dims) / count        # biased: what normalises
    out = centred * torch.rsqrt(var + m.eps).reshape(shape)
    if m.affine:
        out = out * m.weight.reshape(shape) + m.bias.reshape(shape)
    if m.training and m.track_running_stats:
        # in place through .data, as the native kernel writes them: earlier native passes
        # of this step saved the running statistics for their backward (which does not
        # read them in training mode) and would refuse a bumped version counter
        with torch.no_grad():
            m.num_batches_tracked.data.add_(1)
            factor = (m.momentum if m.momentum is not None
                      else 1.0 / m.num_batches_tracked.float())
            unbiased = var * count / (count - 1).clamp_min(1)
            m.running_mean.data.mul_(1 - factor).add_(factor * mean)
            m.running_var.data.mul_(1 - factor).add_(factor * unbiased)
    return out.to(x.dtype)


def pick_device(device: str = "auto") -> torch.device:
    """'auto' → CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("DEVICE='cuda' was requested but no CUDA GPU is available.")
    return torch.device(device)


def device_name(dev: torch.device) -> str:
    """'cuda: <GPU name>' or 'cpu (<threads> threads)', for benchmark reports."""
    if dev.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(dev)}"
    return f"cpu ({torch.get_num_threads()} threads)"


class PLLNet(nn.Module):
    """Backbone + linear classifier + projection head (feat→feat→ReLU→proj_dim, L2-normed).

    ``forward`` returns logits; :meth:`embed` returns (features, logits, projections) of
    images, :meth:`heads` the same of backbone features.
    """

    def __init__(self, arch: str, num_classes: int = 10, proj_dim: int = 128):
        super().__init__()
        self.arch, self.num_classes = arch, num_classes
        self.backbone = build_backbone(arch)
        dim = self.backbone.feat_dim
        self.classifier = nn.Linear(dim, num_classes)
        self.head = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, proj_dim))

    def embed(self, x: torch.Tensor):
        return self.heads(self.backbone(x))

    def heads(self, feats: torch.Tensor):
        """(features, logits, L2-normalised projections) of backbone features."""
        return feats, self.classifier(feats), nn.functional.normalize(self.head(feats), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.backbone(x))


def save_model(net: PLLNet, path, meta: dict | None = None,
               extra: dict[str, torch.Tensor] | None = None) -> None:
    """Write model weights (+ extra tensors, e.g. a test-time logit prior) to safetensors.

    ``meta`` (json-serialisable) is stored in the file's metadata with arch/num_classes.
    """
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    tensors.update({f"extra.{k}": v.detach().cpu().contiguous() for k, v in (extra or {}).items()})
    info = dict(meta or {}, arch=net.arch, num_classes=net.num_classes)
    write_atomic(path, lambda t: save_file(tensors, t, metadata={"rable_nb": json.dumps(info)}))


def load_model(path, device: str | torch.device = "cpu"):
    """Inverse of :func:`save_model`: (net in eval mode, meta dict, extra tensors)."""
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["rable_nb"])
    tensors = load_file(str(path), device=str(device))
    net = PLLNet(meta["arch"], meta["num_classes"]).to(device)
    net.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    extra = {k[6:]: v for k, v in tensors.items() if k.startswith("extra.")}
    return net.eval(), meta, extra
