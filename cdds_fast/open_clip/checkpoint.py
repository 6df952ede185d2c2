"""Checkpoints of ``cdds-fast train``: the state dict (open_clip's ``{"state_dict": ...}`` layout,
DDP / ``torch.compile`` key prefixes) and the ``cdds_config.json`` side-car the launcher writes next
to it (model name, the model's open_clip config, the head's settings)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

__all__ = [
    "CDDS_CONFIG_FILENAME",
    "Checkpoint",
    "infer_depths",
    "load_cdds_checkpoint",
    "read_cdds_config",
    "read_checkpoint",
    "register_sidecar_model",
    "strip_state_dict_prefixes",
]

#: Name of the JSON side-car the launcher writes next to the checkpoints (model name + head config).
CDDS_CONFIG_FILENAME = "cdds_config.json"


#: Key prefixes of wrapped models: DDP's and ``torch.compile``'s.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _strip_prefixes(key: str) -> str:
    while True:
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
                break
        else:
            return key


def strip_state_dict_prefixes(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Remove DDP's ``module.`` and ``torch.compile``'s ``_orig_mod.`` key prefixes, in whatever
    order the wrappers nested (``module._orig_mod.`` and ``_orig_mod.module.`` alike)."""
    return {_strip_prefixes(key): value for key, value in state_dict.items()}


def read_cdds_config(path: Path) -> dict[str, Any]:
    """The ``cdds_config.json`` next to a checkpoint (its folder or the run folder), or ``{}``."""
    for candidate in (
        path.parent / CDDS_CONFIG_FILENAME,
        path.parent.parent / CDDS_CONFIG_FILENAME,
    ):
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
    """``n_enc`` / ``n_dec`` from the state dict's keys
    ``head.image_decoupler.{encoder,semantic_decoder}.<i>.``."""
    found: dict[str, int] = {}
    for key_name, part in (("n_enc", "encoder"), ("n_dec", "semantic_decoder")):
        prefix = f"head.image_decoupler.{part}."
        idx = {int(k[len(prefix) :].split(".")[0]) for k in state if k.startswith(prefix)}
        if idx:
            found[key_name] = max(idx) + 1
    return found


class Checkpoint(NamedTuple):
    """A checkpoint file as :func:`read_checkpoint` leaves it: read once, checked once."""

    path: Path
    #: the model's state dict, DDP / ``torch.compile`` key prefixes stripped
    state: dict[str, Tensor]
    #: the ``cdds_config.json`` beside it (:func:`read_cdds_config`), ``{}`` without one
    sidecar: dict[str, Any]

    @property
    def has_head(self) -> bool:
        """Whether it holds a CDDS head (a ``--cdds-off`` run's checkpoint does not)."""
        return any(key.startswith("head.") for key in self.state)


def read_checkpoint(path: str | os.PathLike, *, argument: str = "path") -> Checkpoint:
    """Read a ``cdds-fast train`` checkpoint: open_clip's ``{"state_dict": ...}`` layout or a bare
    state dict, with or without DDP / ``torch.compile`` key prefixes; ``argument`` names the path
    in errors (``--checkpoint`` for the eval command)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{argument} {path}: no such file")
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    state = loaded["state_dict"] if isinstance(loaded, dict) and "state_dict" in loaded else loaded
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(
            f"{argument} {path}: expected an open_clip checkpoint ({{'state_dict': ...}}) or a "
            f"state dict of tensors, got {type(loaded).__name__}"
        )
    return Checkpoint(path, strip_state_dict_prefixes(state), read_cdds_config(path))


def load_cdds_checkpoint(
    model: nn.Module, path: str | os.PathLike, strict: bool = True
) -> nn.Module:
    """Load a ``cdds-fast train`` checkpoint into an existing :class:`CDDSModel` (or plain CLIP).

    Reads it with :func:`read_checkpoint`. Returns ``model`` (unchanged mode).
    """
    model.load_state_dict(read_checkpoint(path).state, strict=strict)
    return model
