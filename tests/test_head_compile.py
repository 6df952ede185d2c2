"""The CDDS head under ``torch.compile`` (docs/method.md section 1): a ``Block`` and the whole
``CDDSHead`` (both decouplers, the noise groups, the UNet skips) trace with ``fullgraph=True``, i.e.
without a graph break, and give the eager outputs and gradients.

aot_eager keeps the CPU run short (dynamo's tracing and AOT autograd are what a graph break or a
data-dependent branch would trip; inductor only changes the generated code); CUDA runs inductor
in the slow test.
"""

from __future__ import annotations

import pytest
import torch

from cdds_fast.head import Block, CDDSHead
from tests._inputs import make_mask

HAS_CUDA = torch.cuda.is_available()


def _compare(module, args, backend):
    """Outputs and input/parameter gradients of ``torch.compile(module, fullgraph=True)``
    against eager (fp32: the same aten ops, so tight tolerances)."""
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True, backend=backend)
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    leaves += [p for p in module.parameters() if p.requires_grad]
    results = []
    for fn in (compiled, module):
        out = fn(*args)
        outs = (
            [out]
            if isinstance(out, torch.Tensor)
            else [v for v in out.values() if isinstance(v, torch.Tensor) and v.requires_grad]
        )
        weights = [
            torch.ones_like(o).uniform_(generator=torch.Generator(o.device).manual_seed(i))
            for i, o in enumerate(outs)
        ]
        loss = sum((o * w).sum() for o, w in zip(outs, weights, strict=True))
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        results.append((outs, grads))
    (outs_c, grads_c), (outs_e, grads_e) = results
    for i, (c, e) in enumerate(zip(outs_c, outs_e, strict=True)):
        torch.testing.assert_close(c, e, msg=f"output {i}")
    for i, (c, e) in enumerate(zip(grads_c, grads_e, strict=True)):
        assert (c is None) == (e is None), i
        if c is not None:
            torch.testing.assert_close(c, e, rtol=1e-4, atol=1e-5, msg=f"grad {i}")


def _tokens(device, dim=64):
    image = torch.randn(3, 10, dim, device=device, requires_grad=True)
    text = torch.randn(3, 7, dim, device=device, requires_grad=True)
    return image, text, make_mask(3, 7, device=device)


@pytest.mark.parametrize("masked", [False, True], ids=["image", "text"])
def test_block_compiles_without_graph_break(masked, device):
    image, text, mask = _tokens(device)
    block = Block(64, heads=4).to(device)
    _compare(block, (text, mask) if masked else (image, None), "aot_eager")


def test_head_compiles_without_graph_break(device):
    """Eval mode (z = 1, no noise: deterministic) for the comparison; a training-mode forward
    and backward (z noise groups, one batched decoder pass) traces too."""
    image, text, mask = _tokens(device)
    head = CDDSHead(64, heads=4, z=3).to(device).eval()
    _compare(head, (image, text, mask), "aot_eager")
    head.train()
    torch._dynamo.reset()
    out = torch.compile(head, fullgraph=True, backend="aot_eager")(image, text, mask)
    sum(
        out[k].sum() for k in ("image_semantic", "image_modality", "text_semantic", "text_modality")
    ).backward()
    assert image.grad is not None and bool(torch.isfinite(image.grad).all())


@pytest.mark.slow
def test_head_compiles_with_inductor(device):
    image, text, mask = _tokens(device)
    _compare(CDDSHead(64, heads=4).to(device).eval(), (image, text, mask), "inductor")
