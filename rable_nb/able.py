"""Deprecated alias: the loss math moved to ``rable_nb/methods/`` (one file per method).

Kept so that older imports keep working; new code imports from ``rable_nb.methods``.
"""
from .methods._losses import (classifier_log_prior as log_prior, soft_cross_entropy,  # noqa: F401
                              uniform_confidence, updated_confidence)
from .methods.able import ambiguity_weights, contrastive_loss, pseudo_labels  # noqa: F401
from .methods.records import momentum_mean as records_update  # noqa: F401
