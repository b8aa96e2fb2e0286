"""Stage 04: one trainer for every learning method of ``rable_nb/methods/``.

The trainer owns the loop, the network and optimizer, the N×C confidence table, the data
on the device, checkpoints, logs and evaluation; what a step computes belongs to the
method (``methods.build(cfg).step``), and the trainer never looks at a method's name.
The uint8 training and test images live on the device; views are augmented there per
batch (``augment.weak_view`` / ``strong_view``). Every ``checkpoint_every`` epochs the
whole state (model, optimizer, confidences, the method's state tensors, history, RNG)
goes to ``checkpoints/<method>-state.safetensors``; a later call with the same settings
resumes from it and ends with the same numbers as an uninterrupted run. Each epoch's
random draws come from the trainer's generator re-seeded with (seed, epoch), so resuming
needs no hidden state.

Inside an epoch nothing is read back to the host: the loss terms are summed on the device
by the step itself and read once, with the pseudo-label accuracy, when the epoch ends; the
test-set evaluation after it is one more read (``evaluation.evaluate``). On CUDA the
optimizer is the fused SGD with the learning rate as a device tensor, and ``graph=True``
(``GRAPH=True``) replays the whole step as a CUDA graph (``rable_nb/cuda_graph.py``); on CPU
the eager step runs, the reference for both.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from . import config, cuda_graph, dataset, evaluation, generators, methods, profiling
from .methods._losses import uniform_confidence
from .networks import PLLNet, device_name, pick_device, save_model, standardize, to_unit

METHODS = tuple(methods.names())  # every valid method name (see rable_nb/methods)
SYNTHETIC_LABELS = ("exact", "partial")
LT_RHO100_IMAGES = 12406  # CIFAR-10-LT, rho = 100, n_max = 5000

# Stage defaults per profile (config.resolve(stage_defaults=...)); protocol L changes the
# paper profile's epochs and batch size (see stage_defaults).
# UNLABELED / RATIO / UNLABELED_THRESHOLD: the ``+unlabeled`` images (rable_nb/unlabeled.py):
# how many (0 = all), at most RATIO per long-tailed image (the reference's 5; smoke: 1, to
# stay small), confidence needed to train with the pseudo-label (0: always, as the reference).
_UNLABELED = dict(UNLABELED=0, RATIO=5, UNLABELED_THRESHOLD=0.0)
PROFILE_DEFAULTS: dict[str, dict] = {
    "smoke": dict(_UNLABELED, ARCH="tiny_cnn", EPOCHS=2, BATCH_SIZE=64, LR=0.01,
                  CHECKPOINT_EVERY=1, RATIO=1),
    # quick: a CPU comparison (supervised, proden, able, able+records at 25 epochs: 18.6 min
    # on an idle 2-core machine); the larger lr makes up for the short cosine schedule.
    "quick": dict(_UNLABELED, ARCH="mini_cnn", EPOCHS=25, BATCH_SIZE=128, LR=0.05,
                  CHECKPOINT_EVERY=1),
    "paper": dict(_UNLABELED, ARCH="resnet18", EPOCHS=500, BATCH_SIZE=64, LR=0.01,
                  CHECKPOINT_EVERY=10, PROTOCOL="R"),
}
PROTOCOL_SETTINGS = {"R": dict(EPOCHS=500, BATCH_SIZE=64), "L": dict(EPOCHS=800, BATCH_SIZE=256)}
PROTOCOL_RULE = config.one_of(sorted(PROTOCOL_SETTINGS))
BENCH_STEPS = {"smoke": 3, "quick": 10, "paper": 30}


def stage_defaults(protocol: str | None = None) -> dict[str, dict]:
    """``PROFILE_DEFAULTS`` with the paper profile set to ``protocol``'s epochs/batch size."""
    out = {k: dict(v) for k, v in PROFILE_DEFAULTS.items()}
    if protocol is not None:
        config.check({"PROTOCOL": protocol}, {"PROTOCOL": PROTOCOL_RULE})
        out["paper"].update(PROTOCOL_SETTINGS[protocol], PROTOCOL=protocol)
    return out


@dataclass
class TrainConfig:
    """Every setting that changes the numbers of a run (compared on resume).

    ``method`` is a name of ``methods.names()`` (e.g. ``'corr+records+mixup'``);
    ``mixup=True`` is the older spelling of ``+mixup`` and is folded into the name.
    ``method_params`` {piece: {param: value}} overrides a method's hyper-parameters; after
    construction it holds every resolved value (recorded in metrics and checkpoints).
    """

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
    mixup_alpha: float = 4.0
    faithful_bug: bool = False
    seed: int = 0
    num_classes: int = 10
    method_params: dict = field(default_factory=dict)

    def __post_init__(self):
        for name in ("epochs", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} must be a positive integer.")
        if self.mixup and "mixup" not in methods.parse(self.method)[1]:
            self.method = f"{self.method}+mixup"   # +mixup comes last in every name
        methods.check(self.method)
        self.mixup = "mixup" in methods.parse(self.method)[1]
        self.method_params = methods.resolve_params(self.method, self, self.method_params)
        methods.build(self)  # every piece checks its settings now, before any training


def cosine_lr(cfg: TrainConfig, epoch: int) -> float:
    """Learning rate of ``epoch`` (0-based, within a stage): cosine from lr to lr_min over
    ``cfg.epochs``."""
    return cfg.lr_min + (cfg.lr - cfg.lr_min) * (1 + math.cos(math.pi * epoch / cfg.epochs)) / 2


class Trainer:
    """Network, optimizer, confidences and method state of one method on one training set.

    ``train_x``: uint8 images (N×H×W×3), or float feature vectors (N×D) of a backbone — then
    every forward pass starts after the backbone (for methods whose ``inputs`` are
    ``"features"``). ``sample_weight`` (N, optional): per-image loss weights handed to the
    method. ``init_weights`` (optional): a network state dict every fresh network starts
    from instead of a random initialisation (e.g. the backbone whose features ``train_x``
    holds). ``graph``: run the steps as CUDA graphs (``cuda_graph.CapturedSteps``); on a
    CPU device it falls back to the eager step (the same computation) with a note.
    """

    def __init__(self, cfg: TrainConfig, train_x, candidates, labels, device: str = "auto",
                 compile: bool = False, data_key: str = "", sample_weight=None,
                 graph: bool = False, init_weights: dict | None = None):
        self.cfg, self.dev, self.data_key, self.compile = cfg, pick_device(device), data_key, compile
        if graph and compile:
            raise ValueError("GRAPH=True and COMPILE=True cannot be combined: choose one "
                             "(the CUDA graph records the eager step).")
        if len(train_x) < cfg.batch_size:
            raise ValueError(f"BATCH_SIZE={cfg.batch_size} exceeds the {len(train_x)} training "
                             "images (batches drop the remainder).")
        if self.dev.type == "cpu":
            torch.set_flush_denormal(True)  # augmentations produce denormals: 10× slower
        self.method = methods.build(cfg)
        self.stages = self.method.stages()
        self.init_weights = init_weights
        self.x = torch.as_tensor(np.asarray(train_x), device=self.dev)
        self.features_in = self.x.dim() == 2
        if self.features_in:
            self.x = self.x.float()                                    # N×D features
        else:
            self.x = self.x.permute(0, 3, 1, 2).contiguous()           # uint8 N×3×32×32
        self._build_model(cfg.seed)
        self.cand = torch.as_tensor(np.asarray(candidates), device=self.dev).bool()
        self.labels = torch.as_tensor(np.asarray(labels), device=self.dev).long()
        self.weight = (None if sample_weight is None else
                       torch.as_tensor(np.asarray(sample_weight), device=self.dev).float())
        self.conf = uniform_confidence(self.cand)
        self.epoch = 0
        self.history: list[dict] = []
        self.gen = torch.Generator(device=self.dev)   # re-seeded every epoch
        self.sums: dict[str, torch.Tensor] = {}        # the epoch's loss terms, on the device
        self.method.init_state(self)
        self.preparation = self.method.prepare(self)  # e.g. SSP's pre-training (cached)
        self.graph = graph and self.dev.type == "cuda"
        if graph and not self.graph:
            print(f"GRAPH=True: CUDA graphs need a CUDA device; training on {self.dev.type} "
                  "runs the eager step (the same computation).")
        self._captured = cuda_graph.CapturedSteps(self) if self.graph else None

    def _build_model(self, seed: int) -> None:
        """A freshly initialised network (seeded), its optimizer and forward functions."""
        cfg = self.cfg
        torch.manual_seed(seed)
        self.net = PLLNet(cfg.arch, cfg.num_classes).to(self.dev)
        if self.init_weights is not None:
            self.net.load_state_dict(self.init_weights)
        for part in self.method.base.frozen:
            self.net.get_submodule(part).requires_grad_(False)
        if self.dev.type == "cuda":
            self.net = self.net.to(memory_format=torch.channels_last)
        self.extra = torch.nn.ModuleDict(self.method.modules(self.net)).to(self.dev)
        net = self.net
        encode = (lambda x: x) if self.features_in else net.backbone  # features: done already

        def features(x):
            feats = encode(x)
            return feats, net.classifier(feats)
        nets = {"logits": net.classifier if self.features_in else net, "features": features,
                "embed": lambda x: net.heads(encode(x))}
        wrap = torch.compile if self.compile else (lambda fn: fn)
        self._nets = {k: wrap(fn) for k, fn in nets.items()}
        self.opt = self._optimizer()

    def _optimizer(self) -> torch.optim.SGD:
        """SGD with momentum and weight decay. On CUDA the fused kernel with the learning rate
        as a device tensor: the same update in a few kernels, and a captured step reads each
        epoch's rate from that tensor."""
        cfg, cuda = self.cfg, self.dev.type == "cuda"
        lr = torch.tensor(cfg.lr, dtype=torch.float32, device=self.dev) if cuda else cfg.lr
        return torch.optim.SGD(self._parameters(), lr=lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay, fused=cuda or None)

    def _set_lr(self, lr: float) -> None:
        for group in self.opt.param_groups:
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(lr)          # in place: no host-to-device wait
            else:
                group["lr"] = lr

    def _parameters(self) -> list[torch.nn.Parameter]:
        """Everything the optimizer trains: the network (but its frozen parts), then the
        method's modules."""
        return [p for p in [*self.net.parameters(), *self.extra.parameters()] if p.requires_grad]

    def _train_mode(self) -> None:
        """The network in training mode, its frozen parts in evaluation mode."""
        self.net.train()
        for part in self.method.base.frozen:
            self.net.get_submodule(part).eval()

    # -- stages ---------------------------------------------------------------------------
    @property
    def total_epochs(self) -> int:
        return sum(s.epochs for s in self.stages)

    def _stage_at(self, epoch: int) -> tuple[int, int]:
        """(index of the stage that ``epoch`` belongs to, its first epoch)."""
        start = 0
        for i, stage in enumerate(self.stages):
            if epoch < start + stage.epochs or i == len(self.stages) - 1:
                return i, start
            start += stage.epochs
        raise AssertionError("no stages")

    @property
    def stage(self):
        return self.stages[self._stage_at(self.epoch)[0]]

    def _start_stage(self, i: int) -> None:
        stage = self.stages[i]
        if i > 0 and stage.fresh_model:
            self._build_model(self.cfg.seed + 1_000_003 * i)
        if i > 0 and stage.fresh_confidence:
            self.conf.copy_(uniform_confidence(self.cand))
        self.method.start_stage(self, stage)

    # -- one step -------------------------------------------------------------------------
    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        if self.features_in:
            return x
        x = standardize(x)
        return x.contiguous(memory_format=torch.channels_last) if self.dev.type == "cuda" else x

    def _forward(self, fn, x: torch.Tensor):
        """Network call under bf16 autocast on CUDA; outputs back in fp32 so that the
        losses, weights and confidence updates are computed in full precision."""
        # no weight-cast cache: it must not outlive a CUDA-graph capture, and each pass uses
        # every weight once
        with torch.autocast(self.dev.type, dtype=torch.bfloat16, enabled=self.dev.type == "cuda",
                            cache_enabled=False):
            out = fn(self._norm(x))
        return tuple(o.float() for o in out) if isinstance(out, tuple) else out.float()

    def forward(self, inputs: dict[str, torch.Tensor], need: str = "logits") -> methods.Outputs:
        """One pass over the concatenated image batches ``inputs``; outputs split by name."""
        names = list(inputs)
        x = torch.cat([inputs[n] for n in names]) if len(names) > 1 else inputs[names[0]]
        res = self._forward(self._nets[need], x)
        res = (None, res, None) if need == "logits" else (*res, None)[:3]
        sizes = [len(inputs[n]) for n in names]

        def split(t):
            return {} if t is None else dict(zip(names, t.split(sizes)))
        feats, logits, proj = res
        return methods.Outputs(split(logits), split(feats), split(proj))

    def batch_inputs(self, idx: torch.Tensor) -> torch.Tensor:
        """The inputs of the samples ``idx`` as a step sees them: float images in [0, 1]
        (N×3×H×W), or the feature vectors."""
        return self.x[idx] if self.features_in else to_unit(self.x[idx])

    def log_prior(self) -> torch.Tensor | None:
        """The method's test-time log-prior (RECORDS), or None."""
        return self.method.test_log_prior(self)

    def clock(self, step_in_epoch: int) -> tuple[int, int]:
        """(epoch within the current stage, step within the stage) of a step of this epoch."""
        _, start = self._stage_at(self.epoch)
        epoch = self.epoch - start
        return epoch, epoch * (len(self.x) // self.cfg.batch_size) + step_in_epoch

    def step(self, idx: torch.Tensor, gen: torch.Generator, step_in_epoch: int = 0) -> dict:
        """One eager optimisation step on the images ``idx``; returns the loss terms."""
        epoch, step = self.clock(step_in_epoch)
        return self.compute_step(idx, gen, epoch, step, self.method.schedule(epoch, step))

    def run_step(self, idx: torch.Tensor, gen: torch.Generator, step_in_epoch: int = 0) -> dict:
        """:meth:`step`, or its CUDA-graph replay when the trainer runs graphs."""
        run = self._captured.run if self._captured else self.step
        return run(idx, gen, step_in_epoch)

    def compute_step(self, idx: torch.Tensor, gen: torch.Generator, epoch: int, step: int,
                     schedule: dict) -> dict:
        """Everything one step does, all of it on the device (what a CUDA graph records):
        views, forward, the method's losses, backward, optimizer step, confidence update,
        and the loss terms added to the epoch's sums (``self.sums``)."""
        batch = methods.Batch(
            idx=idx, x=self.batch_inputs(idx), cand=self.cand[idx], conf=self.conf[idx],
            conf_table=self.conf, labels=self.labels[idx],
            weight=None if self.weight is None else self.weight[idx], gen=gen, epoch=epoch,
            step=step, stage=self.stage.name, net=self.net, forward=self.forward,
            schedule=schedule)
        loss, terms, new = self.method.step(batch)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if new is not None:
            self.conf[idx] = new
        terms = {k: v.detach() for k, v in terms.items()}
        for k, v in terms.items():
            if k not in self.sums:
                self.sums[k] = torch.zeros((), device=self.dev)
            self.sums[k].add_(v)
        return terms

    # -- epochs ---------------------------------------------------------------------------
    def epoch_generator(self, epoch: int) -> torch.Generator:
        """The trainer's generator seeded for ``epoch`` (one object for the whole run: the
        CUDA graphs stay registered with it)."""
        return self.gen.manual_seed(self.cfg.seed * 1_000_003 + epoch)

    def train_epoch(self, progress: bool = True) -> dict:
        """One pass over the data in random order (drop_last); returns the epoch's log row."""
        cfg, n = self.cfg, len(self.x)
        i, start = self._stage_at(self.epoch)
        if self.epoch == start:
            self._start_stage(i)
        lr = cosine_lr(cfg, self.epoch - start)
        self._set_lr(lr)
        self.method.start_epoch(self)
        gen = self.epoch_generator(self.epoch)
        order = torch.randperm(n, device=self.dev, generator=gen)
        steps = n // cfg.batch_size
        terms: dict[str, torch.Tensor] = {}
        self._train_mode()
        t0 = time.time()
        bar = tqdm(range(steps), desc=f"{cfg.method} epoch {self.epoch + 1}/{self.total_epochs}",
                   unit="step", leave=False, disable=not progress)
        for s in bar:
            terms.update(self.run_step(order[s * cfg.batch_size:(s + 1) * cfg.batch_size], gen, s))
        self.method.end_epoch(self)
        means = self._read_epoch(list(terms), steps)   # waits for the device: the epoch's end
        seconds = time.time() - t0
        row = {"epoch": self.epoch + 1, "lr": lr, "train_s": seconds,
               "images_per_s": steps * cfg.batch_size / max(seconds, 1e-9)}
        if len(self.stages) > 1:
            row["stage"] = self.stages[i].name
        row.update(means)
        self.epoch += 1
        return row

    def _read_epoch(self, names: list[str], steps: int) -> dict:
        """Mean of each loss term ``names`` over the epoch's ``steps`` and the pseudo-label
        accuracy (None without confidences): one read from the device; the sums restart."""
        values = [self.sums[k] for k in names]
        if self.method.disambiguates:
            values.append((self.conf.argmax(1) == self.labels).float().mean())
        read = torch.stack(values).tolist() if values else []
        for total in self.sums.values():
            total.zero_()
        out = {k: v / steps for k, v in zip(names, read)}
        out["pseudo_label_acc"] = read[-1] if self.method.disambiguates else None
        return out

    # -- state ----------------------------------------------------------------------------
    def save_state(self, path: Path) -> None:
        """Model (+ the method's modules), optimizer momentum, confidences, method state,
        RNG, epoch and history."""
        tensors = {f"model.{k}": v for k, v in self.net.state_dict().items()}
        tensors.update({f"modules.{k}": v for k, v in self.extra.state_dict().items()})
        for i, p in enumerate(self._parameters()):
            buf = self.opt.state.get(p, {}).get("momentum_buffer")
            if buf is not None:
                tensors[f"optim.{i}"] = buf
        tensors.update({f"method.{k}": v for k, v in self.method.state().items()})
        tensors.update(conf=self.conf, rng_cpu=torch.get_rng_state())
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
        saved, current = json.loads(meta["config"]), json.loads(json.dumps(asdict(self.cfg)))
        if saved != current:
            diff = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
            print(f"{path.name}: saved with other settings ({diff}); starting from scratch.")
            return False
        if meta.get("data") != self.data_key:
            print(f"{path.name}: saved for other training or test data; starting from scratch.")
            return False
        t = load_file(str(path), device=str(self.dev))
        self.net.load_state_dict({k[6:]: v for k, v in t.items() if k.startswith("model.")})
        self.extra.load_state_dict({k[8:]: v for k, v in t.items() if k.startswith("modules.")})
        params = self._parameters()
        for k, v in t.items():
            if k.startswith("optim."):
                self.opt.state[params[int(k[6:])]]["momentum_buffer"] = v.clone()
        self.method.load_state({k[7:]: v.clone() for k, v in t.items() if k.startswith("method.")})
        self.conf = t["conf"].clone()
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
    if np.ndim(x) != 4:
        raise ValueError("SYNTHETIC_LABELS='partial' with PARTIAL='instance' draws candidates "
                         "from a classifier's view of each image; synthetic features have "
                         "none: use SYNTHETIC_LABELS='exact'.")
    info = ds_params["clean_classifier"]
    per_class = None if info["train_images"] >= len(cifar.train_y) else info["train_images"] // c
    net, _ = dataset.clean_classifier(cifar, info["arch"], info["epochs"], info["seed"], device,
                                      per_class)
    probs = dataset.predict_proba(net, x)
    return dataset.instance_candidates(probs, labels, float(ds_params["RATE"]), seed)


def prepare_data(run_dir, cifar, method: str, n_test_per_class: int, seed: int = 0,
                 synthetic_labels: str = "exact", device: str = "auto",
                 params: dict | None = None, synth_weight: float = 1.0) -> dict:
    """Training images/candidates/labels (+ synthetic ones when the method's
    ``data_sources`` ask for them, e.g. ``rable``; + pseudo-labelled unlabeled ones for
    ``unlabeled``, e.g. ``able+unlabeled``, with the settings in ``params``: see
    ``rable_nb/unlabeled.py``) and the test set.

    A method whose ``inputs`` are ``"features"`` (``rable-feature``) gets the features of the
    run's backbone (``generator/backbone.safetensors``) instead of the images, and
    ``init_weights``, that backbone's network. ``synth_weight`` (``SYNTH_WEIGHT``) is the
    loss weight of every synthetic sample (``sample_weight``: 1 for real ones; left out
    when it is 1). ``class_counts`` stays the real long tail's (it defines
    many/medium/few). The labels of added images are their hidden truth, for the logs'
    pseudo-label accuracy only.
    """
    ds = dataset.load_dataset(run_dir, cifar)
    x, cand, y = cifar.train_x[ds["indices"]], ds["candidates"], ds["labels"]
    n_synth, fields, weight, init = 0, {"n_unlabeled": 0}, None, None
    if "unlabeled" in methods.data_sources(method):
        from . import unlabeled  # it imports the warm-up, which imports this module
        u = unlabeled.pseudo_labelled(ds, cifar, {"SEED": seed, **(params or {})}, device)
        x, cand = np.concatenate([x, u["x"]]), np.concatenate([cand, u["candidates"]])
        y = np.concatenate([y, u["hidden"]])
        fields = {"n_unlabeled": u["info"]["n"], "unlabeled": u["info"]}
    if methods.inputs(method) == "features":
        net, _ = generators.feature.load_backbone(run_dir, device)
        x, init = generators.feature.encode(net, x), net.state_dict()
    if "synthetic" in methods.data_sources(method):
        problem = synthetic_problem(method, run_dir)
        if problem:
            raise ValueError(f"{method!r} cannot run: {problem}")
        sx, sy, rows = generators.load_synthetic(run_dir)
        sc = synthetic_candidates(sy, ds["params"], synthetic_labels, cifar, sx, device)
        x, cand, y = np.concatenate([x, sx]), np.concatenate([cand, sc]), np.concatenate([y, sy])
        n_synth = len(sy)
        if synth_weight != 1:
            weight = np.concatenate([np.ones(len(y) - n_synth), np.full(n_synth, synth_weight)])
    test = dataset.balanced_subset(cifar.test_y, n_test_per_class, seed)
    return dict(train_x=x, candidates=cand, labels=y, test_x=cifar.test_x[test],
                test_y=cifar.test_y[test], class_counts=ds["class_counts"],
                n_synthetic=n_synth, dataset_params=ds["params"], fields=fields,
                sample_weight=weight, init_weights=init)


# -- a whole run --------------------------------------------------------------------------
def train(cfg: TrainConfig, data: dict, out_dir, device: str = "auto", compile: bool = False,
          checkpoint_every: int = 1, stop_after: int | None = None, progress: bool = True,
          graph: bool = False) -> dict:
    """Train (resuming from ``out_dir/checkpoints/<method>-state.safetensors``) and evaluate.

    ``stop_after``: stop once this many epochs are done in total, counting every stage (to
    split a run across commands). ``data`` may carry ``sample_weight`` (per-image loss
    weights) and ``init_weights`` (the network's starting weights). ``graph``: CUDA-graph steps (see :class:`Trainer`). Writes
    ``logs/<method>.jsonl`` every epoch. Returns a dict with the trainer,
    history, final evaluation (and the test-time-adjusted one when the method has a
    test-time log-prior, e.g. RECORDS), and timing.
    """
    out = Path(out_dir)
    state_path = out / "checkpoints" / f"{cfg.method}-state.safetensors"
    trainer = Trainer(cfg, data["train_x"], data["candidates"], data["labels"], device, compile,
                      data_key=data_fingerprint(data), sample_weight=data.get("sample_weight"),
                      graph=graph, init_weights=data.get("init_weights"))
    resumed = trainer.load_state(state_path)
    if not resumed:  # results of an earlier, different run must not pass for this one
        for stale in (out / "checkpoints" / f"{cfg.method}.safetensors",
                      out / f"metrics-{cfg.method}.json"):
            stale.unlink(missing_ok=True)
    test_x = torch.as_tensor(np.asarray(data["test_x"]), device=trainer.dev)
    test_y = np.asarray(data["test_y"])

    def evaluate():  # (raw, test-time adjusted or None): one pass, one read
        return evaluation.evaluate(trainer.net, test_x, test_y, data["class_counts"],
                                   trainer.log_prior())
    total = trainer.total_epochs
    last = min(total, stop_after or total)
    commit = config.git_commit()
    bar = tqdm(range(trainer.epoch, last), desc=cfg.method, unit="epoch", disable=not progress,
               initial=trainer.epoch, total=total)
    for _ in bar:
        t0 = time.time()
        row = trainer.train_epoch(progress)
        raw, adjusted = evaluate()
        row["test_acc"] = raw["overall"]
        if adjusted is not None:
            row["test_acc_adjusted"] = adjusted["overall"]
        row["seconds"] = time.time() - t0
        row["commit"] = commit
        trainer.history.append(row)
        bar.set_postfix(test_acc=f"{row['test_acc']:.3f}", loss=f"{row.get('loss_cls', 0):.3f}")
        _write_log(out / "logs" / f"{cfg.method}.jsonl", trainer.history)
        if trainer.epoch % checkpoint_every == 0 or trainer.epoch == last:
            trainer.save_state(state_path)
    final, adjusted = evaluate()
    hist = trainer.history
    train_s = sum(h["train_s"] for h in hist)
    return dict(trainer=trainer, history=hist, final=final, adjusted=adjusted,
                log_prior=trainer.log_prior(),
                done=trainer.epoch >= total, resumed=resumed,
                wall_s=sum(h["seconds"] for h in hist),
                images_per_s=(sum(h["images_per_s"] * h["train_s"] for h in hist) / train_s
                              if train_s else None))


def data_fingerprint(data: dict) -> str:
    """Hash of the training images (or features), candidates, labels (+ sample weights and
    starting weights) and test labels."""
    h = hashlib.sha1()
    arrays = [(key, data.get(key)) for key in ("train_x", "candidates", "labels", "test_y",
                                               "sample_weight")]
    arrays += [(f"init.{k}", v.detach().cpu().numpy())
               for k, v in sorted((data.get("init_weights") or {}).items())]
    for key, arr in arrays:
        if arr is None:
            continue
        arr = np.ascontiguousarray(arr)
        h.update(f"{key}{arr.shape}{arr.dtype}".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def _write_log(path: Path, history: list[dict]) -> None:
    config.write_atomic(path, lambda t: t.write_text("".join(json.dumps(h) + "\n" for h in history)))


def protocol_name(P: dict, ds_params: dict) -> str:
    """'R' or 'L' when the data and training settings are that protocol's,
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


def finish(result: dict, run_dir, params: dict, protocol: str, n_synthetic: int = 0,
           fields: dict | None = None) -> dict:
    """Write the final model checkpoint and ``metrics-<method>.json``; returns the metrics.

    ``fields``: more top-level fields (``prepare_data``'s: ``n_unlabeled`` and the
    ``unlabeled`` block). What the method's ``prepare`` recorded (SSP's pre-training) goes to
    ``preparation``. ``accuracy`` uses the network's logits; ``accuracy_adjusted`` (methods
    with a test-time log-prior, i.e. RECORDS) subtracts it, as the official RECORDS code evaluates —
    ``comparable_to_published`` names the one to compare with published numbers. "best"
    is the maximum over the epochs of the final stage (the test set is used for it).
    """
    trainer, cfg = result["trainer"], result["trainer"].cfg
    final_stage = trainer.stages[-1].name
    history = [h for h in result["history"] if h.get("stage", final_stage) == final_stage]
    base, modifiers = methods.parse(cfg.method)
    extra = {"logit_prior": result["log_prior"]} if result["log_prior"] is not None else None
    save_model(trainer.net, Path(run_dir) / "checkpoints" / f"{cfg.method}.safetensors",
               meta={"method": cfg.method, "profile": params.get("PROFILE"),
                     "params": asdict(cfg)}, extra=extra)
    metrics = {
        "method": cfg.method, "protocol": protocol,
        "params": {**{k: v for k, v in params.items() if k.isupper()}, "train": asdict(cfg),
                   "dataset": params.get("dataset", {}),
                   **({"synthetic": params["synthetic"]} if params.get("synthetic") else {})},
        "accuracy": evaluation.accuracy_block(history, result["final"]),
        "test_time_adjustment": result["adjusted"] is not None,
        "comparable_to_published": ("accuracy_adjusted" if result["adjusted"] is not None
                                    else "accuracy"),
        "base_method": base, "modifiers": modifiers,
        "stages": [{"name": st.name, "epochs": st.epochs} for st in trainer.stages],
        "epochs_done": trainer.epoch, "n_train": len(trainer.labels), "n_synthetic": n_synthetic,
        **(fields or {}), **({"preparation": trainer.preparation} if trainer.preparation else {}),
        "confusion": result["final"]["confusion"],
        "device": device_name(trainer.dev), "cuda_graph": trainer.graph,
        "wall_s": result["wall_s"], "images_per_s": result["images_per_s"],
        # the commit(s) that trained the model (a resumed run can span several)
        "commit": ",".join(dict.fromkeys(h.get("commit", "unknown") for h in result["history"])),
    }
    if result["adjusted"] is not None:
        metrics["accuracy_adjusted"] = evaluation.accuracy_block(
            history, result["adjusted"], key="test_acc_adjusted")
    evaluation.write_metrics(run_dir, metrics)
    return metrics


def config_from_params(method: str, P: dict, num_classes: int = 10) -> TrainConfig:
    """TrainConfig from resolved notebook parameters (upper-case names). ``SSP_EPOCHS``,
    when given, sets ``METHOD_PARAMS['ssp']['epochs']``."""
    return TrainConfig(method=method, arch=P["ARCH"], epochs=P["EPOCHS"],
                       batch_size=P["BATCH_SIZE"], lr=float(P.get("LR") or 0.01), seed=P["SEED"],
                       faithful_bug=bool(P.get("FAITHFUL_BUG", False)),
                       method_params=method_params(P), num_classes=num_classes)


def method_params(P: dict) -> dict:
    """``METHOD_PARAMS`` with the named shortcuts applied (``SSP_EPOCHS``)."""
    out = dict(P.get("METHOD_PARAMS") or {})
    if P.get("SSP_EPOCHS") is not None:
        out["ssp"] = {**out.get("ssp", {}), "epochs": P["SSP_EPOCHS"]}
    return out


# -- benchmark ----------------------------------------------------------------------------
BENCH_PATHS = {"eager": False, "cuda_graph": True}   # step path -> Trainer(graph=...)
BENCH_TEST_IMAGES = 10_000                           # a CIFAR-10 test set
PROTOCOL_L_EPOCHS = 800


def bench(profile: str = "smoke", device: str = "auto", batch_sizes=None,
          paths=("eager",)) -> dict:
    """Speed of a full ABLE step per batch size and step path (``paths``: ``"eager"``,
    ``"cuda_graph"``); random uint8 images stand in for data.

    Per row: images/s of the step and of a bare forward+backward of the same network; the
    share of the step's wall time the device is busy (``profiling.busy_share``; on CPU a
    proxy) with kernels and launches per step (CUDA); ATen ops the host dispatches and
    reads back to the host per step; the evaluation of 10,000 test images; the projected
    epoch on CIFAR-10-LT rho = 100 (12,406 images, drop_last, + evaluation) and 800 of them
    (protocol L). A CUDA-graph row on a CPU device says why it was skipped.
    """
    unknown = [p for p in paths if p not in BENCH_PATHS]
    if unknown or not paths:
        raise ValueError(f"paths={list(paths)!r} is invalid: choose from {list(BENCH_PATHS)}.")
    arch = PROFILE_DEFAULTS[profile]["ARCH"]
    batch_sizes = batch_sizes or [PROFILE_DEFAULTS[profile]["BATCH_SIZE"]]
    steps = BENCH_STEPS[profile]
    dev = pick_device(device)
    rng = np.random.default_rng(0)
    test_x = torch.as_tensor(rng.integers(0, 256, (BENCH_TEST_IMAGES, 32, 32, 3),
                                          dtype=np.uint8), device=dev)
    rows = []
    for bs in batch_sizes:
        n = bs * (steps + 1)
        x = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        labels = rng.integers(0, 10, n)
        cand = dataset.uniform_candidates(labels, 10, 0.3, 0)
        for path in paths:
            if BENCH_PATHS[path] and dev.type != "cuda":
                rows.append({"batch_size": bs, "path": path,
                             "skipped": f"CUDA graphs need a CUDA device (device: {dev.type})"})
                continue
            tr = Trainer(TrainConfig(method="able", arch=arch, batch_size=bs), x, cand, labels,
                         device, graph=BENCH_PATHS[path])
            rows.append({"batch_size": bs, "path": path, **_bench_trainer(tr, steps, test_x)})
    measured = [r for r in rows if "skipped" not in r]
    out = {"what": "train", "profile": profile, "arch": arch, "device": device_name(dev),
           "steps": steps, "paths": list(paths), "results": rows, **(measured or rows)[0]}
    first = {r["path"]: r for r in measured if r["batch_size"] == batch_sizes[0]}
    if len(first) == 2:
        out["graph_over_eager"] = (first["cuda_graph"]["able_images_per_s"]
                                   / first["eager"]["able_images_per_s"])
    return out


def _bench_trainer(tr: Trainer, steps: int, test_x: torch.Tensor) -> dict:
    """The measurements of one ``bench`` row (see there) on the trainer's path."""
    dev, bs = tr.dev, tr.cfg.batch_size
    gen = tr.epoch_generator(0)

    def able(i):
        tr.run_step(torch.arange(i * bs, (i + 1) * bs, device=dev), gen, i)
    warmup = cuda_graph.WARMUP + 1 if tr.graph else 1     # + the capture
    step_s = profiling.timed(able, steps, dev, warmup)
    ops = profiling.count_ops(able, steps)
    busy = profiling.busy_share(able, min(steps, 5), dev, step_s)
    views = tr._norm(to_unit(tr.x[:bs]))

    def bare(_):
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            loss = tr.net(views).float().logsumexp(1).mean()
        tr.opt.zero_grad(set_to_none=True)
        loss.backward()
        tr.opt.step()
    bare_s = profiling.timed(bare, steps, dev)
    evaluation.predict(tr.net, test_x[:bs])                 # warm-up
    t0 = time.perf_counter()
    evaluation.predict(tr.net, test_x).cpu()
    eval_s = time.perf_counter() - t0
    train_s = LT_RHO100_IMAGES // bs * step_s
    return {"able_images_per_s": bs / step_s, "bare_images_per_s": bs / bare_s,
            "bare_over_able": step_s / bare_s, "step_ms": 1e3 * step_s, **busy,
            "ops_per_step": ops["ops"], "host_syncs_per_step": ops["host_syncs"],
            "able_epoch_s_cifar10_lt_rho100": train_s, "eval_s": eval_s,
            "epoch_s_with_eval": train_s + eval_s,
            "run_800_epochs_min": PROTOCOL_L_EPOCHS * (train_s + eval_s) / 60}


# -- notebook helpers ---------------------------------------------------------------------
def profile_defaults(P: dict) -> dict[str, dict]:
    """This stage's defaults for ``config.resolve``: they depend on ``PROTOCOL``."""
    return stage_defaults(P.get("PROTOCOL"))


def validate(P: dict) -> None:
    """Check this stage's parameters (ValueError with a clear message). With ``P['dataset']``
    (the run's dataset parameters, as the runner passes them), BATCH_SIZE is checked
    against the number of training images."""
    from .networks import BACKBONES
    names = P.get("METHODS")
    if names is not None:
        if not (isinstance(names, list) and names):
            raise ValueError(f"METHODS={names!r} is invalid: METHODS must be a non-empty list "
                             f"of method names, e.g. ['corr+records', 'solar'].")
        for name in names:
            reason = methods.explain(name)
            if reason:
                raise ValueError(f"METHODS={names!r} is invalid: {name!r}: {reason}")
    if P.get("METHOD_PARAMS") is not None:
        if not isinstance(P["METHOD_PARAMS"], dict):
            raise ValueError(f"METHOD_PARAMS={P['METHOD_PARAMS']!r} is invalid: METHOD_PARAMS "
                             "must be a dict {piece: {parameter: value}}.")
        try:  # without METHODS: against every method notebook 04 may default to
            for name in names or ["able", "rable", "rable-feature"]:
                TrainConfig(method=name, method_params=P["METHOD_PARAMS"])
        except ValueError as err:
            raise ValueError(f"METHOD_PARAMS={P['METHOD_PARAMS']!r} is invalid: {err}") from None
    from .conditioning import WARMUP_RULES  # it imports this module
    config.check(P, {**WARMUP_RULES,
        "SSP_EPOCHS": config.integer(1), "UNLABELED": config.integer(0),
        "RATIO": config.number(0, low_open=True), "UNLABELED_THRESHOLD": config.number(0, 1),
        "ARCH": config.one_of(sorted(BACKBONES)),
        "PROTOCOL": PROTOCOL_RULE,
        "SYNTHETIC_LABELS": config.one_of(SYNTHETIC_LABELS),
        "LR": config.number(0, low_open=True),
        "CHECKPOINT_EVERY": config.integer(1),
        "STOP_AFTER": config.integer(1),
        "N_TEST_PER_CLASS": config.integer(1),
        "FAITHFUL_BUG": config.BOOLEAN, "COMPILE": config.BOOLEAN, "GRAPH": config.BOOLEAN,
        "ALLOW_SKIP": config.BOOLEAN, "SYNTH_WEIGHT": config.number(0),
    })
    n = dataset.num_images(P.get("dataset") or {})
    if n is not None and config.is_int(P.get("BATCH_SIZE")) and P["BATCH_SIZE"] > n:
        raise ValueError(f"BATCH_SIZE={P['BATCH_SIZE']} is invalid: BATCH_SIZE must be at most "
                         f"the {n} training images of this run's dataset (batches drop the "
                         "remainder).")
    if P.get("GRAPH") and P.get("COMPILE"):
        raise ValueError("GRAPH=True and COMPILE=True cannot be combined: choose one (the CUDA "
                         "graph records the eager step).")


def default_methods(run_dir) -> list[str]:
    """Notebook 04's ``METHODS`` when none are given: ABLE and RABLE on the run's synthetic
    samples — ``rable`` for images, ``rable-feature`` for the ``feature`` backend's
    features."""
    space = generators.synthetic_space(run_dir)
    return ["able", "rable-feature" if space == "feature" else "rable"]


def synthetic_problem(method: str, run_dir) -> str | None:
    """Why ``method``'s synthetic data source is not usable in ``run_dir``, or None: none
    made yet, or samples of the other kind (features for an image method, images for a
    feature method)."""
    space = generators.synthetic_space(run_dir)
    folder = Path(run_dir) / "synthetic"
    if space is None:
        return f"no synthetic images or features in {folder} yet; run notebook 03 first"
    made = generators.read_settings(run_dir).get("generator")
    if methods.inputs(method) == "features" and space != "feature":
        return (f"it fine-tunes a classifier head on backbone features, and {folder} holds "
                f"images of GENERATOR={made!r}: run notebook 03 with GENERATOR='feature'")
    if methods.inputs(method) == "images" and space == "feature":
        return (f"it trains on images, and {folder} holds backbone features of "
                f"GENERATOR={made!r}: use 'rable-feature' (or rerun notebook 03 with an "
                "image generator: pixel, copy, sd)")
    return None


def runnable_methods(names, run_dir, allow_skip: bool = False
                     ) -> tuple[list[str], dict[str, str]]:
    """Split method ``names`` into those that can run now and {name: reason} for the rest
    (methods that need synthetic samples before notebook 03 made any, or samples of the
    other kind: see :func:`synthetic_problem`).

    A method that cannot run is an error (``ValueError`` giving the reason) unless
    ``allow_skip`` (the ``ALLOW_SKIP`` parameter) says to leave it out.
    """
    validate({"METHODS": list(names)})
    skipped = {}
    for name in names:
        problem = ("synthetic" in methods.data_sources(name)
                   and synthetic_problem(name, run_dir))
        if problem:
            skipped[name] = problem
    if skipped and not allow_skip:
        raise ValueError("; ".join(f"METHODS has {m!r}, which cannot run: {why}"
                                   for m, why in skipped.items())
                         + ". Pass ALLOW_SKIP=True to train the other methods anyway.")
    return [m for m in names if m not in skipped], skipped


def run_method(method: str, P: dict, cifar, progress: bool = True) -> dict:
    """Prepare data, train (resuming), write checkpoint + metrics; returns the metrics."""
    data = prepare_data(P["RUN_DIR"], cifar, method, P["N_TEST_PER_CLASS"], P["SEED"],
                        P.get("SYNTHETIC_LABELS") or "exact", P["DEVICE"], P,
                        1.0 if P.get("SYNTH_WEIGHT") is None else P["SYNTH_WEIGHT"])
    cfg = config_from_params(method, P, cifar.num_classes)
    result = train(cfg, data, P["RUN_DIR"], P["DEVICE"], bool(P.get("COMPILE")),
                   P["CHECKPOINT_EVERY"], P.get("STOP_AFTER"), progress, bool(P.get("GRAPH")))
    if not result["done"]:
        print(f"{method}: stopped after epoch {result['trainer'].epoch}/"
              f"{result['trainer'].total_epochs} "
              "(STOP_AFTER); run again to resume.")
        return {}
    synthetic = generators.read_settings(P["RUN_DIR"]) if data["n_synthetic"] else {}
    marks = (dict(GENERATOR=synthetic.get("generator"), GEN_LABELS=synthetic.get("cond_labels"),
                  synthetic=synthetic) if synthetic else {})
    metrics = finish(result, P["RUN_DIR"], {**P, "dataset": data["dataset_params"], **marks},
                     protocol_name(P, data["dataset_params"]), data["n_synthetic"], data["fields"])
    return metrics
