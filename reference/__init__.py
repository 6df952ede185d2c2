"""Plain-PyTorch reference of every CDDS op (installed as ``cdds_fast.reference``).

This is the executable form of docs/method.md: the Triton kernels and every test are checked
against it. It favours clarity over speed and materialises the ``[B, D, D]`` relation matrices
(the API's reference backend runs it with those built a bounded chunk of pairs at a time:
``cdds_fast.chunked_sampling``).
"""

from .common import masked_mean
from .constraints import modality_kl, reconstruction_loss
from .contrastive import info_nce, info_nce_gathered, pool
from .loss import cdds_loss
from .related import gaussian_kl, related_probabilities, related_weights
from .sampling import related_sampling, sampling_coefficients, x_semantic
from .stats import column_stats

__all__ = [
    "cdds_loss",
    "column_stats",
    "gaussian_kl",
    "info_nce",
    "info_nce_gathered",
    "masked_mean",
    "modality_kl",
    "pool",
    "reconstruction_loss",
    "related_probabilities",
    "related_sampling",
    "related_weights",
    "sampling_coefficients",
    "x_semantic",
]
