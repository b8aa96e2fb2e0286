"""Stage 04: one trainer for ABLE, ABLE+RECORDS, PRODEN, supervised and RABLE.

The uint8 training and test images live on the device; both views are augmented there
per batch (``augment.weak_view`` / ``strong_view``). Every ``checkpoint_every`` epochs the
whole state (model, optimizer, confidences, RECORDS mean, history, RNG) goes to
``checkpoints/<method>-state.safetensors``; a later call with the same settings resumes
from it and ends with the same numbers as an uninterrupted run. Each epoch's random
draws come from a generator seeded by (seed, epoch), so resuming needs no hidden state.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from . import able, augment, config, dataset, evaluation, generators
from .networks import PLLNet, pick_device, save_model, standardize, to_unit

METHODS = ("able", "able+records", "proden", "supervised", "rable", "rable+records")
CONTRASTIVE = ("able", "able+records", "rable", "rable+records")
SYNTHETIC_METHODS = ("rable", "rable+records")  # train on real + synthetic/
SYNTHETIC_LABELS = ("exact", "partial")
LT_RHO100_IMAGES = 12406  # CIFAR-10-LT, rho = 100, n_max = 5000

# Stage defaults per profile (config.resolve(stage_defaults=...)); protocol L changes the
# paper profile's epochs and batch size (see stage_defaults).
PROFILE_DEFAULTS: dict[str, dict] = {
    "smoke": dict(ARCH="tiny_cnn", EPOCHS=2, BATCH_SIZE=64, LR=0.01, CHECKPOINT_EVERY=1),
    # quick: a CPU comparison (supervised, proden, able, able+records at 25 epochs: 18.6 min
    # on an idle 2-core machine); the larger lr makes up for the short cosine schedule.
    "quick": dict(ARCH="mini_cnn", EPOCHS=25, BATCH_SIZE=128, LR=0.05, CHECKPOINT_EVERY=1),
    "paper": dict(ARCH="resnet18", EPOCHS=500, BATCH_SIZE=64, LR=0.01, CHECKPOINT_EVERY=10,
                  PROTOCOL="R"),
}
PROTOCOL_SETTINGS = {"R": dict(EPOCHS=500, BATCH_SIZE=64), "L": dict(EPOCHS=800, BATCH_SIZE=256)}
BENCH_STEPS = {"smoke": 3, "quick": 10, "paper": 30}


def stage_defaults(protocol: str | None = None) -> dict[str, dict]:
    """``PROFILE_DEFAULTS`` with the paper profile set to ``protocol``'s epochs/batch size."""
    out = {k: dict(v) for k, v in PROFILE_DEFAULTS.items()}
    if protocol is not None:
        if protocol not in PROTOCOL_SETTINGS:
            raise ValueError(f"PROTOCOL={protocol!r} is invalid: choose one of "
                             f"{sorted(PROTOCOL_SETTINGS)}.")
        out["paper"].update(PROTOCOL_SETTINGS[protocol], PROTOCOL=protocol)
    return out


@dataclass
class TrainConfig:
    """Every setting that changes the numbers of a run (compared on resume)."""

    method: str = "able"
    arch: str = "tiny_cnn"
    epochs: int = 2
    batch_size: int = 64
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-3
    lr_min: float = 1e-5
    tau: float = 0.1
    base_tau: float = 0.07
    loss_weight: float = 1.0
    records_m: float = 0.9
    mixup: bool = False
    mixup_alpha: float = 1.0
    faithful_bug: bool = False
    seed: int = 0
    num_classes: int = 10

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r} is invalid: choose from {METHODS}.")
        for name in ("epochs", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} must be a positive integer.")

    @property
    def records(self) -> bool:
        return self.method.endswith("+records")


def cosine_lr(cfg: TrainConfig, epoch: int) -> float:
    """Learning rate of ``epoch`` (0-based): cosine from lr to lr_min over the run."""
    return cfg.lr_min + (cfg.lr - cfg.lr_min) * (1 + math.cos(math.pi * epoch / cfg.epochs)) / 2


class Trainer:
    """Network, optimizer and confidences of one method on one training set."""

    def __init__(self, cfg: TrainConfig, train_x, candidates, labels, device: str = "auto",
                 compile: bool = False, data_key: str = ""):
        self.cfg, self.dev, self.data_key = cfg, pick_device(device), data_key
        if len(train_x) < cfg.batch_size:
            raise ValueError(f"BATCH_SIZE={cfg.batch_size} exceeds the {len(train_x)} training "
                             "images (batches drop the remainder).")
        if self.dev.type == "cpu":
            torch.set_flush_denormal(True)  # augmentations produce denormals: 10× slower
        torch.manual_seed(cfg.seed)
        self.net = PLLNet(cfg.arch, cfg.num_classes).to(self.dev)
        if self.dev.type == "cuda":
            self.net = self.net.to(memory_format=torch.channels_last)
        self.embed = torch.compile(self.net.embed) if compile else self.net.embed
        self.classify = torch.compile(self.net) if compile else self.net
        self.opt = torch.optim.SGD(self.net.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                   weight_decay=cfg.weight_decay)
        self.x = torch.as_tensor(np.asarray(train_x), device=self.dev)
        self.x = self.x.permute(0, 3, 1, 2).contiguous()             # uint8 N×3×32×32
        self.cand = torch.as_tensor(np.asarray(candidates), device=self.dev).bool()
        self.labels = torch.as_tensor(np.asarray(labels), device=self.dev).long()
        self.conf = able.uniform_confidence(self.cand)
        self.feat_mean = torch.zeros(self.net.backbone.feat_dim, device=self.dev)
        self.epoch = 0
        self.history: list[dict] = []

    # -- one step -------------------------------------------------------------------------
    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        x = standardize(x)
        return x.contiguous(memory_format=torch.channels_last) if self.dev.type == "cuda" else x

    def _forward(self, fn, x: torch.Tensor):
        """Network call under bf16 autocast on CUDA; outputs back in fp32 so that the
        losses, weights and confidence updates are computed in full precision."""
        with torch.autocast(self.dev.type, dtype=torch.bfloat16, enabled=self.dev.type == "cuda"):
            out = fn(self._norm(x))
        return tuple(o.float() for o in out) if isinstance(out, tuple) else out.float()

    def log_prior(self) -> torch.Tensor | None:
        """RECORDS log-prior log softmax(classifier(F)) (None for other methods)."""
        return able.log_prior(self.net.classifier, self.feat_mean) if self.cfg.records else None

    def step(self, idx: torch.Tensor, gen: torch.Generator) -> dict:
        """One optimisation step on the images ``idx``; returns the loss terms."""
        cfg, b = self.cfg, len(idx)
        x = to_unit(self.x[idx])
        cand = self.cand[idx]
        weak = augment.weak_view(x, generator=gen)
        if cfg.method in CONTRASTIVE:
            views = torch.cat([weak, augment.strong_view(x, generator=gen)])
            feats, logits, z = self._forward(self.embed, views)
            logits_w = logits[:b]
            contrast_conf = self.conf[:b] if cfg.faithful_bug else self.conf[idx]
            l_cls, l_cont, new = able.able_losses(
                logits_w, z, cand, self.conf[idx], contrast_conf, self.log_prior(),
                cfg.tau, cfg.base_tau)
            loss = l_cls + cfg.loss_weight * l_cont
            terms = {"loss_cls": l_cls, "loss_cont": l_cont}
            if cfg.records:
                self.feat_mean = able.records_update(self.feat_mean, feats[:b], cfg.records_m)
        else:
            logits_w = self._forward(self.classify, weak)
            if cfg.method == "supervised":
                loss = F.cross_entropy(logits_w, self.labels[idx])
                new = None
            else:  # proden
                loss = able.soft_cross_entropy(logits_w, self.conf[idx])
                new = able.updated_confidence(F.softmax(logits_w.detach(), 1), cand)
            terms = {"loss_cls": loss}
        if cfg.mixup:
            terms["loss_mix"] = self._mixup_loss(weak, idx, gen)
            loss = loss + terms["loss_mix"]
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if new is not None:
            self.conf[idx] = new
        return {k: v.detach() for k, v in terms.items()}

    def _mixup_loss(self, weak: torch.Tensor, idx: torch.Tensor, gen: torch.Generator):
        """Soft cross-entropy on a mixup of the weak view with mixed targets."""
        seed = int(torch.randint(0, 2**31 - 1, (1,), device=self.dev, generator=gen))
        lam = float(np.random.default_rng(seed).beta(self.cfg.mixup_alpha, self.cfg.mixup_alpha))
        perm = torch.randperm(len(idx), device=self.dev, generator=gen)
        targets = (F.one_hot(self.labels[idx], self.cfg.num_classes).float()
                   if self.cfg.method == "supervised" else self.conf[idx])
        mixed = lam * weak + (1 - lam) * weak[perm]
        return able.soft_cross_entropy(self._forward(self.classify, mixed),
                                       lam * targets + (1 - lam) * targets[perm])

    # -- epochs ---------------------------------------------------------------------------
    def epoch_generator(self, epoch: int) -> torch.Generator:
        gen = torch.Generator(device=self.dev)
        gen.manual_seed(self.cfg.seed * 1_000_003 + epoch)
        return gen

    def train_epoch(self, progress: bool = True) -> dict:
        """One pass over the data in random order (drop_last); returns the epoch's log row."""
        cfg, n = self.cfg, len(self.x)
        lr = cosine_lr(cfg, self.epoch)
        for group in self.opt.param_groups:
            group["lr"] = lr
        gen = self.epoch_generator(self.epoch)
        order = torch.randperm(n, device=self.dev, generator=gen)
        steps = n // cfg.batch_size
        sums: dict[str, torch.Tensor] = {}
        self.net.train()
        t0 = time.time()
        bar = tqdm(range(steps), desc=f"{cfg.method} epoch {self.epoch + 1}/{cfg.epochs}",
                   unit="step", leave=False, disable=not progress)
        for s in bar:
            for k, v in self.step(order[s * cfg.batch_size:(s + 1) * cfg.batch_size], gen).items():
                sums[k] = sums.get(k, 0) + v.float()
        if self.dev.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.time() - t0
        row = {"epoch": self.epoch + 1, "lr": lr, "train_s": seconds,
               "images_per_s": steps * cfg.batch_size / max(seconds, 1e-9)}
        row.update({k: float(v) / steps for k, v in sums.items()})
        row["pseudo_label_acc"] = (None if cfg.method == "supervised" else
                                   float((self.conf.argmax(1) == self.labels).float().mean()))
        self.epoch += 1
        return row

    # -- state ----------------------------------------------------------------------------
    def save_state(self, path: Path) -> None:
        """Model, optimizer momentum, confidences, RECORDS mean, RNG, epoch and history."""
        tensors = {f"model.{k}": v for k, v in self.net.state_dict().items()}
        for i, p in enumerate(self.net.parameters()):
            buf = self.opt.state.get(p, {}).get("momentum_buffer")
            if buf is not None:
                tensors[f"optim.{i}"] = buf
        tensors.update(conf=self.conf, feat_mean=self.feat_mean, rng_cpu=torch.get_rng_state())
        if self.dev.type == "cuda":
            tensors["rng_cuda"] = torch.cuda.get_rng_state()
        meta = {"config": json.dumps(asdict(self.cfg)), "epoch": str(self.epoch),
                "history": json.dumps(self.history), "data": self.data_key}
        config.write_atomic(path, lambda t: save_file(
            {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, t, meta))

    def load_state(self, path: Path) -> bool:
        """Resume from ``path`` when it exists and was made with the same settings."""
        if not path.exists():
            return False
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
        saved = json.loads(meta["config"])
        if saved != asdict(self.cfg):
            diff = sorted(k for k in saved if saved[k] != asdict(self.cfg).get(k))
            print(f"{path.name}: saved with other settings ({diff}); starting from scratch.")
            return False
        if meta.get("data") != self.data_key:
            print(f"{path.name}: saved for other training or test data; starting from scratch.")
            return False
        t = load_file(str(path), device=str(self.dev))
        self.net.load_state_dict({k[6:]: v for k, v in t.items() if k.startswith("model.")})
        params = list(self.net.parameters())
        for k, v in t.items():
            if k.startswith("optim."):
                self.opt.state[params[int(k[6:])]]["momentum_buffer"] = v.clone()
        self.conf, self.feat_mean = t["conf"].clone(), t["feat_mean"].clone()
        torch.set_rng_state(t["rng_cpu"].cpu())
        if "rng_cuda" in t and self.dev.type == "cuda":
            torch.cuda.set_rng_state(t["rng_cuda"].cpu())
        self.epoch, self.history = int(meta["epoch"]), json.loads(meta["history"])
        return True


# -- data ---------------------------------------------------------------------------------
def synthetic_candidates(labels: np.ndarray, ds_params: dict, kind: str, cifar, x: np.ndarray,
                         device: str = "auto") -> np.ndarray:
    """Candidate sets of synthetic images: one-hot (``exact``) or drawn by the generator of
    the real data (``partial``: same PARTIAL/Q/RATE, a different seed)."""
    if kind not in SYNTHETIC_LABELS:
        raise ValueError(f"SYNTHETIC_LABELS={kind!r} is invalid: choose one of {SYNTHETIC_LABELS}.")
    c = cifar.num_classes
    if kind == "exact":
        return np.eye(c, dtype=bool)[labels]
    seed = int(ds_params.get("SEED", 0)) + 1
    if ds_params["PARTIAL"] == "uniform":
        return dataset.uniform_candidates(labels, c, float(ds_params["Q"]), seed)
    info = ds_params["clean_classifier"]
    per_class = None if info["train_images"] >= len(cifar.train_y) else info["train_images"] // c
    net, _ = dataset.clean_classifier(cifar, info["arch"], info["epochs"], info["seed"], device,
                                      per_class)
    probs = dataset.predict_proba(net, x)
    return dataset.instance_candidates(probs, labels, float(ds_params["RATE"]), seed)


def prepare_data(run_dir, cifar, method: str, n_test_per_class: int, seed: int = 0,
                 synthetic_labels: str = "exact", device: str = "auto") -> dict:
    """Training images/candidates/labels (+ synthetic ones for ``rable*``) and the test set.

    ``class_counts`` stays the real long tail's (it defines many/medium/few).
    """
    ds = dataset.load_dataset(run_dir)
    x, cand, y = cifar.train_x[ds["indices"]], ds["candidates"], ds["labels"]
    n_synth = 0
    if method in SYNTHETIC_METHODS:
        sx, sy, rows = generators.load_synthetic(run_dir)
        if not rows:
            raise FileNotFoundError(f"{Path(run_dir) / 'synthetic/manifest.jsonl'} is missing: "
                                    f"run notebook 03 before training {method!r}.")
        sc = synthetic_candidates(sy, ds["params"], synthetic_labels, cifar, sx, device)
        x, cand, y = np.concatenate([x, sx]), np.concatenate([cand, sc]), np.concatenate([y, sy])
        n_synth = len(sy)
    test = dataset.balanced_subset(cifar.test_y, n_test_per_class, seed)
    return dict(train_x=x, candidates=cand, labels=y, test_x=cifar.test_x[test],
                test_y=cifar.test_y[test], class_counts=ds["class_counts"],
                n_synthetic=n_synth, dataset_params=ds["params"])


# -- a whole run --------------------------------------------------------------------------
def train(cfg: TrainConfig, data: dict, out_dir, device: str = "auto", compile: bool = False,
          checkpoint_every: int = 1, stop_after: int | None = None, progress: bool = True
          ) -> dict:
    """Train (resuming from ``out_dir/checkpoints/<method>-state.safetensors``) and evaluate.

    ``stop_after``: stop once this many epochs are done in total (to split a run across
    commands). Writes ``logs/<method>.jsonl`` every epoch. Returns a dict with the trainer,
    history, final evaluation (and the test-time-adjusted one for RECORDS), and timing.
    """
    out = Path(out_dir)
    state_path = out / "checkpoints" / f"{cfg.method}-state.safetensors"
    trainer = Trainer(cfg, data["train_x"], data["candidates"], data["labels"], device, compile,
                      data_key=data_fingerprint(data))
    resumed = trainer.load_state(state_path)
    if not resumed:  # results of an earlier, different run must not pass for this one
        for stale in (out / "checkpoints" / f"{cfg.method}.safetensors",
                      out / f"metrics-{cfg.method}.json"):
            stale.unlink(missing_ok=True)
    test_x = torch.as_tensor(np.asarray(data["test_x"]), device=trainer.dev)
    test_y = np.asarray(data["test_y"])
    last = min(cfg.epochs, stop_after or cfg.epochs)
    commit = config.git_commit()
    bar = tqdm(range(trainer.epoch, last), desc=cfg.method, unit="epoch", disable=not progress,
               initial=trainer.epoch, total=cfg.epochs)
    for _ in bar:
        t0 = time.time()
        row = trainer.train_epoch(progress)
        prior = trainer.log_prior()
        row["test_acc"] = evaluation.summarize(evaluation.predict(trainer.net, test_x), test_y,
                                               data["class_counts"])["overall"]
        if prior is not None:
            row["test_acc_adjusted"] = evaluation.summarize(
                evaluation.predict(trainer.net, test_x, prior), test_y,
                data["class_counts"])["overall"]
        row["seconds"] = time.time() - t0
        row["commit"] = commit
        trainer.history.append(row)
        bar.set_postfix(test_acc=f"{row['test_acc']:.3f}", loss=f"{row.get('loss_cls', 0):.3f}")
        _write_log(out / "logs" / f"{cfg.method}.jsonl", trainer.history)
        if trainer.epoch % checkpoint_every == 0 or trainer.epoch == last:
            trainer.save_state(state_path)
    prior = trainer.log_prior()
    final = evaluation.summarize(evaluation.predict(trainer.net, test_x), test_y,
                                 data["class_counts"])
    adjusted = (evaluation.summarize(evaluation.predict(trainer.net, test_x, prior), test_y,
                                     data["class_counts"]) if prior is not None else None)
    hist = trainer.history
    train_s = sum(h["train_s"] for h in hist)
    return dict(trainer=trainer, history=hist, final=final, adjusted=adjusted, log_prior=prior,
                done=trainer.epoch >= cfg.epochs, resumed=resumed,
                wall_s=sum(h["seconds"] for h in hist),
                images_per_s=(sum(h["images_per_s"] * h["train_s"] for h in hist) / train_s
                              if train_s else None))


def data_fingerprint(data: dict) -> str:
    """Hash of the training images, candidates, labels and test labels of a run."""
    h = hashlib.sha1()
    for key in ("train_x", "candidates", "labels", "test_y"):
        arr = np.ascontiguousarray(data[key])
        h.update(f"{key}{arr.shape}{arr.dtype}".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def _write_log(path: Path, history: list[dict]) -> None:
    config.write_atomic(path, lambda t: t.write_text("".join(json.dumps(h) + "\n" for h in history)))


def protocol_name(P: dict, ds_params: dict) -> str:
    """'R' or 'L' when the data and training settings are that protocol's (DESIGN §6),
    else 'custom'."""
    common = (P.get("ARCH") == "resnet18" and ds_params.get("N_MAX") == 5000
              and P.get("LR") == 0.01 and ds_params.get("SEED") == 0)
    if (common and ds_params.get("PARTIAL") == "instance" and ds_params.get("RATE") == 0.4
            and ds_params.get("IMBALANCE_FACTOR") == 0.01
            and (P["EPOCHS"], P["BATCH_SIZE"]) == (500, 64)):
        return "R"
    if (common and ds_params.get("PARTIAL") == "uniform" and ds_params.get("Q") in (0.3, 0.5, 0.7)
            and ds_params.get("IMBALANCE_FACTOR") in (0.02, 0.01)
            and (P["EPOCHS"], P["BATCH_SIZE"]) == (800, 256)):
        return "L"
    return "custom"


def finish(result: dict, run_dir, params: dict, protocol: str, n_synthetic: int = 0) -> dict:
    """Write the final model checkpoint and ``metrics-<method>.json``; returns the metrics."""
    trainer, cfg = result["trainer"], result["trainer"].cfg
    extra = {"logit_prior": result["log_prior"]} if result["log_prior"] is not None else None
    save_model(trainer.net, Path(run_dir) / "checkpoints" / f"{cfg.method}.safetensors",
               meta={"method": cfg.method, "profile": params.get("PROFILE"),
                     "params": asdict(cfg)}, extra=extra)
    metrics = {
        "method": cfg.method, "protocol": protocol,
        "params": {**{k: v for k, v in params.items() if k.isupper()}, "train": asdict(cfg),
                   "dataset": params.get("dataset", {}),
                   **({"synthetic": params["synthetic"]} if params.get("synthetic") else {})},
        "accuracy": evaluation.accuracy_block(result["history"], result["final"]),
        "test_time_adjustment": False,
        "epochs_done": trainer.epoch, "n_train": len(trainer.labels), "n_synthetic": n_synthetic,
        "confusion": result["final"]["confusion"],
        "device": _device_name(trainer.dev),
        "wall_s": result["wall_s"], "images_per_s": result["images_per_s"],
        # the commit(s) that trained the model (a resumed run can span several)
        "commit": ",".join(dict.fromkeys(h.get("commit", "unknown") for h in result["history"])),
    }
    if result["adjusted"] is not None:
        metrics["accuracy_adjusted"] = evaluation.accuracy_block(
            result["history"], result["adjusted"], key="test_acc_adjusted")
    evaluation.write_metrics(run_dir, metrics)
    return metrics


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(dev)}"
    return f"cpu ({torch.get_num_threads()} threads)"


def config_from_params(method: str, P: dict, num_classes: int = 10) -> TrainConfig:
    """TrainConfig from resolved notebook parameters (upper-case names)."""
    return TrainConfig(method=method, arch=P["ARCH"], epochs=P["EPOCHS"],
                       batch_size=P["BATCH_SIZE"], lr=float(P.get("LR") or 0.01), seed=P["SEED"],
                       mixup=bool(P.get("MIXUP", False)),
                       faithful_bug=bool(P.get("FAITHFUL_BUG", False)),
                       num_classes=num_classes)


# -- benchmark ----------------------------------------------------------------------------
def bench(profile: str = "smoke", device: str = "auto", batch_sizes=None) -> dict:
    """images/s of a full ABLE step and of a bare forward+backward of the same network.

    Random uint8 images stand in for data; reports per batch size the two rates, their
    ratio and the projected ABLE epoch time on CIFAR-10-LT rho = 100 (12,406 images).
    """
    arch = PROFILE_DEFAULTS[profile]["ARCH"]
    batch_sizes = batch_sizes or [PROFILE_DEFAULTS[profile]["BATCH_SIZE"]]
    steps = BENCH_STEPS[profile]
    dev = pick_device(device)
    rows = []
    for bs in batch_sizes:
        n = bs * (steps + 1)
        rng = np.random.default_rng(0)
        x = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        labels = rng.integers(0, 10, n)
        cand = dataset.uniform_candidates(labels, 10, 0.3, 0)
        tr = Trainer(TrainConfig(method="able", arch=arch, batch_size=bs), x, cand, labels, device)
        gen = tr.epoch_generator(0)
        able_ips = _rate(lambda i: tr.step(torch.arange(i * bs, (i + 1) * bs, device=dev), gen),
                         steps, bs, dev)
        views = tr._norm(to_unit(tr.x[:bs]))

        def bare(_):
            loss = tr.net(views).float().logsumexp(1).mean()
            tr.opt.zero_grad(set_to_none=True)
            loss.backward()
            tr.opt.step()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            bare_ips = _rate(bare, steps, bs, dev)
        rows.append({"batch_size": bs, "able_images_per_s": able_ips,
                     "bare_images_per_s": bare_ips, "bare_over_able": bare_ips / able_ips,
                     "able_epoch_s_cifar10_lt_rho100": LT_RHO100_IMAGES / able_ips})
    return {"what": "train", "profile": profile, "arch": arch, "device": _device_name(dev),
            "steps": steps, "results": rows, **rows[0]}


def _rate(fn, steps: int, batch: int, dev: torch.device) -> float:
    """Images per second of ``fn(step)`` after one warm-up call."""
    fn(steps)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(steps):
        fn(i)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - t0)


# -- notebook helpers ---------------------------------------------------------------------
def validate(P: dict) -> None:
    """Check this stage's parameters (ValueError with a clear message)."""
    from .networks import BACKBONES
    checks = {
        "METHODS": (lambda v: isinstance(v, (list, tuple)) and v and set(v) <= set(METHODS),
                    f"must be a non-empty list drawn from {METHODS}"),
        "ARCH": (lambda v: v in BACKBONES, f"must be one of {sorted(BACKBONES)}"),
        "PROTOCOL": (lambda v: v in PROTOCOL_SETTINGS,
                     f"must be one of {sorted(PROTOCOL_SETTINGS)}"),
        "SYNTHETIC_LABELS": (lambda v: v in SYNTHETIC_LABELS, f"must be one of {SYNTHETIC_LABELS}"),
        "LR": (lambda v: isinstance(v, (int, float)) and v > 0, "must be a positive number"),
        "CHECKPOINT_EVERY": (lambda v: isinstance(v, int) and v >= 1, "must be a positive integer"),
        "STOP_AFTER": (lambda v: isinstance(v, int) and v >= 1, "must be a positive integer"),
    }
    for name, (ok, rule) in checks.items():
        if P.get(name) is not None and not ok(P[name]):
            raise ValueError(f"{name}={P[name]!r} is invalid: {name} {rule}.")


def runnable_methods(methods, run_dir) -> tuple[list[str], dict[str, str]]:
    """Split ``methods`` into those that can run now and {method: reason} for the rest."""
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"METHODS has unknown method(s) {bad}; choose from {METHODS}.")
    skipped = {}
    for m in set(methods) & set(SYNTHETIC_METHODS):
        if not generators.manifest_rows(run_dir):
            skipped[m] = (f"no synthetic images in {Path(run_dir) / 'synthetic'} yet; run "
                          f"notebook 03 first (skipping {m!r}).")
    return [m for m in methods if m not in skipped], skipped


def run_method(method: str, P: dict, cifar, progress: bool = True) -> dict:
    """Prepare data, train (resuming), write checkpoint + metrics; returns the metrics."""
    data = prepare_data(P["RUN_DIR"], cifar, method, P["N_TEST_PER_CLASS"], P["SEED"],
                        P.get("SYNTHETIC_LABELS") or "exact", P["DEVICE"])
    cfg = config_from_params(method, P, cifar.num_classes)
    result = train(cfg, data, P["RUN_DIR"], P["DEVICE"], bool(P.get("COMPILE")),
                   P["CHECKPOINT_EVERY"], P.get("STOP_AFTER"), progress)
    if not result["done"]:
        print(f"{method}: stopped after epoch {result['trainer'].epoch}/{cfg.epochs} "
              "(STOP_AFTER); run again to resume.")
        return {}
    synthetic = generators.read_settings(P["RUN_DIR"]) if data["n_synthetic"] else {}
    marks = (dict(GENERATOR=synthetic.get("generator"), GEN_LABELS=synthetic.get("cond_labels"),
                  synthetic=synthetic) if synthetic else {})
    metrics = finish(result, P["RUN_DIR"], {**P, "dataset": data["dataset_params"], **marks},
                     protocol_name(P, data["dataset_params"]), data["n_synthetic"])
    return metrics
