"""Every Triton kernel compiles for sm_90 exactly as a GPU launch would specialise it.

The interpreter (how the parity tests run on CPU) checks what the kernels compute; this checks
that Triton's NVIDIA backend and ptxas accept them, at the odd shapes' launch settings, in a
subprocess without ``TRITON_INTERPRET`` (see ``benchmarks/kernel_resources.py``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: Every ``@triton.jit`` kernel of ``kernels/``; the launch plan has to reach each one.
KERNELS = {
    "_stats_fwd_kernel",
    "_stats_bwd_kernel",
    "_related_sampling_fwd_kernel",
    "_related_sampling_bwd_row_kernel",
    "_related_sampling_bwd_col_kernel",
    "_related_sampling_vec_kernel",
    "_row_lse_kernel",
    "_constraints_fwd_kernel",
    "_constraints_finalize_kernel",
    "_terms_grad_kernel",
    "_constraints_bwd_kernel",
    "_info_nce_fwd_kernel",
    "_info_nce_bwd_kernel",
    "_info_nce_block_fwd_kernel",
    "_info_nce_block_bwd_kernel",
    "_info_nce_finalize_kernel",
}


def _kernel_resources(*args: str, interpret: bool = False, timeout: int = 600):
    """``benchmarks/kernel_resources.py *args`` in a subprocess, without ``TRITON_INTERPRET``
    (or with it, ``interpret``): it must compile for the GPU, not build interpreter kernels."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "kernel_resources.py"), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _nvidia_backend() -> bool:
    try:
        from triton.backends.nvidia import compiler
    except Exception:
        return False
    return (Path(compiler.__file__).parent / "bin" / "ptxas").exists()


@pytest.mark.skipif(not _nvidia_backend(), reason="triton without its NVIDIA backend / ptxas")
def test_every_kernel_compiles_for_sm90(tmp_path):
    out = tmp_path / "specs.json"
    proc = _kernel_resources("--quick", "--allow-spills", "--json", str(out), timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    specs = json.loads(out.read_text())
    assert {s["kernel"] for s in specs} == KERNELS
    assert all(s["error"] is None and s["regs"] > 0 for s in specs)

    # every kernel keeps its tiles in registers, except the GEMM-like all-Triton InfoNCE tiles
    # (tl.dot with fp32 accumulators; benchmarks/RESULTS.md lists their spills)
    def gemm_like(s):
        return s["kernel"] in ("_info_nce_fwd_kernel", "_info_nce_bwd_kernel")

    spilling = [
        (s["kernel"], s["constexprs"], s["stack"]) for s in specs if s["stack"] and not gemm_like(s)
    ]
    assert not spilling, spilling


def test_launch_plan_refuses_the_interpreter():
    proc = _kernel_resources("--quick", interpret=True, timeout=120)
    assert proc.returncode != 0 and "unset TRITON_INTERPRET" in proc.stderr


#: Device launches of one fast-path CDDS loss step at (256, 50, 77, 512) bf16, Triton and aten
#: together (cdds_fast/fused_loss.py lists them): forward = the token pass, the sampling forward,
#: the batched InfoNCE forward (2), the finalize kernel, the text-mask assertion and the caller's
#: sum of the five terms (5 adds): 11; backward = autograd's ones_like, the terms' gradient
#: kernel, the batched InfoNCE backward (2), the sampling row, column and vector kernels and the
#: token pass: 8. Eager launch overhead (~5 us each) bounds the step at small batches.
LAUNCH_BUDGET = {"forward": 12, "backward": 16}
STEP_SHAPE = (256, 50, 77, 512)


@pytest.fixture(scope="module")
def step_counts():
    """``kernel_resources.py --count-launches``: launches and allocated buffers per phase."""
    proc = _kernel_resources("--count-launches")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_launch_budget_of_one_cdds_step(step_counts):
    for phase, budget in LAUNCH_BUDGET.items():
        launches = step_counts[phase]["triton"] + step_counts[phase]["aten"]
        assert step_counts[phase]["triton"] > 0 and launches <= budget, (phase, step_counts[phase])


def test_allocated_buffers_match_the_memory_model(step_counts):
    """Every buffer the custom ops allocate in a step at (256, 50, 77, 512) bf16, against
    fused_loss.memory_model: the forward's are the saved state, the backward's the sampling
    stage's buffers plus the token gradients (in bf16), each up to SMALL_BYTES of per-call
    scalars and partials; and the model's totals are within the fast path's budgets (150 MB
    peak above the inputs, 320 MB moved per step)."""
    from cdds_fast.fused_loss import SMALL_BYTES, hbm_traffic, memory_model

    model = memory_model(*STEP_SHAPE, elem_bytes=2)
    forward = sum(b for *_, b in step_counts["forward"]["scratch"])
    backward = sum(b for *_, b in step_counts["backward"]["scratch"])
    assert model.saved <= forward <= model.saved + SMALL_BYTES, (forward, model)
    grads = [r for r in step_counts["backward"]["scratch"] if r[1] == "bfloat16"]
    assert sum(b for *_, b in grads) == model.gradients and len(grads) == 6
    expected = model.sampling_stage + model.gradients
    assert expected <= backward <= expected + SMALL_BYTES, (backward, model)
    assert model.peak <= 150e6
    # the benchmarks' text lengths (uniform in [5, 77]); with every text token valid the model
    # gives 341 MB (fused_loss.py, "Traffic and memory model")
    tokens, state = hbm_traffic(*STEP_SHAPE, elem_bytes=2, text_valid=41 / 77)
    assert tokens + state <= 320e6


@pytest.mark.skipif(not _nvidia_backend(), reason="triton without its NVIDIA backend / ptxas")
def test_sampling_sweeps_instruction_budget():
    """The compute model of ``kernels/sampling.py`` from the compiler's own output: SASS
    instructions per element of the virtual ``[B, D, D]`` in each sweep of a (256, 50, 77, 512)
    bf16 step (``kernel_resources.py --sampling-sass``). Three forward sweeps, one row and one
    column sweep backward; 114.6 in all with triton 3.8, 116.3 with 3.6, 117.9 with 3.9
    (benchmarks/RESULTS.md). A change that makes the sweeps more than ~8 % heavier fails here."""
    proc = _kernel_resources("--sampling-sass")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    sweeps = {k: len(v) for k, v in result["per_element"].items()}
    assert sweeps == {
        "_related_sampling_fwd_kernel": 3,
        "_related_sampling_bwd_row_kernel": 1,
        "_related_sampling_bwd_col_kernel": 1,
    }
    assert result["total"] <= 125, result
