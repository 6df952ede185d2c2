"""Compile every Triton kernel exactly as a GPU launch would, for sm_90, without a GPU.

    python benchmarks/kernel_resources.py              # step shapes + odd shapes, markdown table
    python benchmarks/kernel_resources.py --quick      # odd shapes only (what the test compiles)
    python benchmarks/kernel_resources.py --json out.json

The Triton interpreter (how CPU CI runs the kernels) checks what a kernel computes, not whether
the GPU compiler accepts it, nor what it costs in registers. This script runs the real launchers
(``cdds_loss_triton`` forward + backward, the standalone ops and the InfoNCE forward + backward)
on ``meta`` tensors, which ``cdds_fast.kernels.launch`` plans as for the reference GPU (132
multiprocessors: H100 SXM, H200), so every tile size, warp count and grid is the one such a device
gets. The custom ops run their implementations instead of their fake ones for the duration, and
Triton's launch is replaced by a recorder: each distinct specialisation (constexprs, argument
dtypes, alignment attributes, ``num_warps``, ``num_stages``) is compiled with Triton's NVIDIA
backend down to a cubin (ptxas ships with the triton wheel) and its resource usage read back with
``cuobjdump``:

* ``regs``: registers per thread (sm_90 has 64K per multiprocessor, so ``regs * 32 * warps``
  bounds how many programs share one);
* ``stack``: bytes of per-thread local memory -- register spills, for these kernels;
* ``smem``: static + Triton-managed shared memory per program (sm_90 allows 227 KiB).

Nothing here is timed: the figures are what the compiler produced, and they tell which configs
spill before a GPU is ever used. ``--count-launches`` and ``--count-info-nce`` count the launches
and the buffers of one call instead. ``--sampling-sass`` disassembles the sampling kernels of a
(256, 50, 77, 512) bf16 step (triton's ``nvdisasm``) and counts the instructions of their sweeps
per element of the virtual ``[B, D, D]``: the compute model of ``kernels/sampling.py``. It must
run with ``TRITON_INTERPRET`` unset (``@triton.jit`` decides at definition time whether it builds
interpreter functions).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

#: sm_90 limits: registers per multiprocessor, shared memory per block (opt-in maximum).
SM90_REGS = 65536
SM90_SMEM = 232448

#: ``(B, P, L, D)`` of CLIP-sized training steps: ViT-B/32's 50 image tokens, 77 text tokens.
STEP_SHAPES = [(256, 50, 77, 512), (1024, 50, 77, 512), (256, 50, 77, 1024)]
#: Odd sizes: not powers of two, one token, one feature, and a feature dim wider than the token
#: pass's row block (rows looped in chunks after the separate row-LSE pass).
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
        blocks = ", ".join(
            f"{k}={v}"
            for k, v in self.constexprs.items()
            if k.startswith("BLOCK") or k in ("SINGLE_K", "PRECISION")
        )
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
                fn.signature, fn.params, self.backend
            )
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(
            self.backend, kwargs, bound, specialization, options
        )
        names = [p.name for p in fn.params]
        named_constexprs = {names[path[0]]: value for path, value in constexprs.items()}
        key = repr(
            (
                fn.__name__,
                signature,
                sorted(constexprs.items()),
                sorted(attrs.items()),
                options.num_warps,
                options.num_stages,
            )
        )
        if key not in self.specs:
            grid = grid(bound) if callable(grid) else tuple(grid)
            self.specs[key] = Spec(
                fn.__name__,
                named_constexprs,
                dict(signature),
                options.num_warps,
                options.num_stages,
                tuple(grid),
            )
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
                compiled = triton.compile(
                    ASTSource(fn, signature, constexprs, attrs),
                    target=self.target,
                    options=options.__dict__,
                )
                spec.regs, spec.stack, spec.smem = _resources(compiled)
            except Exception as err:  # report every failure, not just the first
                spec.error = f"{type(err).__name__}: {str(err).strip().splitlines()[-1][:300]}"
            spec.compile_s = time.perf_counter() - start
            log(
                f"[{i + 1}/{len(self.specs)}] {spec.label()}  warps={spec.num_warps} "
                f"stages={spec.num_stages}: "
                + (spec.error or f"regs={spec.regs} stack={spec.stack} smem={spec.smem}")
                + f" ({spec.compile_s:.1f} s)"
            )


def _resources(compiled) -> tuple[int, int, int]:
    """(registers per thread, local stack bytes, shared memory bytes) of a compiled kernel."""
    from triton.backends.nvidia import compiler as nv

    cuobjdump = Path(nv.__file__).parent / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run(
            [str(cuobjdump), "--dump-resource-usage", f.name],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    if not found:
        raise RuntimeError(f"cuobjdump: no resource line in {out!r}")
    regs, stack, shared, local = (int(v) for v in found.groups())
    return regs, stack + local, max(shared, int(compiled.metadata.shared))


def _install(recorder: Recorder) -> None:
    from triton.runtime.jit import JITFunction

    def run(self, *args, grid, warmup, **kwargs):
        recorder.run(self, args, kwargs, grid)
        return None

    JITFunction.run = run


def _refuse_interpreter() -> None:
    from cdds_fast.kernels.launch import interpreter_active

    if interpreter_active():
        raise SystemExit(
            "kernel_resources: unset TRITON_INTERPRET (the interpreter replaces the "
            "functions this script compiles)"
        )


META = torch.device("meta")


class _Allocations(TorchDispatchMode):
    """Appends every buffer allocated through ``torch.empty`` & co. while active to ``into``, as
    ``[shape, dtype name, bytes]``: the launchers' scratch, outputs and gradients (what aten ops
    allocate for their own results is not listed)."""

    EMPTY = {
        torch.ops.aten.empty.memory_format,
        torch.ops.aten.empty_strided.default,
        torch.ops.aten.empty_like.default,
        torch.ops.aten.new_empty.default,
        torch.ops.aten.new_empty_strided.default,
    }

    def __init__(self, into: list):
        super().__init__()
        self.into = into

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in self.EMPTY:
            self.into.append(
                [
                    list(out.shape),
                    str(out.dtype).removeprefix("torch."),
                    out.numel() * out.element_size(),
                ]
            )
        return out


@contextlib.contextmanager
def _ops_run_on_meta(into: list | None = None) -> Iterator[None]:
    """On ``meta`` tensors every ``cdds_fast`` custom op runs its implementation (the launchers,
    whose launches the recorder takes) instead of its fake one, with its buffers appended to
    ``into`` if given (:class:`_Allocations`); restored on exit."""
    from torch._library.custom_ops import OPDEFS

    import cdds_fast.fused_loss  # noqa: F401  (registers the loss's ops, and the kernels')
    import cdds_fast.kernels.stats  # noqa: F401  (the standalone column_stats op)

    def running(fn):
        def kernel(*args, **kwargs):
            with _Allocations(into) if into is not None else contextlib.nullcontext():
                return fn(*args, **kwargs)

        return kernel

    lib = torch.library.Library("cdds_fast", "IMPL")
    try:
        for name, op in OPDEFS.items():
            if name.startswith("cdds_fast::"):
                lib.impl(name.split("::")[1], running(op._init_fn), "Meta", allow_override=True)
        yield
    finally:
        lib._destroy()


def _meta_step(batch: int, patches: int, length: int, dim: int, dtype: torch.dtype):
    """``benchmarks.bench_cdds.make_problem``'s tensors at ``(B, P, L, D)``, as meta leaves."""
    from benchmarks.bench_cdds import PARAMS

    def leaf(*shape, dt=dtype):
        return torch.empty(shape, dtype=dt, device=META, requires_grad=True)

    tensors = [leaf(batch, n, dim) for n in (patches,) * 3 + (length,) * 3]
    mask = torch.empty(batch, length, dtype=torch.bool, device=META)
    params = {n: leaf(dim, dt=torch.float32) for n in PARAMS}
    params["logit_scale"] = leaf(dt=torch.float32)
    return tensors, mask, params


def plan_cdds(recorder: Recorder, shape: tuple, dtype: torch.dtype) -> None:
    """Forward + backward of the fused CDDS loss at ``(B, P, L, D)``, launches recorded."""
    from benchmarks.bench_cdds import step_fn
    from cdds_fast.fused_loss import cdds_loss_triton

    recorder.plan = f"cdds {tuple(shape)} {_name(dtype)}"
    tensors, mask, params = _meta_step(*shape, dtype)
    step_fn(cdds_loss_triton, tensors, mask, params)()


def plan_units(recorder: Recorder, shape: tuple, dtype: torch.dtype) -> None:
    """Forward + backward of the standalone column-statistics and related-sampling ops (the
    unfused specialisations of their kernels) at ``(B, P, L, D)``'s text and feature sizes."""
    from cdds_fast.kernels.sampling import related_sampling
    from cdds_fast.kernels.stats import column_stats

    batch, _, length, dim = shape
    recorder.plan = f"units {tuple(shape)} {_name(dtype)}"
    x = torch.empty(batch, length, dim, dtype=dtype, device=META, requires_grad=True)
    mask = torch.empty(batch, length, dtype=torch.bool, device=META)
    mu, s = column_stats(x, mask)
    (mu.sum() + s.sum()).backward()
    leaves = [
        torch.empty(*size, device=META, requires_grad=True)
        for size in [(batch, dim)] * 4 + [(dim,)] * 2
    ]
    sum(o.sum() for o in related_sampling(*leaves)).backward()


def plan_info_nce(
    recorder: Recorder, batch: int, dim: int, dtype: torch.dtype, allow_tf32: bool = False
) -> None:
    """Forward + backward of the symmetric and the rectangular (``local_loss``) InfoNCE on both
    paths (two problems at once, as the CDDS loss runs them), every kernel specialisation a GPU
    would compile."""
    from cdds_fast.kernels import contrastive as K
    from cdds_fast.kernels.launch import _plan_for_path

    tag = _name(dtype) + (" tf32" if allow_tf32 else "")
    for path in ("fused", "blocked"):
        for symmetric in (True, False):
            recorder.plan = (
                f"info_nce B={batch} D={dim} {tag} {'sym' if symmetric else 'rect'} {path}"
            )
            n = batch if symmetric else 2 * batch
            x = torch.empty(2, batch, dim, dtype=dtype, device=META)
            y = torch.empty(2, n, dim, dtype=dtype, device=META)
            scale = torch.empty((), device=META)
            offset = 0 if symmetric else batch // 2
            plan = _plan_for_path(
                path, dtype, batch, n, dim, META, allow_tf32, 4 * batch * n
            )  # budget: two blocks per side
            loss, stats_r, stats_c = K._forward(
                x,
                y,
                scale,
                symmetric=symmetric,
                label_offset=offset,
                allow_tf32=allow_tf32,
                plan=plan,
            )
            K._backward(
                torch.empty(2, device=META),
                x,
                y,
                scale,
                stats_r,
                stats_c,
                symmetric=symmetric,
                label_offset=offset,
                allow_tf32=allow_tf32,
                need_dx=True,
                need_dy=True,
                need_dscale=True,
                plan=plan,
            )


#: aten ops that launch no device work (views, metadata, allocation; ``aten::to`` of a tensor
#: already in the wanted dtype and device, all a step's are)
_NO_LAUNCH = {
    "aten::empty",
    "aten::empty_strided",
    "aten::empty_like",
    "aten::new_empty",
    "aten::view",
    "aten::_unsafe_view",
    "aten::_reshape_alias",
    "aten::reshape",
    "aten::select",
    "aten::slice",
    "aten::narrow",
    "aten::t",
    "aten::transpose",
    "aten::permute",
    "aten::as_strided",
    "aten::expand",
    "aten::expand_as",
    "aten::unsqueeze",
    "aten::squeeze",
    "aten::flatten",
    "aten::unflatten",
    "aten::unbind",
    "aten::split",
    "aten::chunk",
    "aten::detach",
    "aten::alias",
    "aten::lift_fresh",
    "aten::result_type",
    "aten::promote_types",
    "aten::contiguous",
    "aten::resolve_conj",
    "aten::resolve_neg",
    "aten::to",
    "aten::_to_copy",
}


def _counting_launches() -> Counter:
    """Replaces Triton's launch by a counter of launches per kernel name."""
    calls: Counter = Counter()
    recorder = Recorder(90)
    recorder.run = lambda fn, args, kwargs, grid: calls.update([fn.__name__])
    _install(recorder)
    return calls


def count_launches(shape: tuple = (256, 50, 77, 512), dtype: torch.dtype = torch.bfloat16) -> dict:
    """Device launches of one fast-path CDDS loss forward and backward at ``shape``
    (``fused_loss.cdds_loss_triton``, what ``functional.cdds_loss`` runs on the fast path: that
    entry itself opens an autocast region, which meta tensors do not support), as the reference
    GPU gets them: Triton launches (recorded, not run) and top-level aten ops that launch work.
    Eager launch overhead (~5 us each) is what bounds a small batch. Also every buffer the
    custom ops allocate per phase (``scratch``: shape, dtype, bytes; the backward's include the
    input gradients), for the memory model of ``cdds_fast/fused_loss.py``.
    """
    from torch.profiler import ProfilerActivity, profile

    from cdds_fast.fused_loss import cdds_loss_triton

    triton_calls = _counting_launches()
    tensors, mask, params = _meta_step(*shape, dtype)
    out = {}
    for phase in ("forward", "backward"):
        triton_calls.clear()
        allocated: list = []
        with profile(activities=[ProfilerActivity.CPU]) as prof, _ops_run_on_meta(allocated):
            if phase == "forward":
                terms = cdds_loss_triton(*tensors, mask, **params)
                total = sum(terms.values())
            else:
                total.backward()
        out[phase] = {
            "triton": sum(triton_calls.values()),
            "aten": _top_level_aten(prof),
            "scratch": allocated,
        }
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


def count_info_nce(
    b: int,
    n: int,
    d: int,
    dtype: torch.dtype,
    budget: int,
    *,
    n_prob: int = 1,
    symmetric: bool = True,
) -> dict:
    """Launches and buffers of one InfoNCE forward and backward (``P = n_prob`` problems of
    ``[b, d]`` rows against ``[n, d]`` columns) as the reference GPU gets them: Triton launches
    recorded (not run), aten launches from the profiler as in :func:`count_launches`, and the
    bytes of every buffer the launchers allocate (on meta tensors, so B = 65536 computes
    nothing)."""
    from torch.profiler import ProfilerActivity, profile

    from cdds_fast.kernels import contrastive as K
    from cdds_fast.kernels.launch import info_nce_plan

    triton_calls = _counting_launches()
    x = torch.empty(n_prob, b, d, dtype=dtype, device=META)
    y = torch.empty(n_prob, n, d, dtype=dtype, device=META)
    scale = torch.empty((), device=META)
    grad = torch.empty(n_prob, device=META)
    offset = 0 if symmetric else n - b
    plan = info_nce_plan(dtype, b, n, d, META, budget=budget)
    out: dict = {"plan": [plan.path, plan.fwd_rows, plan.bwd_rows, plan.bwd_cols]}
    for phase in ("forward", "backward"):
        triton_calls.clear()
        allocated: list = []
        with profile(activities=[ProfilerActivity.CPU]) as prof, _Allocations(allocated):
            if phase == "forward":
                _, stats_r, stats_c = K.nce_forward(
                    x, y, scale, symmetric=symmetric, label_offset=offset, max_scratch_bytes=budget
                )
            else:
                K.nce_backward(
                    grad,
                    x,
                    y,
                    scale,
                    stats_r,
                    stats_c,
                    symmetric=symmetric,
                    label_offset=offset,
                    max_scratch_bytes=budget,
                )
        out[phase] = {
            "triton": sum(triton_calls.values()),
            "aten": _top_level_aten(prof),
            "scratch": [nbytes for *_, nbytes in allocated],
        }
    return out


#: InfoNCE cases ``--count-info-nce`` reports: (B, N, D, dtype, budget, P, symmetric)
INFO_NCE_CASES = [
    (256, 256, 512, "fp32", 256 * 2**20, 3, True),  # the CDDS step's three terms
    (4096, 4096, 512, "bf16", 192 * 2**20, 1, True),
    (4096, 4096, 512, "bf16", 24 * 2**20, 1, True),  # several blocks and chunks
    (1500, 3000, 64, "fp32", 2**20, 2, False),  # rectangular, short blocks
    (65536, 65536, 512, "bf16", 192 * 2**20, 1, True),
    (65536, 65536, 512, "fp32", 192 * 2**20, 1, True),
]


def _name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


def record(quick: bool, arch: int = 90) -> Recorder:
    _refuse_interpreter()
    recorder = Recorder(arch)
    _install(recorder)
    shapes = ODD_SHAPES if quick else STEP_SHAPES + ODD_SHAPES
    nce = [(257, 17)] if quick else [(4096, 512), (257, 17)]
    with _ops_run_on_meta(), torch.enable_grad():
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
    rows = [
        "| kernel | warps | stages | regs | stack B | smem KiB | programs | first plan |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for s in specs:
        programs = 1
        for g in s.grid:
            programs *= int(g)
        if s.error:
            res = f"**error** {s.error} | | "
        else:
            res = f"{s.regs} | {s.stack} | {s.smem / 1024:.1f}"
        rows.append(
            f"| {s.label()} | {s.num_warps} | {s.num_stages} | {res} | {programs} | {s.plans[0]} |"
        )
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
            out.append(
                f"{s.label()}: {s.regs} registers x {32 * s.num_warps} threads > {SM90_REGS}"
            )
    return out


#: The related-sampling kernels whose sweeps over the virtual ``[B, D, D]`` carry the loss's ALU.
SAMPLING_KERNELS = (
    "_related_sampling_fwd_kernel",
    "_related_sampling_bwd_row_kernel",
    "_related_sampling_bwd_col_kernel",
)


def sass_loops(cubin: bytes) -> list[Counter]:
    """The innermost loops of a cubin's SASS (the code from a label to the branch back to it,
    containing no other such loop), each as a Counter of its opcodes (``MUFU.EX2`` keeps its
    function; other opcodes lose their modifiers) with the total under ``"all"``."""
    import triton

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run(
            [triton.knobs.nvidia.nvdisasm.path, "-c", f.name],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    ops: list[str] = []
    labels: dict[str, int] = {}
    for line in sass.splitlines():
        label = re.match(r"\s*(\.L_x_\d+):", line)
        if label:
            labels[label.group(1)] = len(ops)
            continue
        ins = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(.*?)\s*;", line)
        if ins:
            ops.append(re.sub(r"^@!?U?P\w+\s+", "", ins.group(1)))
    spans = []
    for end, text in enumerate(ops):
        target = re.search(r"BRA\s+(?:\S+\s+)?`?\(?(\.L_x_\d+)", text)
        if target and labels.get(target.group(1), end + 1) <= end:
            spans.append((labels[target.group(1)], end))
    loops = []
    for start, end in spans:
        if any(start <= a and b <= end and (a, b) != (start, end) for a, b in spans):
            continue  # encloses another loop
        body = ops[start : end + 1]
        names = [t.split()[0] for t in body]
        counts = Counter(n if n.startswith("MUFU") else n.split(".")[0] for n in names)
        counts["all"] = len(body)
        loops.append(counts)
    return loops


def sampling_instructions(arch: int = 90) -> dict[str, list[float]]:
    """SASS instructions per element of each sweep of the sampling kernels, as a
    (256, 50, 77, 512) bf16 step launches them. A sweep's loop handles one element per ``exp2``
    (``MUFU.EX2``); the forward's max sweep, the one loop without any ``MUFU``, one per ``FMNMX``
    (either count also absorbs unrolling). Innermost loops with neither are per-row passes."""
    import triton
    from triton.compiler import ASTSource

    _refuse_interpreter()
    recorder = Recorder(arch)
    _install(recorder)
    with _ops_run_on_meta(), torch.enable_grad():
        plan_cdds(recorder, STEP_SHAPES[0], torch.bfloat16)
    per_element: dict[str, list[float]] = {}
    for key, spec in recorder.specs.items():
        if spec.kernel not in SAMPLING_KERNELS:
            continue
        fn, signature, constexprs, attrs, options = recorder.sources[key]
        compiled = triton.compile(
            ASTSource(fn, signature, constexprs, attrs),
            target=recorder.target,
            options=options.__dict__,
        )
        sweeps = []
        for loop in sass_loops(compiled.asm["cubin"]):
            mufu = sum(n for op, n in loop.items() if op.startswith("MUFU"))
            elements = loop["MUFU.EX2"] if mufu else loop["FMNMX"]
            if elements:
                sweeps.append(round(loop["all"] / elements, 2))
        per_element[spec.kernel] = sweeps
    return per_element


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="odd shapes only")
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (90 = H100)")
    parser.add_argument("--json", type=Path, help="write the specs and resources here")
    parser.add_argument(
        "--allow-spills",
        action="store_true",
        help="exit 0 even if some kernel spills (compile errors still fail)",
    )
    parser.add_argument(
        "--count-launches",
        action="store_true",
        help="only count the device launches of one CDDS loss step, print JSON",
    )
    parser.add_argument(
        "--count-info-nce",
        action="store_true",
        help="only count the launches and scratch of the InfoNCE cases "
        "(INFO_NCE_CASES), print JSON",
    )
    parser.add_argument(
        "--sampling-sass",
        action="store_true",
        help="only count the SASS instructions per element of the sampling sweeps, print JSON",
    )
    args = parser.parse_args(argv)
    if args.sampling_sass:
        per_element = sampling_instructions(args.arch)
        total = sum(sum(v) for v in per_element.values())
        print(json.dumps({"per_element": per_element, "total": round(total, 2)}))
        return 0
    if args.count_info_nce:
        _refuse_interpreter()
        cases = [
            [*case, count_info_nce(b, n, d, DTYPES[dt], budget, n_prob=p, symmetric=sym)]
            for case in INFO_NCE_CASES
            for b, n, d, dt, budget, p, sym in [case]
        ]
        print(json.dumps(cases))
        return 0
    if args.count_launches:
        _refuse_interpreter()
        print(json.dumps(count_launches()))
        return 0
    import triton

    start = time.perf_counter()
    recorder = record(args.quick, args.arch)
    specs = list(recorder.specs.values())
    print(
        f"{len(specs)} distinct kernel specialisations recorded in "
        f"{time.perf_counter() - start:.1f} s; compiling for sm_{args.arch} "
        f"(triton {triton.__version__})",
        flush=True,
    )
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
