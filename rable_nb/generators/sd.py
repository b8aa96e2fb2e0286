"""Backend ``sd``: the report's Stable Diffusion top-up from BLIP-2 captions (notebook 02).

Report settings (defaults of the ``paper`` profile): ``stabilityai/stable-diffusion-2-1-base``
in fp16, 512 px, 50 steps of its own scheduler, guidance 2, prompt = a random caption of a
real image of the same class, one seed per image, resized to the data's size (32×32;
greyscale data: converted to grey). The caption of an image
joins the class of that image's *conditioning* label (pseudo-label or, as in the report,
the hidden truth). The prompt of a sample is drawn from its seed, so a sample's prompt and
image depend only on its slot. The pipeline is loaded on the first ``generate`` call: a
finished top-up never loads it.

No Stable Diffusion weights exist on this project's machines; ``SD_MODEL_ID='tiny'`` (the
``smoke`` profile) builds a tiny random pipeline offline so the code runs for real.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from .. import config
from ..rundir import runfiles
from ..data.images import CLASSES
from ..engine.networks import pick_device
from ..engine.profiling import three_figures, timed
from ..parts.tiny_models import TINY as TINY_MODEL
from ..parts.tiny_models import build_tiny_sd, load_pretrained, resolve_model_id
from .base import Generator
from .topup import REPORT_TOPUP

DEFAULT_MODEL = "stabilityai/stable-diffusion-2-1-base"
FILTERS = {"nearest": Image.Resampling.NEAREST, "box": Image.Resampling.BOX,
           "bilinear": Image.Resampling.BILINEAR, "hamming": Image.Resampling.HAMMING,
           "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS}
SCHEDULERS = {"default": None, "pndm": "PNDMScheduler", "ddim": "DDIMScheduler",
              "dpm++": "DPMSolverMultistepScheduler", "euler": "EulerDiscreteScheduler",
              "euler_a": "EulerAncestralDiscreteScheduler", "unipc": "UniPCMultistepScheduler"}

_REPORT = dict(SD_MODEL_ID=DEFAULT_MODEL, SD_SIZE=512, SD_STEPS=50, SD_GUIDANCE=2.0,
               SD_SCHEDULER="default", SD_PROMPT_TEMPLATE="{caption}", SD_NEGATIVE_PROMPT="",
               SD_FILTER="lanczos", SD_ATTENTION_SLICING=False, SD_VAE_SLICING=False)
PROFILE_DEFAULTS = {
    # smoke: tiny random SD at 32 px, 2 steps.
    "smoke": {**_REPORT, "SD_MODEL_ID": TINY_MODEL, "SD_SIZE": 32, "SD_STEPS": 2, "SD_BATCH": 16},
    # quick: the fast profile (DPM-Solver++ in 20 steps); still needs a GPU for 37k images.
    "quick": {**_REPORT, "SD_STEPS": 20, "SD_SCHEDULER": "dpm++", "SD_BATCH": 16},
    "paper": {**_REPORT, "SD_BATCH": 32},
}


def validate(params: dict) -> None:
    """Clear ``ValueError`` for bad Stable Diffusion parameters."""
    config.check(params, {
        "SD_MODEL_ID": config.PATH,
        "SD_SIZE": (lambda v: config.is_int(v) and v >= 8 and v % 8 == 0,
                    "a positive multiple of 8 (pixels)"),
        "SD_STEPS": config.integer(1),
        "SD_BATCH": config.integer(1),
        "SD_GUIDANCE": config.number(0),
        "SD_SCHEDULER": config.one_of(SCHEDULERS),
        "SD_FILTER": config.one_of(FILTERS),
        "SD_PROMPT_TEMPLATE": (_template_ok, "a string using {caption} and/or {class_name}"),
        "SD_NEGATIVE_PROMPT": config.TEXT,
        "SD_ATTENTION_SLICING": config.BOOLEAN, "SD_VAE_SLICING": config.BOOLEAN,
    })


def _template_ok(t) -> bool:
    try:
        return isinstance(t, str) and bool(t.format(caption="c", class_name="n"))
    except (KeyError, IndexError, ValueError):
        return False


def slot_prompt(template: str, captions: list[str], class_name: str, seed: int) -> str:
    """Prompt of the sample with ``seed``: the template filled with a seeded random caption."""
    caption = ""
    if "{caption}" in template:
        if not captions:
            raise ValueError(f"class {class_name!r} needs synthetic images but has no caption: "
                             f"run notebook 02 with CAPTION_WHICH covering it, or use a "
                             f"SD_PROMPT_TEMPLATE without {{caption}}.")
        caption = captions[np.random.default_rng([seed, 1]).integers(len(captions))]
    return template.format(caption=caption, class_name=class_name).strip()


def load_sd(model_id: str, device: str = "auto", scheduler: str = "default",
            attention_slicing: bool = False, vae_slicing: bool = False):
    """StableDiffusionPipeline (fp16 on CUDA) with the chosen scheduler and memory options."""
    import diffusers
    import torch

    dev = pick_device(device)
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    path = resolve_model_id(model_id, "SD_MODEL_ID")
    pipe = load_pretrained(diffusers.StableDiffusionPipeline.from_pretrained, path,
                           "SD_MODEL_ID", dtype=dtype)
    return configure(pipe.to(dev), scheduler, attention_slicing, vae_slicing)


def configure(pipe, scheduler: str = "default", attention_slicing: bool = False,
              vae_slicing: bool = False):
    """Swap the scheduler (same noise schedule) and enable memory savers."""
    import diffusers

    if SCHEDULERS[scheduler]:
        cls = getattr(diffusers, SCHEDULERS[scheduler])
        pipe.scheduler = cls.from_config(pipe.scheduler.config)
    if attention_slicing:
        pipe.enable_attention_slicing()
    if vae_slicing:
        pipe.vae.enable_slicing()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def captions_by_class(run_dir, cond_labels) -> dict[int, list[str]]:
    """Captions of ``run_dir/captions.jsonl`` grouped by their image's conditioning label."""
    position = {int(i): r for r, i in enumerate(runfiles.load_dataset(run_dir)["indices"])}
    groups = defaultdict(list)
    for row in runfiles.load_captions(run_dir):
        groups[int(cond_labels[position[int(row["index"])]])].append(row["caption"])
    return groups


class SD(Generator):
    """Stable Diffusion with caption prompts (see the module docstring)."""

    PROFILE_DEFAULTS = PROFILE_DEFAULTS
    validate = staticmethod(validate)

    name = "sd"
    REQUIRES, CONTROL = ("diffusers", "transformers", "tokenizers"), "copy"
    TINY = dict(SD_MODEL_ID=TINY_MODEL, SD_SIZE=32, SD_STEPS=2, SD_BATCH=3)
    CAMPAIGN_BENCH = False  # SD-2.1's architecture at 512 px: minutes of a lease (bench synth)
    PARAMS = ("SD_MODEL_ID", "SD_SIZE", "SD_STEPS", "SD_GUIDANCE", "SD_SCHEDULER",
              "SD_PROMPT_TEMPLATE", "SD_NEGATIVE_PROMPT", "SD_FILTER")

    def fit(self, images_or_features, cond_labels, class_counts, params, run_dir) -> dict:
        """No training: groups the captions by conditioning label; the model loads lazily."""
        validate(params)
        given = {k: v for k, v in params.items() if v is not None}
        self.p, self.pipe = {**PROFILE_DEFAULTS["paper"], **given}, None
        self.batch = self.p["SD_BATCH"]
        self.classes = params.get("CLASSES") or CLASSES
        self.image_shape = tuple(np.asarray(images_or_features).shape[1:]) or (32, 32, 3)
        needs = "{caption}" in self.p["SD_PROMPT_TEMPLATE"]
        self.captions = captions_by_class(run_dir, cond_labels) if needs else defaultdict(list)
        return dict(done=True, captions=sum(map(len, self.captions.values())))

    def model_id(self) -> str:
        return self.p["SD_MODEL_ID"]

    def generate(self, label, seeds):
        import torch

        p = self.p
        if self.pipe is None:
            self.pipe = load_sd(p["SD_MODEL_ID"], p.get("DEVICE", "auto"), p["SD_SCHEDULER"],
                                p["SD_ATTENTION_SLICING"], p["SD_VAE_SLICING"])
        prompts = [slot_prompt(p["SD_PROMPT_TEMPLATE"], self.captions[label],
                               self.classes[label], s) for s in seeds]
        negative = [p["SD_NEGATIVE_PROMPT"]] * len(seeds) if p["SD_NEGATIVE_PROMPT"] else None
        images = self.pipe(prompts, height=p["SD_SIZE"], width=p["SD_SIZE"],
                           num_inference_steps=p["SD_STEPS"], guidance_scale=p["SD_GUIDANCE"],
                           negative_prompt=negative,
                           generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
                           output_type="pil").images
        h, w, c = self.image_shape  # the data's size and channels (CIFAR-10: 32×32×3)
        small = np.stack([np.asarray(img.convert("L" if c == 1 else "RGB")
                                     .resize((w, h), FILTERS[p["SD_FILTER"]])) for img in images])
        return small.reshape(len(images), h, w, c), [{"prompt": q} for q in prompts]

    # --- benchmark ---------------------------------------------------------------------
    @staticmethod
    def bench(profile: str = "smoke", device: str = "auto", batch_sizes=None) -> dict:
        """Images/s of the full pipeline vs bare UNet denoising, and the projected top-up time.

        CUDA: SD-2.1-base architecture, random weights, fp16, at the profile's size/steps/scheduler
        (``smoke`` → the report's 512 px / 50 steps). CPU: only a check of the machinery, the
        tiny model at the ``smoke`` settings whatever the profile (its projection means nothing).
        """
        import torch

        dev = pick_device(device)
        cuda = dev.type == "cuda"
        s = PROFILE_DEFAULTS[("paper" if profile == "smoke" else profile) if cuda else "smoke"]
        if cuda:
            pipe = configure(sd21_base_random(dev, torch.float16), s["SD_SCHEDULER"])
            model = "SD-2.1-base architecture, random weights"
        else:
            pipe, model = load_sd(TINY_MODEL, "cpu"), "tiny random SD (CPU check only)"
        batch_sizes = batch_sizes or ([16, 64] if cuda else [1, 4])
        size, steps, guidance = s["SD_SIZE"], s["SD_STEPS"], s["SD_GUIDANCE"]
        run = dict(height=size, width=size, num_inference_steps=steps, guidance_scale=guidance,
                   output_type="pil")
        repeats = 1 if cuda else 2  # the shared CPU is noisy: keep the best of two
        pipe(["warm-up"], **{**run, "num_inference_steps": 1})
        _unet_loop(pipe, 1, size, 1, guidance)
        rows = []
        for b in tqdm(batch_sizes, desc="bench synth", unit="batch size"):
            full = timed(lambda _: pipe(["a photo of a horse in a field"] * b, **run), 1, dev, 0,
                         repeats)
            bare = timed(lambda _: _unet_loop(pipe, b, size, steps, guidance), 1, dev, 0, repeats)
            rows.append(dict(batch_size=b, pipeline_images_per_s=three_figures(b / full),
                             unet_images_per_s=three_figures(b / bare),
                             pipeline_s=three_figures(full), unet_s=three_figures(bare),
                             non_unet_share=round(1 - bare / full, 3)))
        best = max(r["pipeline_images_per_s"] for r in rows)
        return dict(bench="synth", profile=profile, device=str(dev),
                    gpu=torch.cuda.get_device_name(dev) if cuda else None, model=model,
                    dtype=str(pipe.unet.dtype).replace("torch.", ""), size=size, steps=steps,
                    guidance=guidance, scheduler=type(pipe.scheduler).__name__, results=rows,
                    best_images_per_s=best, topup_images=REPORT_TOPUP,
                    projected_topup_hours=three_figures(REPORT_TOPUP / best / 3600))


# --- benchmark -------------------------------------------------------------------------
# Architecture of stabilityai/stable-diffusion-2-1-base, values copied from its published
# unet/config.json, vae/config.json, text_encoder/config.json and scheduler_config.json
# (https://huggingface.co/stabilityai/stable-diffusion-2-1-base/tree/main).
SD21_BASE_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280), attention_head_dim=(5, 10, 20, 20),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=1024, use_linear_projection=True, norm_num_groups=32, norm_eps=1e-5,
    flip_sin_to_cos=True, freq_shift=0, act_fn="silu", upcast_attention=False)
SD21_BASE_VAE = dict(
    sample_size=512, in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, act_fn="silu",
    scaling_factor=0.18215)
SD21_BASE_TEXT = dict(  # OpenCLIP ViT-H/14 text tower, penultimate layer kept (23 of 24)
    vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
    num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu", projection_dim=512,
    layer_norm_eps=1e-5, bos_token_id=0, eos_token_id=2, pad_token_id=1)
SD21_BASE_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                           num_train_timesteps=1000, skip_prk_steps=True,
                           set_alpha_to_one=False, steps_offset=1, clip_sample=False)


def sd21_base_random(device, dtype):
    """SD-2.1-base architecture with random weights (no download); tiny CLIP tokenizer."""
    import torch
    from diffusers import (AutoencoderKL, PNDMScheduler, StableDiffusionPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    tokenizer = CLIPTokenizer.from_pretrained(build_tiny_sd() / "tokenizer")
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**SD21_BASE_VAE), unet=UNet2DConditionModel(**SD21_BASE_UNET),
        text_encoder=CLIPTextModel(CLIPTextConfig(**SD21_BASE_TEXT)), tokenizer=tokenizer,
        scheduler=PNDMScheduler.from_config(SD21_BASE_SCHEDULER), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    return configure(pipe.to(device, dtype))


def _unet_loop(pipe, batch: int, size: int, steps: int, guidance: float) -> None:
    """Bare denoising: the scheduler loop of UNet calls (CFG doubles the batch)."""
    import torch
    unet, sched = pipe.unet, pipe.scheduler
    cross = unet.config.cross_attention_dim
    lat = torch.randn(batch, 4, size // pipe.vae_scale_factor, size // pipe.vae_scale_factor,
                      device=unet.device, dtype=unet.dtype)
    cond = torch.randn(2 * batch, pipe.tokenizer.model_max_length, cross, device=unet.device,
                       dtype=unet.dtype)
    sched.set_timesteps(steps, device=unet.device)
    with torch.inference_mode():
        for t in sched.timesteps:
            eps = unet(torch.cat([lat, lat]), t, encoder_hidden_states=cond).sample
            eps_u, eps_c = eps.chunk(2)
            lat = sched.step(eps_u + guidance * (eps_c - eps_u), t, lat).prev_sample
