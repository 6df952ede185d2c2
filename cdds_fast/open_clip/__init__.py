"""open_clip integration: the model wrapper (:class:`CDDSModel`), its checkpoints, and the
``cdds-fast train`` launcher (``cdds_fast.open_clip.train``, imported on demand: it needs the
``train`` extra)."""

from cdds_fast.open_clip.checkpoint import (
    CDDS_CONFIG_FILENAME,
    Checkpoint,
    load_cdds_checkpoint,
    read_checkpoint,
    register_sidecar_model,
    strip_state_dict_prefixes,
)
from cdds_fast.open_clip.model import CDDSModel, eval_transform, quiet_random_init, text_valid_mask

__all__ = [
    "CDDSModel",
    "CDDS_CONFIG_FILENAME",
    "Checkpoint",
    "eval_transform",
    "load_cdds_checkpoint",
    "quiet_random_init",
    "read_checkpoint",
    "register_sidecar_model",
    "strip_state_dict_prefixes",
    "text_valid_mask",
]
