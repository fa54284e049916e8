"""FT, the label-based baseline, on a small real attacked model (digits, BadNets)."""
from __future__ import annotations

import json

import pytest
from conftest import FP32

from unbackdoor.cli.main import main as cli
from unbackdoor.core.errors import UnbackdoorError
from unbackdoor.defenses import get_defense
from unbackdoor.defenses.ft import FTConfig
from unbackdoor.experiment.run import run_experiment
from unbackdoor.experiment.spec import ExperimentSpec
from unbackdoor.training.fit import TrainConfig


@pytest.fixture(scope="module")
def experiment(digits_attacked):
    out = digits_attacked
    res = run_experiment(out, ExperimentSpec(dataset="digits", defenses=("ft",)), engine=FP32,
                         configs={"train": TrainConfig(epochs=15), "ft": FTConfig(steps=300, batch_size=64)},
                         report=False)
    return out, {r["label"]: r for r in res["rows"]}


def test_ft_keeps_clean_accuracy_and_records_its_labels(experiment):
    out, rows = experiment
    und, ft = rows["Undefended"], rows["FT"]
    assert und["attack_success_rate"] > 0.9
    assert ft["clean_accuracy"] >= und["clean_accuracy"] - 0.02
    m = json.loads((out / "ft" / "metrics.json").read_text())
    assert m["n_labelled"] == 179 and m["before"]["attack_success_rate"] == und["attack_success_rate"]
    # Fine-tuning alone leaves most of a BadNets backdoor in place (as Fine-Pruning reported):
    # the comparison with BCU and the pruning baselines is what FT is for.
    assert ft["attack_success_rate"] > 0.5


def test_ft_cli_says_it_uses_labels_and_refuses_an_empty_pool(experiment, tmp_path, capsys):
    out, _ = experiment
    with pytest.raises(SystemExit):
        cli(["ft", "--help"])
    assert "labelled clean" in capsys.readouterr().out
    assert get_defense("ft").uses_labels and not get_defense("bcu").uses_labels
    rc = cli(["ft", "--model", str(out / "undefended"), "--data", str(out / "data"), "--out", str(tmp_path / "f"),
              "--preset", "quick", "--config", str(_tiny(tmp_path)), "--device", "cpu", "--precision", "fp32",
              "--no-progress"])
    assert rc == 0 and "final (FT)" in capsys.readouterr().out
    with pytest.raises(UnbackdoorError, match="epochs must be > 0"):
        get_defense("ft").config_type(epochs=0).validate()


def _tiny(tmp_path):
    f = tmp_path / "ft.yaml"
    f.write_text("ft: {epochs: 2}\n")
    return f
