"""The report: built from a real (tiny) run tree — poisoned mnist5k subset, an
undefended cnn-small, DBD and BCU on a few steps — then opened in headless
Chromium, which must load every embedded image, and whose tables must hold
the numbers the runs measured."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch

from unbackdoor.attacks.base import make_attack
from unbackdoor.attacks.poisoned_data import load_data, save_poisoned
from unbackdoor.core.errors import RunFormatError, UnbackdoorError
from unbackdoor.core.files import write_json, write_yaml
from unbackdoor.core.layout import headline, run_metrics
from unbackdoor.data.loaders import load_splits
from unbackdoor.experiment.pipeline import train
from unbackdoor.models.model_dir import load_model
from unbackdoor.models.registry import create
from unbackdoor.report.build import ReportOptions, build_report, history_stages
from unbackdoor.report.runs import discover, read_detection
from unbackdoor.training.engine import EngineOptions
from unbackdoor.training.fit import TrainConfig

FP32 = EngineOptions(device="cpu", precision="fp32", progress=False)
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars"]


# ---------------------------------------------------------------------------- a real, tiny run tree
def make_data_dir(path: Path, attack: str = "badnets", n_train: int = 600, n_test: int = 300, n_held: int = 200) -> Path:
    """A poisoned-data folder like ``unbackdoor poison`` writes, on a stratified mnist5k subset."""
    sp = load_splits("mnist5k", seed=0)
    rng = np.random.default_rng(0)
    tr, te, ho = (ds.subset(np.sort(rng.choice(len(ds), n, replace=False)))
                  for ds, n in ((sp.train, n_train), (sp.test, n_test), (sp.heldout, n_held)))
    atk = make_attack(attack, tr.shape, tr.num_classes, target=0, seed=0)
    ptr, mask = atk.poison(tr, 0.1, seed=0)
    path.mkdir(parents=True)
    save_poisoned(path, ptr, te, ho, atk)
    write_json(path / "metrics.json", {"dataset": "mnist5k", "attack": attack, "rate": 0.1, "target": 0, "mode": "all-to-one",
                                       "seed": 0, "flip": False, "n_train": len(ptr), "n_poisoned": int(mask.sum())})
    write_yaml(path / "config.yaml", {"command": "poison", "dataset": "mnist5k", "attack": atk.spec()})
    return path


def tiny_cnn():
    torch.manual_seed(0)
    return create("cnn-small", num_classes=10, in_channels=1, image_size=28, width=8)


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    make_data_dir(root / "data")
    pd = load_data(root / "data")
    train(pd, root / "undefended", tiny_cnn(), TrainConfig(epochs=2, lr=0.05, engine=FP32))
    try:
        from unbackdoor.defenses.dbd.config import DBDConfig, LinearConfig, MixMatchConfig, PolishConfig, SimCLRConfig
        from unbackdoor.defenses.dbd.stages import run_dbd

        cfg = DBDConfig(simclr=SimCLRConfig(epochs=1, batch_size=128), linear=LinearConfig(epochs=1),
                        mixmatch=MixMatchConfig(epochs=2, iterations=3, batch_size=32), polish=PolishConfig(epochs=1),
                        engine=FP32)
        run_dbd(tiny_cnn(), pd, cfg, root / "dbd")
    except ImportError:
        pass
    try:
        from unbackdoor.defenses.bcu.distill import BCUConfig, run_bcu

        run_bcu(load_model(root / "undefended"), pd.heldout, BCUConfig(epochs=2, batch_size=64, eval_every=1, engine=FP32),
                root / "bcu", test=pd.test, attack=pd.attack)
    except ImportError:
        pass
    return root


@pytest.fixture(scope="module")
def built(tree):
    summary = build_report(tree, opts=ReportOptions(embed_points=200))
    return tree, summary


# ---------------------------------------------------------------------------- parsing the page
class _Page(HTMLParser):
    """Collects <img> sources and, per table, the cells (text + data-value)."""

    def __init__(self):
        super().__init__()
        self.imgs: list[str] = []
        self.tables: dict[str, list[list[tuple[str, str | None]]]] = {}
        self._table = None
        self._cell: list | None = None
        self.external: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for k in ("src", "href"):
            v = a.get(k) or ""
            if re.match(r"^(https?:)?//", v):
                self.external.append(v)
        if tag == "link" or (tag == "script" and a.get("src")):
            self.external.append(f"<{tag}>")
        if tag == "img":
            self.imgs.append(a.get("src", ""))
        elif tag == "table":
            name = a.get("data-table") or f"t{len(self.tables)}"
            while name in self.tables:
                name += "+"
            self._table = name
            self.tables[name] = []
        elif tag == "tr" and self._table is not None:
            self.tables[self._table].append([])
        elif tag in ("td", "th") and self._table is not None:
            self._cell = ["", a.get("data-value")]

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None and self._table is not None:
            self.tables[self._table][-1].append((self._cell[0].strip(), self._cell[1]))
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell[0] += data


def parse(html: str) -> _Page:
    p = _Page()
    p.feed(html)
    return p


def rows_of(table: list[list[tuple[str, str | None]]]) -> dict[str, list[tuple[str, str | None]]]:
    """Body rows keyed by their first cell's text."""
    return {r[0][0]: r for r in table[1:]}


# ---------------------------------------------------------------------------- headless Chromium
@pytest.fixture(scope="session")
def chromium() -> str:
    exe = shutil.which("chromium") or "/usr/bin/chromium"
    if not os.path.exists(exe):
        if hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
            env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
            try:
                subprocess.run(["apt-get", "update"], env=env, capture_output=True, timeout=600)
                r = subprocess.run(["apt-get", "install", "-y", "chromium", "chromium-driver"], env=env,
                                   capture_output=True, text=True, timeout=1200)
            except (OSError, subprocess.TimeoutExpired) as e:
                pytest.skip(f"installing chromium with apt-get failed: {e}")
            if r.returncode != 0 or not os.path.exists("/usr/bin/chromium"):
                pytest.skip(f"apt-get install chromium chromium-driver failed: {r.stderr.strip()[-300:]}")
            exe = "/usr/bin/chromium"
        else:
            pytest.skip("headless Chromium is not installed (/usr/bin/chromium missing) and this is not root, so it "
                        "cannot be installed: run 'apt-get install -y chromium chromium-driver' to enable this test")
    return exe


def run_chromium(exe: str, url: str, tmp: Path, *extra: str) -> subprocess.CompletedProcess:
    profile = tmp / "chromium-profile"
    profile.mkdir(exist_ok=True)
    return subprocess.run([exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *extra, url], capture_output=True,
                          text=True, timeout=120)


# ---------------------------------------------------------------------------- tests
def test_tree_is_discovered_with_roles(tree):
    data_runs, runs = discover(tree)
    assert [d.path.name for d in data_runs] == ["data"]
    roles = {r.path.name: r.role for r in runs}
    assert roles["undefended"] == "undefended"
    for name in ("dbd", "bcu"):
        if (tree / name).is_dir():
            assert roles[name] == name
    assert all(r.data is not None and r.data.path.name == "data" for r in runs)


def test_files_written_and_summary_matches_metrics(built):
    tree, summary = built
    for f in ("report.html", "report.md", "summary.json"):
        assert (tree / f).is_file(), f
    on_disk = json.loads((tree / "summary.json").read_text())
    assert on_disk["rows"] == json.loads(json.dumps(summary["rows"]))
    by_role = {r["role"]: r for r in summary["rows"]}
    for role, row in by_role.items():
        m = headline(json.loads((Path(row["run_dir"]) / "metrics.json").read_text())["final"])
        for k in ("clean_accuracy", "attack_success_rate", "robust_accuracy"):
            assert row[k] == pytest.approx(m[k], abs=0), (role, k)
    und = by_role["undefended"]
    assert und["der"] is None
    for role in ("dbd", "bcu"):
        if role in by_role:
            r = by_role[role]
            want = (max(0, und["attack_success_rate"] - r["attack_success_rate"])
                    - max(0, und["clean_accuracy"] - r["clean_accuracy"]) + 1) / 2
            assert r["der"] == pytest.approx(want)


def test_html_is_self_contained_and_tables_hold_measured_numbers(built):
    tree, summary = built
    html = (tree / "report.html").read_text()
    page = parse(html)
    assert page.external == [], "the report must not fetch anything"
    assert page.imgs and all(s.startswith("data:image/png;base64,") for s in page.imgs)
    assert len(page.imgs) == len(summary["figures"])
    results = rows_of(page.tables["results"])
    for row in summary["rows"]:
        cells = results[row["label"]]
        m = headline(json.loads((Path(row["run_dir"]) / "metrics.json").read_text())["final"])
        for col, key in ((1, "clean_accuracy"), (2, "attack_success_rate"), (3, "robust_accuracy")):
            text, value = cells[col]
            assert float(value) == m[key]
            assert text == f"{100 * m[key]:.1f}%"
    if (tree / "dbd").is_dir():
        assert "detection" in page.tables
        det = read_detection(tree / "dbd" / "detection.csv")
        removed = len(det["kept"]) - sum(det["kept"])
        drow = page.tables["detection"][1]
        assert int(drow[2][1]) == removed
        assert any(n.endswith("-detection") for n in summary["figures"])
    assert any(n.endswith("-features") for n in summary["figures"])
    assert any(n.endswith("-examples") for n in summary["figures"])
    assert "examples" in page.tables


def test_markdown_links_existing_pngs(built):
    tree, summary = built
    md = (tree / "report.md").read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(links) == len(summary["figures"])
    for link in links:
        png = tree / link
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    und = next(r for r in summary["rows"] if r["role"] == "undefended")
    assert f"{100 * und['attack_success_rate']:.1f}%" in md


def test_chromium_loads_every_image(built, chromium, tmp_path):
    tree, summary = built
    url = (tree / "report.html").resolve().as_uri()
    r = run_chromium(chromium, url, tmp_path, "--virtual-time-budget=5000", "--dump-dom")
    assert r.returncode == 0, r.stderr[-2000:]
    m = re.search(r'data-images-loaded="(\d+)/(\d+)"', r.stdout)
    assert m, f"the page's load handler did not run; body tag: {r.stdout[:300]}"
    loaded, total = int(m.group(1)), int(m.group(2))
    assert total == len(summary["figures"]) and loaded == total
    # The rendered DOM still carries the measured numbers.
    page = parse(r.stdout)
    und = next(r for r in summary["rows"] if r["role"] == "undefended")
    assert rows_of(page.tables["results"])["Undefended"][2][0] == f"{100 * und['attack_success_rate']:.1f}%"
    shot = tmp_path / "report.png"
    r = run_chromium(chromium, url, tmp_path, "--window-size=1280,2400", f"--screenshot={shot}")
    assert r.returncode == 0 and shot.is_file(), r.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 50_000


# ---------------------------------------------------------------------------- robustness, no training needed
def test_every_run_writes_the_metrics_schema(tree):
    """train and each defense write before / final / stages in the one schema the report reads."""
    _, runs = discover(tree)
    for r in runs:
        m = json.loads((r.path / "metrics.json").read_text())
        assert m["schema"] == 1 and m["method"] == r.role and m["label"]
        assert set(m["final"]) >= {"clean_accuracy", "attack_success_rate", "robust_accuracy"}
        assert isinstance(m["stages"], dict) and isinstance(m["seconds"]["total"], float)
    by_role = {r.role: r for r in runs}
    assert by_role["undefended"].before is None
    if "bcu" in by_role:
        assert by_role["bcu"].before == pytest.approx(by_role["undefended"].final)  # the model it started from
    if "dbd" in by_role:
        assert list(by_role["dbd"].stages) == ["after_stage2", "after_stage3", "after_polish"]


def test_history_normalised_per_stage():
    assert list(history_stages([{"epoch": 1, "loss": 1.0}])) == ["training"]
    h = history_stages({"simclr": [{"epoch": 1, "loss": 5.0}], "linear": [], "mixmatch": [{"epoch": 1, "loss": 1.0}]})
    assert list(h) == ["simclr", "mixmatch"]  # an empty stage has nothing to draw
    assert history_stages({"loss": [1.0, 0.5]}) == {"training": [{"loss": 1.0}, {"loss": 0.5}]}
    assert history_stages(None) == {} and history_stages("junk") == {}


def test_report_survives_sparse_runs(tmp_path):
    """Runs with no model, no history and numbers missing still give a report (blanks)."""
    (tmp_path / "a").mkdir()
    write_json(tmp_path / "a" / "metrics.json", run_metrics("undefended", "Undefended", {"clean_accuracy": 0.91}))
    (tmp_path / "dbd-run").mkdir()
    (tmp_path / "dbd-run" / "detection.csv").write_text("index,label,loss,kept\n0,1,0.5,1\n1,0,3.0,0\n")
    write_json(tmp_path / "dbd-run" / "metrics.json", run_metrics("dbd", "DBD", None))
    s = build_report(tmp_path, tmp_path / "out" / "r.html", ReportOptions(embed_points=0))
    assert {r["role"] for r in s["rows"]} >= {"dbd"}
    html = (tmp_path / "out" / "r.html").read_text()
    assert "91.0%" in html and (tmp_path / "out" / "summary.json").is_file()


@pytest.mark.parametrize("content", ["{not json", '{"clean_accuracy": 0.9}', '{"schema": 1, "method": "", "label": "x"}'])
def test_a_folder_the_report_cannot_read_is_a_clear_error(tmp_path, content):
    """No guessing from aliases or folder names: a metrics.json outside the schema names its folder."""
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "metrics.json").write_text(content)
    with pytest.raises(UnbackdoorError, match="odd"):
        build_report(tmp_path, tmp_path / "r.html", ReportOptions(embed_points=0))
    if content.startswith('{"clean'):
        with pytest.raises(RunFormatError, match="schema"):
            discover(tmp_path)


def test_scattered_cli_runs_find_their_data(tmp_path):
    """Runs outside the demo layout are tied to their data by what they recorded:
    train's ``data:``, DBD's ``provenance.data``, BCU's ``provenance.teacher``."""
    for name in ("d1", "d2"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "train.npz").write_bytes(b"")  # discovery only looks at file names
        write_json(tmp_path / name / "attack.json", {"name": "badnets" if name == "d1" else "blended", "target": 0})
    runs = {"models/und": {"command": "train", "data": str(tmp_path / "d1")},
            "x/dbd-run": {"command": "dbd", "data": "train", "provenance": {"data": str(tmp_path / "d1")}},
            "y/cleansed": {"command": "bcu", "provenance": {"teacher": str(tmp_path / "models/und")}},
            "z/other": {"command": "train", "data": str(tmp_path / "d2")}}
    for rel, cfg in runs.items():
        (tmp_path / rel).mkdir(parents=True)
        write_yaml(tmp_path / rel / "config.yaml", cfg)
        method = cfg["command"] if cfg["command"] != "train" else "undefended"
        write_json(tmp_path / rel / "metrics.json", run_metrics(method, method.upper(), {"clean_accuracy": 0.9}))
    _, found = discover(tmp_path)
    got = {r.path.relative_to(tmp_path).as_posix(): (r.role, r.data.path.name if r.data else None) for r in found}
    assert got == {"models/und": ("undefended", "d1"), "x/dbd-run": ("dbd", "d1"), "y/cleansed": ("bcu", "d1"),
                   "z/other": ("undefended", "d2")}


def test_report_errors_are_clear(tmp_path):
    with pytest.raises(UnbackdoorError, match="not found"):
        build_report(tmp_path / "missing")
    with pytest.raises(UnbackdoorError, match="no runs found"):
        build_report(tmp_path)


def test_cli_report(built, tmp_path, capsys):
    from unbackdoor.cli.main import main

    tree, _ = built
    out = tmp_path / "elsewhere" / "page.html"
    assert main(["report", str(tree), "--out", str(out), "--points", "0", "--quiet"]) == 0
    assert out.is_file() and (out.parent / "report.md").is_file() and (out.parent / "summary.json").is_file()
    assert "Undefended" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "not found" in capsys.readouterr().err
