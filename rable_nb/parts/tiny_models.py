"""Tiny random BLIP-2 and Stable Diffusion pipelines, built offline from configs.

No model hub is reachable in CI, so the ``smoke`` profile points ``CAPTION_MODEL_ID`` and
``SD_MODEL_ID`` at these folders: ``from_pretrained`` and the whole generation code run
for real, only with a few thousand random weights. Tokenizers are trained here with the
``tokenizers`` library on a small caption-like corpus. The sizes follow the spirit of the
tiny configs of the transformers/diffusers test suites (hidden sizes 16–32, 1–2 layers).
Building is idempotent: a folder holding a ``.complete`` marker is reused.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from .. import config
from ..data.images import CLASSES

CORPUS_WORDS = ("a photo of the an with on in front background small large red blue green "
                "white black brown grey yellow flying sitting standing running parked road "
                "water sky grass field sea street close up picture image two").split()
MARKER = ".complete"
VERSION = "rable_nb tiny models v3"  # bump when a builder changes: cached folders rebuild


def _corpus() -> list[str]:
    """Caption-like sentences for training the tiny tokenizers."""
    lines = [f"a photo of a {c}" for c in CLASSES]
    lines += [f"a {w} {c} in the {v}" for c in CLASSES for w in CORPUS_WORDS[12:24]
              for v in ("sky", "road", "water", "grass", "field")]
    return lines + [" ".join(CORPUS_WORDS)]


def _build_atomic(target: Path, build) -> Path:
    """Run ``build(tmp_dir)`` and move the result to ``target`` (reused when complete)."""
    def complete() -> bool:
        return (target / MARKER).exists() and (target / MARKER).read_text() == VERSION

    if complete():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(tmp)
        (tmp / MARKER).write_text(VERSION)
        if target.exists() and not complete():
            shutil.rmtree(target)
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished the same build first
            if not complete():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _opt_tokenizer():
    """Byte-level BPE tokenizer in the OPT layout (<s>=0, <pad>=1, </s>=2, <unk>=3) + <image>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AddedToken, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # Alphabet = characters of the corpus only, so random weights still decode to words.
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
                                  show_progress=False)
    tok.train_from_iterator(_corpus(), trainer)
    tok.post_processor = processors.TemplateProcessing(single="</s> $A",
                                                       special_tokens=[("</s>", 2)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="</s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>", padding_side="left")
    fast.add_tokens([AddedToken("<image>", normalized=False, special=True)], special_tokens=True)
    return fast


def build_tiny_blip2(path: str | os.PathLike | None = None) -> Path:
    """Save a random tiny BLIP-2 (ViT → Q-Former → OPT) and its processor; return the path."""
    target = Path(path) if path else config.cache_dir() / "tiny-blip2"

    def build(tmp: Path) -> None:
        import torch
        from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2Processor,
                                  BlipImageProcessor)
        tokenizer = _opt_tokenizer()
        image_token = tokenizer.convert_tokens_to_ids("<image>")
        n_query = 4
        cfg = Blip2Config(
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, image_size=32, patch_size=8),
            qformer_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, encoder_hidden_size=32,
                                vocab_size=len(tokenizer), max_position_embeddings=64),
            text_config=dict(model_type="opt", vocab_size=len(tokenizer), hidden_size=32,
                             word_embed_proj_dim=32, ffn_dim=64, num_hidden_layers=2,
                             num_attention_heads=4, max_position_embeddings=128,
                             bos_token_id=2, eos_token_id=2, pad_token_id=1,
                             init_std=0.5),  # wide init: random captions vary per image
            num_query_tokens=n_query, image_token_index=image_token)
        torch.manual_seed(0)
        model = Blip2ForConditionalGeneration(cfg).eval()
        model.generation_config.max_new_tokens = 12
        processor = Blip2Processor(
            BlipImageProcessor(size={"height": 32, "width": 32}, do_convert_rgb=True),
            tokenizer, num_query_tokens=n_query)
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)

    return _build_atomic(target, build)


def learn_bpe(word_counts: dict[str, int], suffix: str = "</w>", max_merges: int = 1000
              ) -> list[tuple[str, str]]:
    """Byte-pair merges learned from word counts, most frequent pair first; ties go to the
    smallest pair, so every process learns the same merges. (tokenizers' ``BpeTrainer``
    breaks ties by token ids it assigns in hash order: its files differ between runs.)"""
    words = {w: [*w[:-1], w[-1] + suffix] for w in sorted(word_counts)}
    merges: list[tuple[str, str]] = []
    while len(merges) < max_merges:
        pairs: dict[tuple[str, str], int] = {}
        for w, seq in words.items():
            for pair in zip(seq, seq[1:]):
                pairs[pair] = pairs.get(pair, 0) + word_counts[w]
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        for w, seq in words.items():
            out, i = [], 0
            while i < len(seq):
                if tuple(seq[i:i + 2]) == best:
                    out.append(seq[i] + seq[i + 1])
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            words[w] = out
    return merges


def _clip_tokenizer_files(folder: Path) -> None:
    """Write CLIP-style ``vocab.json``/``merges.txt`` (byte-level BPE, ``</w>`` word ends):
    the special tokens, every byte symbol alone and as a word end, then the merged tokens."""
    from collections import Counter

    from tokenizers import pre_tokenizers

    counts = Counter(w for line in _corpus() for w in line.lower().split())
    merges = learn_bpe(counts)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = ["<|startoftext|>", "<|endoftext|>", *alphabet, *(c + "</w>" for c in alphabet),
              *(a + b for a, b in merges)]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))


def build_tiny_sd(path: str | os.PathLike | None = None) -> Path:
    """Save a random tiny Stable Diffusion pipeline (UNet, VAE, CLIP text); return the folder."""
    target = Path(path) if path else config.cache_dir() / "tiny-sd"

    def build(tmp: Path) -> None:
        import torch
        from diffusers import (AutoencoderKL, PNDMScheduler, StableDiffusionPipeline,
                               UNet2DConditionModel)
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

        _clip_tokenizer_files(tmp / "tokenizer-src")
        tokenizer = CLIPTokenizer(vocab=str(tmp / "tokenizer-src" / "vocab.json"),
                                  merges=str(tmp / "tokenizer-src" / "merges.txt"),
                                  model_max_length=77)
        shutil.rmtree(tmp / "tokenizer-src")
        torch.manual_seed(0)
        unet = UNet2DConditionModel(
            block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=4,
            out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
            attention_head_dim=4, norm_num_groups=4)
        vae = AutoencoderKL(
            block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            norm_num_groups=4, sample_size=32)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
            pad_token_id=1, projection_dim=32))
        # Same scheduler family and beta schedule as SD-2.1-base (scheduler_config.json).
        scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                       unet=unet, scheduler=scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
        pipe.save_pretrained(tmp)

    return _build_atomic(target, build)


TINY = "tiny"  # model id that selects the offline tiny model of the stage
BUILDERS = {"CAPTION_MODEL_ID": build_tiny_blip2, "SD_MODEL_ID": build_tiny_sd}


class ModelNotFoundError(OSError):
    """A model id is neither a local folder nor loadable from the hub."""


def resolve_model_id(model_id: str, param: str) -> str:
    """``'tiny'`` → path of the tiny model for ``param`` (built on first use), else unchanged."""
    if not isinstance(model_id, str) or not model_id:
        raise ValueError(f"{param}={model_id!r} is invalid: give a hub id, a local folder or "
                         f"'{TINY}'.")
    return str(BUILDERS[param]()) if model_id == TINY else model_id


def load_pretrained(loader, model_id: str, param: str, **kwargs):
    """``loader(model_id, **kwargs)`` with one clear error when the model cannot be found."""
    try:
        return loader(model_id, **kwargs)
    except (OSError, ValueError) as err:
        if Path(model_id).is_dir():
            raise
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")
        raise ModelNotFoundError(
            f"Cannot load {param}={model_id!r}: it is not a local folder and the hub "
            f"{'is disabled (HF_HUB_OFFLINE=1)' if offline else 'does not provide it'}. "
            f"Download it once where the hub is reachable, e.g. `huggingface-cli download "
            f"{model_id} --local-dir /path/to/model`, then pass {param}='/path/to/model' "
            f"(or {param}='{TINY}' for the tiny random test model).") from err
