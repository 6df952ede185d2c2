"""``cdds-fast`` command line: ``train``, ``demo``, ``eval``.

Each subcommand lives in its own module and is imported only when used, so ``cdds-fast --help``
starts fast and a subcommand's heavy imports (open_clip_train, matplotlib) stay out of the others.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterable
from typing import Any

SUBCOMMANDS = {
    "train": (
        "cdds_fast.open_clip.train",
        "train CLIP with CDDSLoss through open_clip_train (open_clip flags + --cdds-*)",
    ),
    "demo": (
        "cdds_fast.demo",
        "train a tiny CLIP with ClipLoss and with CDDSLoss on the embedded data, compare retrieval",
    ),
    "eval": (
        "cdds_fast.eval.command",
        "evaluate a checkpoint on Karpathy-format data or the embedded test split",
    ),
}


def _usage() -> str:
    lines = ["usage: cdds-fast {" + ",".join(SUBCOMMANDS) + "} [args...]", "", "subcommands:"]
    lines += [f"  {name:<6} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    lines += ["", "Run 'cdds-fast SUBCOMMAND --help' for a subcommand's options."]
    return "\n".join(lines)


def refuse_settings(
    loss: dict[str, Any], head: dict[str, Any], flags: dict[str, str]
) -> str | None:
    """The library's refusal of a loss or head setting, with the setting named by its flag."""
    from cdds_fast.contract import check_head_settings, check_hyper

    try:
        check_hyper(**{k: v for k, v in loss.items() if k != "backend"})
        check_head_settings(**{"mlp_ratio": 4.0, **head})
    except (ValueError, TypeError) as e:
        name, _, rest = str(e).partition(":")
        return f"{flags.get(name, name)}:{rest}"
    return None


def register_model_configs(paths: Iterable[str]) -> None:
    """Register open_clip model config JSONs (files or folders), the ``--cdds-model-config``
    flag of ``train`` and ``eval``; a missing path raises FileNotFoundError naming it."""
    import open_clip

    for path in paths:
        if not os.path.exists(path):
            raise FileNotFoundError(f"--cdds-model-config {path}: no such file or folder")
        open_clip.add_model_config(path)


def missing_extra(module: str, extra: str = "train") -> str | None:
    """One line naming the extra to install when ``module`` (or a module it imports) is missing."""
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as e:
        return (
            f"needs the '{extra}' extra (missing Python module {e.name!r}): pip install "
            f"'cdds-fast[{extra}]', or from a clone: pip install '.[{extra}]'"
        )
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(_usage())
        return 0
    if not argv:  # a subcommand is required: usage on stderr, argparse's exit status for it
        print(f"cdds-fast: a subcommand is required\n\n{_usage()}", file=sys.stderr)
        return 2
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"cdds-fast: unknown subcommand {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
