"""CDDS loss forward+backward: fast path (Triton) vs eager reference vs torch.compile(reference).

    python benchmarks/bench_cdds.py                 # (256|1024, 50, 77, 512), (256, 50, 77, 1024)
    python benchmarks/bench_cdds.py --quick         # small shapes (CPU smoke run)

``sampling_tile_rows`` times the fast path at (256, 50, 77, 512) bf16 with the sampling kernels'
tiles at 4 (the default) and 8 elements a thread: the tile candidate of benchmarks/RESULTS.md
("SASS of the sampling loops"), whose fewer instructions against fewer programs per
multiprocessor only a GPU can weigh.

Times are medians of CUDA-event timings after warm-up (``benchmarks/common.py``); memory is the
peak allocated above the inputs during one forward+backward (gradients of the inputs included).
"backward" is full minus forward. The fast path's rows also give its model
(``cdds_fast/fused_loss.py``): the bytes one step moves with the measured text lengths and its
peak extra memory, and the bandwidth those bytes imply at the measured time.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import Measurement, environment, fmt, measure  # noqa: E402

GPU_SHAPES = [(256, 50, 77, 512), (1024, 50, 77, 512), (256, 50, 77, 1024)]
QUICK_SHAPES = [(4, 10, 12, 32)]
POSITIONAL = (
    "image_tokens",
    "image_semantic",
    "image_modality",
    "text_tokens",
    "text_semantic",
    "text_modality",
)
PARAMS = ("alpha_image", "alpha_text", "w_s_image", "w_m_image", "w_s_text", "w_m_text")


def make_problem(batch, patches, length, dim, dtype, device):
    """Leaf tensors shaped like a real head's output, and a padded text mask (CLIP context 77)."""
    g = torch.Generator(device=device).manual_seed(0)

    def leaf(*shape, scale=1.0, shift=0.0, dt=dtype):
        t = torch.randn(*shape, generator=g, device=device) * scale + shift
        return t.to(dt).requires_grad_(True)

    tensors = [leaf(batch, patches, dim) for _ in range(3)] + [
        leaf(batch, length, dim) for _ in range(3)
    ]
    lengths = torch.randint(min(5, length), length + 1, (batch,), generator=g, device=device)
    mask = torch.arange(length, device=device)[None] < lengths[:, None]
    params = {
        n: leaf(dim, scale=0.1, shift=0.5 if n.startswith("alpha") else 1.0, dt=torch.float32)
        for n in PARAMS
    }
    params["logit_scale"] = torch.tensor(14.3, device=device, requires_grad=True)
    return tensors, mask, params


def step_fn(loss_fn, tensors, mask, params, *, backward=True):
    leaves = tensors + list(params.values())

    def run():
        for t in leaves:
            t.grad = None
        out = loss_fn(*tensors, mask, **params)
        total = sum(out.values())
        if backward:
            total.backward()
        return total

    return run


def implementations():
    from cdds_fast import reference
    from cdds_fast.functional import cdds_loss

    def fast(*a, **k):
        return cdds_loss(*a, **k, backend="triton")

    def eager(*a, **k):
        return reference.cdds_loss(*a, **k)

    compiled_inner = torch.compile(eager)
    return {
        "fast (triton)": fast,
        "eager reference": eager,
        "torch.compile(reference)": compiled_inner,
    }


def _row(shape, dtype, impl: str, fwd: Measurement, full: Measurement) -> dict:
    """One table row: forward and forward+backward times, backward as their difference."""
    return {
        "shape": "x".join(map(str, shape)),
        "dtype": str(dtype).replace("torch.", ""),
        "impl": impl,
        "forward_ms": fwd.median_ms,
        "backward_ms": full.median_ms - fwd.median_ms,
        "full_ms": full.median_ms,
        "peak_mb": full.peak_extra_mb,
    }


def run(shapes, dtypes, names=None, *, skip_compile_for=()):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    impls = implementations()
    for shape in shapes:
        for dtype in dtypes:
            tensors, mask, params = make_problem(*shape, dtype, device)
            for name, fn in impls.items():
                if names and name not in names:
                    continue
                if "compile" in name and dtype in skip_compile_for:
                    continue
                try:
                    full = measure(step_fn(fn, tensors, mask, params))
                    fwd = measure(step_fn(fn, tensors, mask, params, backward=False))
                except torch.cuda.OutOfMemoryError:
                    full = fwd = Measurement(float("nan"), None)
                row = _row(shape, dtype, name, fwd, full)
                if name.startswith("fast"):
                    row.update(_model(shape, dtype, mask, full.median_ms))
                rows.append(row)
                torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return rows


#: Elements a thread holds in the sampling kernels' tiles: the default, then the candidate.
SAMPLING_TILE_ELEMS = (4, 8)


@contextlib.contextmanager
def sampling_tiles(elems_per_thread: int):
    """The sampling kernels use GPU tiles of ``elems_per_thread`` elements a thread at 8 warps
    (``[elems * 64 / 16, 64]`` forward and row, swapped for the column kernel) while inside: an
    A/B switch for this benchmark only; the library has one tile rule
    (``kernels/launch.pairwise_tiles``)."""
    from cdds_fast.kernels import launch, sampling

    rows = 16 * elems_per_thread // 4

    def tiles(n: int, device: torch.device) -> tuple[int, int, int]:
        bi, bj = launch.block_for(n, cap=rows), launch.block_for(n, cap=64)
        return bi, bj, max(1, min(8, bi * bj // (32 * elems_per_thread)))

    saved = sampling.pairwise_tiles
    sampling.pairwise_tiles = tiles
    try:
        yield
    finally:
        sampling.pairwise_tiles = saved


def sampling_tile_rows(shape=GPU_SHAPES[0], dtype=torch.bfloat16, elems=SAMPLING_TILE_ELEMS):
    """Fast-path rows at ``shape`` with each sampling tile size of ``elems``; the loss and every
    gradient are first checked against the default tiles' (a wrong kernel is not timed)."""
    from cdds_fast.functional import cdds_loss

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tensors, mask, params = make_problem(*shape, dtype, device)
    leaves = tensors + list(params.values())

    def fast(*a, **k):
        return cdds_loss(*a, **k, backend="triton")

    def values():
        total = step_fn(fast, tensors, mask, params)()
        return [total.detach().clone()] + [t.grad.clone() for t in leaves]

    def agrees(got, want) -> bool:
        # another tile sums in another order: rounding, far below 1 % of a tensor's largest entry;
        # a wrong kernel is off by the entries themselves
        return all(
            float((g.float() - w.float()).abs().max()) <= 1e-2 * float(w.float().abs().max())
            for g, w in zip(got, want, strict=True)
        )

    rows = []
    with sampling_tiles(elems[0]):
        want = values()
    for e in elems:
        label = f"fast (triton), sampling tiles of {e} elements a thread"
        with sampling_tiles(e):
            if agrees(values(), want):
                full = measure(step_fn(fast, tensors, mask, params))
                fwd = measure(step_fn(fast, tensors, mask, params, backward=False))
            else:  # reported, not raised: the rest of the run still measures
                label += " (DIFFERS from the default tiles: not timed)"
                full = fwd = Measurement(float("nan"), None)
        rows.append(_row(shape, dtype, label, fwd, full))
    return rows


def _model(shape, dtype, mask, full_ms) -> dict:
    """The fast path's traffic and memory model at this problem (its text lengths)."""
    from cdds_fast.fused_loss import hbm_traffic, memory_model

    elem = torch.finfo(dtype).bits // 8
    tokens, state = hbm_traffic(*shape, elem_bytes=elem, text_valid=float(mask.float().mean()))
    moved = tokens + state
    return {
        "model_mb": moved / 1e6,
        "model_peak_mb": memory_model(*shape, elem).peak / 2**20,
        "model_gbps": moved / full_ms / 1e6,
    }


def to_markdown(rows) -> str:
    lines = [
        "| B x P x L x D | dtype | implementation | fwd ms | bwd ms | fwd+bwd ms | peak extra MB "
        "| speed-up vs eager | model: MB moved, GB/s, peak MB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    eager = {(r["shape"], r["dtype"]): r["full_ms"] for r in rows if r["impl"] == "eager reference"}
    for r in rows:
        base = eager.get((r["shape"], r["dtype"]))
        speed = f"{base / r['full_ms']:.1f}x" if base and r["full_ms"] == r["full_ms"] else "n/a"
        model = (
            f"{r['model_mb']:.0f}, {r['model_gbps']:.0f}, {r['model_peak_mb']:.0f}"
            if "model_mb" in r
            else ""
        )
        lines.append(
            f"| {r['shape']} | {r['dtype']} | {r['impl']} | {fmt(r['forward_ms'])} | "
            f"{fmt(r['backward_ms'])} | {fmt(r['full_ms'])} | {fmt(r['peak_mb'], '.1f')} | "
            f"{speed} | "
            f"{model} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small shapes (works on CPU)")
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument(
        "--compile-dtypes",
        default="bfloat16,float32",
        help="dtypes for which torch.compile(reference) is measured (compiles are slow)",
    )
    args = parser.parse_args(argv)
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    compile_dtypes = {getattr(torch, d) for d in args.compile_dtypes.split(",") if d}
    if not torch.cuda.is_available() and not args.quick:
        print("bench_cdds: no CUDA device; run with --quick for a CPU smoke run")
        return 0
    shapes = QUICK_SHAPES if args.quick else GPU_SHAPES
    rows = run(shapes, dtypes, skip_compile_for=set(dtypes) - compile_dtypes)
    print(environment())
    print(to_markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
