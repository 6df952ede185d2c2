"""The documentation as a new user follows it: every Python block of README.md and docs/*.md runs
as written, the docstrings cite sections of docs/method.md that exist, and the command behind
README's cost table stays runnable."""

from __future__ import annotations

import re
from argparse import Namespace
from pathlib import Path

import pytest
import torch

from tests._openclip_fixtures import HEADS, TINY_MODEL, tiny_config_dir

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
#: The training run the docs load ("after training"): created by the test, for a tiny model.
CHECKPOINT = Path("logs/cdds-b32/checkpoints/epoch_25.pt")
DOC_MODEL = "ViT-B-32"


def _blocks(path: Path) -> list[str]:
    return BLOCK.findall(path.read_text())


def _write_run(root: Path) -> None:
    """``CHECKPOINT`` as cdds-fast train leaves it (module.-prefixed state dict, side-car), of a
    tiny CDDSModel: a ViT-B-32 checkpoint would cost the suite 600 MB of disk and seconds of I/O."""
    import open_clip

    from cdds_fast.open_clip import CDDSModel
    from cdds_fast.open_clip.train import build_parser, write_sidecar

    tiny_config_dir()
    torch.manual_seed(0)
    model = CDDSModel(open_clip.create_model(TINY_MODEL), heads=HEADS, n_enc=1, n_dec=1)
    path = root / CHECKPOINT
    path.parent.mkdir(parents=True)
    state = {"module." + k: v for k, v in model.state_dict().items()}
    torch.save({"epoch": 25, "state_dict": state}, path)
    cfg = build_parser().parse_args(
        ["--cdds-heads", str(HEADS), "--cdds-enc-layers", "1", "--cdds-dec-layers", "1"]
    )
    write_sidecar(
        Namespace(
            model=TINY_MODEL, pretrained="", precision="fp32", checkpoint_path=str(path.parent)
        ),
        cfg,
    )


def _as_run(block: str) -> str:
    """The block's code as the test runs it: verbatim, except that a block loading the training
    run gets the tiny model's name where the docs name ViT-B-32 (its tokenizer must match)."""
    return block.replace(DOC_MODEL, TINY_MODEL) if "from_checkpoint(" in block else block


def test_the_docs_have_python_blocks():
    counts = {p.name: len(_blocks(p)) for p in DOCS}
    assert counts["README.md"] >= 3, counts


@pytest.mark.parametrize("path", [p for p in DOCS if _blocks(p)], ids=lambda p: p.name)
def test_python_blocks_run_as_written(path, tmp_path, monkeypatch):
    """Each file's blocks run in order in one namespace, in a fresh working directory."""
    monkeypatch.chdir(tmp_path)
    _write_run(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    for n, block in enumerate(_blocks(path)):
        exec(compile(_as_run(block), f"{path.name}, python block {n + 1}", "exec"), namespace)
    if path.name == "README.md":
        from cdds_fast.contract import LOSS_KEYS

        assert isinstance(namespace["out"], dict)  # the documented open_clip path
        assert set(namespace["losses"]) == set(LOSS_KEYS)
        assert torch.isfinite(namespace["loss"])
        assert namespace["similarity"].shape == (2, 2)


# ---------------------------------------------------------------- citations of docs/method.md
def _method_numbers() -> tuple[set[int], set[int]]:
    text = (ROOT / "docs" / "method.md").read_text()
    sections = {int(m) for m in re.findall(r"^## (\d+)\. ", text, re.M)}
    decisions_part = text.split("## Decisions", 1)[1]
    decisions = {int(m) for m in re.findall(r"^(\d+)\. \*\*", decisions_part, re.M)}
    return sections, decisions


CITATION = re.compile(r"docs/method\.md,? (sections?|decisions?) (\d+(?:(?:-| and |, )\d+)*)")


def _sources() -> list[Path]:
    folders = ("cdds_fast", "kernels", "reference", "benchmarks", "tests")
    return [p for f in folders for p in sorted((ROOT / f).rglob("*.py"))] + DOCS


def test_citations_of_method_md_name_sections_that_exist():
    sections, decisions = _method_numbers()
    assert sections >= {1, 2, 3, 4, 5, 6, 7} and decisions >= set(range(1, 12))
    cited = 0
    for path in _sources():
        for kind, numbers in CITATION.findall(path.read_text()):
            known = sections if kind.startswith("section") else decisions
            for number in map(int, re.findall(r"\d+", numbers)):
                cited += 1
                assert number in known, (
                    f"{path.relative_to(ROOT)} cites docs/method.md {kind} {number}"
                )
    assert cited > 20


# ---------------------------------------------------------------- README's cost table
def test_cost_command_runs(capsys):
    from benchmarks.cpu_cost import main as cost_main

    assert cost_main(["--quick", "--threads", str(torch.get_num_threads())]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][2:]
    assert rows[0].startswith("| ClipLoss (plain CLIP) |") and len(rows) == 7
    for row in rows:
        seconds, ratio = (float(x) for x in row.strip("| ").split(" | ")[-2:])
        assert seconds > 0 and ratio > 0, row
