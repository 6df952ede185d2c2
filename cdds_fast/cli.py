"""``cdds-fast`` command line: ``train``, ``demo``, ``eval``, ``bench``.

Each subcommand lives in its own module and is imported only when used, so ``cdds-fast --help``
starts fast and a subcommand's heavy imports (open_clip_train, matplotlib) stay out of the others.
"""

from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {
    "train": ("cdds_fast.train", "train CLIP with CDDSLoss through open_clip_train (open_clip flags + --cdds-*)"),
    "demo": ("cdds_fast.demo", "train a tiny CLIP with ClipLoss and with CDDSLoss on the embedded data, compare retrieval"),
    "eval": ("cdds_fast.evaluate", "evaluate a checkpoint on Karpathy-format data or the embedded test split"),
}


def _usage() -> str:
    lines = ["usage: cdds-fast {" + ",".join(SUBCOMMANDS) + "} [args...]", "", "subcommands:"]
    lines += [f"  {name:<6} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    lines += ["", "Run 'cdds-fast SUBCOMMAND --help' for a subcommand's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"cdds-fast: unknown subcommand {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
