"""GPU benchmark report: the comparison matrix of the kernel issues, as markdown and PNG plots.

    python benchmarks/report.py                 # CUDA: full matrix -> benchmarks/results/
    python benchmarks/report.py --quick         # small sizes; on CPU only the reference paths

Contents:
* CDDS loss: fast (Triton) vs eager reference vs ``torch.compile(reference)`` at
  (B, P, L, D) = (256, 50, 77, 512), (1024, 50, 77, 512), (256, 50, 77, 1024): forward, backward
  (full minus forward) and forward+backward medians, peak extra memory, and the fraction of the
  byte roofline (inputs read once, input gradients written once, at the copy bandwidth measured in
  the same run) that the fast path reaches.
* Symmetric InfoNCE: every path of FusedClipLoss vs open_clip ClipLoss, torch.compile(ClipLoss)
  and Inf-CL (when installed) at B in {4096, 16384, 65536}, D = 512, fp32 and bf16, with the
  fraction of the matmul roofline (8 B^2 D FLOPs for fwd+bwd at the bf16/fp32 matmul rate
  measured in the same run) and of the cost model of ``kernels/contrastive.py``.
* PNG plots of time and memory against batch size.
Nothing here is estimated: every number is measured by this script on the named device.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import bench_cdds  # noqa: E402
from benchmarks.common import environment, fmt  # noqa: E402


def measured_ceilings() -> dict[str, float]:
    """Copy bandwidth (bytes read + written per second) and matmul rates, measured now."""
    from triton.testing import do_bench

    x = torch.empty(2**30 // 4, device="cuda")  # 1 GiB
    y = torch.empty_like(x)
    ms = do_bench(lambda: y.copy_(x), return_mode="median")
    out = {"copy_GBps": 2 * x.numel() * 4 / ms / 1e6}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        a = torch.randn(8192, 8192, device="cuda", dtype=dtype)
        b = torch.randn(8192, 8192, device="cuda", dtype=dtype)
        ms = do_bench(lambda a=a, b=b: a @ b, return_mode="median")
        out[f"matmul_{name}_TFLOPs"] = 2 * 8192**3 / ms / 1e9
    return out


def cdds_min_bytes(shape: str, dtype: str) -> int:
    """Inputs (6 token tensors) read once and their gradients written once."""
    b, p, length, d = map(int, shape.split("x"))
    item = torch.tensor([], dtype=getattr(torch, dtype)).element_size()
    return 2 * 3 * (b * p * d + b * length * d) * item


def contrastive_args(quick: bool) -> argparse.Namespace:
    """bench_contrastive's table at its defaults (every path and anchor, D = 512, fp32 and bf16,
    compiled ClipLoss in bf16), through its own parser."""
    from benchmarks import bench_contrastive

    sizes = bench_contrastive.default_sizes(quick)
    return bench_contrastive.build_parser().parse_args(["--sizes", *map(str, sizes)])


def contrastive_rows(quick: bool) -> list[dict]:
    from benchmarks import bench_contrastive

    return bench_contrastive.run_table(contrastive_args(quick))


def contrastive_section(clip: list[dict], ceilings: dict[str, float]) -> list[str]:
    """The report's InfoNCE table from ``bench_contrastive.run_table``'s rows; each timed row also
    gets ``matmul_roofline_fraction``: its 8 B^2 D TFLOP/s (bench_contrastive's yardstick) over
    the GEMM rate measured in ``ceilings`` for its dtype."""

    def pct(value):
        return "" if value is None else f"{100 * value:.0f}%"

    lines = [
        f"## Symmetric InfoNCE (D = {clip[0]['dim']})",
        "",
        "| dtype | B | method | fwd+bwd ms | peak extra MiB | TFLOP/s | matmul roofline "
        "| cost model |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in clip:
        if r["full_ms"]:
            rate = ceilings["matmul_bf16_TFLOPs" if r["dtype"] == "bf16" else "matmul_fp32_TFLOPs"]
            r["matmul_roofline_fraction"] = r["tflops"] / rate
        lines.append(
            f"| {r['dtype']} | {r['batch']} | {r['method']} | {fmt(r['full_ms'])} | "
            f"{fmt(r['peak_mb'], '.1f')} | {fmt(r['tflops'], '.1f')} | "
            f"{pct(r.get('matmul_roofline_fraction'))} | "
            f"{pct(r.get('model_fraction'))} |"
        )
    return [*lines, ""]


def _save(fig, axes, title: str, path: Path) -> Path:
    """Legend on the first panel, title, tight layout, PNG at ``path``; closes the figure."""
    import matplotlib.pyplot as plt

    axes[0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot(cdds: list[dict], clip: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    if clip:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for method, dtype in sorted({(r["method"], r["dtype"]) for r in clip}):
            pts = [
                r for r in clip if r["method"] == method and r["dtype"] == dtype and r["full_ms"]
            ]
            if not pts:
                continue
            label = f"{method} {dtype}"
            axes[0].plot([r["batch"] for r in pts], [r["full_ms"] for r in pts], "o-", label=label)
            mem = [r for r in pts if r["peak_mb"]]  # no device memory counter on CPU
            if mem:
                axes[1].plot(
                    [r["batch"] for r in mem], [r["peak_mb"] for r in mem], "o-", label=label
                )
        for ax, ylabel in zip(axes, ("fwd+bwd ms", "peak extra MiB"), strict=True):
            ax.set_xscale("log", base=2)
            if ax.lines:  # an empty log axis cannot be drawn
                ax.set_yscale("log")
            ax.set_xlabel("batch size B (D = 512)")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
        paths.append(
            _save(
                fig,
                axes,
                "Symmetric InfoNCE: time and memory against batch size",
                out / "contrastive.png",
            )
        )
    if cdds:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        labels = sorted({(r["impl"], r["dtype"]) for r in cdds})
        shapes = list(dict.fromkeys(r["shape"] for r in cdds))
        width = 0.8 / max(1, len(labels))
        for k, (impl, dtype) in enumerate(labels):
            row = {r["shape"]: r for r in cdds if r["impl"] == impl and r["dtype"] == dtype}
            xs = [i + k * width for i in range(len(shapes))]
            axes[0].bar(
                xs,
                [row[s]["full_ms"] if s in row else 0 for s in shapes],
                width,
                label=f"{impl} {dtype}",
            )
            axes[1].bar(xs, [(row[s]["peak_mb"] or 0) if s in row else 0 for s in shapes], width)
        for ax, ylabel in zip(axes, ("fwd+bwd ms", "peak extra MiB"), strict=True):
            ax.set_xticks([i + 0.4 - width / 2 for i in range(len(shapes))], shapes, fontsize=8)
            ax.set_yscale("log")
            ax.set_ylabel(ylabel)
        paths.append(
            _save(fig, axes, "CDDS loss forward+backward (B x P x L x D)", out / "cdds_loss.png")
        )
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--skip-contrastive", action="store_true")
    parser.add_argument("--skip-cdds", action="store_true")
    parser.add_argument(
        "--compile-dtypes",
        default="bfloat16,float32",
        help="dtypes for which torch.compile(reference) is measured (each shape "
        "compiles anew, ~tens of seconds)",
    )
    args = parser.parse_args(argv)
    compile_dtypes = {getattr(torch, d) for d in args.compile_dtypes.split(",") if d}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    env = environment()
    ceilings = measured_ceilings() if cuda else {}
    shapes = bench_cdds.QUICK_SHAPES if args.quick else bench_cdds.GPU_SHAPES
    names = None if cuda else ["eager reference"]
    dtypes = [torch.bfloat16, torch.float32]
    cdds = (
        []
        if args.skip_cdds
        else bench_cdds.run(
            shapes,
            dtypes,
            names=names,
            skip_compile_for=[d for d in dtypes if d not in compile_dtypes],
        )
    )
    for r in cdds:
        if cuda and r["impl"].startswith("fast") and r["full_ms"] == r["full_ms"]:
            floor_ms = cdds_min_bytes(r["shape"], r["dtype"]) / (ceilings["copy_GBps"] * 1e6)
            r["byte_roofline_fraction"] = floor_ms / r["full_ms"]
    clip = [] if (args.skip_contrastive or not cuda) else contrastive_rows(args.quick)
    lines = ["# Benchmark report", "", f"Environment: `{json.dumps(env)}`", ""]
    if ceilings:
        lines += [
            f"Measured ceilings: `{json.dumps({k: round(v, 1) for k, v in ceilings.items()})}`",
            "",
        ]
    if cdds:
        lines += ["## CDDS loss", "", bench_cdds.to_markdown(cdds), ""]
    fr = [r for r in cdds if "byte_roofline_fraction" in r]
    if fr:
        lines += [
            "Fast path, fraction of the byte roofline: "
            + ", ".join(
                f"{r['shape']} {r['dtype']}: {100 * r['byte_roofline_fraction']:.0f}%" for r in fr
            ),
            "",
        ]
    if clip:
        lines += contrastive_section(clip, ceilings)
    pngs = plot(cdds, clip, out)
    lines += [f"![{p.stem}]({p.name})" for p in pngs]
    results = {"env": env, "ceilings": ceilings, "cdds": cdds, "contrastive": clip}

    def write() -> None:
        (out / "report.md").write_text("\n".join(lines) + "\n")
        (out / "report.json").write_text(json.dumps(results, indent=1, default=str))

    write()
    if cuda and cdds and not args.quick:
        # the sampling tile candidate against today's tiles (RESULTS.md, "SASS of the sampling
        # loops"), last and written again: if the stage's time runs out here, the rest is saved
        results["tiles"] = bench_cdds.sampling_tile_rows()
        lines += ["## CDDS loss: sampling tiles", "", bench_cdds.to_markdown(results["tiles"]), ""]
        write()
    print("\n".join(lines))
    print(f"written: {out / 'report.md'}, {', '.join(map(str, pngs))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
