"""``cdds-fast eval``: CDDS checkpoints (trainer layout), plain open_clip models, embedded /
Karpathy / CSV data, the MS-COCO 1K fold path, and bad input."""

from __future__ import annotations

import json
import re
from pathlib import Path

import open_clip
import pytest
import torch
from PIL import Image

from cdds_fast.data import SceneCaptions, write_csv
from cdds_fast.eval.command import main as eval_main
from cdds_fast.eval.retrieval import encode_dataset, retrieval_metrics
from cdds_fast.open_clip import CDDS_CONFIG_FILENAME, CDDSModel
from tests._openclip_fixtures import HEADS, TINY_CONFIG, TINY_MODEL, tiny_config_dir

HEAD = {"n_enc": 1, "n_dec": 1, "heads": HEADS, "z": 2, "sigma": 0.1}
N_EMBEDDED = 12


def _tiny_clip(seed: int) -> torch.nn.Module:
    tiny_config_dir()
    torch.manual_seed(seed)
    return open_clip.create_model(TINY_MODEL, output_dict=True)


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Move the weights away from the init (so a failed load would show)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))


@pytest.fixture(scope="module")
def cdds_run(tmp_path_factory) -> dict:
    """A run folder as ``cdds-fast train`` leaves it: checkpoints/epoch_1.pt with DDP's
    ``module.`` prefixes under ``state_dict``, and the side-car cdds_config.json."""
    run = tmp_path_factory.mktemp("run") / "checkpoints"
    run.mkdir()
    model = CDDSModel(_tiny_clip(0), **HEAD, output_dict=True)
    _perturb(model, 1)
    state = {"module." + k: v for k, v in model.state_dict().items()}
    torch.save(
        {"epoch": 1, "name": "tiny", "state_dict": state, "optimizer": {}}, run / "epoch_1.pt"
    )
    sidecar = {
        "model": TINY_MODEL,
        "pretrained": None,
        "precision": "fp32",
        "cdds": {
            **HEAD,
            "a_c": 1.0,
            "a_s": 1.0,
            "a_m": 0.1,
            "a_f": 0.5,
            "tau_kl": 1.0,
            "rho": 0.01,
            "backend": "auto",
        },
        "model_config": TINY_CONFIG,
    }
    (run / CDDS_CONFIG_FILENAME).write_text(json.dumps(sidecar))
    return {"path": run / "epoch_1.pt", "model": model.eval()}


@pytest.fixture(scope="module")
def plain_ckpt(tmp_path_factory) -> dict:
    """A ``--cdds-off`` checkpoint: plain CLIP weights, no side-car."""
    folder = tmp_path_factory.mktemp("plain")
    clip = _tiny_clip(2)
    _perturb(clip, 3)
    torch.save(
        {"epoch": 1, "state_dict": {"module." + k: v for k, v in clip.state_dict().items()}},
        folder / "epoch_1.pt",
    )
    return {"path": folder / "epoch_1.pt", "model": clip.eval()}


@pytest.fixture(scope="module")
def karpathy(tmp_path_factory) -> dict:
    """A Karpathy-format JSON with 10 test images (5 captions each), 2 train images."""
    root = tmp_path_factory.mktemp("karpathy")
    (root / "imgs").mkdir()
    colours = [
        "red",
        "green",
        "blue",
        "yellow",
        "purple",
        "orange",
        "pink",
        "cyan",
        "white",
        "grey",
    ]
    rgb = [
        (220, 30, 30),
        (30, 200, 30),
        (30, 30, 220),
        (230, 230, 20),
        (150, 30, 160),
        (250, 140, 0),
        (250, 120, 180),
        (0, 220, 220),
        (245, 245, 245),
        (128, 128, 128),
    ]
    images = []
    for n, (name, c) in enumerate(zip(colours + colours[:2], rgb + rgb[:2], strict=True)):
        fname = f"im_{n:02d}.png"
        Image.new("RGB", (40, 40), c).save(root / "imgs" / fname)
        sentences = [
            {"raw": f"a {adj} {name} square", "tokens": []}
            for adj in ("plain", "flat", "big", "simple", "bright")
        ]
        images.append(
            {
                "filepath": "imgs",
                "filename": fname,
                "split": "test" if n < 10 else "train",
                "sentences": sentences,
            }
        )
    path = root / "dataset_tiny.json"
    path.write_text(json.dumps({"dataset": "tiny", "images": images}))
    return {"json": path, "root": root}


def _run(args: list[str], tmp_path: Path) -> dict:
    out = tmp_path / "result.json"
    assert eval_main([*args, "--json-out", str(out), "--no-progress"]) == 0
    return json.loads(out.read_text())


def _check_range(m: dict, n_img: int) -> None:
    for key in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"):
        assert 0.0 <= m[key] <= 100.0
    assert 0.0 <= m["rsum"] <= 600.0
    assert 1.0 <= m["t2i_mean_rank"] <= n_img


def _direct(model, n_img: int) -> dict:
    """Metrics computed here, without the CLI, on the embedded test split."""
    tokenizer = open_clip.get_tokenizer(TINY_MODEL)
    ds = SceneCaptions("test", size=n_img, image_size=32)
    from open_clip.transform import PreprocessCfg, image_transform_v2

    transform = image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)
    enc = encode_dataset(
        model, ds, batch_size=7, transform=transform, tokenizer=tokenizer, disable=True
    )
    return retrieval_metrics(*enc)


def test_cdds_checkpoint_on_embedded_split(cdds_run, tmp_path, capsys):
    res = _run(
        [
            "--checkpoint",
            str(cdds_run["path"]),
            "--embedded-size",
            str(N_EMBEDDED),
            "--batch-size",
            "5",
        ],
        tmp_path,
    )
    assert res["model"]["kind"] == "cdds" and res["model"]["features"] == "semantic"
    assert res["model"]["model"] == TINY_MODEL
    assert res["model"]["cdds_head"]["n_enc"] == 1 and res["model"]["cdds_head"]["heads"] == HEADS
    assert res["data"]["source"] == "embedded"
    assert res["data"]["images"] == N_EMBEDDED and res["data"]["captions"] == 5 * N_EMBEDDED
    _check_range(res["metrics"], N_EMBEDDED)
    # the CLI's numbers are the loaded CDDS model's pooled semantic components
    expected = _direct(cdds_run["model"], N_EMBEDDED)
    for key, value in expected.items():
        assert res["metrics"][key] == pytest.approx(value, abs=1e-6), key
    out = capsys.readouterr().out
    assert "| metric" in out and "I->T R@1" in out and "rSum" in out and "T->I mean rank" in out


def test_cdds_checkpoint_clip_features(cdds_run, tmp_path):
    res = _run(
        [
            "--checkpoint",
            str(cdds_run["path"]),
            "--embedded-size",
            str(N_EMBEDDED),
            "--features",
            "clip",
        ],
        tmp_path,
    )
    assert res["model"]["features"] == "clip"
    expected = _direct(cdds_run["model"].clip, N_EMBEDDED)
    for key, value in expected.items():
        assert res["metrics"][key] == pytest.approx(value, abs=1e-6), key


def test_cdds_checkpoint_without_sidecar(cdds_run, tmp_path, capsys):
    """A bare checkpoint file (no cdds_config.json): --model and --cdds-heads name what the
    weights do not record; the loaded model gives the same numbers."""
    bare = tmp_path / "bare" / "model.pt"
    bare.parent.mkdir()
    bare.write_bytes(Path(cdds_run["path"]).read_bytes())
    assert eval_main(["--checkpoint", str(bare), "--no-progress"]) == 2
    assert "--model" in capsys.readouterr().err
    res = _run(
        [
            "--checkpoint",
            str(bare),
            "--model",
            TINY_MODEL,
            "--cdds-heads",
            str(HEADS),
            "--embedded-size",
            str(N_EMBEDDED),
        ],
        tmp_path,
    )
    assert res["model"]["cdds_head"]["heads"] == HEADS and res["model"]["cdds_head"]["n_enc"] == 1
    expected = _direct(cdds_run["model"], N_EMBEDDED)
    for key, value in expected.items():
        assert res["metrics"][key] == pytest.approx(value, abs=1e-6), key


@pytest.mark.parametrize("kind", ["cdds", "plain"])
def test_checkpoint_file_is_read_once(kind, cdds_run, plain_ckpt, monkeypatch):
    """One torch.load per checkpoint, CDDS (through CDDSModel.from_checkpoint) or plain."""
    from cdds_fast.eval.command import load_model

    path = (cdds_run if kind == "cdds" else plain_ckpt)["path"]
    reads = []
    load = torch.load

    def counting_load(f, *args, **kwargs):
        reads.append(Path(f))
        return load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counting_load)
    model, _, info = load_model(checkpoint=path, model=TINY_MODEL)
    assert reads == [Path(path)] and info["kind"] == {"cdds": "cdds", "plain": "clip"}[kind]


def test_checkpoint_of_another_layout_is_refused(tmp_path, capsys):
    path = tmp_path / "epoch_1.pt"
    torch.save([torch.zeros(2)], path)
    assert eval_main(["--checkpoint", str(path), "--model", TINY_MODEL, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"--checkpoint {path}: expected an open_clip checkpoint" in err and "got list" in err


def test_plain_open_clip_model(tmp_path):
    res = _run(
        [
            "--model",
            TINY_MODEL,
            "--model-config",
            str(tiny_config_dir()),
            "--embedded-size",
            str(N_EMBEDDED),
        ],
        tmp_path,
    )
    assert res["model"] == {
        "kind": "clip",
        "model": TINY_MODEL,
        "pretrained": None,
        "features": "clip",
    }
    _check_range(res["metrics"], N_EMBEDDED)


def test_plain_checkpoint_needs_model_name(plain_ckpt, tmp_path, capsys):
    assert eval_main(["--checkpoint", str(plain_ckpt["path"]), "--no-progress"]) == 2
    assert "--model" in capsys.readouterr().err
    res = _run(
        [
            "--checkpoint",
            str(plain_ckpt["path"]),
            "--model",
            TINY_MODEL,
            "--embedded-size",
            str(N_EMBEDDED),
        ],
        tmp_path,
    )
    assert res["model"]["kind"] == "clip"
    expected = _direct(plain_ckpt["model"], N_EMBEDDED)
    for key, value in expected.items():
        assert res["metrics"][key] == pytest.approx(value, abs=1e-6), key
    # the same weights through --model --pretrained FILE (open_clip's own loader)
    res2 = _run(
        [
            "--model",
            TINY_MODEL,
            "--pretrained",
            str(plain_ckpt["path"]),
            "--embedded-size",
            str(N_EMBEDDED),
        ],
        tmp_path,
    )
    assert res2["metrics"] == pytest.approx(res["metrics"])


def test_karpathy_fixture(cdds_run, karpathy, tmp_path, capsys):
    res = _run(
        [
            "--checkpoint",
            str(cdds_run["path"]),
            "--karpathy-json",
            str(karpathy["json"]),
            "--image-root",
            str(karpathy["root"]),
            "--split",
            "test",
        ],
        tmp_path,
    )
    assert res["data"]["source"] == "karpathy" and res["data"]["dataset"] == "tiny"
    assert res["data"]["images"] == 10 and res["data"]["captions"] == 50
    _check_range(res["metrics"], 10)
    assert "folds" not in res

    # the 1K protocol path: 5 folds of consecutive images, averaged; plus the whole split
    res = _run(
        [
            "--checkpoint",
            str(cdds_run["path"]),
            "--karpathy-json",
            str(karpathy["json"]),
            "--image-root",
            str(karpathy["root"]),
            "--coco-1k",
        ],
        tmp_path,
    )
    assert len(res["folds"]) == 5 and res["fold_images"] == 2
    for key in ("i2t_r1", "t2i_r5", "rsum", "t2i_mean_rank"):
        mean = sum(f[key] for f in res["folds"]) / 5
        assert res["metrics"][key] == pytest.approx(mean)
    _check_range(res["metrics_whole_split"], 10)
    out = capsys.readouterr().out
    assert "1K folds mean" in out and "all 10" in out and "5 folds of 2 images" in out


def test_csv(tmp_path):
    csv_path = write_csv(tmp_path / "csv", "test", n=6, image_size=32)
    res = _run(
        ["--model", TINY_MODEL, "--model-config", str(tiny_config_dir()), "--csv", str(csv_path)],
        tmp_path,
    )
    assert res["data"]["source"] == "csv" and res["data"]["images"] == 6
    assert res["data"]["captions"] == 30
    _check_range(res["metrics"], 6)


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "--model"),
        (["--checkpoint", "/nonexistent/epoch_1.pt"], "no such file"),
        (["--model", TINY_MODEL, "--csv", "a.csv", "--karpathy-json", "b.json"], "one data source"),
        (["--model", TINY_MODEL, "--karpathy-json", "b.json"], "--image-root"),
        (["--model", TINY_MODEL, "--coco-1k"], "--karpathy-json"),
        (["--model", TINY_MODEL, "--model-config", "/nonexistent/cfg.json"], "no such file"),
    ],
)
def test_bad_input(argv, message, capsys):
    tiny_config_dir()
    assert eval_main([*argv, "--no-progress"]) == 2
    assert message in capsys.readouterr().err


def test_cli_dispatch(cdds_run, capsys):
    from cdds_fast.cli import main

    assert (
        main(
            [
                "eval",
                "--checkpoint",
                str(cdds_run["path"]),
                "--embedded-size",
                "6",
                "--no-progress",
                "--name",
                "mine",
            ]
        )
        == 0
    )
    assert re.search(r"^\|\s*metric\s*\|\s*mine\s*\|$", capsys.readouterr().out, re.MULTILINE)
