"""Checkpoints of ``cdds-fast train``: the state dict (open_clip's ``{"state_dict": ...}`` layout,
DDP / ``torch.compile`` key prefixes) and the ``cdds_config.json`` side-car the launcher writes next
to it (model name, the model's open_clip config, the head's settings)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "CDDS_CONFIG_FILENAME",
    "infer_depths",
    "load_cdds_checkpoint",
    "load_state",
    "read_cdds_config",
    "register_sidecar_model",
    "strip_state_dict_prefixes",
]

#: Name of the JSON side-car the launcher writes next to the checkpoints (model name + head config).
CDDS_CONFIG_FILENAME = "cdds_config.json"


def strip_state_dict_prefixes(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Remove DDP's ``module.`` and ``torch.compile``'s ``_orig_mod.`` key prefixes."""
    out = {}
    for key, value in state_dict.items():
        for prefix in ("module.", "_orig_mod."):
            while key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def load_state(path: Path) -> dict[str, Tensor]:
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(checkpoint, dict) and "state_dict" in checkpoint:
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict):
        raise ValueError(f"path: expected a checkpoint dict with a state dict, got {type(checkpoint).__name__}")
    return checkpoint


def read_cdds_config(path: Path) -> dict[str, Any]:
    """The ``cdds_config.json`` next to a checkpoint (its folder or the run folder), or ``{}``."""
    for candidate in (path.parent / CDDS_CONFIG_FILENAME, path.parent.parent / CDDS_CONFIG_FILENAME):
        if candidate.is_file():
            return json.loads(candidate.read_text())
    return {}


def register_sidecar_model(sidecar: dict[str, Any]) -> None:
    """Register the model config stored in a ``cdds_config.json`` under its model name, unless
    open_clip already has that name with the same config."""
    import open_clip

    name, config = sidecar.get("model"), sidecar.get("model_config")
    if not name or not config or open_clip.get_model_config(name) == config:
        return
    with tempfile.TemporaryDirectory(prefix="cdds_model_config_") as folder:
        (Path(folder) / f"{name}.json").write_text(json.dumps(config))
        open_clip.add_model_config(folder)  # reads the file now


def infer_depths(state: dict[str, Tensor]) -> dict[str, int]:
    """``n_enc`` / ``n_dec`` from the keys ``head.image_decoupler.{encoder,semantic_decoder}.<i>.``."""
    found: dict[str, int] = {}
    for key_name, part in (("n_enc", "encoder"), ("n_dec", "semantic_decoder")):
        prefix = f"head.image_decoupler.{part}."
        idx = {int(k[len(prefix):].split(".")[0]) for k in state if k.startswith(prefix)}
        if idx:
            found[key_name] = max(idx) + 1
    return found


def load_cdds_checkpoint(model: nn.Module, path: str | os.PathLike, strict: bool = True) -> nn.Module:
    """Load a ``cdds-fast train`` checkpoint into an existing :class:`CDDSModel` (or plain CLIP).

    Handles the trainer's ``{"state_dict": ...}`` layout and DDP's ``module.`` prefixes.
    Returns ``model`` (unchanged mode).
    """
    model.load_state_dict(strip_state_dict_prefixes(load_state(Path(path))), strict=strict)
    return model
