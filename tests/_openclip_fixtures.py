"""Shared helpers for the open_clip integration tests: a tiny registered model config, a tiny
CSV image-caption dataset, train-log parsing and the 2-process gloo worker.

The tiny config's name keeps "vit", "coca" and "siglip" out (open_clip keys behaviour on them).
"""

from __future__ import annotations

import atexit
import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path

import torch

TINY_MODEL = "cdds-tiny-test"
TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
TINY_RESNET_MODEL = "cdds-tiny-rn-test"
TINY_RESNET_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 16, "patch_size": None},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
HEADS = 4  # CDDS head attention heads for D = 32 (keeps head_dim = 8)

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 200, 30),
    "blue": (30, 30, 220),
    "yellow": (230, 230, 20),
    "purple": (150, 30, 160),
    "orange": (250, 140, 0),
    "cyan": (0, 220, 220),
    "white": (245, 245, 245),
}

_CONFIG_DIR: Path | None = None


def tiny_config_dir() -> Path:
    """Write the tiny model configs once per process into a temp folder, register it, return it
    (removed when the process exits)."""
    global _CONFIG_DIR
    if _CONFIG_DIR is None:
        import open_clip

        d = Path(tempfile.mkdtemp(prefix="cdds_openclip_cfg_"))
        atexit.register(shutil.rmtree, d, ignore_errors=True)
        (d / f"{TINY_MODEL}.json").write_text(json.dumps(TINY_CONFIG))
        (d / f"{TINY_RESNET_MODEL}.json").write_text(json.dumps(TINY_RESNET_CONFIG))
        open_clip.add_model_config(d)
        _CONFIG_DIR = d
    return _CONFIG_DIR


def write_csv_dataset(root: Path, split: str, n: int, seed: int = 0) -> Path:
    """``n`` 32x32 single-colour PNGs with captions and an open_clip CSV (tab separated)."""
    from PIL import Image

    rng = random.Random(seed * 1000 + len(split))
    root.mkdir(parents=True, exist_ok=True)
    names = list(COLOURS)
    lines = ["filepath\ttitle"]
    for i in range(n):
        name = names[i % len(names)]
        colour = tuple(min(255, max(0, c + rng.randint(-25, 25))) for c in COLOURS[name])
        path = root / f"{split}_{i:03d}.png"
        Image.new("RGB", (32, 32), colour).save(path)
        lines.append(f"{path}\ta {rng.choice(['small', 'big', 'plain'])} {name} picture")
    csv_path = root / f"{split}.csv"
    csv_path.write_text("\n".join(lines) + "\n")
    return csv_path


_TRAIN_LINE = re.compile(r"Train Epoch: (\d+) \[\s*(\d+)/(\d+)")
_TERM = re.compile(r"(\w+_loss|Loss): ([-+0-9.eE]+) \(")


def parse_train_log(path: Path) -> list[dict[str, float]]:
    """The loss terms of every ``Train Epoch`` line of an open_clip ``out.log``."""
    rows = []
    for line in Path(path).read_text().splitlines():
        if _TRAIN_LINE.search(line):
            rows.append({k.lower(): float(v) for k, v in _TERM.findall(line)})
    return rows


def cpu_env() -> dict[str, str]:
    """Environment for training subprocesses: one thread each, the project importable."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


# ---------------------------------------------------------------------------------------------
# 2-process gloo worker (torch.multiprocessing.spawn target; must live in an importable module)
# ---------------------------------------------------------------------------------------------


def _loss_inputs(batch: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    p, length, d = 5, 6, 16
    out = {}
    for side, n in (("image", p), ("text", length)):
        for comp in ("tokens", "semantic", "modality"):
            out[f"{side}_{comp}"] = torch.randn(batch, n, d, generator=gen)
    lengths = torch.randint(1, length + 1, (batch,), generator=gen)
    out["text_mask"] = torch.arange(length)[None, :] < lengths[:, None]
    for name in ("alpha_image", "alpha_text"):
        out[name] = 0.5 + 0.1 * torch.randn(d, generator=gen)
    for name in ("w_s_image", "w_m_image", "w_s_text", "w_m_text"):
        out[name] = 1.0 + 0.1 * torch.randn(d, generator=gen)
    out["logit_scale"] = torch.tensor(10.0)
    return out


def ddp_worker(rank: int, world: int, port: int, result_dir: str) -> None:
    """Checks under a real 2-process gloo group; writes ``rank{r}.json`` with its findings."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        report = _ddp_checks(rank, world)
    finally:
        dist.destroy_process_group()
    Path(result_dir, f"rank{rank}.json").write_text(json.dumps(report))


def _ddp_checks(rank: int, world: int) -> dict:
    import torch.distributed as dist

    from cdds_fast import CDDSLoss

    report: dict = {"loss": {}, "grads": {}}
    gen = torch.Generator().manual_seed(1234)
    full = _loss_inputs(4 * world, gen)
    single = CDDSLoss(backend="reference")(**full, output_dict=True)
    sl = slice(4 * rank, 4 * (rank + 1))
    per_sample = {k for k in full if k.startswith(("image_", "text_"))}

    # Forward values: the contrastive terms over the gathered batch equal the single-process ones.
    for local_loss in (False, True):
        for gather_with_grad in (False, True):
            local = {k: (v[sl] if k in per_sample else v) for k, v in full.items()}
            loss = CDDSLoss(
                backend="reference",
                local_loss=local_loss,
                gather_with_grad=gather_with_grad,
                rank=rank,
                world_size=world,
            )
            terms = loss(**local, output_dict=True)
            vals = torch.stack([terms["contrastive_loss"], terms["semantic_loss"]]).detach()
            if local_loss:  # each rank's rows only: the rank mean is the full loss
                dist.all_reduce(vals)
                vals /= world
            key = f"local={local_loss},grad={gather_with_grad}"
            report["loss"][key] = {
                "ddp": vals.tolist(),
                "single": [single["contrastive_loss"].item(), single["semantic_loss"].item()],
            }

    # Gradients w.r.t. this rank's semantic components, contrastive terms only.
    def contrastive_grad(inputs, loss):
        leaves = {
            k: inputs[k].clone().requires_grad_(True) for k in ("image_semantic", "text_semantic")
        }
        terms = loss(**{**inputs, **leaves}, output_dict=True)
        (terms["contrastive_loss"] + terms["semantic_loss"]).backward()
        return leaves

    g_full = contrastive_grad(full, CDDSLoss(backend="reference"))
    g_single_local = torch.cat([g_full[k].grad[sl].flatten() for k in sorted(g_full)])
    for local_loss, gather_with_grad in ((False, True), (True, True), (False, False)):
        local = {k: (v[sl] if k in per_sample else v) for k, v in full.items()}
        loss = CDDSLoss(
            backend="reference",
            local_loss=local_loss,
            gather_with_grad=gather_with_grad,
            rank=rank,
            world_size=world,
        )
        leaves = contrastive_grad(local, loss)
        g = torch.cat([leaves[k].grad.flatten() for k in sorted(leaves)])
        # gather_with_grad: the all_gather backward sums every rank's gradient -> world x single
        # (DDP's mean then gives the single-process gradient); without it only the local path
        # counts -> 1 x single (open_clip ClipLoss semantics, DDP mean = single / world).
        expected = g_single_local * (world if gather_with_grad else 1)
        key = f"local={local_loss},grad={gather_with_grad}"
        report["grads"][key] = float((g - expected).abs().max() / expected.abs().max())

    # A DDP-wrapped CDDSModel: two steps, every parameter gets a finite gradient; again with the
    # reference backend's relation part in one-pair chunks (a checkpoint each, the head's alphas
    # used by every chunk under DDP's gradient hooks)
    report["ddp_model"] = _ddp_model_steps(rank, world)
    report["ddp_model_chunked"] = _ddp_model_steps(rank, world, pairs_per_chunk=1)
    return report


def _ddp_model_steps(rank: int, world: int, pairs_per_chunk: int | None = None) -> dict:
    import open_clip
    from torch.nn.parallel import DistributedDataParallel as DDP

    import cdds_fast.chunked_sampling as chunked
    from cdds_fast import CDDSLoss
    from cdds_fast.open_clip import CDDSModel

    if pairs_per_chunk is not None:  # this worker process only
        chunked.pairs_per_chunk = lambda dim, dtype, device: pairs_per_chunk
    tiny_config_dir()
    torch.manual_seed(0)
    clip = open_clip.create_model(TINY_MODEL, output_dict=True)
    model = DDP(CDDSModel(clip, heads=HEADS, n_enc=1, n_dec=1, z=2))
    loss = CDDSLoss(backend="reference", rank=rank, world_size=world)
    tokenizer = open_clip.get_tokenizer(TINY_MODEL)
    gen = torch.Generator().manual_seed(100 + rank)
    missing: set[str] = set()
    finite = True
    for step in range(2):
        model.zero_grad(set_to_none=True)
        images = torch.randn(3, 3, 32, 32, generator=gen)
        texts = tokenizer([f"a red thing {step} {rank}", "a blue thing", "green"])
        out = model(images, texts)
        sum(loss(**out, output_dict=True).values()).backward()
        for name, p in model.named_parameters():
            if p.grad is None:
                missing.add(name)
            elif not bool(torch.isfinite(p.grad).all()):
                finite = False
    grad_norm = float(torch.cat([p.grad.flatten() for p in model.parameters()]).norm())
    return {"missing": sorted(missing), "finite": finite, "grad_norm": grad_norm}
