"""core/safe_pickle.py: plain data comes back, code-running globals are refused, untrusted
classes become inert stand-ins, and the report counts the objects built from them."""
from __future__ import annotations

import collections
import io
import os
import pickle
import pickletools
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch

from unbackdoor.core.errors import UnbackdoorError
from unbackdoor.core.safe_pickle import Placeholder, SafeUnpickler, load_pickle, load_torch, loads


class Point:
    """A class the unpickler must never import: it only ever gets a stand-in."""

    def __init__(self, x, y):
        self.x, self.y = x, y


class Tagged(list):
    """A list subclass: filled by APPENDS, like BackdoorBench's containers."""


LABEL = f"{Point.__module__}.Point"


class _Payload:
    """Unpickling this runs ``touch <path>`` (if a loader ever executes it)."""

    def __init__(self, path: Path, via=os.system):
        self.path, self.via = str(path), via

    def __reduce__(self):
        if self.via is os.system:
            return (os.system, (f"touch {self.path}",))
        return (self.via, (f"open({self.path!r}, 'w').write('code ran')",))


@pytest.mark.parametrize("protocol", [0, 1, 2, 4, 5])
def test_the_report_counts_every_object_of_an_untrusted_class(protocol):
    points = [Point(i, -i) for i in range(5)]
    data = pickle.dumps({"points": points, "again": points[2], "cls": Point}, protocol=protocol)
    obj, report = loads(data, stand_ins=True)
    assert report.replaced == {LABEL: 5}  # five instances; the repeated reference and the class itself add none
    assert report.objects == 5
    assert "5 object(s) of 1 untrusted class(es)" in report.summary() and f"{LABEL} (x5)" in report.summary()
    assert all(isinstance(p, Placeholder) for p in obj["points"]) and obj["again"] is obj["points"][2]
    assert [p._state["x"] for p in obj["points"]] == [0, 1, 2, 3, 4]  # their data is kept, inert


def test_counts_per_class_and_a_class_named_without_objects():
    data = pickle.dumps([Point(1, 2), Tagged([1, 2]), Tagged(), Tagged, Point], protocol=2)
    obj, report = loads(data, stand_ins=True)
    assert report.replaced == {LABEL: 1, f"{Tagged.__module__}.Tagged": 2}
    assert obj[1]._items == [1, 2]
    _, only_class = loads(pickle.dumps({"kind": Point}, protocol=2), stand_ins=True)
    assert only_class.replaced == {LABEL: 0} and "0 object(s) of 1 untrusted class(es)" in only_class.summary()


def test_plain_data_comes_back_unchanged():
    value = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.int64(7), "c": collections.OrderedDict(x=1),
             "d": {1, 2}, "e": frozenset({3}), "f": b"bytes", "g": bytearray(b"ba"), "h": 1 + 2j, "i": [1.5, "s"]}
    for protocol in (0, 2, 5):
        got, report = loads(pickle.dumps(value, protocol=protocol))
        assert not report.replaced
        assert np.array_equal(got["a"], value["a"]) and got["a"].dtype == np.float32
        assert {k: v for k, v in got.items() if k != "a"} == {k: v for k, v in value.items() if k != "a"}


def test_without_stand_ins_an_untrusted_class_is_refused():
    with pytest.raises(pickle.UnpicklingError, match="refusing .*Point"):
        loads(pickle.dumps(Point(1, 2), protocol=2))


@pytest.mark.parametrize("stand_ins", [False, True])
@pytest.mark.parametrize("via", [os.system, exec, eval])
def test_code_running_globals_are_refused_and_not_run(tmp_path, stand_ins, via):
    marker = tmp_path / "pwned"
    for protocol in (0, 2, 5):
        with pytest.raises(pickle.UnpicklingError, match="refusing .*(system|exec|eval).*malicious"):
            loads(pickle.dumps({"x": _Payload(marker, via)}, protocol=protocol), stand_ins=stand_ins)
    assert not marker.exists()
    # other ways to reach code: stdlib helpers, torch / numpy functions
    for module, name in (("subprocess", "Popen"), ("functools", "partial"), ("torch", "load"), ("numpy", "load"),
                         ("builtins", "getattr"), ("__builtin__", "eval")):
        data = f"c{module}\n{name}\n.".encode()  # protocol 0: GLOBAL, STOP
        with pytest.raises(pickle.UnpicklingError, match="refusing"):
            loads(data, stand_ins=stand_ins)


def test_load_pickle_names_the_file(tmp_path):
    path = tmp_path / "batch"
    path.write_bytes(pickle.dumps({b"data": np.zeros((2, 3), np.uint8)}, protocol=2))
    obj, _ = load_pickle(path, encoding="bytes")
    assert obj[b"data"].shape == (2, 3)
    path.write_bytes(pickle.dumps({"x": _Payload(tmp_path / "pwned")}, protocol=2))
    with pytest.raises(UnbackdoorError, match="batch.*refusing"):
        load_pickle(path)
    path.write_bytes(b"\x80\x02garbage")
    with pytest.raises(UnbackdoorError, match="corrupted or unsafe pickle .*batch"):
        load_pickle(path)
    with pytest.raises(UnbackdoorError, match="not found"):
        load_pickle(tmp_path / "missing")
    assert not (tmp_path / "pwned").exists()


class _Py2Pickler(pickle._Pickler):
    """The pure-Python pickler writing str and bytes as Python 2's byte strings (BINSTRING)."""

    dispatch: ClassVar[dict] = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj):
        raw = obj.encode("latin1") if isinstance(obj, str) else bytes(obj)
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + len(raw).to_bytes(4, "little") + raw)
        self.memoize(obj)

    dispatch[str] = save_py2_str
    dispatch[bytes] = save_py2_str


def test_python2_style_pickles_read_with_bytes_encoding():
    """CIFAR's batches were written by Python 2: keys, type codes and raw data are byte strings."""
    buf = io.BytesIO()
    arr = np.arange(300, dtype=np.uint8).reshape(3, 100)
    _Py2Pickler(buf, protocol=2).dump({"data": arr, "labels": [1, 2, 3], "batch_label": "training batch 1 of 5"})
    data = buf.getvalue()
    assert {"SHORT_BINSTRING", "BINSTRING"} <= {op.name for op, _, _ in pickletools.genops(data)}
    assert b"_codecs" not in data
    obj = SafeUnpickler(io.BytesIO(data), encoding="bytes").load()
    assert np.array_equal(obj[b"data"], arr) and obj[b"data"].dtype == np.uint8
    assert obj[b"labels"] == [1, 2, 3] and obj[b"batch_label"] == b"training batch 1 of 5"


def test_load_torch_reads_tensors_and_stands_in_for_classes(tmp_path):
    sd = {"w": torch.randn(3, 4), "b": torch.arange(5), "view": torch.randn(6, 6)[1:, ::2]}
    torch.save({"model": sd, "points": [Point(i, i) for i in range(3)]}, tmp_path / "f.pt")
    with pytest.raises(UnbackdoorError, match="refusing .*Point"):
        load_torch(tmp_path / "f.pt")  # stand-ins are asked for, never the default
    obj, report = load_torch(tmp_path / "f.pt", stand_ins=True)
    assert report.loader == "restricted" and report.replaced == {LABEL: 3}
    for k, v in sd.items():
        assert torch.equal(obj["model"][k], v), k
    torch.save(sd, tmp_path / "plain.pt")
    obj, report = load_torch(tmp_path / "plain.pt")
    assert report.loader == "weights_only" and not report.replaced and "nothing replaced" in report.summary()
