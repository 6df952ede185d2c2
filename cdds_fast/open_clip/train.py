"""``cdds-fast train``: open_clip's trainer with the CDDS head and :class:`cdds_fast.CDDSLoss`.

Runs ``open_clip_train.main.main`` unmodified. Three names are patched for the duration of the
run (and restored afterwards):

* ``open_clip_train.main.create_model_and_transforms``: the created model is wrapped in
  :class:`cdds_fast.open_clip.CDDSModel` (after open_clip has set its device and precision; the
  head follows the tower's dtype);
* ``open_clip_train.main.create_loss``: returns :class:`cdds_fast.CDDSLoss` with ClipLoss's
  distributed arguments (``--local-loss``, ``--gather-with-grad``, rank, world size);
* ``torch.nn.parallel.DistributedDataParallel``: a subclass that drops ``device_ids`` for CPU
  modules (open_clip passes ``device_ids=[device]`` even on CPU, which DDP rejects), so a gloo
  ``torchrun`` on CPU works.

Usage: ``cdds-fast train <open_clip_train flags> [--cdds-* flags]``; ``--cdds-off`` trains plain
CLIP on the same pipeline (with :class:`cdds_fast.FusedClipLoss`; distillation, CoCa and SigLIP
runs with open_clip's own loss). See docs/open_clip.md for complete commands.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any
from unittest import mock

import torch

from cdds_fast.cli import missing_extra, refuse_settings, register_model_configs
from cdds_fast.open_clip import CDDS_CONFIG_FILENAME, CDDSModel

__all__ = ["build_parser", "main", "patched_open_clip_train", "write_sidecar"]


def build_parser() -> argparse.ArgumentParser:
    """Parser of the ``--cdds-*`` flags only (everything else goes to open_clip_train): one
    declaration per flag, long by nature and kept in one place so that ``--help`` reads as the code
    does."""
    p = argparse.ArgumentParser(
        prog="cdds-fast train",
        description=(
            "Train CLIP with the CDDS loss through open_clip_train. Every flag not listed here is "
            "passed to open_clip_train unchanged (see: python -m open_clip_train.main --help)."
        ),
        allow_abbrev=False,
        add_help=False,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "-h",
        "--help",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show this help and open_clip's flags",
    )
    g = p.add_argument_group("CDDS loss (docs/method.md section 5)")
    g.add_argument(
        "--cdds-a-c", type=float, default=1.0, help="weight of the CLIP InfoNCE term (0 = paper)"
    )
    g.add_argument(
        "--cdds-a-s", type=float, default=1.0, help="weight of the x-semantic InfoNCE term"
    )
    g.add_argument("--cdds-a-m", type=float, default=0.1, help="weight of the modality KL term")
    g.add_argument(
        "--cdds-a-f",
        type=float,
        default=0.5,
        help="completeness weight (x-completeness gets 1 - a_f)",
    )
    g.add_argument("--cdds-tau-kl", type=float, default=1.0, help="related-weights temperature")
    g.add_argument("--cdds-rho", type=float, default=0.01, help="related-weights threshold clamp")
    g.add_argument(
        "--cdds-backend",
        default="auto",
        choices=("auto", "triton", "reference"),
        help="loss backend: auto = Triton on CUDA, reference (plain PyTorch) on CPU",
    )
    h = p.add_argument_group("CDDS head (docs/method.md section 1)")
    h.add_argument(
        "--cdds-enc-layers", type=int, default=2, help="shared encoder blocks per modality"
    )
    h.add_argument(
        "--cdds-dec-layers", type=int, default=2, help="blocks per decoder (semantic, modality)"
    )
    h.add_argument("--cdds-heads", type=int, default=8, help="attention heads of the head's blocks")
    h.add_argument("--cdds-z", type=int, default=4, help="noise groups in training")
    h.add_argument("--cdds-sigma", type=float, default=0.1, help="noise std in training")
    o = p.add_argument_group("other")
    o.add_argument(
        "--cdds-off",
        action="store_true",
        help="plain CLIP baseline: no wrapper, contrastive loss only (FusedClipLoss or ClipLoss)",
    )
    o.add_argument(
        "--cdds-model-config",
        action="append",
        default=[],
        metavar="PATH",
        help="register an open_clip model config JSON (file or folder) before creating the "
        "model; repeatable",
    )
    return p


def _head_kwargs(cfg: argparse.Namespace) -> dict[str, Any]:
    return dict(
        n_enc=cfg.cdds_enc_layers,
        n_dec=cfg.cdds_dec_layers,
        heads=cfg.cdds_heads,
        z=cfg.cdds_z,
        sigma=cfg.cdds_sigma,
    )


def _loss_kwargs(cfg: argparse.Namespace) -> dict[str, Any]:
    return dict(
        a_c=cfg.cdds_a_c,
        a_s=cfg.cdds_a_s,
        a_m=cfg.cdds_a_m,
        a_f=cfg.cdds_a_f,
        tau_kl=cfg.cdds_tau_kl,
        rho=cfg.cdds_rho,
        backend=cfg.cdds_backend,
    )


def _clip_dist_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return dict(
        local_loss=args.local_loss,
        gather_with_grad=args.gather_with_grad,
        cache_labels=True,
        rank=args.rank,
        world_size=args.world_size,
        use_horovod=args.horovod,
    )


def _baseline_loss(args: argparse.Namespace, backend: str) -> torch.nn.Module:
    """``--cdds-off``: the contrastive loss open_clip would use, fused where we have one."""
    import open_clip

    if args.distill or "coca" in args.model.lower() or args.siglip:
        logging.info("cdds-fast: --cdds-off, loss = open_clip.create_loss(args)")
        return open_clip.create_loss(args)
    from cdds_fast.contrastive import FusedClipLoss

    logging.info(
        f"cdds-fast: --cdds-off, loss = cdds_fast.contrastive.FusedClipLoss(backend={backend!r})"
    )
    return FusedClipLoss(**_clip_dist_kwargs(args), backend=backend)


def _refuse_unsupported(args: argparse.Namespace) -> None:
    if args.siglip:
        raise ValueError(
            "--siglip: CDDS uses CLIP's softmax InfoNCE; drop --siglip or add --cdds-off"
        )
    if args.distill:
        raise ValueError("--distill-model: distillation is not supported with CDDS; add --cdds-off")
    if "coca" in args.model.lower():
        raise ValueError(
            f"--model {args.model}: CoCa models are not supported with CDDS; add --cdds-off"
        )


def write_sidecar(args: argparse.Namespace, cfg: argparse.Namespace) -> str:
    """Write ``cdds_config.json`` into ``args.checkpoint_path``: the model name, its open_clip
    config itself (not a path to the file it came from, so a moved run folder still loads), the
    head and loss settings (None for ``--cdds-off``). Returns the file's path."""
    import open_clip

    schema = ":" in args.model  # hf-hub: / local-dir: names carry their own config
    sidecar = {
        "model": args.model,
        "model_config": None if schema else open_clip.get_model_config(args.model),
        "pretrained": args.pretrained or None,
        "precision": args.precision,
        "cdds": None if cfg.cdds_off else {**_head_kwargs(cfg), **_loss_kwargs(cfg)},
    }
    os.makedirs(args.checkpoint_path, exist_ok=True)
    path = os.path.join(args.checkpoint_path, CDDS_CONFIG_FILENAME)
    with open(path, "w") as f:
        json.dump(sidecar, f, indent=2)
    return path


class _CpuSafeDDP(torch.nn.parallel.DistributedDataParallel):
    """DDP that ignores ``device_ids`` for CPU modules (open_clip passes ``[device]`` always)."""

    def __init__(
        self,
        module: torch.nn.Module,
        device_ids: Sequence[Any] | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        if device_ids is not None and all(torch.device(d).type == "cpu" for d in device_ids):
            device_ids = None
        super().__init__(module, device_ids, *args, **kwargs)


@contextlib.contextmanager
def patched_open_clip_train(cfg: argparse.Namespace) -> Iterator[Any]:
    """Patch ``open_clip_train.main`` for a CDDS run (see the module docstring); yields the module.

    Args:
        cfg: the parsed ``--cdds-*`` flags (:func:`build_parser`).
    """
    import open_clip
    import open_clip_train.main as oc_main

    def create_model_and_transforms(
        model_name: str, pretrained: str | None = None, *args: Any, **kwargs: Any
    ):
        model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
            model_name, pretrained, *args, **kwargs
        )
        if not cfg.cdds_off:
            model = CDDSModel(model, **_head_kwargs(cfg))  # forward returns the loss's dict
        return model, preprocess_train, preprocess_val

    def create_loss(args: argparse.Namespace) -> torch.nn.Module:
        if getattr(args, "save_logs", False) and getattr(args, "checkpoint_path", None):
            write_sidecar(args, cfg)
        if cfg.cdds_off:
            return _baseline_loss(args, cfg.cdds_backend)
        _refuse_unsupported(args)
        from cdds_fast.loss import CDDSLoss

        loss = CDDSLoss(**_loss_kwargs(cfg), **_clip_dist_kwargs(args))
        logging.info(f"cdds-fast: loss = CDDSLoss({_loss_kwargs(cfg)}), head = {_head_kwargs(cfg)}")
        return loss

    with (
        mock.patch.object(oc_main, "create_model_and_transforms", create_model_and_transforms),
        mock.patch.object(oc_main, "create_loss", create_loss),
        mock.patch.object(torch.nn.parallel, "DistributedDataParallel", _CpuSafeDDP),
    ):
        yield oc_main


#: The ``--cdds-*`` flag of each loss / head setting, for refusals that name the flag.
FLAGS = {
    "a_c": "--cdds-a-c",
    "a_s": "--cdds-a-s",
    "a_m": "--cdds-a-m",
    "a_f": "--cdds-a-f",
    "tau_kl": "--cdds-tau-kl",
    "rho": "--cdds-rho",
    "n_enc": "--cdds-enc-layers",
    "n_dec": "--cdds-dec-layers",
    "heads": "--cdds-heads",
    "z": "--cdds-z",
    "sigma": "--cdds-sigma",
}


def _refuse_flags(rest: list[str], cfg: argparse.Namespace) -> str | None:
    if cfg.cdds_off:
        return None
    refused = refuse_settings(_loss_kwargs(cfg), _head_kwargs(cfg), FLAGS)
    if refused:
        return refused
    for flag in ("--torchscript", "--trace", "--siglip", "--distill-model"):
        if any(a == flag or a.startswith(flag + "=") for a in rest):
            return f"{flag} is not supported with CDDS (add --cdds-off for a plain CLIP run)"
    return None


def _refuse_heads(rest: list[str], cfg: argparse.Namespace, open_clip: Any) -> str | None:
    """``--cdds-heads`` must divide the model's embedding dim (the head's width). The dim is in
    the model config, known before open_clip builds the model; a hub or local-dir model carries
    its own config and is checked when the head is built."""
    if cfg.cdds_off:
        return None
    model_flag = argparse.ArgumentParser(add_help=False)
    model_flag.add_argument("--model", default="RN50")  # open_clip_train's default
    name = model_flag.parse_known_args(rest)[0].model
    config = None if ":" in name else open_clip.get_model_config(name)
    dim = (config or {}).get("embed_dim")
    if dim and dim % cfg.cdds_heads:
        return (
            f"--cdds-heads: expected a divisor of the embedding dim {dim} of --model {name}, "
            f"got {cfg.cdds_heads}"
        )
    return None


@contextlib.contextmanager
def _logging_restored() -> Iterator[None]:
    """Undo what open_clip's ``setup_logging`` does on every call (root handlers added, every
    logger's level set), so that a second in-process run does not write into this run's log."""
    handlers_before = list(logging.root.handlers)
    levels_before = {
        name: logging.getLogger(name).level for name in logging.root.manager.loggerDict
    }
    root_level = logging.root.level
    try:
        yield
    finally:
        for handler in list(logging.root.handlers):
            if handler not in handlers_before:
                logging.root.removeHandler(handler)
                handler.close()
        logging.root.setLevel(root_level)
        for name, level in levels_before.items():
            logging.getLogger(name).setLevel(level)


def _print_help(parser: argparse.ArgumentParser) -> None:
    """The ``--cdds-*`` flags, then open_clip_train's own."""
    from open_clip_train.params import parse_args

    parser.print_help()
    print("\nopen_clip_train flags:\n")
    with contextlib.suppress(SystemExit):
        parse_args(["--help"])


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``cdds-fast train``.

    Args:
        argv: open_clip_train flags mixed with ``--cdds-*`` flags (default ``sys.argv[1:]``).
    Returns:
        0 on success, 1 when open_clip's ``main`` reports an error (it returns -1), 2 on bad flags.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    cfg, rest = parser.parse_known_args(argv)
    missing = missing_extra("open_clip_train.main")
    if missing:
        print(f"cdds-fast train: {missing}", file=sys.stderr)
        return 2
    if getattr(cfg, "help", False):
        _print_help(parser)
        return 0
    import open_clip

    try:
        problem = _refuse_flags(rest, cfg)
        if not problem:
            register_model_configs(cfg.cdds_model_config)
            problem = _refuse_heads(rest, cfg, open_clip)
    except FileNotFoundError as e:
        problem = str(e)
    if problem:
        print(f"cdds-fast train: {problem}", file=sys.stderr)
        return 2
    with _logging_restored(), patched_open_clip_train(cfg) as oc_main:
        rc = oc_main.main(rest)
    return 0 if rc is None or rc == 0 else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
