"""The command line: the poison -> train -> evaluate contract end to end, --help for
every subcommand, and every user error: one clear line on stderr, a non-zero
exit, no traceback, and nothing half-written left behind."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from unbackdoor.attacks.base import attack_names
from unbackdoor.cli.main import main
from unbackdoor.core.errors import OutputInUse
from unbackdoor.data.loaders import dataset_names
from unbackdoor.experiment.run import run_experiment
from unbackdoor.models.model_dir import save_model
from unbackdoor.models.registry import create, model_names

FAST = ["--precision", "fp32", "--device", "cpu", "--no-progress"]


def run_main(capsys, *args) -> tuple[int, str, str]:
    """Run the CLI in this process; returns (exit code, stdout, stderr)."""
    try:
        rc = main([str(a) for a in args])
    except SystemExit as e:  # argparse's --help / usage errors
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def snapshot(*roots: Path) -> dict[str, int]:
    """Every file and folder (hidden temp files included) under ``roots``, with sizes."""
    files = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            files[dirpath] = -1
            for f in filenames:
                p = os.path.join(dirpath, f)
                files[p] = os.path.getsize(p)
    return files


def assert_one_line_error(rc: int, err: str, match: str) -> str:
    assert rc not in (0, None), f"expected failure, got exit {rc}"
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert re.search(match, lines[0]), lines[0]
    return lines[0]


# ---------------------------------------------------------------------------- the contract end to end
@pytest.mark.slow
def test_poison_train_evaluate_end_to_end(tmp_path, cli):
    data, model = tmp_path / "data", tmp_path / "model"
    r = cli("poison", "--dataset", "mnist5k", "--attack", "badnets", "--rate", "0.1", "--target", "0",
            "--seed", "0", "--out", data)
    assert r.returncode == 0, r.stderr
    assert {"train.npz", "test.npz", "heldout.npz", "attack.json", "config.yaml", "metrics.json"} <= {
        p.name for p in data.iterdir()}
    stats = json.loads((data / "metrics.json").read_text())
    assert (stats["n_train"], stats["n_poisoned"], stats["n_test"], stats["n_heldout"]) == (3500, 350, 1000, 500)
    assert yaml.safe_load((data / "config.yaml").read_text())["attack"]["name"] == "badnets"

    r = cli("train", "--data", data, "--model", "cnn-small", "--out", model, "--epochs", "2", *FAST)
    assert r.returncode == 0, r.stderr
    assert {"model.safetensors", "model.json", "config.yaml", "metrics.json"} <= {p.name for p in model.iterdir()}
    assert yaml.safe_load((model / "config.yaml").read_text())["train"]["epochs"] == 2

    r = cli("evaluate", "--model", model, "--data", data, "--json")
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout)  # exactly one JSON object on stdout
    assert isinstance(m, dict)
    for k in ("clean_accuracy", "attack_success_rate", "robust_accuracy"):
        assert isinstance(m[k], float) and 0.0 <= m[k] <= 1.0
    assert m["clean_accuracy"] > 0.8
    saved = json.loads((model / "metrics.json").read_text())  # what train measured on the same test set
    for k in ("clean_accuracy", "attack_success_rate", "robust_accuracy"):
        assert saved[k] == pytest.approx(m[k])


def test_train_accepts_an_npz_and_a_yaml_config(small_poisoned_dir, tmp_path, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("train:\n  epochs: 1\n  batch_size: 50\n  lr: 0.02\n")
    rc, out, err = run_main(capsys, "train", "--data", small_poisoned_dir / "train.npz", "--out", tmp_path / "m",
                            "--config", cfg, "--json", *FAST)
    assert rc == 0, err
    assert json.loads(out)["n_train"] == 1000
    resolved = yaml.safe_load((tmp_path / "m" / "config.yaml").read_text())["train"]
    assert (resolved["epochs"], resolved["batch_size"], resolved["lr"]) == (1, 50, 0.02)
    assert (tmp_path / "m" / "metrics.json").is_file()


def test_help_for_every_subcommand(capsys, cli):
    r = cli("--help")
    assert r.returncode == 0 and r.stdout.startswith("usage: unbackdoor")
    listed = re.findall(r"^    (\w[\w-]*)\s", r.stdout.split("positional arguments:")[1], flags=re.M)
    assert {"poison", "train", "evaluate"} <= set(listed)
    for cmd in listed:
        rc, out, err = run_main(capsys, cmd, "--help")
        assert rc == 0, err
        assert out.startswith(f"usage: unbackdoor {cmd}")
    script = Path(sys.executable).parent / "unbackdoor"  # the console script from pyproject
    if script.exists():
        r = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0 and r.stdout.startswith("unbackdoor ")


# ---------------------------------------------------------------------------- bad inputs
@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, clean_cnn):
    """Broken and mismatched inputs, each as a user could produce it."""
    d = tmp_path_factory.mktemp("bad-inputs")
    (d / "garbage.npz").write_bytes(b"this is not a zip archive" * 10)
    np.savez(d / "mismatched.npz", images=np.zeros((5, 28, 28), np.uint8), labels=np.zeros(4, np.int64))
    np.savez(d / "rgb32.npz", images=np.zeros((20, 32, 32, 3), np.uint8), labels=np.arange(20) % 10)
    np.savez(d / "five_classes.npz", images=np.zeros((20, 28, 28), np.uint8), labels=np.arange(20) % 5)
    np.savez(d / "empty.npz", images=np.zeros((0, 28, 28), np.uint8), labels=np.zeros(0, np.int64))
    models = {}
    for name in ("garbage_weights", "garbage_json", "wrong_arch", "bad_arch_args", "no_weights"):
        models[name] = save_model(clean_cnn, d / name)
    (d / "garbage_weights" / "model.safetensors").write_bytes(b"\x00" * 64)
    (d / "garbage_json" / "model.json").write_text("{ not json")
    other = create("cnn-small", num_classes=10, in_channels=1, image_size=28, width=8)
    save_model(other, d / "tmp_other")
    shutil.copy(d / "tmp_other" / "model.safetensors", d / "wrong_arch" / "model.safetensors")
    shutil.rmtree(d / "tmp_other")
    meta = json.loads((d / "bad_arch_args" / "model.json").read_text())
    meta["architecture"]["depth"] = 3
    (d / "bad_arch_args" / "model.json").write_text(json.dumps(meta))
    (d / "no_weights" / "model.safetensors").unlink()
    (d / "bad_key.yaml").write_text("train:\n  epochz: 3\n")
    (d / "bad_nested_key.yaml").write_text("train:\n  engine:\n    precison: fp32\n")
    (d / "bad_type.yaml").write_text("epochs: three\n")
    (d / "not_yaml.yaml").write_text("epochs: [1,\n")
    (d / "nonempty").mkdir()
    (d / "nonempty" / "keep.txt").write_text("precious")
    (d / "a_file").write_text("x")
    return d


def _cases(data: Path, model: Path, bad: Path, new: Path) -> list[tuple[list, str]]:
    poison = ["poison", "--attack", "badnets", "--out", new]
    train = ["train", "--data", data, "--out", new, "--epochs", "1", *FAST]
    return [
        # a missing path
        (["train", "--data", bad / "nope", "--out", new], r"not found.*nope"),
        (["train", "--data", bad / "nope.npz", "--out", new], r"not found.*nope\.npz"),
        (["evaluate", "--model", bad / "nope", "--data", data], r"not found.*nope"),
        (["evaluate", "--model", model, "--data", bad / "nope"], r"not found.*nope"),
        (["poison", "--dataset", "cifar10", "--root", bad / "nope", "--attack", "badnets", "--out", new], r"not found.*nope"),
        (["poison", "--dataset", bad / "nope.npz", "--attack", "badnets", "--out", new], r"not found.*nope\.npz"),
        (["poison", "--dataset", "cifar10", "--attack", "badnets", "--out", new], r"--root"),
        ([*train, "--config", bad / "nope.yaml"], r"not found.*nope\.yaml"),
        # unknown names list the valid ones
        ([*poison, "--dataset", "mnist6k"], "unknown dataset 'mnist6k'.*" + ".*".join(dataset_names())),
        (["poison", "--dataset", "mnist5k", "--attack", "badnet", "--out", new],
         "unknown attack 'badnet'.*" + ".*".join(attack_names())),
        ([*train, "--model", "resnet99"], "unknown model 'resnet99'.*" + ".*".join(model_names())),
        # a rate outside (0, 1]
        ([*poison, "--dataset", "mnist5k", "--rate", "0"], r"rate must be in \(0, 1\], got 0"),
        ([*poison, "--dataset", "mnist5k", "--rate", "1.5"], r"rate must be in \(0, 1\], got 1.5"),
        ([*poison, "--dataset", "mnist5k", "--rate=-0.1"], r"rate must be in \(0, 1\], got -0.1"),
        # a target outside the classes
        ([*poison, "--dataset", "mnist5k", "--target", "10"], r"target label 10 is outside the classes \[0, 9\]"),
        ([*poison, "--dataset", "mnist5k", "--target=-1"], r"target label -1 is outside the classes \[0, 9\]"),
        # corrupted or mismatched .npz
        (["train", "--data", bad / "garbage.npz", "--out", new], r"garbage\.npz"),
        (["train", "--data", bad / "mismatched.npz", "--out", new], r"labels.*\(5,\)"),
        (["evaluate", "--model", model, "--data", bad / "rgb32.npz"], r"model expects images \(1, 28, 28\)"),
        (["evaluate", "--model", model, "--data", bad / "five_classes.npz"], r"model has 10 classes, data has 5"),
        # corrupted model files
        (["evaluate", "--model", bad / "garbage_weights", "--data", data], r"corrupted model file.*model\.safetensors"),
        (["evaluate", "--model", bad / "garbage_json", "--data", data], r"model\.json"),
        (["evaluate", "--model", bad / "wrong_arch", "--data", data], r"does not match architecture"),
        (["evaluate", "--model", bad / "bad_arch_args", "--data", data], r"model\.json"),
        (["evaluate", "--model", bad / "no_weights", "--data", data], r"not found.*model\.safetensors"),
        (["evaluate", "--model", bad / "a_file", "--data", data], r"a_file"),
        # an existing non-empty --out without --force
        (["train", "--data", data, "--out", bad / "nonempty", *FAST], r"not empty.*--force"),
        (["poison", "--dataset", "mnist5k", "--attack", "badnets", "--out", bad / "nonempty"], r"not empty.*--force"),
        (["train", "--data", data, "--out", bad / "a_file", *FAST], r"not a directory"),
        # bad configs
        ([*train, "--config", bad / "bad_key.yaml"], r"unknown key train\.epochz; valid keys: .*epochs"),
        ([*train, "--config", bad / "bad_nested_key.yaml"], r"unknown key train\.engine\.precison"),
        ([*train, "--config", bad / "bad_type.yaml"], r"epochs must be an integer, got 'three'"),
        ([*train, "--config", bad / "not_yaml.yaml"], r"invalid YAML"),
        ([*train, "--epochs", "0"], r"--epochs must be >= 1"),
        # an empty dataset is refused before anything is written
        (["train", "--data", bad / "empty.npz", "--out", new, *FAST], r"0 images"),
        (["dbd", "--data", bad / "empty.npz", "--out", new, "--preset", "quick", *FAST], r"0 images"),
        (["bcu", "--model", model, "--unlabeled", bad / "empty.npz", "--data", data, "--out", new, *FAST],
         r"unlabeled set is empty"),
    ]


CASE_IDS = [
    "train-missing-data", "train-missing-npz", "evaluate-missing-model", "evaluate-missing-data",
    "poison-missing-root", "poison-missing-npz", "poison-no-root", "train-missing-config",
    "unknown-dataset", "unknown-attack", "unknown-model",
    "rate-0", "rate-1.5", "rate-negative", "target-10", "target-negative",
    "garbage-npz", "mismatched-npz", "model-data-shape-mismatch", "model-data-classes-mismatch",
    "garbage-weights", "garbage-model-json", "weights-of-another-architecture", "bad-architecture-args",
    "missing-weights", "model-is-a-file",
    "train-out-not-empty", "poison-out-not-empty", "out-is-a-file",
    "config-unknown-key", "config-unknown-nested-key", "config-wrong-type", "config-not-yaml", "epochs-0",
    "train-empty-data", "dbd-empty-data", "bcu-empty-unlabeled",
]


@pytest.mark.parametrize("index", range(len(CASE_IDS)), ids=CASE_IDS)
def test_bad_input_gives_one_clear_line_and_leaves_nothing(index, small_poisoned_dir, clean_cnn_dir, bad_files,
                                                           tmp_path, capsys):
    new = tmp_path / "out"
    args, match = _cases(small_poisoned_dir, clean_cnn_dir, bad_files, new)[index]
    before = snapshot(tmp_path, bad_files, small_poisoned_dir)
    rc, out, err = run_main(capsys, *args)
    assert rc == 2
    line = assert_one_line_error(rc, err, match)
    assert line.startswith(f"unbackdoor {args[0]}: error: ")
    assert snapshot(tmp_path, bad_files, small_poisoned_dir) == before  # nothing created, nothing left behind
    assert not new.exists()


def test_case_ids_match_cases(tmp_path):
    assert len(_cases(tmp_path, tmp_path, tmp_path, tmp_path)) == len(CASE_IDS)


@pytest.mark.parametrize("index", [0, 8, 16, 20, 27], ids=lambda i: CASE_IDS[i])
def test_bad_input_in_a_real_process(index, small_poisoned_dir, clean_cnn_dir, bad_files, tmp_path, cli):
    """The same contract seen from the shell: exit status, stderr, no traceback, no leftovers."""
    new = tmp_path / "out"
    args, match = _cases(small_poisoned_dir, clean_cnn_dir, bad_files, new)[index]
    before = snapshot(tmp_path, bad_files, small_poisoned_dir)
    r = cli(*args)
    assert r.returncode == 2
    assert_one_line_error(r.returncode, r.stderr, match)
    assert r.stdout == ""
    assert snapshot(tmp_path, bad_files, small_poisoned_dir) == before


def test_corrupted_file_inside_a_data_folder(small_poisoned_dir, clean_cnn_dir, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(small_poisoned_dir, data)
    blob = (data / "test.npz").read_bytes()
    (data / "test.npz").write_bytes(blob[: len(blob) // 3])
    rc, _, err = run_main(capsys, "evaluate", "--model", clean_cnn_dir, "--data", data)
    assert_one_line_error(rc, err, r"test\.npz")
    (data / "test.npz").write_bytes(blob)
    (data / "attack.json").write_text('{"name": "badnets"')
    rc, _, err = run_main(capsys, "evaluate", "--model", clean_cnn_dir, "--data", data)
    assert_one_line_error(rc, err, r"attack\.json")


def test_resume_with_a_corrupted_checkpoint(small_poisoned_dir, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"PK\x03\x04 truncated")
    rc, _, err = run_main(capsys, "train", "--data", small_poisoned_dir, "--out", out, "--resume", "--epochs", "1", *FAST)
    assert_one_line_error(rc, err, r"corrupted checkpoint")
    assert not (out / "model.safetensors").exists()


def test_force_overwrites_a_non_empty_out(small_poisoned_dir, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "old.txt").write_text("old")
    rc, _, err = run_main(capsys, "train", "--data", small_poisoned_dir, "--out", out, "--force", "--epochs", "1", *FAST)
    assert rc == 0, err
    assert not (out / "old.txt").exists() and (out / "model.safetensors").is_file()


HOLD = """
import sys, time
from unbackdoor.core.files import prepare_out_dir
prepare_out_dir(sys.argv[1], resume=True)
print("held", flush=True)
time.sleep(float(sys.argv[2]))
"""


def test_a_folder_another_process_writes_is_refused(small_poisoned_dir, tmp_path, capsys):
    """Two runs on one folder would interleave their checkpoints: the second is refused
    while the first lives, and a killed holder never blocks the folder's resume."""
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out), "600"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        args = ("train", "--data", small_poisoned_dir, "--out", out, "--epochs", "1", *FAST)
        for extra in ((), ("--resume",), ("--force",)):
            rc, _, err = run_main(capsys, *args, *extra)
            line = assert_one_line_error(rc, err, rf"being written by another process \(pid {holder.pid}\)")
            assert "--force" not in line  # no flag fixes this one
        assert sorted(p.name for p in out.iterdir()) == [".lock"]  # --force removed nothing
    finally:
        holder.kill()  # SIGKILL: the operating system drops its lock
        holder.wait()
    rc, _, err = run_main(capsys, *args, "--resume")
    assert rc == 0, err
    assert (out / "model.safetensors").is_file()
    # the finished run let go of the folder: another process can take it now
    r = subprocess.run([sys.executable, "-c", HOLD, str(out), "0"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "held", r.stderr


def test_an_experiment_folder_in_use_is_refused(tmp_path):
    out = tmp_path / "exp"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out), "600"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputInUse, match=f"pid {holder.pid}"):
            run_experiment(out, force=True)
        assert sorted(p.name for p in out.iterdir()) == [".lock"]
    finally:
        holder.kill()
        holder.wait()
