"""The command line as a new user meets it: exit codes, help, refusals that name the flag, a
missing extra, the eval flags that match train's, CSV paths, moved run folders, the tie rule."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch

from cdds_fast import cli, demo
from cdds_fast.eval.command import RANK_RULES
from cdds_fast.eval.command import main as eval_main
from cdds_fast.open_clip.train import main as train_main
from tests._openclip_fixtures import HEADS, TINY_CONFIG, TINY_MODEL, cpu_env, tiny_config_dir

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=cwd,
        env=cpu_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


# ---------------------------------------------------------------- cdds-fast
def test_bare_command_is_an_error_and_help_is_not(capsys):
    assert cli.main([]) == 2
    err = capsys.readouterr().err
    assert "a subcommand is required" in err and "usage: cdds-fast" in err
    assert cli.main(["--help"]) == 0
    assert "usage: cdds-fast" in capsys.readouterr().out
    exe = Path(sys.executable).parent / "cdds-fast"
    assert subprocess.run([str(exe)], capture_output=True, text=True).returncode == 2


# ---------------------------------------------------------------- cdds-fast train
def test_train_help_shows_the_cdds_defaults(capsys):
    assert train_main(["--help"]) == 0
    ours = capsys.readouterr().out.split("open_clip_train flags:")[0].split("options:")[1]
    for flag, default in (
        ("--cdds-a-m", "0.1"),
        ("--cdds-a-f", "0.5"),
        ("--cdds-rho", "0.01"),
        ("--cdds-z", "4"),
        ("--cdds-heads", "8"),
        ("--cdds-backend", "auto"),
    ):
        line = " ".join(ours.split(flag, 1)[1].split("--cdds-", 1)[0].split())
        assert f"(default: {default})" in line, (flag, line)


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--cdds-a-f", "2"], "--cdds-a-f: expected a number in [0, 1], got 2.0"),
        (["--cdds-a-m", "-1"], "--cdds-a-m: expected a finite number >= 0, got -1.0"),
        (["--cdds-tau-kl", "0"], "--cdds-tau-kl: expected a finite number > 0, got 0.0"),
        (["--cdds-rho", "1"], "--cdds-rho: expected a number in [1e-06, 1), got 1.0"),
        (["--cdds-z", "0"], "--cdds-z: expected an int >= 1, got 0"),
        (["--cdds-sigma", "-0.5"], "--cdds-sigma: expected a finite number >= 0, got -0.5"),
        (["--cdds-enc-layers", "0"], "--cdds-enc-layers: expected an int >= 1, got 0"),
    ],
    ids=["a_f", "a_m", "tau_kl", "rho", "z", "sigma", "enc-layers"],
)
def test_train_refuses_nonsense_settings_before_open_clip_starts(
    flags, message, capsys, monkeypatch
):
    import open_clip_train.main as oc_main

    monkeypatch.setattr(oc_main, "main", lambda *a: pytest.fail("open_clip_train started"))
    assert train_main(["--model", TINY_MODEL, *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"cdds-fast train: {message}"


def test_train_refuses_heads_that_do_not_divide_the_model_dim(capsys, monkeypatch):
    """The head's width is the model's embedding dim (512 for ViT-B-32), known from its config
    before open_clip builds anything."""
    import open_clip_train.main as oc_main

    monkeypatch.setattr(oc_main, "main", lambda *a: pytest.fail("open_clip_train started"))
    assert train_main(["--model", "ViT-B-32", "--cdds-heads", "7"]) == 2
    assert capsys.readouterr().err.strip() == (
        "cdds-fast train: --cdds-heads: expected a divisor of the embedding dim 512 of --model "
        "ViT-B-32, got 7"
    )


def test_train_without_the_train_extra_names_it_in_one_line(tmp_path):
    """Without open_clip's training dependencies (braceexpand here), one line naming the extra
    and exit status 2, not a traceback."""
    code = (
        "import sys; sys.modules['braceexpand'] = None\n"
        "from cdds_fast.cli import main\n"
        "sys.exit(main(['train', '--model', 'ViT-B-32']))"
    )
    proc = _python(code, tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines == [
        "cdds-fast train: needs the 'train' extra (missing Python module "
        "'braceexpand'): pip install 'cdds-fast[train]', or from a clone: pip "
        "install '.[train]'"
    ]


# ---------------------------------------------------------------- cdds-fast demo
@pytest.mark.parametrize(
    "flags,message",
    [
        (["--sigma", "-1"], "--sigma: expected a finite number >= 0, got -1.0"),
        (["--z", "0"], "--z: expected an int >= 1, got 0"),
        (["--heads", "3"], "--heads: expected a divisor of the demo model's embed dim 64, got 3"),
    ],
    ids=["sigma", "z", "heads"],
)
def test_demo_refuses_nonsense_settings(flags, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(demo, "SceneCaptions", None, raising=False)  # no data work before it
    assert demo.main(["--quick", "--no-plot", "--out", str(tmp_path), *flags]) == 2
    assert capsys.readouterr().err.strip() == f"cdds-fast demo: {message}"
    assert not (tmp_path / "report.json").exists()


def test_demo_without_matplotlib_names_the_extra(tmp_path):
    code = (
        "import sys; sys.modules['matplotlib'] = None\n"
        "from cdds_fast.cli import main\n"
        f"sys.exit(main(['demo', '--quick', '--out', {str(tmp_path / 'out')!r}]))"
    )
    proc = _python(code, tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "cdds-fast demo: report.png needs the 'train' extra (missing Python module "
        "'matplotlib'): pip install 'cdds-fast[train]', or from a clone: pip install "
        "'.[train]' (or pass --no-plot)"
    ]


# ---------------------------------------------------------------- cdds-fast eval
def test_eval_takes_train_s_model_config_flag(tmp_path):
    config = tmp_path / "configs"
    config.mkdir()
    (config / "cdds-cli-flag-test.json").write_text(json.dumps(TINY_CONFIG))
    out = tmp_path / "r.json"
    assert (
        eval_main(
            [
                "--model",
                "cdds-cli-flag-test",
                "--cdds-model-config",
                str(config),
                "--embedded-size",
                "6",
                "--no-progress",
                "--json-out",
                str(out),
            ]
        )
        == 0
    )
    assert json.loads(out.read_text())["data"]["images"] == 6


def test_eval_csv_with_paths_relative_to_another_folder_hints_at_image_root(tmp_path, capsys):
    from cdds_fast.data import write_csv

    csv_path = write_csv(tmp_path / "data", "test", n=6, image_size=32)
    rows = csv_path.read_text().splitlines()
    relative = [rows[0]] + [row.replace(str(tmp_path / "data") + "/", "") for row in rows[1:]]
    (tmp_path / "data" / "rel.csv").write_text("\n".join(relative) + "\n")
    argv = [
        "--model",
        TINY_MODEL,
        "--cdds-model-config",
        str(tiny_config_dir()),
        "--csv",
        str(tmp_path / "data" / "rel.csv"),
        "--no-progress",
    ]
    assert eval_main(argv) == 2
    err = capsys.readouterr().err
    assert "image file 'test/000000.png' (first row) not found" in err
    assert "--image-root DIR" in err
    assert eval_main([*argv, "--image-root", str(tmp_path / "data")]) == 0


def _run_folder(root: Path, config_dir: Path, model_name: str) -> Path:
    """A run folder as cdds-fast train leaves it: checkpoints/epoch_1.pt and the side-car the
    launcher's own writer produces, for a model registered from ``config_dir``."""
    import open_clip

    from cdds_fast.open_clip import CDDSModel
    from cdds_fast.open_clip.train import build_parser, write_sidecar

    open_clip.add_model_config(config_dir)
    torch.manual_seed(0)
    head = dict(n_enc=1, n_dec=1, heads=HEADS, z=2, sigma=0.1)
    model = CDDSModel(open_clip.create_model(model_name), **head)
    checkpoints = root / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(
        {"epoch": 1, "state_dict": {"module." + k: v for k, v in model.state_dict().items()}},
        checkpoints / "epoch_1.pt",
    )
    cfg = build_parser().parse_args(
        [
            "--cdds-heads",
            str(HEADS),
            "--cdds-enc-layers",
            "1",
            "--cdds-dec-layers",
            "1",
            "--cdds-z",
            "2",
        ]
    )
    args = Namespace(
        model=model_name, pretrained="", precision="fp32", checkpoint_path=str(checkpoints)
    )
    write_sidecar(args, cfg)
    return root


def test_moved_run_folder_still_evaluates(tmp_path):
    """The side-car holds the model config itself: after the config file is gone and the run
    folder moved, a fresh process evaluates the checkpoint with no --model or config flag."""
    config_dir = tmp_path / "configs"
    config_dir.mkdir()
    name = "cdds-moved-run-test"
    (config_dir / f"{name}.json").write_text(json.dumps(TINY_CONFIG))
    run = _run_folder(tmp_path / "logs" / "run", config_dir, name)
    shutil.rmtree(config_dir)
    moved = tmp_path / "elsewhere" / "run"
    shutil.move(str(run), str(moved))
    code = (
        "import sys\nfrom cdds_fast.cli import main\n"
        "sys.exit(main(['eval', '--checkpoint', 'run/checkpoints/epoch_1.pt', "
        "'--embedded-size', '6', '--no-progress']))"
    )
    proc = _python(code, moved.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[cdds, features: semantic]" in proc.stdout and "rSum" in proc.stdout


def test_eval_tie_rule_is_stated_and_is_what_differs_from_open_clips_trainer(capsys):
    """Two images with identical captions: eval counts the tie in the query's favour (mean rank 1
    when every image's own caption is the best), open_clip's trainer breaks it by sort order, so
    one of the two gets rank 2. --help states the rule."""
    from open_clip_train.train import get_clip_metrics

    from cdds_fast.eval.retrieval import retrieval_metrics

    images = torch.eye(4)
    texts = images.clone()
    texts[1] = texts[0] = torch.nn.functional.normalize(images[0] + images[1], dim=0)
    ours = retrieval_metrics(images, texts, torch.arange(4))
    trainer = get_clip_metrics(images, texts, torch.tensor(1.0))
    assert ours["i2t_mean_rank"] == 1.0 and ours["i2t_r1"] == 100.0
    assert trainer["image_to_text_mean_rank"] == pytest.approx(1.25)
    assert trainer["image_to_text_R@1"] == pytest.approx(0.75)
    with pytest.raises(SystemExit):
        eval_main(["--help"])
    assert "".join(RANK_RULES.split()) in "".join(capsys.readouterr().out.split())
