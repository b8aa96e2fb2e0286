"""Stage 04 (notebook 04_training): train the chosen methods on the run's data, write the
final checkpoints and ``metrics-<method>.json``.

The loop itself is the engine's (``rable_nb/engine/engine.py``); this stage builds each method's
training data from the run directory (the long tail, + synthetic samples of notebook 03,
+ pseudo-labelled unlabeled images), holds the stage's parameters and profile defaults,
names the protocol, drops the stale results of an earlier run and writes the metrics.
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from ..engine import backbone, engine, evaluation
from ..parts import candidates, unlabeled, warmup
from .. import config, generators, methods
from ..data import longtail
from ..rundir import runfiles
from ..engine.engine import TrainConfig
from ..rundir.feedback import read_feedback
from ..engine.networks import BACKBONES, PRECISIONS, device_name, save_model
from ..parts.warmup import WARMUP_RULES

METHODS = tuple(methods.names())  # every valid method name (see rable_nb/methods)
SYNTHETIC_LABELS = ("exact", "partial", "plausible")
LT_RHO100_IMAGES = 12406  # CIFAR-10-LT, rho = 100, n_max = 5000

# Stage defaults per profile and the protocols' settings: config.TRAINING_DEFAULTS and
# config.PROTOCOL_SETTINGS (there, so that reading results needs no torch).
PROFILE_DEFAULTS = config.TRAINING_DEFAULTS
PROTOCOL_RULE = config.one_of(sorted(config.PROTOCOL_SETTINGS))
FEEDBACK_RULE = (lambda v: config.PATH[0](v) or (isinstance(v, list) and bool(v) and all(
    config.PATH[0](p) for p in v)), "a feedback.jsonl path or a non-empty list of them")


def stage_defaults(protocol: str | None = None) -> dict[str, dict]:
    """``PROFILE_DEFAULTS`` with the paper profile set to ``protocol``'s epochs/batch size."""
    out = {k: dict(v) for k, v in PROFILE_DEFAULTS.items()}
    if protocol is not None:
        config.check({"PROTOCOL": protocol}, {"PROTOCOL": PROTOCOL_RULE})
        out["paper"].update(config.PROTOCOL_SETTINGS[protocol], PROTOCOL=protocol)
    return out


def plausible_candidates(labels, x, run_dir, cifar, threshold: float,
                         warm: warmup.WarmupSettings | None = None, device: str = "auto"):
    """PLL-native labels of synthetic samples: the intended class c plus every class the
    warm-up network (the one behind the conditioning labels, trained with ``warm``; for
    feature vectors, the run's backbone) gives probability ≥ ``threshold``
    (``SYNTH_PLAUSIBLE``) — a generated image of c that looks like a dog may be one, and
    its candidate set says so instead of asserting c."""
    from ..engine.networks import batched_logits
    if np.ndim(x) == 2:  # feature vectors: a feature-space backend's samples
        net, _ = backbone.load_backbone(run_dir, device)
        with torch.inference_mode():
            logits = net.classifier(torch.as_tensor(x, device=next(net.parameters()).device))
    else:
        ds = runfiles.load_dataset(run_dir, cifar)
        _, net, _ = warmup.warmup(cifar.train_x[ds["indices"]], ds["candidates"], cifar, warm,
                                  device)
        logits = batched_logits(net, x)
    probs = torch.softmax(logits.float(), 1).cpu().numpy()
    cand = probs >= threshold
    cand[np.arange(len(labels)), labels] = True
    return cand


def synthetic_candidates(labels: np.ndarray, ds_params: dict, kind: str, cifar, x: np.ndarray,
                         device: str = "auto", run_dir=None, params: dict | None = None
                         ) -> np.ndarray:
    """Candidate sets of synthetic images: one-hot (``exact``), drawn by the generator of
    the real data (``partial``: same PARTIAL/Q/RATE, a different seed) or the intended
    class plus the warm-up's plausible ones (``plausible``: :func:`plausible_candidates`)."""
    if kind not in SYNTHETIC_LABELS:
        raise ValueError(f"SYNTHETIC_LABELS={kind!r} is invalid: choose one of {SYNTHETIC_LABELS}.")
    c = cifar.num_classes
    if kind == "exact":
        return np.eye(c, dtype=bool)[labels]
    if kind == "plausible":
        params = params or {}
        threshold = 0.1 if params.get("SYNTH_PLAUSIBLE") is None else params["SYNTH_PLAUSIBLE"]
        warm = None if np.ndim(x) == 2 else warmup.WarmupSettings.from_params(params)
        return plausible_candidates(labels, x, run_dir, cifar, threshold, warm, device)
    seed = int(ds_params.get("SEED", 0)) + 1
    if ds_params["PARTIAL"] == "uniform":
        return candidates.uniform_candidates(labels, c, float(ds_params["Q"]), seed)
    if np.ndim(x) != 4:
        raise ValueError("SYNTHETIC_LABELS='partial' with PARTIAL='instance' draws candidates "
                         "from a classifier's view of each image; synthetic features have "
                         "none: use SYNTHETIC_LABELS='exact'.")
    info = ds_params["clean_classifier"]
    per_class = None if info["train_images"] >= len(cifar.train_y) else info["train_images"] // c
    net, _ = candidates.clean_classifier(cifar, info["arch"], info["epochs"], info["seed"], device,
                                      per_class)
    probs = candidates.predict_proba(net, x)
    return candidates.instance_candidates(probs, labels, float(ds_params["RATE"]), seed)


def feedback_paths(feedback) -> list[Path]:
    """``FEEDBACK`` (a path or a list of paths, relative to the project) as files; a missing
    one is a ``ValueError`` naming it."""
    paths = [config.project_path(p) for p in ([feedback] if isinstance(feedback, str)
                                              else feedback or [])]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise ValueError(f"FEEDBACK={feedback!r} is invalid: no such file: {', '.join(missing)} "
                         "(the demo saves feedback.jsonl in the run directory it serves).")
    return paths


def feedback_data(feedback, cifar, train_x: np.ndarray) -> dict:
    """The images people labelled in the demo (``FEEDBACK``: one or more ``feedback.jsonl``
    files), as partial-label training data: ``x`` (N×32×32×3 uint8), ``candidates`` (N×C)
    and ``info`` (files, n, sha256 of each image, refused lines) for the metrics.

    Every line and image is checked (``feedback.read_feedback``: damaged or foreign lines are
    refused); then, by the 32×32 pixels, an image of the CIFAR-10 test set is refused
    (training on it would leak the test set), and so is a duplicate: an image already in
    ``train_x`` or given by an earlier line or file. Each refusal names its file and line.
    """

    def key(image):
        return hashlib.sha1(np.ascontiguousarray(image).tobytes()).digest()

    test = {key(img): i for i, img in enumerate(cifar.test_x)}
    seen = {key(img): "the training set" for img in train_x}
    x, cand, sha, refused = [], [], [], []
    paths = feedback_paths(feedback)
    for path in paths:
        rows, bad = read_feedback(path, list(cifar.classes))
        refused += bad
        for row in rows:
            k = key(row["image"])
            if k in test:
                refused.append(f"{row['where']}: CIFAR-10 test image #{test[k]}: training on "
                               "it would leak the test set")
            elif k in seen:
                refused.append(f"{row['where']}: duplicate: the same image as {seen[k]}")
            else:
                seen[k] = row["where"]
                x.append(row["image"])
                cand.append(np.isin(np.arange(cifar.num_classes), row["candidate_ids"]))
                sha.append(row["sha256"])
    info = dict(files=[config.short_path(p) for p in paths], n=len(x), sha256=sha,
                refused=refused)
    return dict(x=np.array(x, np.uint8).reshape(-1, 32, 32, 3),
                candidates=np.array(cand, bool).reshape(-1, cifar.num_classes), info=info)


def feedback_report(feedback, run_dir, cifar) -> str:
    """What ``FEEDBACK`` adds to the run's training set, and each line it refuses."""
    ds = runfiles.load_dataset(run_dir, cifar)
    info = feedback_data(feedback, cifar, cifar.train_x[ds["indices"]])["info"]
    lines = [f"FEEDBACK: {config.plural(info['n'], 'labelled image')} from "
             f"{', '.join(info['files'])} join the training set; "
             f"{config.plural(len(info['refused']), 'line')} refused"]
    return "\n".join(lines + [f"  refused {r}" for r in info["refused"]])


def prepare_data(run_dir, cifar, method: str, n_test_per_class: int, seed: int = 0,
                 synthetic_labels: str = "exact", device: str = "auto",
                 params: dict | None = None, synth_weight: float = 1.0) -> dict:
    """Training images/candidates/labels (+ synthetic ones when the method's
    ``data_sources`` ask for them, e.g. ``rable``; + pseudo-labelled unlabeled ones for
    ``unlabeled``, e.g. ``able+unlabeled``, with the settings in ``params``: see
    ``rable_nb/parts/unlabeled.py``; + the images people labelled in the demo, ``FEEDBACK`` in
    ``params``: :func:`feedback_data`) and the test set.

    A method whose ``inputs`` are ``"features"`` (``rable-feature``) gets the features of the
    run's backbone (``generator/backbone.safetensors``) instead of the images, and
    ``init_weights``, that backbone's network. ``synth_weight`` (``SYNTH_WEIGHT``) is the
    loss weight of every synthetic sample (``sample_weight``: 1 for real ones; left out
    when it is 1). ``source``: each synthetic sample's source row (the manifest's ``source``,
    −1 for real images and samples made from no one image; None without any). ``class_counts`` stays the real long tail's (it defines
    many/medium/few). The labels of added images are their hidden truth, for the logs'
    pseudo-label accuracy only; feedback images have none (-1: counted as misses there).
    """
    ds = runfiles.load_dataset(run_dir, cifar)
    x, cand, y = cifar.train_x[ds["indices"]], ds["candidates"], ds["labels"]
    n_synth, fields, weight, init, source = 0, {"n_unlabeled": 0}, None, None, None
    feedback = (params or {}).get("FEEDBACK")
    if feedback:
        if methods.parse(method)[0] == "supervised":
            raise ValueError(f"{method!r} cannot use FEEDBACK: it trains on true labels, and "
                             "feedback images have a candidate set, no true label.")
        fb = feedback_data(feedback, cifar, x)
        x, cand = np.concatenate([x, fb["x"]]), np.concatenate([cand, fb["candidates"]])
        y = np.concatenate([y.astype(np.int64), np.full(fb["info"]["n"], -1)])  # no truth
        fields.update(n_feedback=fb["info"]["n"], feedback=fb["info"])
    if "unlabeled" in methods.data_sources(method):
        u = unlabeled.pseudo_labelled(
            ds, cifar, unlabeled.UnlabeledSettings.from_params({"SEED": seed, **(params or {})}),
            device)
        x, cand = np.concatenate([x, u["x"]]), np.concatenate([cand, u["candidates"]])
        y = np.concatenate([y, u["hidden"]])
        fields.update(n_unlabeled=u["info"]["n"], unlabeled=u["info"])  # feedback's stay
    synthetic = "synthetic" in methods.data_sources(method)
    problem = synthetic and synthetic_problem(method, run_dir)
    if problem:
        raise ValueError(f"{method!r} cannot run: {problem}")
    if methods.inputs(method) == "features":  # the features of the run's feature backend
        x, init = generators.backend_of(run_dir).training_inputs(run_dir, x, device)
    if synthetic:
        sx, sy, rows = runfiles.load_synthetic(run_dir, True, cifar.num_classes)  # checked
        sc = synthetic_candidates(sy, ds["params"], synthetic_labels, cifar, sx, device,
                                  run_dir, {"SEED": seed, **(params or {})})
        x, cand, y = np.concatenate([x, sx]), np.concatenate([cand, sc]), np.concatenate([y, sy])
        n_synth = len(sy)
        source = sources(len(y) - n_synth, rows)
        if synth_weight != 1:
            weight = np.concatenate([np.ones(len(y) - n_synth), np.full(n_synth, synth_weight)])
    test = longtail.balanced_subset(cifar.test_y, n_test_per_class, seed)
    return dict(train_x=x, candidates=cand, labels=y, test_x=cifar.test_x[test],
                test_y=cifar.test_y[test], class_counts=ds["class_counts"],
                n_synthetic=n_synth, dataset_params=ds["params"], fields=fields,
                sample_weight=weight, init_weights=init, source=source)


def sources(n_before: int, rows: list[dict]) -> np.ndarray | None:
    """The source row of every training sample for ``+drs``'s dynamic top-up: −1 for the
    ``n_before`` images before the synthetic ones, then each manifest row's ``source`` (the
    real image it was made from, −1 without one); None when no row names a source."""
    if not any("source" in r for r in rows):
        return None
    return np.array([-1] * n_before + [int(r.get("source", -1)) for r in rows], np.int64)


def train(cfg: TrainConfig, data: dict, run_dir, device: str = "auto", compile: bool = False,
          checkpoint_every: int = 1, stop_after: int | None = None, progress: bool = True,
          graph: bool = False) -> dict:
    """``engine.train`` into ``run_dir``; a run that starts from scratch first deletes the
    method's final checkpoint and metrics of an earlier run (results of earlier, different
    settings or data must not pass for this one)."""
    def drop_stale():
        out = Path(run_dir)
        for stale in (out / "checkpoints" / f"{cfg.method}.safetensors",
                      out / f"metrics-{cfg.method}.json"):
            stale.unlink(missing_ok=True)
    return engine.train(cfg, data, run_dir, device, compile, checkpoint_every, stop_after,
                        progress, graph, on_fresh_start=drop_stale)


def protocol_name(P: dict, ds_params: dict) -> str:
    """'R' or 'L' when the data and training settings are that protocol's, 'short' for the
    short-budget recipe (the quick profile's own protocol: never compared with published
    numbers), else 'custom'."""
    if (P.get("RECIPE") or "protocol") != "protocol":
        return P["RECIPE"]
    common = (P.get("ARCH") == "resnet18" and ds_params.get("N_MAX") == 5000
              and P.get("LR") == 0.01 and ds_params.get("SEED") == 0)

    def schedule(name):  # the protocol's epochs and batch size (config.PROTOCOL_SETTINGS)
        return all(P.get(k) == v for k, v in config.PROTOCOL_SETTINGS[name].items())
    if (common and ds_params.get("PARTIAL") == "instance" and ds_params.get("RATE") == 0.4
            and ds_params.get("IMBALANCE_FACTOR") == 0.01 and schedule("R")):
        return "R"
    if (common and ds_params.get("PARTIAL") == "uniform" and ds_params.get("Q") in (0.3, 0.5, 0.7)
            and ds_params.get("IMBALANCE_FACTOR") in (0.02, 0.01) and schedule("L")):
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
        # what the forward passes ran in (PRECISION): 'bf16' autocast on CUDA, else 'fp32'
        "precision": trainer.precision,
        "wall_s": result["wall_s"], "images_per_s": result["images_per_s"],
        # the commit(s) that trained the model (a resumed run can span several)
        "commit": ",".join(dict.fromkeys(h.get("commit", "unknown") for h in result["history"])),
    }
    if result["adjusted"] is not None:
        metrics["accuracy_adjusted"] = evaluation.accuracy_block(
            history, result["adjusted"], key="test_acc_adjusted")
    runfiles.write_metrics(run_dir, metrics)
    return metrics


def config_from_params(method: str, P: dict, num_classes: int = 10) -> TrainConfig:
    """TrainConfig from resolved notebook parameters (upper-case names): the pieces'
    notebook shortcuts (:func:`shortcut_rules`) go into ``METHOD_PARAMS``;
    ``PRECISION`` (None: 'bf16')."""
    return TrainConfig(method=method, arch=P["ARCH"], epochs=P["EPOCHS"],
                       batch_size=P["BATCH_SIZE"], lr=float(P.get("LR") or 0.01), seed=P["SEED"],
                       method_params=method_params(P), num_classes=num_classes,
                       precision=P.get("PRECISION") or "bf16",
                       **config.RECIPES[P.get("RECIPE") or "protocol"])


def method_params(P: dict) -> dict:
    """``METHOD_PARAMS`` with the notebook shortcuts the pieces declare applied
    (``SSP_EPOCHS`` sets ``METHOD_PARAMS['ssp']['epochs']``)."""
    out = dict(P.get("METHOD_PARAMS") or {})
    for name, piece in methods.PIECES.items():
        for shortcut, param in piece.shortcuts.items():
            if P.get(shortcut) is not None:
                out[name] = {**out.get(name, {}), param: P[shortcut]}
    return out


# -- notebook helpers ---------------------------------------------------------------------
def shortcut_rules() -> dict:
    """The notebook shortcuts every registered method piece declares (``SSP_EPOCHS``), each
    with the rule of the parameter it sets."""
    return {short: piece.rules[param] for piece in methods.PIECES.values()
            for short, param in piece.shortcuts.items()}


def plugin_parameters() -> list[str]:
    """What notebook 04 takes beyond its parameters cell: the method pieces' shortcuts."""
    return list(shortcut_rules())


def profile_defaults(P: dict) -> dict[str, dict]:
    """This stage's defaults for ``config.resolve``: they depend on ``PROTOCOL``."""
    return stage_defaults(P.get("PROTOCOL"))


def validate(P: dict) -> None:
    """Check this stage's parameters (ValueError with a clear message). With ``P['dataset']``
    (the run's dataset parameters, as the runner passes them), BATCH_SIZE is checked
    against the number of training images."""
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
    config.check(P, {**WARMUP_RULES, **shortcut_rules(), "UNLABELED": config.integer(0),
        "RATIO": config.number(0, low_open=True), "UNLABELED_THRESHOLD": config.number(0, 1),
        "ARCH": config.one_of(sorted(BACKBONES)),
        "PROTOCOL": PROTOCOL_RULE,
        "SYNTHETIC_LABELS": config.one_of(SYNTHETIC_LABELS),
        "LR": config.number(0, low_open=True),
        "CHECKPOINT_EVERY": config.integer(1),
        "STOP_AFTER": config.integer(1),
        "N_TEST_PER_CLASS": config.integer(1),
        "COMPILE": config.BOOLEAN, "GRAPH": config.BOOLEAN,
        "ALLOW_SKIP": config.BOOLEAN, "SYNTH_WEIGHT": config.number(0),
        "SYNTH_PLAUSIBLE": config.number(0, 1, low_open=True),
        "PRECISION": config.one_of(PRECISIONS),
        "FEEDBACK": FEEDBACK_RULE,
    })
    n = longtail.num_images(P.get("dataset") or {})
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
    space = runfiles.synthetic_space(run_dir)
    return ["able", "rable-feature" if space == "feature" else "rable"]


def synthetic_problem(method: str, run_dir) -> str | None:
    """Why ``method``'s synthetic data source is not usable in ``run_dir``, or None: none
    made yet, or samples of the other kind (features for an image method, images for a
    feature method)."""
    space = runfiles.synthetic_space(run_dir)
    folder = Path(run_dir) / "synthetic"
    if space is None:
        plan = runfiles.read_settings(run_dir).get("plan")
        if plan is not None and not sum(plan):
            return (f"notebook 03 planned no synthetic samples ({folder}/settings.json: every "
                    "class already has TARGET_PER_CLASS images, as with IMBALANCE_FACTOR 1), "
                    "so there is nothing to rebalance: raise TARGET_PER_CLASS above the "
                    "largest class, or leave it out of METHODS")
        return f"no synthetic images or features in {folder} yet; run notebook 03 first"
    made = runfiles.read_settings(run_dir).get("generator")
    if methods.inputs(method) == "features" and space != "feature":
        return (f"it fine-tunes a classifier head on backbone features, and {folder} holds "
                f"images of GENERATOR={made!r}: run notebook 03 with GENERATOR='feature'")
    if methods.inputs(method) == "images" and space == "feature":
        return (f"it trains on images, and {folder} holds backbone features of "
                f"GENERATOR={made!r}: use 'rable-feature' (or rerun notebook 03 with an "
                f"image generator: {', '.join(generators.image_generators())})")
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


def method_data(method: str, P: dict, cifar) -> dict:
    """``prepare_data`` for ``method`` under the resolved notebook parameters ``P``."""
    return prepare_data(P["RUN_DIR"], cifar, method, P["N_TEST_PER_CLASS"], P["SEED"],
                        P.get("SYNTHETIC_LABELS") or "exact", P["DEVICE"], P,
                        1.0 if P.get("SYNTH_WEIGHT") is None else P["SYNTH_WEIGHT"])


def run_method(method: str, P: dict, cifar, progress: bool = True, data: dict | None = None,
               protocol: str | None = None, fields: dict | None = None) -> dict:
    """Prepare data (unless ``data`` is given: :func:`method_data`'s), train (resuming),
    write checkpoint + metrics; returns the metrics. ``protocol`` overrides the detected
    protocol name and ``fields`` adds top-level metrics fields (the campaign's shortened
    protocol L)."""
    data = data or method_data(method, P, cifar)
    cfg = config_from_params(method, P, cifar.num_classes)
    result = train(cfg, data, P["RUN_DIR"], P["DEVICE"], bool(P.get("COMPILE")),
                   P["CHECKPOINT_EVERY"], P.get("STOP_AFTER"), progress, bool(P.get("GRAPH")))
    if not result["done"]:
        print(f"{method}: stopped after epoch {result['trainer'].epoch}/"
              f"{result['trainer'].total_epochs} "
              "(STOP_AFTER); run again to resume.")
        return {}
    synthetic = runfiles.read_settings(P["RUN_DIR"]) if data["n_synthetic"] else {}
    marks = (dict(GENERATOR=synthetic.get("generator"), GEN_LABELS=synthetic.get("cond_labels"),
                  synthetic=synthetic) if synthetic else {})
    return finish(result, P["RUN_DIR"], {**P, "dataset": data["dataset_params"], **marks},
                  protocol or protocol_name(P, data["dataset_params"]), data["n_synthetic"],
                  {**data["fields"], **(fields or {})})
