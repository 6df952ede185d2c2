"""pytest-benchmark: CDDS loss fwd+bwd, FusedClipLoss vs ClipLoss, the CDDS head forward.

make bench      # CPU: small sizes, reference paths (a few minutes)
pytest benchmarks -q    # on CUDA: the GPU sizes, fast paths included
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.bench_cdds import make_problem, step_fn
from benchmarks.conftest import DEVICE, HAS_CUDA, sync

LOSS_SHAPES = [(256, 50, 77, 512), (1024, 50, 77, 512)] if HAS_CUDA else [(16, 50, 77, 64)]
CLIP_BATCHES = [4096, 16384] if HAS_CUDA else [256]
LOSS_BACKENDS = ["reference", "triton"] if HAS_CUDA else ["reference"]


def _synced(fn):
    def run():
        out = fn()
        sync()
        return out

    return run


@pytest.mark.parametrize("backend", LOSS_BACKENDS)
@pytest.mark.parametrize("shape", LOSS_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cdds_loss_fwd_bwd(benchmark, shape, backend):
    from cdds_fast.functional import cdds_loss

    dtype = torch.bfloat16 if HAS_CUDA else torch.float32
    tensors, mask, params = make_problem(*shape, dtype, DEVICE)

    def loss(*a, **k):
        return cdds_loss(*a, **k, backend=backend, check_finite=False)

    benchmark(_synced(step_fn(loss, tensors, mask, params)))


@pytest.mark.parametrize("impl", ["open_clip.ClipLoss", "FusedClipLoss"])
@pytest.mark.parametrize("batch", CLIP_BATCHES)
def test_clip_loss_fwd_bwd(benchmark, batch, impl):
    from open_clip.loss import ClipLoss

    if impl == "FusedClipLoss":
        from cdds_fast.contrastive import FusedClipLoss

        loss_fn = FusedClipLoss()
    else:
        loss_fn = ClipLoss()
    dtype = torch.bfloat16 if HAS_CUDA else torch.float32
    a = torch.nn.functional.normalize(torch.randn(batch, 512, device=DEVICE), dim=-1).to(dtype)
    b = torch.nn.functional.normalize(torch.randn(batch, 512, device=DEVICE), dim=-1).to(dtype)
    a.requires_grad_(True)
    b.requires_grad_(True)
    scale = torch.tensor(14.3, device=DEVICE, requires_grad=True)

    def step():
        a.grad = b.grad = scale.grad = None
        loss_fn(a, b, scale).backward()

    benchmark(_synced(step))


@pytest.mark.parametrize("z", [1, 4])
def test_cdds_head_forward(benchmark, z):
    from cdds_fast import CDDSHead

    batch, dim = (256, 512) if HAS_CUDA else (8, 64)
    head = CDDSHead(dim, z=z).to(DEVICE).train()
    img = torch.randn(batch, 49, dim, device=DEVICE)
    txt = torch.randn(batch, 77, dim, device=DEVICE)
    mask = torch.arange(77, device=DEVICE)[None] < torch.randint(5, 78, (batch, 1), device=DEVICE)
    autocast = torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=HAS_CUDA)

    def fwd():
        with torch.no_grad(), autocast:
            return head(img, txt, mask)

    benchmark(_synced(fwd))
