"""Packaging: one import package, ``cdds_fast``; kernels/ and reference/ ship inside it."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, str]:
    """The wheel, and everything the build printed. Built from a copy of the tree without build
    outputs: setuptools reuses an existing ``build/`` folder and would ship modules that have
    since been moved or deleted."""
    out = tmp_path_factory.mktemp("wheel")
    src = tmp_path_factory.mktemp("src") / "cdds-fast"
    shutil.copytree(
        ROOT,
        src,
        ignore=shutil.ignore_patterns(
            ".git",
            ".venv",
            "build",
            "dist",
            "*.egg-info",
            "__pycache__",
            ".whl",
            ".hypothesis",
            ".pytest_cache",
            ".benchmarks",
            "logs",
            "demo_out",
            "results",
        ),
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-v",
            "-w",
            str(out),
            str(src),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    (path,) = out.glob("cdds_fast-*.whl")
    return path, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def wheel(built) -> Path:
    return built[0]


def test_build_prints_no_deprecation_warning_and_declares_the_license(built):
    path, log = built
    assert "DeprecationWarning" not in log, log[-3000:]
    metadata = zipfile.ZipFile(path).read("cdds_fast-0.1.0.dist-info/METADATA").decode()
    assert "License-Expression: Apache-2.0" in metadata


def test_wheel_has_one_top_level_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"cdds_fast"}, top
    for module in (
        "cdds_fast/kernels/launch.py",
        "cdds_fast/reference/loss.py",
        "cdds_fast/contract.py",
        "cdds_fast/cli.py",
        "cdds_fast/open_clip/model.py",
        "cdds_fast/data/scenes.py",
        "cdds_fast/eval/command.py",
    ):
        assert module in names
    # every module of the tree, and nothing else (no stale build outputs)
    tree = {
        str(p.relative_to(ROOT))
        for p in ROOT.glob("cdds_fast/**/*.py")
        if "__pycache__" not in p.parts
    }
    tree |= {
        "cdds_fast/" + str(p.relative_to(ROOT))
        for d in ("kernels", "reference")
        for p in (ROOT / d).glob("*.py")
    }
    assert {n for n in names if n.endswith(".py")} == tree


def test_installed_tree_has_no_stray_packages(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "-q",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
    )
    entries = {p.name for p in target.iterdir()}
    assert "kernels" not in entries and "reference" not in entries, entries
    assert "cdds_fast" in entries
    metadata = next(target.glob("cdds_fast-*.dist-info")) / "METADATA"
    text = metadata.read_text()
    assert "Name: cdds-fast" in text
    assert "Requires-Python: >=3.10" in text
    for dep in ("torch", "triton", "open_clip_torch", "einops", "tqdm"):
        assert f"Requires-Dist: {dep}" in text
    entry_points = (metadata.parent / "entry_points.txt").read_text()
    assert "cdds-fast = cdds_fast.cli:main" in entry_points
    # The installed copy imports on its own (no repo on the path) and finds its subpackages.
    code = (
        "import cdds_fast.reference, cdds_fast.kernels.launch, sys;"
        "print(cdds_fast.reference.__file__)"
    )
    res = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env={"PYTHONPATH": str(target)},
        capture_output=True,
        text=True,
        check=True,
    )
    assert str(target) in res.stdout


def test_editable_install_maps_subpackages_to_repo_folders():
    import cdds_fast.kernels
    import cdds_fast.reference

    assert Path(cdds_fast.reference.__file__).parent == ROOT / "reference"
    assert Path(cdds_fast.kernels.__file__).parent == ROOT / "kernels"


def test_console_script_runs():
    exe = Path(sys.executable).parent / "cdds-fast"
    res = subprocess.run([str(exe), "--help"], capture_output=True, text=True, check=True)
    assert "train" in res.stdout and "demo" in res.stdout
