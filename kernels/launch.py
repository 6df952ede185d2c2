"""Launch settings of every kernel: one rule, a function of the problem and of the device.

Tile sizes, warps, grids and the InfoNCE path are decided here, from the problem's sizes and the
tensors' device, so no kernel file hard-codes its own rule and nothing else steers them:

* ``cuda``: GPU tiles (kept in registers for sm_90: ``benchmarks/kernel_resources.py``), grids
  sized to the device's multiprocessors (under ``TRITON_INTERPRET=1`` CUDA tensors run through
  the interpreter and are sized as CPU ones);
* ``meta``: the same plan as for the reference GPU (:data:`REFERENCE_SMS` multiprocessors).
  Meta tensors hold no data, so nothing runs: the custom ops answer with their fake
  implementations, and ``benchmarks/kernel_resources.py`` records (and compiles for sm_90) the
  launches the launchers plan on them, without a GPU;
* ``cpu`` (Triton's interpreter): few, large tiles and no grid split to fill a device, since the
  interpreter pays per Python-level step and runs programs one after another.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

#: Multiprocessors of the GPU a launch on ``meta`` tensors is planned for (H100 SXM, H200).
REFERENCE_SMS = 132


def interpreter_active() -> bool:
    """True when Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``).

    This is Triton's own switch of execution engine, not one of ours: ``@triton.jit`` reads the
    variable when a kernel is defined and builds interpreter functions instead of GPU ones. It is
    read here because what the interpreter can execute follows from it: CPU tensors, and 16-bit
    ``tl.dot`` operands only once widened (``kernels/contrastive.py``).
    """
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - triton missing (macOS, Windows)
        return False
    return True


def sized_for_gpu(device: torch.device) -> bool:
    """Whether launches on ``device`` take the GPU tiles and grids (CUDA tensors run natively;
    ``meta`` tensors are planned as for the reference GPU) rather than the interpreter's."""
    return device.type == "meta" or (device.type == "cuda" and not interpreter_active())


def device_supports_triton(device: torch.device) -> bool:
    """CUDA tensors always can; CPU tensors through the interpreter; ``meta`` tensors too (their
    launches are planned, and the custom ops answer with their fake implementations)."""
    if not triton_available():
        return False
    return device.type in ("cuda", "meta") or (device.type == "cpu" and interpreter_active())


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device, :data:`REFERENCE_SMS` for ``meta``, and 1 for
    CPU tensors (the interpreter runs programs one after another, so more programs only cost
    time there)."""
    if device.type == "meta":
        return REFERENCE_SMS
    if device.type != "cuda":
        return 1
    return _num_sms_cached(
        device.index if device.index is not None else torch.cuda.current_device()
    )


@functools.cache
def _num_sms_cached(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


# --- block sizes and warps -----------------------------------------------------------------------


def next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def block_for(n: int, *, cap: int = 1024, floor: int = 16) -> int:
    """Smallest power of two >= n, clamped to [floor, cap]; Triton tiles need powers of two."""
    return max(floor, min(cap, next_power_of_2(n)))


def num_warps_for(block_elems: int) -> int:
    """Warps for a program that owns ``block_elems`` elements (as in the fused-softmax tutorial)."""
    if block_elems >= 16384:
        return 16
    if block_elems >= 4096:
        return 8
    if block_elems >= 1024:
        return 4
    return 2


def tile_warps(block_elems: int, *, elems_per_thread: int = 8) -> int:
    """Warps for a program holding ``block_elems``-element tiles of several live fp32 temporaries:
    ``elems_per_thread`` elements per thread (a power of two in [1, 16] warps)."""
    return max(1, min(16, next_power_of_2(max(1, block_elems // (32 * elems_per_thread)))))


def pairwise_tiles(n: int, device: torch.device) -> tuple[int, int, int]:
    """``(BLOCK_I, BLOCK_J, num_warps)`` for kernels that sweep a virtual ``[n, n]`` matrix in
    2-D tiles (a block of ``BLOCK_I`` rows against ``BLOCK_J`` columns at a time).

    The kernels accumulate up to seven sums element-wise into tile-shaped registers and reduce
    them once per row block, so on a GPU the tile is 1024 elements with 4 per thread (8 warps),
    which keeps every sum in registers for sm_90 (``benchmarks/RESULTS.md``); under the
    interpreter larger tiles mean fewer (slow) Python-level steps.
    """
    if not sized_for_gpu(device):
        bi, bj = block_for(n, cap=128), block_for(n, cap=512)
        return bi, bj, num_warps_for(bi * bj)
    bi, bj = block_for(n, cap=16), block_for(n, cap=64)
    return bi, bj, max(1, min(8, bi * bj // 128))


# --- token x column tiling (the token passes: kernels/stats.py, kernels/constraints.py) ----------

#: Elements of one ``[BLOCK_N, BLOCK_D]`` tile a program holds at once. On a GPU this bounds the
#: registers: about ten fp32 tiles are live in the token passes, and at 8 elements per thread
#: (:func:`tile_warps`) they fit without spills for sm_90 with 2-3 programs per multiprocessor
#: (``benchmarks/RESULTS.md``). Under the interpreter every Python-level loop iteration costs far
#: more than the numpy work, so tiles are made as large as practical.
TILE_ELEMS_GPU = 2048
TILE_ELEMS_INTERPRETER = 1 << 16
#: Widest row (feature dim D) a program holds in one block; wider rows are looped in chunks.
ROW_BLOCK_CAP = 4096
#: Tile budget on a GPU for kernels that keep ~10 fp32 tiles live *and* several row statistics
#: (the token pass's forward): at 4 elements per thread and 8 warps two programs share a
#: multiprocessor; twice the tile leaves room for one (compiler output for sm_90:
#: ``benchmarks/RESULTS.md``).
HEAVY_TILE_ELEMS_GPU = 1024


def tile_elems(device: torch.device) -> int:
    """Elements per ``[BLOCK_N, BLOCK_D]`` tile of a launch on ``device``."""
    return TILE_ELEMS_GPU if sized_for_gpu(device) else TILE_ELEMS_INTERPRETER


def token_tile(
    n_tokens: int,
    n_cols: int,
    device: torch.device,
    *,
    col_cap: int = ROW_BLOCK_CAP,
    elems: int | None = None,
) -> tuple[int, int]:
    """``(BLOCK_N, BLOCK_D)`` for a program that walks tokens (rows) of width ``n_cols``.

    ``BLOCK_D`` is the power of two covering ``n_cols`` up to ``col_cap`` (wider rows are looped in
    ``BLOCK_D`` chunks; at least 16 on a GPU, so no block degenerates to one lane per row);
    ``BLOCK_N`` fills the rest of ``elems`` (default :func:`tile_elems`), at most the tokens there
    are (rounded up to a power of two), at least 1.
    """
    gpu = sized_for_gpu(device)
    cap = max(1, next_power_of_2(col_cap))
    block_d = block_for(n_cols, cap=cap, floor=min(16, cap) if gpu else 1)
    block_n = max(1, min(next_power_of_2(n_tokens), (elems or tile_elems(device)) // block_d))
    return block_n, block_d


def split_count(n_main: int, n_splittable: int, target_programs: int) -> int:
    """How many parts to cut a second grid axis of ``n_splittable`` blocks into, so that
    ``n_main * parts`` reaches ``target_programs`` without any part being empty.

    Returns ``parts`` in ``[1, n_splittable]`` such that ``cdiv(n_splittable, parts)`` blocks per
    part leaves no empty trailing part.
    """
    n_main = max(1, int(n_main))
    n_splittable = max(1, int(n_splittable))
    want = max(1, min(n_splittable, -(-int(target_programs) // n_main)))
    per = -(-n_splittable // want)
    return -(-n_splittable // per)


# --- InfoNCE (kernels/contrastive.py): one rule picks the path, the tiles and the blocks ----------

#: Default bound on the blocked path's logit scratch (one block of fp32 logits plus its ``G``),
#: the ``max_scratch_bytes`` of ``FusedClipLoss`` / ``info_nce``. With the fp32 ``dY``
#: accumulator and the gradients themselves, bf16 at B = 65536, D = 512 then peaks at ~460 MiB
#: above its inputs (``kernels/contrastive.py``, "Cost model"); larger blocks would save little
#: traffic (the accumulators are re-read once per block row / column).
INFO_NCE_SCRATCH_BYTES = 192 * 2**20
#: Smallest block side of the blocked path: a budget that cannot hold a 128 x 128 block is refused.
INFO_NCE_MIN_BLOCK = 128
#: Largest problem (``2 M N D`` FLOP of logits) the all-Triton path takes, per operand precision.
#: Below these the work takes microseconds and the call is bound by launches: the all-Triton path
#: runs a forward in 2 launches and a backward in 2, however many problems, against at least 4
#: and 9 for the blocked path (``kernels/contrastive.launch_counts``) at ~4-5 us each; its tiles
#: recompute the logits once more per direction (``12 M N D`` FLOP in all, against ``8 M N D``),
#: which costs nothing at this size. Above them cuBLAS's GEMMs win: the tensor-core ``tl.dot``
#: tiles of the all-Triton path reached 15-20 % of the H200's bf16 peak
#: (``benchmarks/RESULTS.md``), and IEEE fp32 ``tl.dot`` is a CUDA-core FMA loop, hence its 4x
#: lower bound. The bounds (B = 1024 and B = 512 at D = 512) are where that launch model and
#: those FLOP rates cross; ``benchmarks/bench_contrastive.py`` times both paths to move them.
FUSED_MAX_FLOP = {"tensor": 2 * 1024 * 1024 * 512, "ieee": 2 * 512 * 512 * 512}


def check_scratch_bytes(value: object) -> None:
    """``max_scratch_bytes``: an int large enough for one smallest block of the blocked path
    (fp32 logits plus a ``G`` of up to 4 bytes per element)."""
    least = INFO_NCE_MIN_BLOCK * INFO_NCE_MIN_BLOCK * 8
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(
            f"max_scratch_bytes: expected an int >= {least} (one "
            f"{INFO_NCE_MIN_BLOCK} x {INFO_NCE_MIN_BLOCK} block of logits), "
            f"got {value!r}"
        )


@dataclass(frozen=True)
class InfoNCEPlan:
    """How one InfoNCE call runs (see ``kernels/contrastive.py``).

    ``path``: ``"fused"`` (all-Triton tiles, logits never leave registers) or ``"blocked"``
    (cuBLAS GEMMs over bounded blocks of logits, Triton epilogues). ``tiles``: launch settings of
    the all-Triton kernels (``BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_DO, num_warps, num_stages``) or of
    the blocked path's epilogue kernels (``BLOCK_M, BLOCK_N, num_warps``). ``fwd_rows``: rows per
    forward chunk (each a ``[fwd_rows, N]`` fp32 logit buffer); ``bwd_rows, bwd_cols``: the
    backward's ``[bwd_rows, bwd_cols]`` block (fp32 logits plus ``G`` in the feature dtype).
    """

    path: str
    tiles: tuple = ()
    fwd_rows: int = 0
    bwd_rows: int = 0
    bwd_cols: int = 0


def info_nce_path(dtype: torch.dtype, m: int, n: int, d: int, allow_tf32: bool) -> str:
    """``"fused"`` when ``2 m n d`` is at most :data:`FUSED_MAX_FLOP` of the operand precision
    (IEEE fp32 unless ``allow_tf32``; tensor cores for 16-bit dtypes and TF32), else
    ``"blocked"``. The same rule on every device, so CPU tests take the paths a GPU takes."""
    precision = "ieee" if (dtype == torch.float32 and not allow_tf32) else "tensor"
    return "fused" if 2 * m * n * d <= FUSED_MAX_FLOP[precision] else "blocked"


def info_nce_blocks(m: int, n: int, dtype: torch.dtype, budget: int) -> tuple[int, int, int]:
    """``(fwd_rows, bwd_rows, bwd_cols)`` of the blocked path within ``budget`` bytes of scratch.

    Forward: ``[fwd_rows, n]`` fp32 logits, rows in multiples of 16 where more than 16 fit
    (at least one row, even where ``n`` alone exceeds the budget). Backward: a block of fp32
    logits and ``G`` in the feature dtype (``G`` overwrites the logits in place for fp32), as
    square as the budget allows, sides in multiples of :data:`INFO_NCE_MIN_BLOCK`: the fp32
    ``dY`` accumulator is re-read and re-written once per row block and ``dX``'s once per column
    block, so square blocks minimise that traffic for a given budget.
    """
    fwd_elems = budget // 4
    fit = fwd_elems // n
    fwd_rows = m if m * n <= fwd_elems else max(1, fit // 16 * 16 if fit >= 16 else fit)
    per_elem = 4 if dtype == torch.float32 else 4 + torch.finfo(dtype).bits // 8
    elems = budget // per_elem
    if m * n <= elems:
        return min(fwd_rows, m), m, n
    q = INFO_NCE_MIN_BLOCK
    side = max(q, int(elems**0.5) // q * q)
    rows, cols = min(side, m), min(side, n)
    if cols == n:  # few columns: give the rest of the budget to rows
        rows = min(m, max(q, elems // n // q * q))
    elif rows == m:  # few rows: give it to columns
        cols = min(n, max(q, elems // m // q * q))
    return min(fwd_rows, m), rows, cols


def info_nce_plan(
    dtype: torch.dtype,
    m: int,
    n: int,
    d: int,
    device: torch.device,
    *,
    allow_tf32: bool = False,
    budget: int = INFO_NCE_SCRATCH_BYTES,
) -> InfoNCEPlan:
    """The plan of one InfoNCE call on ``[M, D]`` rows and ``[N, D]`` columns: the path from
    :func:`info_nce_path`, then its tiles (GPU or interpreter) and, for the blocked path, its
    blocks from :func:`info_nce_blocks`."""
    path = info_nce_path(dtype, m, n, d, allow_tf32)
    return _plan_for_path(path, dtype, m, n, d, device, allow_tf32, budget)


def _plan_for_path(
    path: str,
    dtype: torch.dtype,
    m: int,
    n: int,
    d: int,
    device: torch.device,
    allow_tf32: bool,
    budget: int,
) -> InfoNCEPlan:
    """:func:`info_nce_plan` for a given path (tests and benchmarks run both paths on one
    problem through it)."""
    if path == "fused":
        return InfoNCEPlan("fused", tuple(_fused_tiles(dtype, d, allow_tf32, device).items()))
    fwd_rows, rows, cols = info_nce_blocks(m, n, dtype, budget)
    return InfoNCEPlan("blocked", tuple(_epilogue_tiles(device).items()), fwd_rows, rows, cols)


def _fused_tiles(dtype: torch.dtype, d: int, allow_tf32: bool, device: torch.device) -> dict:
    """Tiles of the all-Triton InfoNCE kernels. ``BLOCK_K``: reduction chunk over ``D``
    (``>= D``: the row block is loaded once); ``BLOCK_DO``: output feature chunk of the backward
    (each chunk recomputes the logits, so it is as wide as the registers allow). All >= 16
    (``tl.dot``)."""
    dpow = max(16, next_power_of_2(d))
    if not sized_for_gpu(device):
        # the interpreter pays per loop step, not per element: few, large tiles
        bk = min(dpow, 512)
        return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=bk, BLOCK_DO=bk, num_warps=4, num_stages=1)
    # GPU: tiles that compile without spills for sm_90 (benchmarks/RESULTS.md); wider output
    # chunks (fewer logit recomputes) or 64-row blocks spill or reach the 255-register ceiling
    bk = min(dpow, 32)
    if dtype != torch.float32 or allow_tf32:
        return dict(
            BLOCK_M=32, BLOCK_N=32, BLOCK_K=bk, BLOCK_DO=min(dpow, 256), num_warps=8, num_stages=2
        )
    return dict(
        BLOCK_M=16, BLOCK_N=32, BLOCK_K=bk, BLOCK_DO=min(dpow, 512), num_warps=8, num_stages=2
    )


def _epilogue_tiles(device: torch.device) -> dict:
    """Tiles of the blocked path's element-wise kernels over fp32 logit blocks: on a GPU 32 x 128
    (16 fp32 per thread at 8 warps), which compiles without spills for sm_90 where 64 x 128 spills
    (``benchmarks/RESULTS.md``); the interpreter takes large ones."""
    if not sized_for_gpu(device):
        return dict(BLOCK_M=128, BLOCK_N=1024, num_warps=4)
    return dict(BLOCK_M=32, BLOCK_N=128, num_warps=8)
