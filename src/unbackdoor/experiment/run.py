"""The end-to-end experiment behind ``unbackdoor demo`` and ``unbackdoor sweep``.

One *experiment* = one attack on one dataset, in one folder::

    OUT/data/         poisoned data (``unbackdoor poison``)
    OUT/undefended/   the backdoored model trained on it (``unbackdoor train``)
    OUT/dbd/          DBD trained from scratch on the poisoned data
    OUT/bcu/          BCU: the undefended model cleansed with the held-out unlabeled images
    OUT/evaluation.json   every saved model re-loaded from disk and measured again
    OUT/report.html, report.md, summary.json

A stage is finished when its ``metrics.json`` exists; re-running skips it, and
an interrupted stage continues from its checkpoints. ``OUT/experiment.json``
records what was asked for, so a re-run with other settings is refused instead
of silently mixing two experiments.
"""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

from unbackdoor.core.errors import UnbackdoorError, unknown_name
from unbackdoor.core.files import read_json, write_json

PRESETS = ("quick", "paper")
DEFENSES = ("dbd", "bcu")


@dataclass
class ExperimentSpec:
    """What one experiment runs. ``preset`` selects the DBD / BCU settings
    (``quick``: mnist5k / cnn-small on 2 CPU cores; ``paper``: the papers' settings)."""

    attack: str = "badnets"
    dataset: str = "mnist5k"
    defenses: tuple[str, ...] = DEFENSES
    preset: str = "quick"
    seed: int = 0
    rate: float = 0.1
    target: int = 0
    model: str | None = None  # None: the dataset's default (cnn-small for digits, resnet18 for CIFAR / GTSRB)
    root: str | None = None  # local files for cifar10 / gtsrb / ...
    params: dict[str, Any] = field(default_factory=dict)  # attack parameters

    @property
    def model_name(self) -> str:
        if self.model:
            return self.model
        from unbackdoor.data.loaders import dataset_info, dataset_names

        return dataset_info(self.dataset).default_model if self.dataset in dataset_names() else "cnn-small"

    def validate(self) -> None:
        from unbackdoor.data.loaders import dataset_info, dataset_names

        if self.dataset in dataset_names():
            if dataset_info(self.dataset).needs_root and not self.root:
                raise UnbackdoorError(f"dataset {self.dataset!r} is read from local files: pass --root PATH")
        elif not Path(self.dataset).exists():
            raise unknown_name("dataset", self.dataset, dataset_names())
        if self.preset not in PRESETS:
            raise unknown_name("preset", self.preset, PRESETS)
        for d in self.defenses:
            if d not in DEFENSES:
                raise unknown_name("defense", d, DEFENSES)
        from unbackdoor.attacks.base import attack_names

        if self.attack not in attack_names():
            raise unknown_name("attack", self.attack, attack_names())

    def key(self) -> dict:
        """The settings a finished stage depends on (``defenses`` may grow between runs)."""
        d = asdict(self)
        d.pop("defenses")
        d["model"] = self.model_name
        return d


# ---------------------------------------------------------------------------- progress display
def _clock(s: float) -> str:
    s = max(0, int(round(s)))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class StageDisplay:
    """``[3/6] DBD ...`` headers, a bar with ETA for stages that report progress,
    and a closing line with the stage's time. On a terminal the bar redraws in
    place; in a log it prints a line every 10%."""

    def __init__(self, total: int, prefix: str = "", file: TextIO | None = None, enabled: bool = True):
        self.total, self.prefix, self.enabled = total, prefix, enabled
        self.file = file or sys.stderr
        self.tty = self.file.isatty() if hasattr(self.file, "isatty") else False
        self.i = 0
        self.t_all = time.perf_counter()
        self._t0 = self._work = self._done = 0.0
        self._name = ""
        self._last_decile = -1
        self._first = True
        self._ref: float | None = None

    def _tag(self) -> str:
        return f"{self.prefix}[{self.i}/{self.total}]"

    def say(self, msg: str) -> None:
        if self.enabled:
            if self.tty:
                self.file.write("\r\033[K")
            print(msg, file=self.file, flush=True)

    def start(self, name: str, detail: str = "", work: float = 0.0) -> None:
        self.i += 1
        self._name, self._t0, self._work, self._done, self._last_decile = name, time.perf_counter(), work, 0.0, -1
        self._first, self._ref = True, None
        self.say(f"{self._tag()} {name}" + (f" — {detail}" if detail else ""))
        if work > 0 and self.tty:
            self.advance(0.0, "starting")

    def advance(self, amount: float, note: str = "") -> None:
        """Report progress within the stage (``amount`` in the units of ``work``)."""
        self.update_to(self._done + amount, note, amount)

    def update_to(self, done: float, note: str = "", amount: float | None = None) -> None:
        """Set the progress within the stage to ``done`` (units of ``work``); ``amount``: the
        part of it done since the last call (a resumed run starts part-way: only what this
        run did counts towards the speed behind the ETA)."""
        amount = done - self._done if amount is None else amount
        if not self.enabled or self._work <= 0:
            return
        if self._ref is None:
            self._ref = max(0.0, done - amount)
        self._done = min(self._work, max(0.0, done))
        frac = self._done / self._work
        el = time.perf_counter() - self._t0
        rate = (self._done - self._ref) / el if el > 0 else 0.0
        eta = (self._work - self._done) / rate if rate > 0 else math.nan
        eta_s = _clock(eta) if math.isfinite(eta) else "?"
        if self.tty:
            width = 24
            fill = int(round(frac * width))
            bar = "█" * fill + "·" * (width - fill)
            self.file.write(f"\r\033[K{self._tag()} {self._name} |{bar}| {100 * frac:3.0f}% "
                            f"{_clock(el)} elapsed, ETA {eta_s}  {note}")
            self.file.flush()
        else:
            dec = int(frac * 10)
            if dec > self._last_decile or (self._first and amount > 0):  # every 10%, and the first estimate
                self._last_decile = dec
                self._first = self._first and amount <= 0
                print(f"{self._tag()} {self._name} {100 * frac:3.0f}% · {_clock(el)} elapsed, ETA {eta_s} · {note}",
                      file=self.file, flush=True)

    def done(self, note: str = "") -> float:
        el = time.perf_counter() - self._t0
        self.say(f"{self._tag()} {self._name} done in {_clock(el)}" + (f" · {note}" if note else "")
                 + f" (total {_clock(time.perf_counter() - self.t_all)})")
        return el

    def skip(self, name: str, why: str) -> None:
        self.i += 1
        self.say(f"{self._tag()} {name} — {why}")


# ---------------------------------------------------------------------------- one experiment
def _finished(folder: Path) -> bool:
    return (folder / "metrics.json").is_file()


def _read(path: Path) -> Any:
    try:
        return read_json(path)
    except UnbackdoorError:
        return None


def _newer_than(target: Path, sources: list[Path]) -> bool:
    """``target`` exists and no existing source was written after it."""
    if not target.is_file():
        return False
    t = target.stat().st_mtime_ns
    return all(not p.is_file() or p.stat().st_mtime_ns <= t for p in sources)


# The attacked model trains for at least this many SGD steps (batch 64): what cnn-small
# needs to reach its clean accuracy on 3,500 Fashion-MNIST images (~74 epochs: BA 0.91,
# vs 0.86 after 12); on mnist5k it changes little. On a larger set it is fewer epochs.
ATTACKED_MODEL_STEPS = 4000


def _train_config(spec: ExperimentSpec, engine, n_train: int):
    from unbackdoor.attacks.base import attack_class
    from unbackdoor.training.fit import TrainConfig

    # Both presets train the attacked model the same way: it is the thing being
    # attacked, not a method under test. Long enough to reach what the architecture
    # can (a fair undefended reference), and for as many epochs as the attack needs to take (WaNet: 30).
    base = TrainConfig()
    epochs = max(base.epochs, attack_class(spec.attack).train_epochs,
                 math.ceil(ATTACKED_MODEL_STEPS / max(1, n_train // base.batch_size)))
    return TrainConfig(epochs=epochs, seed=spec.seed, engine=engine)


def defense_available(name: str) -> tuple[bool, str]:
    """Whether ``unbackdoor.defenses.<name>`` can be imported in this build (and why not)."""
    import importlib

    try:
        importlib.import_module(f".defenses.{name}", __package__)
    except ImportError as e:
        return False, f"unbackdoor.defenses.{name} is not available in this build ({e})"
    return True, ""


def _check_spec(out: Path, spec: ExperimentSpec, force: bool) -> None:
    f = out / "experiment.json"
    if not f.is_file() or force:
        return
    try:
        old = read_json(f).get("spec", {})
    except (UnbackdoorError, AttributeError):
        return
    new = spec.key()
    diff = [k for k in new if k in old and old[k] != new[k]]
    if diff:
        what = ", ".join(f"{k}: {old[k]!r} -> {new[k]!r}" for k in diff)
        raise UnbackdoorError(f"{out} holds an experiment with other settings ({what}); "
                              "choose another --out or pass --force to start over")


def load_experiment_configs(path: str | os.PathLike | None, preset: str = "quick") -> dict[str, Any]:
    """Read a YAML file with optional ``train:``, ``dbd:`` and ``bcu:`` sections; each
    overrides that stage's settings (``dbd``/``bcu`` on top of the preset)."""
    from unbackdoor.core.config import load_config
    from unbackdoor.core.files import read_yaml
    from unbackdoor.training.fit import TrainConfig

    if path is None:
        return {}
    data = read_yaml(path)
    unknown = sorted(set(data) - {"train", "dbd", "bcu"})
    if unknown:
        raise UnbackdoorError(f"{path}: unknown section(s) {', '.join(unknown)}; valid sections: train, dbd, bcu")
    out: dict[str, Any] = {}
    if "train" in data:
        out["train"] = load_config(TrainConfig(), path, "train")
    if "dbd" in data:
        from unbackdoor.defenses.dbd.config import dbd_preset

        out["dbd"] = load_config(dbd_preset(preset), path, "dbd")
    if "bcu" in data:
        from unbackdoor.defenses.bcu.distill import bcu_preset

        out["bcu"] = load_config(bcu_preset(preset), path, "bcu")
    return out


def run_experiment(out: str | os.PathLike, spec: ExperimentSpec | None = None, *, engine=None, force: bool = False,
                   display: StageDisplay | None = None, report: bool = True, embed_points: int = 1000,
                   configs: dict[str, Any] | None = None) -> dict:
    """Poison -> train undefended -> DBD -> BCU -> evaluate (-> report), resumable.

    ``configs`` may hold a ``TrainConfig`` (``"train"``), ``DBDConfig`` (``"dbd"``) or
    ``BCUConfig`` (``"bcu"``) replacing the preset's; their ``seed`` and ``engine`` are
    set from ``spec`` / ``engine``.
    Returns ``{"rows": [...], "skipped": {...}, "seconds": {...}}``: one row per
    model with its clean accuracy / ASR / robust accuracy / DER.
    """
    import shutil

    from unbackdoor.training.engine import EngineOptions

    spec = spec or ExperimentSpec()
    spec.validate()
    engine = engine or EngineOptions()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UnbackdoorError(f"output path {out} exists and is not a directory")
    if force and out.is_dir():
        # Only what an experiment writes: --out might be a folder holding other things too.
        for name in ("data", "undefended", *DEFENSES, "report_figures"):
            if (out / name).is_dir():
                shutil.rmtree(out / name)
        for name in ("experiment.json", "evaluation.json", "report.html", "report.md", "summary.json"):
            (out / name).unlink(missing_ok=True)
    _check_spec(out, spec, force)
    out.mkdir(parents=True, exist_ok=True)
    record = {"spec": spec.key(), "defenses": list(spec.defenses)}
    if not (out / "experiment.json").is_file() or _read(out / "experiment.json") != record:
        write_json(out / "experiment.json", record)  # rewritten only on change: it dates the report (below)
    n_stages = 2 + len(spec.defenses) + 1 + (1 if report else 0)  # poison, undefended, defenses, evaluate, report
    disp = display or StageDisplay(n_stages)
    if display is not None:
        disp.total, disp.i = n_stages, 0
    seconds: dict[str, float] = {}
    skipped: dict[str, str] = {}

    # 1. poison
    from unbackdoor.attacks.poisoned_data import load_data
    from unbackdoor.experiment.pipeline import poison

    data_dir = out / "data"
    if _finished(data_dir):
        disp.skip("poison", f"done already ({data_dir})")
        pd = load_data(data_dir)
    else:
        disp.start("poison", f"{spec.attack} on {spec.dataset}, {spec.rate:.0%} of the training set → target {spec.target}")
        pd = poison(spec.dataset, spec.attack, data_dir, rate=spec.rate, target=spec.target, seed=spec.seed,
                    root=spec.root, params=spec.params, force=True)
        pd = load_data(data_dir)  # exactly what later runs will read
        m = pd.meta
        seconds["poison"] = disp.done(f"{m.get('n_poisoned')} of {m.get('n_train')} training images poisoned")

    # 2. the undefended (backdoored) model
    from unbackdoor.experiment.pipeline import train

    und_dir = out / "undefended"
    if _finished(und_dir):
        disp.skip("train undefended model", f"done already ({und_dir})")
    else:
        cfg = replace(configs["train"], seed=spec.seed, engine=engine) if configs and "train" in configs else _train_config(spec, engine, len(pd.train))
        disp.start("train undefended model", f"{spec.model_name}, {cfg.epochs} epochs on the poisoned data")
        m = train(pd, und_dir, spec.model_name, cfg, resume=True)
        seconds["undefended"] = disp.done(_brief(m))

    # 3. defenses
    for name in spec.defenses:
        d_dir = out / name
        label = name.upper()
        ok, why = defense_available(name)
        if _finished(d_dir):
            disp.skip(label, f"done already ({d_dir})")
        elif not ok:
            disp.skip(label, f"skipped: {why}")
            skipped[name] = why
        elif name == "dbd":
            seconds["dbd"] = _run_dbd(spec, pd, d_dir, engine, disp, (configs or {}).get("dbd"))
        elif name == "bcu":
            seconds["bcu"] = _run_bcu(spec, pd, und_dir, d_dir, engine, disp, (configs or {}).get("bcu"))

    # 4. evaluate every saved model again, from disk (skipped when no run changed since)
    inputs = [out / "experiment.json", *(out / n / "metrics.json" for n in ("data", "undefended", *DEFENSES))]
    if _newer_than(out / "evaluation.json", inputs):
        disp.skip("evaluate", f"done already ({out / 'evaluation.json'})")
    else:
        disp.start("evaluate", "re-load every saved model and measure it on the clean and triggered test set")
        evaluation = evaluate_saved(out, pd)
        write_json(out / "evaluation.json", evaluation)
        bad = [k for k, v in evaluation.items() if v.get("mismatch")]
        seconds["evaluate"] = disp.done("all saved models reproduce their metrics.json" if not bad
                                        else f"differs from metrics.json: {', '.join(bad)}")

    # 5. report (skipped when up to date; `unbackdoor report OUT` rebuilds it any time)
    summary = None
    if report:
        from unbackdoor.report.build import ReportOptions, build_report

        if _newer_than(out / "summary.json", [*inputs, out / "evaluation.json"]) and (out / "report.html").is_file():
            disp.skip("report", f"up to date ({out / 'report.html'})")
            summary = _read(out / "summary.json")
        else:
            disp.start("report", f"{out / 'report.html'}")
            title = f"unbackdoor demo: {spec.attack} on {spec.dataset}"
            summary = build_report(out, out / "report.html",
                                   ReportOptions(embed_points=embed_points, seed=spec.seed, title=title, log=disp.say))
            seconds["report"] = disp.done(f"{len(summary.get('figures', []))} figures")
    rows = experiment_rows(out)
    return {"rows": rows, "skipped": skipped, "seconds": seconds, "summary": summary, "out": str(out)}


def _brief(m: dict) -> str:
    from unbackdoor.report.content import pct

    parts = [f"clean accuracy {pct(m.get('clean_accuracy'))}"]
    if m.get("attack_success_rate") is not None:
        parts.append(f"ASR {pct(m.get('attack_success_rate'))}")
    return ", ".join(parts)


def _run_dbd(spec: ExperimentSpec, pd, d_dir: Path, engine, disp: StageDisplay, cfg=None) -> float:
    from unbackdoor.defenses.dbd.config import dbd_preset
    from unbackdoor.defenses.dbd.stages import run_dbd
    from unbackdoor.experiment.pipeline import build_model
    from unbackdoor.training.engine import set_seed

    custom = cfg is not None
    cfg = cfg or dbd_preset(spec.preset)
    cfg = replace(cfg, seed=spec.seed, engine=replace(engine, progress=False))
    n = len(pd.train)
    s, l, mm = cfg.simclr, cfg.linear, cfg.mixmatch
    # Relative cost of one epoch of each stage, so the ETA does not treat a SimCLR epoch
    # like a linear-head epoch. Calibrated on the quick preset (mnist5k, cnn-small, CPU):
    # SimCLR 0.7, linear head 0.5, MixMatch (200 it.) 2.3 minutes per epoch on a loaded machine.
    cost = {"simclr": 2.0 * (n // s.batch_size) * s.batch_size, "linear": 1.4 * n,
            "mixmatch": mm.iterations * mm.batch_size * 1.75}
    epochs = {"simclr": s.epochs, "linear": l.epochs, "mixmatch": mm.epochs}
    work = sum(cost[k] * epochs[k] for k in cost)
    disp.start("DBD", f"SimCLR {s.epochs} ep → linear head ≤{l.epochs} ep → MixMatch {mm.epochs}×{mm.iterations} it "
               f"({'your config' if custom else spec.preset + ' preset'})", work=work)

    order = list(cost)

    def on_epoch(stage: str, rec: dict) -> None:
        bits = [f"{stage} {rec.get('epoch', '?')}/{epochs.get(stage, '?')}"]
        for k, short in (("loss", "loss"), ("clean_accuracy", "BA"), ("attack_success_rate", "ASR")):
            if isinstance(rec.get(k), (int, float)):
                bits.append(f"{short} {rec[k]:.3g}")
        # Absolute position: earlier stages count as complete (the linear head may stop
        # early), and a resumed run starts where its checkpoints are.
        i = order.index(stage) if stage in order else len(order)
        done = sum(cost[k] * epochs[k] for k in order[:i])
        ep = rec.get("epoch")
        done += cost.get(stage, 0.0) * (ep if isinstance(ep, (int, float)) else 1)
        disp.update_to(done, " · ".join(bits), amount=cost.get(stage, 0.0))

    set_seed(spec.seed)
    model = build_model(spec.model_name, pd)
    res = run_dbd(model, pd, cfg, d_dir, resume=True, on_epoch=on_epoch,
                  provenance={"data": str(d_dir.parent / "data"), "preset": spec.preset})
    det = res.metrics.get("detection", {})
    note = _brief(res.metrics)
    if "recall" in det:
        note += f", poisoned samples found {det.get('true_positives', '?')}/{det.get('poisoned', '?')}"
    return disp.done(note)


def _run_bcu(spec: ExperimentSpec, pd, und_dir: Path, d_dir: Path, engine, disp: StageDisplay, cfg=None) -> float:
    from unbackdoor.defenses.bcu.distill import bcu_preset, run_bcu
    from unbackdoor.models.model_dir import load_model

    if pd.heldout is None or len(pd.heldout) == 0:
        raise UnbackdoorError(f"{und_dir.parent / 'data'} has no held-out images for BCU")
    custom = cfg is not None
    cfg = replace(cfg or bcu_preset(spec.preset), seed=spec.seed, engine=engine)
    disp.start("BCU", f"distil the undefended model into a re-initialised copy, {cfg.epochs} epochs on "
               f"{len(pd.heldout)} held-out unlabeled images ({'your config' if custom else spec.preset + ' preset'})")
    teacher = load_model(und_dir)
    res = run_bcu(teacher, pd.heldout, cfg, d_dir, resume=True, test=pd.test, attack=pd.attack,
                  provenance={"teacher": str(und_dir), "unlabeled": str(und_dir.parent / "data" / "heldout.npz")})
    after = res.metrics.get("after", {})
    note = _brief(after) if after else ""
    if isinstance(res.metrics.get("der"), (int, float)):
        note += f", DER {res.metrics['der']:.3f}"
    return disp.done(note)


def evaluate_saved(out: str | os.PathLike, pd=None) -> dict[str, dict]:
    """Re-load each model folder of an experiment and measure it (same metrics as
    :func:`unbackdoor.metrics.evaluate`); ``mismatch`` flags a number that differs
    from the run's own metrics.json by more than 1e-6."""
    from unbackdoor.attacks.poisoned_data import load_data
    from unbackdoor.metrics import evaluate
    from unbackdoor.models.model_dir import load_model
    from unbackdoor.report.runs import final_metrics

    out = Path(out)
    pd = pd or load_data(out / "data")
    res = {}
    for name in ("undefended", *DEFENSES):
        d = out / name
        if not (d / "model.json").is_file():
            continue
        m = evaluate(load_model(d), pd.test, pd.attack)
        recorded = final_metrics(read_json(d / "metrics.json")) if (d / "metrics.json").is_file() else {}
        mism = [k for k, v in recorded.items() if v is not None and k in m and abs(m[k] - v) > 1e-6]
        res[name] = {**m, "mismatch": mism}
    return res


def experiment_rows(out: str | os.PathLike) -> list[dict]:
    """Rows (model, clean accuracy, ASR, robust accuracy, DER, seconds) of an experiment folder."""
    from unbackdoor.report.build import model_row
    from unbackdoor.report.runs import discover

    _, runs = discover(out)
    und = next((r for r in runs if r.role == "undefended"), None)
    order = {"undefended": 0, "dbd": 1, "bcu": 2}
    runs = sorted(runs, key=lambda r: order.get(r.role, 9))
    return [model_row(r, und) for r in runs]


def demo(out: str | os.PathLike = "runs/demo", attack: str = "badnets", preset: str = "quick", seed: int = 0,
         dataset: str = "mnist5k", defenses: tuple[str, ...] = DEFENSES, force: bool = False, engine=None,
         embed_points: int = 1000, progress: bool = True, configs: dict[str, Any] | None = None,
         root: str | None = None) -> dict:
    """``unbackdoor demo``: one full experiment on ``dataset`` (default: the embedded mnist5k,
    no download; ``root``: local files of cifar10 / gtsrb / ...) with the report. See :func:`run_experiment`."""
    spec = ExperimentSpec(attack=attack, dataset=dataset, defenses=tuple(defenses), preset=preset, seed=seed, root=root)
    disp = StageDisplay(0, enabled=progress)
    t0 = time.perf_counter()
    res = run_experiment(out, spec, engine=engine, force=force, display=disp, embed_points=embed_points,
                         configs=configs)
    res["total_seconds"] = time.perf_counter() - t0
    return res


# ---------------------------------------------------------------------------- sweep
def sweep(out: str | os.PathLike, attacks: list[str], defenses: tuple[str, ...] = DEFENSES, dataset: str = "mnist5k",
          preset: str = "quick", seed: int = 0, force: bool = False, engine=None, embed_points: int = 500,
          progress: bool = True, root: str | None = None, configs: dict[str, Any] | None = None) -> dict:
    """``unbackdoor sweep``: the attack x defense matrix, one experiment folder per attack
    (``OUT/<attack>/``), then one comparison table (``leaderboard.md`` / ``.csv``) and the
    HTML report over all of them. Finished cells are skipped on a re-run."""
    from unbackdoor.report.build import ReportOptions, build_report

    if not attacks:
        raise UnbackdoorError("--attacks needs at least one attack name")
    specs = [ExperimentSpec(attack=a, dataset=dataset, defenses=tuple(defenses), preset=preset, seed=seed, root=root)
             for a in attacks]
    for s in specs:
        s.validate()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UnbackdoorError(f"output path {out} exists and is not a directory")
    t0 = time.perf_counter()
    skipped = {}
    for i, s in enumerate(specs, 1):
        disp = StageDisplay(0, prefix=f"[{s.attack} {i}/{len(specs)}] ", enabled=progress)
        r = run_experiment(out / s.attack, s, engine=engine, force=force, display=disp, report=False, configs=configs)
        skipped.update({f"{s.attack}/{k}": v for k, v in r["skipped"].items()})
    say = StageDisplay(0, enabled=progress).say
    inputs = [p for s in specs for p in (out / s.attack / "experiment.json", out / s.attack / "evaluation.json",
                                         *(out / s.attack).glob("*/metrics.json"))]
    if (_newer_than(out / "summary.json", inputs) and (out / "leaderboard.csv").is_file()
            and isinstance(_read(out / "summary.json"), dict)):
        say(f"[sweep] report and leaderboard up to date ({out / 'report.html'})")
        summary = _read(out / "summary.json")
    else:
        say(f"[sweep] report over {len(specs)} attacks")
        summary = build_report(out, out / "report.html", ReportOptions(embed_points=embed_points, seed=seed,
                                                                      title=f"unbackdoor sweep on {dataset}", log=say))
        write_leaderboard(out, summary["rows"])
    rows = summary["rows"]
    return {"rows": rows, "skipped": skipped, "summary": summary, "total_seconds": time.perf_counter() - t0,
            "out": str(out)}


LEADERBOARD_COLUMNS = ["attack", "model", "clean_accuracy", "attack_success_rate", "robust_accuracy", "der",
                       "detection_recall", "detection_precision", "seconds", "run_dir"]


def leaderboard_records(rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        det = r.get("detection") or {}
        out.append({"attack": r.get("attack"), "model": r.get("label"), "clean_accuracy": r.get("clean_accuracy"),
                    "attack_success_rate": r.get("attack_success_rate"), "robust_accuracy": r.get("robust_accuracy"),
                    "der": r.get("der"), "detection_recall": det.get("recall"),
                    "detection_precision": det.get("precision"), "seconds": r.get("seconds"),
                    "run_dir": r.get("run_dir")})
    return out


def write_leaderboard(out: Path, rows: list[dict]) -> None:
    """``leaderboard.csv`` (exact numbers) and ``leaderboard.md`` (a readable table)."""
    import csv
    import io

    from unbackdoor.core.files import write_text
    from unbackdoor.report.content import num, pct

    recs = leaderboard_records(rows)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=LEADERBOARD_COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in recs:
        w.writerow({k: ("" if v is None else v) for k, v in r.items()})
    write_text(out / "leaderboard.csv", buf.getvalue())
    lines = ["# Leaderboard", "", "| attack | model | clean accuracy | ASR | robust accuracy | DER | detection recall | time |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in recs:
        secs = "—" if r["seconds"] is None else f"{r['seconds']:.0f} s"
        lines.append(f"| {r['attack']} | {r['model']} | {pct(r['clean_accuracy'])} | {pct(r['attack_success_rate'])} | "
                     f"{pct(r['robust_accuracy'])} | {num(r['der'])} | {num(r['detection_recall'])} | {secs} |")
    lines += ["", "ASR: attack success rate on triggered test images whose true label is not the target. "
              "DER against the undefended model of the same attack (1 = backdoor removed at no accuracy cost).", ""]
    write_text(out / "leaderboard.md", "\n".join(lines))
