"""What the trained generator backends (``pixel``, ``feature``) share: a step-wise fit with
AdamW, EMA weights, per-step seeded randomness, a checkpoint every K steps with exact resume,
and the finished EMA weights kept beside the settings and data that made them.

- :class:`StepFit`: model, AdamW (linear warm-up, gradient clipping at 1), EMA (diffusers
  ``EMAModel`` with its warm-up), the step counter and a loss log. A backend writes
  ``loss(g)``, the loss of one batch whose random draws all come from ``g``, a generator
  seeded by (seed, step): a fit split across commands ends with the same weights as an
  uninterrupted one. The whole state goes to ``generator/<name>-state.safetensors``.
- :class:`Trained`: the ``fit`` of such a backend — load the finished weights
  (``generator/<name>.safetensors``) when they were made with the same settings and data,
  else train (resuming) up to ``<PREFIX>_STEPS`` or ``GEN_STOP_AFTER`` steps in total.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .. import config
from ..networks import pick_device
from .base import Generator


def fingerprint(*arrays) -> str:
    """SHA-1 of the shapes, dtypes and bytes of ``arrays`` (what a fit was trained on)."""
    h = hashlib.sha1()
    for arr in arrays:
        arr = np.ascontiguousarray(arr)
        h.update(f"{arr.shape}{arr.dtype}".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def class_weights(cond_labels: np.ndarray, balance: float, num_classes: int) -> np.ndarray:
    """Per-sample drawing weight n_c^(−balance) (balance 1: every class equally often)."""
    counts = np.bincount(cond_labels, minlength=num_classes).astype(np.float64)
    return 1.0 / np.maximum(counts, 1)[cond_labels] ** balance


class StepFit:
    """Model, AdamW, EMA and step counter of one fit; ``step()`` is one optimisation step."""

    label = "fit"  # progress-bar text

    def __init__(self, model: torch.nn.Module, lr: float, steps: int, batch: int, ema: float,
                 seed: int, dev: torch.device, data_key: str):
        from diffusers.training_utils import EMAModel

        self.model, self.base_lr, self.steps, self.batch = model.to(dev), lr, steps, batch
        self.seed, self.dev, self.data_key = seed, dev, data_key
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=0.0)
        self.ema = EMAModel(self.model.parameters(), decay=ema, use_ema_warmup=True,
                            power=2 / 3, foreach=True)
        self.step_no, self.log = 0, []

    def loss(self, g: torch.Generator) -> torch.Tensor:
        """The loss of one batch, every random draw taken from ``g``."""
        raise NotImplementedError

    def lr(self, step: int) -> float:
        warmup = min(500, max(1, self.steps // 10))
        return self.base_lr * min(1.0, (step + 1) / warmup)

    def step(self) -> torch.Tensor:
        """One step; its randomness comes from a generator seeded by (seed, step)."""
        g = torch.Generator(device=self.dev).manual_seed(self.seed * 1_000_003 + self.step_no)
        loss = self.loss(g)
        for group in self.opt.param_groups:
            group["lr"] = self.lr(self.step_no)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.ema.step(self.model.parameters())
        self.step_no += 1
        return loss.detach()

    def train(self, until: int, every: int, state_path: Path, settings: dict) -> None:
        """Steps up to ``until``, logging the mean loss and saving the state every ``every``
        steps and at the end; a tqdm bar shows the loss."""
        total, t0, n = torch.zeros((), device=self.dev), time.time(), 0
        bar = tqdm(range(self.step_no, until), desc=self.label, unit="step",
                   initial=self.step_no, total=self.steps)
        for _ in bar:
            total += self.step()
            n += 1
            if self.step_no % every == 0 or self.step_no == until:
                loss, secs = float(total) / n, time.time() - t0
                self.log.append(dict(step=self.step_no, loss=loss,
                                     images_per_s=n * self.batch / max(secs, 1e-9)))
                bar.set_postfix(loss=f"{loss:.4f}")
                self.save_state(state_path, settings)
                total.zero_()
                t0, n = time.time(), 0

    def resume_and_train(self, state_path: Path, settings: dict, stop_after: int | None,
                         every: int) -> tuple[bool, dict]:
        """(done, info): resume from ``state_path``, train up to ``stop_after`` steps in
        total (default: all), and switch to the EMA weights once every step is done."""
        resumed = self.load_state(state_path, settings)
        start = self.step_no
        self.train(min(self.steps, stop_after or self.steps), every, state_path, settings)
        info = dict(parameters=sum(p.numel() for p in self.model.parameters()),
                    steps=self.step_no, log=self.log, resumed=resumed,
                    steps_this_call=self.step_no - start, data=self.data_key)
        done = self.step_no >= self.steps
        if done:
            self.ema.copy_to(self.model.parameters())
            self.model.eval()
        return done, info

    # -- state ----------------------------------------------------------------------------
    def save_state(self, path: Path, settings: dict) -> None:
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        params = list(self.model.parameters())
        for i, p in enumerate(params):
            for k, v in self.opt.state.get(p, {}).items():
                tensors[f"optim.{i}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
        ema = self.ema.state_dict()
        tensors.update({f"ema.{i}": v for i, v in enumerate(ema.pop("shadow_params"))})
        meta = {"settings": json.dumps(settings), "step": str(self.step_no),
                "log": json.dumps(self.log), "ema": json.dumps(ema), "data": self.data_key}
        config.write_atomic(path, lambda t: save_file(
            {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, t, meta))

    def load_state(self, path: Path, settings: dict) -> bool:
        """Resume from ``path`` when it exists and was made with the same settings/data."""
        if not path.exists():
            return False
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
        if json.loads(meta["settings"]) != settings or meta["data"] != self.data_key:
            print(f"{path.name}: made with other settings or data; training from scratch.")
            return False
        t = load_file(str(path), device=str(self.dev))
        self.model.load_state_dict({k[6:]: v for k, v in t.items() if k.startswith("model.")})
        params = list(self.model.parameters())
        for k, v in t.items():
            if k.startswith("optim."):
                _, i, name = k.split(".", 2)
                self.opt.state[params[int(i)]][name] = v.cpu() if name == "step" else v.clone()
        ema = json.loads(meta["ema"])
        ema["shadow_params"] = [t[f"ema.{i}"].clone() for i in range(len(params))]
        self.ema.load_state_dict(ema)
        self.step_no, self.log = int(meta["step"]), json.loads(meta["log"])
        return True


class Trained(Generator):
    """A backend whose model a :class:`StepFit` trains. Subclasses set ``prefix`` (their
    parameters' prefix: ``<prefix>_STEPS``, ``<prefix>_CHECKPOINT_EVERY``), ``FIT_PARAMS``
    (what changes the weights) and write ``build_model()`` and ``trainer(...)``."""

    prefix = ""
    FIT_PARAMS: tuple[str, ...] = ()

    def build_model(self) -> torch.nn.Module:
        raise NotImplementedError

    def trainer(self, data, cond_labels, params: dict, data_key: str) -> StepFit:
        raise NotImplementedError

    def prepare(self, data, cond_labels, params: dict) -> None:
        """Set up what sampling needs besides the weights (called by every ``fit``)."""

    def fit(self, images_or_features, cond_labels, class_counts, params, run_dir) -> dict:
        """Train (resuming from ``generator/<name>-state.safetensors``) or load the finished
        EMA weights; ``done`` is False when ``GEN_STOP_AFTER`` stopped the fit early."""
        self.p = {k: params.get(k) for k in self.PARAMS}
        self.dev = pick_device(params.get("DEVICE") or "auto")
        self.num_classes = len(class_counts)
        self.prepare(images_or_features, cond_labels, params)
        folder = Path(run_dir) / "generator"
        fit_settings = {k: params.get(k) for k in self.FIT_PARAMS}
        self.weights_path = folder / f"{self.name}.safetensors"
        key = fingerprint(np.asarray(images_or_features), np.asarray(cond_labels))
        if self._load_weights(fit_settings, key):
            return dict(done=True, loaded=str(self.weights_path), **self.info)
        tr = self.trainer(images_or_features, cond_labels, params, key)
        done, self.info = tr.resume_and_train(
            folder / f"{self.name}-state.safetensors", fit_settings,
            params.get("GEN_STOP_AFTER"), params[f"{self.prefix}_CHECKPOINT_EVERY"])
        if done:
            self.model = tr.model
            meta = {"settings": json.dumps(fit_settings), "info": json.dumps(self.info)}
            config.write_atomic(self.weights_path, lambda t: save_file(
                {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()},
                t, meta))
        return dict(done=done, **self.info)

    def _load_weights(self, fit_settings: dict, data_key: str) -> bool:
        """Load the finished fit when it was made with the same settings and data."""
        if not self.weights_path.exists():
            return False
        with safe_open(str(self.weights_path), framework="pt") as f:
            meta = f.metadata()
        info = json.loads(meta["info"])
        if json.loads(meta["settings"]) != fit_settings or info.get("data") != data_key:
            return False
        self.model = self.build_model().to(self.dev)
        self.model.load_state_dict(load_file(str(self.weights_path), device=str(self.dev)))
        self.model.eval()
        self.info = info
        return True

    def model_id(self) -> str:
        digest = hashlib.sha256(self.weights_path.read_bytes()).hexdigest()[:12]
        return f"generator/{self.weights_path.name}@{digest}"


# --- benchmark -------------------------------------------------------------------------
def time_fit_and_sample(trainer: StepFit, sample, steps: int) -> tuple[float, float]:
    """(seconds for ``steps`` training steps, seconds for one ``sample()`` call) after a
    warm-up step and a warm-up call; best of two sampling calls on a CPU."""
    from .sd import timed

    dev = trainer.dev
    trainer.step()
    train_s = timed(lambda: [trainer.step() for _ in range(steps)], dev)
    trainer.model.eval()
    with torch.inference_mode():
        sample()
        sample_s = timed(sample, dev, repeats=1 if dev.type == "cuda" else 2)
    return train_s, sample_s


def bench_report(name: str, profile: str, trainer: StepFit, rows: list[dict], unit: str,
                 fit_samples: int, **details) -> dict:
    """The ``bench gen`` result: rows of ``train_<unit>_per_s`` / ``sample_<unit>_per_s``,
    the fastest row's rates, the projected fit (``fit_samples`` training samples) and the
    projected top-up of the report (37,594 samples)."""
    from .topup import REPORT_TOPUP

    dev = trainer.dev
    best = max(rows, key=lambda r: r[f"train_{unit}_per_s"])
    train, sample = best[f"train_{unit}_per_s"], best[f"sample_{unit}_per_s"]
    return dict(bench="gen", generator=name, profile=profile, device=str(dev),
                gpu=torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
                parameters=sum(q.numel() for q in trainer.model.parameters()), **details,
                results=rows, **{f"train_{unit}_per_s": train, f"sample_{unit}_per_s": sample},
                projected_fit_s=round(fit_samples / train, 1),
                **{f"topup_{unit}": REPORT_TOPUP},
                projected_topup_s=round(REPORT_TOPUP / sample, 1))
