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
