"""Benchmark: fused InfoNCE (FusedClipLoss) vs open_clip ClipLoss vs Inf-CL, forward + backward.

For each dtype and batch size it reports the median time of one forward + backward step (after
warm-up, ``triton.testing.do_bench``), the peak extra device memory of that step
(``torch.cuda.max_memory_allocated`` minus what was allocated before it), and the loss's relative
difference to ClipLoss where both ran. Prints a markdown table.

    python benchmarks/bench_contrastive.py            # B in {4096, 16384, 65536}, D = 512
    python benchmarks/bench_contrastive.py --quick    # B in {1024, 4096}: a smoke run
    python benchmarks/bench_contrastive.py --tune     # sweep the fused kernels' tile configs

Roofline of the fused op (see kernels/contrastive.py): 10*B^2*D FLOP per forward + backward
(2 forward, 8 backward); ClipLoss does 6*B^2*D on cuBLAS but streams several [B, B] fp32
tensors through HBM. H200: ~790 TFLOP/s dense bf16 (fp32 "ieee" has no tensor cores:
~67 TFLOP/s), ~4.3 TB/s.

Inf-CL (``pip install inf_cl``) is optional: ``(cal_inf_loss(a, b, scale=s) +
cal_inf_loss(b, a, scale=s)) / 2`` is its symmetric CLIP loss; it is skipped when not installed.
Every case is guarded (OOM or any error prints in the table and the run goes on). On a machine
without CUDA the script prints a message and exits 0.
"""

from __future__ import annotations

import argparse
import gc
import math
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import measure as common_measure  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _features(b: int, d: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    a = torch.randn(b, d, device="cuda", generator=g)
    t = 0.5 * a + torch.randn(b, d, device="cuda", generator=g)
    a = F.normalize(a, dim=-1).to(dtype).requires_grad_()
    t = F.normalize(t, dim=-1).to(dtype).requires_grad_()
    s = torch.tensor(math.log(1 / 0.07), device="cuda").exp().detach().requires_grad_()
    return a, t, s


#: FusedClipLoss variants: name -> (forward method, backward method, allow_tf32)
FUSED_VARIANTS = {
    "fused": ("fused", "chunked", False),
    "fused-chunked-fwd": ("chunked", "chunked", False),
    "fused-triton-bwd": ("fused", "fused", False),
    "fused-tf32": ("fused", "chunked", True),
}


def _methods(args):
    """name -> factory(dtype) returning loss(a, t, s), or None if unavailable. FusedClipLoss
    variants are measured inside ``kernels.contrastive.methods`` (see ``FUSED_VARIANTS``)."""
    from open_clip.loss import ClipLoss

    from cdds_fast.contrastive import FusedClipLoss

    def fused(allow_tf32):
        def factory(dtype):
            if allow_tf32 and dtype != torch.float32:
                return None
            return FusedClipLoss(backend="triton", allow_tf32=allow_tf32)
        return factory

    out = {name: fused(tf32) for name, (_, _, tf32) in FUSED_VARIANTS.items()}
    out["open_clip ClipLoss"] = lambda dtype: ClipLoss()
    try:
        from inf_cl import cal_inf_loss  # type: ignore

        def inf_cl(dtype):
            return lambda a, t, s: (cal_inf_loss(a, t, scale=s) + cal_inf_loss(t, a, scale=s)) / 2

        out["Inf-CL"] = inf_cl
    except Exception as exc:  # noqa: BLE001 - optional dependency, any import failure skips it
        print(f"(Inf-CL not available: {type(exc).__name__}: {exc}; skipped)")
    if args.methods:
        out = {k: v for k, v in out.items() if k in args.methods}
    return out


def _cleanup():
    gc.collect()
    torch.cuda.empty_cache()


def measure(loss_fn, a, t, s, *, warmup_ms: int, rep_ms: int):
    """(median ms of fwd+bwd, peak extra MiB, loss value), via ``benchmarks.common.measure``."""
    def step():
        loss = loss_fn(a, t, s)
        loss.backward()
        return loss.detach()

    m = common_measure(step, warmup_ms=warmup_ms, rep_ms=rep_ms, grad_to_none=[a, t, s])
    return m.median_ms, m.peak_extra_mb, float(m.result.float())


def run_table(args) -> list[dict]:
    """Print the markdown table and return its rows as dicts (for benchmarks/report.py)."""
    from cdds_fast.kernels import contrastive as kernels

    methods = _methods(args)
    records = []
    d = args.dim
    rows = []
    header = ("| dtype | B | method | fwd+bwd ms (median) | peak extra MiB | TFLOP/s (10 B^2 D) "
              "| loss rel. diff vs ClipLoss |")
    print(header)
    print("|" + "---|" * 7, flush=True)
    for dname in args.dtypes:
        dtype = DTYPES[dname]
        for b in args.sizes:
            results = {}
            for name, factory in methods.items():
                fn = factory(dtype)
                if fn is None:
                    continue
                if name == "open_clip ClipLoss" and b > args.clip_max_b:
                    results[name] = ("skipped (--clip-max-b)", None, None)
                    continue
                _cleanup()
                try:
                    a, t, s = _features(b, d, dtype)
                    forward, backward, _ = FUSED_VARIANTS.get(name, (None, None, None))
                    with kernels.methods(forward, backward):
                        ms, peak, value = measure(fn, a, t, s, warmup_ms=args.warmup,
                                                  rep_ms=args.rep)
                    results[name] = (ms, peak, value)
                except torch.cuda.OutOfMemoryError:
                    results[name] = ("OOM", None, None)
                except Exception as exc:  # noqa: BLE001 - report and go on: one-shot run
                    msg = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
                    results[name] = (msg, None, None)
                    if args.verbose:
                        traceback.print_exc()
                finally:
                    a = t = s = None  # noqa: F841
                    _cleanup()
            ref = results.get("open_clip ClipLoss", (None, None, None))[2]
            for name, (ms, peak, value) in results.items():
                if isinstance(ms, str):
                    line = f"| {dname} | {b} | {name} | {ms} | - | - | - |"
                else:
                    tflops = 10 * b * b * d / (ms * 1e-3) / 1e12 if name.startswith("fused") \
                        else float("nan")
                    rel = abs(value - ref) / abs(ref) if ref not in (None, 0.0) else float("nan")
                    tf = f"{tflops:.1f}" if not math.isnan(tflops) else "-"
                    rd = f"{rel:.1e}" if not math.isnan(rel) else "-"
                    line = f"| {dname} | {b} | {name} | {ms:.3f} | {peak:.1f} | {tf} | {rd} |"
                print(line, flush=True)
                rows.append(line)
                records.append({"dtype": dname, "batch": b, "method": name,
                                "full_ms": ms if not isinstance(ms, str) else None,
                                "peak_mb": peak, "note": ms if isinstance(ms, str) else ""})
    return records


# ------------------------------------------------------------------------------------------------
# --tune: time the forward and backward kernels alone for candidate tile configs
# ------------------------------------------------------------------------------------------------
FWD_CANDIDATES = {
    "16bit": [
        dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3),
        dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=3),
        dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3),
        dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=3),
        dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, num_warps=8, num_stages=4),
        dict(BLOCK_M=256, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3),
        dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=3),
    ],
    "fp32": [
        dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=2),
        dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=16, num_warps=4, num_stages=3),
        dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, num_warps=8, num_stages=2),
        dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=16, num_warps=8, num_stages=2),
        dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, num_warps=8, num_stages=2),
    ],
}
BWD_CANDIDATES = {
    "16bit": [
        dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, BLOCK_DO=256, num_warps=8, num_stages=2),
        dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, BLOCK_DO=512, num_warps=8, num_stages=2),
        dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, BLOCK_DO=128, num_warps=8, num_stages=2),
        dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, BLOCK_DO=256, num_warps=8, num_stages=2),
        dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, BLOCK_DO=256, num_warps=8, num_stages=2),
        dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, BLOCK_DO=128, num_warps=4, num_stages=3),
        dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, BLOCK_DO=128, num_warps=8, num_stages=2),
    ],
    "fp32": [
        dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=32, BLOCK_DO=256, num_warps=4, num_stages=2),
        dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, BLOCK_DO=128, num_warps=4, num_stages=2),
        dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, BLOCK_DO=256, num_warps=8, num_stages=2),
        dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, BLOCK_DO=512, num_warps=4, num_stages=2),
        dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=16, BLOCK_DO=128, num_warps=4, num_stages=3),
    ],
}


def run_tune(args) -> None:
    import triton.testing

    from cdds_fast.kernels import contrastive as K
    from cdds_fast.kernels.launch import info_nce_tiles

    b, d = args.tune_b, args.dim
    print("| kind | dtype | B | config | ms | TFLOP/s |")
    print("|---|---|---|---|---|---|", flush=True)
    for dname in args.dtypes:
        dtype = DTYPES[dname]
        fam = "fp32" if dtype == torch.float32 else "16bit"
        a, t, s = _features(b, d, dtype)
        a, t, s = a.detach(), t.detach(), s.detach()
        grad = torch.ones((), device="cuda")
        default_f = info_nce_tiles("fwd", dtype, d, False, a.device)
        default_b = info_nce_tiles("bwd", dtype, d, False, a.device)
        lse = None
        for cfg in [None] + FWD_CANDIDATES[fam]:
            name = "default " + str(default_f) if cfg is None else str(cfg)
            try:
                def fwd(cfg=cfg):
                    return K.info_nce_forward(a, t, s, 0, True, _config=cfg)
                out = fwd()
                lse = lse or (out[1], out[2])
                ms = triton.testing.do_bench(fwd, warmup=args.warmup, rep=args.rep,
                                             return_mode="median")
                print(f"| fwd | {dname} | {b} | {name} | {ms:.3f} | "
                      f"{2 * b * b * d / ms / 1e9:.1f} |", flush=True)
            except Exception as exc:  # noqa: BLE001
                print(f"| fwd | {dname} | {b} | {name} | error {type(exc).__name__}: "
                      f"{str(exc).splitlines()[0][:60]} | - |", flush=True)
        if lse is None:
            continue
        for cfg in [None] + BWD_CANDIDATES[fam]:
            name = "default " + str(default_b) if cfg is None else str(cfg)
            try:
                def bwd(cfg=cfg):
                    return K.info_nce_backward(grad, a, t, s, lse[0], lse[1], 0, True, False,
                                               True, True, True, _config=cfg)
                bwd()
                ms = triton.testing.do_bench(bwd, warmup=args.warmup, rep=args.rep,
                                             return_mode="median")
                print(f"| bwd | {dname} | {b} | {name} | {ms:.3f} | "
                      f"{8 * b * b * d / ms / 1e9:.1f} |", flush=True)
            except Exception as exc:  # noqa: BLE001
                print(f"| bwd | {dname} | {b} | {name} | error {type(exc).__name__}: "
                      f"{str(exc).splitlines()[0][:60]} | - |", flush=True)
        del a, t, s
        _cleanup()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes (B in {1024, 4096})")
    p.add_argument("--sizes", type=int, nargs="+", default=None)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    p.add_argument("--methods", nargs="+", default=None,
                   help="subset of: fused fused-chunked-fwd fused-triton-bwd fused-tf32 "
                        "'open_clip ClipLoss' Inf-CL (fused = the defaults: fused forward, "
                        "chunked backward)")
    p.add_argument("--clip-max-b", type=int, default=1 << 30,
                   help="skip ClipLoss above this B (it is guarded against OOM anyway)")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warm-up, ms")
    p.add_argument("--rep", type=int, default=100, help="do_bench measuring time, ms")
    p.add_argument("--tune", action="store_true", help="sweep tile configs of the fused kernels")
    p.add_argument("--tune-b", type=int, default=16384)
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_contrastive: no CUDA device found; this benchmark times GPU kernels, "
              "nothing to do on CPU.")
        return 0
    if args.sizes is None:
        args.sizes = [1024, 4096] if args.quick else [4096, 16384, 65536]
    import triton

    props = torch.cuda.get_device_properties(0)
    print(f"device: {props.name}, {props.multi_processor_count} SMs, "
          f"{props.total_memory / 2**30:.0f} GiB; torch {torch.__version__}, "
          f"triton {triton.__version__}; D = {args.dim}", flush=True)
    t0 = time.time()
    if args.tune:
        run_tune(args)
    else:
        run_table(args)
    print(f"(total {time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
