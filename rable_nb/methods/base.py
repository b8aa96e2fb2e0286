"""The method interface: a base learning method plus modifiers, composed into one step.

See the package docstring (``rable_nb/methods/__init__.py``) for how to write a method.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..engine import augment
from ._losses import smoothed, soft_cross_entropy

# Views a method can ask for by name (rable_nb/engine/augment.py; the recipe may swap them).
VIEWS: dict[str, Callable] = augment.VIEWS
# What a method trains on: images, or the features of a frozen backbone (see Base.inputs).
INPUTS = ("images", "features")
# What a forward pass returns, cheapest first: logits only; + backbone features;
# + L2-normalised projections (the contrastive head).
OUTPUTS = ("logits", "features", "embed")


@dataclass(frozen=True)
class Stage:
    """A phase of training. The learning rate follows the cosine schedule over
    ``cfg.epochs`` from the first epoch of every stage."""

    name: str
    epochs: int
    fresh_model: bool = False        # new network + optimizer at the start of the stage
    fresh_confidence: bool = False   # confidences back to uniform over the candidates


@dataclass
class Outputs:
    """Network outputs of one forward pass, split by input name (fp32)."""

    logits: dict[str, torch.Tensor]
    feats: dict[str, torch.Tensor]
    proj: dict[str, torch.Tensor]


class Batch:
    """One training batch as a method sees it.

    ``idx`` dataset indices; ``x`` float images in [0, 1] (B×3×H×W, not augmented), or the
    feature vectors (B×D) when the trainer was given features;
    ``cand`` candidate masks (bool); ``conf`` the stored confidences of these images
    (read before this step's update); ``conf_table`` the whole N×C table; ``labels`` the
    hidden true labels (only the supervised baseline and logs may read them); ``weight``
    per-image loss weights or None; ``gen`` the epoch's random generator (draw every random
    number from it, on the device); ``epoch`` the epoch within the current stage and
    ``step`` the step within the stage (host integers: branch on them only as the pieces'
    ``variant`` declares); ``schedule`` the pieces' scheduled numbers of this step (read
    with ``Piece.value``); ``net`` the network; ``forward(inputs, need, rows=None)`` runs the
    network on a dict of image batches in one pass (``need`` one of ``OUTPUTS``) and returns
    :class:`Outputs`; ``rows`` (bool over the concatenated rows) limits BatchNorm's batch
    statistics to those rows (``networks.batch_statistics_of``).
    """

    def __init__(self, *, idx, x, cand, conf, conf_table, labels, weight, gen, epoch, step,
                 stage: str, net, forward, schedule: dict | None = None,
                 views: dict | None = None):
        self.idx, self.x, self.cand, self.conf, self.conf_table = idx, x, cand, conf, conf_table
        self.labels, self.weight, self.gen = labels, weight, gen
        self.epoch, self.step, self.stage, self.net, self.forward = epoch, step, stage, net, forward
        self.schedule = schedule or {}
        self.views = VIEWS if views is None else views   # name -> view (recipe.views)
        self._views: dict[str, torch.Tensor] = {}

    def view(self, name: str) -> torch.Tensor:
        """The augmented view ``name`` of the batch (made on first use, then cached)."""
        if name not in self._views:
            self._views[name] = self.views[name](self.x, generator=self.gen)
        return self._views[name]


class Piece:
    """What bases and modifiers share: hyper-parameters, state, epoch hooks."""

    name = ""
    # Hyper-parameters and their defaults; override with TrainConfig.method_params
    # {piece name: {param: value}}. ``default_params`` may derive defaults from cfg.
    params: dict = {}
    # One rule per hyper-parameter, {param: config rule} (``config.integer(1)``, ...): a
    # value is checked before anything runs (``methods.resolve_params``); every param needs one.
    rules: dict = {}
    # Values of ``params`` for a device check on a few random images (the campaign's
    # ``check_methods``: 2 epochs of 128 images), where a default would not fit, e.g. a
    # queue of 64 batches: {param: value}.
    tiny: dict = {}
    needs = "logits"          # the richest forward output this piece reads (see OUTPUTS)
    data_sources: tuple[str, ...] = ()  # training data beyond the real long tail
    # How the rebalancing study (notebook 09) names what this piece adds: '' nothing (ABLE,
    # the reference), 'generated' (trained on a top-up, which the study describes), or a
    # label. None: a modifier's name; for a base, '<name> (another learner)'.
    approach: str | None = None
    # Notebook parameters that set one of ``params`` ({'SSP_EPOCHS': 'epochs'}): a shortcut
    # for METHOD_PARAMS {name: {param: value}}, applied by stage 04.
    shortcuts: dict[str, str] = {}

    def __init__(self, cfg, params: dict):
        self.cfg, self.p = cfg, params

    @classmethod
    def default_params(cls, cfg) -> dict:
        return dict(cls.params)

    # -- what the step depends on besides tensors (see "capturable step" in __init__.py) ---
    def variant(self, epoch: int, step: int):
        """The host decisions of the step at (``epoch`` within the stage, ``step`` within the
        stage): every branch on ``batch.epoch``/``batch.step`` and every shape that depends
        on them, as one hashable value (None: always the same code). Steps with equal
        variants dispatch the same operations, so one captured CUDA graph serves them."""
        return None

    def schedule(self, epoch: int, step: int) -> dict[str, float | int]:
        """Numbers the step computes with that change from epoch to epoch or step to step
        (ramp-ups, a position in a queue), by name; the step reads them with
        :meth:`value`."""
        return {}

    def value(self, batch: "Batch", name: str):
        """This piece's scheduled number ``name`` for ``batch``: a Python number on the
        eager path, a 0-dim device tensor (float64 or int64, refilled before every replay)
        on the CUDA-graph path — write arithmetic that accepts both."""
        return batch.schedule[f"{self.name}.{name}"]

    def modules(self, net: torch.nn.Module) -> dict[str, torch.nn.Module]:
        """Extra trainable modules (e.g. a rotation head), made with every fresh network:
        the trainer moves them to the device, trains them with the network's optimizer and
        checkpoints them. Keep a reference to use them in the step."""
        return {}

    # -- state: tensors that must survive a checkpoint (device tensors) ------------------
    def init_state(self, trainer) -> None:
        """Create the state tensors at the start of a run. Later updates (in the step and in
        the epoch hooks) write into them in place (``copy_``, ``zero_``, indexed writes): a
        captured CUDA graph keeps reading and writing the tensors it saw at capture."""

    def state(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        for key, value in tensors.items():
            setattr(self, key, value)

    # -- hooks outside the step (may synchronise) -----------------------------------------
    def prepare(self, trainer) -> dict | None:
        """Called once when the trainer is built, after ``init_state`` and before a
        checkpoint is resumed (which then replaces the network's weights): long work before
        the first epoch, e.g. SSP's self-supervised pre-training of the backbone, loaded into
        ``trainer.net``. Returns what the metrics file should record about it (or None)."""
        return None

    def start_stage(self, trainer, stage: Stage) -> None:
        """Called when ``stage`` begins (after a fresh model was built, if it asks for one)."""

    def start_epoch(self, trainer) -> None:
        """Called before every epoch."""

    def end_epoch(self, trainer) -> None:
        """Called after every epoch (e.g. to re-estimate a class prior on the training set)."""


class Base(Piece):
    """A learning method: its views, loss terms and confidence update."""

    views: tuple[str, ...] = ("weak",)   # augmented views the step forwards
    joint_forward = True                 # all inputs in one pass (else one pass each)
    disambiguates = True                 # keeps and updates candidate confidences
    records_compatible = True            # RECORDS may adjust its disambiguation
    mixup_views: tuple[str, ...] = ("weak",)  # views +mixup mixes
    mixup_after_forward = False          # mixup targets need this step's outputs
    # "features": the method trains on the features of a frozen backbone — the trainer is
    # given feature vectors (its data preparation encodes the images with the run's
    # backbone and starts the network from that backbone's weights) and skips the backbone
    # in its forward passes. ``frozen`` names network parts (``PLLNet`` attributes) that
    # keep their weights: left out of the optimizer and kept in evaluation mode.
    inputs = "images"
    frozen: tuple[str, ...] = ()

    def stages(self) -> list[Stage]:
        return [Stage("train", self.cfg.epochs)]

    def losses(self, batch: Batch, out: Outputs, log_prior: torch.Tensor | None):
        """(loss, {name: term}, new confidences of the batch or None).

        ``log_prior`` (C, or None): subtract it from the logits used for disambiguation
        (pseudo-labels, confidence update) — RECORDS supplies it.
        """
        raise NotImplementedError

    # -- what +mixup needs ----------------------------------------------------------------
    def mixup_active(self, batch: Batch) -> bool:
        return True

    def mixup_targets(self, batch: Batch, out: Outputs | None):
        """(targets B×C, per-image mask or None, loss scale) for +mixup. Called before
        the forward pass unless ``mixup_after_forward`` (then after :meth:`losses`)."""
        return batch.conf, None, 1.0

    def target_loss(self, logits: dict[str, torch.Tensor], targets: torch.Tensor,
                    weight: torch.Tensor | None) -> torch.Tensor:
        """The method's classification loss against given soft ``targets`` (mixup)."""
        return soft_cross_entropy(logits[self.mixup_views[0]], targets, weight)

    # -- what +la needs -------------------------------------------------------------------
    def class_prior(self, trainer) -> torch.Tensor:
        """Estimated class distribution of the training set: mean of the confidences."""
        return trainer.conf.mean(0)

    # -- what +drs needs ------------------------------------------------------------------
    def class_scores(self, trainer) -> torch.Tensor:
        """The learner's current class estimate of every training image (N×C, rows sum to
        1): the confidence table by default."""
        return trainer.conf


class Modifier(Piece):
    """A piece added to a base by name (``corr+records``); hooks default to no-ops."""

    @classmethod
    def incompatible(cls, base: type[Base], others: list[str]) -> str | None:
        """A reason why this modifier cannot join the base class ``base`` and the other
        modifiers ``others``, or None."""
        return None

    def extra_inputs(self, method: "Method", batch: Batch) -> dict[str, torch.Tensor]:
        """More images for the main forward pass (e.g. mixed views)."""
        return {}

    def adjust_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Training-time transform of every logit the base sees (e.g. + log prior)."""
        return logits

    def observe(self, method: "Method", batch: Batch, out: Outputs) -> None:
        """Read the outputs before the losses (e.g. a running feature mean)."""

    def disambiguation_log_prior(self, batch: Batch) -> torch.Tensor | None:
        return None

    def test_log_prior(self, trainer) -> torch.Tensor | None:
        """Log-prior subtracted from test logits for the adjusted accuracy, or None."""
        return None

    def extra_loss(self, method: "Method", batch: Batch, out: Outputs):
        """(loss, {name: term}) added to the base's loss, or None."""
        return None

    def epoch_order(self, trainer, epoch: int, gen: torch.Generator) -> torch.Tensor | None:
        """The dataset indices of epoch ``epoch`` (within the stage) in batch order, drawn on
        the device from ``gen`` (e.g. re-sampled by the current labels: ``+drs``), or None
        for the trainer's random permutation. Runs outside the step, before the epoch."""
        return None


class Method:
    """A base and its modifiers, run as one training step (what the trainer calls)."""

    def __init__(self, name: str, base: Base, modifiers: list[Modifier]):
        self.name, self.base, self.modifiers = name, base, modifiers
        self.pieces: list[Piece] = [base, *modifiers]
        self.needs = max((p.needs for p in self.pieces), key=OUTPUTS.index)

    @property
    def disambiguates(self) -> bool:
        return self.base.disambiguates

    def stages(self) -> list[Stage]:
        return self.base.stages()

    def train_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Network logits → the logits the base sees in training (modifiers' transforms)."""
        for m in self.modifiers:
            logits = m.adjust_logits(logits)
        return logits

    def adjust(self, out: Outputs) -> Outputs:
        """:meth:`train_logits` applied to every input of a forward pass."""
        out.logits = {k: self.train_logits(v) for k, v in out.logits.items()}
        return out

    def step(self, batch: Batch):
        """(loss, {name: term}, new confidences or None) of one batch."""
        inputs = {v: batch.view(v) for v in self.base.views}
        for m in self.modifiers:
            inputs.update(m.extra_inputs(self, batch))
        if self.base.joint_forward:
            out = batch.forward(inputs, self.needs)
        else:  # one pass (and one set of BatchNorm statistics) per input
            parts = [batch.forward({k: v}, self.needs) for k, v in inputs.items()]
            out = Outputs(*({k: v for o in parts for k, v in getattr(o, f).items()}
                            for f in ("logits", "feats", "proj")))
        out = self.adjust(out)
        for m in self.modifiers:
            m.observe(self, batch, out)
        log_prior = next((p for m in self.modifiers
                          if (p := m.disambiguation_log_prior(batch)) is not None), None)
        loss, terms, new_conf = self.base.losses(batch, out, log_prior)
        eps = self.base.cfg.label_smoothing
        if eps:
            loss = smoothed(loss, out.logits[self.base.views[0]], eps, batch.weight)
        for m in self.modifiers:
            extra = m.extra_loss(self, batch, out)
            if extra is not None:
                loss = loss + extra[0]
                terms.update(extra[1])
        return loss, terms, new_conf

    def test_log_prior(self, trainer) -> torch.Tensor | None:
        return next((p for m in self.modifiers
                     if (p := m.test_log_prior(trainer)) is not None), None)

    def epoch_order(self, trainer, epoch: int, gen: torch.Generator) -> torch.Tensor | None:
        """The first modifier's :meth:`Modifier.epoch_order`, or None."""
        return next((o for m in self.modifiers
                     if (o := m.epoch_order(trainer, epoch, gen)) is not None), None)

    def variant(self, epoch: int, step: int) -> tuple:
        """Every piece's :meth:`Piece.variant` (steps with equal tuples share a CUDA graph)."""
        return tuple(p.variant(epoch, step) for p in self.pieces)

    def schedule(self, epoch: int, step: int) -> dict[str, float | int]:
        """Every piece's scheduled numbers, as ``'<piece>.<name>'``."""
        return {f"{p.name}.{k}": v for p in self.pieces for k, v in p.schedule(epoch, step).items()}

    # -- modules, state and hooks over every piece ------------------------------------------
    def modules(self, net: torch.nn.Module) -> dict[str, torch.nn.Module]:
        return {f"{p.name}_{k}": m for p in self.pieces for k, m in p.modules(net).items()}

    def state(self) -> dict[str, torch.Tensor]:
        return {f"{p.name}.{k}": v for p in self.pieces for k, v in p.state().items()}

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        for p in self.pieces:
            prefix = f"{p.name}."
            p.load_state({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})

    def init_state(self, trainer) -> None:
        for p in self.pieces:
            p.init_state(trainer)

    def prepare(self, trainer) -> dict:
        """{piece name: what it recorded} of every piece's :meth:`Piece.prepare`."""
        return {p.name: info for p in self.pieces if (info := p.prepare(trainer)) is not None}

    def start_stage(self, trainer, stage: Stage) -> None:
        for p in self.pieces:
            p.start_stage(trainer, stage)

    def start_epoch(self, trainer) -> None:
        for p in self.pieces:
            p.start_epoch(trainer)

    def end_epoch(self, trainer) -> None:
        for p in self.pieces:
            p.end_epoch(trainer)

