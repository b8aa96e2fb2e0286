"""RABLE-feature: LDMLR's head fine-tuning (Han et al., 2024; AlvinHan123/LDMLR
``fine_tune_tr.py`` lines 98-148) with a partial-label loss.

The backbone — the one whose features the ``feature`` generator modelled
(``generator/backbone.safetensors``) — is frozen; the network starts from its weights, and
only the linear classifier is trained, on the real features (encoded once, without
augmentation) plus the synthetic features of notebook 03 (labels: their conditioning class,
``SYNTHETIC_LABELS``). LDMLR trains the head with cross-entropy on true labels; here the
real features keep their candidate sets:

- confidences start as the loaded model's disambiguated beliefs,
  s_i = normalise(Y_i ⊙ softmax(g(f_i))) (g: the classifier, f_i: the features), when
  the stage begins (a synthetic feature with exact labels: its one-hot class);
- L = −Σ_i w_i Σ_j s_ij log softmax(g(f_i))_j / Σ_i w_i (w: the per-sample weights,
  ``SYNTH_WEIGHT`` for synthetic features), then s_i ← normalise(Y_i ⊙ softmax(g(f_i)))
  — PRODEN's loss and update (``proden.py``) on the plain features.

``+records`` rebalances that update (and the test logits) with RECORDS' momentum feature
mean, which here is a mean of the frozen backbone's features. The optimiser and schedule are
the trainer's (SGD, cosine over ``EPOCHS``); LDMLR uses Adam (lr 1e-3) for 400 epochs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._losses import updated_confidence
from .proden import Proden

CHUNK = 4096  # samples per forward pass when the confidences are initialised


class RableFeature(Proden):
    name = "rable-feature"
    approach = "generated"
    views = ("plain",)
    mixup_views = ("plain",)
    inputs = "features"
    frozen = ("backbone", "head")
    data_sources = ("synthetic",)

    @torch.no_grad()
    def start_stage(self, trainer, stage):
        """Confidences ← the loaded model's disambiguated beliefs (in place)."""
        for idx in torch.arange(len(trainer.conf), device=trainer.dev).split(CHUNK):
            out = trainer.forward({"plain": trainer.batch_inputs(idx)}, "logits")
            probs = F.softmax(out.logits["plain"], dim=1)
            trainer.conf[idx] = updated_confidence(probs, trainer.cand[idx])
