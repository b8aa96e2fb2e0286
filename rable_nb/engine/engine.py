"""The training engine: one trainer for every learning method of ``rable_nb/methods/``.

The trainer owns the loop, the network and optimizer, the N×C confidence table, the data
on the device, checkpoints and logs; what a step computes belongs to the method
(``methods.build(cfg).step``), and the trainer never looks at a method's name. It knows no
run directory and no notebook parameter: stage 04 (``rable_nb/stages/s04_training.py``), the warm-up
(``rable_nb/parts/warmup.py``) and the benchmark (``rable_nb/commands/bench.py``) are its clients.
The uint8 training and test images live on the device; views are augmented there per
batch (``augment.weak_view`` / ``strong_view``). Every ``checkpoint_every`` epochs the
whole state (model, optimizer, confidences, the method's state tensors, history, RNG)
goes to ``<out>/checkpoints/<method>-state.safetensors``; a later call with the same
settings resumes from it and ends with the same numbers as an uninterrupted run. Each
epoch's random draws come from the trainer's generator re-seeded with (seed, epoch), so
resuming needs no hidden state.

Inside an epoch nothing is read back to the host: the loss terms are summed on the device
by the step itself and read once, with the pseudo-label accuracy, when the epoch ends; the
test-set evaluation after it is one more read (``evaluation.evaluate``). On CUDA the
optimizer is the fused SGD with the learning rate as a device tensor, and ``graph=True``
(``GRAPH=True``) replays the whole step as a CUDA graph (``rable_nb/engine/cuda_graph.py``); on CPU
the eager step runs, the reference for both.
"""
from __future__ import annotations

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

from ..rundir import artefacts, jsonl
from .. import config, methods
from . import cuda_graph, evaluation, recipe
from ..methods._losses import uniform_confidence
from .networks import PLLNet, autocast, autocast_dtype, batch_statistics_of, pick_device, standardize, to_unit, used_precision


class NonFiniteLoss(FloatingPointError):
    """The training loss became NaN or infinite; the message names the steps and causes."""


@dataclass
class TrainConfig:
    """Every setting that changes the numbers of a run (compared on resume): the loop's
    settings here, the method's own in ``method_params``.

    ``method`` is a name of ``methods.names()`` (e.g. ``'corr+records+mixup'``);
    ``method_params`` {piece: {param: value}} overrides a method's hyper-parameters (each
    piece's ``params``, e.g. ABLE's ``tau``); after construction it holds every resolved
    value (recorded in metrics and checkpoints).
    ``precision`` (``networks.PRECISIONS``): forward passes in bf16 autocast on CUDA (the
    default) or in fp32 as the official code; on CPU they are fp32 either way.
    """

    method: str = "able"
    arch: str = "tiny_cnn"
    epochs: int = 2
    batch_size: int = 64
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-3
    lr_min: float = 1e-5
    seed: int = 0
    num_classes: int = 10
    method_params: dict = field(default_factory=dict)
    precision: str = "bf16"
    # the short-budget recipe (rable_nb/engine/recipe.py; the quick profile switches it on): the
    # defaults are the published protocols' settings
    schedule: str = "cosine"        # 'cosine' (per epoch) | 'onecycle' (per step)
    warmup_frac: float = 0.25       # onecycle: share of the steps spent warming up
    nesterov: bool = False
    label_smoothing: float = 0.0
    augment: str = "protocol"       # the weak view: 'protocol' | 'light' (flip + 4-px shift)
    strong_augment: str = "protocol"  # the strong view, the same choices
    channels_last: bool = False     # channels_last on CPU too (always on CUDA)

    def __post_init__(self):
        for name in ("epochs", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} must be a positive integer.")
        autocast_dtype("cuda", self.precision)   # ValueError unless one of PRECISIONS
        methods.check(self.method)
        recipe.check(self)
        self.method_params = methods.resolve_params(self.method, self, self.method_params)
        methods.build(self)  # every piece checks its settings now, before any training


class Trainer:
    """Network, optimizer, confidences and method state of one method on one training set.

    ``train_x``: uint8 images (N×H×W×3), or float feature vectors (N×D) of a backbone — then
    every forward pass starts after the backbone (for methods whose ``inputs`` are
    ``"features"``). ``sample_weight`` (N, optional): per-image loss weights handed to the
    method. ``init_weights`` (optional): a network state dict every fresh network starts
    from instead of a random initialisation (e.g. the backbone whose features ``train_x``
    holds). ``graph``: run the steps as CUDA graphs (``cuda_graph.CapturedSteps``); on a
    CPU device it falls back to the eager step (the same computation) with a note.
    ``source`` (N, optional): for a sample made from a training image, that image's row
    (−1 otherwise; read by ``+drs``'s dynamic top-up).
    """

    def __init__(self, cfg: TrainConfig, train_x, candidates, labels, device: str = "auto",
                 compile: bool = False, data_key: str = "", sample_weight=None,
                 graph: bool = False, init_weights: dict | None = None, source=None):
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
        self.views = recipe.views(cfg)
        self.channels_last = self.dev.type == "cuda" or cfg.channels_last
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
        self.source = (None if source is None else
                       torch.as_tensor(np.asarray(source), device=self.dev).long())
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
        if self.channels_last:
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
        self._eager_nets = nets     # passes with masked BatchNorm rows (see forward)
        self.opt = self._optimizer()

    def _optimizer(self) -> torch.optim.SGD:
        """SGD with momentum and weight decay. On CUDA the fused kernel with the learning rate
        as a device tensor: the same update in a few kernels, and a captured step reads each
        epoch's rate from that tensor."""
        cfg, cuda = self.cfg, self.dev.type == "cuda"
        lr = torch.tensor(cfg.lr, dtype=torch.float32, device=self.dev) if cuda else cfg.lr
        return torch.optim.SGD(self._parameters(), lr=lr, momentum=cfg.momentum,
                               nesterov=cfg.nesterov, weight_decay=cfg.weight_decay,
                               fused=cuda or None)

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
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    @property
    def precision(self) -> str:
        """What the forward passes run in: ``'bf16'`` (autocast, CUDA) or ``'fp32'``."""
        return used_precision(self.dev.type, self.cfg.precision)

    def _forward(self, fn, x: torch.Tensor):
        """Network call under autocast at ``cfg.precision`` (bf16 on CUDA by default; fp32
        on CPU); outputs back in fp32 so that the losses, weights and confidence updates are
        computed in full precision."""
        # no weight-cast cache: it must not outlive a CUDA-graph capture, and each pass uses
        # every weight once
        with autocast(self.dev.type, self.cfg.precision, cache_enabled=False):
            out = fn(self._norm(x))
        return tuple(o.float() for o in out) if isinstance(out, tuple) else out.float()

    def forward(self, inputs: dict[str, torch.Tensor], need: str = "logits",
                rows: torch.Tensor | None = None) -> methods.Outputs:
        """One pass over the concatenated image batches ``inputs``; outputs split by name.
        ``rows`` (bool, over the concatenated rows): only these enter BatchNorm's batch
        statistics (``networks.batch_statistics_of``; such a pass runs uncompiled)."""
        names = list(inputs)
        x = torch.cat([inputs[n] for n in names]) if len(names) > 1 else inputs[names[0]]
        fn = self._nets[need] if rows is None else self._eager_nets[need]
        with batch_statistics_of(self.net, rows):
            res = self._forward(fn, x)
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
            schedule=schedule, views=self.views)
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
        steps = n // cfg.batch_size
        lr = recipe.lr_at(cfg, self.epoch - start, 0, steps)
        self._set_lr(lr)
        self.method.start_epoch(self)
        gen = self.epoch_generator(self.epoch)
        order = self.method.epoch_order(self, self.epoch - start, gen)   # e.g. +drs
        if order is None:
            order = torch.randperm(n, device=self.dev, generator=gen)
        per_step = recipe.per_step(cfg)
        terms: dict[str, torch.Tensor] = {}
        self._train_mode()
        t0 = time.time()
        bar = tqdm(range(steps), desc=f"{cfg.method} epoch {self.epoch + 1}/{self.total_epochs}",
                   unit="step", leave=False, disable=not progress)
        for s in bar:
            if per_step and s:
                self._set_lr(recipe.lr_at(cfg, self.epoch - start, s, steps))
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
        bad = [k for k, v in zip(names, read) if not math.isfinite(v)]
        if bad:  # checked on this one read per epoch: the step itself stays free of reads
            first = self.epoch * steps + 1
            raise NonFiniteLoss(
                f"training stopped: the loss term(s) {bad} became non-finite (NaN/inf) within "
                f"steps {first}-{first + steps - 1} (epoch {self.epoch + 1}). Likely cause: "
                "non-finite inputs or weights (a damaged checkpoint, warm-up or synthetic "
                "top-up), or a learning rate too high (or bf16 overflow: try PRECISION='fp32'"
                " or a lower LR). Nothing of this epoch is saved; a checkpoint with "
                "non-finite weights is moved aside when it is loaded.")
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



# -- a whole run --------------------------------------------------------------------------
def train(cfg: TrainConfig, data: dict, out_dir, device: str = "auto", compile: bool = False,
          checkpoint_every: int = 1, stop_after: int | None = None, progress: bool = True,
          graph: bool = False, on_fresh_start=None) -> dict:
    """Train (resuming from ``out_dir/checkpoints/<method>-state.safetensors``) and evaluate.

    ``stop_after``: stop once this many epochs are done in total, counting every stage (to
    split a run across commands). ``data`` may carry ``sample_weight`` (per-image loss
    weights) and ``init_weights`` (the network's starting weights). ``graph``: CUDA-graph
    steps (see :class:`Trainer`). ``on_fresh_start()`` is called when no saved state is
    resumed, before the first epoch (stage 04 drops the stale results of an earlier run
    there). Writes ``logs/<method>.jsonl`` every epoch. Returns a dict with the trainer,
    history, final evaluation (and the test-time-adjusted one when the method has a
    test-time log-prior, e.g. RECORDS), and timing.
    """
    out = Path(out_dir)
    state_path = out / "checkpoints" / f"{cfg.method}-state.safetensors"
    trainer = Trainer(cfg, data["train_x"], data["candidates"], data["labels"], device, compile,
                      data_key=data_fingerprint(data), sample_weight=data.get("sample_weight"),
                      graph=graph, init_weights=data.get("init_weights"),
                      source=data.get("source"))
    resumed = bool(artefacts.load(state_path, trainer.load_state, what="training state",
                                  resumable=True))  # damaged: moved aside, retrained
    if not resumed and on_fresh_start is not None:
        on_fresh_start()
    test_x = torch.as_tensor(np.asarray(data["test_x"]), device=trainer.dev)
    test_y = np.asarray(data["test_y"])

    def evaluate():  # (raw, test-time adjusted or None): one pass, one read
        return evaluation.evaluate(trainer.net, test_x, test_y, data["class_counts"],
                                   trainer.log_prior(), cfg.precision)
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
        jsonl.write(out / "logs" / f"{cfg.method}.jsonl", trainer.history)
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
    """Hash of the training images (or features), candidates, labels (+ sample weights,
    sources and starting weights) and test labels (``artefacts.fingerprint``, named)."""
    arrays = [(key, data.get(key)) for key in ("train_x", "candidates", "labels", "test_y",
                                               "sample_weight", "source")]
    arrays += [(f"init.{k}", v.detach().cpu().numpy())
               for k, v in sorted((data.get("init_weights") or {}).items())]
    arrays = [(key, arr) for key, arr in arrays if arr is not None]
    return artefacts.fingerprint(*(arr for _, arr in arrays),
                                 names=tuple(key for key, _ in arrays))
