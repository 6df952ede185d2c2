"""Fused InfoNCE (kernels/contrastive.py, cdds_fast/contrastive.py) against open_clip's ClipLoss.

On a CPU-only machine the Triton kernels run through the interpreter (conftest sets
TRITON_INTERPRET=1); with CUDA they run natively and the tests marked slow run too. Inputs are
fresh random features every run; shapes, dtypes and scales are in each test id.
"""

from __future__ import annotations

import ctypes
import dataclasses
import glob
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from open_clip.loss import ClipLoss

from cdds_fast.contrastive import FusedClipLoss, info_nce, info_nce_gathered
from cdds_fast.kernels import contrastive as K
from cdds_fast.kernels import launch
from cdds_fast.reference import contrastive as R
from tests.conftest import DEVICE

F64 = torch.float64
HAS_CUDA = torch.cuda.is_available()

# (dtype, atol, rtol, reason). The reference is ClipLoss evaluated in float64 on the *same*
# feature values the kernel sees (16-bit features upcast exactly), so rounding of the inputs
# themselves cancels out of the comparison and only the kernel's own arithmetic is measured.
# Loss: compared with ``atol`` absolute + ``rtol`` relative. Gradients: ``atol`` is relative to the
# gradient's *term scale* ``max(max|ref|, s * max|other features| / B)``. dL/da_i = s/(2B) sum_j
# G_ij b_j is a sum of terms of size ~s/B * |b| that cancel (rows of G sum to ~0), so rounding
# is relative to the terms, not to the (possibly tiny) result; a wrong coefficient or index
# still shows up at the size of the terms, 1e3 times above the bound.
TOLERANCES = [
    (
        torch.float32,
        1e-5,
        1e-5,
        "IEEE fp32 products, fp32 accumulation and statistics: only summation-order rounding "
        "(~sqrt(D) * 6e-8 * |logit|) separates it from float64",
    ),
    (
        torch.bfloat16,
        1e-2,
        1e-2,
        "products of bf16 values are exact in fp32, so the loss is fp32-accurate; the backward "
        "rounds G to bf16 (2^-9 relative) for the tensor-core G @ Y product and returns bf16 "
        "gradients (another 2^-9)",
    ),
    (
        torch.float16,
        1e-2,
        1e-2,
        "as bf16, with G rounded to fp16 after scaling by 2^14 (keeps small probabilities normal) "
        "and fp16 gradients",
    ),
]
TOL = {dt: (atol, rtol) for dt, atol, rtol, _ in TOLERANCES}


def _openblas():
    """numpy's bundled OpenBLAS (ctypes handle) or None."""
    for path in glob.glob(os.path.dirname(np.__file__) + ".libs/*openblas*"):
        try:
            return ctypes.CDLL(path)
        except OSError:
            continue
    return None


@pytest.fixture(scope="module", autouse=True)
def _one_blas_thread():
    """The Triton interpreter multiplies tiles with numpy. Once torch's OpenMP pool has run,
    numpy's multi-threaded OpenBLAS fights it for the cores and a 128x32x128 matmul takes
    ~25 ms instead of ~0.02 ms (same effect as not setting OPENBLAS_NUM_THREADS=1). Best effort:
    one BLAS thread while this module runs, restored afterwards."""
    lib = None if HAS_CUDA else _openblas()
    get = getattr(lib, "scipy_openblas_get_num_threads64_", None) if lib else None
    put = getattr(lib, "scipy_openblas_set_num_threads64_", None) if lib else None
    if get is None or put is None:
        yield
        return
    before = get()
    put(1)
    yield
    put(before)


BATCHES = [1, 3, 257, 1024]
DIMS = [1, 17, 512]
SCALES = [1.0, 14.3, 100.0]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def features(
    b: int, d: int, dtype: torch.dtype, device, *, normalize: bool = True, corr: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """Paired features: text = corr * image + noise, L2-normalised like CLIP's."""
    a = torch.randn(b, d, device=device)
    t = corr * a + torch.randn(b, d, device=device)
    if normalize:
        a, t = F.normalize(a, dim=-1), F.normalize(t, dim=-1)
    return a.to(dtype), t.to(dtype)


def leaves(*ts: torch.Tensor, dtype=None) -> list[torch.Tensor]:
    return [t.detach().to(dtype or t.dtype).clone().requires_grad_(True) for t in ts]


def term_scale(scale: float, other: torch.Tensor, rows: int) -> float:
    """Size of one term s/B * G_ij * y_j of a feature gradient (|G_ij| <= 2)."""
    return abs(scale) * other.detach().abs().max().item() / rows


def assert_grad_close(
    got: torch.Tensor, ref: torch.Tensor, atol: float, rtol: float, what: str, terms: float = 0.0
):
    got = got.to(F64)
    bound = atol * max(ref.abs().max().item(), terms, 1e-30)
    torch.testing.assert_close(got, ref, atol=bound, rtol=rtol, msg=lambda m: f"{what}: {m}")


def check_against_clip_loss(b, d, dtype, scale, device, *, loss_fn=None):
    """FusedClipLoss (Triton backend) vs ClipLoss in float64 on the same values: loss + 3 grads."""
    a0, t0 = features(b, d, dtype, device)
    a, t = leaves(a0, t0)
    s = torch.tensor(scale, device=device, requires_grad=True)
    loss_fn = loss_fn or FusedClipLoss(backend="triton")
    loss = loss_fn(a, t, s)
    loss.backward()

    a64, t64 = leaves(a0, t0, dtype=F64)
    s64 = torch.tensor(scale, device=device, dtype=F64, requires_grad=True)
    ref = ClipLoss()(a64, t64, s64)
    ref.backward()

    atol, rtol = TOL[dtype]
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss.to(F64), ref.detach(), atol=atol, rtol=rtol)
    assert a.grad.dtype == dtype and t.grad.dtype == dtype and s.grad.dtype == s.dtype
    assert_grad_close(a.grad, a64.grad, atol, rtol, "grad image_features", term_scale(scale, t0, b))
    assert_grad_close(t.grad, t64.grad, atol, rtol, "grad text_features", term_scale(scale, a0, b))
    # d loss / d scale is a single sum over B^2 terms; compare relative to the feature-gradient
    # scale it is built from (|dL/ds| can be ~0 when the loss is near its optimum in s)
    ds_tol = atol * max(1.0, abs(s64.grad.item()))
    assert abs(s.grad.item() - s64.grad.item()) <= ds_tol + rtol * abs(s64.grad.item()), (
        s.grad.item(),
        s64.grad.item(),
    )


# ------------------------------------------------------------------------------------------------
# ClipLoss parity. On CPU: every B x D at fp32 / scale 14.3, and every dtype x scale on two small
# shapes; the full cartesian product (108 cases) is marked slow and runs on CUDA.
# ------------------------------------------------------------------------------------------------
_CPU_SHAPES = [(3, 512), (257, 17)]


def _parity_params():
    out = []
    for b in BATCHES:
        for d in DIMS:
            for dtype in DTYPES:
                for scale in SCALES:
                    cheap = (dtype == torch.float32 and scale == 14.3) or (b, d) in _CPU_SHAPES
                    marks = () if cheap else (pytest.mark.slow,)
                    name = f"B{b}-D{d}-{str(dtype).split('.')[-1]}-s{scale}"
                    out.append(pytest.param(b, d, dtype, scale, id=name, marks=marks))
    return out


@pytest.mark.parametrize("b,d,dtype,scale", _parity_params())
def test_matches_clip_loss(b, d, dtype, scale, device):
    check_against_clip_loss(b, d, dtype, scale, device)


@pytest.mark.parametrize("path", ["fused", "blocked"])
@pytest.mark.parametrize("b,d", [(5, 17), (300, 96)])
@pytest.mark.parametrize("scale", [14.3, 100.0])
def test_fp32_within_1e5_of_float64(b, d, scale, path, force_path, device):
    """The documented accuracy claim: for L2-normalised fp32 features the loss is within 1e-5
    relative of float64 (plus 1e-7 absolute: a loss near 0, which s = 100 can produce, is known
    only to the rounding of its ~100-sized logits; fp32 ClipLoss is no better there)."""
    force_path(path)
    for _ in range(3):
        a, t = features(b, d, torch.float32, device)
        loss = info_nce(a, t, torch.tensor(scale, device=device), backend="triton")
        ref = R.info_nce(a.to(F64), t.to(F64), scale)
        assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item()) + 1e-7, (
            loss.item(),
            ref.item(),
        )


# ------------------------------------------------------------------------------------------------
# Both paths (fused: all-Triton tiles; blocked: cuBLAS GEMMs over blocks of logits + Triton
# epilogues), reached through private plans: several problems at once, K loops over D, output
# feature chunks, many chunks and blocks with short last ones, one chunk and one block.
# ------------------------------------------------------------------------------------------------
SMALL_TILES = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, BLOCK_DO=16, num_warps=4, num_stages=1)
EPILOGUE_TILES = dict(BLOCK_M=16, BLOCK_N=32, num_warps=4)


def make_plan(path, dtype, m, n, d, *, tiles=None, blocks=None):
    """The launcher's own plan for ``path``, with tiles and blocks overridden (tests only)."""
    plan = launch._plan_for_path(path, dtype, m, n, d, DEVICE, False, launch.INFO_NCE_SCRATCH_BYTES)
    if tiles:
        plan = dataclasses.replace(plan, tiles=tuple({**dict(plan.tiles), **tiles}.items()))
    if blocks:
        plan = dataclasses.replace(plan, fwd_rows=blocks[0], bwd_rows=blocks[1], bwd_cols=blocks[2])
    return plan


PLANS = {
    "fused-small-tiles": ("fused", SMALL_TILES, None),  # K loop over D, 3 output chunks
    "fused": ("fused", None, None),  # whole feature rows in one block
    "blocked-16": ("blocked", EPILOGUE_TILES, (16, 16, 16)),  # 3 chunks / 3 x 3 (4) blocks
    "blocked-odd": ("blocked", EPILOGUE_TILES, (7, 5, 13)),  # short last chunk and blocks
    "blocked-one": ("blocked", None, None),  # one chunk, one block
}


@pytest.fixture
def force_path(monkeypatch):
    """Make the public entry points take the given path (the rule in kernels/launch.py)."""

    def force(path):
        monkeypatch.setattr(launch, "info_nce_path", lambda *args, **kwargs: path)

    return force


def _paths_problem(symmetric, dtype, device, n_prob=2):
    m, n, d = (37, 37, 40) if symmetric else (19, 53, 40)
    offset = 0 if symmetric else 23
    x0 = F.normalize(torch.randn(n_prob, m, d, device=device), dim=-1)
    y0 = F.normalize(torch.randn(n_prob, n, d, device=device), dim=-1)
    return x0.to(dtype), y0.to(dtype), offset


def _run_plan(x0, y0, offset, symmetric, plan, scale, grad):
    s = torch.tensor(scale, device=x0.device)
    loss, stats_r, stats_c = K._forward(
        x0, y0, s, symmetric=symmetric, label_offset=offset, allow_tf32=False, plan=plan
    )
    dx, dy, ds = K._backward(
        grad,
        x0,
        y0,
        s,
        stats_r,
        stats_c,
        symmetric=symmetric,
        label_offset=offset,
        allow_tf32=False,
        need_dx=True,
        need_dy=True,
        need_dscale=True,
        plan=plan,
    )
    return loss, stats_r, stats_c, dx, dy, ds


def _reference(x0, y0, offset, symmetric, scale):
    """float64 cross-entropies on the same values: (loss, logits, dx, dy, dscale) per call."""
    m = x0.shape[0]
    x, y = leaves(x0, y0, dtype=F64)
    s = torch.tensor(scale, device=x0.device, dtype=F64, requires_grad=True)
    logits = s * x @ y.T
    labels = torch.arange(m, device=x0.device) + offset
    ref = F.cross_entropy(logits, labels)
    if symmetric:
        ref = (ref + F.cross_entropy(logits.T, labels)) / 2
    ref.backward()
    return ref.detach(), logits.detach(), x.grad, y.grad, s.grad


def _check_problems(x0, y0, offset, symmetric, out, scale, grad, *, loss_atol=None):
    """Every problem's loss, statistics and gradients (each problem weighted by its upstream
    gradient; dL/ds summed over problems) against the float64 reference."""
    loss, stats_r, stats_c, dx, dy, ds = out
    dtype = x0.dtype
    atol, rtol = TOL[dtype]
    assert loss.dtype == torch.float32 and loss.shape == (x0.shape[0],)
    assert dx.dtype == dtype and dy.dtype == dtype and ds.dim() == 0

    def lse(stats):  # base-2 max and 1/sum -> natural log-sum-exp
        return (stats[0].to(F64) - torch.log2(stats[1].to(F64))) * 0.6931471805599453

    ds_ref = 0.0
    for p in range(x0.shape[0]):
        ref, logits, gx, gy, gs = _reference(x0[p], y0[p], offset, symmetric, scale)
        m = x0.shape[1]
        torch.testing.assert_close(loss[p].to(F64), ref, atol=loss_atol or atol, rtol=rtol)
        torch.testing.assert_close(
            lse(stats_r[p]), torch.logsumexp(logits, 1), atol=1e-4, rtol=1e-4
        )
        if symmetric:
            torch.testing.assert_close(
                lse(stats_c[p]), torch.logsumexp(logits, 0), atol=1e-4, rtol=1e-4
            )
        g = grad[p].item()
        assert_grad_close(
            dx[p], g * gx, atol, rtol, f"dx[{p}]", abs(g) * term_scale(scale, y0[p], m)
        )
        assert_grad_close(
            dy[p], g * gy, atol, rtol, f"dy[{p}]", abs(g) * term_scale(scale, x0[p], m)
        )
        ds_ref += g * gs.item()
    assert abs(ds.item() - ds_ref) <= atol * max(1.0, abs(ds_ref)) + rtol * abs(ds_ref), (
        ds.item(),
        ds_ref,
    )


@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "rectangular"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("name", list(PLANS))
def test_paths(name, dtype, symmetric, device):
    """Two problems at once (upstream gradients 1.5 and -0.7, scale 20): losses, statistics
    and all gradients against float64, on each path and block/tile layout."""
    x0, y0, offset = _paths_problem(symmetric, dtype, device)
    path, tiles, blocks = PLANS[name]
    plan = make_plan(path, dtype, x0.shape[1], y0.shape[1], x0.shape[2], tiles=tiles, blocks=blocks)
    grad = torch.tensor([1.5, -0.7], device=device)
    out = _run_plan(x0, y0, offset, symmetric, plan, 20.0, grad)
    _check_problems(x0, y0, offset, symmetric, out, 20.0, grad)


def test_paths_agree(device):
    """The two paths compute the same function: losses and statistics to fp32 summation order,
    gradients to the rounding of G in bf16."""
    x0, y0, _ = _paths_problem(True, torch.bfloat16, device)
    grad = torch.tensor([1.0, 2.0], device=device)
    outs = [
        _run_plan(x0, y0, 0, True, make_plan(path, torch.bfloat16, 37, 37, 40), 14.3, grad)
        for path in ("fused", "blocked")
    ]
    for fused, blocked in list(zip(*outs, strict=True))[:3]:
        torch.testing.assert_close(blocked, fused, atol=1e-5, rtol=1e-5)
    for fused, blocked in list(zip(*outs, strict=True))[3:]:
        torch.testing.assert_close(blocked.float(), fused.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("path", ["fused", "blocked"])
def test_only_some_gradients(path, device):
    """need_dx / need_dy / need_dscale alone give the same values as all three together."""
    x0, y0, offset = _paths_problem(False, torch.float32, device, n_prob=1)
    plan = make_plan(
        path,
        torch.float32,
        19,
        53,
        40,
        tiles=None,
        blocks=(7, 5, 13) if path == "blocked" else None,
    )
    s = torch.tensor(9.0, device=device)
    grad = torch.tensor([1.3], device=device)
    _, stats_r, stats_c = K._forward(
        x0, y0, s, symmetric=False, label_offset=offset, allow_tf32=False, plan=plan
    )
    kw = dict(symmetric=False, label_offset=offset, allow_tf32=False, plan=plan)
    full = K._backward(
        grad, x0, y0, s, stats_r, stats_c, need_dx=True, need_dy=True, need_dscale=True, **kw
    )
    for i, flags in enumerate([(True, False, False), (False, True, False), (False, False, True)]):
        part = K._backward(
            grad,
            x0,
            y0,
            s,
            stats_r,
            stats_c,
            need_dx=flags[0],
            need_dy=flags[1],
            need_dscale=flags[2],
            **kw,
        )
        assert [t is None for t in part] == [not f for f in flags]
        torch.testing.assert_close(part[i], full[i], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("path", ["fused", "blocked"])
def test_backward_inside_autocast_keeps_fp32(path, force_path, device):
    """open_clip-style code may call backward inside its autocast region: the blocked path's
    fp32 GEMMs must not be downcast (the fp32 contract is 1e-5)."""
    force_path(path)
    a0, t0 = features(37, 40, torch.float32, device)
    grads = []
    for amp in (False, True):
        a, t = leaves(a0, t0)
        loss = info_nce(a, t, torch.tensor(30.0, device=device), backend="triton")
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
            loss.backward()
        grads.append((a.grad, t.grad))
    for plain, amp in zip(*grads, strict=True):
        assert amp.dtype == torch.float32
        torch.testing.assert_close(amp, plain, atol=1e-7, rtol=1e-6)


@settings(max_examples=60, deadline=None)
@given(
    m=st.integers(1, 70),
    extra=st.integers(0, 40),
    d=st.integers(1, 40),
    dtype=st.sampled_from(DTYPES),
    scale=st.floats(1.0, 100.0),
    symmetric=st.booleans(),
    n_prob=st.integers(1, 3),
    path=st.sampled_from(["fused", "blocked"]),
    fwd_rows=st.integers(1, 80),
    bwd_rows=st.integers(1, 80),
    bwd_cols=st.integers(1, 80),
    seed=st.integers(0, 2**31 - 1),
)
def test_fuzz_paths_match_float64(
    m, extra, d, dtype, scale, symmetric, n_prob, path, fwd_rows, bwd_rows, bwd_cols, seed
):
    """Random sizes, scales, label offsets, problem counts, paths and block sizes: losses and
    all gradients against the float64 cross-entropies (seeded by hypothesis)."""
    torch.manual_seed(seed)
    n = m if symmetric else m + extra
    offset = 0 if symmetric else extra // 2
    x0 = F.normalize(torch.randn(n_prob, m, d, device=DEVICE), dim=-1).to(dtype)
    y0 = F.normalize(torch.randn(n_prob, n, d, device=DEVICE), dim=-1).to(dtype)
    plan = make_plan(path, dtype, m, n, d, blocks=(fwd_rows, bwd_rows, bwd_cols))
    grad = torch.rand(n_prob, device=DEVICE) + 0.5
    out = _run_plan(x0, y0, offset, symmetric, plan, scale, grad)
    # the loss is a log-sum-exp minus a logit of size ~s: fp32 knows it to ~eps * s absolutely
    _check_problems(
        x0,
        y0,
        offset,
        symmetric,
        out,
        scale,
        grad,
        loss_atol=TOL[dtype][0] * max(1.0, scale / 14.3),
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("b", [1, 3, pytest.param(4097, id="4097")])
@pytest.mark.parametrize("path", ["rule", "fused", "blocked"])
def test_batch_sizes(path, b, dtype, force_path, request, device):
    """FusedClipLoss at B in {1, 3, 4097} against ClipLoss in float64, on the path the rule picks
    and on each path forced (the all-Triton path at B = 4097 takes minutes under the CPU
    interpreter: slow, i.e. run on CUDA)."""
    if path == "fused" and b == 4097 and not HAS_CUDA and not request.config.getoption("--runslow"):
        pytest.skip("slow (all-Triton B = 4097 under the interpreter): run on CUDA")
    if path != "rule":
        force_path(path)
    check_against_clip_loss(b, 64, dtype, 14.3, device)


# ------------------------------------------------------------------------------------------------
# The rule, the blocks, and the model of the module docstring
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "dtype,allow_tf32,m,d,expected",
    [
        (torch.float32, False, 256, 512, "fused"),  # the CDDS loss's terms at B = 256
        (torch.float32, False, 512, 512, "fused"),  # IEEE fp32 bound: B = 512 at D = 512
        (torch.float32, False, 513, 512, "blocked"),
        (torch.float32, True, 1024, 512, "fused"),  # TF32: the tensor-core bound
        (torch.bfloat16, False, 1024, 512, "fused"),
        (torch.bfloat16, False, 1025, 512, "blocked"),
        (torch.float16, False, 4096, 32, "fused"),  # small D: more rows fit the same FLOPs
        (torch.bfloat16, False, 4096, 512, "blocked"),
    ],
)
def test_path_rule(dtype, allow_tf32, m, d, expected):
    assert launch.info_nce_path(dtype, m, m, d, allow_tf32) == expected
    plan = launch.info_nce_plan(dtype, m, m, d, torch.device("cpu"), allow_tf32=allow_tf32)
    assert plan.path == expected


@pytest.mark.parametrize(
    "m,n,dtype,budget",
    [
        (65536, 65536, torch.bfloat16, 192 * 2**20),
        (65536, 65536, torch.float32, 192 * 2**20),
        (16384, 16384, torch.float16, 192 * 2**20),
        (4096, 4096, torch.bfloat16, 192 * 2**20),
        (300, 70000, torch.bfloat16, 2**20 * 8),
        (70000, 300, torch.float32, 2**20 * 8),
        (5, 7, torch.float32, 2**20),
    ],
)
def test_blocks_fit_the_budget(m, n, dtype, budget):
    """Blocks within the budget, within the problem, in multiples of 128 unless whole."""
    fwd_rows, rows, cols = launch.info_nce_blocks(m, n, dtype, budget)
    per = 4 if dtype == torch.float32 else 4 + torch.finfo(dtype).bits // 8
    assert 4 * fwd_rows * n <= budget and 1 <= fwd_rows <= m
    assert per * rows * cols <= budget and 1 <= rows <= m and 1 <= cols <= n
    for side, whole in ((rows, m), (cols, n)):
        assert side == whole or side % launch.INFO_NCE_MIN_BLOCK == 0
    # square where neither side is whole: the accumulator traffic of a budget is least there
    if rows < m and cols < n:
        assert rows == cols


def test_blocks_at_b65536():
    """The default budget at B = 65536, D = 512: the numbers the module docstring quotes."""
    assert launch.info_nce_blocks(65536, 65536, torch.bfloat16, 192 * 2**20) == (768, 5760, 5760)
    assert launch.info_nce_blocks(65536, 65536, torch.float32, 192 * 2**20) == (768, 7040, 7040)


def test_cost_table_is_the_docstring_table():
    """The module docstring's table is what cost_model computes now."""
    assert K.cost_table() in K.__doc__


def test_launches_and_scratch_match_the_model():
    """Launches (Triton + aten, counted by benchmarks/kernel_resources.py as the reference GPU
    gets them) and the buffers the launchers allocate, against launch_counts / scratch_bytes,
    including B = 65536, D = 512 (run on meta tensors: nothing is computed)."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "benchmarks/kernel_resources.py", "--count-info-nce"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    cases = json.loads(proc.stdout.strip().splitlines()[-1])
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    for b, n, d, dname, budget, n_prob, _symmetric, counts in cases:
        dtype = dtypes[dname]
        plan = launch.info_nce_plan(dtype, b, n, d, torch.device("meta"), budget=budget)
        assert counts["plan"] == [plan.path, plan.fwd_rows, plan.bwd_rows, plan.bwd_cols]
        fwd, bwd = K.launch_counts(plan, n_prob, b, n)
        where = (b, n, d, dname, budget)
        assert counts["forward"]["triton"] + counts["forward"]["aten"] == fwd, (where, counts)
        assert counts["backward"]["triton"] + counts["backward"]["aten"] == bwd, (where, counts)
        fwd_scratch, bwd_scratch = K.scratch_bytes(plan, b, n, d, dtype)
        assert max(counts["forward"]["scratch"]) <= max(fwd_scratch, 1 << 20), where
        if plan.path == "blocked":
            assert fwd_scratch in counts["forward"]["scratch"] and fwd_scratch <= budget
            logits = 4 * plan.bwd_rows * plan.bwd_cols
            assert logits in counts["backward"]["scratch"] and bwd_scratch <= budget
        if (b, dname) == (65536, "bf16"):
            # everything the backward allocates, gradients included, within 500 MiB (the
            # module docstring's model: ~460 MiB)
            assert sum(counts["backward"]["scratch"]) <= 500 * 2**20, counts["backward"]
        if b == 65536:
            assert max(counts["forward"]["scratch"]) == fwd_scratch <= budget


_TF32_FLAGS = """
import torch
from cdds_fast.kernels.contrastive import _cublas_tf32
m = torch.backends.cuda.matmul
{setup}
before = {read}
undo = _cublas_tf32(False)
during = {read}
if undo is not None:
    undo()
print(before, during, {read}, undo is None)
"""


@pytest.mark.parametrize(
    "setup,read,expected",
    [
        ("", "m.allow_tf32", "False False False True"),  # untouched: no change
        ("m.allow_tf32 = True", "m.allow_tf32", "True False True False"),  # legacy API user
        ("m.fp32_precision = 'tf32'", "m.fp32_precision", "tf32 ieee tf32 False"),  # new API user
    ],
)
def test_fp32_gemms_are_ieee_whatever_the_global_tf32_flag(setup, read, expected):
    """The blocked path's fp32 GEMMs turn TF32 off for their duration (allow_tf32=False),
    through whichever flag API the program uses (PyTorch refuses a mix), and restore it."""
    import subprocess
    import sys

    code = _TF32_FLAGS.format(setup=setup, read=read)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-4:] == expected.split()


# ------------------------------------------------------------------------------------------------
# Distributed semantics without processes: info_nce_gathered (the rectangular kernel) vs the
# reference and vs what ClipLoss computes on rank `rank` of a split batch.
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rank", [0, 2])
@pytest.mark.parametrize("local_loss", [True, False])
def test_info_nce_gathered(local_loss, rank, dtype, device):
    world, b, d = 3, 11, 24
    all_a0, all_b0 = features(world * b, d, dtype, device)
    la0 = all_a0[rank * b : (rank + 1) * b]
    lb0 = all_b0[rank * b : (rank + 1) * b]

    def run(backend, cast):
        la, lb, ga, gb = leaves(la0, lb0, all_a0, all_b0, dtype=cast)
        s = torch.tensor(14.3, device=device, dtype=cast or torch.float32, requires_grad=True)
        loss = info_nce_gathered(
            la, lb, ga, gb, s, local_loss=local_loss, rank=rank, backend=backend
        )
        loss.backward()
        return loss, [t.grad for t in (la, lb, ga, gb, s)]

    loss, grads = run("triton", None)
    ref, ref_grads = run("reference", F64)
    # the reference's own formula is ClipLoss's (local_loss labels arange(B) + B * rank)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(loss.to(F64), ref.detach(), atol=atol, rtol=rtol)
    others = (all_b0, all_a0, lb0, la0)
    for name, g, r, o in zip(
        ("local_a", "local_b", "all_a", "all_b"), grads[:4], ref_grads[:4], others, strict=True
    ):
        if r is None:  # local_loss=False uses only the gathered features (open_clip puts the
            assert g is None, name  # local tensors inside them); here they are separate leaves
            continue
        assert_grad_close(g, r, atol, rtol, name, term_scale(14.3, o, b))
    torch.testing.assert_close(grads[4].to(F64), ref_grads[4], atol=atol * 10, rtol=rtol)


def test_gathered_reference_is_clip_loss_math(device):
    """info_nce_gathered(local_loss=True) equals ClipLoss's local_loss formula written out."""
    world, b, d, rank = 2, 6, 9, 1
    ga, gb = features(world * b, d, torch.float64, device)
    la, lb = ga[rank * b : (rank + 1) * b], gb[rank * b : (rank + 1) * b]
    got = info_nce_gathered(
        la,
        lb,
        ga,
        gb,
        7.0,
        local_loss=True,
        rank=rank,
        backend="triton" if device.type == "cuda" else "reference",
    )
    labels = torch.arange(b, device=device) + b * rank
    want = (F.cross_entropy(7.0 * la @ gb.T, labels) + F.cross_entropy(7.0 * lb @ ga.T, labels)) / 2
    torch.testing.assert_close(got.to(F64), want, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# Properties: B = 1, non-contiguous inputs, stability, module API, dispatch, compile
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["fused", "blocked"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_batch_of_one_is_zero(dtype, path, force_path, device):
    force_path(path)
    a, t = leaves(*features(1, 33, dtype, device))
    s = torch.tensor(100.0, device=device, requires_grad=True)
    loss = info_nce(a, t, s, backend="triton")
    loss.backward()
    assert loss.item() == 0.0
    assert a.grad.abs().max().item() == 0.0 and t.grad.abs().max().item() == 0.0
    assert s.grad.item() == 0.0


@pytest.mark.parametrize("path", ["fused", "blocked"])
def test_non_contiguous_inputs(path, force_path, device):
    force_path(path)
    b, d = 40, 24
    a_base = torch.randn(d, b, device=device, requires_grad=True)  # a = a_base.T: column-major
    t_base = torch.randn(b, 2 * d, device=device, requires_grad=True)  # t: every other column
    a, t = a_base.T, t_base[:, ::2]
    assert not a.is_contiguous() and not t.is_contiguous()
    loss = info_nce(a, t, 5.0, backend="triton")
    loss.backward()
    a64 = a.detach().to(F64).requires_grad_()
    t64 = t.detach().to(F64).requires_grad_()
    ref = ClipLoss()(a64, t64, 5.0)
    ref.backward()
    torch.testing.assert_close(loss.to(F64), ref.detach(), atol=1e-5, rtol=1e-5)
    assert_grad_close(
        a_base.grad.T, a64.grad, 1e-5, 1e-5, "grad through a transposed view", term_scale(5.0, t, b)
    )
    assert_grad_close(
        t_base.grad[:, ::2],
        t64.grad,
        1e-5,
        1e-5,
        "grad through a strided view",
        term_scale(5.0, a, b),
    )
    assert t_base.grad[:, 1::2].abs().max().item() == 0.0


@pytest.mark.parametrize("path", ["fused", "blocked"])
@pytest.mark.parametrize("case", ["aligned", "anti", "unnormalised"])
def test_stable_at_large_logits(case, path, force_path, device):
    """s = 100 with perfectly (anti-)aligned pairs, and un-normalised features (|logit| ~ 900):
    finite, and equal to the float64 reference."""
    b, d = 70, 32
    a = F.normalize(torch.randn(b, d, device=device), dim=-1)
    if case == "aligned":
        t = a.clone()
    elif case == "anti":
        t = -a
    else:
        a, t = 3 * a, 3 * F.normalize(torch.randn(b, d, device=device), dim=-1)
    a_l, t_l = leaves(a, t)
    s = torch.tensor(100.0, device=device, requires_grad=True)
    force_path(path)
    loss = info_nce(a_l, t_l, s, backend="triton")
    loss.backward()
    a64, t64 = leaves(a, t, dtype=F64)
    s64 = torch.tensor(100.0, device=device, dtype=F64, requires_grad=True)
    ref = ClipLoss()(a64, t64, s64)
    ref.backward()
    for v in (loss, a_l.grad, t_l.grad, s.grad):
        assert torch.isfinite(v).all()
    # fp32 logits carry an absolute error ~|logit| * 1e-7 * sqrt(D) that exp() turns into a
    # relative error of the softmax; |logit| reaches 100 (normalised) or 900 (norm 3)
    max_logit = 100.0 * (a.norm(dim=-1).max() * t.norm(dim=-1).max()).item()
    tol = max(1e-5, 1e-6 * max_logit)
    torch.testing.assert_close(loss.to(F64), ref.detach(), atol=tol, rtol=1e-5)
    assert_grad_close(a_l.grad, a64.grad, tol, tol, "grad a", term_scale(100.0, t, b))
    assert_grad_close(t_l.grad, t64.grad, tol, tol, "grad t", term_scale(100.0, a, b))


def test_module_api(device):
    a, t = features(9, 20, torch.float32, device)
    fused = FusedClipLoss(backend="triton")
    out = fused(a, t, torch.tensor(10.0, device=device), output_dict=True)
    assert set(out) == {"contrastive_loss"}
    ref = ClipLoss()(a, t, torch.tensor(10.0, device=device), output_dict=True)
    torch.testing.assert_close(
        out["contrastive_loss"], ref["contrastive_loss"], atol=1e-5, rtol=1e-5
    )
    # a plain number as logit_scale, and the cache_labels / use_horovod arguments are accepted
    loss = FusedClipLoss(cache_labels=True, backend="triton")(a, t, 10.0)
    torch.testing.assert_close(loss, ref["contrastive_loss"], atol=1e-5, rtol=1e-5)
    assert "world_size=1" in repr(fused)


def test_backends_agree_and_float64_uses_reference(device):
    a, t = features(13, 8, torch.float32, device)
    s = torch.tensor(3.0, device=device)
    tri = info_nce(a, t, s, backend="triton")
    ref = info_nce(a, t, s, backend="reference")
    auto64 = info_nce(a.to(F64), t.to(F64), s)
    torch.testing.assert_close(tri, ref, atol=1e-5, rtol=1e-5)
    assert auto64.dtype == F64
    torch.testing.assert_close(auto64.float(), ref, atol=1e-5, rtol=1e-5)


def test_mixed_dtypes_are_promoted(device):
    a, t = features(6, 10, torch.float32, device)
    a16 = leaves(a.to(torch.bfloat16))[0]
    t32 = leaves(t)[0]
    loss = info_nce(a16, t32, 2.0, backend="triton")
    loss.backward()
    assert a16.grad.dtype == torch.bfloat16 and t32.grad.dtype == torch.float32
    ref = ClipLoss()(a16.detach().to(F64), t.to(F64), 2.0)
    torch.testing.assert_close(loss.to(F64), ref, atol=1e-5, rtol=1e-5)


#: The TF32 opt-in against float64: (relative error of the loss, error of a gradient relative to
#: its max). TF32 keeps 10 mantissa bits, and Triton's tensor-core dot drops the other 13 instead
#: of rounding them (tests/sm90_rounding.py emulates it), which shrinks every logit by ~2^-10 on
#: average, as a ~1e-3 smaller logit scale would. At this shape that gave at most 1.0e-3 and
#: 1.6e-3 over 60 seeds; twice that is the bound (operands cut to bf16's 7 mantissa bits give
#: 6.8e-3 and 7.6e-3 and fail it).
TF32_TOL = (2e-3, 3e-3)


@pytest.mark.parametrize("path", ["fused", "blocked"])
def test_allow_tf32_opt_in(path, force_path, device):
    force_path(path)
    a, t = leaves(*features(64, 48, torch.float32, device))
    loss = info_nce(a, t, 14.3, backend="triton", allow_tf32=True)
    loss.backward()
    a64, t64 = leaves(a.detach(), t.detach(), dtype=F64)
    ref = ClipLoss()(a64, t64, 14.3)
    ref.backward()
    loss_tol, grad_tol = TF32_TOL
    torch.testing.assert_close(loss.to(F64), ref, atol=0, rtol=loss_tol)
    for name, got, want in (("image", a.grad, a64.grad), ("text", t.grad, t64.grad)):
        bound = grad_tol * want.abs().max()
        torch.testing.assert_close(got.to(F64), want, atol=bound, rtol=0, msg=name)


def test_custom_op_opcheck(device):
    """Schema, fake (meta) implementation and autograd registration of the custom op."""
    x, y = features(5, 7, torch.float32, device)
    s = torch.tensor(3.0, device=device)
    x, y, s = leaves(x, y, s)
    budget = launch.INFO_NCE_SCRATCH_BYTES
    torch.library.opcheck(K._info_nce_fwd_op, (x[None], y[None], s, 0, True, False, budget))
    xl = leaves(torch.randn(2, 3, 7, device=device))[0]
    yl = torch.stack([y, y]).detach().requires_grad_()
    torch.library.opcheck(K._info_nce_fwd_op, (xl, yl, s, 2, False, False, budget))


@pytest.mark.parametrize(
    "compile_backend",
    ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)],
)
def test_torch_compile(compile_backend, device):
    """A torch.compile'd training step calling the loss traces it as one opaque op (fullgraph)."""
    a0, t0 = features(6, 10, torch.float32, device)
    s0 = torch.tensor(4.0, device=device)
    loss_fn = FusedClipLoss(backend="triton")

    def step(a, t, s):
        return loss_fn(a, t, s) * 2.0

    a, t, s = leaves(a0, t0, s0)
    compiled = torch.compile(step, backend=compile_backend, fullgraph=True)
    out = compiled(a, t, s)
    out.backward()
    a2, t2, s2 = leaves(a0, t0, s0)
    ref = step(a2, t2, s2)
    ref.backward()
    torch.testing.assert_close(out, ref)
    for g, h in ((a.grad, a2.grad), (t.grad, t2.grad), (s.grad, s2.grad)):
        torch.testing.assert_close(g, h)


# ------------------------------------------------------------------------------------------------
# Bad input: one case per rule, raised before any launch
# ------------------------------------------------------------------------------------------------
def _bad_cases():
    def f(b=4, d=6, dtype=torch.float32):
        return torch.randn(b, d, dtype=dtype)

    return [
        ("not-a-tensor", lambda: info_nce([[1.0]], f(), 1.0), TypeError, "image_features"),
        ("int-dtype", lambda: info_nce(f().long(), f(), 1.0), TypeError, "dtype"),
        (
            "dtype-complex",
            lambda: info_nce(f(), f().to(torch.complex64), 1.0),
            TypeError,
            "text_features",
        ),
        ("3-d", lambda: info_nce(f().unsqueeze(0), f(), 1.0), ValueError, "2 dimensions"),
        ("batch-mismatch", lambda: info_nce(f(4), f(5), 1.0), ValueError, "text_features"),
        ("dim-mismatch", lambda: info_nce(f(4, 6), f(4, 7), 1.0), ValueError, "shape"),
        ("empty-batch", lambda: info_nce(f(0), f(0), 1.0), ValueError, "B >= 1"),
        ("device-mismatch", lambda: info_nce(f(), f().to("meta"), 1.0), ValueError, "device"),
        ("scale-not-0d", lambda: info_nce(f(), f(), torch.ones(1)), ValueError, "logit_scale"),
        ("scale-type", lambda: info_nce(f(), f(), "14.3"), TypeError, "logit_scale"),
        ("scale-int-tensor", lambda: info_nce(f(), f(), torch.tensor(3)), TypeError, "logit_scale"),
        ("bad-backend", lambda: info_nce(f(), f(), 1.0, backend="cuda"), ValueError, "backend"),
        (
            "logit-bias",
            lambda: FusedClipLoss()(f(), f(), 1.0, logit_bias=torch.tensor(0.0)),
            ValueError,
            "logit_bias",
        ),
        (
            "rank-out-of-range",
            lambda: info_nce_gathered(f(4), f(4), f(8), f(8), 1.0, local_loss=True, rank=2),
            ValueError,
            "rank",
        ),
        (
            "scale-zero",
            lambda: info_nce(f(), f(), 0.0),
            ValueError,
            "logit_scale: expected a finite value > 0",
        ),
        ("scale-negative", lambda: FusedClipLoss()(f(), f(), -1.0), ValueError, "logit_scale"),
        ("scale-nan", lambda: info_nce(f(), f(), float("nan")), ValueError, "logit_scale"),
        (
            "scale-inf-gathered",
            lambda: info_nce_gathered(
                f(4), f(4), f(8), f(8), float("inf"), local_loss=True, rank=1
            ),
            ValueError,
            "logit_scale",
        ),
        # a tensor scale is checked on the device (no synchronisation): on CPU it raises at once
        (
            "scale-negative-tensor",
            lambda: info_nce(f(), f(), torch.tensor(-2.0)),
            RuntimeError,
            "logit_scale: expected a finite value > 0",
        ),
        (
            "scale-nan-tensor",
            lambda: FusedClipLoss(backend="reference")(f(), f(), torch.tensor(float("nan"))),
            RuntimeError,
            "logit_scale",
        ),
        (
            "backend-unknown",
            lambda: FusedClipLoss(backend="cuda"),
            ValueError,
            "backend: expected one of",
        ),
        (
            "budget-too-small",
            lambda: FusedClipLoss(max_scratch_bytes=4096),
            ValueError,
            "max_scratch_bytes: expected an int >= 131072",
        ),
        (
            "budget-not-int",
            lambda: info_nce(f(), f(), 1.0, max_scratch_bytes=2.5e8),
            ValueError,
            "max_scratch_bytes",
        ),
    ]


@pytest.mark.parametrize("name,call,exc,match", _bad_cases(), ids=[c[0] for c in _bad_cases()])
def test_bad_input_raises(name, call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# ------------------------------------------------------------------------------------------------
# GPU only: memory is O(B)
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA to measure device memory")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_no_square_allocation(dtype):
    b, d = 16384, 512
    dev = torch.device("cuda")
    a, t = leaves(*features(b, d, dtype, dev))
    s = torch.tensor(14.3, device=dev, requires_grad=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = FusedClipLoss()(a, t, s)
    loss.backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    square = b * b * 4  # one fp32 [B, B] logits matrix: 1 GiB
    # what is allowed: the gradients (2 B D e) + O(B) statistics/partials + fp32 partial dX
    assert extra < square / 8, f"peak extra {extra / 2**20:.1f} MiB vs [B,B] {square / 2**20} MiB"
