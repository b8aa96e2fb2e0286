"""What the backends trained here (``pixel``, ``feature``, ``gan``) share: the resumable step
loop, the checkpoint format, the finished-fit file, image tensors of any shape and the
``bench gen`` report.

- A :class:`StepTrainer` holds one fit's networks, optimizers and data (images N×H×W×C
  uint8 or feature vectors N×D); ``step()`` is one optimisation step whose randomness comes
  from a generator seeded by (seed, step), so a fit resumed from its checkpoint ends with
  the same weights as an uninterrupted one. ``train`` runs steps with a tqdm bar showing the
  losses, logs their means (and the training samples per second) and saves the whole state
  — every network and optimizer, plus what a subclass adds — every K steps (and at the
  steps in ``marks``, e.g. the end of a training phase). A state file made with other
  settings or other data is ignored.
- :class:`StepFit` is the common case: one network fitted with AdamW (linear warm-up,
  gradient clipping at 1) and EMA weights (diffusers ``EMAModel`` with its warm-up); a
  backend writes only ``loss(g)``, the loss of one batch whose random draws all come from
  ``g``. ``pixel`` and ``feature`` use it; ``gan`` (three networks, three optimizers, two
  phases) is a :class:`StepTrainer` of its own.
- A :class:`TrainedGenerator` fits through such a trainer (resuming from
  ``generator/<name>-state.safetensors``; ``GEN_STOP_AFTER`` stops after that many steps in
  total, ``done`` is then False), keeps the finished weights in
  ``generator/<name>.safetensors`` and loads them instead of training again when the
  settings and the data are the same.
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

from ..rundir import artefacts
from .. import config
from ..engine.networks import pick_device
from ..engine.profiling import three_figures, timed
from .base import Generator


# --- data and image tensors ------------------------------------------------------------
def class_weights(cond_labels: np.ndarray, balance: float, num_classes: int) -> np.ndarray:
    """Per-sample drawing weight n_c^(−balance) (balance 1: every class equally often)."""
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
TIMING_KEYS = ("images_per_s", "seconds", "wall_s")  # how fast, not what was fitted


def identity_info(info: dict) -> dict:
    """What the finished weights' metadata records of a fit: ``info`` without wall-clock
    rates and without how this call got there (``resumed``, ``steps_this_call``), so that
    identical fits give byte-identical files and the manifest's ``model_id`` (their
    SHA-256) matches across runs."""
    out = {k: v for k, v in info.items() if k not in ("resumed", "steps_this_call")}
    if "log" in out:
        out["log"] = [{k: v for k, v in row.items() if k not in TIMING_KEYS}
                      for row in out["log"]]
    return out


def save_tensors(path: Path, tensors: dict, meta: dict) -> None:
    """Atomically write tensors (moved to the CPU) and string metadata."""
    config.write_atomic(path, lambda t: save_file(
        {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, t, meta))


def content_digest(path: Path) -> str:
    """SHA-256 of a safetensors file's content: its header with the keys sorted (safetensors
    writes the metadata map in no fixed order), then its tensor bytes. Identical fits give
    identical digests (the manifest's ``model_id``) in every run."""
    raw = Path(path).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.dumps(json.loads(raw[8:8 + n]), sort_keys=True).encode()
    return hashlib.sha256(header + raw[8 + n:]).hexdigest()


def read_meta(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def prefixed(prefix: str, state: dict) -> dict:
    return {f"{prefix}.{k}": v for k, v in state.items()}


def unprefixed(prefix: str, tensors: dict) -> dict:
    n = len(prefix) + 1
    return {k[n:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


# --- the step loop ---------------------------------------------------------------------
class StepTrainer:
    """Networks, optimizers and data of one fit (see the module docstring): the data on the
    device (``x``: images as uint8 N×C×H×W, feature vectors as they are), their conditioning
    labels (``y``) and per-sample drawing weights n_c^(−balance) (``w``). Subclasses
    register their ``networks`` and ``optimizers`` (name → (optimizer, its parameters)),
    set ``total_steps``, ``batch`` (samples per step, for samples/s) and ``desc``, and
    implement ``update(g)`` (one step's losses and updates → {loss name: device tensor}) and
    ``finished()`` (the tensors sampling needs); ``state``/``restore`` carry anything else
    the checkpoint must hold."""

    total_steps, batch, desc = 0, 1, "fit"
    marks: tuple[int, ...] = ()  # steps that also log and save (ends of phases)

    def __init__(self, data, cond_labels, num_classes: int, p: dict, seed: int, device: str,
                 balance: float = 1.0):
        data, cond_labels = np.asarray(data), np.asarray(cond_labels)
        self.p, self.num_classes, self.seed = p, num_classes, seed
        self.dev, self.data_key = pick_device(device), artefacts.fingerprint(data, cond_labels)
        x = torch.as_tensor(data, device=self.dev)
        self.x = x.permute(0, 3, 1, 2) if x.ndim == 4 else x
        self.y = torch.as_tensor(cond_labels, device=self.dev).long()
        self.w = torch.as_tensor(class_weights(cond_labels, balance, num_classes),
                                 device=self.dev)
        self.networks: dict[str, torch.nn.Module] = {}
        self.optimizers: dict[str, tuple[torch.optim.Optimizer, list]] = {}
        self.step_no, self.log = 0, []

    def rng(self) -> torch.Generator:
        """The randomness of the current step: seeded by (seed, step)."""
        return torch.Generator(device=self.dev).manual_seed(self.seed * 1_000_003 + self.step_no)

    def autocast(self):
        """bf16 autocast on CUDA, nothing on the CPU."""
        return torch.autocast(self.dev.type, dtype=torch.bfloat16,
                              enabled=self.dev.type == "cuda")

    def update(self, g: torch.Generator) -> dict:
        raise NotImplementedError

    def finished(self) -> dict:
        raise NotImplementedError

    def step(self) -> dict:
        """One optimisation step, its randomness from :meth:`rng`; → its losses."""
        losses = self.update(self.rng())
        self.step_no += 1
        return losses

    def parameter_count(self) -> int:
        return sum(p.numel() for net in self.networks.values() for p in net.parameters())

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

    # -- state ----------------------------------------------------------------------------
    def state(self) -> tuple[dict, dict]:
        """(tensors, JSON-able metadata) the checkpoint holds besides the networks and the
        optimizers."""
        return {}, {}

    def restore(self, tensors: dict, extra: dict) -> None:
        """Inverse of :meth:`state`."""

    def save_state(self, path: Path, settings: dict) -> None:
        tensors, extra = self.state()
        for name, net in self.networks.items():
            tensors.update(prefixed(name, net.state_dict()))
        for name, (opt, params) in self.optimizers.items():  # ``<name>.<param index>.<key>``
            for i, p in enumerate(params):
                for k, v in opt.state.get(p, {}).items():
                    tensors[f"{name}.{i}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
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
        tensors = load_file(str(path), device=str(self.dev))
        for name, net in self.networks.items():
            net.load_state_dict(unprefixed(name, tensors))
        for name, (opt, params) in self.optimizers.items():
            for k, v in unprefixed(name, tensors).items():
                i, key = k.split(".", 1)  # Adam's ``step`` counter stays on the CPU
                opt.state[params[int(i)]][key] = v.cpu() if key == "step" else v.clone()
        self.restore(tensors, {k: json.loads(v) for k, v in meta.items()
                               if k not in ("settings", "step", "log", "data")})
        self.step_no, self.log = int(meta["step"]), json.loads(meta["log"])
        return True


class StepFit(StepTrainer):
    """One network (``model``, registered as ``model``) fitted with AdamW and EMA weights
    (see the module docstring); subclasses write ``loss(g)``. ``finished()`` switches the
    model to its EMA weights and returns its state dict."""

    def __init__(self, model: torch.nn.Module, data, cond_labels, num_classes: int, p: dict,
                 seed: int, device: str, *, lr: float, steps: int, batch: int, ema: float,
                 balance: float):
        from diffusers.training_utils import EMAModel

        super().__init__(data, cond_labels, num_classes, p, seed, device, balance)
        self.model, self.base_lr = model.to(self.dev), lr
        self.total_steps, self.batch = steps, batch
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=0.0)
        self.ema = EMAModel(self.model.parameters(), decay=ema, use_ema_warmup=True,
                            power=2 / 3, foreach=True)
        self.networks = {"model": self.model}
        self.optimizers = {"optim": (self.opt, list(self.model.parameters()))}

    def loss(self, g: torch.Generator) -> torch.Tensor:
        """The loss of one batch, every random draw taken from ``g``."""
        raise NotImplementedError

    def lr(self, step: int) -> float:
        warmup = min(500, max(1, self.total_steps // 10))
        return self.base_lr * min(1.0, (step + 1) / warmup)

    def update(self, g: torch.Generator) -> dict:
        loss = self.loss(g)
        for group in self.opt.param_groups:
            group["lr"] = self.lr(self.step_no)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.ema.step(self.model.parameters())
        return {"loss": loss.detach()}

    def finished(self) -> dict:
        self.ema.copy_to(self.model.parameters())
        return self.model.eval().state_dict()

    def state(self) -> tuple[dict, dict]:
        ema = self.ema.state_dict()
        return {f"ema.{i}": v for i, v in enumerate(ema.pop("shadow_params"))}, {"ema": ema}

    def restore(self, tensors: dict, extra: dict) -> None:
        n = len(list(self.model.parameters()))
        self.ema.load_state_dict(dict(extra["ema"], shadow_params=[
            tensors[f"ema.{i}"].clone() for i in range(n)]))


# --- a backend trained here ------------------------------------------------------------
class TrainedGenerator(Generator):
    """A backend with a resumable fit (see the module docstring). Subclasses set ``name``,
    ``prefix`` (of their parameters: ``<prefix>_CHECKPOINT_EVERY``), ``FIT_PARAMS`` (what
    changes the trained weights) and ``PARAMS``, and implement ``prepare`` (validation and
    what sampling needs from the data), ``trainer`` and either ``build_model`` (one network
    whose weights the fit keeps: it becomes ``model``) or ``load_weights``."""

    prefix = ""
    FIT_PARAMS: tuple[str, ...] = ()

    def prepare(self, data, cond_labels, params: dict) -> None:
        """Check ``params`` and set up what sampling needs besides the weights (called by
        every ``fit`` before loading or training; ``p``, ``dev``, ``num_classes`` and
        ``data_shape`` — one sample's shape, H×W×C or D — are set)."""

    def trainer(self, data, cond_labels, params: dict) -> StepTrainer:
        raise NotImplementedError

    def build_model(self) -> torch.nn.Module:
        raise NotImplementedError

    def load_weights(self, tensors: dict) -> None:
        """The sampling model from the finished fit's tensors (``build_model()`` with them)."""
        model = self.build_model()
        model.load_state_dict(tensors)
        self.model = model.to(self.dev).eval()

    def fit(self, images_or_features, cond_labels, class_counts, params, run_dir) -> dict:
        """Train (resuming from the state file) or load the finished weights; ``done`` is
        False when ``GEN_STOP_AFTER`` stopped the fit early."""
        self.p = {k: params.get(k) for k in self.PARAMS}
        self.dev = pick_device(params.get("DEVICE") or "auto")
        self.num_classes = len(class_counts)
        keep = np.asarray(cond_labels) >= 0  # −1: in no conditioning set (LABEL_KEEP < 1)
        if not keep.all():
            images_or_features = np.asarray(images_or_features)[keep]
            cond_labels = np.asarray(cond_labels)[keep]
        self.data_shape = tuple(np.asarray(images_or_features).shape[1:])
        self.prepare(images_or_features, cond_labels, params)
        folder = Path(run_dir) / "generator"
        settings = {k: params.get(k) for k in self.FIT_PARAMS}
        self.weights_path = folder / f"{self.name}.safetensors"
        data_key = artefacts.fingerprint(images_or_features, cond_labels)
        if self._load_finished(settings, data_key):
            return dict(done=True, loaded=str(self.weights_path), **self.info)
        tr = self.trainer(images_or_features, cond_labels, params)
        state = folder / f"{self.name}-state.safetensors"
        resumed = bool(artefacts.load(state, lambda p: tr.load_state(p, settings),
                                      what="generator fit state", resumable=True))
        start = tr.step_no
        tr.train(min(tr.total_steps, params.get("GEN_STOP_AFTER") or tr.total_steps),
                 params[f"{self.prefix}_CHECKPOINT_EVERY"], state, settings)
        self.info = dict(parameters=tr.parameter_count(), steps=tr.step_no, log=tr.log,
                         resumed=resumed, steps_this_call=tr.step_no - start, data=data_key)
        if tr.step_no < tr.total_steps:
            return dict(done=False, **self.info)
        tensors = tr.finished()
        meta = {"settings": json.dumps(settings), "info": json.dumps(identity_info(self.info))}
        save_tensors(self.weights_path, tensors, meta)
        self.load_weights(tensors)
        return dict(done=True, **self.info)

    def _load_finished(self, settings: dict, data_key: str) -> bool:
        """Load the finished fit when it was made with the same settings and data."""
        def read(path):  # a damaged file: moved aside (notice), and the fit made again
            meta = read_meta(path)
            info = json.loads(meta["info"])
            if json.loads(meta["settings"]) != settings or info.get("data") != data_key:
                return False
            tensors = load_file(str(path), device=str(self.dev))
            return info, tensors
        found = artefacts.load(self.weights_path, read, what="finished generator weights",
                               resumable=True)
        if not found:
            return False
        self.info, tensors = found
        self.load_weights(tensors)
        return True

    def model_id(self) -> str:
        return f"generator/{self.weights_path.name}@{content_digest(self.weights_path)[:12]}"


# --- benchmark -------------------------------------------------------------------------
def time_fit_and_sample(trainer: StepTrainer, sample, steps: int) -> tuple[float, float]:
    """(seconds for ``steps`` training steps, seconds for one ``sample()`` call) after a
    warm-up step and a warm-up call, the networks in evaluation mode for sampling; best of
    two sampling calls on a CPU."""
    dev = trainer.dev
    trainer.step()
    train_s = timed(lambda _: [trainer.step() for _ in range(steps)], 1, dev, 0)
    for net in trainer.networks.values():
        net.eval()
    with torch.inference_mode():
        sample()
        sample_s = timed(lambda _: sample(), 1, dev, 0, 1 if dev.type == "cuda" else 2)
    return train_s, sample_s


def bench_report(name: str, profile: str, trainer: StepTrainer, rows: list[dict], unit: str,
                 fit_samples: int, **details) -> dict:
    """The ``bench gen`` result: rows with ``train_<unit>_per_s`` and ``sample_<unit>_per_s``
    (and any other rates), the fastest row's rates, the projected fit (``fit_samples``
    training samples) and the projected top-up of the report (37,594 samples)."""
    from .topup import REPORT_TOPUP

    dev = trainer.dev
    best = max(rows, key=lambda r: r[f"train_{unit}_per_s"])
    return dict(bench="gen", generator=name, profile=profile, device=str(dev),
                gpu=torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
                parameters=trainer.parameter_count(), **details, results=rows,
                **{k: v for k, v in best.items() if k.endswith("_per_s")},
                projected_fit_s=three_figures(fit_samples / best[f"train_{unit}_per_s"]),
                **{f"topup_{unit}": REPORT_TOPUP},
                projected_topup_s=three_figures(REPORT_TOPUP / best[f"sample_{unit}_per_s"]))
