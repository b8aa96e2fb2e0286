"""Backend ``gan``: GAN rebalancing as in the SCDL-GAN study — a BAGAN-style
class-conditional GAN (Mariani et al., 2018) with a gradient penalty, trained from scratch on the long-tailed
images; optionally the SCDL-GAN autoencoder (``GAN_AE='scdl'``).

Which part follows which source (code read, not copied: IBM/BAGAN ``balancing_gan.py`` at
b57fc15; GH920/improved-bagan-gp ``codes/improved_bagan_gp.py`` at 57a2e3a, "BAGAN-GP"):

1. **Autoencoder on all long-tailed images** (BAGAN ``init_autoenc``, lines 365-373; MSE
   loss, lines 239-242): encoder = convolutional trunk + linear code of ``GAN_LATENT``
   dimensions (BAGAN lines 81-128), decoder = linear map + transposed convolutions with
   batch norm and LeakyReLU 0.2, tanh output (BAGAN-GP ``decoder``, lines 91-127). The trunk
   has 4×4 stride-2 convolutions with LeakyReLU 0.2 and *no* normalisation (BAGAN-GP
   ``encoder``, lines 130-163: no batch norm in a discriminator that gets a gradient
   penalty). No labels are used in this phase (``'bagan'``).
2. **Class-conditional latent Gaussians** (BAGAN lines 389-403 fit ``np.cov`` and the mean
   of the codes of each class; sampling lines 151-157): fitted on the codes of the images
   of each *conditioning* label (``GEN_LABELS``: pseudo-labels or the oracle, see
   ``rable_nb.parts.conditioning``). Deviation: the covariance is the Ledoit-Wolf shrinkage
   estimate (scikit-learn), because a rare class has fewer images than code dimensions (50
   images at ρ = 100, 128 dimensions), where ``np.cov`` is singular; a class with a single
   image gets the pooled within-class covariance.
3. **Generator = decoder, discriminator = encoder trunk + a (C+1)-way head** (BAGAN lines
   130-140 and 383-387: the head sits on the trunk's features, the last class is "fake").
   Discriminator loss: cross-entropy of real images towards their conditioning class and of
   generated images towards "fake", weighted C/(C+1) and 1/(C+1) (BAGAN ``_train_one_epoch``,
   lines 268-280, adds ⌈B/C⌉ fakes to B real images so that the C + 1 classes are about
   equally frequent; we draw B fakes, in the generator's training mode as in its update, and
   weight them instead); generator loss: cross-entropy of generated images towards their
   intended class (lines 282-287). Real batches are class-balanced over the conditioning
   labels (weight 1/n_c) and the intended classes uniform (BAGAN's ``'uniform'`` ratios);
   real images are randomly mirrored.
4. **Gradient penalty** (Gulrajani et al., 2017, as BAGAN-GP lines 315-335 apply it to a
   cross-entropy discriminator, weight ``GAN_GP`` = 10 as its line 299):
   λ·E[(‖∇ₓ s(x̂)‖₂ − 1)²] at x̂ = εx_real + (1 − ε)x_fake, ε ~ U(0, 1) (BAGAN-GP draws ε
   from N(0, 1), line 322; we follow WGAN-GP), where s(x) = logsumexp_c ℓ_c(x) − ℓ_fake(x)
   is the discriminator's real-vs-fake log-odds. ``GAN_CRITIC`` discriminator updates per
   generator update (BAGAN 1, line 264-287; BAGAN-GP 5, line 87). Adam lr ``GAN_LR`` = 2e-4,
   β = (0.5, 0.9) for every network (BAGAN-GP lines 403-409).
5. **SCDL-GAN switch** (``GAN_AE='scdl'``; SCDL-GAN's two additions to BAGAN,
   no public code read): the autoencoder phase adds a supervised contrastive term (Khosla et
   al., 2020, temperature 0.1) on the L2-normalised codes with the conditioning labels, and
   the Wasserstein-autoencoder penalty of WAE-MMD (Tolstikhin et al., 2018: MMD with the
   inverse multiquadratic kernel, C = 2·dim, between the codes and N(0, I)), so the class
   Gaussians of step 2 are compact and separated.

Images of any size and channel count train through the same code (CIFAR-10 32×32×3,
Fashion-MNIST 28×28×1; sides padded by reflection to a multiple of 2^levels and cropped
back). Every ``GAN_CHECKPOINT_EVERY`` steps and at the end of the autoencoder phase the whole
state (networks, three Adam optimizers, Gaussians, step, losses) goes to
``generator/gan-state.safetensors``; each step's randomness comes from a generator seeded
by (SEED, step), so a resumed fit ends with the same weights as an uninterrupted one
(``GEN_STOP_AFTER`` counts autoencoder + GAN steps). The finished generator and Gaussians go
to ``generator/gan.safetensors``. bf16 autocast on CUDA (not yet run on a GPU). A sample is
the generator (batch norm in evaluation mode) applied to μ_c + L_c·ε with ε drawn from the
sample's own seed, so it depends only on its slot.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import config
from ..engine.networks import pick_device
from ..engine.profiling import three_figures, timed
from .fitting import StepTrainer, TrainedGenerator, bench_report, crop_to, pad_to_multiple, padded_size, prefixed, time_fit_and_sample, to_signed, to_uint8, unprefixed

AUTOENCODERS = ("bagan", "scdl")
BETAS = (0.5, 0.9)
LEAK = 0.2
SUPCON_TAU = 0.1  # temperature of the supervised contrastive term ('scdl')

PROFILE_DEFAULTS = {
    # smoke: 34k parameters, 40 autoencoder + 20 GAN steps of 16 images: < 1 s on a CPU core.
    "smoke": dict(GAN_CHANNELS=[8, 16], GAN_LATENT=8, GAN_AE_STEPS=40, GAN_STEPS=20,
                  GAN_BATCH=16, GAN_CHECKPOINT_EVERY=10),
    # quick: 0.62M parameters; one CPU core: 1.1k autoencoder and 0.37k GAN img/s
    # (docs/decisions.md), so 2k + 2k steps of 64 take ~8 min and the 37,594-image top-up ~7 s.
    "quick": dict(GAN_CHANNELS=[32, 64, 128], GAN_LATENT=64, GAN_AE_STEPS=2000,
                  GAN_STEPS=2000, GAN_BATCH=64, GAN_CHECKPOINT_EVERY=500),
    # paper: 7.45M parameters at 32×32 (DCGAN-sized), 6k autoencoder steps (124 epochs of
    # CIFAR-10-LT) + 20k GAN steps (413 epochs) of 256 images: <= 20 min on one H100 by the
    # projection in docs/decisions.md (unmeasured: `bench gen --generator gan --profile paper`).
    "paper": dict(GAN_CHANNELS=[128, 256, 512], GAN_LATENT=128, GAN_AE_STEPS=6000,
                  GAN_STEPS=20000, GAN_BATCH=256, GAN_CHECKPOINT_EVERY=1000),
}
for _p in PROFILE_DEFAULTS.values():
    _p.update(GAN_AE="bagan", GAN_LR=2e-4, GAN_GP=10.0, GAN_CRITIC=1)


def validate(params: dict) -> None:
    """Clear ``ValueError`` for bad ``GAN_*`` parameters."""
    config.check(params, {
        "GAN_CHANNELS": (lambda v: isinstance(v, (list, tuple)) and len(v) >= 1
                         and all(config.is_int(c) and c >= 1 for c in v),
                         f"a non-empty list of channel counts per level (e.g. "
                         f"{PROFILE_DEFAULTS['smoke']['GAN_CHANNELS']})"),
        "GAN_LATENT": config.integer(2),
        "GAN_AE": config.one_of(AUTOENCODERS),
        "GAN_AE_STEPS": config.integer(1),
        "GAN_STEPS": config.integer(0),
        "GAN_BATCH": config.integer(2),
        "GAN_LR": config.number(0, low_open=True),
        "GAN_GP": config.number(0),
        "GAN_CRITIC": config.integer(1),
        "GAN_CHECKPOINT_EVERY": config.integer(1),
    })


# --- networks --------------------------------------------------------------------------
class Encoder(nn.Module):
    """Trunk (4×4 stride-2 convolutions + LeakyReLU, no normalisation) → features; a linear
    map → the code. The discriminator shares the trunk (see the module docstring)."""

    def __init__(self, image_shape, channels, latent: int):
        super().__init__()
        h, w, c = image_shape
        self.multiple = 2 ** len(channels)
        layers = []
        for cin, cout in zip([c, *channels], channels):
            layers += [nn.Conv2d(cin, cout, 4, 2, 1), nn.LeakyReLU(LEAK)]
        self.trunk = nn.Sequential(*layers, nn.Flatten())
        self.feat_dim = (channels[-1] * padded_size(h, self.multiple) // self.multiple
                         * padded_size(w, self.multiple) // self.multiple)
        self.code = nn.Linear(self.feat_dim, latent)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(pad_to_multiple(x, self.multiple))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.code(self.features(x))


class Decoder(nn.Module):
    """Code → linear map to the smallest grid → transposed convolutions (batch norm,
    LeakyReLU) doubling the size per level → tanh image, cropped to the data's size."""

    def __init__(self, image_shape, channels, latent: int):
        super().__init__()
        h, w, c = image_shape
        multiple, top = 2 ** len(channels), channels[-1]
        self.size, self.grid = (h, w), (top, padded_size(h, multiple) // multiple,
                                        padded_size(w, multiple) // multiple)
        self.fc = nn.Sequential(nn.Linear(latent, math.prod(self.grid)), nn.LeakyReLU(LEAK))
        rev, layers = channels[::-1], []
        for cin, cout in zip(rev, rev[1:]):
            layers += [nn.ConvTranspose2d(cin, cout, 4, 2, 1), nn.BatchNorm2d(cout),
                       nn.LeakyReLU(LEAK)]
        self.up = nn.Sequential(*layers, nn.ConvTranspose2d(rev[-1], c, 4, 2, 1), nn.Tanh())

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return crop_to(self.up(self.fc(z).view(-1, *self.grid)), *self.size)


def supcon(codes: torch.Tensor, labels: torch.Tensor, tau: float = SUPCON_TAU) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al., 2020, L_out) of L2-normalised codes:
    anchors without a positive in the batch are left out."""
    z = F.normalize(codes, dim=1)
    n = len(z)
    self_mask = torch.eye(n, dtype=torch.bool, device=z.device)
    logits = (z @ z.T / tau).masked_fill(self_mask, float("-inf"))
    log_prob = logits.log_softmax(1).masked_fill(self_mask, 0.0)
    pos = (labels[:, None] == labels[None, :]) & ~self_mask
    n_pos = pos.sum(1)
    per_anchor = -(log_prob * pos).sum(1) / n_pos.clamp(min=1)
    return (per_anchor * (n_pos > 0)).sum() / (n_pos > 0).sum().clamp(min=1)


def mmd_imq(codes: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """Unbiased MMD² between codes and prior samples with the inverse multiquadratic kernel
    k(x, y) = C / (C + ‖x − y‖²), C = 2·dim (WAE-MMD, Tolstikhin et al., 2018)."""
    n, scale = len(codes), 2.0 * codes.shape[1]
    off = ~torch.eye(n, dtype=torch.bool, device=codes.device)

    def k(a, b):
        return scale / (scale + torch.cdist(a, b).pow(2))
    return (k(codes, codes)[off].mean() + k(prior, prior)[off].mean()
            - 2 * k(codes, prior).mean())


def class_gaussians(codes: np.ndarray, labels: np.ndarray, num_classes: int):
    """(means C×L, Cholesky factors C×L×L, has-images mask) of the codes of each class:
    Ledoit-Wolf covariances; a class with one image gets the pooled within-class one."""
    from sklearn.covariance import ledoit_wolf

    dim = codes.shape[1]
    means, covs = np.zeros((num_classes, dim)), np.zeros((num_classes, dim, dim))
    present = np.bincount(labels, minlength=num_classes) > 0
    centred = []
    for c in np.flatnonzero(present):
        members = codes[labels == c]
        means[c] = members.mean(0)
        centred.append(members - means[c])
        if len(members) > 1:
            covs[c] = ledoit_wolf(members)[0]
    pooled = ledoit_wolf(np.concatenate(centred), assume_centered=True)[0]
    for c in np.flatnonzero(present & (np.bincount(labels, minlength=num_classes) == 1)):
        covs[c] = pooled
    jitter = 1e-6 * np.trace(pooled) / dim * np.eye(dim)
    chol = np.stack([np.linalg.cholesky(cov + jitter) if ok else np.zeros((dim, dim))
                     for cov, ok in zip(covs, present)])
    return means, chol, present


# --- training --------------------------------------------------------------------------
class GanTrainer(StepTrainer):
    """Autoencoder phase (``GAN_AE_STEPS``), class Gaussians, then the GAN phase
    (``GAN_STEPS``); ``step()`` is one step of the current phase."""

    desc = "gan (autoencoder, then GAN)"

    def __init__(self, images, cond_labels, num_classes: int, p: dict, seed: int = 0,
                 device: str = "auto"):
        super().__init__(images, cond_labels, num_classes, p, seed, device)
        self.ae_steps, self.batch = p["GAN_AE_STEPS"], p["GAN_BATCH"]
        self.total_steps = self.ae_steps + p["GAN_STEPS"]
        self.marks = (self.ae_steps,)
        shape = np.asarray(images).shape[1:]
        torch.manual_seed(seed)
        self.enc = Encoder(shape, p["GAN_CHANNELS"], p["GAN_LATENT"]).to(self.dev)
        self.dec = Decoder(shape, p["GAN_CHANNELS"], p["GAN_LATENT"]).to(self.dev)
        self.head = nn.Linear(self.enc.feat_dim, num_classes + 1).to(self.dev)
        self.networks = {"enc": self.enc, "dec": self.dec, "head": self.head}
        groups = {"ae": [*self.enc.parameters(), *self.dec.parameters()],
                  "d": [*self.enc.trunk.parameters(), *self.head.parameters()],
                  "g": list(self.dec.parameters())}
        self.optimizers = {f"optim_{k}": (torch.optim.Adam(v, lr=p["GAN_LR"], betas=BETAS), v)
                           for k, v in groups.items()}
        latent = p["GAN_LATENT"]
        self.means = torch.zeros(num_classes, latent, device=self.dev)
        self.chol = torch.zeros(num_classes, latent, latent, device=self.dev)
        self.present = torch.zeros(num_classes, dtype=torch.bool, device=self.dev)

    # -- pieces ---------------------------------------------------------------------------
    def real(self, idx: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """Training images ``idx`` in [−1, 1], each mirrored with probability 1/2."""
        x = to_signed(self.x[idx])
        flip = torch.rand(len(idx), device=self.dev, generator=g) < 0.5
        return torch.where(flip[:, None, None, None], x.flip(3), x)

    def discriminate(self, x: torch.Tensor) -> torch.Tensor:
        """(C + 1)-way logits in fp32 (the last: fake)."""
        with self.autocast():
            return self.head(self.enc.features(x)).float()

    def latent(self, labels: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """Codes drawn from the class Gaussians of ``labels``."""
        eps = torch.randn(len(labels), self.means.shape[1], 1, device=self.dev, generator=g)
        return self.means[labels] + (self.chol[labels] @ eps)[..., 0]

    def generate(self, labels: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        with self.autocast():
            return self.dec(self.latent(labels, g)).float()

    def penalty(self, real: torch.Tensor, fake: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """E[(‖∇ s(x̂)‖ − 1)²] at random interpolates x̂ of real and fake images."""
        eps = torch.rand(len(real), 1, 1, 1, device=self.dev, generator=g)
        mix = (eps * real + (1 - eps) * fake).requires_grad_(True)
        logits = self.discriminate(mix)
        score = logits[:, :-1].logsumexp(1) - logits[:, -1]
        grad, = torch.autograd.grad(score.sum(), mix, create_graph=True)
        return (grad.flatten(1).norm(dim=1) - 1).pow(2).mean()

    def _update(self, name: str, loss: torch.Tensor) -> None:
        opt, _ = self.optimizers[f"optim_{name}"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    # -- steps ----------------------------------------------------------------------------
    def update(self, g: torch.Generator) -> dict:
        return self.ae_step(g) if self.step_no < self.ae_steps else self.gan_step(g)

    def step(self) -> dict:
        """One step of the current phase; the class Gaussians after the last autoencoder step."""
        losses = super().step()
        if self.step_no == self.ae_steps:
            self.fit_gaussians()
        return losses

    def ae_step(self, g: torch.Generator) -> dict:
        idx = torch.randint(0, len(self.x), (self.batch,), device=self.dev, generator=g)
        x = self.real(idx, g)
        with self.autocast():
            codes = self.enc(x)
            rec = self.dec(codes)
        codes = codes.float()
        losses = {"ae_mse": F.mse_loss(rec.float(), x)}
        if self.p["GAN_AE"] == "scdl":
            prior = torch.randn(codes.shape, device=self.dev, generator=g)
            losses.update(supcon=supcon(codes, self.y[idx]), mmd=mmd_imq(codes, prior))
        self._update("ae", sum(losses.values()))
        return {k: v.detach() for k, v in losses.items()}

    def gan_step(self, g: torch.Generator) -> dict:
        b, c = self.batch, self.num_classes
        fake_share = 1 / (c + 1)  # BAGAN: ⌈B/C⌉ fakes beside B real images
        fake_class = torch.full((b,), c, device=self.dev)
        for _ in range(self.p["GAN_CRITIC"]):
            idx = torch.multinomial(self.w, b, replacement=True, generator=g)
            real = self.real(idx, g)
            with torch.no_grad():
                fake = self.generate(torch.randint(0, c, (b,), device=self.dev, generator=g), g)
            logits = self.discriminate(torch.cat([real, fake]))
            d_ce = ((1 - fake_share) * F.cross_entropy(logits[:b], self.y[idx])
                    + fake_share * F.cross_entropy(logits[b:], fake_class))
            gp = self.penalty(real, fake, g)
            self._update("d", d_ce + self.p["GAN_GP"] * gp)
        intended = torch.randint(0, c, (b,), device=self.dev, generator=g)
        d_params = self.optimizers["optim_d"][1]
        for p in d_params:
            p.requires_grad_(False)
        g_ce = F.cross_entropy(self.discriminate(self.generate(intended, g)), intended)
        self._update("g", g_ce)
        for p in d_params:
            p.requires_grad_(True)
        return {"d_ce": d_ce.detach(), "gp": gp.detach(), "g_ce": g_ce.detach()}

    @torch.no_grad()
    def fit_gaussians(self) -> None:
        """Class Gaussians of the codes of every training image (no mirroring)."""
        codes = torch.cat([self.enc(to_signed(self.x[i:i + 1024])).float()
                           for i in range(0, len(self.x), 1024)]).double().cpu().numpy()
        means, chol, present = class_gaussians(codes, self.y.cpu().numpy(), self.num_classes)
        self.means.copy_(torch.as_tensor(means))
        self.chol.copy_(torch.as_tensor(chol))
        self.present.copy_(torch.as_tensor(present))

    # -- state ----------------------------------------------------------------------------
    def gaussians(self) -> dict:
        return {"means": self.means, "chol": self.chol, "present": self.present}

    def state(self) -> tuple[dict, dict]:
        return self.gaussians(), {}

    def restore(self, tensors: dict, extra: dict) -> None:
        for name, t in self.gaussians().items():
            t.copy_(tensors[name])

    def finished(self) -> dict:
        """The generator and the class Gaussians: what sampling needs."""
        return {**prefixed("dec", self.dec.state_dict()), **self.gaussians()}


class Gan(TrainedGenerator):
    """BAGAN-style class-conditional GAN with a gradient penalty (module docstring)."""

    PROFILE_DEFAULTS = PROFILE_DEFAULTS
    validate = staticmethod(validate)

    name, prefix = "gan", "GAN"
    REQUIRES, CONTROL = ("sklearn",), "copy"
    TINY = dict(GAN_CHANNELS=[4, 8], GAN_LATENT=4, GAN_AE_STEPS=3, GAN_STEPS=3, GAN_BATCH=6,
                GAN_CHECKPOINT_EVERY=2)
    FIT_PARAMS = ("GAN_CHANNELS", "GAN_LATENT", "GAN_AE", "GAN_AE_STEPS", "GAN_STEPS",
                  "GAN_BATCH", "GAN_LR", "GAN_GP", "GAN_CRITIC", "SEED")
    PARAMS = FIT_PARAMS
    batch = 256

    def prepare(self, images, cond_labels, params: dict) -> None:
        validate(params)

    def trainer(self, images, cond_labels, params: dict) -> GanTrainer:
        return GanTrainer(images, cond_labels, self.num_classes, params,
                          int(params.get("SEED") or 0), str(self.dev))

    def load_weights(self, tensors: dict) -> None:
        """The generator (batch norm in evaluation mode) and the class Gaussians."""
        dec = Decoder(self.data_shape, self.p["GAN_CHANNELS"], self.p["GAN_LATENT"])
        dec.load_state_dict(unprefixed("dec", tensors))
        self.dec = dec.to(self.dev).eval()
        self.means, self.chol, self.present = (tensors[k].to(self.dev)
                                               for k in ("means", "chol", "present"))

    @torch.inference_mode()
    def generate(self, label, seeds):
        if not bool(self.present[int(label)]):
            raise ValueError(
                f"class {label} has no training image with this conditioning label, so the GAN "
                "has no latent Gaussian to draw it from: with GEN_LABELS='pseudo' the warm-up "
                "assigned no image to it (raise WARMUP_EPOCHS, or use GEN_LABELS='oracle' as "
                "an ablation).")
        eps = torch.stack([torch.randn(self.means.shape[1], generator=torch.Generator()
                                       .manual_seed(int(s))) for s in seeds]).to(self.dev)
        z = self.means[int(label)] + eps @ self.chol[int(label)].T
        with torch.autocast(self.dev.type, dtype=torch.bfloat16, enabled=self.dev.type == "cuda"):
            images = self.dec(z)
        return to_uint8(images), [{} for _ in seeds]

    # --- benchmark ---------------------------------------------------------------------
    @staticmethod
    def bench(profile: str = "smoke", device: str = "auto", batch_sizes=None) -> dict:
        """Training img/s of an autoencoder step and of a GAN step (``GAN_CRITIC``
        discriminator updates with the gradient penalty + one generator update; real images per
        second), their mix over the profile's fit (``train_images_per_s``) and sampling img/s
        of the profile's networks on random 32×32×3 data; projects the profile's fit time and
        the report's 37,594-image top-up."""
        prof = PROFILE_DEFAULTS[profile]
        dev = pick_device(device)
        rng = np.random.default_rng(0)
        rows = []
        for b in batch_sizes or [prof["GAN_BATCH"]]:
            images = rng.integers(0, 256, (max(4 * b, 512), 32, 32, 3), dtype=np.uint8)
            p = {**prof, "GAN_BATCH": b, "GAN_AE_STEPS": 1, "GAN_STEPS": 10 ** 9}
            tr = GanTrainer(images, rng.integers(0, 10, len(images)), 10, p, device=str(dev))
            steps = 20 if dev.type == "cuda" else 2
            tr.step()  # the autoencoder phase's one step (a warm-up), then the Gaussians
            ae_s = timed(lambda _: [tr.ae_step(tr.rng())  # noqa: B023
                                    for _ in range(steps)], 1, dev, 0)
            gen = Gan()
            gen.dev, gen.dec, gen.means, gen.chol, gen.present = (dev, tr.dec, tr.means, tr.chol,
                                                                  tr.present)
            gan_s, sample_s = time_fit_and_sample(
                tr, lambda: gen.generate(0, range(b)), steps)  # noqa: B023
            ae, gan = steps * b / ae_s, steps * b / gan_s
            mix = prof["GAN_AE_STEPS"] + prof["GAN_STEPS"]  # the profile's fit: ae, then gan steps
            train = mix / (prof["GAN_AE_STEPS"] / ae + prof["GAN_STEPS"] / gan)
            rows.append(dict(batch_size=b, ae_images_per_s=three_figures(ae),
                             gan_images_per_s=three_figures(gan),
                             train_images_per_s=three_figures(train),
                             sample_images_per_s=three_figures(b / sample_s)))
        return bench_report("gan", profile, tr, rows, "images",
                            (prof["GAN_AE_STEPS"] + prof["GAN_STEPS"]) * prof["GAN_BATCH"],
                            channels=prof["GAN_CHANNELS"], latent=prof["GAN_LATENT"],
                            critic=prof["GAN_CRITIC"])
