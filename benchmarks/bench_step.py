"""End-to-end training step: ViT-B/32 CLIP (random init), batch 256, bf16 autocast.

    python benchmarks/bench_step.py            # CUDA
    python benchmarks/bench_step.py --quick    # tiny model, CPU smoke run

Rows: ClipLoss step, CDDS step with the fast loss, CDDS step with the reference loss, and the CDDS
step split into backbone (towers), the CDDS head alone (both decouplers on the towers' tokens,
eager and ``torch.compile``'d) and the loss ops, each with its achieved TFLOP/s from an analytic
count of the transformer blocks' matmul FLOPs (fwd + bwd = 3x fwd); then the cost of each ``z`` in
{1, 2, 4} (step and eager head). Split timings are separate fwd+bwd runs of each part on the same
inputs.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import environment, fmt, measure  # noqa: E402


def block_flops(tokens: int, width: int, mlp_ratio: float = 4.0) -> float:
    """Forward matmul FLOPs of one transformer block over one sequence."""
    dense = 2 * tokens * width * width * (3 + 1 + 2 * mlp_ratio)
    attention = 2 * 2 * tokens * tokens * width
    return dense + attention


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args(argv)
    import open_clip
    from open_clip.loss import ClipLoss

    from cdds_fast import CDDSLoss
    from cdds_fast.open_clip import CDDSModel

    cuda = torch.cuda.is_available()
    if not cuda and not args.quick:
        print("bench_step: no CUDA device; run with --quick for a CPU smoke run")
        return 0
    device = "cuda" if cuda else "cpu"
    timed = measure
    if args.quick:  # smoke run: tiny batch, one timed repetition per row
        args.batch = 2
        timed = functools.partial(measure, cpu_reps=1)
    clip = open_clip.create_model(args.model).to(device)
    model = CDDSModel(clip, output_dict=True).to(device).train()
    size = clip.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    images = torch.randn(args.batch, 3, size, size, device=device)
    tokenizer = open_clip.get_tokenizer(args.model)
    words = (
        "a photo of a small red square left of a large blue circle on a striped background".split()
    )
    texts = tokenizer([" ".join(words[: 4 + i % (len(words) - 4)]) for i in range(args.batch)]).to(
        device
    )
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=cuda)
    params = [p for p in model.parameters() if p.requires_grad]

    def zero():
        for p in params:
            p.grad = None

    def clip_step():
        zero()
        with autocast:
            img, txt, scale = clip(images, texts)[:3]  # create_model's default: a tuple
            loss = ClipLoss()(img, txt, scale)
        loss.backward()

    def cdds_step(backend):
        loss_fn = CDDSLoss(backend=backend)

        def step():
            zero()
            with autocast:
                out = model(images, texts)
                loss = loss_fn(**out)
            loss.backward()

        return step

    def towers_step():
        zero()
        with autocast:
            v = model.image_tokens(images)
            t, _ = model.text_tokens(texts)
            (v.float().square().mean() + t.float().square().mean()).backward()

    with torch.no_grad(), autocast:
        out = model(images, texts)
    detached = {
        k: (
            v.detach().requires_grad_(v.is_floating_point())
            if torch.is_tensor(v) and k != "logit_scale"
            else v
        )
        for k, v in out.items()
    }
    detached["logit_scale"] = out["logit_scale"].detach().requires_grad_(True)

    def loss_only(backend):
        loss_fn = CDDSLoss(backend=backend)

        def run():
            for v in detached.values():
                if torch.is_tensor(v):
                    v.grad = None
            loss_fn(**detached).backward()

        return run

    # the head alone on the towers' tokens: forward + backward of both decouplers
    with torch.no_grad(), autocast:
        v_tokens = model.image_tokens(images)
        t_tokens, t_mask = model.text_tokens(texts)
    head_inputs = (
        v_tokens.detach().requires_grad_(True),
        t_tokens.detach().requires_grad_(True),
        t_mask,
    )
    components = ("image_semantic", "image_modality", "text_semantic", "text_modality")

    def head_step(head):
        def run():
            zero()
            for t in head_inputs[:2]:
                t.grad = None
            with autocast:
                out = head(*head_inputs)
                loss = sum(out[k].float().square().mean() for k in components)
            loss.backward()

        return run

    # fullgraph: a graph break inside a block would fail here, not just run slower
    compiled_head = torch.compile(
        model.head, fullgraph=True, backend="inductor" if cuda else "aot_eager"
    )

    fast = "triton" if cuda else "reference"
    rows = [
        ("ClipLoss (plain CLIP)", timed(clip_step)),
        ("CDDS, fast loss", timed(cdds_step(fast))),
        ("CDDS, reference loss", timed(cdds_step("reference"))),
        ("  towers only (fwd+bwd)", timed(towers_step)),
        ("  CDDS head only, eager", timed(head_step(model.head))),
        ("  CDDS head only, torch.compile", timed(head_step(compiled_head))),
        ("  CDDS loss ops only, fast", timed(loss_only(fast))),
        ("  CDDS loss ops only, reference", timed(loss_only("reference"))),
    ]
    rows_by = dict(rows)
    decoupler_ms = (
        rows_by["CDDS, fast loss"].median_ms
        - rows_by["  towers only (fwd+bwd)"].median_ms
        - rows_by["  CDDS loss ops only, fast"].median_ms
    )

    v, t = clip.visual, clip
    vis_tokens = (size // v.patch_size[0]) ** 2 + 1 if hasattr(v, "patch_size") else 50
    backbone = args.batch * (
        len(v.transformer.resblocks) * block_flops(vis_tokens, v.transformer.width)
        + len(t.transformer.resblocks) * block_flops(texts.shape[1], t.transformer.width)
    )
    dim = model.head.dim
    z = model.head.image_decoupler.z
    n_blocks = len(model.head.image_decoupler.encoder) + 2 * z * len(
        model.head.image_decoupler.semantic_decoder
    )
    decoupler = (
        args.batch
        * n_blocks
        * (block_flops(vis_tokens - 1, dim) + block_flops(texts.shape[1], dim))
    )

    print(environment())
    print(f"model {args.model}, batch {args.batch}, bf16 autocast={cuda}, z={z}")
    print("| part | ms | peak extra MB | TFLOP/s (blocks, fwd+bwd) |")
    print("| --- | --- | --- | --- |")

    def tflops(flops: float, ms: float) -> str:
        return f"{3 * flops / ms / 1e9:.1f}"

    for name, m in rows:
        tf = ""
        if name.strip().startswith("towers"):
            tf = tflops(backbone, m.median_ms)
        elif name.strip().startswith("CDDS head"):
            tf = tflops(decoupler, m.median_ms)
        print(f"| {name} | {fmt(m.median_ms, '.2f')} | {fmt(m.peak_extra_mb, '.0f')} | {tf} |")
    print(
        f"| decoupler blocks (CDDS fast step - towers - loss ops) | {decoupler_ms:.2f} | | "
        f"{tflops(decoupler, decoupler_ms)} |"
    )
    share = rows_by["  CDDS loss ops only, fast"].median_ms / rows_by["CDDS, fast loss"].median_ms
    print(f"CDDS loss ops share of the fast CDDS step: {100 * share:.1f}%")
    print("| z | CDDS fast step ms | head only ms (eager) | head TFLOP/s |")
    print("| --- | --- | --- | --- |")
    for zz in (1, 2, 4):
        model.head.image_decoupler.z = model.head.text_decoupler.z = zz
        blocks_z = len(model.head.image_decoupler.encoder) + 2 * zz * len(
            model.head.image_decoupler.semantic_decoder
        )
        flops_z = decoupler / n_blocks * blocks_z
        head_ms = timed(head_step(model.head)).median_ms
        print(
            f"| {zz} | {fmt(timed(cdds_step(fast)).median_ms, '.2f')} | {head_ms:.2f} | "
            f"{tflops(flops_z, head_ms)} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
