"""The pooled features of the fast path against the reference's ``pool`` (docs/method.md
section 5): ``pool(X^s) = mu / max(|mu|, eps)`` written by the token pass
(kernels/constraints.py), ``pool(X^x) = c / max(|c|, eps)`` by the sampling forward, and their
gradients through ``F.normalize``'s backward in the sampling row kernel.

A ``contrastive`` that records the four features and returns a fixed random function of them
replaces the InfoNCE terms (the op then hands the features out and takes their gradients: the
path ``CDDSLoss`` uses under DDP). The recorded features and every leaf's gradient through that
function are compared with the reference with test_fused_loss's conditioned yardstick (``c``
inherits the related weights' conditioning: near a threshold two correct fp32 computations of
``W`` differ by more than a fixed tolerance allows).
"""

from __future__ import annotations

import pytest
import torch

from tests.test_constraints import fast
from tests.test_fused_loss import (
    F32,
    _within_fp32_reference_error,
    check_conditioned,
    inputs,
    repair_alpha,
)


class Recorder:
    """``f(a, b, s) = <a, u_k> + <b, v_k> + s <a, b> / 100`` for the k-th call of a loss
    evaluation (three per evaluation, in the same order on both paths); keeps the features."""

    def __init__(self, dim: int, device):
        self.weights = [
            (torch.randn(dim, device=device), torch.randn(dim, device=device)) for _ in range(3)
        ]
        self.calls = []

    def __call__(self, a, b, scale):
        self.calls.append((a.detach().clone(), b.detach().clone()))
        u, v = self.weights[(len(self.calls) - 1) % 3]
        return (a * u).sum() + (b * v).sum() + scale * (a * b).sum() / 100


def check(tensors, params):
    """Features and gradients of the fast path against the reference."""
    recorder = Recorder(tensors[0].shape[-1], tensors[0].device)
    params = repair_alpha(tensors, params)
    check_conditioned(tensors, params, fast=fast, contrastive=recorder, a_c=0.8, a_s=1.3)
    # the evaluations check_conditioned ran, three calls each: the fast path, the fp32
    # reference, the float64 one, then N_ORDERS - 1 perturbed fp32 references
    evals = [recorder.calls[i : i + 3] for i in range(0, len(recorder.calls), 3)]
    fast_calls, ref64_calls = evals[0], evals[2]
    ref32_calls = [evals[1], *evals[3:]]
    for k in range(3):
        for i, part in enumerate(("rows", "columns")):
            assert fast_calls[k][i].dtype == torch.float32
            _within_fp32_reference_error(
                f"call {k}: {part}",
                fast_calls[k][i],
                [r[k][i] for r in ref32_calls],
                ref64_calls[k][i],
                F32,
            )
    norms = torch.cat([torch.stack((a, b)).norm(dim=-1).flatten() for a, b in fast_calls])
    return norms


@pytest.mark.parametrize(
    "batch,patches,length,dim,cap,dtype",
    [
        pytest.param(3, 5, 7, 37, None, torch.float32, id="D37-fp32"),
        pytest.param(3, 5, 7, 37, None, torch.bfloat16, id="D37-bf16"),
        pytest.param(3, 5, 7, 37, 16, torch.float16, id="D37-chunked-fp16"),
        pytest.param(2, 3, 4, 1, None, torch.float32, id="D1"),
        # the row kernel sums <g, y> over the pair's row in several blocks
        pytest.param(1, 2, 3, 1100, None, torch.float32, id="D1100"),
    ],
)
def test_matches_reference(batch, patches, length, dim, cap, dtype, device, row_block_cap):
    if cap is not None:
        row_block_cap(cap)
    tensors, params = inputs(batch, patches, length, dim, dtype, device)
    norms = check(tensors, params)
    torch.testing.assert_close(norms, torch.ones_like(norms))


def test_zero_rows_follow_the_eps_clamp(device):
    """A pair whose semantic components are all zero in both modalities: mu = 0 and c = W mu = 0,
    so all four of its features are 0 / eps = 0 and their gradients g / eps (F.normalize's clamp
    makes the denominator a constant), as in the reference."""
    tensors, params = inputs(3, 4, 5, 9, torch.float32, device)
    with torch.no_grad():
        tensors = [t.detach() for t in tensors]
        tensors[1][1] = 0.0
        tensors[4][1] = 0.0
        tensors = [t.requires_grad_() if t.is_floating_point() else t for t in tensors]
    norms = check(tensors, params)
    assert (norms == 0).sum() == 6  # pair 1 of the three calls' two features
