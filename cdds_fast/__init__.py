"""cdds-fast: CDDS cross-modal alignment loss for open_clip, with Triton kernels.

Public API:
    CDDSLoss, CDDSHead, DualPathDecoupler   (nn.Modules)
    FusedClipLoss                           (O(B)-memory drop-in for open_clip's ClipLoss)
    cdds_fast.functional.cdds_loss          (functional form, backend dispatch)
    cdds_fast.functional.info_nce           (fused symmetric InfoNCE)
    cdds_fast.reference                     (plain-PyTorch reference of every op)
"""

from cdds_fast.contrastive import FusedClipLoss
from cdds_fast.functional import cdds_loss, info_nce
from cdds_fast.modules import Block, CDDSHead, CDDSLoss, DualPathDecoupler

__version__ = "0.1.0"

__all__ = [
    "Block", "CDDSHead", "CDDSLoss", "DualPathDecoupler", "FusedClipLoss", "cdds_loss",
    "info_nce", "__version__",
]
