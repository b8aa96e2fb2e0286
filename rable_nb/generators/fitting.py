"""What the backends trained here (``pixel``, ``gan``) share: the resumable step loop, the
checkpoint format, the finished-fit file, and image-tensor helpers for any image shape.

- A :class:`StepTrainer` holds one fit's networks, optimizers and data; ``step()`` is one
  optimisation step whose randomness comes from a generator seeded by (seed, step), so a fit
  resumed from its checkpoint ends with the same weights as an uninterrupted one. ``train``
  runs steps with a tqdm bar showing the losses, logs their means and saves the whole state
  every K steps (and at the steps in ``marks``, e.g. the end of a training phase).
- A :class:`TrainedGenerator` fits through such a trainer (resuming from
  ``generator/<name>-state.safetensors``; ``GEN_STOP_AFTER`` stops after that many steps in
  total), keeps the finished weights in ``generator/<name>.safetensors`` and loads them
  instead of training again when the settings and the data are the same.
- Images of any size and channel count (N×H×W×C uint8, C = 1 or 3): the networks see them
  as N×C×H×W in [−1, 1], padded (reflection) to a multiple of their down-sampling factor,
  and their outputs are cropped back.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .. import config
from ..networks import pick_device
from .base import Generator


# --- data and image tensors ------------------------------------------------------------
def fingerprint(*arrays) -> str:
    """SHA-1 of the arrays' shapes, types and bytes (which data a fit was made from)."""
    h = hashlib.sha1()
    for arr in arrays:
        arr = np.ascontiguousarray(arr)
        h.update(f"{arr.shape}{arr.dtype}".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def class_weights(cond_labels: np.ndarray, balance: float, num_classes: int) -> np.ndarray:
    """Per-image sampling weight n_c^(−balance) (balance 1: every class equally often)."""
    counts = np.bincount(cond_labels, minlength=num_classes).astype(np.float64)
    return 1.0 / np.maximum(counts, 1)[cond_labels] ** balance


def to_signed(x_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 N×C×H×W → float in [−1, 1]."""
    return x_uint8.float().div(127.5).sub(1)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[−1, 1] N×C×H×W → uint8 N×H×W×C."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def padded_size(size: int, multiple: int) -> int:
    """The smallest multiple of ``multiple`` that is at least ``size``."""
    return math.ceil(size / multiple) * multiple


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Reflection-pad N×C×H×W (split evenly, extra row/column at the end) so that H and W
    become multiples of ``multiple`` (e.g. 28 → 32 for a network that halves three times)."""
    h, w = x.shape[-2:]
    dh, dw = padded_size(h, multiple) - h, padded_size(w, multiple) - w
    if not dh and not dw:
        return x
    return F.pad(x, (dw // 2, dw - dw // 2, dh // 2, dh - dh // 2), mode="reflect")


def crop_to(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The H×W window that :func:`pad_to_multiple` added its border around."""
    top, left = (x.shape[-2] - h) // 2, (x.shape[-1] - w) // 2
    return x[..., top:top + h, left:left + w]


# --- safetensors files -----------------------------------------------------------------
def save_tensors(path: Path, tensors: dict, meta: dict) -> None:
    """Atomically write tensors (moved to the CPU) and string metadata."""
    config.write_atomic(path, lambda t: save_file(
        {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, t, meta))


def read_meta(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def optimizer_tensors(opt: torch.optim.Optimizer, params, prefix: str) -> dict:
    """The optimizer's per-parameter state as ``<prefix>.<param index>.<name>`` tensors."""
    out = {}
    for i, p in enumerate(params):
        for k, v in opt.state.get(p, {}).items():
            out[f"{prefix}.{i}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    return out


def load_optimizer(opt: torch.optim.Optimizer, params, tensors: dict, prefix: str) -> None:
    """Inverse of :func:`optimizer_tensors` (Adam's ``step`` counter stays on the CPU)."""
    for k, v in tensors.items():
        if k.startswith(prefix + "."):
            _, i, name = k.split(".", 2)
            opt.state[params[int(i)]][name] = v.cpu() if name == "step" else v.clone()


def prefixed(prefix: str, state: dict) -> dict:
    return {f"{prefix}.{k}": v for k, v in state.items()}


def unprefixed(prefix: str, tensors: dict) -> dict:
    n = len(prefix) + 1
    return {k[n:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


# --- the step loop ---------------------------------------------------------------------
class StepTrainer:
    """Networks, optimizers and data of one fit (see the module docstring): the images as
    uint8 N×C×H×W on the device (``x``), their conditioning labels (``y``) and per-image
    sampling weights n_c^(−balance) (``w``). Subclasses set ``total_steps``, ``batch``
    (images per step, for images/s) and ``desc``, and implement ``step()`` (→ {loss name:
    device tensor}), ``state()`` (→ tensors, extra metadata) and ``restore(tensors, extra)``."""

    total_steps, batch, desc = 0, 1, "fit"
    marks: tuple[int, ...] = ()  # steps that also log and save (ends of phases)

    def __init__(self, images, cond_labels, num_classes: int, p: dict, seed: int, device: str,
                 balance: float = 1.0):
        images, cond_labels = np.asarray(images), np.asarray(cond_labels)
        self.p, self.num_classes, self.seed = p, num_classes, seed
        self.dev, self.data_key = pick_device(device), fingerprint(images, cond_labels)
        self.x = torch.as_tensor(images, device=self.dev).permute(0, 3, 1, 2)
        self.y = torch.as_tensor(cond_labels, device=self.dev).long()
        self.w = torch.as_tensor(class_weights(cond_labels, balance, num_classes),
                                 device=self.dev)
        self.step_no, self.log = 0, []

    def rng(self) -> torch.Generator:
        """The randomness of the current step: seeded by (seed, step)."""
        return torch.Generator(device=self.dev).manual_seed(self.seed * 1_000_003 + self.step_no)

    def autocast(self):
        """bf16 autocast on CUDA, nothing on the CPU."""
        return torch.autocast(self.dev.type, dtype=torch.bfloat16,
                              enabled=self.dev.type == "cuda")

    def step(self) -> dict:
        raise NotImplementedError

    def state(self) -> tuple[dict, dict]:
        raise NotImplementedError

    def restore(self, tensors: dict, extra: dict) -> None:
        raise NotImplementedError

    def train(self, until: int, every: int, state_path: Path, settings: dict) -> None:
        """Steps up to ``until``; every ``every`` steps (and at ``marks`` and the end) the
        mean of each loss since the last log goes to ``log`` and the state to disk. The
        losses stay on the device between logs (no read-back per step)."""
        sums, counts, t0, n = {}, Counter(), time.time(), 0
        bar = tqdm(range(self.step_no, until), desc=self.desc, unit="step",
                   initial=self.step_no, total=self.total_steps)
        for _ in bar:
            for k, v in self.step().items():
                sums[k] = sums[k] + v if k in sums else v.detach().clone()
                counts[k] += 1
            n += 1
            if self.step_no % every == 0 or self.step_no == until or self.step_no in self.marks:
                row = {k: float(s) / counts[k] for k, s in sums.items()}
                self.log.append(dict(step=self.step_no, **row, images_per_s=n * self.batch
                                     / max(time.time() - t0, 1e-9)))
                bar.set_postfix({k: f"{v:.4f}" for k, v in row.items()})
                self.save_state(state_path, settings)
                sums, counts, t0, n = {}, Counter(), time.time(), 0

    def save_state(self, path: Path, settings: dict) -> None:
        tensors, extra = self.state()
        meta = {"settings": json.dumps(settings), "step": str(self.step_no),
                "log": json.dumps(self.log), "data": self.data_key,
                **{k: json.dumps(v) for k, v in extra.items()}}
        save_tensors(path, tensors, meta)

    def load_state(self, path: Path, settings: dict) -> bool:
        """Resume from ``path`` when it exists and was made with the same settings/data."""
        if not path.exists():
            return False
        meta = read_meta(path)
        if json.loads(meta["settings"]) != settings or meta["data"] != self.data_key:
            print(f"{path.name}: made with other settings or data; training from scratch.")
            return False
        extra = {k: json.loads(v) for k, v in meta.items()
                 if k not in ("settings", "step", "log", "data")}
        self.restore(load_file(str(path), device=str(self.dev)), extra)
        self.step_no, self.log = int(meta["step"]), json.loads(meta["log"])
        return True


# --- a backend trained here ------------------------------------------------------------
class TrainedGenerator(Generator):
    """A backend with a resumable fit (see the module docstring). Subclasses set ``name``,
    ``FIT_PARAMS`` (what changes the trained weights), ``PARAMS`` and ``CHECKPOINT_EVERY``
    (the parameter name), and implement ``check`` (parameter validation), ``trainer``,
    ``finish`` (trainer → the tensors to keep, and make the sampling model) and
    ``load_weights`` (those tensors → the sampling model)."""

    FIT_PARAMS: tuple[str, ...] = ()
    CHECKPOINT_EVERY = ""

    def check(self, params: dict) -> None:
        raise NotImplementedError

    def configure(self, params: dict) -> None:
        """Read sampling settings from ``params`` (called before loading or training)."""

    def trainer(self, images, cond_labels, params: dict) -> StepTrainer:
        raise NotImplementedError

    def finish(self, trainer: StepTrainer) -> dict:
        raise NotImplementedError

    def load_weights(self, tensors: dict) -> None:
        raise NotImplementedError

    def fit(self, images_or_features, cond_labels, class_counts, params, run_dir) -> dict:
        """Train (resuming from the state file) or load the finished weights; ``done`` is
        False when ``GEN_STOP_AFTER`` stopped the fit early."""
        self.check(params)
        self.p = {k: params.get(k) for k in self.PARAMS}
        self.dev = pick_device(params.get("DEVICE") or "auto")
        self.num_classes = len(class_counts)
        self.image_shape = tuple(np.asarray(images_or_features).shape[1:])  # H×W×C
        self.configure(params)
        folder = Path(run_dir) / "generator"
        settings = {k: params.get(k) for k in self.FIT_PARAMS}
        self.weights_path = folder / f"{self.name}.safetensors"
        data_key = fingerprint(images_or_features, cond_labels)
        if self._load_finished(settings, data_key):
            return dict(done=True, loaded=str(self.weights_path), **self.info)
        tr = self.trainer(images_or_features, cond_labels, params)
        state = folder / f"{self.name}-state.safetensors"
        resumed = tr.load_state(state, settings)
        start = tr.step_no
        tr.train(min(tr.total_steps, params.get("GEN_STOP_AFTER") or tr.total_steps),
                 params[self.CHECKPOINT_EVERY], state, settings)
        self.info = dict(parameters=self.parameters(tr), steps=tr.step_no, log=tr.log,
                         resumed=resumed, steps_this_call=tr.step_no - start, data=tr.data_key)
        if tr.step_no < tr.total_steps:
            return dict(done=False, **self.info)
        meta = {"settings": json.dumps(settings), "info": json.dumps(self.info)}
        save_tensors(self.weights_path, self.finish(tr), meta)
        return dict(done=True, **self.info)

    def parameters(self, trainer: StepTrainer) -> int:
        """Trainable parameters of the fit (reported in the notebook and the bench)."""
        raise NotImplementedError

    def _load_finished(self, settings: dict, data_key: str) -> bool:
        """Load the finished fit when it was made with the same settings and data."""
        if not self.weights_path.exists():
            return False
        meta = read_meta(self.weights_path)
        info = json.loads(meta["info"])
        if json.loads(meta["settings"]) != settings or info.get("data") != data_key:
            return False
        self.load_weights(load_file(str(self.weights_path), device=str(self.dev)))
        self.info = info
        return True

    def model_id(self) -> str:
        digest = hashlib.sha256(self.weights_path.read_bytes()).hexdigest()[:12]
        return f"generator/{self.weights_path.name}@{digest}"


def loss_figure(log: list[dict], title: str = ""):
    """Every logged loss against the training step (log scale where all are positive)."""
    import matplotlib.pyplot as plt

    keys = list(dict.fromkeys(k for r in log for k in r if k not in ("step", "images_per_s")))
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for k in keys:  # a fit in phases logs other losses in each phase
        rows = [r for r in log if k in r]
        ax.plot([r["step"] for r in rows], [r[k] for r in rows], ".-", label=k)
    if all(r[k] > 0 for r in log for k in keys if k in r):
        ax.set_yscale("log")
    ax.set(xlabel="training step", ylabel="loss", title=title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
