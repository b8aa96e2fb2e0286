"""Learning methods, registered by name: a base method plus modifiers.

A method name is a base followed by modifiers in a fixed order, joined by ``+``:
``corr+records+mixup``, ``able+records``, ``solar+la+mixup``, ``proden+la``. :func:`names`
lists every valid name; :func:`check` explains why a name is not. The equations and
references of every method are in docs/algorithms.md; how to add one in docs/architecture.md.

Bases (one file each): ``able`` (contrastive PLL), ``rable`` (ABLE on long tail +
synthetic images), ``rable-feature`` (the classifier head of a frozen backbone fine-tuned on
real + synthetic features), ``proden``, ``supervised`` (true labels: the upper bound),
``corr`` (consistency regularisation), ``solar`` (Sinkhorn label refinery), ``ssp``
(rotation pre-training of the backbone, then ABLE).
Modifiers (one file each, applied in this order): ``unlabeled`` (real unlabeled images,
pseudo-labelled, join the training data), ``records`` (RECORDS dynamic rebalancing of the
disambiguation; test-time adjusted accuracy too), ``la`` (train-time logit adjustment with
the estimated prior), ``mixup``, ``drs`` (dynamic re-sampling: each epoch's batches drawn
class-balanced by the learner's current labels).

The interface (``base.py``)
---------------------------
The trainer (``rable_nb/engine/engine.py``) owns the network, optimizer, the N×C confidence
table ``trainer.conf``, the candidate masks, the data on the device, checkpoints and logs.
It never looks at a method's name; each step it builds a :class:`base.Batch` and calls
``method.step(batch) -> (loss, terms, new_confidences or None)``, then back-propagates,
steps the optimizer and writes the new confidences into the table.

A **base** (subclass :class:`base.Base`) declares

- ``views``: augmented views it needs (``"weak"``, ``"strong"``, or ``"plain"`` = the
  inputs as they are; see ``base.VIEWS``);
  ``inputs``: ``"images"`` (default) or ``"features"`` (a frozen backbone's features: the
  trainer receives feature vectors and skips the backbone) with ``frozen`` (network parts
  that keep their weights);
  ``joint_forward``: all of them in one pass (default) or one pass each;
  ``needs``: ``"logits"``, ``"features"`` or ``"embed"`` (+ projection head);
- ``losses(batch, out, log_prior) -> (loss, {name: term}, new_conf)``: its loss terms
  (logged per epoch by name; ``loss_cls`` and ``loss_cont`` are plotted) and its
  confidence update, computing disambiguation from logits − ``log_prior`` when a modifier
  supplies one;
- ``disambiguates`` (keeps confidences), ``records_compatible``;
- for ``+mixup``: ``mixup_views``, ``mixup_targets`` (soft targets, optional mask,
  scale), ``target_loss`` (its loss against given targets), ``mixup_active``,
  ``mixup_after_forward``;
- for ``+la``: ``class_prior(trainer)`` (its estimate of the training class distribution);
- ``stages()``: the phases of training (:class:`base.Stage`: epochs, fresh network,
  fresh confidences; e.g. SoLar's prior-estimation stage, a pre-training stage).

A **modifier** (subclass :class:`base.Modifier`) may add inputs to the forward pass
(``extra_inputs``), transform the training logits (``adjust_logits``), read the outputs
(``observe``), supply the disambiguation log-prior and the test-time log-prior, add a loss
term (``extra_loss``), choose the epoch's sample order (``epoch_order``, e.g. re-sampled by
the base's ``class_scores``) and declare combinations it refuses (``incompatible``).

Both may own extra trainable **modules** (``modules(net)``: e.g. a rotation head for
self-supervised pre-training, a second classifier), trained and checkpointed with the
network, and keep **state** tensors (``init_state``/``state``/``load_state``: checkpointed
with the run and restored on resume), read **hyper-parameters** ``self.p`` (declared in
``params``/``default_params(cfg)``, overridden by ``TrainConfig.method_params
{piece: {param: value}}``), ask for extra **training data** (``data_sources``, e.g.
``("synthetic",)``, ``("unlabeled",)``), do long work once before training (``prepare``:
e.g. SSP's pre-training; what it returns is recorded in the metrics file) and hook
**epochs** (``start_stage``, ``start_epoch``, ``end_epoch``: outside the step, free to
synchronise — e.g. re-estimating a prior over the training set).
Per-image loss weights arrive as ``batch.weight`` (None = plain means; see
``_losses.weighted_mean``).

Rules that keep a step capturable in a CUDA graph (``GRAPH=True`` records the whole step —
views, forward, losses, backward, optimizer, confidence update — once and replays it;
``rable_nb/engine/cuda_graph.py``), checked on CPU by ``tests/test_host_sync.py`` (every name
trained under a guard against host reads; replays simulated against eager training):

- nothing read back to the host inside ``step``: no ``.item()``, ``float(tensor)``,
  ``bool(tensor)``, ``.tolist()``, ``.cpu()``, ``nonzero``/boolean indexing, no Python
  branch on a tensor value, no op that checks its input on the host (``F.one_hot`` and
  ``torch.bincount`` do: use ``_losses.one_hot`` / ``class_counts``);
- random numbers drawn on the device from ``batch.gen``;
- a subset of the batch is a mask, never an index: a forward pass over some images only
  keeps all rows and names the others out of BatchNorm (``batch.forward(inputs, need,
  rows=mask)``, exact) and out of the loss (zero weights);
- branch only on host values (``batch.epoch``, ``batch.step``, ``batch.stage``) and declare
  each such branch, and any shape that depends on them, in ``variant(epoch, step)``: a
  replay reruns the code path that was recorded;
- numbers that change between steps or epochs (ramp-ups, queue positions) come from
  ``schedule(epoch, step)`` and are read with ``self.value(batch, name)``: on a replay they
  are device tensors refilled before the step, where a Python number would stay frozen at
  its captured value;
- state tensors are created once (``init_state``) and then updated in place, in the step
  and in the epoch hooks alike (``copy_``, ``zero_``, indexed writes; never
  ``self.x = ...``): a replay reads and writes the memory it recorded. The graph path
  refuses a step that rebinds a tensor while it is being captured.

Epoch hooks run outside the step and may read values back to the host, once per epoch.

Adding a method = one new file here + one line in ``BASES`` or ``MODIFIERS``.
Every setting of a method is a parameter of its piece (``params``; ABLE's ``tau``,
``base_tau``, ``loss_weight``, ``faithful_bug``; RECORDS' ``m``; mixup's ``alpha``), set with
``METHOD_PARAMS`` {piece: {param: value}}; ``TrainConfig`` holds the loop's settings only.
"""
from __future__ import annotations

import difflib
import itertools

from .able import Able
from .base import Base, Batch, Method, Modifier, Outputs, Stage
from .corr import Corr
from .drs import DynamicResampling
from .la import LogitAdjustment
from .mixup import Mixup
from .proden import Proden
from .rable import Rable
from .rable_feature import RableFeature
from .records import Records
from .solar import Solar
from .ssp import Ssp
from .supervised import Supervised
from .unlabeled import Unlabeled

BASES: dict[str, type[Base]] = {
    "able": Able, "rable": Rable, "rable-feature": RableFeature, "proden": Proden,
    "supervised": Supervised, "corr": Corr, "solar": Solar, "ssp": Ssp,
}
MODIFIERS: dict[str, type[Modifier]] = {  # the order in which names list them
    "unlabeled": Unlabeled, "records": Records, "la": LogitAdjustment, "mixup": Mixup,
    "drs": DynamicResampling,
}
PIECES = {**BASES, **MODIFIERS}

__all__ = ["BASES", "MODIFIERS", "Base", "Batch", "Method", "Modifier", "Outputs", "Stage",
           "build", "check", "data_sources", "explain", "inputs", "names", "parse",
           "resolve_params", "tiny_params"]


def parse(name: str) -> tuple[str, list[str]]:
    """``'corr+records+mixup'`` → ``('corr', ['records', 'mixup'])`` (no validation)."""
    base, *mods = str(name).split("+")
    return base, mods


def problem(name: str) -> str | None:
    """Why ``name`` is not a valid method name, or None."""
    base, mods = parse(name)
    if base not in BASES:
        return f"unknown base method {base!r} (bases: {sorted(BASES)})"
    unknown = [m for m in mods if m not in MODIFIERS]
    if unknown:
        return f"unknown modifier(s) {unknown} (modifiers: {list(MODIFIERS)})"
    order = [m for m in MODIFIERS if m in mods]
    if mods != order:
        return (f"modifiers repeat or are out of order; write "
                f"{'+'.join([base, *order])!r}")
    for m in mods:
        reason = MODIFIERS[m].incompatible(BASES[base], [o for o in mods if o != m])
        if reason:
            return reason
    return None


def names() -> list[str]:
    """Every valid method name (bases, then their modifier combinations)."""
    out = []
    for base in BASES:
        for k in range(len(MODIFIERS) + 1):
            for mods in itertools.combinations(MODIFIERS, k):
                name = "+".join([base, *mods])
                if problem(name) is None:
                    out.append(name)
    return out


def explain(name: str) -> str | None:
    """Why ``name`` is invalid, with close matches and every valid name; None if valid."""
    reason = problem(name)
    if reason is None:
        return None
    close = difflib.get_close_matches(str(name), names(), n=3)
    hint = f" Did you mean {close}?" if close else ""
    return f"{reason}.{hint} Valid names: {names()}."


def check(name: str, what: str = "method") -> None:
    """ValueError naming the problem, close matches and every valid name."""
    reason = explain(name)
    if reason is not None:
        raise ValueError(f"{what}={name!r} is invalid: {reason}")


def data_sources(name: str) -> tuple[str, ...]:
    """Training data beyond the real long tail that method ``name`` asks for."""
    check(name)
    base, mods = parse(name)
    return tuple(dict.fromkeys(s for p in [base, *mods] for s in PIECES[p].data_sources))


def inputs(name: str) -> str:
    """What method ``name`` trains on: ``"images"`` or ``"features"`` (see ``Base.inputs``)."""
    check(name)
    return BASES[parse(name)[0]].inputs


def resolve_params(name: str, cfg, overrides: dict | None = None) -> dict:
    """{piece: {param: value}} of ``name``: defaults (from ``cfg``) with ``overrides``
    applied. Overrides for pieces the method lacks are ignored (but checked); unknown
    pieces or parameters, and values that break their piece's ``rules``, raise ValueError."""
    overrides = overrides or {}
    if not isinstance(overrides, dict):
        raise ValueError("method_params must be a dict {piece: {parameter: value}}.")
    for piece, values in overrides.items():
        if piece not in PIECES:
            raise ValueError(f"method_params names unknown piece {piece!r}; "
                             f"choose from {sorted(PIECES)}.")
        if not isinstance(values, dict):
            raise ValueError(f"method_params[{piece!r}]={values!r} must be a dict "
                             "{parameter: value}.")
        known = PIECES[piece].default_params(cfg)
        bad = sorted(set(values) - set(known))
        if bad:
            raise ValueError(f"method_params[{piece!r}] has unknown parameter(s) {bad}; "
                             f"{piece} takes {sorted(known)}.")
        check_values(piece, values)
    base, mods = parse(name)
    return {p: {**PIECES[p].default_params(cfg), **overrides.get(p, {})} for p in [base, *mods]}


def tiny_params() -> dict[str, dict]:
    """{piece: its ``tiny`` settings} of every piece that has them (a device check's
    ``method_params``)."""
    return {name: dict(cls.tiny) for name, cls in PIECES.items() if cls.tiny}


def check_values(piece: str, values: dict) -> None:
    """``ValueError`` naming the first of ``values`` that breaks its rule in ``PIECES[piece]
    .rules`` (a parameter without a rule is refused: every parameter must have one)."""
    rules = PIECES[piece].rules
    for param, value in values.items():
        if param not in rules:
            raise ValueError(f"{piece}.{param} has no rule ({PIECES[piece].__name__}"
                             ".rules): every piece parameter needs one.")
        ok, allowed = rules[param]
        if not ok(value):
            raise ValueError(f"{piece}.{param} must be {allowed}, not {value!r}.")


def build(cfg) -> Method:
    """The composed method of ``cfg.method`` with ``cfg.method_params``."""
    check(cfg.method)
    base, mods = parse(cfg.method)
    params = resolve_params(cfg.method, cfg, cfg.method_params)
    return Method(cfg.method, BASES[base](cfg, params[base]),
                  [MODIFIERS[m](cfg, params[m]) for m in mods])
