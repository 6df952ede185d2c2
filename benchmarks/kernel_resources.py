"""Compile every Triton kernel exactly as a GPU launch would, for sm_90, without a GPU.

    python benchmarks/kernel_resources.py              # issue shapes + odd shapes, markdown table
    python benchmarks/kernel_resources.py --quick      # odd shapes only (what the test compiles)
    python benchmarks/kernel_resources.py --json out.json

The Triton interpreter (how CPU CI runs the kernels) checks what a kernel computes, not whether
the GPU compiler accepts it, nor what it costs in registers. This script runs the real launchers
(``cdds_loss_triton`` forward + backward and the InfoNCE forward + backward) on CPU tensors inside
:func:`cdds_fast.kernels.launch.gpu_launch_plan`, so every tile size, warp count and grid is the
one a CUDA device with 132 multiprocessors (H100 SXM / H200) would get, and replaces Triton's launch
by a recorder: each distinct specialisation (constexprs, argument dtypes, alignment attributes,
``num_warps``, ``num_stages``) is compiled with Triton's NVIDIA backend down to a cubin (ptxas
ships with the triton wheel) and its resource usage read back with ``cuobjdump``:

* ``regs``: registers per thread (sm_90 has 64K per multiprocessor, so ``regs * 32 * warps``
  bounds how many programs share one);
* ``stack``: bytes of per-thread local memory -- register spills, for these kernels;
* ``smem``: static + Triton-managed shared memory per program (sm_90 allows 227 KiB).

Nothing here is timed: the figures are what the compiler produced, and they tell which configs
spill before a GPU is ever used. It must run with ``TRITON_INTERPRET`` unset (``@triton.jit``
decides at definition time whether it builds interpreter functions).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

#: sm_90 limits: registers per multiprocessor, shared memory per block (opt-in maximum).
SM90_REGS = 65536
SM90_SMEM = 232448

ISSUE_SHAPES = [(256, 50, 77, 512), (1024, 50, 77, 512), (256, 50, 77, 1024)]
#: Odd sizes: not powers of two, one token, one feature, and a feature dim above
#: ``launch.ROW_BLOCK_CAP`` (rows looped in chunks; the constraint losses' separate row-LSE pass).
ODD_SHAPES = [(3, 7, 5, 37), (1, 1, 1, 1), (2, 3, 4, 4100)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Spec:
    """One distinct kernel specialisation a launch plan asked for."""
    kernel: str
    constexprs: dict
    signature: dict
    num_warps: int
    num_stages: int
    grid: tuple
    plans: list = field(default_factory=list)  # which problems launched it
    regs: int | None = None
    stack: int | None = None
    smem: int | None = None
    compile_s: float | None = None
    error: str | None = None

    def label(self) -> str:
        blocks = ", ".join(f"{k}={v}" for k, v in self.constexprs.items()
                           if k.startswith("BLOCK") or k in ("SINGLE_K", "PRECISION"))
        dtypes = sorted({v for v in self.signature.values() if v.startswith("*")} - {"*i8", "*u8"})
        return f"{self.kernel} [{', '.join(dtypes)}] {blocks}"


class Recorder:
    """Stands in for ``JITFunction.run``: binds the arguments with the CUDA backend's own binder
    (so specialisation is Triton's), keeps the first launch of each distinct specialisation."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend

        self.target = GPUTarget("cuda", arch, 32)
        self.backend = make_backend(self.target)
        self.specs: dict[str, Spec] = {}
        self.binders: dict = {}  # JITFunction -> Triton's argument binder for this backend
        self.sources: dict[str, tuple] = {}
        self.plan = ""

    def run(self, fn, args, kwargs, grid):
        from triton.runtime.jit import create_function_from_signature

        kwargs = dict(kwargs)
        kwargs.setdefault("debug", False)
        binder = self.binders.get(fn)
        if binder is None:
            binder = self.binders[fn] = create_function_from_signature(
                fn.signature, fn.params, self.backend)
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(
            self.backend, kwargs, bound, specialization, options)
        names = [p.name for p in fn.params]
        named_constexprs = {names[path[0]]: value for path, value in constexprs.items()}
        key = repr((fn.__name__, signature, sorted(constexprs.items()), sorted(attrs.items()),
                    options.num_warps, options.num_stages))
        if key not in self.specs:
            grid = grid(bound) if callable(grid) else tuple(grid)
            self.specs[key] = Spec(fn.__name__, named_constexprs, dict(signature),
                                   options.num_warps, options.num_stages, tuple(grid))
            self.sources[key] = (fn, signature, constexprs, attrs, options)
        if self.plan not in self.specs[key].plans:
            self.specs[key].plans.append(self.plan)

    def compile_all(self, log=print) -> None:
        import triton
        from triton.compiler import ASTSource

        for i, (key, spec) in enumerate(self.specs.items()):
            fn, signature, constexprs, attrs, options = self.sources[key]
            start = time.perf_counter()
            try:
                compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs),
                                          target=self.target, options=options.__dict__)
                spec.regs, spec.stack, spec.smem = _resources(compiled)
            except Exception as err:  # report every failure, not just the first
                spec.error = f"{type(err).__name__}: {str(err).strip().splitlines()[-1][:300]}"
            spec.compile_s = time.perf_counter() - start
            log(f"[{i + 1}/{len(self.specs)}] {spec.label()}  warps={spec.num_warps} "
                f"stages={spec.num_stages}: "
                + (spec.error or f"regs={spec.regs} stack={spec.stack} smem={spec.smem}")
                + f" ({spec.compile_s:.1f} s)")


def _resources(compiled) -> tuple[int, int, int]:
    """(registers per thread, local stack bytes, shared memory bytes) of a compiled kernel."""
    from triton.backends.nvidia import compiler as nv

    cuobjdump = Path(nv.__file__).parent / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([str(cuobjdump), "--dump-resource-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    if not found:
        raise RuntimeError(f"cuobjdump: no resource line in {out!r}")
    regs, stack, shared, local = (int(v) for v in found.groups())
    return regs, stack + local, max(shared, int(compiled.metadata.shared))


@contextlib.contextmanager
def _assertions_pass() -> Iterator[None]:
    """Recorded launches do not run, so what a device-side assertion would check is garbage:
    assert on a true value instead (still one ``aten::_assert_async``, as a GPU step issues)."""
    real = torch._assert_async
    true = torch.ones((), dtype=torch.bool)
    torch._assert_async = lambda _value, *message: real(true, *message)
    try:
        yield
    finally:
        torch._assert_async = real


def _install(recorder: Recorder) -> None:
    from triton.runtime.jit import JITFunction

    def run(self, *args, grid, warmup, **kwargs):
        recorder.run(self, args, kwargs, grid)
        return None

    JITFunction.run = run


def plan_cdds(recorder: Recorder, shape: tuple, dtype: torch.dtype) -> None:
    """Forward + backward of the fused CDDS loss at ``(B, P, L, D)``, launches recorded."""
    from benchmarks.bench_cdds import make_problem, step_fn
    from cdds_fast.fused_loss import cdds_loss_triton

    tensors, mask, params = make_problem(*shape, dtype, torch.device("cpu"))
    recorder.plan = f"cdds {tuple(shape)} {_name(dtype)}"
    step_fn(cdds_loss_triton, tensors, mask, params)()


def plan_units(recorder: Recorder, shape: tuple, dtype: torch.dtype) -> None:
    """Forward + backward of the standalone column-statistics and related-sampling ops (the
    unfused specialisations of their kernels) at ``(B, P, L, D)``'s text and feature sizes."""
    from cdds_fast.kernels.sampling import related_sampling
    from cdds_fast.kernels.stats import column_stats

    batch, _, length, dim = shape
    recorder.plan = f"units {tuple(shape)} {_name(dtype)}"
    x = torch.randn(batch, length, dim).to(dtype).requires_grad_(True)
    mask = torch.ones(batch, length, dtype=torch.bool)
    mu, s = column_stats(x, mask)
    (mu.sum() + s.sum()).backward()
    stats = [torch.randn(batch, dim), torch.rand(batch, dim) + 0.5] * 2
    alphas = [torch.rand(dim), torch.rand(dim)]
    leaves = [t.requires_grad_(True) for t in (*stats, *alphas)]
    sum(o.sum() for o in related_sampling(*leaves)).backward()


def plan_info_nce(recorder: Recorder, batch: int, dim: int, dtype: torch.dtype,
                  allow_tf32: bool = False) -> None:
    """Forward + backward of the symmetric and the rectangular (``local_loss``) InfoNCE on both
    paths (two problems at once, as the CDDS loss runs them), every kernel specialisation a GPU
    would compile."""
    from cdds_fast.kernels import contrastive as K
    from cdds_fast.kernels.launch import _plan_for_path

    tag = _name(dtype) + (" tf32" if allow_tf32 else "")
    for path in ("fused", "blocked"):
        for symmetric in (True, False):
            recorder.plan = (f"info_nce B={batch} D={dim} {tag} "
                             f"{'sym' if symmetric else 'rect'} {path}")
            n = batch if symmetric else 2 * batch
            x, y = torch.randn(2, batch, dim).to(dtype), torch.randn(2, n, dim).to(dtype)
            scale = torch.tensor(14.3)
            offset = 0 if symmetric else batch // 2
            plan = _plan_for_path(path, dtype, batch, n, dim, x.device, allow_tf32,
                                  4 * batch * n)  # budget: two blocks per side
            loss, stats_r, stats_c = K._forward(x, y, scale, symmetric=symmetric,
                                                label_offset=offset, allow_tf32=allow_tf32,
                                                plan=plan)
            K._backward(torch.ones(2), x, y, scale, stats_r, stats_c, symmetric=symmetric,
                        label_offset=offset, allow_tf32=allow_tf32, need_dx=True, need_dy=True,
                        need_dscale=True, plan=plan)


#: aten ops that launch no device work (views, metadata, allocation)
_NO_LAUNCH = {
    "aten::empty", "aten::empty_strided", "aten::empty_like", "aten::new_empty", "aten::view",
    "aten::_unsafe_view", "aten::_reshape_alias", "aten::reshape", "aten::select", "aten::slice",
    "aten::narrow", "aten::t", "aten::transpose", "aten::permute", "aten::as_strided",
    "aten::expand", "aten::expand_as", "aten::unsqueeze", "aten::squeeze", "aten::flatten",
    "aten::unflatten", "aten::unbind", "aten::split", "aten::chunk", "aten::detach",
    "aten::alias", "aten::lift_fresh", "aten::result_type", "aten::promote_types",
    "aten::contiguous", "aten::resolve_conj", "aten::resolve_neg", "aten::to", "aten::_to_copy",
}


#: Modules whose launchers allocate their buffers through ``launch.scratch`` in a CDDS step.
_CDDS_SCRATCH_MODULES = ("cdds_fast.kernels.constraints", "cdds_fast.kernels.sampling",
                         "cdds_fast.kernels.contrastive", "cdds_fast.fused_loss")


@contextlib.contextmanager
def _recording_scratch(modules: tuple[str, ...], into: list) -> Iterator[None]:
    """Every ``scratch`` buffer the launchers of ``modules`` allocate, appended to ``into`` as
    ``[shape, dtype name, bytes]``."""
    import importlib

    mods = [importlib.import_module(m) for m in modules]
    real = [m.scratch for m in mods]

    def recording(real_scratch):
        def scratch(shape, dtype, device):
            out = real_scratch(shape, dtype, device)
            into.append([list(out.shape), str(dtype).removeprefix("torch."),
                         out.numel() * out.element_size()])
            return out
        return scratch

    for m, r in zip(mods, real):
        m.scratch = recording(r)
    try:
        yield
    finally:
        for m, r in zip(mods, real):
            m.scratch = r


def count_launches(shape: tuple = (256, 50, 77, 512), dtype: torch.dtype = torch.bfloat16,
                   sms: int = 132) -> dict:
    """Device launches of one fast-path CDDS loss forward and backward at ``shape``
    (``functional.cdds_loss(backend="triton")``, the call ``CDDSLoss`` makes), as a GPU would
    issue them: Triton launches (recorded, not run) and top-level aten ops that launch
    work (``aten::to`` is left out: on a GPU most are no-ops, and the CPU stand-in for the
    fp32-output GEMM adds some). Eager launch overhead (~5 us each) is what bounds a small batch.
    Also every buffer the launchers allocate per phase (``scratch``: shape, dtype, bytes; the
    backward's include the input gradients), for the memory model of ``cdds_fast/fused_loss.py``.
    """
    from collections import Counter

    from torch.profiler import ProfilerActivity, profile

    from benchmarks.bench_cdds import make_problem
    from cdds_fast.functional import cdds_loss
    from cdds_fast.kernels.launch import gpu_launch_plan

    triton_calls = Counter()
    recorder = Recorder(90)
    recorder.run = lambda fn, args, kwargs, grid: triton_calls.update([fn.__name__])
    _install(recorder)
    tensors, mask, params = make_problem(*shape, dtype, torch.device("cpu"))
    out = {}
    with gpu_launch_plan(sms), _assertions_pass():
        for phase in ("forward", "backward"):
            triton_calls.clear()
            allocated: list = []
            with profile(activities=[ProfilerActivity.CPU]) as prof, \
                    _recording_scratch(_CDDS_SCRATCH_MODULES, allocated):
                if phase == "forward":  # through the public entry point, with its checks
                    terms = cdds_loss(*tensors, mask, **params, backend="triton")
                    total = sum(terms.values())
                else:
                    total.backward()
            out[phase] = {"triton": sum(triton_calls.values()), "aten": _top_level_aten(prof),
                          "scratch": allocated}
    return out


def _top_level_aten(prof) -> int:
    """Top-level aten ops of a profile that launch device work (nested ops belong to their
    top-level op)."""
    aten = 0
    for event in prof.events():
        if not event.name.startswith("aten::") or event.name in _NO_LAUNCH:
            continue
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        aten += parent is None
    return aten


def count_info_nce(b: int, n: int, d: int, dtype: torch.dtype, budget: int, *, n_prob: int = 1,
                   symmetric: bool = True, device: str = "cpu", sms: int = 132) -> dict:
    """Launches and scratch allocations of one InfoNCE forward and backward (``P = n_prob``
    problems of ``[b, d]`` rows against ``[n, d]`` columns) as a GPU would issue them: Triton
    launches recorded (not run), aten launches from the profiler as in :func:`count_launches`,
    and every ``launch.scratch`` buffer the launchers allocate (``device="meta"`` runs the
    launchers of B = 65536 without computing anything)."""
    from collections import Counter

    from torch.profiler import ProfilerActivity, profile

    from cdds_fast.kernels import contrastive as K
    from cdds_fast.kernels.launch import gpu_launch_plan

    triton_calls = Counter()
    recorder = Recorder(90)
    recorder.run = lambda fn, args, kwargs, grid: triton_calls.update([fn.__name__])
    _install(recorder)
    allocated: list[int] = []
    real_scratch = K.scratch

    def recording_scratch(shape, dtype_, device_):
        out = real_scratch(shape, dtype_, device_)
        allocated.append(out.numel() * out.element_size())
        return out

    K.scratch = recording_scratch
    dev = torch.device(device)
    x = torch.randn(n_prob, b, d, device=dev).to(dtype)
    y = torch.randn(n_prob, n, d, device=dev).to(dtype)
    scale = torch.tensor(14.3, device=dev)
    grad = torch.ones(n_prob, device=dev)
    offset = 0 if symmetric else n - b
    out = {}
    try:
        with gpu_launch_plan(sms):
            from cdds_fast.kernels.launch import info_nce_plan

            plan = info_nce_plan(dtype, b, n, d, dev, budget=budget)
            out["plan"] = [plan.path, plan.fwd_rows, plan.bwd_rows, plan.bwd_cols]
            for phase in ("forward", "backward"):
                triton_calls.clear()
                allocated.clear()
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    if phase == "forward":
                        _, stats_r, stats_c = K.nce_forward(
                            x, y, scale, symmetric=symmetric, label_offset=offset,
                            max_scratch_bytes=budget)
                    else:
                        K.nce_backward(grad, x, y, scale, stats_r,
                                       stats_c, symmetric=symmetric, label_offset=offset,
                                       max_scratch_bytes=budget)
                out[phase] = {"triton": sum(triton_calls.values()),
                              "aten": _top_level_aten(prof), "scratch": list(allocated)}
    finally:
        K.scratch = real_scratch
    return out


#: InfoNCE cases ``--count-info-nce`` reports: (B, N, D, dtype, budget, P, symmetric, device)
INFO_NCE_CASES = [
    (256, 256, 512, "fp32", 256 * 2**20, 3, True, "cpu"),        # the CDDS step's three terms
    (4096, 4096, 512, "bf16", 192 * 2**20, 1, True, "meta"),
    (4096, 4096, 512, "bf16", 24 * 2**20, 1, True, "meta"),       # several blocks and chunks
    (1500, 3000, 64, "fp32", 2**20, 2, False, "meta"),            # rectangular, short blocks
    (65536, 65536, 512, "bf16", 192 * 2**20, 1, True, "meta"),
    (65536, 65536, 512, "fp32", 192 * 2**20, 1, True, "meta"),
]


def _name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


def record(quick: bool, arch: int = 90, sms: int = 132) -> Recorder:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("kernel_resources: unset TRITON_INTERPRET (the interpreter replaces the "
                         "functions this script compiles)")
    from cdds_fast.kernels.launch import gpu_launch_plan

    recorder = Recorder(arch)
    _install(recorder)
    shapes = ODD_SHAPES if quick else ISSUE_SHAPES + ODD_SHAPES
    nce = [(257, 17)] if quick else [(4096, 512), (257, 17)]
    with gpu_launch_plan(sms), _assertions_pass(), torch.enable_grad():
        for dtype in DTYPES.values():
            for shape in shapes:
                plan_cdds(recorder, shape, dtype)
            plan_units(recorder, ODD_SHAPES[0], dtype)
            for batch, dim in nce:
                plan_info_nce(recorder, batch, dim, dtype)
        for batch, dim in nce:
            plan_info_nce(recorder, batch, dim, torch.float32, allow_tf32=True)
    return recorder


def markdown(specs: list[Spec]) -> str:
    rows = ["| kernel | warps | stages | regs | stack B | smem KiB | programs | first plan |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for s in specs:
        programs = 1
        for g in s.grid:
            programs *= int(g)
        if s.error:
            res = f"**error** {s.error} | | "
        else:
            res = f"{s.regs} | {s.stack} | {s.smem / 1024:.1f}"
        rows.append(f"| {s.label()} | {s.num_warps} | {s.num_stages} | {res} | {programs} | "
                    f"{s.plans[0]} |")
    return "\n".join(rows)


def problems(specs: list[Spec]) -> list[str]:
    """Compile errors, spills and over-limit shared memory, one line each."""
    out = []
    for s in specs:
        if s.error:
            out.append(f"{s.label()}: does not compile: {s.error}")
            continue
        if s.stack:
            out.append(f"{s.label()}: {s.stack} bytes of local memory per thread (spills)")
        if s.smem > SM90_SMEM:
            out.append(f"{s.label()}: {s.smem} bytes of shared memory > {SM90_SMEM}")
        if s.regs * 32 * s.num_warps > SM90_REGS:
            out.append(f"{s.label()}: {s.regs} registers x {32 * s.num_warps} threads > "
                       f"{SM90_REGS}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="odd shapes only")
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (90 = H100)")
    parser.add_argument("--sms", type=int, default=132, help="multiprocessors the grids assume")
    parser.add_argument("--json", type=Path, help="write the specs and resources here")
    parser.add_argument("--allow-spills", action="store_true",
                        help="exit 0 even if some kernel spills (compile errors still fail)")
    parser.add_argument("--count-launches", action="store_true",
                        help="only count the device launches of one CDDS loss step, print JSON")
    parser.add_argument("--count-info-nce", action="store_true",
                        help="only count the launches and scratch of the InfoNCE cases "
                             "(INFO_NCE_CASES), print JSON")
    args = parser.parse_args(argv)
    if args.count_info_nce:
        if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
            raise SystemExit("kernel_resources: unset TRITON_INTERPRET")
        cases = [[*case, count_info_nce(b, n, d, DTYPES[dt], budget, n_prob=p, symmetric=sym,
                                        device=dev, sms=args.sms)]
                 for case in INFO_NCE_CASES for b, n, d, dt, budget, p, sym, dev in [case]]
        print(json.dumps(cases))
        return 0
    if args.count_launches:
        if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
            raise SystemExit("kernel_resources: unset TRITON_INTERPRET")
        print(json.dumps(count_launches(sms=args.sms)))
        return 0
    import triton

    start = time.perf_counter()
    recorder = record(args.quick, args.arch, args.sms)
    specs = list(recorder.specs.values())
    print(f"{len(specs)} distinct kernel specialisations recorded in "
          f"{time.perf_counter() - start:.1f} s; compiling for sm_{args.arch} "
          f"(triton {triton.__version__})", flush=True)
    recorder.compile_all(lambda line: print(line, flush=True))
    print()
    print(markdown(specs))
    issues = problems(specs)
    print()
    print("\n".join(issues) if issues else "no compile errors, no spills, shared memory in limits")
    if args.json:
        args.json.write_text(json.dumps([asdict(s) for s in specs], indent=1, default=str))
    errors = [s for s in specs if s.error]
    if errors or (issues and not args.allow_spills):
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
