"""``cdds-fast demo``: the --quick run end to end, and its building blocks."""

from __future__ import annotations

import json
import math

import pytest
import torch

from cdds_fast import demo
from cdds_fast.contract import LOSS_KEYS
from cdds_fast.dispatch import resolve_backend

TERMS = LOSS_KEYS  # the loss terms each run logs
METRICS = (
    "i2t_r1",
    "i2t_r5",
    "i2t_r10",
    "t2i_r1",
    "t2i_r5",
    "t2i_r10",
    "i2t_mean_rank",
    "t2i_mean_rank",
    "rsum",
)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """The default ``--backend auto`` on CUDA (the kernels); on CPU the reference, since the test
    runs set TRITON_INTERPRET=1 and the interpreter would take the run from seconds to a minute
    (the kernels' parity has its own tests)."""
    out = tmp_path_factory.mktemp("demo_out")
    backend = "auto" if torch.cuda.is_available() else "reference"
    rc = demo.main(["--quick", "--out", str(out), "--no-progress", "--backend", backend])
    return rc, out


def test_quick_demo_writes_report(quick_run, capsys):
    rc, out = quick_run
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    for key in ("config", "data", "losses", "metrics", "timings", "versions", "device", "table"):
        assert key in report, key
    cfg, data = report["config"], report["data"]
    steps = cfg["steps"]
    assert cfg["quick"] and steps == demo.QUICK["steps"]
    device = torch.device(report["device"]["device"])
    assert cfg["backend"] == resolve_backend(
        "auto" if device.type == "cuda" else "reference", device, torch.float32
    )
    assert set(cfg["cdds_head"]) >= {"z", "n_enc", "n_dec", "heads", "sigma"}
    assert cfg["params"]["cdds"] > cfg["params"]["clip"]

    # per-step losses: the clip run's total, the five CDDS terms summing to the CDDS total
    clip_l, cdds_l = report["losses"]["clip"], report["losses"]["cdds"]
    assert len(clip_l["loss"]) == steps and len(cdds_l["loss"]) == steps
    for term in TERMS:
        assert len(cdds_l[term]) == steps
        assert all(math.isfinite(v) for v in cdds_l[term])
    for n in range(steps):
        assert cdds_l["loss"][n] == pytest.approx(sum(cdds_l[t][n] for t in TERMS), rel=1e-5)
    assert all(math.isfinite(v) and v > 0 for v in clip_l["loss"])
    assert len(clip_l["lr"]) == steps and max(clip_l["lr"]) <= cfg["lr"] + 1e-12

    # metrics in range, for the three columns
    n_img, n_txt = data["test_images"], data["test_captions"]
    assert n_txt == 5 * n_img
    assert set(report["metrics"]) == {"untrained", "clip", "cdds"}
    for name, m in report["metrics"].items():
        for key in METRICS:
            assert key in m, (name, key)
        for key in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"):
            assert 0.0 <= m[key] <= 100.0
        assert m["i2t_r1"] <= m["i2t_r5"] <= m["i2t_r10"]
        assert m["t2i_r1"] <= m["t2i_r5"] <= m["t2i_r10"]
        assert 0.0 <= m["rsum"] <= 600.0
        assert 1.0 <= m["t2i_mean_rank"] <= n_img
        assert 1.0 <= m["i2t_mean_rank"] <= n_txt

    t = report["timings"]
    assert t["s_per_step"]["clip"] > 0 and t["s_per_step"]["cdds"] > 0
    assert len(t["step_s"]["cdds"]) == steps
    assert t["total_s"] >= t["train_s"]["clip"] + t["train_s"]["cdds"]
    assert report["versions"]["torch"] == torch.__version__
    assert report["device"]["device"] == "cpu" or report["device"]["device"].startswith("cuda")

    png = (out / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_table_rows():
    metrics = {"untrained": {"i2t_r1": 0.5, "rsum": 9.0}, "clip": {"i2t_r1": 12.25, "rsum": 300.0}}
    table = demo.format_report_table(metrics, {"clip": 0.1234})
    lines = table.splitlines()
    assert len({len(line) for line in lines}) == 1  # aligned
    assert lines[0].split("|")[1:3] == [" metric         ", " untrained "]
    assert "I->T R@1" in table and "rSum" in table and "T->I mean rank" in table
    assert lines[-1].startswith("| s / train step") and lines[-1].rstrip(" |").endswith("0.123")


def test_no_plot_and_ablation(tmp_path):
    argv = [
        "--quick",
        "--steps",
        "2",
        "--train-images",
        "16",
        "--test-images",
        "10",
        "--batch-size",
        "8",
        "--out",
        str(tmp_path),
        "--no-plot",
        "--no-progress",
        "--ablation",
        "--threads",
        "1",
        "--z",
        "1",
    ]
    assert demo.main(argv) == 0
    assert (tmp_path / "report.json").exists() and not (tmp_path / "report.png").exists()
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["config"]["steps"] == 2 and report["data"]["test_images"] == 10
    assert report["config"]["threads"] == 1 and report["config"]["cdds_head"]["z"] == 1
    assert set(report["metrics"]) == {"untrained", "clip", "cdds", "head-only"}
    assert len(report["losses"]["head-only"]["loss"]) == 2
    assert "contrastive_loss" in report["losses"]["head-only"]  # the InfoNCE's own term name
    # the ablation shares the CDDS architecture
    assert report["config"]["params"]["head-only"] == report["config"]["params"]["cdds"]


def test_chance_metrics():
    ch = demo.chance_metrics(500)
    assert ch["t2i_r1"] == pytest.approx(0.2) and ch["t2i_r10"] == pytest.approx(2.0)
    assert ch["i2t_r1"] == pytest.approx(0.2)
    assert ch["i2t_r10"] == pytest.approx(100 * (1 - math.comb(2495, 10) / math.comb(2500, 10)))
    assert ch["t2i_mean_rank"] == pytest.approx(250.5)
    assert ch["i2t_mean_rank"] == pytest.approx(2501 / 6)
    assert ch["rsum"] == pytest.approx(6.38, abs=0.01)
    # Monte Carlo check of the I->T formulas on a small split
    gen = torch.Generator().manual_seed(0)
    n, trials = 8, 4000
    t2i = torch.arange(n).repeat_interleave(5)
    hits, ranks = 0, 0.0
    for _ in range(trials):
        scores = torch.rand(5 * n, generator=gen)
        best = scores[t2i == 0].max()
        rank = 1 + int((scores > best).sum())
        hits += rank <= 5
        ranks += rank
    small = demo.chance_metrics(n)
    assert 100 * hits / trials == pytest.approx(small["i2t_r5"], abs=2.5)
    assert ranks / trials == pytest.approx(small["i2t_mean_rank"], abs=0.3)


def test_choose_threads(monkeypatch):
    assert demo.choose_threads(3) == 3
    with pytest.raises(ValueError, match="--threads"):
        demo.choose_threads(0)
    monkeypatch.setattr(demo.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(demo.torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(demo.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert demo.choose_threads() == 2
    monkeypatch.setattr(demo.os, "getloadavg", lambda: (0.1, 0.0, 0.0))
    assert demo.choose_threads() == 1  # a busy core is never shared by a compute thread
    monkeypatch.setattr(demo.os, "cpu_count", lambda: 8)
    monkeypatch.setattr(demo.torch, "get_num_threads", lambda: 8)
    monkeypatch.setattr(demo.os, "getloadavg", lambda: (2.5, 0.0, 0.0))
    assert demo.choose_threads() == 5
    monkeypatch.setattr(demo.os, "getloadavg", lambda: (7.0, 0.0, 0.0))
    assert demo.choose_threads() == 1


@pytest.mark.parametrize("backend", ["auto", "reference", "triton"])
def test_backend_is_the_library_rule(backend):
    """``--backend`` resolves as the losses resolve it (dispatch.resolve_backend: under
    TRITON_INTERPRET=1 "auto" on CPU is the interpreter), not by a rule of the demo's own."""
    args = demo.build_parser().parse_args(["--quick", "--device", "cpu", "--backend", backend])
    expected = resolve_backend(backend, torch.device("cpu"), torch.float32)
    assert demo._run_settings(args).backend == expected


def test_bad_arguments(tmp_path, capsys):
    argv = ["--quick", "--batch-size", "200", "--out", str(tmp_path), "--no-progress", "--no-plot"]
    assert demo.main(argv) == 2
    assert "--batch-size 200" in capsys.readouterr().err
    assert demo.main(["--quick", "--steps", "-1", "--out", str(tmp_path)]) == 2


def test_batch_schedule_distinct_images_and_deterministic():
    a = demo.batch_schedule(50, 5, 16, 10, seed=3)
    b = demo.batch_schedule(50, 5, 16, 10, seed=3)
    assert len(a) == 10
    for (ia, ca), (ib, cb) in zip(a, b, strict=True):
        assert torch.equal(ia, ib) and torch.equal(ca, cb)
        assert len(set(ia.tolist())) == 16  # no two captions of one image in a batch
        assert int(ca.min()) >= 0 and int(ca.max()) < 5
    # every pass over the split covers each image at most once: the first 3 batches are disjoint
    first = torch.cat([idx for idx, _ in a[:3]])
    assert len(set(first.tolist())) == 48
    c = demo.batch_schedule(50, 5, 16, 10, seed=4)
    assert not torch.equal(a[0][0], c[0][0])


def test_lr_schedule():
    lrs = [demo.lr_at(s, 1.0, 10, 100) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0)
    assert all(x >= y for x, y in zip(lrs[10:], lrs[11:], strict=False))  # cosine decay
    assert lrs[-1] < 1e-3


def test_optimizer_groups():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt = demo.make_optimizer(model, 1e-3, 0.1)
    no_wd, wd = opt.param_groups
    assert no_wd["weight_decay"] == 0.0 and wd["weight_decay"] == 0.1
    assert len(wd["params"]) == 1 and wd["params"][0] is model[0].weight
    assert len(no_wd["params"]) == 3


def test_cli_dispatch(tmp_path):
    from cdds_fast.cli import main

    argv = [
        "demo",
        "--quick",
        "--steps",
        "1",
        "--train-images",
        "8",
        "--test-images",
        "6",
        "--batch-size",
        "4",
        "--out",
        str(tmp_path),
        "--no-plot",
        "--no-progress",
    ]
    assert main(argv) == 0
    assert (tmp_path / "report.json").exists()
