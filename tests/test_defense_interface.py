"""A third defense written against the interface in a few lines (fine-tune the
suspicious model for a few epochs on the labelled clean pool) runs through the
CLI, the experiment and sweep, the leaderboard and the report, without touching
any other module."""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field

import pytest

from unbackdoor.cli.main import main as cli
from unbackdoor.core import layout
from unbackdoor.core.errors import UnbackdoorError
from unbackdoor.core.files import prepare_out_dir, write_json
from unbackdoor.defenses import Defense, DefenseInputs, DefenseResult, defense_names, register_defense
from unbackdoor.defenses.base import unregister_defense
from unbackdoor.experiment.sweep import sweep
from unbackdoor.metrics import evaluate
from unbackdoor.models.model_dir import save_model
from unbackdoor.training.engine import EngineOptions
from unbackdoor.training.fit import TrainConfig, fit

FP32 = EngineOptions(device="cpu", precision="fp32", progress=False)


# ---------------------------------------------------------------------------- the toy defense
@dataclass
class ToyConfig:
    epochs: int = 3
    seed: int = 0
    engine: EngineOptions = field(default_factory=EngineOptions)

    def validate(self) -> None:
        if self.epochs < 1:
            raise UnbackdoorError("toy-ft.epochs must be >= 1")


class ToyFineTune(Defense):
    name, label, config_type = "toy-ft", "Toy FT", ToyConfig
    needs = ("model", "clean_labelled")
    summary = "fine-tune the suspicious model on the labelled clean pool"

    preset_of = staticmethod(lambda name: ToyConfig())

    def run(self, inputs: DefenseInputs, cfg, out_dir, *, resume=False, force=False, progress=None):
        self.check(inputs)
        out = prepare_out_dir(out_dir, force=force, resume=resume)
        model = copy.deepcopy(inputs.model)
        res = fit(model, inputs.clean, TrainConfig(epochs=cfg.epochs, lr=0.01, seed=cfg.seed, engine=cfg.engine))
        before = evaluate(inputs.model, inputs.test, inputs.attack) if inputs.test is not None else None
        final = evaluate(res.model, inputs.test, inputs.attack) if inputs.test is not None else None
        metrics = layout.run_metrics(self.name, self.label, final, before=before, seconds={"total": res.seconds},
                                     n_clean=len(inputs.clean))
        save_model(res.model, out)
        write_json(out / layout.METRICS, metrics)
        return DefenseResult(res.model, metrics)


@pytest.fixture
def toy():
    register_defense(ToyFineTune())
    yield "toy-ft"
    unregister_defense("toy-ft")


# ---------------------------------------------------------------------------- tests
def test_the_toy_defense_runs_through_cli_sweep_leaderboard_and_report(toy, tmp_path, capsys):
    assert "toy-ft" in defense_names()
    configs = {"train": TrainConfig(epochs=15)}
    res = sweep(tmp_path / "sw", ["badnets"], (toy,), dataset="digits", engine=FP32, embed_points=0, configs=configs)
    cell = tmp_path / "sw" / "badnets"
    m = json.loads((cell / toy / "metrics.json").read_text())
    assert m["method"] == toy and m["n_clean"] == 179  # the 179 held-out digits, with labels
    rows = {r["label"]: r for r in res["rows"]}
    assert set(rows) == {"Undefended", "Toy FT"}
    assert rows["Toy FT"]["der"] is not None
    assert "| badnets | Toy FT |" in (tmp_path / "sw" / "leaderboard.md").read_text()
    assert "Toy FT" in (tmp_path / "sw" / "report.html").read_text()
    # The CLI got a subcommand with the flags the defense's inputs imply.
    rc = cli([toy, "--model", str(cell / "undefended"), "--data", str(cell / "data"), "--out", str(tmp_path / "c"),
              "--device", "cpu", "--precision", "fp32", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0 and "final (Toy FT)" in out and "before (suspicious)" in out
    assert json.loads((tmp_path / "c" / "metrics.json").read_text())["final"] is not None
    with pytest.raises(SystemExit):
        cli([toy, "--help"])
    assert "--clean" in capsys.readouterr().out  # it uses labels, and says so


def test_an_unknown_defense_is_a_clear_error(tmp_path):
    with pytest.raises(UnbackdoorError, match="unknown defense 'toy-ft'"):
        sweep(tmp_path, ["badnets"], ("toy-ft",), dataset="digits", engine=FP32)


def test_missing_inputs_are_named(toy):
    d = ToyFineTune()
    with pytest.raises(UnbackdoorError, match="needs a suspicious trained model"):
        d.check(DefenseInputs())


def test_a_length_in_epochs_replaces_the_presets_step_budget(tmp_path):
    """BCU's quick preset counts optimiser steps; a config file that says epochs means epochs."""
    from unbackdoor.defenses import get_defense

    f = tmp_path / "c.yaml"
    f.write_text("bcu: {epochs: 2}\n")
    assert get_defense("bcu").load_config("quick", f).steps is None
    f.write_text("bcu: {epochs: 2, steps: 10}\n")
    assert get_defense("bcu").load_config("quick", f).steps == 10
    assert get_defense("bcu").load_config("quick", None).steps == 4800
    f.write_text("retrain: {epochs: 3}\n")  # a nested budget (the detectors' retraining)
    rt = get_defense("spectral").load_config("quick", f).retrain
    assert (rt.epochs, rt.steps) == (3, None)
    f.write_text("epochs: 7\n")  # the label-based baselines' quick step budget, too
    assert (get_defense("nad").load_config("quick", f).epochs, get_defense("nad").load_config("quick", f).steps) == (7, None)


def _flags(name: str, argv: list[str]):
    """The config of defense ``name``'s quick preset after its own flags ``argv``."""
    import argparse

    from unbackdoor.defenses import get_defense

    d = get_defense(name)
    p = argparse.ArgumentParser()
    d.add_arguments(p)
    return d.configure(d.preset("quick"), p.parse_args(argv))


def test_declared_flags_set_their_config_keys():
    cfg = _flags("ft", ["--epochs", "3", "--lr", "0.5"])
    assert (cfg.epochs, cfg.steps, cfg.lr, cfg.batch_size) == (3, None, 0.5, 64)  # epochs replace the step budget
    cfg = _flags("ft", ["--steps", "20", "--epochs", "3"])
    assert (cfg.epochs, cfg.steps) == (3, 20)  # both given: the steps count
    assert _flags("ft", []) == get_defense_preset("ft")  # no flag given: the preset untouched
    cfg = _flags("spectral", ["--epsilon", "0.2", "--epochs", "5", "--batch-size", "32"])
    assert (cfg.epsilon, cfg.retrain.epochs, cfg.retrain.steps, cfg.retrain.batch_size) == (0.2, 5, None, 32)
    cfg = _flags("ac", ["--reduce", "ica", "--size-threshold", "0.5"])
    assert (cfg.reduce, cfg.size_threshold) == ("ica", 0.5)
    cfg = _flags("anp", ["--iterations", "7", "--threshold", "0.3"])
    assert (cfg.iterations, cfg.threshold, cfg.steps) == (7, 0.3, 1)  # ANP's own 'steps' (ascent steps) untouched
    cfg = _flags("bcu", ["--rule", "depth", "--p-scale", "1.5", "--epochs", "4"])
    assert (cfg.rule, cfg.p_scale, cfg.epochs, cfg.steps) == ("depth", 1.5, 4, None)
    with pytest.raises(SystemExit):  # a choice outside the list is argparse's error
        _flags("bcu", ["--rule", "magic"])


def get_defense_preset(name: str):
    from unbackdoor.defenses import get_defense

    return get_defense(name).preset("quick")


def test_the_class_docstring_is_the_help_paragraph():
    from unbackdoor.defenses import defenses

    for d in defenses():
        assert len(d.description) > 40 and "OUT" in d.description, d.name  # says what it does and writes
