"""``make demo`` = ``python -m recipes.demo``: the plug-and-play ablation's cpu profile and a table of its results."""

import re

import pytest

from recipes import demo
from recipes.ablate import load_ablation, run_ablation
from recipes.report import read_csv, read_markdown

from .helpers import ROOT


def test_make_demo_runs_the_recipes_demo():
    makefile = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^demo:.*\n((?:\t.*\n)+)", makefile, re.M).group(1)
    assert "-m recipes.demo" in recipe


def test_cpu_profile_is_small():
    """Every arm of the demo trains a small model for a few hundred steps at 64 px on the CPU."""
    spec, arms = load_ablation(demo.ABLATION, profile="cpu")
    assert [a.name for a in arms] == [a["name"] for a in spec["arms"]] and len(arms) == 9
    for arm in arms:
        trainer, data = arm.config["trainer"], arm.config["data"]["init_args"]
        assert trainer["accelerator"] == "cpu"
        steps = trainer["max_epochs"] * data["train_samples"] // data["batch_size"]
        assert steps <= 300 and data["image_size"] == 64
        assert any(c["class_path"].endswith("LabelledProgressBar") for c in trainer["callbacks"])


@pytest.mark.slow
def test_summary_prints_the_measured_rows(tmp_path, capsys):
    """The printed table is results.csv restricted to the shown columns (nothing is typed in by hand)."""
    result = run_ablation(demo.ABLATION, smoke=True, out=tmp_path, arms=["swin_hat_warm"])
    text = demo.summary(result, wall_s=12.0)
    assert "2 arms in 0.2 min" in text and str(tmp_path) in text
    table = tmp_path / "shown.md"
    table.write_text(text[text.index("| arm") :])
    shown = read_markdown(table)
    csv_rows = read_csv(tmp_path / "results.csv")
    assert [r["arm"] for r in shown] == ["swin", "swin_hat_warm"]
    assert list(shown[0]) == demo.SHOWN
    assert shown == [{k: row[k] for k in demo.SHOWN} for row in csv_rows]


def test_an_unknown_arm_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        demo.main(["--arms", "swn", "--out", str(tmp_path)])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "error: " in err and "no arms named ['swn']" in err and "Traceback" not in err
    assert not any(tmp_path.iterdir())  # nothing ran
