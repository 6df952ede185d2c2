"""Launch settings shared by every kernel: block sizes, warps, interpreter detection.

One place decides how a row of length ``n`` is tiled, so no kernel file hard-codes its own rule.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch


def interpreter_active() -> bool:
    """True when Triton runs through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - triton missing (macOS, Windows)
        return False
    return True


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


def pairwise_tiles(n: int) -> tuple[int, int, int]:
    """``(BLOCK_I, BLOCK_J, num_warps)`` for kernels that sweep a virtual ``[n, n]`` matrix in
    2-D tiles (a block of ``BLOCK_I`` rows against ``BLOCK_J`` columns at a time).

    The kernels accumulate up to seven sums element-wise into tile-shaped registers and reduce
    them once per row block, so on a GPU the tile is kept at 1024 elements with 4 per thread
    (8 warps; ptxas: <= 117 registers, no spills, for sm_90); under the interpreter larger tiles
    mean fewer (slow) Python-level steps.
    """
    if interpreter_active():
        bi, bj = block_for(n, cap=128), block_for(n, cap=512)
        return bi, bj, num_warps_for(bi * bj)
    bi, bj = block_for(n, cap=16), block_for(n, cap=64)
    return bi, bj, max(1, min(8, bi * bj // 128))


#: Multiprocessor count of the GPU a launch plan is being recorded for
#: (see :func:`gpu_launch_plan`); None in normal operation.
_PLAN_SMS: int | None = None


@contextlib.contextmanager
def gpu_launch_plan(sms: int = 132) -> Iterator[None]:
    """Size every launch as for a CUDA device with ``sms`` multiprocessors, whatever the tensors'
    device. Used (with the interpreter off) by ``benchmarks/kernel_resources.py`` to record the
    exact kernel specialisations a GPU would compile, and compile them for sm_90 on a machine
    without one."""
    global _PLAN_SMS
    previous, _PLAN_SMS = _PLAN_SMS, int(sms)
    try:
        yield
    finally:
        _PLAN_SMS = previous


def sized_for_gpu(device: torch.device) -> bool:
    """Whether launches on ``device`` take the GPU tile sizes and grids (CUDA tensors, or inside
    :func:`gpu_launch_plan`) rather than the interpreter's few large tiles."""
    if _PLAN_SMS is not None:
        return True
    return device.type == "cuda" and not interpreter_active()


def device_supports_triton(device: torch.device) -> bool:
    """CUDA tensors always can; CPU tensors only through the interpreter (or while a
    :func:`gpu_launch_plan` records launches instead of running them)."""
    if not triton_available():
        return False
    if _PLAN_SMS is not None:
        return True
    return device.type == "cuda" or (device.type == "cpu" and interpreter_active())


# --- GEMM-like kernels (contrastive InfoNCE): persistent-grid sizing -------------------------------


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 1 for CPU tensors (the interpreter runs programs
    one after another, so more programs only cost time there)."""
    if _PLAN_SMS is not None:
        return _PLAN_SMS
    if device.type != "cuda":
        return 1
    return _num_sms_cached(device.index if device.index is not None else torch.cuda.current_device())


_SMS: dict[int, int] = {}


def _num_sms_cached(index: int) -> int:
    if index not in _SMS:
        _SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SMS[index]


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


# --- token x column tiling (added for the stats / constraint kernels) ---------------------------

#: Elements of one ``[BLOCK_N, BLOCK_D]`` tile a program holds at once. On a GPU this bounds the
#: registers (about ten fp32 tiles are live in the constraint kernels; with 8 elements per thread,
#: see :func:`tile_warps`, they compile to ~90-130 registers and no spills for sm_90, so 2-3
#: programs share a multiprocessor); under the interpreter every Python-level loop iteration costs
#: far more than the numpy work, so tiles are made as large as practical.
TILE_ELEMS_GPU = 2048
TILE_ELEMS_INTERPRETER = 1 << 16
#: Widest row (feature dim D) a program holds in one block; wider rows are looped in chunks.
ROW_BLOCK_CAP = 4096


def tile_elems() -> int:
    """Elements per ``[BLOCK_N, BLOCK_D]`` tile for the current execution mode."""
    return TILE_ELEMS_INTERPRETER if interpreter_active() else TILE_ELEMS_GPU


#: Tile budget on a GPU for kernels that keep ~10 fp32 tiles live *and* several row statistics
#: (the constraint-loss forward): with 4 elements per thread at 8 warps ptxas gives ~125
#: registers for sm_90 (triton 3.6 and 3.8), so two programs share a multiprocessor; the
#: 2048-element tile at 8 per thread compiled to 172-254 registers, one program per
#: multiprocessor (``benchmarks/kernel_resources.py``; not yet timed on a GPU).
HEAVY_TILE_ELEMS_GPU = 1024


def token_tile(n_tokens: int, n_cols: int, *, col_cap: int = ROW_BLOCK_CAP,
               elems: int | None = None) -> tuple[int, int]:
    """``(BLOCK_N, BLOCK_D)`` for a program that walks tokens (rows) of width ``n_cols``.

    ``BLOCK_D`` is the power of two covering ``n_cols`` up to ``col_cap`` (wider rows are looped in
    ``BLOCK_D`` chunks; at least 16 on a GPU); ``BLOCK_N`` fills the rest of ``elems`` (default
    :func:`tile_elems`), at most the tokens there are (rounded up to a power of two), at least 1.
    """
    cap = max(1, next_power_of_2(col_cap))
    # GPU: at least 16 lanes per row (no degenerate size-1 blocks); the interpreter takes any size
    block_d = block_for(n_cols, cap=cap, floor=1 if interpreter_active() else min(16, cap))
    block_n = max(1, min(next_power_of_2(n_tokens), (elems or tile_elems()) // block_d))
    return block_n, block_d


def tile_warps(block_elems: int, *, elems_per_thread: int = 8) -> int:
    """Warps for a program holding ``block_elems``-element tiles of several live fp32 temporaries:
    ``elems_per_thread`` elements per thread (a power of two in [1, 16] warps)."""
    return max(1, min(16, next_power_of_2(max(1, block_elems // (32 * elems_per_thread)))))


def target_programs(device: torch.device) -> int:
    """How many programs a grid should offer to fill the device.

    Twice the multiprocessor count on CUDA (two waves hide the tail); 1 under the interpreter,
    where programs run one after another and fewer, larger programs are faster.
    """
    if sized_for_gpu(device):
        return 2 * num_sms(device)
    return 1


def split_tokens(n_tokens: int, block_n: int, batch: int, device: torch.device) -> tuple[int, int]:
    """Split each row's ``n_tokens`` among programs: returns ``(tokens_per_program, n_chunks)``.

    ``tokens_per_program`` is a multiple of ``block_n``; ``batch * n_chunks`` reaches
    :func:`target_programs` where the tokens allow (one tile per program at most).
    """
    tiles = -(-n_tokens // block_n)
    want = max(1, min(tiles, -(-target_programs(device) // max(1, batch))))
    per_program = -(-tiles // want) * block_n
    return per_program, -(-n_tokens // per_program)


def info_nce_tiles(kind: str, dtype: torch.dtype, d: int, allow_tf32: bool,
                   device: torch.device) -> dict:
    """Tile sizes of the fused InfoNCE kernels (``kernels/contrastive.py``).

    Args:
        kind: ``"fwd"``, ``"bwd"`` or ``"stats"`` (the forward kernel reading given fp32 logits:
            an element-wise pass, ``BLOCK_K`` unused).
        dtype: feature dtype; d: feature dimension; allow_tf32: fp32 on TF32 tensor cores.
    Returns:
        dict with ``BLOCK_M, BLOCK_N, BLOCK_K`` (reduction chunk over D), ``BLOCK_DO`` (output
        feature chunk of the backward), ``num_warps, num_stages``. ``BLOCK_K >= D`` means the whole
        feature row is one block (loaded once per row block). All blocks are >= 16 (``tl.dot``).
    """
    dpow = max(16, next_power_of_2(d))
    if not sized_for_gpu(device):
        # The interpreter runs programs one by one on numpy tiles and pays per element loaded:
        # few, large tiles (whole feature rows when D <= 512) are fastest there.
        bk = min(dpow, 512)
        return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=bk, BLOCK_DO=bk, num_warps=4, num_stages=1)
    # Measured on an H200 (triton 3.6, B = 16384, D = 512, bf16; benchmarks/bench_contrastive.py
    # --tune): forward 64x128x64 / 4 warps 1.32 ms (208 TFLOP/s) vs 2.07 ms for 128x128x64 / 8
    # warps; backward 64x64x64 with BLOCK_DO = 512 (one output chunk, no recompute) 7.7 ms vs
    # 11.9 ms with BLOCK_DO = 256. fp32 "ieee" forward 128x128x16 / 8 warps 15.2 ms vs 21.6 ms.
    # The fp32 "ieee" backward (CUDA-core FMA dots) is the weak spot: 186 ms with the config
    # below, no better one measured yet.
    tensor_cores = dtype in (torch.float16, torch.bfloat16) or allow_tf32
    if kind == "stats":
        # ptxas (sm_90, triton 3.6): 99 registers when N is a multiple of 16, 248 without spills
        # otherwise (unaligned rows: scalar loads); 64 x 128 spilled 440 B in the unaligned case
        return dict(BLOCK_M=32, BLOCK_N=128, BLOCK_K=16, BLOCK_DO=16, num_warps=8, num_stages=2)
    if kind == "fwd":
        if tensor_cores:
            if dtype != torch.float32:
                bk = dpow if dpow <= 64 else 64
                return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=bk, BLOCK_DO=bk, num_warps=4,
                            num_stages=3)
            bk = dpow if dpow <= 32 else 32
            return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=bk, BLOCK_DO=bk, num_warps=8,
                        num_stages=3)
        bk = dpow if dpow <= 16 else 16
        return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=bk, BLOCK_DO=bk, num_warps=8, num_stages=2)
    # backward: the fp32 accumulator is [BLOCK_M, BLOCK_DO]
    if tensor_cores:
        if dpow <= 128:
            return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=dpow, BLOCK_DO=dpow, num_warps=4,
                        num_stages=2)
        bk = 64 if dtype != torch.float32 else 32
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=bk, BLOCK_DO=min(dpow, 512), num_warps=8,
                    num_stages=2)
    if dpow <= 64:
        return dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=dpow, BLOCK_DO=dpow, num_warps=4, num_stages=2)
    return dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=32, BLOCK_DO=min(dpow, 256), num_warps=4,
                num_stages=2)


def logit_tiles(rows: int, cols: int, device: torch.device) -> tuple[int, int, int]:
    """``(BLOCK_M, BLOCK_N, num_warps)`` of an element-wise kernel over a ``[rows, cols]`` fp32
    buffer (the chunked InfoNCE backward's ``G`` kernel): 4096-element tiles, 16 per thread, on a
    GPU (rows of 256 contiguous fp32 = 1 KiB per row segment); the interpreter takes a whole chunk
    row block at once."""
    if not sized_for_gpu(device):
        return block_for(rows, cap=128, floor=1), block_for(cols, cap=2048, floor=1), 4
    return block_for(rows, cap=16, floor=1), block_for(cols, cap=256), 8


# --- scratch buffers ---------------------------------------------------------------------------

#: Tests set this (``tests/conftest.py``) so that every buffer a kernel must fill starts as NaN
#: instead of whatever the allocator returns: a slot a kernel forgets to write, or reads before
#: writing, then shows up as NaN in the results.
POISON_SCRATCH = False


def scratch(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty(shape)`` for a buffer a kernel fills (NaN-filled under
    :data:`POISON_SCRATCH`)."""
    if POISON_SCRATCH:
        return torch.full(tuple(shape), float("nan"), dtype=dtype, device=device)
    return torch.empty(tuple(shape), dtype=dtype, device=device)


def scratch_like(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A contiguous :func:`scratch` buffer shaped like ``t``."""
    return scratch(t.shape, dtype or t.dtype, t.device)
