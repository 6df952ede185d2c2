"""Timing and memory helpers shared by the benchmark scripts and pytest-benchmark suites.

On CUDA: CUDA-event timing through ``triton.testing.do_bench`` (median, after warm-up) and peak
memory from ``torch.cuda.max_memory_allocated`` measured *above* what was allocated before the
call (inputs excluded, outputs and saved tensors included). On CPU: wall-clock medians.
"""

from __future__ import annotations

import datetime
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Measurement:
    median_ms: float
    peak_extra_bytes: int | None  # None on CPU
    result: object = None  # what fn() returned on the measured (memory) call

    @property
    def peak_extra_mb(self) -> float | None:
        return None if self.peak_extra_bytes is None else self.peak_extra_bytes / 2**20


def measure(
    fn: Callable[[], object],
    *,
    warmup_ms: float = 200,
    rep_ms: float = 1000,
    cpu_reps: int = 5,
    grad_to_none: list[torch.Tensor] | None = None,
) -> Measurement:
    """Median time of ``fn()`` and its peak extra device memory.

    ``grad_to_none``: leaves whose ``.grad`` is reset before every call, so each backward
    allocates its gradients afresh (they count in the peak) instead of accumulating."""

    def reset():
        for t in grad_to_none or ():
            t.grad = None

    if torch.cuda.is_available():
        from triton.testing import do_bench

        reset()
        fn()  # compile / autotune outside the timed region
        reset()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        result = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        ms = do_bench(
            fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none, return_mode="median"
        )
        return Measurement(float(ms), int(peak), result)
    reset()
    result = fn()
    times = []
    for _ in range(cpu_reps):
        reset()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return Measurement(statistics.median(times), None, result)


def environment() -> dict[str, str]:
    """Card, versions and date for RESULTS.md."""
    import triton

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["device"] = (
            f"{props.name} ({props.total_memory / 2**30:.0f} GiB, "
            f"{props.multi_processor_count} SMs)"
        )
    else:
        info["device"] = f"CPU ({platform.processor() or platform.machine()})"
    return info


def fmt(value: float | None, spec: str = ".3f") -> str:
    return "n/a" if value is None else format(value, spec)
