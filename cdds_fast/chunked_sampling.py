"""Related sampling (docs/method.md sections 3-4) in plain PyTorch with bounded memory: the
reference backend's ``[B, D, D]`` part.

:func:`cdds_fast.reference.related_sampling` builds ``S``, ``Pr``, ``A``, ``W`` for the whole
batch and autograd keeps several of them for the backward: about :data:`PAIR_MATRICES` fp32
``[D, D]`` matrices per pair (both directions, forward and backward), 18 MB a pair at D = 512, so
4.6 GB at B = 256. The matrices of one pair depend on that pair's statistics only, so this
computes the same function over chunks of pairs, each under ``torch.utils.checkpoint``: the
forward keeps only the ``[B, D]`` inputs, and the backward rebuilds one chunk's matrices at a time.
A chunk holds as many pairs as :func:`relation_bytes` allows; a batch that fits runs as one chunk
without a checkpoint (the reference's computation, nothing recomputed). Otherwise the backward
recomputes the relation part's forward, yet on CPU the chunks are also the faster way: their
matrices stay in cache, where the whole batch's miss it and fault fresh pages in (about 3x faster
and a few dozen MB instead of GBs at D = 512: benchmarks/RESULTS.md, ``cpu_relation.py``).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from cdds_fast.reference import related_sampling

#: ``[D, D]`` matrices alive per pair at the backward's peak, both directions: the growth of
#: peak live memory per pair of the reference, measured at D = 512 fp32 on CPU (18 MB a pair).
PAIR_MATRICES = 18


def relation_bytes(device: torch.device) -> int:
    """Memory one chunk's relation matrices may take on ``device``. CPU: 64 MiB, chunks that stay
    in cache (the fastest size measured, see the module docstring). Elsewhere 1 GiB: a bound on
    memory that keeps chunks large, because every chunk costs a few dozen kernel launches (a
    choice, not a measurement)."""
    return 64 * 2**20 if device.type == "cpu" else 2**30


def pairs_per_chunk(dim: int, dtype: torch.dtype, device: torch.device) -> int:
    """Pairs whose relation matrices fit :func:`relation_bytes` (at least one)."""
    per_pair = PAIR_MATRICES * dim * dim * dtype.itemsize
    return max(1, relation_bytes(device) // per_pair)


def related_sampling_chunked(
    mu_v: Tensor,
    s_v: Tensor,
    mu_t: Tensor,
    s_t: Tensor,
    alpha_image: Tensor,
    alpha_text: Tensor,
    *,
    tau_kl: float = 1.0,
    rho: float = 0.01,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`cdds_fast.reference.related_sampling` (same arguments, values and gradients) with
    at most :func:`pairs_per_chunk` pairs' ``[D, D]`` matrices alive at a time."""
    batch, dim = mu_v.shape
    chunk = pairs_per_chunk(dim, mu_v.dtype, mu_v.device)
    if chunk >= batch:
        return related_sampling(
            mu_v, s_v, mu_t, s_t, alpha_image, alpha_text, tau_kl=tau_kl, rho=rho
        )

    # The chunk's function closes over the two floats only; every tensor is an argument, so the
    # checkpoint saves the [chunk, D] views and the [D] alphas, never an intermediate.
    def chunk_fn(*stats: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return related_sampling(*stats, tau_kl=tau_kl, rho=rho)

    parts = [
        checkpoint(
            chunk_fn, *stats, alpha_image, alpha_text, use_reentrant=False, preserve_rng_state=False
        )
        for stats in zip(*(t.split(chunk) for t in (mu_v, s_v, mu_t, s_t)), strict=True)
    ]
    return tuple(torch.cat(outs) for outs in zip(*parts, strict=True))
