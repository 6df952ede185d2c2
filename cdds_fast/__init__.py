"""cdds-fast: CDDS cross-modal alignment loss for open_clip, with Triton kernels.

Public API (the map of the package is in docs/developing.md):
    CDDSLoss                                (the loss, a drop-in for open_clip's ClipLoss)
    CDDSHead, DualPathDecoupler             (the head that decouples token features)
    FusedClipLoss                           (O(B)-memory drop-in for open_clip's ClipLoss)
    cdds_fast.functional.cdds_loss          (functional form, backend dispatch)
    cdds_fast.functional.info_nce           (symmetric InfoNCE)
    cdds_fast.open_clip                     (CDDSModel: open_clip models with the head)
    cdds_fast.reference                     (plain-PyTorch reference of every op)
"""

from cdds_fast.contrastive import FusedClipLoss
from cdds_fast.functional import cdds_loss, info_nce
from cdds_fast.head import CDDSHead, DualPathDecoupler
from cdds_fast.loss import CDDSLoss

__version__ = "0.1.0"

__all__ = [
    "CDDSHead",
    "CDDSLoss",
    "DualPathDecoupler",
    "FusedClipLoss",
    "cdds_loss",
    "info_nce",
    "__version__",
]
