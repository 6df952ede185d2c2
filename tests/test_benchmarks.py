"""The benchmark scripts stay runnable: CPU smoke runs of their --quick modes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_report_quick_writes_markdown_json_and_plot(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "OPENBLAS_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    res = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "report.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    report = json.loads((tmp_path / "report.json").read_text())
    (row,) = [r for r in report["cdds"] if r["dtype"] == "float32"]
    assert row["impl"] == "eager reference" and row["full_ms"] > 0
    assert (tmp_path / "report.md").read_text().startswith("# Benchmark report")
    assert (tmp_path / "cdds_loss.png").stat().st_size > 1000


def test_report_contrastive_part_on_rows_run_table_made(tmp_path, monkeypatch):
    """The report's InfoNCE part runs only with CUDA (the device run would be its first run):
    here its arguments come from bench_contrastive's own parser, its table and plot are made from
    rows that ``run_table`` measured on CPU (interpreter, tiny sizes: the numbers mean nothing),
    with stand-in GEMM rates."""
    sys.path.insert(0, str(ROOT))
    from benchmarks import bench_contrastive, report

    args = report.contrastive_args(quick=True)
    assert args.sizes == [1024, 4096] and args.dim == 512 and args.methods is None
    monkeypatch.setattr(bench_contrastive, "DEVICE", "cpu")
    args.sizes, args.dim, args.dtypes, args.warmup, args.rep = [40], 24, ["fp32", "bf16"], 1, 1
    args.methods, args.compile_dtypes = ["FusedClipLoss", "ClipLoss"], []
    rows = bench_contrastive.run_table(args)
    assert {(r["dtype"], r["method"]) for r in rows} == {
        (d, m) for d in ("fp32", "bf16") for m in ("FusedClipLoss", "ClipLoss")
    }
    lines = report.contrastive_section(rows, {"matmul_bf16_TFLOPs": 2.0, "matmul_fp32_TFLOPs": 1.0})
    assert lines[0] == "## Symmetric InfoNCE (D = 24)"
    table = [line for line in lines if line.startswith("| fp32") or line.startswith("| bf16")]
    assert len(table) == len(rows)
    for r in rows:
        rate = 2.0 if r["dtype"] == "bf16" else 1.0
        assert r["matmul_roofline_fraction"] == pytest.approx(r["tflops"] / rate)
    (png,) = report.plot([], rows, tmp_path)
    assert png.name == "contrastive.png" and png.stat().st_size > 1000


@pytest.mark.parametrize("script", ["bench_cdds.py", "bench_contrastive.py", "bench_step.py"])
def test_gpu_scripts_exit_cleanly_without_cuda(script):
    env = {"PATH": "/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": ""}
    res = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "CUDA" in res.stdout or "cuda" in res.stdout


def test_bench_contrastive_smoke_on_cpu():
    """bench_contrastive's table, budget sweep and tile sweep run end to end (CPU, interpreter,
    tiny sizes: the numbers mean nothing; the GPU run must not be the first run of the code)."""
    env = {
        "PATH": "/usr/bin:/bin",
        "OPENBLAS_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "TRITON_INTERPRET": "1",
    }
    script = str(ROOT / "benchmarks" / "bench_contrastive.py")
    common = ["--device", "cpu", "--dim", "24", "--warmup", "1", "--rep", "1", "--verbose"]
    runs = [
        [
            "--sizes",
            "40",
            "--dtypes",
            "bf16",
            "--methods",
            "FusedClipLoss",
            "fused path",
            "blocked path",
            "ClipLoss",
            "compiled ClipLoss",
            "--compile-dtypes",
        ],
        ["--sizes", "300", "--dtypes", "fp32", "--budgets", "1", "2"],
        ["--dtypes", "fp32", "--tune", "--tune-b", "48"],
    ]
    for extra in runs:
        res = subprocess.run(
            [sys.executable, script, *common, *extra],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        assert res.returncode == 0, res.stderr[-2000:]
        table = [line for line in res.stdout.splitlines() if line.startswith("| ")]
        assert len(table) >= 3 and not any("error" in line for line in table), res.stdout


def test_gpu_check_script_names_files_that_exist():
    """The device run is rare and short: every test file and script gpu_check.sh names exists,
    and the script parses (a missing file would cost a stage of it)."""
    import re

    script = ROOT / "benchmarks" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    named = set(re.findall(r"\b((?:tests|benchmarks)/[\w/]+\.(?:py|sh))\b", script.read_text()))
    assert any(n.startswith("tests/") for n in named) and any(
        n.endswith("report.py") for n in named
    )
    missing = sorted(n for n in named if not (ROOT / n).is_file())
    assert not missing, missing


def test_cpu_relation_smoke():
    """cpu_relation's table runs end to end at a size where the chunks split the batch (D = 512,
    3 pairs a chunk): a row per path, the chunked one reporting its chunk."""
    res = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "cpu_relation.py"), "--batches", "4"]
        + ["--reps", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    rows = [line for line in res.stdout.splitlines() if line.startswith("| 4 |")]
    assert [r.split("|")[2].strip() for r in rows] == ["whole batch", "chunks"]
    assert [r.split("|")[3].strip() for r in rows] == ["4", "3"]


def test_sampling_tile_rows_on_cpu():
    """bench_cdds' sampling-tile comparison (the GPU run's report) runs end to end: both tile
    sizes agree with the default before they are timed, and the library's tile rule is back in
    place afterwards (interpreter, tiny shape: the times mean nothing)."""
    import torch

    from benchmarks import bench_cdds
    from cdds_fast.kernels import launch, sampling

    rows = bench_cdds.sampling_tile_rows(shape=(2, 4, 5, 48), dtype=torch.float32)
    labels = [f"fast (triton), sampling tiles of {e} elements a thread" for e in (4, 8)]
    assert [r["impl"] for r in rows] == labels
    assert all(r["full_ms"] > 0 for r in rows)
    assert sampling.pairwise_tiles is launch.pairwise_tiles
