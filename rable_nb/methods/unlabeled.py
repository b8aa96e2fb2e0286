"""+unlabeled: real unlabeled images, pseudo-labelled by an intermediate model, join the
training set (Yang & Xu, NeurIPS 2020, "Rethinking the value of labels for improving
class-imbalanced learning", the semi-supervised half; official code
YyzHarry/imbalanced-semi-self).

The modifier changes only the data: it asks for the ``unlabeled`` source, which the
trainer's data preparation fills with the CIFAR-10 training images the long tail left out,
every class a candidate, then pseudo-labelled (``rable_nb/parts/unlabeled.py`` states the rule).
The base method's step is unchanged, so ``able+unlabeled``, ``ssp+unlabeled``,
``corr+unlabeled+records`` … compose as usual. ``supervised`` is refused: it trains on
the hidden labels, which unlabeled images must not give away.
"""
from __future__ import annotations

from .base import Modifier


class Unlabeled(Modifier):
    name = "unlabeled"
    approach = "real unlabeled"
    data_sources = ("unlabeled",)

    @classmethod
    def incompatible(cls, base, others):
        if not base.disambiguates:
            return (f"{base.name!r} trains on the hidden true labels; unlabeled images have "
                    "none to give (use a partial-label method)")
        return None
