"""Backend ``feature``: LDMLR-style latent diffusion over the penultimate features of a
trained backbone (Han et al., CVPR 2024 workshops, "Latent-based diffusion model for
long-tailed recognition"; reported CIFAR-10-LT ρ = 100: CE 72.46 → CE + LDMLR 76.26).

LDMLR encodes the long-tailed training images with a backbone trained on them, fits a
class-conditional diffusion model to the features, samples features of every class and
fine-tunes the classifier head on real + synthetic features with the backbone frozen. Here:

- **Backbone**: the ABLE warm-up network of the conditioning labels
  (``warmup.warmup``: trained on the long-tailed images and their candidate sets,
  never the hidden labels; cached per data set and settings). It also runs for
  ``GEN_LABELS='oracle'``. Its weights are copied to ``generator/backbone.safetensors``, so
  that the head fine-tuning (method ``rable-feature``) and the audit use the same feature
  space. With ``WARMUP_EPOCHS`` = ``EPOCHS`` (and the warm-up's network, batch and learning
  rate equal to notebook 04's) the warm-up is the same training as notebook 04's ``able``:
  the backbone is then the ABLE baseline, as LDMLR's is its CE baseline.
- **Features**: backbone outputs of the un-augmented images (evaluation mode), standardised
  per dimension with the mean and standard deviation of the real training features.
- **Denoiser**: an MLP (``FEATURE_DEPTH`` residual blocks of width ``FEATURE_HIDDEN``);
  the sinusoidal timestep embedding (diffusers ``Timesteps`` + ``TimestepEmbedding``) plus a
  learned class embedding scale and shift every block — LDMLR adds its label embedding to
  the time embedding in the same way (``model/ddpm_conditional.py`` lines 323 and 380;
  its 1-D UNet over the feature vector is replaced by an MLP here).
- **Objective** as LDMLR's (``utilis/diffusion_model.py`` lines 78-90: 1000 steps,
  cosine schedule, x₀-prediction; ``model/ddpm_conditional.py`` lines 434-444, 515-525 and
  691-725):
  diffusers ``DDPMScheduler`` (``squaredcos_cap_v2``, ``prediction_type='sample'``) noises
  x₀ to x_t; the network predicts x₀ with the squared error weighted by min(SNR_t, 5)
  (min-SNR-γ, Hang et al., ICCV 2023). LDMLR's x₀ loss is weighted by the full SNR (the
  ε-prediction loss), which lets the nearly noise-free steps dominate; the cap is our change.
  Conditioning labels: ``GEN_LABELS`` (pseudo or oracle). No classifier-free guidance:
  LDMLR conditions on every step and samples without guidance.
- **Training**: AdamW with warm-up, gradient clipping, EMA weights and per-sample drawing
  weight n_c^(−``FEATURE_BALANCE``) over the conditioning labels (the shared
  ``fitting.StepFit``: exact resume, ``GEN_STOP_AFTER``). LDMLR trains with SGD (lr 1e-4,
  201 epochs) on the natural frequencies without EMA (``utilis/diffusion_model.py`` lines
  123-143); class-balanced draws and EMA are ours, as in the ``pixel`` backend.
- **Sampling**: ``FEATURE_SAMPLER`` = ``ddim`` (diffusers ``DDIMScheduler``, η = 0: the
  sample depends only on its starting noise) or ``ddpm`` (ancestral, LDMLR's sampler with
  ``FEATURE_SAMPLE_STEPS`` = 1000; every step's noise comes from the sample's own
  generator) from noise drawn with the sample's seed. Samples are mapped back to the
  backbone's feature space and clamped per dimension to the range of the real features
  (LDMLR clamps its normalised x₀ to [−1, 1], ``model/ddpm_conditional.py`` lines 593-594).
- **Top-up**: as every backend, the rare classes up to ``TARGET_PER_CLASS`` through the
  shared writer, one ``.npy`` vector per slot under ``synthetic/<class>/`` (LDMLR instead
  adds 20 % of each class's count, ``utilis/diffusion_model.py`` lines 164-183).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .. import config
from ..engine.backbone import encode, load_backbone, save_backbone
from ..engine.networks import pick_device
from ..engine.profiling import three_figures
from .fitting import StepFit, TrainedGenerator, bench_report, time_fit_and_sample

SAMPLERS = ("ddim", "ddpm")
TRAIN_TIMESTEPS = 1000   # LDMLR: timesteps=1000
SNR_CAP = 5.0            # min-SNR-γ weight of the x₀ loss

PROFILE_DEFAULTS = {
    # smoke: a 0.06M-parameter MLP over tiny_cnn's 32-d features, seconds on a CPU.
    "smoke": dict(FEATURE_HIDDEN=64, FEATURE_DEPTH=2, FEATURE_STEPS=60, FEATURE_BATCH=64,
                  FEATURE_CHECKPOINT_EVERY=20, FEATURE_SAMPLER="ddim", FEATURE_SAMPLE_STEPS=10),
    # quick: 1.35M parameters over mini_cnn's 64-d features (LDMLR's ResNet-32 has 64 too):
    # ~9k training and ~800 sampled features/s on one CPU core (bench gen), ~2 + ~1 min.
    "quick": dict(FEATURE_HIDDEN=256, FEATURE_DEPTH=3, FEATURE_STEPS=4000, FEATURE_BATCH=256,
                  FEATURE_CHECKPOINT_EVERY=500, FEATURE_SAMPLER="ddim", FEATURE_SAMPLE_STEPS=50),
    # paper: 7.4M parameters over ResNet-18's 512-d features (not yet run on a GPU).
    "paper": dict(FEATURE_HIDDEN=512, FEATURE_DEPTH=4, FEATURE_STEPS=20000, FEATURE_BATCH=1024,
                  FEATURE_CHECKPOINT_EVERY=2000, FEATURE_SAMPLER="ddim",
                  FEATURE_SAMPLE_STEPS=100),
}
for _p in PROFILE_DEFAULTS.values():
    _p.update(FEATURE_LR=1e-3, FEATURE_EMA=0.9999, FEATURE_BALANCE=1.0)


def validate(params: dict) -> None:
    """Clear ``ValueError`` for bad ``FEATURE_*`` parameters."""
    config.check(params, {
        "FEATURE_HIDDEN": config.integer(8), "FEATURE_DEPTH": config.integer(1),
        "FEATURE_STEPS": config.integer(1), "FEATURE_BATCH": config.integer(1),
        "FEATURE_LR": config.number(0, low_open=True),
        "FEATURE_EMA": config.number(0, 1, high_open=True),
        "FEATURE_BALANCE": config.number(0, 1),
        "FEATURE_CHECKPOINT_EVERY": config.integer(1),
        "FEATURE_SAMPLER": config.one_of(SAMPLERS),
        "FEATURE_SAMPLE_STEPS": (lambda v: config.is_int(v) and 1 <= v <= TRAIN_TIMESTEPS,
                                 f"an integer in [1, {TRAIN_TIMESTEPS}]"),
    })


# --- the denoiser ------------------------------------------------------------------------
class Block(nn.Module):
    """Residual MLP block; the time + class embedding scales and shifts its input."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False)
        self.film = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.mlp = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width), nn.SiLU(),
                                 nn.Linear(2 * width, width))

    def forward(self, h, emb):
        scale, shift = self.film(emb).chunk(2, dim=1)
        return h + self.mlp(self.norm(h) * (1 + scale) + shift)


class Denoiser(nn.Module):
    """x̂₀(x_t, t, c): a class-conditional MLP over D-dimensional feature vectors."""

    def __init__(self, dim: int, num_classes: int, width: int, depth: int):
        super().__init__()
        from diffusers.models.embeddings import TimestepEmbedding, Timesteps

        self.time_proj = Timesteps(width, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embed = TimestepEmbedding(width, width)
        self.label_embed = nn.Embedding(num_classes, width)
        self.inp = nn.Linear(dim, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.out = nn.Sequential(nn.LayerNorm(width), nn.SiLU(), nn.Linear(width, dim))

    def forward(self, x, t, labels):
        emb = self.time_embed(self.time_proj(t).to(x.dtype)) + self.label_embed(labels)
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, emb)
        return self.out(h)


def noise_schedule():
    """LDMLR's training schedule: 1000 steps, cosine, x₀-prediction (diffusers DDPM)."""
    from diffusers import DDPMScheduler
    return DDPMScheduler(num_train_timesteps=TRAIN_TIMESTEPS, beta_schedule="squaredcos_cap_v2",
                         prediction_type="sample", clip_sample=False)


class FeatureTrainer(StepFit):
    """The denoiser's fit on standardised features; ``loss(g)`` is one batch."""

    desc = "feature diffusion"

    def __init__(self, z: np.ndarray, cond_labels, num_classes: int, p: dict, seed: int = 0,
                 device: str = "auto"):
        z = np.asarray(z, np.float32)
        torch.manual_seed(seed)
        model = Denoiser(z.shape[1], num_classes, p["FEATURE_HIDDEN"], p["FEATURE_DEPTH"])
        super().__init__(model, z, cond_labels, num_classes, p, seed, device,
                         lr=p["FEATURE_LR"], steps=p["FEATURE_STEPS"], batch=p["FEATURE_BATCH"],
                         ema=p["FEATURE_EMA"], balance=p["FEATURE_BALANCE"])
        self.schedule = noise_schedule()
        self.alphas = self.schedule.alphas_cumprod.to(self.dev)

    def loss(self, g):
        dev = self.dev
        idx = torch.multinomial(self.w, self.batch, replacement=True, generator=g)
        x0, labels = self.x[idx], self.y[idx]
        noise = torch.randn(x0.shape, device=dev, generator=g)
        t = torch.randint(0, TRAIN_TIMESTEPS, (self.batch,), device=dev, generator=g)
        xt = self.schedule.add_noise(x0, noise, t)
        with self.autocast():
            pred = self.model(xt, t, labels).float()
        snr = self.alphas[t] / (1 - self.alphas[t])
        return (snr.clamp(max=SNR_CAP) * (pred - x0).pow(2).mean(1)).mean()


class Feature(TrainedGenerator):
    """Class-conditional diffusion over backbone features (see the module docstring)."""

    PROFILE_DEFAULTS = PROFILE_DEFAULTS
    validate = staticmethod(validate)

    name, prefix, space = "feature", "FEATURE", "feature"
    REQUIRES, CONTROL = ("diffusers",), "feature-copy"   # cRT: resampled real features
    TINY = dict(FEATURE_HIDDEN=16, FEATURE_DEPTH=1, FEATURE_STEPS=4, FEATURE_BATCH=4,
                FEATURE_CHECKPOINT_EVERY=2, FEATURE_SAMPLE_STEPS=2)
    suffix, batch = ".npy", 1024
    FIT_PARAMS = ("FEATURE_HIDDEN", "FEATURE_DEPTH", "FEATURE_STEPS", "FEATURE_BATCH",
                  "FEATURE_LR", "FEATURE_EMA", "FEATURE_BALANCE", "SEED")
    PARAMS = FIT_PARAMS + ("FEATURE_SAMPLER", "FEATURE_SAMPLE_STEPS")

    def prepare(self, features, cond_labels, params):
        """Per-dimension mean/std (standardisation) and range (clamp) of the real features."""
        validate(params)
        f = np.asarray(features, dtype=np.float32)
        if f.ndim != 2:
            raise ValueError(f"the feature backend fits feature vectors (N×D), not an array of "
                             f"shape {f.shape}: pass the backbone's features "
                             "(its fit_inputs hook).")
        t = torch.as_tensor(f, device=self.dev)
        self.mean, self.std = t.mean(0), t.std(0).clamp_min(1e-3)
        self.low, self.high = t.min(0).values, t.max(0).values
        self.dim = f.shape[1]

    def fit_inputs(self, images, backbone, run_dir, info: dict | None = None):
        """The features of ``images`` under ``backbone`` (the warm-up network), which is saved
        to ``generator/backbone.safetensors`` (with ``info``) for the head fine-tuning and
        the audit."""
        if backbone is None:
            raise ValueError(f"GENERATOR={self.name!r} works on the features of a backbone: "
                             "pass the warm-up network (conditioning.cond_labels(..., "
                             "need_net=True)).")
        save_backbone(backbone, run_dir, info)
        return encode(backbone, images)

    @staticmethod
    def training_inputs(run_dir, images, device: str = "auto"):
        """The run's backbone features of ``images`` and the backbone's weights."""
        net, _ = load_backbone(run_dir, device)
        return encode(net, images), net.state_dict()

    def build_model(self):
        return Denoiser(self.dim, self.num_classes, self.p["FEATURE_HIDDEN"],
                        self.p["FEATURE_DEPTH"])

    def trainer(self, features, cond_labels, params):
        z = (torch.as_tensor(np.asarray(features, np.float32), device=self.dev)
             - self.mean) / self.std
        return FeatureTrainer(z.cpu().numpy(), cond_labels, self.num_classes, params,
                              int(params.get("SEED") or 0), str(self.dev))

    @torch.inference_mode()
    def generate(self, label, seeds):
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        z = torch.stack([torch.randn(self.dim, generator=g) for g in gens]).to(self.dev)
        x = denoise(self.model, z, label, self.p["FEATURE_SAMPLER"],
                    self.p["FEATURE_SAMPLE_STEPS"], gens)
        x = torch.minimum(torch.maximum(x * self.std + self.mean, self.low), self.high)
        return x.cpu().numpy().astype(np.float32), [{} for _ in seeds]

    # --- benchmark ---------------------------------------------------------------------
    @staticmethod
    def bench(profile: str = "smoke", device: str = "auto", batch_sizes=None) -> dict:
        """Training features/s (a full step) and sampling features/s (the profile's sampler and
        steps) of the profile's denoiser on random features of its backbone's width; projects
        the profile's fit time and the report's 37,594-sample top-up."""
        from ..config import PROFILE_DEFAULTS as SHARED_DEFAULTS
        from ..engine.networks import build_backbone

        prof = PROFILE_DEFAULTS[profile]
        dim = build_backbone(SHARED_DEFAULTS[profile]["WARMUP_ARCH"]).feat_dim
        dev = pick_device(device)
        rng = np.random.default_rng(0)
        rows = []
        for b in batch_sizes or [prof["FEATURE_BATCH"]]:
            z = rng.normal(size=(max(4 * b, 1024), dim)).astype(np.float32)
            tr = FeatureTrainer(z, rng.integers(0, 10, len(z)), 10, {**prof, "FEATURE_BATCH": b},
                                device=str(dev))
            noise, steps = torch.randn(b, dim, device=dev), 50 if dev.type == "cuda" else 5
            gens = [torch.Generator().manual_seed(i) for i in range(b)]
            train_s, sample_s = time_fit_and_sample(tr, lambda: denoise(  # noqa: B023
                tr.model, noise, 0, prof["FEATURE_SAMPLER"], prof["FEATURE_SAMPLE_STEPS"], gens),
                steps)
            rows.append(dict(batch_size=b, train_features_per_s=three_figures(steps * b / train_s),
                             sample_features_per_s=three_figures(b / sample_s)))
        return bench_report("feature", profile, tr, rows, "features",
                            prof["FEATURE_STEPS"] * prof["FEATURE_BATCH"], feature_dim=dim,
                            sampler=prof["FEATURE_SAMPLER"],
                            sample_steps=prof["FEATURE_SAMPLE_STEPS"])


def denoise(model, z: torch.Tensor, label: int, sampler: str, steps: int, generators=None):
    """Standardised features x̂₀ of class ``label`` from noise ``z``: ``steps`` steps of the
    DDIM (η = 0) or ancestral DDPM sampler; DDPM's noise comes from ``generators`` (one per
    sample, CPU)."""
    from diffusers import DDIMScheduler, DDPMScheduler

    kind = DDIMScheduler if sampler == "ddim" else DDPMScheduler
    scheduler = kind.from_config(noise_schedule().config)
    scheduler.set_timesteps(steps)
    dev = z.device
    labels = torch.full((len(z),), int(label), device=dev)
    x = z
    for t in scheduler.timesteps:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            pred = model(x, t.to(dev).expand(len(x)), labels).float()
        extra = {"generator": generators} if sampler == "ddpm" else {}
        x = scheduler.step(pred, t, x, **extra).prev_sample
    return x


__all__ = ["Feature", "PROFILE_DEFAULTS", "SAMPLERS", "validate"]
