"""``cdds-fast eval``: image-text retrieval of a checkpoint or an open_clip model.

Models (one of):

* ``--checkpoint PATH``: a checkpoint written by ``cdds-fast train`` (open_clip's
  ``{"state_dict": ...}``, DDP ``module.`` prefixes allowed). A CDDS checkpoint (it has ``head.*``
  weights) is loaded with :meth:`cdds_fast.open_clip.CDDSModel.from_checkpoint`, which takes the
  model name and head settings from the ``cdds_config.json`` the launcher writes next to the
  checkpoints; retrieval then uses the pooled semantic components (the model's ``encode_image`` /
  ``encode_text``), or the CLIP towers' own features with ``--features clip``. A ``--cdds-off``
  checkpoint (no head) is a plain open_clip model and needs ``--model``.
* ``--model NAME [--pretrained TAG_OR_PATH]``: a plain open_clip model (``--pretrained`` is an
  open_clip tag or a checkpoint file; none: random init).

``--cdds-model-config PATH`` (repeatable; the same flag as ``cdds-fast train``'s, also accepted as
``--model-config``) registers custom open_clip model config JSONs first.

Data (one of): ``--karpathy-json PATH --image-root DIR [--split test] [--coco-1k]`` (Flickr30K /
MS-COCO Karpathy splits; ``--coco-1k`` reports the mean over 5 folds of the test split, the
MS-COCO 1K protocol, next to the whole split), ``--csv PATH`` (open_clip's CSV format), or, by
default, the test split of the embedded captioned scenes (:class:`cdds_fast.data.SceneCaptions`,
rendered at the model's image size).

Prints the table of :func:`cdds_fast.eval.retrieval.format_table` (I->T / T->I R@1/5/10, rSum, mean
ranks); ``--json-out`` writes the metrics with the model and data description. The ranking rules
(:data:`RANK_RULES`) differ from open_clip trainer's validation metrics where captions or images
repeat; ``cdds-fast eval --help`` states both.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from cdds_fast.cli import register_model_configs
from cdds_fast.open_clip import eval_transform, quiet_random_init, register_sidecar_model
from cdds_fast.open_clip.checkpoint import Checkpoint, read_checkpoint

__all__ = ["build_parser", "evaluate", "load_model", "main"]

_PRECISIONS = {"fp32": None, "amp": torch.float16, "amp_bf16": torch.bfloat16}

#: How ``cdds-fast eval`` ranks, and why open_clip's trainer can report other numbers on the same
#: data.
RANK_RULES = (
    "Ranks: rows with the same image are one image with several captions; image->text ranks an "
    "image's best-ranked caption, and ties count in the query's favour (rank = 1 + the number of "
    "strictly higher scores), so identical captions or duplicate images never push a correct item "
    "down. open_clip's trainer (val metrics in results.jsonl) treats every CSV row as its own "
    "image-caption pair and breaks ties by sort order: where captions or images repeat, its R@K "
    "and mean ranks differ from these."
)


def build_parser() -> argparse.ArgumentParser:
    """The eval command's flags: one declaration per flag, long by nature and kept in one place
    so that ``--help`` reads as the code does."""
    p = argparse.ArgumentParser(
        prog="cdds-fast eval",
        description="Image-text retrieval (R@1/5/10, rSum, mean rank) of a cdds-fast train "
        "checkpoint or an open_clip model on Karpathy-format data, a CSV, or the embedded test "
        "split.",
        epilog=RANK_RULES,
    )
    m = p.add_argument_group("model")
    m.add_argument("--checkpoint", metavar="PATH", help="checkpoint written by cdds-fast train")
    m.add_argument(
        "--model",
        metavar="NAME",
        help="open_clip model name (default for --checkpoint: from cdds_config.json next to it)",
    )
    m.add_argument(
        "--pretrained",
        metavar="TAG_OR_PATH",
        default=None,
        help="open_clip pretrained tag or weights file for --model (default: random init)",
    )
    m.add_argument(
        "--cdds-model-config",
        "--model-config",
        dest="model_config",
        metavar="PATH",
        action="append",
        default=[],
        help="register an open_clip model config JSON (file or folder); repeatable "
        "(as in cdds-fast train; a checkpoint's cdds_config.json already holds its config)",
    )
    m.add_argument(
        "--cdds-heads",
        type=int,
        default=None,
        help="attention heads of a CDDS checkpoint's head (default: from cdds_config.json, "
        "else 8); only needed without the side-car, since the weights do not record it",
    )
    m.add_argument(
        "--features",
        choices=("semantic", "clip"),
        default="semantic",
        help="for a CDDS checkpoint: pooled semantic components (default) or the CLIP "
        "towers' own pooled features",
    )
    d = p.add_argument_group("data (default: the embedded captioned-scenes test split)")
    d.add_argument(
        "--karpathy-json", metavar="PATH", help="dataset_flickr30k.json / dataset_coco.json"
    )
    d.add_argument(
        "--image-root", metavar="DIR", help="folder the Karpathy / CSV image paths are relative to"
    )
    d.add_argument("--split", default="test", help="Karpathy split (default test)")
    d.add_argument(
        "--coco-1k",
        action="store_true",
        help="MS-COCO 1K protocol: mean over 5 folds of the test split (plus the whole split)",
    )
    d.add_argument("--csv", metavar="PATH", help="open_clip CSV (one row per image-caption pair)")
    d.add_argument("--csv-img-key", default="filepath", help="CSV image column (default filepath)")
    d.add_argument("--csv-caption-key", default="title", help="CSV caption column (default title)")
    d.add_argument("--csv-separator", default="\t", help="CSV separator (default tab)")
    d.add_argument(
        "--embedded-size",
        type=int,
        default=None,
        help="images of the embedded test split (default 500)",
    )
    d.add_argument("--seed", type=int, default=0, help="seed of the embedded data (default 0)")
    r = p.add_argument_group("run")
    r.add_argument(
        "--batch-size", type=int, default=64, help="images / captions per forward (default 64)"
    )
    r.add_argument("--workers", type=int, default=0, help="image loading workers (default 0)")
    r.add_argument(
        "--device", default=None, help="torch device (default: cuda if available, else cpu)"
    )
    r.add_argument(
        "--precision",
        choices=tuple(_PRECISIONS),
        default="fp32",
        help="fp32 (default), amp (fp16 autocast) or amp_bf16",
    )
    r.add_argument("--name", default=None, help="column label in the table")
    r.add_argument("--json-out", metavar="PATH", help="write metrics and run description as JSON")
    r.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    return p


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------


def load_model(
    *,
    checkpoint: str | os.PathLike | None = None,
    model: str | None = None,
    pretrained: str | None = None,
    model_configs: list[str] = (),
    device: str | torch.device = "cpu",
    cdds_heads: int | None = None,
) -> tuple[torch.nn.Module, str, dict[str, Any]]:
    """Build the model to evaluate, in eval mode.

    Args:
        checkpoint: a ``cdds-fast train`` checkpoint (CDDS or ``--cdds-off``), or None.
        model: open_clip model name (required without ``checkpoint``; for a checkpoint, overrides
            the side-car's name).
        pretrained: open_clip pretrained tag / weights file (``checkpoint=None`` only).
        model_configs: open_clip model config JSON files / folders to register first.
        device: where the model goes.
        cdds_heads: override the CDDS head's attention-head count (default: the side-car's).
    Returns:
        ``(model, model_name, info)``: ``info`` describes what was loaded (``kind`` is ``"cdds"``
        for a :class:`~cdds_fast.open_clip.CDDSModel`, else ``"clip"``).
    """
    import open_clip

    register_model_configs(model_configs)
    if checkpoint is not None:
        if pretrained:
            raise ValueError(
                "--pretrained goes with --model alone; a --checkpoint has its own weights"
            )
        return _checkpoint_model(
            read_checkpoint(checkpoint, argument="--checkpoint"), model, device, cdds_heads
        )
    if not model:
        raise ValueError("a model is needed: pass --checkpoint PATH or --model NAME")
    clip = open_clip.create_model(model, pretrained, device=device)
    return clip.eval(), model, {"kind": "clip", "model": model, "pretrained": pretrained}


def _checkpoint_model(
    checkpoint: Checkpoint, model: str | None, device: str | torch.device, cdds_heads: int | None
) -> tuple[torch.nn.Module, str, dict[str, Any]]:
    """:func:`load_model` for a checkpoint: with a CDDS head a :class:`CDDSModel` (its settings
    from the side-car), without one (``--cdds-off``) the plain open_clip model."""
    import open_clip

    from cdds_fast.open_clip import CDDS_CONFIG_FILENAME, CDDSModel

    path = checkpoint.path
    name = model or checkpoint.sidecar.get("model")
    if checkpoint.has_head:
        if not name:
            raise ValueError(
                f"--checkpoint {path}: no {CDDS_CONFIG_FILENAME} beside it to name the model: pass "
                f"--model NAME (and --model-config PATH for a custom config, --cdds-heads N if the "
                f"head did not use 8 heads)"
            )
        extra = {} if cdds_heads is None else {"heads": cdds_heads}
        with quiet_random_init():
            wrapper = CDDSModel.from_checkpoint(checkpoint, model_name=name, device=device, **extra)
        info = {
            "kind": "cdds",
            "model": name,
            "checkpoint": str(path),
            "cdds_head": dict(wrapper.cdds_config),
        }
        return wrapper.eval(), name, info
    if not name:
        raise ValueError(
            f"--checkpoint {path} has no CDDS head (a --cdds-off run) and no cdds_config.json "
            f"beside it: pass --model NAME"
        )
    register_sidecar_model(checkpoint.sidecar)
    with quiet_random_init():
        clip = open_clip.create_model(name, None, device=device)
    clip.load_state_dict(checkpoint.state)
    return clip.eval(), name, {"kind": "clip", "model": name, "checkpoint": str(path)}


def _image_size(model: torch.nn.Module) -> int:
    size = getattr(model.visual, "image_size", 224)
    return int(size[0] if isinstance(size, (tuple, list)) else size)


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def load_data(args: argparse.Namespace, image_size: int):
    """The retrieval dataset the flags select, and a description of it."""
    chosen = [n for n, v in (("--karpathy-json", args.karpathy_json), ("--csv", args.csv)) if v]
    if len(chosen) > 1:
        raise ValueError(f"choose one data source, got {' and '.join(chosen)}")
    if args.coco_1k and not args.karpathy_json:
        raise ValueError("--coco-1k goes with --karpathy-json (the MS-COCO Karpathy split)")
    if args.karpathy_json:
        from cdds_fast.data import KarpathyRetrieval

        if not args.image_root:
            raise ValueError("--karpathy-json needs --image-root DIR (the folder of the images)")
        if args.coco_1k and args.split != "test":
            raise ValueError(f"--coco-1k needs --split test, got --split {args.split}")
        ds = KarpathyRetrieval(args.karpathy_json, args.image_root, args.split)
        desc = {
            "source": "karpathy",
            "json": str(args.karpathy_json),
            "split": args.split,
            "dataset": ds.dataset_name,
        }
    elif args.csv:
        from cdds_fast.data import CsvRetrieval

        ds = CsvRetrieval(
            args.csv,
            args.csv_img_key,
            args.csv_caption_key,
            args.csv_separator,
            image_root=args.image_root,
        )
        desc = {"source": "csv", "csv": str(args.csv)}
    else:
        from cdds_fast.data import SceneCaptions

        ds = SceneCaptions(
            "test", size=args.embedded_size, image_size=max(16, image_size), seed=args.seed
        )
        desc = {"source": "embedded", "dataset": repr(ds)}
    desc.update(images=ds.num_images, captions=ds.num_captions)
    return ds, desc


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """Run the evaluation the parsed flags describe; returns the result dict."""
    import open_clip

    from cdds_fast.eval.retrieval import (
        encode_dataset,
        fold_metrics,
        format_table,
        retrieval_metrics,
    )

    t0 = time.perf_counter()
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, name, info = load_model(
        checkpoint=args.checkpoint,
        model=args.model,
        pretrained=args.pretrained,
        model_configs=args.model_config,
        device=device,
        cdds_heads=args.cdds_heads,
    )
    encoder = model
    if info["kind"] == "cdds":
        info["features"] = args.features
        if args.features == "clip":
            encoder = model.clip
    else:
        info["features"] = "clip"
    tokenizer = open_clip.get_tokenizer(name, context_length=model.context_length)
    ds, data = load_data(args, _image_size(model))
    enc = encode_dataset(
        encoder,
        ds,
        batch_size=args.batch_size,
        device=device,
        transform=eval_transform(model),
        tokenizer=tokenizer,
        num_workers=args.workers,
        autocast_dtype=_PRECISIONS[args.precision],
        disable=args.no_progress,
    )
    label = args.name or (f"{name} (CDDS {info['features']})" if info["kind"] == "cdds" else name)
    result: dict[str, Any] = {"model": info, "data": data, "precision": args.precision}
    if args.coco_1k:
        if ds.num_images % 5:
            raise ValueError(f"--coco-1k: {ds.num_images} test images do not split into 5 folds")
        mean, folds = fold_metrics(*enc, n_folds=5)
        whole = retrieval_metrics(*enc)
        n_fold = ds.num_images // 5
        whole_label = "5K" if ds.num_images == 5000 else f"all {ds.num_images}"
        columns = {f"{label}: 1K folds mean": mean, f"{label}: {whole_label}": whole}
        result.update(metrics=mean, metrics_whole_split=whole, folds=folds, fold_images=n_fold)
    else:
        columns = {label: retrieval_metrics(*enc)}
        result["metrics"] = columns[label]
    result["table"] = format_table(columns)
    result["seconds"] = time.perf_counter() - t0
    return result


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``cdds-fast eval``; returns the exit status (2 on bad flags or inputs)."""
    args = build_parser().parse_args(argv)
    try:
        result = evaluate(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"cdds-fast eval: {e}", file=sys.stderr)
        return 2
    data, model = result["data"], result["model"]
    where = model.get("checkpoint") or (
        model["model"] + (f" ({model['pretrained']})" if model.get("pretrained") else "")
    )
    print(f"model: {where} [{model['kind']}, features: {model['features']}]")
    print(
        f"data: {data['source']} ({data['images']} images, {data['captions']} captions)"
        + (
            f", MS-COCO 1K protocol: 5 folds of {result['fold_images']} images"
            if "folds" in result
            else ""
        )
    )
    print()
    print(result["table"])
    if args.json_out:
        out = {k: v for k, v in result.items() if k != "table"}
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(out, indent=1))
        print(f"\nwrote {args.json_out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
