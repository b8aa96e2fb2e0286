"""RABLE: ABLE trained on the long tail plus the generated images of ``synthetic/``.

The loss, views and confidence update are ABLE's (``able.py``); only the training data
differ: the trainer's data preparation appends the synthetic images (labels exact or
partial, ``SYNTHETIC_LABELS``) because this method asks for the ``synthetic`` source.
"""
from __future__ import annotations

from .able import Able


class Rable(Able):
    name = "rable"
    approach = "generated"
    data_sources = ("synthetic",)
