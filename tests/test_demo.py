"""The demo and the sweep, end to end on scikit-learn's digits (embedded, 8x8) with
tiny settings: the folder layout, progress lines, re-runs that skip finished
stages, a resumed stage, refusing to mix experiments, a missing defense, and the CLI."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
import yaml

from unbackdoor.cli.display import StageDisplay
from unbackdoor.core.errors import UnbackdoorError
from unbackdoor.experiment.run import run_experiment
from unbackdoor.experiment.spec import ExperimentSpec, load_experiment_configs
from unbackdoor.training.engine import EngineOptions

FP32 = EngineOptions(device="cpu", precision="fp32", progress=False)
TINY_YAML = {
    "train": {"epochs": 2},
    "dbd": {"simclr": {"epochs": 1, "batch_size": 128}, "linear": {"epochs": 1},
            "mixmatch": {"epochs": 1, "iterations": 3, "batch_size": 32}, "polish": {"epochs": 1}},
    "bcu": {"epochs": 2, "batch_size": 64},
}


def tiny_configs(tmp: Path) -> dict:
    f = tmp / "tiny.yaml"
    f.write_text(yaml.safe_dump(TINY_YAML))
    return load_experiment_configs(f, "quick")


def run(out: Path, spec: ExperimentSpec, configs: dict, **kw) -> tuple[dict, str]:
    buf = io.StringIO()
    res = run_experiment(out, spec, engine=FP32, configs=configs, display=StageDisplay(0, file=buf), **kw)
    return res, buf.getvalue()


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("demo")
    configs = tiny_configs(tmp)
    out = tmp / "out"
    res, log = run(out, ExperimentSpec(dataset="digits"), configs, embed_points=100)
    return out, res, log, configs


def test_layout_progress_and_evaluation(experiment):
    out, res, log, _ = experiment
    for p in ("data/train.npz", "undefended/model.json", "dbd/model.json", "dbd/detection.csv", "bcu/model.json",
              "report.html", "report.md", "summary.json", "evaluation.json", "experiment.json"):
        assert (out / p).is_file(), p
    assert [r["role"] for r in res["rows"]] == ["undefended", "dbd", "bcu"]
    for stage in ("[1/6] poison", "[2/6] train undefended model", "[3/6] DBD", "[4/6] BCU", "[5/6] evaluate", "[6/6] report"):
        assert stage in log, stage
    assert "ETA" in log  # DBD's stage bar
    ev = json.loads((out / "evaluation.json").read_text())
    assert set(ev) == {"undefended", "dbd", "bcu"}
    assert all(v["mismatch"] == [] for v in ev.values()), ev
    # The report's numbers are the runs' numbers.
    summary = json.loads((out / "summary.json").read_text())
    assert [r["clean_accuracy"] for r in summary["rows"]] == [r["clean_accuracy"] for r in res["rows"]]
    und, dbd = res["rows"][0], res["rows"][1]
    assert und["attack_success_rate"] is not None and dbd["der"] is not None


def test_rerun_skips_every_finished_stage(experiment):
    out, res, _, configs = experiment
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/metrics.json")}
    report_stamp = (out / "report.html").stat().st_mtime_ns
    res2, log = run(out, ExperimentSpec(dataset="digits"), configs)
    assert log.count("done already") == 5, log  # poison, undefended, DBD, BCU, evaluate
    assert "[6/6] report — up to date" in log
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/metrics.json")} == stamps
    assert (out / "report.html").stat().st_mtime_ns == report_stamp
    assert res2["rows"] == res["rows"]


def test_interrupted_stage_resumes_from_its_checkpoint(experiment):
    """A stage without metrics.json runs again, from its last checkpoint: BCU's
    checkpoint is its final epoch, so the resumed run ends with the same model."""
    out, res, _, configs = experiment
    before = next(r for r in res["rows"] if r["role"] == "bcu")
    (out / "bcu" / "metrics.json").unlink()
    res2, log = run(out, ExperimentSpec(dataset="digits"), configs, report=False)
    assert "[4/5] BCU done in" in log
    after = next(r for r in res2["rows"] if r["role"] == "bcu")
    assert after["clean_accuracy"] == before["clean_accuracy"]
    assert after["attack_success_rate"] == before["attack_success_rate"]


def test_other_settings_are_refused(experiment):
    out, _, _, configs = experiment
    with pytest.raises(UnbackdoorError, match="other settings.*attack"):
        run(out, ExperimentSpec(dataset="digits", attack="blended"), configs)


def test_bad_arguments_are_clear(tmp_path):
    with pytest.raises(UnbackdoorError, match="unknown attack"):
        run(tmp_path, ExperimentSpec(attack="nope"), {})
    with pytest.raises(UnbackdoorError, match="unknown defense"):
        run(tmp_path, ExperimentSpec(defenses=("strip",)), {})
    bad = tmp_path / "bad.yaml"
    bad.write_text("mixmatch: {epochs: 1}\n")
    with pytest.raises(UnbackdoorError, match="unknown section"):
        load_experiment_configs(bad)


def test_cli_demo_and_sweep(tmp_path, capsys):
    from unbackdoor.cli.main import main

    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(TINY_YAML))
    common = ["--dataset", "digits", "--config", str(cfg), "--defenses", "bcu", "--device", "cpu",
              "--precision", "fp32", "--no-progress", "--points", "0"]
    assert main(["demo", "--out", str(tmp_path / "demo"), *common]) == 0
    out = capsys.readouterr().out
    assert "Undefended" in out and "BCU" in out and "report.html" in out
    assert (tmp_path / "demo" / "report.html").is_file()

    sweep = tmp_path / "sweep"
    assert main(["sweep", "--attacks", "badnets,blended", "--out", str(sweep), *common]) == 0
    rows = list(csv.DictReader((sweep / "leaderboard.csv").open()))
    assert [(r["attack"], r["model"]) for r in rows] == [("badnets", "Undefended"), ("badnets", "BCU"),
                                                         ("blended", "Undefended"), ("blended", "BCU")]
    for r in rows:
        m = json.loads((Path(r["run_dir"]) / "metrics.json").read_text())
        m = m.get("after", m)
        assert float(r["attack_success_rate"]) == m["attack_success_rate"]
    md = (sweep / "leaderboard.md").read_text()
    assert "| blended | BCU |" in md and (sweep / "report.html").is_file()
    capsys.readouterr()
    # A second sweep finds every cell finished (poison, undefended, BCU, evaluate for both attacks).
    common_loud = [a for a in common if a != "--no-progress"]
    assert main(["sweep", "--attacks", "badnets,blended", "--out", str(sweep), *common_loud]) == 0
    err = capsys.readouterr().err
    assert err.count("done already") == 8 and "report and leaderboard up to date" in err
    assert main(["demo", "--out", str(tmp_path / "demo"), "--attack", "blended", *common]) == 2
    assert "other settings" in capsys.readouterr().err
