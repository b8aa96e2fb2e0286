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

Which run: notebook 07 uses ``RUN_DIR`` (or ``RABLE_RUN_DIR``) when given, else the newest
run under ``runs/`` with a trained model (:func:`find_run`); it never creates a run
directory. ``python -m rable_nb demo`` serves the notebook as a web page (``webapp``).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import html
import io
import logging
import os
import time
import warnings
from pathlib import Path

import ipywidgets as widgets
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..rundir import artefacts, feedback, jsonl, runfiles
from .. import config
from . import s05_predictions as predictions
from .s05_predictions import predict_proba

MAX_BYTES = 10 * 1024 * 1024
# The upload travels to the kernel in one WebSocket message; the server must accept more
# than the largest allowed MAX_UPLOAD_MB (100), or a big file is dropped before the demo can
# say why (Tornado's default is 10 MiB). ``webapp`` sets it for Voilà, and
# jupyter-config/rable_nb.json (installed by scripts/setup.sh) for JupyterLab.
SERVER_MESSAGE_LIMIT = 128 * 2**20
MAX_PIXELS = 40_000_000  # 40 megapixels: any camera photo; Pillow itself warns at 89 MP
FEEDBACK_FILE = "feedback.jsonl"
TRAINING_PREFIX = "04_"  # the notebook that trains the models the demo serves
FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF")  # Pillow format names the demo opens
EXTENSIONS = ".png,.jpg,.jpeg,.gif,.bmp,.webp,.tif,.tiff"  # what the upload button offers
WIDE_GREY = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # 16/32-bit greyscale modes


def validate(P: dict) -> None:
    """Check notebook 07's parameters (``ValueError`` with a clear message)."""
    predictions.validate(P)
    config.check(P, {"MAX_UPLOAD_MB": config.number(0, 100, low_open=True)})


class NoTrainedModel(FileNotFoundError):
    """No run directory with a trained model; the message names the ones looked at."""


def find_run(run_dir=None, root=None) -> Path:
    """``run_dir`` when it holds a trained model (``predictions.find_models``), else the
    newest run directory under ``root`` (default ``runs/``) that does (its newest
    checkpoint decides); :class:`NoTrainedModel` names what was looked at."""
    root = Path(root) if root else config.PROJECT_ROOT / "runs"
    if run_dir:
        run_dir = config.project_path(run_dir)
        if _model_time(run_dir) is not None:
            return run_dir
        others = [p for p in _runs(root) if p != run_dir and _model_time(p) is not None]
        train = runfiles.rerun_command(config.short_path(run_dir), "01,04")
        where = (f"runs with one: {', '.join(config.short_path(p) for p in others)}" if others else
                 f"train one: {train}")
        raise NoTrainedModel(f"{config.short_path(run_dir)} has no trained model (notebook 04's "
                             f"checkpoints with current metrics); {where}.")
    runs = _runs(root)
    trained = [(t, p) for p in runs if (t := _model_time(p)) is not None]
    if not trained:
        looked = (", ".join(config.short_path(p) for p in runs)
                  or f"{config.short_path(root)} (no run directories)")
        raise NoTrainedModel(f"No trained model: looked at {looked}; train one with "
                             "python -m rable_nb run --profile smoke --only 01,04 (writes "
                             "runs/smoke).")
    return max(trained)[1]


def _runs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def _model_time(run_dir: Path) -> float | None:
    """Modification time of the run's newest current model, or None when it has none —
    also while ``run.json`` records the training notebook as started and not finished (a
    killed rerun's models are not the run's)."""
    try:
        log = runfiles.read_run_log(run_dir)
        if any(nb.startswith(TRAINING_PREFIX) for nb in
               {e["notebook"] for e in log.get("notebooks", [])} - set(
                   runfiles.finished_notebooks(log))):
            return None
        return max(p.stat().st_mtime for p in predictions.find_models(run_dir).values())
    except (FileNotFoundError, OSError, ValueError, artefacts.DamagedFileError):
        return None


def profile_defaults(params: dict) -> dict:
    """``RUN_DIR`` defaults to the newest run with a trained model (not runs/interactive)."""
    if params.get("RUN_DIR") or os.environ.get("RABLE_RUN_DIR"):
        return {}
    return {params["PROFILE"]: {"RUN_DIR": str(find_run())}}


def only_test_images(cifar):
    """``cifar`` without its training images: the demo shows test images only, and each
    web visitor's kernel holds its own copy (CIFAR-10's training set: 150 MB)."""
    return dataclasses.replace(cifar, train_x=cifar.train_x[:0].copy(),
                               train_y=cifar.train_y[:0].copy())


def feedback_summary(run_dir) -> str:
    """One line on what ``feedback.jsonl`` holds (lines, distinct images)."""
    entries = jsonl.read(artefacts.inside(run_dir, FEEDBACK_FILE, "feedback file"),
                         schema=feedback.FEEDBACK_ROW)
    if not entries:
        return "No feedback saved in this run yet."
    images = len({e["sha256"] for e in entries})
    return (f"Feedback in this run: {config.plural(len(entries), 'saved label set')} for "
            f"{config.plural(images, 'image')} (the latest set of an image counts).")


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
    target = artefacts.inside(run_dir, rel, "feedback image")
    artefacts.inside(run_dir, FEEDBACK_FILE, "feedback file")
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        config.write_atomic(target, lambda t: t.write_bytes(png_bytes(image, scale=1)))
    entry = dict(time=time.strftime("%Y-%m-%dT%H:%M:%S%z"), sha256=sha256, image=str(rel),
                 candidates=[classes[c] for c in candidates],
                 candidate_ids=[int(c) for c in candidates], **info)
    jsonl.append(run_dir / FEEDBACK_FILE, [entry])
    return entry


def load_feedback(run_dir, num_classes: int = 10, classes=None) -> dict:
    """``feedback.jsonl`` as partial-label data: images (N×32×32×3), candidates (N×C bool),
    sha256, and ``refused`` (:func:`feedback.read_feedback`'s reasons for the lines left out); the
    latest line wins when an image was labelled more than once."""
    rows, refused = feedback.read_feedback(artefacts.inside(run_dir, FEEDBACK_FILE, "feedback file"),
                                  classes, num_classes)
    images = np.zeros((len(rows), 32, 32, 3), np.uint8)
    candidates = np.zeros((len(rows), len(classes) if classes else num_classes), bool)
    for i, row in enumerate(rows):
        images[i] = row["image"]
        candidates[i, row["candidate_ids"]] = True
    return dict(images=images, candidates=candidates, sha256=[r["sha256"] for r in rows],
                refused=refused)


def _never_raise(callback):
    """Widget callbacks report errors in the message line instead of raising; the user sees
    the reason, the kernel log the traceback."""
    @functools.wraps(callback)
    def wrapper(self, *args, **kwargs):
        try:
            return callback(self, *args, **kwargs)
        except RejectedImage as err:
            self.show_message(f"Upload rejected: {err}", error=True)
        except Exception as err:  # noqa: BLE001 - a demo must keep running
            logging.getLogger(__name__).exception("demo callback failed")
            self.show_message(f"Error: {err}", error=True)
    return wrapper


PREVIEW_PX = 128  # the 32×32 image enlarged 4×
# FileUpload always appends its file count ("upload image (0)", 0 after each reset); the
# label is drawn by CSS instead, and fixed widths keep the layout still in JupyterLab and
# Voilà alike (no cut labels, no jump when the preview or the bars change).
STYLE = """<style>
.rable-upload { font-size: 0 !important; }
.rable-upload i { font-size: var(--jp-widgets-font-size, 13px); }
.rable-upload::after { content: "upload image"; font-size: var(--jp-widgets-font-size, 13px);
                       margin-left: 4px; }
.rable-app .widget-label { overflow: visible; }
</style>"""


def _placeholder(side: int = PREVIEW_PX) -> bytes:
    """A light-grey square the size of the preview: no broken-image icon, no jump."""
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (238, 238, 238)).save(buf, format="PNG")
    return buf.getvalue()


PLACEHOLDER = _placeholder()


class DemoApp:
    """The widget app; ``app.widget`` is what the notebook displays.

    ``models``: ``predictions.load_models`` output; ``test_x``/``test_y``: uint8 test images
    and labels for the "random test image" button, drawn from a stream seeded by ``seed``
    (None: fresh entropy, so each kernel — each visitor of the web app — draws its own
    images). ``adjust``: start with the test-time
    logit adjustment on (where the selected model has a prior). Widgets carry ``rable-*``
    CSS classes, which the browser test uses to find them.
    """

    ADJUST_HELP = "subtract the model's log class prior from its logits (RECORDS)"

    def __init__(self, models: dict, classes, test_x, test_y, run_dir, seed: int | None = None,
                 adjust: bool = False, max_bytes: int = MAX_BYTES, max_pixels: int = MAX_PIXELS):
        self.models, self.classes = models, list(classes)
        self.test_x, self.test_y, self.run_dir = test_x, test_y, Path(run_dir)
        self.limits = dict(max_bytes=max_bytes, max_pixels=max_pixels)
        self.rng = np.random.default_rng(seed)
        self.current: dict | None = None
        self.top5: list[tuple[str, float]] = []
        px = f"{PREVIEW_PX}px"

        self.uploader = widgets.FileUpload(accept=EXTENSIONS, multiple=False, icon="upload",
                                           description="upload image",
                                           layout=widgets.Layout(width="150px"))
        self.random_button = widgets.Button(description="random test image", icon="random",
                                            layout=widgets.Layout(width="170px"))
        self.model = widgets.Dropdown(options=list(models), description="model",
                                      layout=widgets.Layout(width="260px"))
        self.adjust = widgets.Checkbox(value=adjust, description="test-time logit adjustment",
                                       indent=False, tooltip=self.ADJUST_HELP,
                                       layout=widgets.Layout(width="210px"))
        self.adjust_note = widgets.HTML()
        self.trained = widgets.HTML()
        # how many demo feedback images each model was trained on (notebook 04's FEEDBACK)
        self.feedback_trained = {m: int(v.get("n_feedback", 0)) for m, v in
                                 runfiles.current_metrics(self.run_dir).items()}
        self.message = widgets.HTML(layout=widgets.Layout(min_height="24px"))
        self.preview = widgets.Image(value=PLACEHOLDER, format="png", width=PREVIEW_PX,
                                     height=PREVIEW_PX,
                                     layout=widgets.Layout(width=px, height=px, min_width=px,
                                                           min_height=px))
        self.caption = widgets.HTML(layout=widgets.Layout(width="190px", min_height="40px"))
        self.bar_names = [widgets.Label(layout=widgets.Layout(width="90px")) for _ in range(5)]
        self.bars = [widgets.FloatProgress(min=0, max=1, layout=widgets.Layout(width="240px"))
                     for _ in range(5)]
        self.bar_values = [widgets.Label(layout=widgets.Layout(width="60px")) for _ in range(5)]
        self.checks = [widgets.Checkbox(description=c, indent=False,
                                        layout=widgets.Layout(width="110px")) for c in classes]
        self.save_button = widgets.Button(description="save feedback", button_style="success",
                                          disabled=True, icon="save",
                                          layout=widgets.Layout(width="150px"))
        self.summary = widgets.HTML()
        for widget, name in [(self.uploader, "upload"), (self.random_button, "random"),
                             (self.model, "model"), (self.adjust, "adjust"),
                             (self.message, "message"), (self.preview, "preview"),
                             (self.trained, "trained"),
                             (self.save_button, "save"), (self.summary, "summary"),
                             *[(n, "bar-name") for n in self.bar_names],
                             *[(v, "bar-value") for v in self.bar_values],
                             *[(c, "check") for c in self.checks]]:
            widget.add_class(f"rable-{name}")
        self._update_adjust()
        self._update_summary()

        self.uploader.observe(self._on_upload, "value")
        self.random_button.on_click(self._on_random)
        self.model.observe(self._on_model, "value")
        self.adjust.observe(self._on_model, "value")
        self.save_button.on_click(self._on_save)

        formats = ", ".join(EXTENSIONS.replace(".", "").split(",")[:6])
        bars = widgets.VBox([widgets.HBox([n, b, v]) for n, b, v in
                             zip(self.bar_names, self.bars, self.bar_values)])
        feedback = widgets.VBox([
            widgets.HTML("<b>Which labels are plausible?</b> Tick every one; the set is "
                         "saved as a partial label."),
            widgets.GridBox(self.checks, layout=widgets.Layout(
                grid_template_columns="repeat(5, 115px)")),
            widgets.HBox([self.save_button, self.summary])])
        self.widget = widgets.VBox([
            widgets.HTML(STYLE),
            widgets.HBox([self.uploader, self.random_button, self.model, self.trained]),
            widgets.HTML(f'<span style="color:#555">Models of the run <b>'
                         f"{html.escape(config.short_path(self.run_dir))}</b>. Images ({formats}, …) "
                         f"up to {max_bytes / 2**20:.0f} MB; they are cropped to a square and "
                         "shrunk to 32×32, as the model sees them.</span>"),
            widgets.HBox([self.adjust, self.adjust_note]),
            self.message,
            widgets.HBox([widgets.VBox([self.preview, self.caption],
                                       layout=widgets.Layout(width="200px", min_width="200px")),
                          widgets.VBox([widgets.HTML("<b>top-5 softmax</b>"), bars])]),
            feedback])
        self.widget.add_class("rable-app")

    # -- display ----------------------------------------------------------------------
    def show_message(self, text: str, error: bool = False) -> None:
        colour = "#b00020" if error else "#555"
        self.message.value = f'<span style="color:{colour}">{html.escape(text)}</span>'

    @property
    def adjusted(self) -> bool:
        """Whether the prediction shown subtracts a logit prior (ticked and available)."""
        return self.adjust.value and not self.adjust.disabled

    def _update_adjust(self) -> None:
        """Enable the adjustment only for a model with a logit prior, and say why not; say
        how many feedback images the selected model was trained on."""
        n = self.feedback_trained.get(self.model.value, 0)
        self.trained.value = (f'<span style="color:#555">trained on '
                              f"{config.plural(n, 'feedback image')}</span>")
        has_prior = self.models[self.model.value]["prior"] is not None
        self.adjust.disabled = not has_prior
        self.adjust_note.value = (
            f'<span style="color:#555">({self.ADJUST_HELP})</span>' if has_prior else
            f'<span style="color:#555">(not available for <b>{html.escape(self.model.value)}'
            "</b>: it has no logit prior; only <code>+records</code> models carry one)</span>")

    def _update_summary(self) -> None:
        text = html.escape(feedback_summary(self.run_dir))
        self.summary.value = f'<span style="color:#555">{text}</span>'

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
        self._update_summary()
        self.show_message(f"Saved {{{', '.join(entry['candidates'])}}} for {cur['source']} "
                          f"to {config.short_path(self.run_dir / FEEDBACK_FILE)}.")

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
        self.preview.value, self.caption.value = PLACEHOLDER, ""
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
