"""``cdds-fast train``: open_clip_train with CDDSModel + CDDSLoss, end to end on CPU.

Runs are tiny (8 training pairs of 32x32 images, a 1-layer 32-wide CLIP) and deterministic where a
comparison needs it: ``--cdds-z 1 --cdds-sigma 0`` (no decoupler noise) and ``--aug-cfg
scale=(1.0,1.0)`` (the random resized crop keeps the whole 32x32 image).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch

from cdds_fast.contract import LOSS_KEYS
from cdds_fast.open_clip import CDDSModel
from cdds_fast.open_clip.train import main as train_main
from tests._openclip_fixtures import (
    TINY_MODEL,
    cpu_env,
    parse_train_log,
    tiny_config_dir,
    write_csv_dataset,
)

TERMS = LOSS_KEYS  # the loss terms each run logs
# plain SGD (update = -lr * grad) so that equal gradients give equal parameters after a step
SGD = [
    "--opt",
    "timm/momentum",
    "--momentum",
    "0",
    "--wd",
    "0",
    "--lr",
    "0.1",
    "--lr-scheduler",
    "const",
    "--warmup",
    "0",
]
DETERMINISTIC = ["--cdds-z", "1", "--cdds-sigma", "0", "--aug-cfg", "scale=(1.0,1.0)"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("csv")
    return {
        "train": write_csv_dataset(root, "train", 8, seed=1),
        "val": write_csv_dataset(root, "val", 8, seed=2),
        "config": tiny_config_dir(),
        "logs": tmp_path_factory.mktemp("logs"),
    }


def args(data, name: str, *extra: str, batch_size: int = 4, val: bool = True) -> list[str]:
    out = [
        "--cdds-model-config",
        str(data["config"]),
        "--model",
        TINY_MODEL,
        "--train-data",
        str(data["train"]),
        "--dataset-type",
        "csv",
        "--batch-size",
        str(batch_size),
        "--epochs",
        "1",
        "--workers",
        "0",
        "--report-to",
        "",
        "--logs",
        str(data["logs"]),
        "--name",
        name,
        "--device",
        "cpu",
        "--precision",
        "fp32",
        "--seed",
        "0",
        "--log-every-n-steps",
        "1",
        "--cdds-heads",
        "4",
        "--cdds-enc-layers",
        "1",
        "--cdds-dec-layers",
        "1",
        "--cdds-backend",
        "reference",
    ]
    if val:
        out += ["--val-data", str(data["val"])]
    return out + list(extra)


def run_dir(data, name: str) -> Path:
    return Path(data["logs"]) / name


@pytest.fixture(scope="module")
def full_batch_run(data) -> Path:
    """One SGD step on the whole 8-pair batch, deterministic: reference for accum and DDP."""
    assert train_main(args(data, "full", *SGD, *DETERMINISTIC, batch_size=8, val=False)) == 0
    return run_dir(data, "full")


def state(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / "epoch_1.pt", weights_only=True)["state_dict"]


def test_one_epoch_run_logs_terms_writes_checkpoint_and_val_metrics(data):
    assert train_main(args(data, "basic")) == 0
    run = run_dir(data, "basic")
    rows = parse_train_log(run / "out.log")
    assert len(rows) == 2  # 8 pairs / batch 4
    for row in rows:
        assert set(TERMS) <= set(row)
        assert all(math.isfinite(row[t]) for t in TERMS)
        assert row["loss"] == pytest.approx(sum(row[t] for t in TERMS), rel=1e-3)
    results = [
        json.loads(line)
        for line in (run / "checkpoints" / "results.jsonl").read_text().splitlines()
    ]
    metrics = results[-1]
    for key in ("image_to_text_R@1", "text_to_image_R@1", "image_to_text_R@5", "clip_val_loss"):
        assert key in metrics
    sidecar = json.loads((run / "checkpoints" / "cdds_config.json").read_text())
    assert sidecar["model"] == TINY_MODEL and sidecar["cdds"]["heads"] == 4

    # The checkpoint loads back into the wrapper (config from the side-car) and reproduces
    # the trainer's validation retrieval metrics.
    model = CDDSModel.from_checkpoint(run / "checkpoints" / "epoch_1.pt")
    assert model.cdds_config["n_enc"] == 1 and model.cdds_config["heads"] == 4
    _, _, preprocess = open_clip.create_model_and_transforms(TINY_MODEL)
    tokenizer = open_clip.get_tokenizer(TINY_MODEL)
    lines = Path(data["val"]).read_text().splitlines()[1:]
    from PIL import Image

    images = torch.stack([preprocess(Image.open(line.split("\t")[0])) for line in lines])
    texts = tokenizer([line.split("\t")[1] for line in lines])
    with torch.no_grad():
        img, txt = (
            model.encode_image(images, normalize=True),
            model.encode_text(texts, normalize=True),
        )
    ranks = (img @ txt.T).argsort(dim=1, descending=True)
    r1 = float(np.mean((ranks[:, 0] == torch.arange(len(lines))).numpy()))
    assert r1 == pytest.approx(metrics["image_to_text_R@1"])

    # Evaluation through open_clip's trainer: same flags, no training data, --resume.
    eval_args = args(data, "basic_eval", "--resume", str(run / "checkpoints" / "epoch_1.pt"))
    i = eval_args.index("--train-data")
    del eval_args[i : i + 2]
    assert train_main(eval_args) == 0
    again = json.loads(
        (run_dir(data, "basic_eval") / "checkpoints" / "results.jsonl").read_text().splitlines()[-1]
    )
    for key in ("image_to_text_R@1", "text_to_image_R@1", "image_to_text_mean_rank"):
        assert again[key] == pytest.approx(metrics[key]), key


def test_accum_freq_matches_full_batch_step(data, full_batch_run):
    """--accum-freq 2 with batch 4 = one step over the batch of 8 (one optimizer step each)."""
    assert (
        train_main(args(data, "accum", *SGD, *DETERMINISTIC, "--accum-freq", "2", val=False)) == 0
    )
    full, accum = state(full_batch_run), state(run_dir(data, "accum"))
    assert full.keys() == accum.keys()
    init_scale = math.log(1 / 0.07)
    for key in full:
        if key == "clip.logit_scale":
            continue
        torch.testing.assert_close(accum[key], full[key], rtol=1e-4, atol=2e-6, msg=key)
    # the step really moved the CDDS vectors (init alpha 0.5, w 1.0)
    assert (full["head.alpha_image"] - 0.5).abs().max() > 1e-6
    assert (full["head.w_s_text"] - 1.0).abs().max() > 1e-4
    # open_clip's trainer feeds the live logit_scale to each of the accum_freq passes, so its
    # gradient is counted accum_freq times (as for plain CLIP with ClipLoss).
    d_full = full["clip.logit_scale"].item() - init_scale
    d_accum = accum["clip.logit_scale"].item() - init_scale
    assert abs(d_full) > 1e-6
    assert d_accum == pytest.approx(2 * d_full, rel=1e-3)
    rows_full, rows_accum = (
        parse_train_log(full_batch_run / "out.log"),
        parse_train_log(run_dir(data, "accum") / "out.log"),
    )
    for t in TERMS:
        assert rows_accum[0][t] == pytest.approx(rows_full[0][t], rel=1e-3)


@pytest.mark.parametrize("precision", ["amp_bf16", "bf16"])
def test_low_precision_runs_finish(data, precision):
    name = f"prec_{precision}"
    assert train_main(args(data, name, "--precision", precision, "--accum-freq", "2")) == 0
    rows = parse_train_log(run_dir(data, name) / "out.log")
    assert rows and all(math.isfinite(rows[-1][t]) for t in TERMS)
    assert (run_dir(data, name) / "checkpoints" / "epoch_1.pt").exists()


def test_cdds_off_baseline(data):
    assert train_main(args(data, "off", "--cdds-off", val=False)) == 0
    rows = parse_train_log(run_dir(data, "off") / "out.log")
    assert rows and "semantic_loss" not in rows[0] and "loss" in rows[0]
    sd = state(run_dir(data, "off"))
    assert not any(k.startswith("head.") for k in sd)


def test_help_and_refused_flags(capsys, data):
    assert train_main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "--cdds-sigma" in out and "--train-data" in out
    assert train_main(args(data, "siglip", "--siglip")) == 2
    assert train_main(["--cdds-model-config", "/nonexistent/x.json", "--model", TINY_MODEL]) == 2


def test_torchrun_two_process_gloo(data, full_batch_run, tmp_path):
    """`torchrun --nproc_per_node 2` with the launcher on CPU (gloo): finishes, every parameter
    gets a gradient (DDP raises on unused ones), the checkpoint (module.-prefixed) loads into the
    wrapper, and the contrastive terms of the first step equal the single-process ones: the same
    8 pairs, split 4 + 4 over the ranks and gathered, give the same InfoNCE values."""
    name = "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        # `--` ends torchrun's own options (its --logs-specs would claim open_clip's --logs)
        "-m",
        "--",
        "cdds_fast.cli",
        "train",
        *args(data, name, *SGD, *DETERMINISTIC, batch_size=4, val=True),
    ]
    # torchrun leaves a torchelastic_* folder in TMPDIR: keep it in the test's own folder
    env = {**cpu_env(), "TMPDIR": str(tmp_path)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    run = run_dir(data, name)
    rows = parse_train_log(run / "out.log")
    ref = parse_train_log(full_batch_run / "out.log")
    assert len(rows) == 1 and len(ref) == 1
    for t in ("contrastive_loss", "semantic_loss"):
        assert rows[0][t] == pytest.approx(ref[0][t], rel=1e-3), t
    assert "image_to_text_R@1" in (run / "checkpoints" / "results.jsonl").read_text()
    sd = state(run)
    assert all(k.startswith("module.") for k in sd)
    model = CDDSModel.from_checkpoint(run / "checkpoints" / "epoch_1.pt")
    assert isinstance(model, CDDSModel)
