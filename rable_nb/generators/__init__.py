"""Generator backends for the top-up of the rare classes, one file each (a pure plug-in
folder: stage 03 itself is ``rable_nb/stages/s03_rebalance.py``).

``GENERATOR`` picks one by name (``GENERATORS``); every backend implements
``base.Generator`` (``fit``, ``generate``/``sample``, its parameters' ``PROFILE_DEFAULTS`` and
``validate``, the ``fit_inputs``/``training_inputs`` hooks), and the one top-up writer of
``topup`` (slot seeds, crash-safe manifest, resume) serves them all (the algorithms:
docs/algorithms.md; adding a backend: one file + one line in ``GENERATORS``):

- ``sd``: the report's BLIP-2-caption + Stable Diffusion path (needs real weights a user
  brings; ``tiny`` = an offline random pipeline for tests);
- ``pixel``: a class-conditional flow-matching UNet trained from scratch on the long tail;
- ``gan``: GAN rebalancing as in the SCDL-GAN study, a BAGAN-style class-conditional GAN
  with a gradient penalty (autoencoder first, class Gaussians in its code space), trained from scratch;
- ``copy``: the control — random oversampling of the real images at the same counts;
- ``feature-copy``: its feature-space twin (cRT: resampled real backbone features), the
  control of ``feature``;
- ``noise``: copies with a share of pure-noise images of the class (OPeN);
- ``remix``: each rare-class image mixed with a head-class image, labelled with the rare
  class (Remix's label pushing);
- ``feature``: LDMLR-style diffusion over the features of a backbone (the ABLE warm-up);
  its samples are feature vectors, for the head fine-tuning of method ``rable-feature``.

The backends trained here share ``fitting`` (resumable step loop, checkpoints, finished
weights, images of any shape or feature vectors).
"""
from __future__ import annotations

from ..rundir.runfiles import read_settings
from . import copy, feature, feature_copy, gan, noise, pixel, remix, sd
from .base import Generator, slot_seed
from .topup import REPORT_TOPUP, pending, top_up, topup_plan

GENERATORS: dict[str, type[Generator]] = {"sd": sd.SD, "pixel": pixel.Pixel, "gan": gan.Gan,
                                          "copy": copy.Copy, "feature": feature.Feature,
                                          "feature-copy": feature_copy.FeatureCopy,
                                          "noise": noise.Noise, "remix": remix.Remix}



def profile_defaults(profile: str) -> dict:
    """Every registered backend's parameter defaults for ``profile`` (notebook 03 adds the
    stage's own: ``rebalance.profile_defaults``)."""
    return {k: v for g in GENERATORS.values()
            for k, v in g.PROFILE_DEFAULTS.get(profile, {}).items()}


PROFILE_DEFAULTS = {profile: profile_defaults(profile) for profile in ("smoke", "quick", "paper")}


def knobs() -> dict[str, str]:
    """Every registered backend's notebook parameters (name -> backend): notebook 03 takes
    them without listing them in its parameters cell (``rebalance.plugin_parameters``)."""
    return {k: name for name, g in GENERATORS.items() for k in g.knobs()}


KNOB_TABLE = "docs/generator-parameters.md"   # from the project root


def knob_table() -> str:
    """The text of ``docs/generator-parameters.md``: every backend's parameters with their
    defaults per profile, generated from the registry (a test keeps the file current)."""
    profiles = ("smoke", "quick", "paper")
    rows = ["# Generator parameters", "",
            "Generated from the registry (`rable_nb/generators/`, each backend's "
            "`PROFILE_DEFAULTS`): notebook 03,",
            "`run -p NAME VALUE` and `sweep` take every one of them, though notebook 03's "
            "parameters cell lists none.",
            "Regenerate after changing a backend: `python -c \"from rable_nb import generators "
            "as g; g.write_knob_table()\"`.", "",
            "| parameter | backend | " + " | ".join(profiles) + " |",
            "|---|---|" + "---|" * len(profiles)]
    for name, g in GENERATORS.items():
        for k in g.knobs():
            cells = [f"`{g.PROFILE_DEFAULTS[p][k]!r}`" if k in g.PROFILE_DEFAULTS.get(p, {})
                     else "–" for p in profiles]
            rows.append(f"| `{k}` | `{name}` | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def write_knob_table() -> None:
    """Rewrite ``docs/generator-parameters.md`` from the registry."""
    from ..config import PROJECT_ROOT
    (PROJECT_ROOT / KNOB_TABLE).write_text(knob_table())


def get(name: str) -> Generator:
    """A new backend by name; ``ValueError`` naming the choices for anything else."""
    if name not in GENERATORS:
        raise ValueError(f"GENERATOR={name!r} is invalid: one of {sorted(GENERATORS)}.")
    return GENERATORS[name]()


def validate(params: dict) -> None:
    """Clear ``ValueError`` for a bad value of any backend's parameters."""
    for backend in GENERATORS.values():
        backend.validate(params)


def image_generators() -> list[str]:
    """The backends whose samples are images (for methods that train on images)."""
    return [name for name, g in GENERATORS.items() if g.space == "image"]


def backend_of(run_dir) -> type[Generator]:
    """The backend class whose samples fill ``run_dir/synthetic`` (its hooks give a method
    its inputs); the image backends' base behaviour when the folder names none."""
    return GENERATORS.get(read_settings(run_dir).get("generator"), Generator)


__all__ = ["GENERATORS", "KNOB_TABLE", "PROFILE_DEFAULTS", "REPORT_TOPUP", "Generator",
           "backend_of", "get", "image_generators", "knob_table", "knobs", "pending",
           "profile_defaults", "slot_seed", "top_up", "topup_plan", "validate",
           "write_knob_table"]
