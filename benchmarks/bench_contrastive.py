"""Benchmark: symmetric InfoNCE forward + backward, every path of ``FusedClipLoss`` against
open_clip ``ClipLoss``, ``torch.compile(ClipLoss)`` and Inf-CL.

For each dtype and batch size it reports the median time of one forward + backward step (after
warm-up, ``triton.testing.do_bench``), the peak extra device memory of that step
(``torch.cuda.max_memory_allocated`` minus what was allocated before it, gradients included), the
achieved TFLOP/s counted as ``8 B^2 D`` for every method (the FLOPs of the loss with one logit
recompute: the same yardstick for all, whatever each method actually spends), the fraction of
the cost model of ``kernels/contrastive.py`` reached (model ms / measured ms, our paths only) and
the loss's relative difference to ``ClipLoss``. Prints a markdown table.

    python benchmarks/bench_contrastive.py            # B in {4096, 16384, 65536}, D = 512
    python benchmarks/bench_contrastive.py --quick    # B in {1024, 4096}: a smoke run
    python benchmarks/bench_contrastive.py --budgets 64 128 192 256   # blocked path, MiB sweep
    python benchmarks/bench_contrastive.py --tune     # tile configs of the all-Triton kernels

Methods: ``FusedClipLoss`` (the path the rule in ``kernels/launch.py`` picks), ``fused path``
and ``blocked path`` (each forced, as the tests force them: by replacing the rule), ``blocked
tf32`` (fp32 only, ``allow_tf32=True``), ``ClipLoss``, ``compiled ClipLoss`` and ``Inf-CL``
(``pip install inf_cl``: ``(cal_inf_loss(a, b, scale=s) + cal_inf_loss(b, a, scale=s)) / 2``;
skipped when not installed). The all-Triton path recomputes more (``12 B^2 D``) and is skipped
above ``--fused-max-b``. Every case is guarded (OOM or any error prints in the table and the run
goes on). On a machine without CUDA the script prints a message and exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import sys
import time
import traceback
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import fmt  # noqa: E402
from benchmarks.common import measure as common_measure  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


#: where the features live: "cuda", or "cpu" for the test suite's smoke run (under the Triton
#: interpreter, tiny sizes; the numbers mean nothing there)
DEVICE = "cuda"


def _features(b: int, d: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    a = torch.randn(b, d, device=DEVICE, generator=g)
    t = 0.5 * a + torch.randn(b, d, device=DEVICE, generator=g)
    a = F.normalize(a, dim=-1).to(dtype).requires_grad_()
    t = F.normalize(t, dim=-1).to(dtype).requires_grad_()
    s = torch.tensor(math.log(1 / 0.07), device=DEVICE).exp().detach().requires_grad_()
    return a, t, s


def forced_path(path: str | None):
    """Run the enclosed calls on ``path`` ("fused" / "blocked"; None: the rule's choice)."""
    if path is None:
        return contextlib.nullcontext()
    from cdds_fast.kernels import launch

    return mock.patch.object(launch, "info_nce_path", lambda *args, **kwargs: path)


#: our methods: name -> (forced path or None, allow_tf32)
OURS = {
    "FusedClipLoss": (None, False),
    "fused path": ("fused", False),
    "blocked path": ("blocked", False),
    "blocked tf32": ("blocked", True),
}


def _methods(args):
    """name -> factory(dtype, b) returning loss(a, t, s), or None where it does not apply."""
    from open_clip.loss import ClipLoss

    from cdds_fast.contrastive import FusedClipLoss

    def ours(path, allow_tf32):
        def factory(dtype, b):
            if (allow_tf32 and dtype != torch.float32) or (
                path == "fused" and b > args.fused_max_b
            ):
                return None
            return FusedClipLoss(
                backend="triton", allow_tf32=allow_tf32, max_scratch_bytes=args.budget << 20
            )

        return factory

    out = {name: ours(*spec) for name, spec in OURS.items()}
    out["ClipLoss"] = lambda dtype, b: ClipLoss()
    compile_dtypes = {DTYPES[name] for name in args.compile_dtypes}
    out["compiled ClipLoss"] = lambda dtype, b: (
        torch.compile(ClipLoss()) if dtype in compile_dtypes else None
    )
    try:
        from inf_cl import cal_inf_loss  # type: ignore

        def inf_cl(dtype, b):
            return lambda a, t, s: (cal_inf_loss(a, t, scale=s) + cal_inf_loss(t, a, scale=s)) / 2

        out["Inf-CL"] = inf_cl
    except Exception as exc:  # noqa: BLE001 - optional dependency, any import failure skips it
        print(f"(Inf-CL not available: {type(exc).__name__}: {exc}; skipped)")
    if args.methods:
        out = {k: v for k, v in out.items() if k in args.methods}
    return out


def _cleanup():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def measure(loss_fn, a, t, s, *, warmup_ms: int, rep_ms: int):
    """(median ms of fwd+bwd, peak extra MiB, loss value), via ``benchmarks.common.measure``."""

    def step():
        loss = loss_fn(a, t, s)
        loss.backward()
        return loss.detach()

    m = common_measure(step, warmup_ms=warmup_ms, rep_ms=rep_ms, grad_to_none=[a, t, s])
    return m.median_ms, m.peak_extra_mb, float(m.result.float())


def _model_ms(name: str, dtype: torch.dtype, b: int, d: int, budget_mib: int) -> float | None:
    """The cost model's ms for our methods (kernels/contrastive.cost_model), else None."""
    if name not in OURS:
        return None
    from cdds_fast.kernels import contrastive as K

    path, tf32 = OURS[name]
    with forced_path(path):
        return K.cost_model(b, d, dtype, allow_tf32=tf32, budget=budget_mib << 20)["ms"]


def _run_case(name, factory, dtype, b, args):
    """(ms, peak MiB, loss) or (message, None, None)."""
    fn = factory(dtype, b)
    if fn is None:
        return None
    if name == "ClipLoss" and b > args.clip_max_b:
        return ("skipped (--clip-max-b)", None, None)
    _cleanup()
    try:
        a, t, s = _features(b, args.dim, dtype)
        with forced_path(OURS.get(name, (None,))[0]):
            return measure(fn, a, t, s, warmup_ms=args.warmup, rep_ms=args.rep)
    except torch.cuda.OutOfMemoryError:
        return ("OOM", None, None)
    except Exception as exc:  # noqa: BLE001 - report and go on: one-shot run
        if args.verbose:
            traceback.print_exc()
        return (f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}", None, None)
    finally:
        a = t = s = None  # noqa: F841
        _cleanup()


def run_table(args) -> list[dict]:
    """Print the markdown table and return its rows as dicts (for benchmarks/report.py)."""
    methods = _methods(args)
    records = []
    d = args.dim
    print(
        "| dtype | B | method | fwd+bwd ms (median) | peak extra MiB | TFLOP/s (8 B^2 D) "
        "| model fraction | loss rel. diff vs ClipLoss |"
    )
    print("|" + "---|" * 8, flush=True)
    for dname in args.dtypes:
        dtype = DTYPES[dname]
        for b in args.sizes:
            results = {}
            for name, factory in methods.items():
                out = _run_case(name, factory, dtype, b, args)
                if out is not None:
                    results[name] = out
            ref = results.get("ClipLoss", (None, None, None))[2]
            for name, (ms, peak, value) in results.items():
                rec = {
                    "dtype": dname,
                    "batch": b,
                    "dim": d,
                    "method": name,
                    "full_ms": None,
                    "peak_mb": peak,
                    "tflops": None,
                    "model_fraction": None,
                    "note": ms if isinstance(ms, str) else "",
                }
                if isinstance(ms, str):
                    print(f"| {dname} | {b} | {name} | {ms} | - | - | - | - |", flush=True)
                else:
                    model = _model_ms(name, dtype, b, d, args.budget)
                    rec.update(
                        full_ms=ms,
                        tflops=8 * b * b * d / (ms * 1e-3) / 1e12,
                        model_fraction=None if model is None else model / ms,
                    )
                    rel = abs(value - ref) / abs(ref) if ref not in (None, 0.0) else None
                    frac = "-" if model is None else f"{100 * model / ms:.0f}%"
                    print(
                        f"| {dname} | {b} | {name} | {ms:.3f} | {fmt(peak, '.1f')} | "
                        f"{rec['tflops']:.1f} | {frac} | "
                        f"{'-' if rel is None else f'{rel:.1e}'} |",
                        flush=True,
                    )
                records.append(rec)
    return records


def run_budgets(args) -> list[dict]:
    """The blocked path at each ``--budgets`` value (MiB): time, memory, model fraction."""
    from cdds_fast.contrastive import FusedClipLoss

    print("| dtype | B | budget MiB | fwd+bwd ms | peak extra MiB | TFLOP/s | model fraction |")
    print("|" + "---|" * 7, flush=True)
    records = []
    for dname in args.dtypes:
        dtype = DTYPES[dname]
        for b in args.sizes:
            for budget in args.budgets:
                loss_fn = FusedClipLoss(backend="triton", max_scratch_bytes=budget << 20)
                saved, args.budget = args.budget, budget
                out = _run_case("blocked path", lambda *_, fn=loss_fn: fn, dtype, b, args)
                args.budget = saved
                ms, peak, _ = out
                if isinstance(ms, str):
                    print(f"| {dname} | {b} | {budget} | {ms} | - | - | - |", flush=True)
                    continue
                model = _model_ms("blocked path", dtype, b, args.dim, budget)
                tflops = 8 * b * b * args.dim / (ms * 1e-3) / 1e12
                print(
                    f"| {dname} | {b} | {budget} | {ms:.3f} | {fmt(peak, '.1f')} | {tflops:.1f} | "
                    f"{100 * model / ms:.0f}% |",
                    flush=True,
                )
                records.append(
                    {
                        "dtype": dname,
                        "batch": b,
                        "budget_mib": budget,
                        "full_ms": ms,
                        "peak_mb": peak,
                        "tflops": tflops,
                        "model_fraction": model / ms,
                    }
                )
    return records


# ------------------------------------------------------------------------------------------------
# --tune: time the forward and backward kernels alone for candidate tile configs
# ------------------------------------------------------------------------------------------------
#: Candidate tiles of the all-Triton kernels (the first of each family compiled for sm_90 without
#: spills at D = 512; the others trade registers for fewer logit recomputes or larger dots).
FWD_CANDIDATES = {
    "16bit": [
        dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3),
        dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=3),
        dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, num_warps=8, num_stages=3),
        dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3),
    ],
    "fp32": [
        dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, num_warps=8, num_stages=2),
        dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=2),
        dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=8, num_stages=2),
    ],
}
BWD_CANDIDATES = {
    "16bit": [
        dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, BLOCK_DO=512, num_warps=8, num_stages=2),
        dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=32, BLOCK_DO=64, num_warps=8, num_stages=2),
        dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, BLOCK_DO=128, num_warps=8, num_stages=2),
        dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, BLOCK_DO=64, num_warps=8, num_stages=2),
    ],
    "fp32": [
        dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, BLOCK_DO=256, num_warps=8, num_stages=2),
        dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=32, BLOCK_DO=64, num_warps=8, num_stages=2),
        dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, BLOCK_DO=128, num_warps=4, num_stages=2),
    ],
}


def run_tune(args) -> None:
    """Time the all-Triton forward and backward kernels alone for candidate tile configs."""
    import dataclasses

    from cdds_fast.kernels import contrastive as K
    from cdds_fast.kernels.launch import _plan_for_path

    b, d = args.tune_b, args.dim
    print("| kind | dtype | B | config | ms | TFLOP/s |")
    print("|---|---|---|---|---|---|", flush=True)
    for dname in args.dtypes:
        dtype = DTYPES[dname]
        fam = "fp32" if dtype == torch.float32 else "16bit"
        a, t, s = (v.detach() for v in _features(b, d, dtype))
        x, y = a[None], t[None]
        grad = torch.ones(1, device=DEVICE)
        default = _plan_for_path("fused", dtype, b, b, d, a.device, False, 0)
        for kind, candidates, flop in (
            ("fwd", FWD_CANDIDATES[fam], 4),
            ("bwd", BWD_CANDIDATES[fam], 8),
        ):
            for cfg in [None] + candidates:
                plan = (
                    default
                    if cfg is None
                    else dataclasses.replace(
                        default, tiles=tuple({**dict(default.tiles), **cfg}.items())
                    )
                )
                name = ("default " if cfg is None else "") + str(dict(plan.tiles))
                try:
                    _, sr, sc = K._forward(
                        x, y, s, symmetric=True, label_offset=0, allow_tf32=False, plan=plan
                    )

                    def run(plan=plan, sr=sr, sc=sc, kind=kind, x=x, y=y, s=s, grad=grad):
                        if kind == "fwd":
                            return K._forward(
                                x, y, s, symmetric=True, label_offset=0, allow_tf32=False, plan=plan
                            )
                        return K._backward(
                            grad,
                            x,
                            y,
                            s,
                            sr,
                            sc,
                            symmetric=True,
                            label_offset=0,
                            allow_tf32=False,
                            need_dx=True,
                            need_dy=True,
                            need_dscale=True,
                            plan=plan,
                        )

                    ms = common_measure(run, warmup_ms=args.warmup, rep_ms=args.rep).median_ms
                    print(
                        f"| {kind} | {dname} | {b} | {name} | {ms:.3f} | "
                        f"{flop * b * b * d / ms / 1e9:.1f} |",
                        flush=True,
                    )
                except Exception as exc:  # noqa: BLE001
                    print(
                        f"| {kind} | {dname} | {b} | {name} | error {type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:60]} | - |",
                        flush=True,
                    )
        del a, t, s
        _cleanup()


def build_parser() -> argparse.ArgumentParser:
    """The command line; ``benchmarks/report.py`` builds its InfoNCE run from it too, so the two
    cannot drift apart."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes (B in {1024, 4096})")
    p.add_argument("--sizes", type=int, nargs="+", default=None)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    p.add_argument(
        "--methods",
        nargs="+",
        default=None,
        help="subset of: " + ", ".join([*OURS, "ClipLoss", "compiled ClipLoss", "Inf-CL"]),
    )
    p.add_argument("--budget", type=int, default=192, help="max_scratch_bytes, MiB")
    p.add_argument(
        "--budgets",
        type=int,
        nargs="+",
        default=None,
        help="sweep the blocked path over these budgets (MiB) instead of the table",
    )
    p.add_argument(
        "--fused-max-b",
        type=int,
        default=16384,
        help="skip the forced all-Triton path above this B",
    )
    p.add_argument(
        "--compile-dtypes",
        nargs="*",
        default=["bf16"],
        choices=list(DTYPES),
        help="dtypes to time torch.compile(ClipLoss) at (each B and dtype compiles anew, ~20 s)",
    )
    p.add_argument(
        "--clip-max-b",
        type=int,
        default=1 << 30,
        help="skip ClipLoss above this B (it is guarded against OOM anyway)",
    )
    p.add_argument("--warmup", type=int, default=25, help="do_bench warm-up, ms")
    p.add_argument("--rep", type=int, default=100, help="do_bench measuring time, ms")
    p.add_argument("--tune", action="store_true", help="sweep tile configs of the fused kernels")
    p.add_argument("--tune-b", type=int, default=1024)
    p.add_argument("--verbose", action="store_true")
    p.add_argument(
        "--device",
        default="cuda",
        choices=["cuda", "cpu"],
        help="cpu: a smoke run of the script itself (tests), under TRITON_INTERPRET=1",
    )
    return p


def default_sizes(quick: bool) -> list[int]:
    return [1024, 4096] if quick else [4096, 16384, 65536]


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    global DEVICE
    DEVICE = args.device
    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            "bench_contrastive: no CUDA device found; this benchmark times GPU kernels, "
            "nothing to do on CPU."
        )
        return 0
    if args.sizes is None:
        args.sizes = default_sizes(args.quick)
    from benchmarks.common import environment

    print(f"{environment()}; D = {args.dim}", flush=True)
    t0 = time.time()
    if args.tune:
        run_tune(args)
    elif args.budgets:
        run_budgets(args)
    else:
        run_table(args)
    print(f"(total {time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
