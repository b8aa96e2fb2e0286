"""Stage 07: interactive demo — upload an image (or draw a test image), see the top-5
softmax of a trained model, and record which labels a person finds plausible.

Uploads are checked before decoding: at most ``MAX_BYTES`` of file, at most
``MAX_PIXELS`` pixels (a small file can declare a huge image: a decompression bomb), and
the format must be one of the raster formats in ``FORMATS`` (Pillow is not allowed to try
others: EPS/PS would run Ghostscript where it is installed). Accepted images get the
evaluation's preprocessing: RGB (16-bit greyscale scaled to 8 bits, not clipped; transparent
pixels composited on white), centre-cropped to a square and resized to 32×32 with the
bicubic filter that ``data`` uses for non-32×32 files (a wide photo is cropped, not
squashed), normalised with :func:`networks.normalize`.

The app keeps what it shows consistent: switching the model or the logit adjustment
recomputes the bars and the message; a new image clears the ticks; a rejected upload
clears the current image and disables saving. The adjustment checkbox is enabled only for
models with a logit prior (``+records``) and says so when it is not.

Feedback is a partial label: the set of ticked labels. Each one is appended as one line
to ``feedback.jsonl`` (``sha256``, ``image`` — the 32×32 PNG under ``feedback/`` —,
``candidates``, ``source``, ``model``, ``adjusted`` — whether the test-time adjustment was
applied —, ``top5``); :func:`load_feedback` turns the file into images and an N×C
candidate matrix, the format of ``dataset.npz``.
"""
from __future__ import annotations

import functools
import hashlib
import html
import io
import time
import warnings
from pathlib import Path

import ipywidgets as widgets
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from . import config, jsonl, predictions
from .predictions import predict_proba

MAX_BYTES = 10 * 1024 * 1024
MAX_PIXELS = 40_000_000  # 40 megapixels: any camera photo; Pillow itself warns at 89 MP
FEEDBACK_FILE = "feedback.jsonl"
FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF")  # Pillow format names the demo opens
EXTENSIONS = ".png,.jpg,.jpeg,.gif,.bmp,.webp,.tif,.tiff"  # what the upload button offers
WIDE_GREY = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # 16/32-bit greyscale modes


def validate(P: dict) -> None:
    """Check notebook 07's parameters (``ValueError`` with a clear message)."""
    predictions.validate(P)
    config.check(P, {"MAX_UPLOAD_MB": config.number(0, 100, low_open=True)})


class RejectedImage(ValueError):
    """An upload that is not used; the message says why."""


def read_image(blob: bytes, max_bytes: int = MAX_BYTES, max_pixels: int = MAX_PIXELS
               ) -> np.ndarray:
    """Uploaded file bytes → uint8 32×32×3, or :class:`RejectedImage` with the reason."""
    if not blob:
        raise RejectedImage("the file is empty.")
    if len(blob) > max_bytes:
        raise RejectedImage(f"the file has {len(blob) / 2**20:.1f} MB; the limit is "
                            f"{max_bytes / 2**20:.0f} MB.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(blob), formats=FORMATS) as img:  # reads the header
                if img.width * img.height > max_pixels:
                    raise RejectedImage(
                        f"{img.width}×{img.height} pixels is over the {max_pixels / 1e6:.0f}-"
                        "megapixel limit (a decompression bomb or a huge image).")
                rgb = to_rgb(ImageOps.exif_transpose(img))
    except RejectedImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise RejectedImage(f"refused as a decompression bomb ({err}).") from None
    except UnidentifiedImageError:
        raise RejectedImage(f"this is not an image format the demo accepts "
                            f"({', '.join(FORMATS)}).") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise RejectedImage(f"the image is damaged or truncated ({err}).") from None
    return np.array(to_model_size(rgb), dtype=np.uint8)


def to_model_size(img: Image.Image, side: int = 32) -> Image.Image:
    """The centred square of ``img`` (the shorter side), resized to side × side (bicubic)."""
    if img.size == (side, side):
        return img
    return ImageOps.fit(img, (side, side), Image.Resampling.BICUBIC, centering=(0.5, 0.5))


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB; 16-bit greyscale is scaled (65535 → 255) rather than clipped at 255, and
    transparency (an alpha channel or a transparent palette colour) is laid on white."""
    if img.mode in WIDE_GREY:
        grey = np.asarray(img, dtype=np.float64)
        if img.mode != "I" or grey.max() > 255:  # mode I holds 8-bit values in some files
            grey = grey / 257.0
        img = Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return img.convert("RGB")


def png_bytes(image: np.ndarray, scale: int = 4) -> bytes:
    """PNG of a uint8 image, enlarged ``scale``× with nearest-neighbour (what the model sees)."""
    img = Image.fromarray(image)
    if scale != 1:
        img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def append_feedback(run_dir, image: np.ndarray, sha256: str, candidates: list[int], classes,
                    **info) -> dict:
    """Save the 32×32 image under ``feedback/`` and append one line to ``feedback.jsonl``.

    The image is written (atomically) before the line, so no line points to a missing file.
    """
    if not candidates:
        raise ValueError("tick at least one plausible label.")
    run_dir = Path(run_dir)
    rel = Path("feedback") / f"{sha256}.png"
    target = run_dir / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        config.write_atomic(target, lambda t: t.write_bytes(png_bytes(image, scale=1)))
    entry = dict(time=time.strftime("%Y-%m-%dT%H:%M:%S%z"), sha256=sha256, image=str(rel),
                 candidates=[classes[c] for c in candidates],
                 candidate_ids=[int(c) for c in candidates], **info)
    jsonl.append(run_dir / FEEDBACK_FILE, [entry])
    return entry


def load_feedback(run_dir, num_classes: int = 10) -> dict:
    """``feedback.jsonl`` as partial-label data: images (N×32×32×3), candidates (N×C bool),
    sha256; the latest line wins when an image was labelled more than once."""
    latest = {e["sha256"]: e for e in jsonl.read(Path(run_dir) / FEEDBACK_FILE)}
    images = np.zeros((len(latest), 32, 32, 3), np.uint8)
    candidates = np.zeros((len(latest), num_classes), bool)
    for i, entry in enumerate(latest.values()):
        with Image.open(Path(run_dir) / entry["image"]) as img:
            images[i] = np.asarray(img.convert("RGB"))
        candidates[i, entry["candidate_ids"]] = True
    return dict(images=images, candidates=candidates, sha256=list(latest))


def _never_raise(callback):
    """Widget callbacks report errors in the message line instead of raising."""
    @functools.wraps(callback)
    def wrapper(self, *args, **kwargs):
        try:
            return callback(self, *args, **kwargs)
        except RejectedImage as err:
            self.show_message(f"Upload rejected: {err}", error=True)
        except Exception as err:  # noqa: BLE001 - a demo must keep running
            self.show_message(f"Error: {type(err).__name__}: {err}", error=True)
    return wrapper


class DemoApp:
    """The widget app; ``app.widget`` is what the notebook displays.

    ``models``: ``predictions.load_models`` output; ``test_x``/``test_y``: uint8 test images
    and labels for the "random test image" button. ``adjust``: start with the test-time
    logit adjustment on (where the selected model has a prior).
    """

    ADJUST_HELP = "subtract the model's log class prior from its logits (RECORDS)"

    def __init__(self, models: dict, classes, test_x, test_y, run_dir, seed: int = 0,
                 adjust: bool = False, max_bytes: int = MAX_BYTES, max_pixels: int = MAX_PIXELS):
        self.models, self.classes = models, list(classes)
        self.test_x, self.test_y, self.run_dir = test_x, test_y, Path(run_dir)
        self.limits = dict(max_bytes=max_bytes, max_pixels=max_pixels)
        self.rng = np.random.default_rng(seed)
        self.current: dict | None = None
        self.top5: list[tuple[str, float]] = []

        self.uploader = widgets.FileUpload(accept=EXTENSIONS, multiple=False,
                                           description="upload image")
        self.random_button = widgets.Button(description="random test image", icon="random")
        self.model = widgets.Dropdown(options=list(models), description="model")
        self.adjust = widgets.Checkbox(value=adjust, description="test-time logit adjustment",
                                       indent=False, tooltip=self.ADJUST_HELP)
        self.adjust_note = widgets.HTML()
        self.message = widgets.HTML()
        self.preview = widgets.Image(format="png", width=128, height=128)
        self.caption = widgets.HTML()
        self.bar_names = [widgets.Label(layout=widgets.Layout(width="90px")) for _ in range(5)]
        self.bars = [widgets.FloatProgress(min=0, max=1, layout=widgets.Layout(width="240px"))
                     for _ in range(5)]
        self.bar_values = [widgets.Label() for _ in range(5)]
        self.checks = [widgets.Checkbox(description=c, indent=False,
                                        layout=widgets.Layout(width="110px")) for c in classes]
        self.save_button = widgets.Button(description="save feedback", button_style="success",
                                          disabled=True)
        self._update_adjust()

        self.uploader.observe(self._on_upload, "value")
        self.random_button.on_click(self._on_random)
        self.model.observe(self._on_model, "value")
        self.adjust.observe(self._on_model, "value")
        self.save_button.on_click(self._on_save)

        bars = widgets.VBox([widgets.HBox([n, b, v]) for n, b, v in
                             zip(self.bar_names, self.bars, self.bar_values)])
        feedback = widgets.VBox([
            widgets.HTML("<b>Which labels are plausible?</b> Tick every one; the set is "
                         "saved as a partial label."),
            widgets.GridBox(self.checks, layout=widgets.Layout(
                grid_template_columns="repeat(5, 115px)")),
            self.save_button])
        self.widget = widgets.VBox([
            widgets.HBox([self.uploader, self.random_button, self.model]),
            widgets.HBox([self.adjust, self.adjust_note]),
            self.message,
            widgets.HBox([widgets.VBox([self.preview, self.caption]),
                          widgets.VBox([widgets.HTML("<b>top-5 softmax</b>"), bars])]),
            feedback])

    # -- display ----------------------------------------------------------------------
    def show_message(self, text: str, error: bool = False) -> None:
        colour = "#b00020" if error else "#555"
        self.message.value = f'<span style="color:{colour}">{html.escape(text)}</span>'

    @property
    def adjusted(self) -> bool:
        """Whether the prediction shown subtracts a logit prior (ticked and available)."""
        return self.adjust.value and not self.adjust.disabled

    def _update_adjust(self) -> None:
        """Enable the adjustment only for a model with a logit prior, and say why not."""
        has_prior = self.models[self.model.value]["prior"] is not None
        self.adjust.disabled = not has_prior
        self.adjust_note.value = (
            f'<span style="color:#555">({self.ADJUST_HELP})</span>' if has_prior else
            f'<span style="color:#555">(not available for <b>{html.escape(self.model.value)}'
            "</b>: it has no logit prior; only <code>+records</code> models carry one)</span>")

    def _clear_ticks(self) -> None:
        for box in self.checks:
            box.value = False

    # -- callbacks --------------------------------------------------------------------
    @_never_raise
    def _on_upload(self, change) -> None:
        files = change["new"]
        if not files:  # the reset below
            return
        f = files[0]
        blob = bytes(f["content"])  # bytes or memoryview
        try:
            image = read_image(blob, **self.limits)
        except RejectedImage:
            self.clear()  # the previous image must not be saved with this upload's labels
            raise
        finally:
            self.uploader.value = ()  # the same file can be uploaded again
        self.show(image, hashlib.sha256(blob).hexdigest(), f"upload: {f['name']}")

    @_never_raise
    def _on_random(self, _button=None) -> None:
        i = int(self.rng.integers(len(self.test_x)))
        image = np.ascontiguousarray(self.test_x[i])
        self.show(image, hashlib.sha256(image.tobytes()).hexdigest(), f"CIFAR-10 test #{i}",
                  true_label=self.classes[int(self.test_y[i])])

    @_never_raise
    def _on_model(self, _change=None) -> None:
        self._update_adjust()
        if self.current is not None:
            self.refresh()

    @_never_raise
    def _on_save(self, _button=None) -> None:
        if self.current is None:
            raise ValueError("show an image first.")
        ticked = [c for c, box in enumerate(self.checks) if box.value]
        cur = self.current
        entry = append_feedback(self.run_dir, cur["image"], cur["sha256"], ticked, self.classes,
                                source=cur["source"], true_label=cur.get("true_label"),
                                model=self.model.value, adjusted=self.adjusted, top5=self.top5)
        self._clear_ticks()
        self.show_message(f"Saved {{{', '.join(entry['candidates'])}}} for {cur['source']} "
                          f"to {self.run_dir / FEEDBACK_FILE}.")

    # -- actions ----------------------------------------------------------------------
    def show(self, image: np.ndarray, sha256: str, source: str, true_label=None) -> None:
        """Make ``image`` the current one (ticks cleared), show it and its top-5 prediction."""
        self.current = dict(image=image, sha256=sha256, source=source, true_label=true_label)
        self.preview.value = png_bytes(image)
        truth = f"<br>true label: <b>{true_label}</b>" if true_label else ""
        self.caption.value = f"{html.escape(source)} (32×32, as the model sees it){truth}"
        self._clear_ticks()
        self.save_button.disabled = False
        self.refresh()

    def clear(self) -> None:
        """No current image: empty preview, bars and ticks; saving disabled."""
        self.current, self.top5 = None, []
        self.preview.value, self.caption.value = b"", ""
        for n, b, v in zip(self.bar_names, self.bars, self.bar_values):
            n.value, b.value, v.value = "", 0.0, ""
        self._clear_ticks()
        self.save_button.disabled = True

    def refresh(self) -> None:
        """Recompute and show everything that depends on the model: bars and message."""
        self.predict()
        how = " with test-time adjustment" if self.adjusted else ""
        self.show_message(f"{self.current['source']}: {self.model.value}{how} predicts "
                          f"{self.top5[0][0]} ({self.top5[0][1]:.1%}).")

    def predict(self) -> list[tuple[str, float]]:
        """Top-5 (label, probability) of the selected model on the current image."""
        probs = predict_proba(self.models[self.model.value], self.current["image"][None],
                              adjust=self.adjusted)[0]
        order = np.argsort(-probs)[:5]
        self.top5 = [(self.classes[c], float(probs[c])) for c in order]
        for (name, p), n, b, v in zip(self.top5, self.bar_names, self.bars, self.bar_values):
            n.value, b.value, v.value = name, p, f"{p:.1%}"
        return self.top5
