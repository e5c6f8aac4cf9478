"""hatplug.bench: CSV and markdown agree, ratios, the growth-exponent fit, skips, plot, CLI and presets.

Timings use timm's tiny ``test_*`` models (and FasterViT-0 at a small input) so the file runs in seconds.
They run on one thread: on a busy machine two OpenMP threads wait for each other at every op.
"""

from __future__ import annotations

import csv
import math

import pytest
import torch

from hatplug import bench
from hatplug.bench import (
    CSV_COLUMNS,
    SWEEP_COLUMNS,
    BenchResult,
    SweepPoint,
    benchmark,
    fit_growth_exponent,
    growth_exponents,
    plot_sweep,
    resolution_sweep,
    results_to_csv,
    results_to_markdown,
    sweep_to_csv,
    sweep_to_markdown,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TINY = dict(batch_size=1, img_size=64, warmup=0, repeats=3, iters=1)


def _markdown_rows(text: str) -> list[list[str]]:
    """Body rows of the first markdown table in ``text``, as stripped cells."""
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    rows = []
    for line in lines[2:]:
        if line.startswith("| model"):  # the next table begins
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_results() -> list[BenchResult]:
    return benchmark(["test_vit", "test_convnext", "faster_vit_0_any_res"], baseline="test_convnext", **TINY)


def test_benchmark_csv_and_markdown_agree(tiny_results, tmp_path):
    path = tmp_path / "out.csv"
    results_to_csv(tiny_results, path)
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == CSV_COLUMNS
        csv_rows = list(reader)
    md_rows = _markdown_rows(results_to_markdown(tiny_results))

    names = ["test_vit", "test_convnext", "faster_vit_0_any_res"]
    assert [r["model"] for r in csv_rows] == [r[0] for r in md_rows] == names
    for row, cells in zip(csv_rows, md_rows):
        # model, samples/s, step (ms), batch, img, params (M), ratio, spread: the same strings
        assert cells[:6] == [row[c] for c in CSV_COLUMNS[:6]]
        assert cells[6] == row["ratio_vs_baseline"] and cells[-1] == row["spread_pct"]
        assert (row["device"], row["amp"], row["channels_last"], row["compiled"]) == ("cpu", "none", "False", "False")
        assert (row["infer_batch_size"], row["infer_img_size"], row["repeats"]) == ("1", "64", "3")
        assert row["baseline"] == "test_convnext"
        sps, step = float(row["infer_samples_per_sec"]), float(row["infer_step_time"])
        assert sps > 0 and step == pytest.approx(1000.0 / sps, rel=1e-2)

    by_model = {r["model"]: r for r in csv_rows}
    assert by_model["test_convnext"]["ratio_vs_baseline"] == "1.000"


def test_csv_alone_reproduces_the_ratios(tiny_results, tmp_path):
    # the ratios are medians of per-repeat ratios, which the medians in the CSV cannot give: every repeat is
    # written, and a column per peer
    path = tmp_path / "peers.csv"
    results_to_csv(tiny_results, path, peers=["test_vit", "not_measured"])
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == CSV_COLUMNS + ["ratio_vs_test_vit"]
        rows = {r["model"]: r for r in reader}
    runs = {name: [float(v) for v in row["samples_per_sec_runs"].split(";")] for name, row in rows.items()}
    for name, row in rows.items():
        assert len(runs[name]) == int(row["repeats"]) == 3
        assert float(row["infer_samples_per_sec"]) == pytest.approx(sorted(runs[name])[1], abs=6e-3)
        for column, other in (("ratio_vs_baseline", "test_convnext"), ("ratio_vs_test_vit", "test_vit")):
            paired = sorted(a / b for a, b in zip(runs[name], runs[other]))[1]  # median of three
            assert float(row[column]) == pytest.approx(paired, abs=1.5e-3), (name, column)


def test_ratios_are_paired_per_repeat(tiny_results):
    vit, convnext, fastervit = tiny_results
    assert convnext.ratio_vs_baseline == 1.0
    expected = sorted(a / b for a, b in zip(vit.samples_per_sec_runs, convnext.samples_per_sec_runs))[1]
    assert vit.ratio_vs_baseline == pytest.approx(expected)
    assert vit.ratio_to(vit) == 1.0
    assert vit.param_count == pytest.approx(
        sum(p.numel() for p in bench.build_model("test_vit", 64).parameters()) / 1e6
    )


def test_peer_columns_in_markdown(tiny_results):
    text = results_to_markdown(tiny_results, peers=["test_convnext", "test_vit"])
    header = text.splitlines()[0]
    assert "x test_convnext" in header and "x test_vit" in header
    vit_row = _markdown_rows(text)[0]
    assert vit_row[7] == "1.000"  # test_vit against itself


def test_round_robin_visits_every_position():
    names = ["a", "b", "c"]
    firsts = [bench._round_robin(names, r)[0] for r in range(3)]
    assert sorted(firsts) == names
    assert all(sorted(bench._round_robin(names, r)) == names for r in range(5))


def test_benchmark_rejects_bad_arguments():
    with pytest.raises(ValueError, match="baseline"):
        benchmark(["test_vit"], baseline="test_convnext", **TINY)
    with pytest.raises(ValueError, match="did you mean"):
        benchmark(["test_vitt"], **TINY)


def test_models_outside_timm_by_import_path(tmp_path, monkeypatch):
    (tmp_path / "my_peers.py").write_text(
        "import torch.nn as nn\n"
        "SIZES = []\n"
        "def tiny(img_size=None):\n"
        "    SIZES.append(img_size)\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 3, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))\n"
        "def not_a_model(img_size=None):\n"
        "    return 'model'\n"
        "def sizeless():\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 3, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten())\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    rows = benchmark(["test_convnext", "my_peers:tiny"], **TINY)
    assert [r.model for r in rows] == ["test_convnext", "my_peers:tiny"]
    assert rows[1].param_count == pytest.approx((3 * 4 * 9 + 4 + 4 * 2 + 2) / 1e6)
    assert rows[1].ratio_vs_baseline > 0 and len(rows[1].samples_per_sec_runs) == TINY["repeats"]
    import my_peers

    calls = my_peers.SIZES
    assert calls == [TINY["img_size"]]  # called once, with the run's input size
    # a function without img_size builds its own size (as timm models without the argument do); it was
    # called with img_size= and failed with advice to change the size
    assert benchmark(["my_peers:sizeless"], **TINY)[0].param_count == pytest.approx((3 * 4 * 9 + 4) / 1e6)
    with pytest.raises(ValueError, match="cannot import 'no_such_module'"):
        benchmark(["no_such_module:tiny"], **TINY)
    with pytest.raises(ValueError, match="has no function 'missing'"):
        benchmark(["my_peers:missing"], **TINY)
    with pytest.raises(bench.BenchInputError, match=r"my_peers:not_a_model cannot run .*returned str, not an nn"):
        benchmark(["my_peers:not_a_model"], **TINY)
    with pytest.raises(ValueError, match="unknown model name.*package.module:function"):
        benchmark(["hf-hub:timm/vit_tiny_patch16_224"], **TINY)  # a hub name, not an import path


@pytest.mark.parametrize("power", [0.5, 1.0, 2.0])
def test_growth_exponent_recovers_power_law(power):
    pixels = [s * s for s in (224, 320, 448, 640, 800, 1024)]
    times = [3.7 * p**power for p in pixels]
    assert fit_growth_exponent(pixels, times) == pytest.approx(power, abs=1e-6)


def test_growth_exponent_needs_two_sizes():
    assert math.isnan(fit_growth_exponent([100], [1.0]))
    assert math.isnan(fit_growth_exponent([100, 100], [1.0, 2.0]))


def test_growth_exponents_ignore_skipped_points():
    points = [SweepPoint("m", s, 1, ms_per_image_runs=[s * s * 1e-3]) for s in (100, 200, 400)]
    points.append(SweepPoint("m", 800, 1, skipped="RuntimeError: too big"))
    points.append(SweepPoint("never", 100, 1, skipped="AssertionError: no"))
    fits = growth_exponents(points)
    assert fits["m"] == pytest.approx(1.0, abs=1e-6)
    assert math.isnan(fits["never"])


@pytest.fixture(scope="module")
def sweep_points() -> list[SweepPoint]:
    # test_vit has 16-pixel patches: 40 is not a multiple and must be skipped, not crash the sweep
    return resolution_sweep(["test_convnext", "test_vit"], [32, 40, 64], warmup=0, repeats=2, iters=2)


def test_sweep_records_skips_and_normalises(sweep_points):
    by_key = {(p.model, p.img_size): p for p in sweep_points}
    assert len(sweep_points) == 6
    skipped = by_key[("test_vit", 40)]
    assert skipped.skipped.startswith("AssertionError") and "patch size" in skipped.skipped
    assert math.isnan(skipped.ms_per_image)
    assert not by_key[("test_convnext", 40)].skipped
    for name in ("test_convnext", "test_vit"):
        assert by_key[(name, 32)].cost_per_pixel_rel == 1.0
        small, big = by_key[(name, 32)], by_key[(name, 64)]
        assert len(big.ms_per_image_runs) == len(small.ms_per_image_runs) == 2
        paired = [(t / 64**2) / (t0 / 32**2) for t, t0 in zip(big.ms_per_image_runs, small.ms_per_image_runs)]
        assert big.cost_per_pixel_rel == pytest.approx(math.sqrt(paired[0] * paired[1]))  # log-scale median of 2


def test_sweep_csv_markdown_and_plot(sweep_points, tmp_path):
    sweep_to_csv(sweep_points, tmp_path / "sweep.csv")
    with open(tmp_path / "sweep.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == SWEEP_COLUMNS
        rows = list(reader)
    text = sweep_to_markdown(sweep_points)
    md = {(r[0], r[1]): r for r in _markdown_rows(text)}
    assert len(rows) == len(md) == 6
    for row in rows:
        cells = md[(row["model"], row["img_size"])]
        assert cells[3:7] == [row["ms_per_image"], row["ms_per_megapixel"], row["cost_per_pixel_rel"], row["skipped"]]
    assert "growth exponent" in text and "patch size" in text
    measured = {(r["model"], r["img_size"]): r for r in rows if not r["skipped"]}
    for (name, _), row in measured.items():  # the relative cost, recomputed from the CSV's own repeats
        runs = [float(v) for v in row["ms_per_image_runs"].split(";")]
        ref = [float(v) for v in measured[(name, "32")]["ms_per_image_runs"].split(";")]
        paired = [(t / int(row["pixels"])) / (t0 / 32**2) for t, t0 in zip(runs, ref)]
        assert float(row["cost_per_pixel_rel"]) == pytest.approx(math.sqrt(paired[0] * paired[1]), abs=1.5e-3)

    plot_sweep(sweep_points, tmp_path / "plots" / "sweep.png", title="test")
    data = (tmp_path / "plots" / "sweep.png").read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 10_000


def test_cli_writes_csv_and_markdown(tmp_path, capsys):
    out_csv, out_md = tmp_path / "r.csv", tmp_path / "r.md"
    argv = [
        "--models",
        "test_vit,test_convnext",
        "--baseline",
        "test_convnext",
        "--img-size",
        "64",
        "--batch-size",
        "2",
    ]
    argv += ["--warmup", "0", "--repeats", "1", "--iters", "1", "--csv", str(out_csv), "--markdown", str(out_md)]
    argv += ["--threads", "2"]
    assert bench.main(argv) == 0
    assert torch.get_num_threads() == 1  # restored
    printed = capsys.readouterr().out
    report = out_md.read_text()
    assert printed.strip() == report.strip()
    for key in ("- cpu:", "- cores:", "- torch:", "- torch_threads: 2", "- date:", "batch=2"):
        assert key in report
    with open(out_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["model"] for r in rows] == [r[0] for r in _markdown_rows(report)]


def test_cli_presets_and_overrides():
    parser = bench._parser()
    s = bench._resolve(parser.parse_args(["--preset", "cpu", "--repeats", "3"]), parser)
    assert s["repeats"] == 3 and s["batch_size"] == 16 and s["baseline"] == bench.SWIN_T
    assert s["models"][:3] == ["faster_vit_0_224", "faster_vit_1_224", "faster_vit_2_224"]
    s = bench._resolve(parser.parse_args(["--preset", "gpu", "--no-channels-last"]), parser)
    assert s["channels_last"] is False and s["amp"] == "fp16" and s["device"] == "cuda"
    s = bench._resolve(parser.parse_args(["--sweep", "224,320"]), parser)
    assert s["batch_size"] == 1 and s["sweep_models"] == bench.PRESETS["sweep"]["sweep_models"]
    with pytest.raises(SystemExit):
        bench._resolve(parser.parse_args(["--plot", "x.png"]), parser)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown when there is no GPU")
def test_gpu_preset_without_gpu_fails_clearly(capsys):
    assert bench.main(["--preset", "gpu"]) == 2
    assert "torch.cuda.is_available() is False" in capsys.readouterr().err
    with pytest.raises(bench.DeviceUnavailableError, match="--preset cpu"):
        benchmark(["test_vit"], device="cuda", **TINY)


def test_sizes_parse_and_label():
    assert bench.parse_size("224") == 224
    assert bench.parse_size(" 800x1333 ") == (800, 1333)
    assert bench.parse_size("320X320") == 320  # a square is one size however it is written
    assert bench.size_label((224, 448)) == "224x448" and bench.size_label(224) == "224"
    for bad in ("224x", "x224", "abc", "0", "1x2x3", "-5", "224x-1"):
        with pytest.raises(ValueError, match="height x width"):
            bench.parse_size(bad)
    with pytest.raises(SystemExit):
        bench._parser().parse_args(["--img-size", "224x"])


def test_non_square_throughput_and_sweep(tmp_path, monkeypatch):
    (tmp_path / "shape_peers.py").write_text(
        "import torch.nn as nn\n"
        "SEEN = set()\n"
        "class Probe(nn.Conv2d):\n"
        "    def forward(self, x):\n"
        "        SEEN.add(tuple(x.shape[2:]))\n"
        "        return super().forward(x)\n"
        "def probe(img_size=None):\n"
        "    return nn.Sequential(Probe(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import shape_peers

    rows = benchmark(["shape_peers:probe", "faster_vit_0_any_res"], **{**TINY, "img_size": (64, 96)})
    seen = shape_peers.SEEN
    assert seen == {(64, 96)}
    assert [r.as_row()["infer_img_size"] for r in rows] == ["64x96", "64x96"]

    points = resolution_sweep(["faster_vit_0_any_res"], [(96, 64), 64, (64, 96), 96], warmup=0, repeats=2, iters=2)
    assert [p.img_size for p in points] == [64, (64, 96), (96, 64), 96]  # by pixels, then height x width
    assert [p.pixels for p in points] == [64 * 64, 64 * 96, 64 * 96, 96 * 96]
    assert not any(p.skipped for p in points) and points[0].cost_per_pixel_rel == 1.0
    text = sweep_to_markdown(points)
    assert {r[1] for r in _markdown_rows(text)} == {"64", "64x96", "96x64", "96"}
    assert "| faster_vit_0_any_res | " in text and "| 96 |" in text  # the largest size in the fit table
    plot_sweep(points, tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").read_bytes()[:8] == PNG_SIGNATURE

    out = tmp_path / "r.csv"
    argv = ["--models", "shape_peers:probe", "--img-size", "32x48", "--batch-size", "1", "--warmup", "0"]
    assert bench.main([*argv, "--repeats", "1", "--iters", "1", "--csv", str(out)]) == 0
    with open(out, newline="") as f:
        assert next(csv.DictReader(f))["infer_img_size"] == "32x48"
    assert (32, 48) in shape_peers.SEEN


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--sweep", "64", "--models", "test_vit"], "--models is not used with --sweep; use --sweep-models"),
        (["--sweep", "64", "--img-size", "64"], "--img-size is not used with --sweep; use --sweep"),
        (["--sweep", "64", "--baseline", "test_vit"], "--baseline is not used with --sweep"),
        (["--models", "test_vit,test_convnext", "--peers", "swin_foo"], "--peers swin_foo: not among"),
        (["--threads", "0"], "--threads must be at least 1, got 0"),
        (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
        (["--repeats", "-1"], "--repeats must be at least 1"),
        (["--warmup", "-1"], "--warmup must be at least 0"),
        (["--preset", "cpu", "--sweep", "64,96"], "--sweep with --preset cpu: that preset measures throughput"),
        (["--csv", "/proc/no_such_folder/x.csv"], "--csv /proc/no_such_folder/x.csv: cannot create its folder"),
        (["--markdown", "."], "--markdown .: is a folder; give a file name"),
        (["--csv", "r.out", "--markdown", "./r.out"], "--csv and --markdown name the same file"),
        (["--csv", f"{__file__}/x.csv"], f"--csv {__file__}/x.csv: cannot create its folder ({__file__} is a file)"),
        (["--csv", "/proc/x.csv"], "--csv /proc/x.csv: its folder /proc is not writable ("),  # os.access says yes
    ],
)
def test_cli_refuses_arguments_it_would_ignore_or_cannot_use(argv, message, capsys):
    parser = bench._parser()
    with pytest.raises(SystemExit):
        bench._resolve(parser.parse_args(argv), parser)
    assert message in capsys.readouterr().err


def test_cli_preset_peer_columns_follow_the_models():
    parser = bench._parser()
    s = bench._resolve(parser.parse_args(["--preset", "cpu", "--models", "faster_vit_0_224,convnext_tiny"]), parser)
    assert s["peers"] == ["convnext_tiny"]
    assert s["baseline"] is None  # the preset's Swin-T is not benchmarked: the first model is the baseline
    with pytest.raises(SystemExit):
        parser.parse_args(["--sweep", ""])


def test_cli_input_errors_exit_2_with_the_message(capsys):
    quick = ["--batch-size", "1", "--repeats", "1", "--iters", "1", "--threads", "1"]
    cases = [
        (["--models", "test_vit,nosuchmodel", "--img-size", "64"], "unknown model name(s): 'nosuchmodel'"),
        (["--models", "test_vit", "--baseline", "test_convnext"], "baseline 'test_convnext' is not among"),
        (["--models", "test_vit,test_convnext", "--img-size", "50"], "test_vit cannot run a batch of 1 at 50"),
        (["--preset", "cpu", "--models", "test_convnext", "--img-size", "64"], None),  # runs, against its model
        (["--models", "test_vit:unfuse"], "did you mean 'test_vit:unfused'"),  # not "put it on PYTHONPATH"
    ]
    for argv, message in cases:
        status = bench.main(argv + quick)
        err = capsys.readouterr().err
        if message is None:
            assert status == 0, err
        else:
            assert status == 2 and message in err and "Traceback" not in err


def test_paired_ratios_are_reciprocal_with_an_even_number_of_repeats():
    a = BenchResult("a", [100.0, 100.0], 1, 224, 1.0, "cpu", "none", False, False, 1, "a")
    b = BenchResult("b", [50.0, 300.0], 1, 224, 1.0, "cpu", "none", False, False, 1, "a")
    assert a.ratio_to(b) * b.ratio_to(a) == pytest.approx(1.0)
    assert b.ratio_to(a) == pytest.approx(math.sqrt(0.5 * 3.0))  # the two per-repeat ratios, log-scale median


def test_sweep_skips_whatever_a_model_raises_and_says_n_a_for_one_size(tmp_path, monkeypatch):
    (tmp_path / "picky_peers.py").write_text(
        "import torch\n"
        "class Picky(torch.nn.Module):\n"
        "    def forward(self, x):\n"
        "        if x.shape[-1] > 40:\n"
        "            raise IndexError('too wide for this model')\n"
        "        return x.mean((2, 3))\n"
        "def make(img_size=None):\n"
        "    return Picky()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    points = resolution_sweep(["picky_peers:make", "test_convnext"], [32, 48], warmup=0, repeats=1, iters=1)
    skipped = [p for p in points if p.skipped]
    assert [(p.model, p.img_size) for p in skipped] == [("picky_peers:make", 48)]
    assert skipped[0].skipped == "IndexError: too wide for this model"
    fits = dict((row[0], row[1]) for row in _markdown_rows(sweep_to_markdown(points).split("\n\n")[1]))
    assert fits["picky_peers:make"] == "n/a (fewer than 2 measured sizes with distinct pixel counts)"
    assert math.isfinite(float(fits["test_convnext"]))  # the peer that ran at both sizes has its exponent


def test_ratio_columns_use_full_names_when_short_ones_collide():
    runs = [BenchResult(n, [10.0], 1, 224, 1.0, "cpu", "none", False, False, 1, "vit_tiny_patch16_224")
            for n in ("vit_tiny_patch16_224", "vit_tiny_patch16_384")]  # fmt: skip
    header = results_to_markdown(runs, peers=["vit_tiny_patch16_384", "vit_tiny_patch16_384"]).splitlines()[0]
    assert "x vit_tiny_patch16_224" in header and header.count("x vit_tiny_patch16_384") == 1
    # the baseline alone: "x vit_tiny" would fit both rows of the table, so the full name is used
    assert "x vit_tiny_patch16_224" in results_to_markdown(runs).splitlines()[0]


def test_a_sweep_where_nothing_runs_is_an_error(tmp_path, capsys):
    """Every (model, size) pair skipped: exit 2 with the reasons, not an empty table, CSV and plot with status 0."""
    argv = ["--sweep", "33,40", "--sweep-models", "test_vit", "--batch-size", "1", "--repeats", "1", "--iters", "1",
            "--warmup", "0", "--csv", str(tmp_path / "s.csv"), "--plot", str(tmp_path / "s.png")]  # fmt: skip
    assert bench.main(argv) == 2
    err = capsys.readouterr().err
    assert "no (model, size) pair of the sweep could run: test_vit at 33: " in err and "test_vit at 40: " in err
    assert not (tmp_path / "s.csv").exists() and not (tmp_path / "s.png").exists()


def test_device_names_are_checked():
    cases = [("gpu", "not a device name: use cpu, cuda or cuda:N"), ("meta", "cpu and cuda devices only")]
    for device, message in cases:
        with pytest.raises(bench.DeviceUnavailableError, match=message):
            benchmark(["test_vit"], device=device, **TINY)


def test_sweep_plot_labels_latency_within_a_decade_and_names_each_reference():
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    def points(sizes_by_model):
        pts = [SweepPoint(m, s, 1, ms_per_image_runs=[88 + s / 4]) for m, ss in sizes_by_model.items() for s in ss]
        bench._fill_relative_cost(pts)
        return pts

    fig = bench.sweep_figure(points({"a": [224, 320], "b": [224, 320]}))
    FigureCanvasAgg(fig).draw()
    latency, cost = fig.axes
    low, high = latency.get_ylim()
    labels = [t for t in latency.get_yticklabels() + latency.get_yticklabels(minor=True)
              if t.get_text() and low <= t.get_position()[1] <= high]  # fmt: skip
    assert labels, "no number on the latency axis of a sweep that spans less than a decade"
    assert cost.get_ylabel() == "time per pixel, relative to 224 px"
    assert latency.get_legend() is not None
    fig = bench.sweep_figure(points({"a": [224, 320], "b": [320, 448]}))
    assert fig.axes[1].get_ylabel() == "time per pixel, relative to each model's smallest measured size"
    # latencies of 1.3 to 36 ms: powers of ten alone labelled only "10"
    pts = [SweepPoint("a", s, 1, ms_per_image_runs=[ms]) for s, ms in ((224, 1.3), (448, 6.0), (896, 36.0))]
    bench._fill_relative_cost(pts)
    fig = bench.sweep_figure(pts)
    FigureCanvasAgg(fig).draw()
    latency = fig.axes[0]
    low, high = latency.get_ylim()
    shown = {t.get_text() for t in latency.get_yticklabels() if t.get_text() and low <= t.get_position()[1] <= high}
    assert len(shown) >= 4, shown


def test_output_folders_are_made_when_written_not_when_checked(tmp_path, capsys):
    """A run refused after the flags were checked (a misspelt model) leaves no empty output folder behind; a run
    that writes makes the folders it needs."""
    quick = ["--batch-size", "1", "--repeats", "1", "--iters", "1", "--warmup", "0", "--img-size", "32"]
    assert bench.main(["--models", "test_resnt", "--csv", str(tmp_path / "never" / "x.csv"), *quick]) == 2
    assert "unknown model name(s): 'test_resnt'" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()
    assert bench.main(["--models", "test_resnet", "--csv", str(tmp_path / "a" / "b" / "x.csv"), *quick]) == 0
    assert (tmp_path / "a" / "b" / "x.csv").is_file()


def test_csv_records_the_torch_threads_of_the_run(tmp_path):
    """1-thread and 2-thread CSVs were indistinguishable (the count was only in the markdown header)."""
    quick = ["--models", "test_resnet", "--batch-size", "1", "--repeats", "1", "--iters", "1", "--img-size", "32"]
    for threads in (1, 2):
        out = tmp_path / f"t{threads}.csv"
        assert bench.main([*quick, "--threads", str(threads), "--csv", str(out)]) == 0
        with open(out) as f:
            assert [row["torch_threads"] for row in csv.DictReader(f)] == [str(threads)]
    out = tmp_path / "sweep.csv"
    argv = ["--sweep", "32", "--sweep-models", "test_resnet", "--threads", "2", "--repeats", "1", "--csv", str(out)]
    assert bench.main(argv) == 0
    with open(out) as f:
        assert [row["torch_threads"] for row in csv.DictReader(f)] == ["2"]
