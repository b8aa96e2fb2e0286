"""Generator backends for the top-up of the rare classes (stage 03), one file each.

``GENERATOR`` picks one by name (``GENERATORS``); every backend implements
``base.Generator`` (``fit``, ``generate``/``sample``), and the one top-up writer of
``topup`` (slot seeds, crash-safe manifest, resume) serves them all (the algorithms:
docs/algorithms.md; adding a backend: docs/architecture.md):

- ``sd``: the report's BLIP-2-caption + Stable Diffusion path (needs real weights a user
  brings; ``tiny`` = an offline random pipeline for tests);
- ``pixel``: a class-conditional flow-matching UNet trained from scratch on the long tail;
- ``gan``: GAN rebalancing as in the SCDL-GAN study, a BAGAN-style class-conditional GAN
  with a gradient penalty (autoencoder first, class Gaussians in its code space), trained from scratch;
- ``copy``: the control — random oversampling of the real images at the same counts;
- ``feature``: LDMLR-style diffusion over the features of a backbone (the ABLE warm-up);
  its samples are feature vectors, for the head fine-tuning of method ``rable-feature``.

Profile defaults: ``smoke`` uses ``pixel`` (a tiny UNet, seconds on a CPU), ``quick`` uses
``copy`` (a CPU cannot sample 37,594 images of a UNet in the quick budget; ``pixel``,
``feature`` and ``gan`` there are opt-in), ``paper`` uses ``sd``, the report's generator
(pass ``-p GENERATOR pixel``, ``feature`` or ``gan`` where no Stable Diffusion weights exist).
The backends trained here share ``fitting`` (resumable step loop, checkpoints, finished
weights, images of any shape or feature vectors). Conditioning labels come from
``rable_nb.conditioning``.
"""
from __future__ import annotations

from .. import captioning, conditioning, config
from . import copy, feature, gan, pixel, sd
from .base import Generator, slot_seed
from .fitting import loss_figure
from ..runfiles import (describe, load_synthetic, manifest_rows, read_settings,
                        synthetic_counts, synthetic_space)
from .topup import REPORT_TOPUP, other_samples, pending, rebalanced_figure, side_by_side, top_up, topup_plan

GENERATORS: dict[str, type[Generator]] = {"sd": sd.SD, "pixel": pixel.Pixel, "gan": gan.Gan,
                                          "copy": copy.Copy, "feature": feature.Feature}

# AUDIT_PER_CLASS: synthetic (and reference test) images audited per class, 0 = all.
# COMPARE_RUNS: other run directories whose synthetic samples notebook 03 shows beside these.
# The warm-up behind GEN_LABELS='pseudo' (WARMUP_*) is shared with notebook 04: its defaults
# are in config.PROFILE_DEFAULTS, its rules in conditioning.WARMUP_RULES.
_COMMON = dict(GEN_LABELS="pseudo", SYNTH_FILTER=False, SYNTH_FILTER_ATTEMPTS=10,
               COMPARE_RUNS=[])
PROFILE_DEFAULTS: dict[str, dict] = {
    "smoke": dict(_COMMON, GENERATOR="pixel", PIXEL_SAMPLE_BATCH=16, AUDIT_PER_CLASS=0,
                  TARGET_PER_CLASS=captioning.PROFILE_DEFAULTS["smoke"]["TARGET_PER_CLASS"]),
    "quick": dict(_COMMON, GENERATOR="copy", PIXEL_SAMPLE_BATCH=256, AUDIT_PER_CLASS=1000),
    "paper": dict(_COMMON, GENERATOR="sd", PIXEL_SAMPLE_BATCH=2048, AUDIT_PER_CLASS=0),
}
for _name, _defaults in PROFILE_DEFAULTS.items():
    _defaults.update({**sd.PROFILE_DEFAULTS[_name], **pixel.PROFILE_DEFAULTS[_name],
                      **feature.PROFILE_DEFAULTS[_name], **gan.PROFILE_DEFAULTS[_name]})


def get(name: str) -> Generator:
    """A new backend by name; ``ValueError`` naming the choices for anything else."""
    if name not in GENERATORS:
        raise ValueError(f"GENERATOR={name!r} is invalid: one of {sorted(GENERATORS)}.")
    return GENERATORS[name]()


def validate(params: dict) -> None:
    """Clear ``ValueError`` for every parameter of the generation stage."""
    captioning.validate({"TARGET_PER_CLASS": params.get("TARGET_PER_CLASS")})
    conditioning.validate(params)
    config.check(params, {
        "GENERATOR": config.one_of(sorted(GENERATORS)),
        "SYNTH_FILTER": config.BOOLEAN, "SYNTH_FILTER_ATTEMPTS": config.integer(1),
        "GEN_STOP_AFTER": config.integer(1), "PIXEL_SAMPLE_BATCH": config.integer(1),
        "AUDIT_PER_CLASS": config.integer(0),
        "COMPARE_RUNS": (lambda v: isinstance(v, list) and all(config.PATH[0](x) for x in v),
                         "a list of run directories (paths), e.g. ['runs/smoke-copy']"),
    })
    sd.validate(params)
    pixel.validate(params)
    feature.validate(params)
    gan.validate(params)


def fit_inputs(generator: Generator, images, backbone, run_dir, info: dict | None = None):
    """What ``generator.fit`` takes: the images themselves, or — for a feature-space backend —
    their features under ``backbone`` (a ``PLLNet``), which is saved to
    ``generator/backbone.safetensors`` (with ``info``) for the head fine-tuning and audit."""
    if generator.space != "feature":
        return images
    if backbone is None:
        raise ValueError(f"GENERATOR={generator.name!r} works on the features of a backbone: "
                         "pass the warm-up network (conditioning.cond_labels(..., "
                         "need_net=True)).")
    feature.save_backbone(backbone, run_dir, info)
    return feature.encode(backbone, images)


def image_generators() -> list[str]:
    """The backends whose samples are images (for methods that train on images)."""
    return [name for name, g in GENERATORS.items() if g.space == "image"]


def topup_settings(generator: Generator, params: dict, cond_info: dict) -> dict:
    """What defines a top-up folder (``synthetic/settings.json``): the backend's parameters,
    seed, target, filter and the conditioning labels (kind, fingerprint, warm-up)."""
    out = dict(generator.settings(params), SEED=params.get("SEED") or 0,
               TARGET_PER_CLASS=params.get("TARGET_PER_CLASS"),
               SYNTH_FILTER=bool(params.get("SYNTH_FILTER")), cond_labels=cond_info["gen_labels"],
               cond_sha1=cond_info["sha1"])
    if params.get("SYNTH_FILTER"):
        out["SYNTH_FILTER_ATTEMPTS"] = params["SYNTH_FILTER_ATTEMPTS"]
    if "warmup" in cond_info:  # its settings and result, not its (varying) wall time
        out["warmup"] = {k: v for k, v in cond_info["warmup"].items() if k != "wall_s"}
    if "accuracy" in cond_info:
        out["accuracy"] = cond_info["accuracy"]
    return out


__all__ = ["GENERATORS", "PROFILE_DEFAULTS", "REPORT_TOPUP", "Generator", "describe",
           "fit_inputs", "get", "image_generators", "load_synthetic", "loss_figure", "manifest_rows",
           "other_samples", "pending", "read_settings", "rebalanced_figure", "side_by_side",
           "slot_seed", "synthetic_counts", "synthetic_space", "top_up", "topup_plan",
           "topup_settings", "validate"]
