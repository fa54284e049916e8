"""The training loop: a run killed mid-way and resumed ends exactly where an
uninterrupted run ends; checkpoints never execute code; the precision probe."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from unbackdoor.core.errors import UnbackdoorError
from unbackdoor.models.registry import create
from unbackdoor.training.checkpoint import load_checkpoint, save_checkpoint
from unbackdoor.training.device import Precision, probe_precision, resolve_precision

CANDIDATES = {"fp32", "fp32+channels_last", "bf16+channels_last"}  # what the CPU probe measures
TRAIN_ARGS = ["--model", "cnn-small", "--epochs", "5", "--seed", "0", "--precision", "fp32", "--device", "cpu", "--no-progress"]


def _train_cmd(data, out, *extra):
    return [sys.executable, "-m", "unbackdoor", "train", "--data", str(data), "--out", str(out), *TRAIN_ARGS, *extra]


def _history(path):
    return [{k: r[k] for k in ("epoch", "loss", "train_accuracy", "lr")} for r in json.loads(path.read_text())]


@pytest.mark.slow
def test_resume_after_kill_ends_where_an_uninterrupted_run_ends(small_poisoned_dir, tmp_path, cli):
    ref = cli("train", "--data", small_poisoned_dir, "--out", tmp_path / "ref", *TRAIN_ARGS)
    assert ref.returncode == 0, ref.stderr

    out = tmp_path / "killed"
    ckpt = out / "checkpoint.pt"
    proc = subprocess.Popen(_train_cmd(small_poisoned_dir, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 600
        while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)  # no chance to clean up: like a power cut or the OOM killer
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "model.safetensors").exists() and not (out / "metrics.json").exists()
    done = load_checkpoint(ckpt)["epoch"]  # the file is whole: written to a temp file, then renamed
    assert 0 <= done < 4

    res = cli("train", "--data", small_poisoned_dir, "--out", out, "--resume", *TRAIN_ARGS)
    assert res.returncode == 0, res.stderr
    a, b = load_file(str(tmp_path / "ref" / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume (killed after epoch {done + 1})"
    assert _history(out / "history.json") == _history(tmp_path / "ref" / "history.json")
    for name in ("config.yaml", "metrics.json", "model.json"):
        assert (out / name).is_file()
    m_ref = json.loads((tmp_path / "ref" / "metrics.json").read_text())
    m_res = json.loads((out / "metrics.json").read_text())
    assert m_res["clean_accuracy"] == m_ref["clean_accuracy"]
    assert m_res["attack_success_rate"] == m_ref["attack_success_rate"]


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('code ran')",))


def test_checkpoints_load_weights_only_and_never_run_code(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"model": {"w": torch.zeros(2)}, "epoch": 0, "extra": _Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(UnbackdoorError, match="corrupted checkpoint"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()
    torch.load(tmp_path / "evil.pt", weights_only=False)  # the payload is real: a full unpickle runs it
    assert marker.exists()

    state = {"model": {"w": torch.arange(3.0)}, "epoch": 2, "history": [{"loss": 0.5}], "precision": "fp32"}
    save_checkpoint(tmp_path / "ok.pt", state)
    back = load_checkpoint(tmp_path / "ok.pt")
    assert back["epoch"] == 2 and torch.equal(back["model"]["w"], state["model"]["w"])
    assert [p.name for p in tmp_path.glob(".*tmp")] == []  # atomic write left no temp file

    (tmp_path / "broken.pt").write_bytes((tmp_path / "ok.pt").read_bytes()[:100])
    with pytest.raises(UnbackdoorError, match="corrupted checkpoint"):
        load_checkpoint(tmp_path / "broken.pt")
    with pytest.raises(UnbackdoorError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_precision_probe_returns_a_valid_choice_and_caches_it(tmp_path, monkeypatch):
    import unbackdoor.training.device as device_mod

    monkeypatch.setenv("UNBACKDOOR_CACHE", str(tmp_path))
    monkeypatch.setattr(device_mod, "_busy", lambda: False)  # the CI machine's load must not decide this test
    torch.manual_seed(0)
    model = create("cnn-small", num_classes=10, in_channels=1, image_size=28)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cpu = torch.device("cpu")
    choice = probe_precision(model, (1, 28, 28), cpu, batch_size=16, steps=1)
    assert choice.name in CANDIDATES
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # probing trains a copy
    cache = json.loads((tmp_path / "probe.json").read_text())
    assert list(cache.values()) == [choice.name]
    # a second call reads the cache instead of measuring again: plant a different valid answer
    key = next(iter(cache))
    planted = "fp32+channels_last" if choice.name != "fp32+channels_last" else "fp32"
    (tmp_path / "probe.json").write_text(json.dumps({key: planted}))
    assert probe_precision(model, (1, 28, 28), cpu, batch_size=16, steps=1).name == planted
    assert resolve_precision("auto", model, (1, 28, 28), cpu, batch_size=16).name == planted
    # a damaged cache is ignored and rewritten, never fatal
    for damaged in ("{not json", "[1, 2]", json.dumps({key: "fp64"})):
        (tmp_path / "probe.json").write_text(damaged)
        assert probe_precision(model, (1, 28, 28), cpu, batch_size=16, steps=1).name in CANDIDATES
        assert json.loads((tmp_path / "probe.json").read_text())[key] in CANDIDATES


def test_precision_probe_taken_under_load_is_not_cached(tmp_path, monkeypatch):
    import unbackdoor.training.device as device_mod

    monkeypatch.setenv("UNBACKDOOR_CACHE", str(tmp_path))
    monkeypatch.setattr(device_mod, "_busy", lambda: True)
    model = create("cnn-small", num_classes=10, in_channels=1, image_size=28)
    assert probe_precision(model, (1, 28, 28), torch.device("cpu"), batch_size=16, steps=1).name in CANDIDATES
    assert not (tmp_path / "probe.json").exists()  # measured, used, not kept: the next run probes again


def test_explicit_precisions():
    model = create("cnn-small", num_classes=10, in_channels=1, image_size=28)
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", model, (1, 28, 28), cpu) == Precision(None, False)
    assert resolve_precision("bf16+channels_last", model, (1, 28, 28), cpu) == Precision(torch.bfloat16, True)
    with pytest.raises(UnbackdoorError, match="fp16"):
        resolve_precision("fp16", model, (1, 28, 28), cpu)
    with pytest.raises(UnbackdoorError, match="unknown precision"):
        resolve_precision("fp8", model, (1, 28, 28), cpu)


def test_cpu_allocator_tuning_applies_on_glibc_and_can_be_turned_off(monkeypatch):
    import platform

    from unbackdoor.training.device import tune_cpu_allocator

    monkeypatch.setenv("UNBACKDOOR_MALLOC_TUNING", "0")
    assert tune_cpu_allocator() is False  # the user's opt-out is honoured
    monkeypatch.delenv("UNBACKDOOR_MALLOC_TUNING")
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt tuning is glibc-only")
    assert tune_cpu_allocator() is True
    x = torch.ones(4_000_000)  # 16 MB: below the raised mmap threshold, served from the heap
    assert float(x.sum()) == 4_000_000
