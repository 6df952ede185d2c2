"""Two processes (gloo, CPU): FusedClipLoss(world_size=2) gives ClipLoss's loss and gradients.

One spawn per InfoNCE path runs all four combinations of ``local_loss`` x ``gather_with_grad``;
each rank saves its results and the parent compares them, so failures print as ordinary assertion
errors. gloo works on CPU tensors, so the children always run the kernels through the Triton
interpreter (TRITON_INTERPRET=1 is put in their environment, also on a CUDA machine); the
distributed logic under test (gathering, label offsets, the rectangular kernel, gradient flow) is
the same.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

WORLD = 2
B, D = 5, 19
SCALE = 14.3
COMBOS = [
    (local_loss, gather_with_grad)
    for local_loss in (False, True)
    for gather_with_grad in (False, True)
]


def _worker(rank: int, init_file: str, data_path: str, out_dir: str, path: str) -> None:
    from open_clip.loss import ClipLoss

    from cdds_fast.contrastive import FusedClipLoss
    from cdds_fast.kernels import launch

    # B = 5 per rank takes the all-Triton path by the rule; the blocked one is forced here
    launch.info_nce_path = lambda *args, **kwargs: path

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        img_all, txt_all = torch.load(data_path)
        results = {}
        for local_loss, gather_with_grad in COMBOS:
            for name in ("fused", "clip"):
                # the reference is ClipLoss in float64 on the same values
                dtype = torch.float32 if name == "fused" else torch.float64
                img = img_all[rank * B : (rank + 1) * B].to(dtype).requires_grad_()
                txt = txt_all[rank * B : (rank + 1) * B].to(dtype).requires_grad_()
                scale = torch.tensor(SCALE, dtype=dtype, requires_grad=True)
                kwargs = dict(
                    local_loss=local_loss,
                    gather_with_grad=gather_with_grad,
                    rank=rank,
                    world_size=WORLD,
                )
                loss_fn = (
                    FusedClipLoss(backend="triton", **kwargs)
                    if name == "fused"
                    else ClipLoss(**kwargs)
                )
                loss = loss_fn(img, txt, scale)
                loss.backward()
                results[(local_loss, gather_with_grad, name)] = [
                    loss.detach(),
                    img.grad,
                    txt.grad,
                    scale.grad,
                ]
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
@pytest.mark.parametrize("path", ["fused", "blocked"])
def test_fused_clip_loss_matches_clip_loss_on_two_ranks(path, tmp_path, monkeypatch):
    # children: one BLAS/OpenMP thread each (two processes on a small CPU box; see
    # test_contrastive._one_blas_thread for why this matters for the interpreter)
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    # the children import the kernels after this, so they run them on CPU tensors
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    img = F.normalize(torch.randn(WORLD * B, D), dim=-1)
    txt = F.normalize(0.5 * img + torch.randn(WORLD * B, D), dim=-1)
    data_path = str(tmp_path / "features.pt")
    torch.save((img, txt), data_path)
    mp.spawn(
        _worker,
        args=(str(tmp_path / "init"), data_path, str(tmp_path), path),
        nprocs=WORLD,
        join=True,
    )

    for rank in range(WORLD):
        results = torch.load(tmp_path / f"rank{rank}.pt")
        for local_loss, gather_with_grad in COMBOS:
            got = results[(local_loss, gather_with_grad, "fused")]
            want = results[(local_loss, gather_with_grad, "clip")]
            where = f"rank {rank}, local_loss={local_loss}, gather_with_grad={gather_with_grad}"
            assert got[0].dtype == torch.float32
            torch.testing.assert_close(
                got[0].double(),
                want[0],
                atol=1e-5,
                rtol=1e-5,
                msg=lambda m, where=where: f"loss, {where}: {m}",
            )
            for name, g, w in zip(
                ("image grad", "text grad", "logit_scale grad"), got[1:], want[1:], strict=True
            ):
                assert g is not None and w is not None, (name, where)
                # gradients of size ~s/B; 1e-5 of that scale (see test_contrastive.term_scale)
                torch.testing.assert_close(
                    g.double(),
                    w,
                    atol=1e-5 * SCALE / B,
                    rtol=1e-5,
                    msg=lambda m, name=name, where=where: f"{name}, {where}: {m}",
                )
