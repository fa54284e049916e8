"""One experiment (``unbackdoor demo``; one attack of ``unbackdoor sweep``): one
attack on one dataset, in one folder::

    OUT/data/         poisoned data (``unbackdoor poison``)
    OUT/undefended/   the backdoored model trained on it (``unbackdoor train``)
    OUT/<defense>/    one folder per defense, each given what it needs: the poisoned
                      training set, the undefended model, the clean held-out images
                      (as unlabeled or as labelled clean data)
    OUT/evaluation.json   every saved model re-loaded from disk and measured again
    OUT/report.html, report.md, summary.json

A stage is finished when its ``metrics.json`` exists; re-running skips it, and
an interrupted stage continues from its checkpoints. ``OUT/experiment.json``
records what was asked for, so a re-run with other settings is refused instead
of silently mixing two experiments.
"""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

from unbackdoor.attacks.poisoned_data import PoisonedData, load_data
from unbackdoor.core import layout
from unbackdoor.core.errors import UnbackdoorError
from unbackdoor.core.files import lock_out_dir, read_json, release_out_dir, write_json
from unbackdoor.defenses import Defense, DefenseInputs, defense_names, get_defense
from unbackdoor.experiment.pipeline import poison, train
from unbackdoor.experiment.spec import ExperimentSpec, train_config
from unbackdoor.metrics import evaluate
from unbackdoor.models.model_dir import load_model
from unbackdoor.report import ReportOptions, build_report, model_row
from unbackdoor.report.content import pct
from unbackdoor.report.runs import discover, sort_runs
from unbackdoor.training.distributed import current_context
from unbackdoor.training.engine import EngineOptions


class Display(Protocol):
    """What an experiment reports its stages to (the CLI's ``StageDisplay``)."""

    total: int
    i: int

    def say(self, msg: str) -> None: ...
    def start(self, name: str, detail: str = "", work: float = 0.0) -> None: ...
    def update_to(self, done: float, note: str = "", amount: float | None = None) -> None: ...
    def done(self, note: str = "") -> float: ...
    def skip(self, name: str, why: str) -> None: ...


class QuietDisplay:
    """A display that shows nothing and times the stages."""

    def __init__(self) -> None:
        self.total = self.i = 0
        self._t0 = time.perf_counter()

    def say(self, msg: str) -> None:
        pass

    def start(self, name: str, detail: str = "", work: float = 0.0) -> None:
        self.i += 1
        self._t0 = time.perf_counter()

    def update_to(self, done: float, note: str = "", amount: float | None = None) -> None:
        pass

    def done(self, note: str = "") -> float:
        return time.perf_counter() - self._t0

    def skip(self, name: str, why: str) -> None:
        self.i += 1


def finished(folder: Path) -> bool:
    return (folder / layout.METRICS).is_file()


def read_or_none(path: Path) -> Any:
    try:
        return read_json(path)
    except UnbackdoorError:
        return None


def newer_than(target: Path, sources: list[Path]) -> bool:
    """``target`` exists and no existing source was written after it."""
    if not target.is_file():
        return False
    t = target.stat().st_mtime_ns
    return all(not p.is_file() or p.stat().st_mtime_ns <= t for p in sources)


def _check_spec(out: Path, spec: ExperimentSpec, force: bool) -> None:
    f = out / layout.EXPERIMENT
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
                              "choose another output folder or start it over")


def _brief(m: dict | None) -> str:
    m = m or {}
    parts = [f"clean accuracy {pct(m.get('clean_accuracy'))}"]
    if m.get("attack_success_rate") is not None:
        parts.append(f"ASR {pct(m.get('attack_success_rate'))}")
    return ", ".join(parts)


def _clear(out: Path) -> None:
    """Remove what an experiment writes (only that: the folder may hold other things too)."""
    for name in (layout.DATA_DIR, layout.UNDEFENDED_DIR, *defense_names(), layout.REPORT_FIGURES):
        if (out / name).is_dir():
            shutil.rmtree(out / name)
    for name in (layout.EXPERIMENT, layout.EVALUATION, layout.REPORT_HTML, layout.REPORT_MD, layout.SUMMARY):
        (out / name).unlink(missing_ok=True)


def run_experiment(out: str | os.PathLike, spec: ExperimentSpec | None = None, *, engine=None, force: bool = False,
                   display: Display | None = None, report: bool = True, embed_points: int = 1000,
                   configs: dict[str, Any] | None = None) -> dict:
    """Poison -> train undefended -> each defense -> evaluate (-> report), resumable.

    ``configs`` may hold a ``TrainConfig`` (``"train"``) or a defense's config (its
    name) replacing the preset's; their ``seed`` and ``engine`` are set from
    ``spec`` / ``engine``. Returns ``{"rows": [...], "seconds": {...}, ...}``: one
    row per model with its clean accuracy / ASR / robust accuracy / DER.
    """
    spec = spec or ExperimentSpec()
    spec.validate()
    engine = engine or EngineOptions()
    configs = configs or {}
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UnbackdoorError(f"output path {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    held = current_context().is_main
    if held:
        lock_out_dir(out)  # another process running this experiment would interleave its runs
    try:
        return _run_experiment(out, spec, engine, force, display, report, embed_points, configs)
    finally:
        if held:
            release_out_dir(out)


def _run_experiment(out: Path, spec: ExperimentSpec, engine: EngineOptions, force: bool, display: Display | None,
                    report: bool, embed_points: int, configs: dict[str, Any]) -> dict:
    if force:
        _clear(out)
    _check_spec(out, spec, force)
    record = {"spec": spec.key(), "defenses": list(spec.defenses)}
    if not (out / layout.EXPERIMENT).is_file() or read_or_none(out / layout.EXPERIMENT) != record:
        write_json(out / layout.EXPERIMENT, record)  # rewritten only on change: it dates the report (below)
    n_stages = 2 + len(spec.defenses) + 1 + (1 if report else 0)  # poison, undefended, defenses, evaluate, report
    disp = display or QuietDisplay()
    disp.total, disp.i = n_stages, 0
    seconds: dict[str, float] = {}

    # 1. poison
    data_dir = out / layout.DATA_DIR
    if finished(data_dir):
        disp.skip("poison", f"done already ({data_dir})")
        pd = load_data(data_dir)
    else:
        disp.start("poison", f"{spec.attack} on {spec.dataset}, {spec.rate:.0%} of the training set → target {spec.target}")
        poison(spec.dataset, spec.attack, data_dir, rate=spec.rate, target=spec.target, seed=spec.seed,
               root=spec.root, params=spec.params, force=True)
        pd = load_data(data_dir)  # exactly what later runs will read
        m = pd.meta
        seconds["poison"] = disp.done(f"{m.get('n_poisoned')} of {m.get('n_train')} training images poisoned")

    # 2. the undefended (backdoored) model
    und_dir = out / layout.UNDEFENDED_DIR
    if finished(und_dir):
        disp.skip("train undefended model", f"done already ({und_dir})")
    else:
        cfg = (replace(configs["train"], seed=spec.seed, engine=engine) if "train" in configs
               else train_config(spec, engine, len(pd.train)))
        disp.start("train undefended model", f"{spec.model_name}, {cfg.epochs} epochs on the poisoned data")
        m = train(pd, und_dir, spec.model_name, cfg, resume=True)
        seconds[layout.UNDEFENDED_DIR] = disp.done(_brief(m))

    # 3. defenses
    for name in spec.defenses:
        defense = get_defense(name)
        d_dir = out / name
        if finished(d_dir):
            disp.skip(defense.label, f"done already ({d_dir})")
        else:
            seconds[name] = _run_defense(defense, spec, pd, out, engine, disp, configs.get(name))

    # 4. evaluate every saved model again, from disk (skipped when no run changed since)
    inputs = [out / layout.EXPERIMENT, *(out / n / layout.METRICS
                                          for n in (layout.DATA_DIR, layout.UNDEFENDED_DIR, *spec.defenses))]
    if newer_than(out / layout.EVALUATION, inputs):
        disp.skip("evaluate", f"done already ({out / layout.EVALUATION})")
    else:
        disp.start("evaluate", "re-load every saved model and measure it on the clean and triggered test set")
        evaluation = evaluate_saved(out, pd)
        write_json(out / layout.EVALUATION, evaluation)
        bad = [k for k, v in evaluation.items() if v.get("mismatch")]
        seconds["evaluate"] = disp.done("all saved models reproduce their metrics.json" if not bad
                                        else f"differs from metrics.json: {', '.join(bad)}")

    # 5. report (skipped when up to date; `unbackdoor report OUT` rebuilds it any time)
    summary = None
    if report:
        if newer_than(out / layout.SUMMARY, [*inputs, out / layout.EVALUATION]) and (out / layout.REPORT_HTML).is_file():
            disp.skip("report", f"up to date ({out / layout.REPORT_HTML})")
            summary = read_or_none(out / layout.SUMMARY)
        else:
            disp.start("report", f"{out / layout.REPORT_HTML}")
            title = f"unbackdoor demo: {spec.attack} on {spec.dataset}"
            summary = build_report(out, out / layout.REPORT_HTML,
                                   ReportOptions(embed_points=embed_points, seed=spec.seed, title=title, log=disp.say))
            seconds["report"] = disp.done(f"{len(summary.get('figures', []))} figures")
    rows = experiment_rows(out)
    return {"rows": rows, "seconds": seconds, "summary": summary, "out": str(out)}


def experiment_inputs(defense: Defense, spec: ExperimentSpec, pd: PoisonedData, out: Path) -> DefenseInputs:
    """What ``defense`` needs, from the experiment's folders: the poisoned training set,
    the undefended model, the clean held-out split (unlabeled or labelled)."""
    needs = set(defense.needs)
    inputs = DefenseInputs(test=pd.test, attack=pd.attack)
    data_dir, und_dir = out / layout.DATA_DIR, out / layout.UNDEFENDED_DIR
    if "train_set" in needs:
        inputs.train, inputs.arch = pd.train, spec.model_name
        inputs.provenance.update({"data": str(data_dir), "preset": spec.preset})
    if "model" in needs:
        inputs.model = load_model(und_dir)
        inputs.provenance["teacher"] = str(und_dir)
    if needs & {"unlabeled", "clean_labelled"}:
        if pd.heldout is None or len(pd.heldout) == 0:
            raise UnbackdoorError(f"{data_dir} has no held-out images for {defense.label}")
        if "unlabeled" in needs:
            inputs.unlabeled = pd.heldout
            inputs.provenance["unlabeled"] = str(data_dir / layout.HELDOUT)
        if "clean_labelled" in needs:
            inputs.clean = pd.heldout
            inputs.provenance["clean"] = str(data_dir / layout.HELDOUT)
    return inputs


def _run_defense(defense: Defense, spec: ExperimentSpec, pd: PoisonedData, out: Path, engine, disp: Display,
                 cfg=None) -> float:
    custom = cfg is not None
    cfg = replace(cfg or defense.preset(spec.preset), seed=spec.seed, engine=replace(engine, progress=False))
    inputs = experiment_inputs(defense, spec, pd, out)
    detail = defense.describe(cfg, inputs)
    disp.start(defense.label, (f"{detail} " if detail else "") + f"({'your config' if custom else spec.preset + ' preset'})",
               work=1.0)
    res = defense.run(inputs, cfg, out / defense.name, resume=True,
                      progress=lambda frac, note: disp.update_to(frac, note))
    m = res.metrics
    note = _brief(m.get("final")) if m.get("final") else ""
    det = m.get("detection") or {}
    if "recall" in det:
        note += f", poisoned samples found {det.get('true_positives', '?')}/{det.get('poisoned', '?')}"
    if isinstance(m.get("der"), (int, float)):
        note += f", DER {m['der']:.3f}"
    return disp.done(note)


def evaluate_saved(out: str | os.PathLike, pd: PoisonedData | None = None) -> dict[str, dict]:
    """Re-load each model folder of an experiment and measure it (same metrics as
    :func:`unbackdoor.metrics.evaluate`); ``mismatch`` flags a number that differs
    from the run's own metrics.json by more than 1e-6."""
    out = Path(out)
    pd = pd or load_data(out / layout.DATA_DIR)
    res = {}
    for name in (layout.UNDEFENDED_DIR, *defense_names()):
        d = out / name
        if not (d / layout.MODEL_META).is_file():
            continue
        m = evaluate(load_model(d), pd.test, pd.attack)
        recorded = layout.headline(layout.read_run_metrics(d).get("final")) if finished(d) else {}
        mism = [k for k, v in recorded.items() if v is not None and k in m and abs(m[k] - v) > 1e-6]
        res[name] = {**m, "mismatch": mism}
    return res


def experiment_rows(out: str | os.PathLike) -> list[dict]:
    """Rows (model, clean accuracy, ASR, robust accuracy, DER, seconds) of an experiment folder."""
    _, runs = discover(out)
    und = next((r for r in runs if r.role == layout.UNDEFENDED), None)
    return [model_row(r, und) for r in sort_runs(runs)]


def demo(out: str | os.PathLike = "runs/demo", attack: str = "badnets", preset: str = "quick", seed: int = 0,
         dataset: str = "mnist5k", defenses: tuple[str, ...] | str | None = None, force: bool = False, engine=None,
         embed_points: int = 1000, display: Display | None = None, configs: dict[str, Any] | None = None,
         root: str | None = None) -> dict:
    """``unbackdoor demo``: one full experiment on ``dataset`` (default: the embedded mnist5k,
    no download; ``root``: local files of cifar10 / gtsrb / ...) with the report. See :func:`run_experiment`."""
    spec = ExperimentSpec(attack=attack, dataset=dataset, defenses=defenses, preset=preset, seed=seed, root=root)
    t0 = time.perf_counter()
    res = run_experiment(out, spec, engine=engine, force=force, display=display, embed_points=embed_points,
                         configs=configs)
    res["total_seconds"] = time.perf_counter() - t0
    return res
