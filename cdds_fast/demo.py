"""``cdds-fast demo``: a tiny CLIP trained twice on the embedded captioned scenes, ClipLoss vs CDDS.

What it does, end to end (a few minutes on 2 CPU cores; seconds on a GPU):

1. Generates the embedded data (:class:`cdds_fast.data.SceneCaptions`): the train split (2,000
   images x 5 captions) and the test split (500 x 5), rendered at the model's image size, and
   tokenises every caption once with open_clip's default tokenizer.
2. Registers a tiny open_clip model config (:data:`MODEL_CONFIG`: a 48 px ViT with 8 px patches,
   width 64, 2 layers per tower, 64-dim joint space, 40-token context) and creates one random init.
3. Trains two copies of that init with the same seed, the same batches (each step draws
   ``batch_size`` distinct images, each with one of its captions, so a batch has no false
   negatives), AdamW and a cosine schedule with linear warmup:

   * ``clip``: the plain model with :class:`cdds_fast.FusedClipLoss` (open_clip's ``ClipLoss``
     in O(B) memory);
   * ``cdds``: :class:`cdds_fast.open_clip.CDDSModel` around the same towers (CDDS head with
     ``z`` noise groups, ``n_enc`` / ``n_dec`` blocks per decoupler) and
     :class:`cdds_fast.CDDSLoss`.

4. Evaluates retrieval on the test split with :func:`cdds_fast.eval.retrieval.encode_dataset`: the
   baseline with its CLIP features, the CDDS model with its pooled semantic components (its
   ``encode_image`` / ``encode_text``), and the untrained init for reference.
5. Prints the table side by side (I->T / T->I R@1/5/10, rSum, mean ranks, seconds per training
   step) and writes ``<out>/report.json`` and ``<out>/report.png``.

Backends: ``--backend auto`` (default) picks as the library does
(:func:`cdds_fast.dispatch.resolve_backend`): the losses' Triton kernels on CUDA, and on CPU the
plain-PyTorch reference, or the Triton interpreter under ``TRITON_INTERPRET=1`` (a correctness
tool, far slower).

How to read the table: docs/demo.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch

from cdds_fast.cli import missing_extra, refuse_settings
from cdds_fast.contract import check_number
from cdds_fast.dispatch import BACKENDS, resolve_backend
from cdds_fast.open_clip import quiet_random_init

__all__ = ["DEMO_MODEL", "MODEL_CONFIG", "build_parser", "main", "run_demo"]

#: Name under which the demo's model config is registered with open_clip.
DEMO_MODEL = "cdds-demo-tiny"
#: The demo's tiny open_clip model: 36 patch tokens per image, 40 text tokens, D = 64.
MODEL_CONFIG: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 48, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 40, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
#: Defaults of the full demo (sized for a few minutes on 2 CPU cores).
DEFAULTS = {"steps": 300, "batch_size": 128, "train_images": 2000, "test_images": 500}
#: ``--quick``: a smoke run for tests (seconds), same model, tiny data.
QUICK = {"steps": 6, "batch_size": 16, "train_images": 96, "test_images": 40}
#: The CDDS run's loss settings: the library's defaults.
LOSS_CFG = {"a_c": 1.0, "a_s": 1.0, "a_m": 0.1, "a_f": 0.5, "tau_kl": 1.0, "rho": 0.01}

_TERMS = (
    "contrastive_loss",
    "semantic_loss",
    "modality_loss",
    "completeness_loss",
    "x_completeness_loss",
)
_METHODS = ("untrained", "clip", "cdds", "head-only")


def build_parser() -> argparse.ArgumentParser:
    """The demo's flags: one declaration per flag, long by nature and kept in one place so that
    ``--help`` reads as the code does."""
    p = argparse.ArgumentParser(
        prog="cdds-fast demo",
        description=(
            "Train a tiny random-init CLIP on the embedded captioned-scenes data twice, with "
            "ClipLoss and with CDDSLoss (same init, seed, batches, optimizer and schedule), and "
            "compare test retrieval. Writes <out>/report.json and <out>/report.png."
        ),
    )
    p.add_argument("--steps", type=int, default=None, help="training steps per run (default 300)")
    p.add_argument("--batch-size", type=int, default=None, help="pairs per step (default 128)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate (default 2e-3)")
    p.add_argument(
        "--wd", type=float, default=0.1, help="AdamW weight decay on matrices (default 0.1)"
    )
    p.add_argument(
        "--warmup",
        type=float,
        default=0.1,
        help="linear warmup: a fraction of the steps (< 1) or a number of steps (default 0.1)",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of data, init, batches, noise (default 0)"
    )
    p.add_argument("--out", default="demo_out", help="output folder (default demo_out)")
    p.add_argument(
        "--device", default=None, help="torch device (default: cuda if available, else cpu)"
    )
    p.add_argument(
        "--backend",
        default="auto",
        choices=BACKENDS,
        help="loss backend: auto = Triton kernels on CUDA, plain-PyTorch reference on CPU (the "
        "Triton interpreter under TRITON_INTERPRET=1)",
    )
    p.add_argument("--z", type=int, default=2, help="CDDS noise groups in training (default 2)")
    p.add_argument(
        "--n-enc", type=int, default=1, help="CDDS encoder blocks per decoupler (default 1)"
    )
    p.add_argument("--n-dec", type=int, default=1, help="CDDS blocks per decoder (default 1)")
    p.add_argument("--heads", type=int, default=4, help="CDDS head attention heads (default 4)")
    p.add_argument("--sigma", type=float, default=0.1, help="CDDS noise std (default 0.1)")
    p.add_argument("--train-images", type=int, default=None, help="train split size (default 2000)")
    p.add_argument("--test-images", type=int, default=None, help="test split size (default 500)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch (default: CPU count minus the load average, rounded down, "
        ">= 1)",
    )
    p.add_argument(
        "--ablation",
        action="store_true",
        help="add a third run: the CDDS architecture (towers + decouplers, pooled semantic "
        "features) trained with plain InfoNCE only (adds about half the run time)",
    )
    p.add_argument(
        "--quick", action="store_true", help="tiny smoke run (tests): few steps, tiny data"
    )
    p.add_argument("--no-plot", action="store_true", help="skip report.png (no matplotlib import)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    return p


# ---------------------------------------------------------------------------------------------
# Setup
# ---------------------------------------------------------------------------------------------


def register_model_config(folder: str | os.PathLike) -> str:
    """Write :data:`MODEL_CONFIG` as ``<folder>/<DEMO_MODEL>.json``; register it with open_clip."""
    import open_clip

    path = Path(folder) / f"{DEMO_MODEL}.json"
    path.write_text(json.dumps(MODEL_CONFIG, indent=2))
    open_clip.add_model_config(path)
    return DEMO_MODEL


def _resolve_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def choose_threads(requested: int | None = None) -> int:
    """Intra-op CPU threads for the demo.

    ``requested`` wins. Otherwise the cores other processes do not already keep busy (CPU count
    minus the 1-minute load average, rounded down), at least 1 and at most torch's default. The
    demo's ops are small, so a compute thread that has to share a core makes every op wait at
    OpenMP barriers (benchmarks/RESULTS.md, "CPU: the demo"); on 2 cores this usually means 1.
    """
    if requested is not None:
        return _check_positive("threads", requested)
    default = torch.get_num_threads()
    load = _load_average()
    if load is None:  # pragma: no cover - no getloadavg on this OS
        return default
    cores = os.cpu_count() or default
    return max(1, min(default, int(cores - load)))


def _check_positive(name: str, value: int) -> int:
    check_number(f"--{name.replace('_', '-')}", value, low=1, integer=True)
    return value


def _checked_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The CDDS head's settings, once every setting flag of the run is in its range."""
    head_cfg = dict(
        n_enc=args.n_enc, n_dec=args.n_dec, heads=args.heads, z=args.z, sigma=args.sigma
    )
    refused = refuse_settings(LOSS_CFG, head_cfg, {k: f"--{k.replace('_', '-')}" for k in head_cfg})
    if refused:
        raise ValueError(refused)
    if MODEL_CONFIG["embed_dim"] % args.heads:
        raise ValueError(
            f"--heads: expected a divisor of the demo model's embed dim "
            f"{MODEL_CONFIG['embed_dim']}, got {args.heads}"
        )
    check_number("--seed", args.seed, low=0, integer=True)
    check_number("--lr", args.lr, low=0.0, low_open=True)
    check_number("--wd", args.wd, low=0.0)
    check_number("--warmup", args.warmup, low=0.0)
    return head_cfg


def _render(ds, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """A split as ``uint8 [N, 3, H, W]`` images and ``long [N, 5, L]`` caption tokens."""
    import numpy as np

    images = torch.from_numpy(np.stack([ds.image_array(i) for i in range(ds.num_images)]))
    tokens = tokenizer(ds.all_captions()).view(ds.num_images, ds.captions_per_image, -1)
    return images.permute(0, 3, 1, 2).contiguous(), tokens


class _Normalize:
    """``uint8 [B, 3, H, W]`` -> float normalised with the model's preprocessing mean / std."""

    def __init__(self, mean, std, device: torch.device):
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255.0
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255.0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean) / self.std


def batch_schedule(
    num_images: int, captions_per_image: int, batch_size: int, steps: int, seed: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The ``(image indices, caption indices)`` of every step, shared by both runs.

    Images are drawn without replacement from a fresh permutation per pass over the split (a batch
    never holds two captions of one image, so it has no false negatives); each drawn image comes
    with one of its captions, uniformly at random.
    """
    if batch_size > num_images:
        raise ValueError(
            f"--batch-size {batch_size} exceeds the {num_images} training images (a batch holds "
            f"distinct images)"
        )
    gen = torch.Generator().manual_seed(seed)
    out = []
    perm, pos = torch.randperm(num_images, generator=gen), 0
    for _ in range(steps):
        if pos + batch_size > num_images:
            perm, pos = torch.randperm(num_images, generator=gen), 0
        idx = perm[pos : pos + batch_size]
        pos += batch_size
        out.append((idx, torch.randint(captions_per_image, (batch_size,), generator=gen)))
    return out


def lr_at(step: int, base_lr: float, warmup: int, steps: int) -> float:
    """open_clip_train's ``cosine_lr``: linear warmup over ``warmup`` steps, then cosine to 0."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    e, es = step - warmup, max(steps - warmup, 1)
    return 0.5 * (1 + math.cos(math.pi * e / es)) * base_lr


def make_optimizer(model: torch.nn.Module, lr: float, wd: float) -> torch.optim.AdamW:
    """AdamW with open_clip_train's parameter groups and defaults for ViTs.

    No weight decay on gains, biases, LayerNorms, ``logit_scale`` and the CDDS head's vectors
    (every parameter with fewer than 2 dims); betas (0.9, 0.98), eps 1e-6.
    """
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
        {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": wd},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6)


class _FeaturesOnly(torch.nn.Module):
    """A CLIP loss fed only the pooled features of a model output dict (the ``--ablation`` run:
    the CDDS architecture trained with plain InfoNCE on its pooled semantic components)."""

    def __init__(self, loss: torch.nn.Module):
        super().__init__()
        self.loss = loss

    def forward(self, *, image_features, text_features, logit_scale, output_dict=False, **_):
        return self.loss(image_features, text_features, logit_scale, output_dict=output_dict)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_run(
    name: str,
    model: torch.nn.Module,
    loss_fn: torch.nn.Module,
    images: torch.Tensor,
    tokens: torch.Tensor,
    schedule: list[tuple[torch.Tensor, torch.Tensor]],
    normalize: Callable[[torch.Tensor], torch.Tensor],
    *,
    lr: float,
    wd: float,
    warmup: int,
    seed: int,
    device: torch.device,
    progress: bool = True,
) -> dict[str, Any]:
    """Train ``model`` with ``loss_fn`` on the given step schedule; return the history.

    ``images`` (uint8) and ``tokens`` live on ``device``; each step is :func:`_train_step` with
    AdamW at the schedule's learning rate. Returns ``{"loss": [...], <term>: [...], "lr": [...],
    "step_s": [...], "train_s": float}``.
    """
    from tqdm.auto import tqdm

    torch.manual_seed(seed)  # the decoupler noise: same stream in every run
    opt = make_optimizer(model, lr, wd)
    steps = len(schedule)
    hist: dict[str, Any] = {"loss": [], "lr": [], "step_s": []}
    model.train()
    bar = tqdm(schedule, desc=f"train {name}", disable=not progress, dynamic_ncols=True)
    _sync(device)
    t_run = time.perf_counter()
    for step, (img_idx, cap_idx) in enumerate(bar):
        t0 = time.perf_counter()
        lr_now = lr_at(step, lr, warmup, steps)
        for group in opt.param_groups:
            group["lr"] = lr_now
        img_idx, cap_idx = img_idx.to(device), cap_idx.to(device)
        values = _train_step(
            model, loss_fn, opt, normalize(images[img_idx]), tokens[img_idx, cap_idx]
        )
        loss = float(sum(values.values()))
        if not math.isfinite(loss):
            raise FloatingPointError(f"{name}: loss is {loss} at step {step}: {values}")
        hist["step_s"].append(time.perf_counter() - t0)
        hist["loss"].append(loss)
        hist["lr"].append(lr_now)
        for k, v in values.items():
            hist.setdefault(k, []).append(v)
        if progress and (step % 5 == 0 or step == steps - 1):
            bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
    _sync(device)
    hist["train_s"] = time.perf_counter() - t_run
    bar.close()
    model.eval()
    return hist


def _train_step(
    model: torch.nn.Module,
    loss_fn: torch.nn.Module,
    opt: torch.optim.Optimizer,
    image: torch.Tensor,
    text: torch.Tensor,
) -> dict[str, float]:
    """One step on a batch: forward, ``loss_fn(**out, output_dict=True)``, backward on the sum of
    the terms, the optimizer step, then open_clip_train's clamp ``logit_scale <= ln 100``.
    Returns the terms' values (reading them waits for the device)."""
    terms = loss_fn(**model(image, text), output_dict=True)
    opt.zero_grad(set_to_none=True)
    sum(terms.values()).backward()
    opt.step()
    with torch.no_grad():
        model.logit_scale.clamp_(0, math.log(100))
    return {k: float(v.detach()) for k, v in terms.items()}


def _step_time(hist: dict[str, Any]) -> float:
    """Mean seconds per step, leaving out the first steps (allocator / kernel warm-up)."""
    s = hist["step_s"]
    skip = min(2, max(len(s) - 1, 0))
    rest = s[skip:]
    return float(sum(rest) / len(rest))


def _versions() -> dict[str, str | None]:
    import numpy
    import open_clip

    import cdds_fast

    out: dict[str, str | None] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "open_clip": getattr(open_clip, "__version__", None),
        "cdds_fast": cdds_fast.__version__,
        "numpy": numpy.__version__,
        "triton": None,
    }
    try:
        import triton

        out["triton"] = triton.__version__
    except Exception:  # noqa: BLE001 - triton is optional
        pass
    return out


def _load_average() -> float | None:
    try:
        return float(os.getloadavg()[0])
    except (AttributeError, OSError):  # pragma: no cover - not on every OS
        return None


def _device_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "device": str(device),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        info["cuda_name"] = torch.cuda.get_device_name(device)
    info["load_average_1m_at_end"] = _load_average()
    return info


# ---------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------


def format_report_table(
    metrics: dict[str, dict[str, float]], step_s: dict[str, float | None]
) -> str:
    """:func:`cdds_fast.eval.retrieval.format_table` plus a ``s / train step`` row."""
    from cdds_fast.eval.retrieval import format_table

    seconds = {name: f"{s:.3f}" for name, s in step_s.items() if s is not None}
    return format_table(metrics, extra_rows={"s / train step": seconds})


def chance_metrics(num_images: int, captions_per_image: int = 5) -> dict[str, float]:
    """Expected metrics of random scores (no training) on a test split of ``num_images`` images
    with ``captions_per_image`` captions each: T->I R@K ``= K / N_img``; I->T R@K = the chance
    that one of the image's ``c`` captions is among ``K`` random picks out of ``N_txt``; mean
    ranks ``(N_img + 1) / 2`` and ``(N_txt + 1) / (c + 1)`` (best of ``c`` random positions)."""
    n, c = num_images, captions_per_image
    n_txt = n * c
    out: dict[str, float] = {}
    for k in (1, 5, 10):
        miss = 1.0
        for j in range(c):
            miss *= max(n_txt - k - j, 0) / (n_txt - j)
        out[f"i2t_r{k}"] = 100.0 * (1.0 - miss)
        out[f"t2i_r{k}"] = 100.0 * min(k / n, 1.0)
    out["rsum"] = sum(out[f"{p}_r{k}"] for p in ("i2t", "t2i") for k in (1, 5, 10))
    out["i2t_mean_rank"] = (n_txt + 1) / (c + 1)
    out["t2i_mean_rank"] = (n + 1) / 2
    return out


def _smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot_report(report: dict[str, Any], path: str | os.PathLike) -> None:
    """``report.png``: contrastive loss of both runs, the CDDS terms, and retrieval bars."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    losses = report["losses"]
    window = max(1, len(losses["clip"]["loss"]) // 30)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    _plot_losses(axes[0], losses, window)
    _plot_terms(axes[1], losses, window)
    _plot_retrieval(axes[2], report)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_losses(ax: Any, losses: dict[str, Any], window: int) -> None:
    """The InfoNCE each run trains its retrieval features with, and the CDDS total."""
    ax.plot(_smooth(losses["clip"]["loss"], window), label="ClipLoss (clip run)", color="C0")
    ax.plot(
        _smooth(losses["cdds"]["contrastive_loss"], window),
        label="CDDS contrastive term",
        color="C1",
    )
    ax.plot(_smooth(losses["cdds"]["loss"], window), label="CDDS total", color="C1", ls="--")
    if "head-only" in losses:
        ax.plot(
            _smooth(losses["head-only"]["loss"], window), label="head-only (InfoNCE)", color="C2"
        )
    ax.set_title("training loss (solid: InfoNCE on the retrieval features)")
    ax.set_xlabel("step")
    ax.legend()


def _plot_terms(ax: Any, losses: dict[str, Any], window: int) -> None:
    """The five weighted CDDS terms of the CDDS run."""
    for n, term in enumerate(_TERMS):
        ax.plot(_smooth(losses["cdds"][term], window), label=term, color=f"C{n + 3}")
    ax.set_yscale("log")
    ax.set_title("CDDS terms (weighted)")
    ax.set_xlabel("step")
    ax.legend(fontsize=8)


def _plot_retrieval(ax: Any, report: dict[str, Any]) -> None:
    """Test recalls of every run, side by side."""
    keys = ["i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"]
    labels = ["I->T R@1", "R@5", "R@10", "T->I R@1", "R@5", "R@10"]
    metrics = report["metrics"]
    names = [m for m in _METHODS if m in metrics]
    width = 0.8 / len(names)
    for n, name in enumerate(names):
        xs = [i + (n - (len(names) - 1) / 2) * width for i in range(len(keys))]
        ax.bar(
            xs,
            [metrics[name][k] for k in keys],
            width,
            label=f"{name} (rSum {metrics[name]['rsum']:.0f})",
            color=("0.6", "C0", "C1", "C2")[_METHODS.index(name)],
        )
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel("recall (%)")
    ax.set_title(
        f"test retrieval ({report['data']['test_images']} images, "
        f"{report['data']['test_captions']} captions)"
    )
    ax.legend(fontsize=8)


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


class _RunSettings(NamedTuple):
    """The run's settings: every flag checked, every default (or ``--quick`` preset) filled in."""

    steps: int
    batch_size: int
    train_images: int
    test_images: int
    warmup: int
    head_cfg: dict[str, Any]
    device: torch.device
    backend: str
    threads: int


def _run_settings(args: argparse.Namespace) -> _RunSettings:
    """Check the flags and fill in the defaults (raises ValueError naming the flag)."""
    preset = QUICK if args.quick else {}

    def pick(name: str) -> int:
        value = getattr(args, name)
        return _check_positive(
            name, value if value is not None else preset.get(name, DEFAULTS[name])
        )

    steps, batch_size = pick("steps"), pick("batch_size")
    train_images, test_images = pick("train_images"), pick("test_images")
    head_cfg = _checked_settings(args)
    warmup = int(round(args.warmup * steps)) if args.warmup < 1 else int(args.warmup)
    device = _resolve_device(args.device)
    backend = resolve_backend(args.backend, device, torch.float32)  # the demo trains in fp32
    return _RunSettings(
        steps,
        batch_size,
        train_images,
        test_images,
        warmup,
        head_cfg,
        device,
        backend,
        choose_threads(args.threads),
    )


class _DemoData(NamedTuple):
    tokenizer: Callable
    train: Any  #: SceneCaptions, the train split
    test: Any  #: SceneCaptions, the test split (images rendered already)
    train_images: torch.Tensor | None  #: uint8 ``[N, 3, H, W]`` on the run's device
    train_tokens: torch.Tensor | None  #: ``[N, 5, L]`` caption tokens on the run's device


def _make_data(model_name: str, run: _RunSettings, seed: int) -> _DemoData:
    """Both splits of the embedded scenes at the model's image size, every caption tokenised
    once; the test images are rendered here so that rendering counts as data time, not eval."""
    import open_clip

    from cdds_fast.data import SceneCaptions

    tokenizer = open_clip.get_tokenizer(model_name)
    image_size = MODEL_CONFIG["vision_cfg"]["image_size"]
    train = SceneCaptions("train", size=run.train_images, image_size=image_size, seed=seed)
    test = SceneCaptions("test", size=run.test_images, image_size=image_size, seed=seed)
    images, tokens = _render(train, tokenizer)
    for i in range(test.num_images):
        test.image_array(i)
        test.captions(i)
    return _DemoData(tokenizer, train, test, images.to(run.device), tokens.to(run.device))


def _train_all(
    init: torch.nn.Module,
    run: _RunSettings,
    data: _DemoData,
    normalize: _Normalize,
    args: argparse.Namespace,
) -> tuple[dict[str, torch.nn.Module], dict[str, Any]]:
    """The runs, each from a copy of ``init`` with the same batches, optimizer, schedule and
    noise seed: ``clip`` (FusedClipLoss), ``cdds`` (CDDSModel + CDDSLoss) and, with
    ``--ablation``, ``head-only`` (CDDSModel + InfoNCE on its pooled features). Returns the
    trained models and their histories by run name."""
    from cdds_fast.contrastive import FusedClipLoss
    from cdds_fast.loss import CDDSLoss
    from cdds_fast.open_clip import CDDSModel

    clip_loss = FusedClipLoss(backend=run.backend)

    def cdds_model() -> torch.nn.Module:
        torch.manual_seed(args.seed + 2)  # the head's init: the same in every CDDS-architecture run
        return CDDSModel(copy.deepcopy(init), **run.head_cfg, output_dict=True)

    plan: list[tuple[str, Callable[[], torch.nn.Module], torch.nn.Module]] = [
        ("clip", lambda: copy.deepcopy(init), clip_loss),
        ("cdds", cdds_model, CDDSLoss(**LOSS_CFG, backend=run.backend, check_finite=False)),
    ]
    if args.ablation:
        plan.append(("head-only", cdds_model, _FeaturesOnly(clip_loss)))
    schedule = batch_schedule(
        run.train_images, data.train.captions_per_image, run.batch_size, run.steps, args.seed
    )
    models: dict[str, torch.nn.Module] = {}
    hists: dict[str, dict[str, Any]] = {}
    for name, make, loss_fn in plan:
        models[name] = make()
        hists[name] = train_run(
            name,
            models[name],
            loss_fn,
            data.train_images,
            data.train_tokens,
            schedule,
            normalize,
            lr=args.lr,
            wd=args.wd,
            warmup=run.warmup,
            seed=args.seed + 1,
            device=run.device,
            progress=not args.no_progress,
        )
    return models, hists


def _evaluate(
    models: dict[str, torch.nn.Module],
    data: _DemoData,
    transform: Callable,
    run: _RunSettings,
    progress: bool,
) -> dict[str, dict[str, float]]:
    """Test-split retrieval metrics of every model, by name."""
    from cdds_fast.eval.retrieval import encode_dataset, retrieval_metrics

    metrics = {}
    for name, model in models.items():
        encoded = encode_dataset(
            model,
            data.test,
            batch_size=256,
            device=run.device,
            transform=transform,
            tokenizer=data.tokenizer,
            disable=not progress,
        )
        metrics[name] = retrieval_metrics(*encoded)
    return metrics


def _report_config(
    args: argparse.Namespace, run: _RunSettings, model_name: str, models: dict[str, torch.nn.Module]
) -> dict[str, Any]:
    return {
        "model": model_name,
        "model_config": MODEL_CONFIG,
        "steps": run.steps,
        "batch_size": run.batch_size,
        "lr": args.lr,
        "weight_decay": args.wd,
        "warmup_steps": run.warmup,
        "schedule": "linear warmup, then cosine to 0 (open_clip_train cosine_lr)",
        "optimizer": "AdamW(betas=(0.9, 0.98), eps=1e-6), no decay on gains/biases/logit_scale",
        "seed": args.seed,
        "quick": bool(args.quick),
        "ablation": bool(args.ablation),
        "backend": run.backend,
        "threads": run.threads,
        "baseline_loss": "cdds_fast.contrastive.FusedClipLoss",
        "cdds_head": run.head_cfg,
        "cdds_loss": dict(LOSS_CFG),
        "params": {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()},
    }


def _report_data(data: _DemoData) -> dict[str, Any]:
    return {
        "dataset": "cdds_fast.data.SceneCaptions",
        "train_images": data.train.num_images,
        "train_captions": data.train.num_captions,
        "test_images": data.test.num_images,
        "test_captions": data.test.num_captions,
        "image_size": MODEL_CONFIG["vision_cfg"]["image_size"],
        "context_length": MODEL_CONFIG["text_cfg"]["context_length"],
    }


def _losses_and_timings(hists: dict[str, dict[str, Any]]) -> tuple[dict, dict]:
    """Per run: the losses by step (total, the CDDS terms, the learning rate) and the timings."""
    losses = {
        name: {"loss": h["loss"], **{t: h[t] for t in _TERMS if t in h}, "lr": h["lr"]}
        for name, h in hists.items()
    }
    timings = {
        "s_per_step": {name: _step_time(h) for name, h in hists.items()},
        "train_s": {name: h["train_s"] for name, h in hists.items()},
        "step_s": {name: h["step_s"] for name, h in hists.items()},
    }
    return losses, timings


def run_demo(args: argparse.Namespace, t_start: float | None = None) -> dict[str, Any]:
    """Run the demo for parsed arguments; returns the report dict (also written to ``args.out``)."""
    t_start = time.perf_counter() if t_start is None else t_start
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2

    t_import = time.perf_counter() - t_start
    run = _run_settings(args)
    load_at_start = _load_average()
    torch.set_num_threads(run.threads)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cdds_demo_cfg_") as tmp:
        model_name = register_model_config(tmp)
    data = _make_data(model_name, run, args.seed)
    t_data = time.perf_counter() - t0

    torch.manual_seed(args.seed)
    with quiet_random_init():
        init = open_clip.create_model(model_name, device=run.device, output_dict=True)
    init.eval()
    pre_cfg = PreprocessCfg(**init.visual.preprocess_cfg)
    models, hists = _train_all(
        init, run, data, _Normalize(pre_cfg.mean, pre_cfg.std, run.device), args
    )
    data = data._replace(train_images=None, train_tokens=None)  # free them before evaluating

    t0 = time.perf_counter()
    metrics = _evaluate(
        {"untrained": init, **models},
        data,
        image_transform_v2(pre_cfg, is_train=False),
        run,
        not args.no_progress,
    )
    t_eval = time.perf_counter() - t0

    losses, timings = _losses_and_timings(hists)
    report: dict[str, Any] = {
        "config": _report_config(args, run, model_name, models),
        "data": _report_data(data),
        "losses": losses,
        "metrics": metrics,
        "chance": chance_metrics(run.test_images, data.test.captions_per_image),
        "timings": {**timings, "import_s": t_import, "data_s": t_data, "eval_s": t_eval},
        "versions": _versions(),
        "device": {**_device_info(run.device), "load_average_1m_at_start": load_at_start},
        "table": format_report_table(metrics, timings["s_per_step"]),
    }
    if not args.no_plot:
        t0 = time.perf_counter()
        plot_report(report, out_dir / "report.png")
        report["timings"]["plot_s"] = time.perf_counter() - t0
    report["timings"]["total_s"] = time.perf_counter() - t_start
    (out_dir / "report.json").write_text(json.dumps(report, indent=1))
    return report


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``cdds-fast demo``; returns the exit status."""
    t_start = time.perf_counter()
    args = build_parser().parse_args(argv)
    missing = None if args.no_plot else missing_extra("matplotlib")
    if missing:
        print(f"cdds-fast demo: report.png {missing} (or pass --no-plot)", file=sys.stderr)
        return 2
    try:
        report = run_demo(args, t_start)
    except ValueError as e:
        print(f"cdds-fast demo: {e}", file=sys.stderr)
        return 2
    cfg, data, t = report["config"], report["data"], report["timings"]
    head = cfg["cdds_head"]
    device = report["device"]["device"]
    if device == "cpu":
        device += f", {cfg['threads']} thread{'s' if cfg['threads'] > 1 else ''}"
    print()
    print(
        f"Test retrieval on the embedded captioned scenes: {data['test_images']} images, "
        f"{data['test_captions']} captions; {cfg['steps']} steps x batch {cfg['batch_size']} "
        f"per run ({device}; loss backend {cfg['backend']})"
    )
    print(
        f"clip = {cfg['baseline_loss']}; cdds = CDDSModel(z={head['z']}, n_enc={head['n_enc']}, "
        f"n_dec={head['n_dec']}, heads={head['heads']}) + CDDSLoss; untrained = the shared init"
        + ("; head-only = CDDSModel + InfoNCE only" if cfg["ablation"] else "")
    )
    print()
    print(report["table"])
    print()
    ch = report["chance"]
    print(
        f"chance level (random scores): R@1 {ch['t2i_r1']:.1f}%, R@10 {ch['t2i_r10']:.1f}%, "
        f"rSum {ch['rsum']:.1f}, mean rank I->T {ch['i2t_mean_rank']:.0f} / T->I "
        f"{ch['t2i_mean_rank']:.0f}. How to read this table: docs/demo.md"
    )
    train = " + ".join(f"{name} {sec:.0f} s" for name, sec in t["train_s"].items())
    print(
        f"time: {t['total_s']:.0f} s total (imports {t['import_s']:.0f} s, "
        f"data {t['data_s']:.0f} s, train {train}, eval {t['eval_s']:.0f} s)"
    )
    written = ["report.json"] + ([] if args.no_plot else ["report.png"])
    print(f"wrote {', '.join(str(Path(args.out) / w) for w in written)}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
