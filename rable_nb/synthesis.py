"""Stage 03: Stable Diffusion top-up of the rare classes from BLIP-2 captions.

Report settings (defaults of the ``paper`` profile): ``stabilityai/stable-diffusion-2-1-base``
in fp16, 512 px, 50 steps of its own scheduler, guidance 2, prompt = a random caption of a
real image of the same class, one seed per image, resized to 32×32. Class c receives
``TARGET_PER_CLASS − n_c`` images (target default n_max: 37,594 images at IF = 0.01).

Every image has a fixed *slot* (class, k) whose seed and prompt derive from (SEED, class, k),
so the result does not depend on batching or interruptions. ``synthetic/manifest.jsonl`` is
the source of truth: a PNG is written atomically, then its manifest line is appended. On
resume, a torn last line is dropped, PNGs absent from the manifest are deleted, and only
the missing slots are generated.
"""
from __future__ import annotations

import os
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from . import captioning, config, jsonl
from .config import write_atomic
from .dataset import long_tail_counts
from .networks import pick_device
from .tiny_models import TINY, build_tiny_sd, load_pretrained, resolve_model_id

DEFAULT_MODEL = "stabilityai/stable-diffusion-2-1-base"
SYNTH_DIR, MANIFEST, SETTINGS = "synthetic", "manifest.jsonl", "settings.json"
FILTERS = {"nearest": Image.Resampling.NEAREST, "box": Image.Resampling.BOX,
           "bilinear": Image.Resampling.BILINEAR, "hamming": Image.Resampling.HAMMING,
           "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS}
SCHEDULERS = {"default": None, "pndm": "PNDMScheduler", "ddim": "DDIMScheduler",
              "dpm++": "DPMSolverMultistepScheduler", "euler": "EulerDiscreteScheduler",
              "euler_a": "EulerAncestralDiscreteScheduler", "unipc": "UniPCMultistepScheduler"}
# The report's top-up: n_max − n_c summed over CIFAR-10-LT at IF 0.01 (= 37,594).
REPORT_TOPUP = sum(5000 - n for n in long_tail_counts(5000, 10, 0.01))

_REPORT = dict(SD_MODEL_ID=DEFAULT_MODEL, SD_SIZE=512, SD_STEPS=50, SD_GUIDANCE=2.0,
               SD_SCHEDULER="default", SD_PROMPT_TEMPLATE="{caption}", SD_NEGATIVE_PROMPT="",
               SD_FILTER="lanczos", SD_ATTENTION_SLICING=False, SD_VAE_SLICING=False)
PROFILE_DEFAULTS = {
    # smoke: tiny random SD at 32 px, 2 steps, a few dozen images (target 16 per class).
    "smoke": {**_REPORT, "SD_MODEL_ID": TINY, "SD_SIZE": 32, "SD_STEPS": 2, "SD_BATCH": 16,
              "TARGET_PER_CLASS": captioning.PROFILE_DEFAULTS["smoke"]["TARGET_PER_CLASS"]},
    # quick: the fast profile (DPM-Solver++ in 20 steps); still needs a GPU for 37k images.
    "quick": {**_REPORT, "SD_STEPS": 20, "SD_SCHEDULER": "dpm++", "SD_BATCH": 16},
    "paper": {**_REPORT, "SD_BATCH": 32},
}


def validate(params: dict) -> None:
    """Clear ``ValueError`` for bad synthesis parameters."""
    captioning.validate({"TARGET_PER_CLASS": params.get("TARGET_PER_CLASS")})
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


def topup_plan(class_counts, target: int | None = None) -> dict[int, int]:
    """Synthetic images per class: max(0, target − n_c), target default n_max."""
    goal = captioning.target_count(class_counts, target)
    return {c: max(0, goal - int(n)) for c, n in enumerate(class_counts)}


def slot_seed(seed: int, label: int, k: int) -> int:
    """Seed of the k-th synthetic image of a class (independent of batching)."""
    return int(np.random.SeedSequence([seed, label, k]).generate_state(1)[0])


def slot_prompt(template: str, captions: list[str], class_name: str, seed: int, label: int,
                k: int) -> str:
    """Prompt of slot (label, k): the template filled with a seeded random caption."""
    caption = ""
    if "{caption}" in template:
        if not captions:
            raise ValueError(f"class {class_name!r} needs synthetic images but has no caption: "
                             f"run notebook 02 with CAPTION_WHICH covering it, or use a "
                             f"SD_PROMPT_TEMPLATE without {{caption}}.")
        caption = captions[np.random.default_rng([seed, label, k, 1]).integers(len(captions))]
    return template.format(caption=caption, class_name=class_name).strip()


def slot_file(classes, label: int, k: int) -> str:
    """Manifest path of slot (label, k), relative to ``synthetic/``."""
    return f"{classes[label]}/{classes[label]}_{k:05d}.png"


def recover(out_dir: Path) -> list[dict]:
    """Manifest rows after an interruption: torn line dropped, orphan PNGs deleted."""
    path = out_dir / MANIFEST
    rows = jsonl.read(path)
    seen, kept = set(), []
    for r in rows:  # a row whose PNG vanished, or a repeated file, is not kept
        if r["file"] not in seen and (out_dir / r["file"]).is_file():
            seen.add(r["file"])
            kept.append(r)
    if len(kept) != len(rows):
        jsonl.write(path, kept)
    for png in out_dir.glob("*/*.png"):  # written, but the run stopped before its line
        if png.relative_to(out_dir).as_posix() not in seen:
            png.unlink()
    for tmp in out_dir.glob("*/.*.tmp*"):
        tmp.unlink()
    return kept


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


def _save_png(img: Image.Image, path: Path) -> None:
    write_atomic(path, lambda t: img.save(t, format="PNG"))


def synthesize(run_dir: str | os.PathLike, class_counts, classes, captions: list[dict],
               target: int | None = None, model_id: str = DEFAULT_MODEL, device: str = "auto",
               seed: int = 0, size: int = 512, steps: int = 50, guidance: float = 2.0,
               scheduler: str = "default", batch_size: int = 16,
               template: str = "{caption}", negative_prompt: str = "",
               resize_filter: str = "lanczos", attention_slicing: bool = False,
               vae_slicing: bool = False, on_image=None) -> dict:
    """Generate the missing top-up images into ``run_dir/synthetic``; return counts and timing.

    ``on_image(row)`` is called after each manifest line (progress hooks, tests).
    """
    validate(dict(SD_SIZE=size, SD_STEPS=steps, SD_BATCH=batch_size, SD_GUIDANCE=guidance,
                  SD_SCHEDULER=scheduler, SD_FILTER=resize_filter, SD_PROMPT_TEMPLATE=template,
                  TARGET_PER_CLASS=target))
    out = Path(run_dir) / SYNTH_DIR
    out.mkdir(parents=True, exist_ok=True)
    settings = dict(model_id=model_id, seed=seed, size=size, steps=steps, guidance=guidance,
                    scheduler=scheduler, template=template, negative_prompt=negative_prompt,
                    filter=resize_filter)
    done = {r["file"] for r in recover(out)}
    if done:
        jsonl.check_settings(out / SETTINGS, settings, what=str(out))
    by_class = defaultdict(list)
    for r in captions:
        by_class[int(r["label"])].append(r["caption"])
    plan = topup_plan(class_counts, target)
    planned = {(c, k): slot_file(classes, c, k) for c, n in plan.items() for k in range(n)}
    extra = done - set(planned.values())
    if extra:
        raise ValueError(f"{out} holds {len(extra)} images beyond the top-up for "
                         f"TARGET_PER_CLASS={target} (e.g. {sorted(extra)[0]}): it was made "
                         f"for a higher target; use another RUN_DIR or delete {out}.")
    todo = [slot for slot, name in planned.items() if name not in done]
    prompts = {s: slot_prompt(template, by_class[s[0]], classes[s[0]], seed, *s) for s in todo}
    stats = dict(planned=sum(plan.values()), skipped=sum(plan.values()) - len(todo),
                 generated=0, seconds=0.0, model_id=model_id)
    if not todo:
        return stats
    import torch
    pipe = load_sd(model_id, device, scheduler, attention_slicing, vae_slicing)
    stats["device"] = str(pipe.device)
    start = time.time()
    with tqdm(total=len(todo), desc="synthesis", unit="img") as bar:
        for lo in range(0, len(todo), batch_size):
            slots = todo[lo:lo + batch_size]
            seeds = [slot_seed(seed, c, k) for c, k in slots]
            negative = [negative_prompt] * len(slots) if negative_prompt else None
            images = pipe([prompts[s] for s in slots], height=size, width=size,
                          num_inference_steps=steps, guidance_scale=guidance,
                          negative_prompt=negative,
                          generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
                          output_type="pil").images
            for (c, k), s, img in zip(slots, seeds, images):
                row = dict(file=planned[(c, k)], label=int(c), prompt=prompts[(c, k)], seed=s,
                           model_id=model_id)
                small = img.convert("RGB").resize((32, 32), FILTERS[resize_filter])
                _save_png(small, out / row["file"])
                jsonl.append(out / MANIFEST, [row])
                if stats["generated"] == 0:
                    jsonl.record_settings(out / SETTINGS, settings)
                stats["generated"] += 1
                bar.update(1)
                if on_image:
                    on_image(row)
    stats["seconds"] = round(time.time() - start, 2)
    stats["images_per_s"] = round(stats["generated"] / max(stats["seconds"], 1e-9), 3)
    return stats


def manifest_rows(run_dir: str | os.PathLike) -> list[dict]:
    """The lines of a run's ``synthetic/manifest.jsonl`` (empty when there is none)."""
    return jsonl.read(Path(run_dir) / SYNTH_DIR / MANIFEST, repair=False)


def load_synthetic(run_dir: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """(uint8 images N×32×32×3, labels, manifest rows) of a run's synthetic folder."""
    out = Path(run_dir) / SYNTH_DIR
    rows = manifest_rows(run_dir)
    if not rows:
        return np.zeros((0, 32, 32, 3), np.uint8), np.zeros(0, np.int64), []
    images = np.stack([np.asarray(Image.open(out / r["file"]).convert("RGB")) for r in rows])
    return images, np.array([r["label"] for r in rows], dtype=np.int64), rows


def synthetic_counts(run_dir: str | os.PathLike, num_classes: int) -> np.ndarray:
    """Synthetic images per class according to the manifest."""
    counts = Counter(r["label"] for r in manifest_rows(run_dir))
    return np.array([counts.get(c, 0) for c in range(num_classes)], dtype=np.int64)


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


def _timed(fn, dev, repeats: int = 1) -> float:
    """Best wall time of ``repeats`` calls (CUDA synchronised)."""
    import torch
    times = []
    for _ in range(repeats):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


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
        pipe, model = load_sd(TINY, "cpu"), "tiny random SD (CPU check only)"
    batch_sizes = batch_sizes or ([16, 64] if cuda else [1, 4])
    size, steps, guidance = s["SD_SIZE"], s["SD_STEPS"], s["SD_GUIDANCE"]
    run = dict(height=size, width=size, num_inference_steps=steps, guidance_scale=guidance,
               output_type="pil")
    repeats = 1 if cuda else 2  # the shared CPU is noisy: keep the best of two
    pipe(["warm-up"], **{**run, "num_inference_steps": 1})
    _unet_loop(pipe, 1, size, 1, guidance)
    rows = []
    for b in tqdm(batch_sizes, desc="bench synth", unit="batch size"):
        full = _timed(lambda: pipe(["a photo of a horse in a field"] * b, **run), dev, repeats)
        bare = _timed(lambda: _unet_loop(pipe, b, size, steps, guidance), dev, repeats)
        rows.append(dict(batch_size=b, pipeline_images_per_s=round(b / full, 3),
                         unet_images_per_s=round(b / bare, 3), pipeline_s=round(full, 3),
                         unet_s=round(bare, 3), non_unet_share=round(1 - bare / full, 3)))
    best = max(r["pipeline_images_per_s"] for r in rows)
    return dict(bench="synth", profile=profile, device=str(dev),
                gpu=torch.cuda.get_device_name(dev) if cuda else None, model=model,
                dtype=str(pipe.unet.dtype).replace("torch.", ""), size=size, steps=steps,
                guidance=guidance, scheduler=type(pipe.scheduler).__name__, results=rows,
                best_images_per_s=best, topup_images=REPORT_TOPUP,
                projected_topup_hours=round(REPORT_TOPUP / best / 3600, 3))


# --- figures ---------------------------------------------------------------------------
def rebalanced_figure(real_counts, synth_counts, classes):
    """The report's Figure 5.1: real vs synthetic images per class, before and after."""
    import matplotlib.pyplot as plt

    real, synth = np.asarray(real_counts), np.asarray(synth_counts)
    x = np.arange(len(classes))
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    panels = (("before: long-tailed", 0 * synth), ("after: rebalanced", synth))
    for ax, (title, add) in zip(axes, panels):
        ax.bar(x, real, color="tab:blue", label="real")
        ax.bar(x, add, bottom=real, color="tab:orange", label="synthetic")
        ax.set_xticks(x, classes, rotation=45, ha="right")
        ax.set(title=title, ylabel="training images")
        for i, n in enumerate(real + add):
            ax.text(i, n, str(int(n)), ha="center", va="bottom", fontsize=7)
    axes[1].legend()
    fig.tight_layout()
    return fig


def side_by_side(real_x, real_y, syn_x, syn_y, classes, n: int = 4, seed: int = 0):
    """Images and titles: per class with synthetic images, n real then n synthetic."""
    rng = np.random.default_rng(seed)
    images, titles = [], []
    for c in np.unique(syn_y):
        for kind, x, y in (("real", real_x, real_y), ("synth", syn_x, syn_y)):
            pick = np.flatnonzero(y == c)
            pick = rng.choice(pick, size=min(n, len(pick)), replace=False)
            images += [x[i] for i in pick] + [np.full_like(real_x[0], 255)] * (n - len(pick))
            titles += [f"{classes[c][:5]} {kind}"] * len(pick) + [""] * (n - len(pick))
    return np.stack(images), titles
