"""What CDDS costs on a CPU: parameters and the time of one training step, against plain CLIP.

    python benchmarks/cpu_cost.py                      # ViT-B-32, random init, batch 8, 2 threads
    python benchmarks/cpu_cost.py --quick              # tiny model, one rep: a smoke run

One step = forward, loss, backward and an AdamW step over every parameter, fp32, random init,
random 224 px images and captions of 4-15 words. Rows: open_clip's ``ClipLoss`` on the bare CLIP,
then ``CDDSModel`` + ``CDDSLoss`` (reference loss: the CPU backend) with the default head and with
each knob turned down. The configurations take turns within every repetition, so a load that
comes and goes on a shared machine touches all of them alike; the table reports medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import environment  # noqa: E402

#: Head settings per row: the library's defaults, then each knob of README's cost table.
HEADS = {
    "CDDS, defaults (z=4, n_enc=n_dec=2, heads=8)": {},
    "CDDS, z=2": {"z": 2},
    "CDDS, z=1": {"z": 1},
    "CDDS, n_enc=n_dec=1": {"n_enc": 1, "n_dec": 1},
    "CDDS, n_enc=n_dec=1, z=1": {"n_enc": 1, "n_dec": 1, "z": 1},
    "CDDS, heads=4": {"heads": 4},
}


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _batch(model_name: str, batch: int, size: int, seed: int = 0):
    import open_clip

    gen = torch.Generator().manual_seed(seed)
    words = "a photo of a small red square left of a large blue circle on a striped floor".split()
    captions = [" ".join(words[: 4 + (7 * i) % 12]) for i in range(batch)]
    return torch.randn(batch, 3, size, size, generator=gen), open_clip.get_tokenizer(model_name)(
        captions
    )


def build_steps(model_name: str, batch: int) -> tuple[dict, dict]:
    """One step function and the parameter count per row."""
    import open_clip
    from open_clip.loss import ClipLoss

    from cdds_fast import CDDSLoss
    from cdds_fast.open_clip import CDDSModel, quiet_random_init

    with quiet_random_init():
        clip = open_clip.create_model(model_name)
    size = clip.visual.image_size
    images, texts = _batch(model_name, batch, size[0] if isinstance(size, (tuple, list)) else size)

    models = {"ClipLoss (plain CLIP)": (clip, ClipLoss(), False)}
    for name, head in HEADS.items():
        torch.manual_seed(0)
        models[name] = (CDDSModel(clip, **head), CDDSLoss(), True)
    # One optimizer over every parameter: a step updates those that received a gradient (the
    # towers and that row's head), so the timed update is the row's own; one set of AdamW states
    # for the shared towers keeps ViT-B-32 within the machine's memory.
    unique = {id(p): p for model, _, _ in models.values() for p in model.parameters()}
    opt = torch.optim.AdamW(list(unique.values()), lr=1e-5)

    def make_step(model, loss_fn, cdds: bool):
        def step():
            opt.zero_grad(set_to_none=True)
            out = model(images, texts)
            loss = loss_fn(**out) if cdds else loss_fn(*out[:3])
            loss.backward()
            opt.step()

        return step

    steps = {name: make_step(*spec) for name, spec in models.items()}
    params = {name: _count(spec[0]) for name, spec in models.items()}
    return steps, params


def run(model_name: str, batch: int, reps: int) -> list[tuple[str, int, float]]:
    steps, params = build_steps(model_name, batch)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for rep in range(reps + 1):  # repetition 0 warms up (allocator, first-call paths)
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            if rep:
                times[name].append(time.perf_counter() - start)
    return [(name, params[name], statistics.median(times[name])) for name in steps]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny model, batch 2, one rep")
    args = parser.parse_args(argv)
    if args.quick:
        from cdds_fast.demo import register_model_config

        with tempfile.TemporaryDirectory() as tmp:
            args.model = register_model_config(tmp)
        args.batch, args.reps = 2, 1
    torch.set_num_threads(args.threads)
    rows = run(args.model, args.batch, args.reps)
    base_params, base_s = rows[0][1], rows[0][2]
    print(environment())
    print(
        f"model {args.model} (random init, fp32), batch {args.batch}, {args.threads} threads, "
        f"median of {args.reps} steps each, load average at the end {os.getloadavg()[0]:.2f}"
    )
    print("| run | parameters | added | s / step | x ClipLoss step |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, n, seconds in rows:
        added = f"+{(n - base_params) / 1e6:.1f}M (+{100 * (n - base_params) / base_params:.0f}%)"
        print(
            f"| {name} | {n / 1e6:.1f}M | {added if n != base_params else '-'} | "
            f"{seconds:.2f} | {seconds / base_s:.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
