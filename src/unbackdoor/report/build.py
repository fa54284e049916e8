"""Assemble the report from a tree of runs: tables, figures, summary."""
from __future__ import annotations

import datetime as _dt
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import yaml

from unbackdoor.attacks.base import load_attack
from unbackdoor.core import layout
from unbackdoor.core.errors import UnbackdoorError
from unbackdoor.core.files import write_json, write_text
from unbackdoor.core.version import __version__
from unbackdoor.data.dataset import ImageDataset
from unbackdoor.defenses import defense_names, get_defense
from unbackdoor.metrics import der as der_score
from unbackdoor.metrics import detection_scores
from unbackdoor.report import figures
from unbackdoor.report.content import Cards, Cell, Details, Figure, Note, Report, Section, Table, asr_tone, num, pct
from unbackdoor.report.features import (
    embed_2d,
    features_of,
    load_run_model,
    poisoned_neighbours,
    predict_labels,
    subsample,
)
from unbackdoor.report.render import render_html, render_markdown
from unbackdoor.report.runs import DataRun, ModelRun, discover, read_detection, role_order, sort_runs

TABLE_COLUMNS = ["Model", "Clean accuracy", "ASR", "Robust accuracy", "DER", "Labelled clean images", "Time", "Run"]
MAX_EMBED_PANELS = 4
N_EXAMPLES = 6


@dataclass
class ReportOptions:
    """What to compute. ``embed_points``: training images in each t-SNE (0 = no feature plot)."""

    embed_points: int = 1000
    seed: int = 0
    title: str = "Backdoor defense report"
    device: str = "cpu"
    log: Callable[[str], None] | None = None


@dataclass
class Group:
    """All model runs trained or evaluated on one poisoned-data folder (one attack)."""

    data: DataRun | None
    runs: list[ModelRun]
    key: str = ""
    _cache: dict = field(default_factory=dict)

    @property
    def title(self) -> str:
        return self.data.title if self.data else "runs without a data folder"

    @property
    def attack(self) -> str:
        return self.data.attack_name if self.data else "unknown"

    def undefended(self) -> ModelRun | None:
        return next((r for r in self.runs if r.role == layout.UNDEFENDED), None)

    # lazily loaded, shared by the figures of this group
    def dataset(self, split: str):
        if split not in self._cache:
            p = self.data.path / f"{split}.npz" if self.data else None
            self._cache[split] = ImageDataset.load_npz(p, name=split) if p is not None and p.is_file() else None
        return self._cache[split]

    def attack_obj(self):
        if "attack" not in self._cache:
            ok = self.data is not None and (self.data.path / "attack.json").is_file()
            try:
                self._cache["attack"] = load_attack(self.data.path) if ok else None
            except UnbackdoorError:
                self._cache["attack"] = None
        return self._cache["attack"]


def _group_runs(runs: list[ModelRun], data_runs: list[DataRun], root: Path) -> list[Group]:
    groups: dict[Any, Group] = {}
    for d in data_runs:
        groups[d.path.resolve()] = Group(d, [])
    for r in runs:
        k = r.data.path.resolve() if r.data else None
        if k not in groups:
            groups[k] = Group(r.data, [])
        groups[k].runs.append(r)
    out = []
    for g in groups.values():
        if not g.runs:
            continue
        g.runs = sort_runs(g.runs)
        g.key = _slug(g.attack if g.data is None else _rel(g.data.path, root))
        out.append(g)
    keys: dict[str, int] = {}
    for g in out:  # unique anchors
        keys[g.key] = keys.get(g.key, 0) + 1
        if keys[g.key] > 1:
            g.key = f"{g.key}-{keys[g.key]}"
    return out


def _slug(s: str) -> str:
    return re.sub(r"[^a-zA-Z0-9]+", "-", s).strip("-").lower() or "runs"


def _rel(p: Path, root: Path) -> str:
    try:
        return os.path.relpath(p, root)
    except ValueError:  # another drive (Windows)
        return str(p)


def _shown(root: Path) -> str:
    """``root`` as the user would name it: relative to the working directory when it is
    below it (a published report should not carry the author's home directory)."""
    try:
        return str(Path(root).resolve().relative_to(Path.cwd().resolve())) or "."
    except ValueError:
        return str(root)


def _fmt_seconds(s: float | None) -> str:
    if s is None:
        return "—"
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


def model_row(run: ModelRun, undefended: ModelRun | None) -> dict[str, Any]:
    """The measured numbers of one model, with DER against the undefended model of its attack."""
    f = run.final
    d = None
    if run.role not in (layout.UNDEFENDED, layout.CLEAN_REFERENCE):
        base = undefended.final if undefended is not None else run.before
        if base and None not in (base["clean_accuracy"], base["attack_success_rate"], f["clean_accuracy"], f["attack_success_rate"]):
            d = der_score(base["clean_accuracy"], base["attack_success_rate"], f["clean_accuracy"], f["attack_success_rate"])
        elif isinstance(run.metrics.get("der"), (int, float)):
            d = float(run.metrics["der"])
    n_lab = run.metrics.get("n_labelled")
    return {"label": run.label, "role": run.role, "run_dir": str(run.path), **f, "der": d,
            "seconds": run.seconds, "n_labelled": n_lab if isinstance(n_lab, int) else None}


def der_tone(d: float | None) -> str:
    return "" if d is None else "good" if d >= 0.9 else "warn" if d >= 0.7 else "bad"


def _table_for(rows: list[dict], root: Path, caption: str = "") -> Table:
    out = []
    for r in rows:
        out.append([
            Cell(r["label"]),
            Cell(pct(r["clean_accuracy"]), r["clean_accuracy"]),
            Cell(pct(r["attack_success_rate"]), r["attack_success_rate"], asr_tone(r["attack_success_rate"])),
            Cell(pct(r["robust_accuracy"]), r["robust_accuracy"]),
            Cell(num(r["der"]), r["der"], der_tone(r["der"])),
            Cell("—" if not r.get("n_labelled") else str(r["n_labelled"]), r.get("n_labelled")),
            Cell(_fmt_seconds(r["seconds"]), r["seconds"]),
            Cell(_rel(Path(r["run_dir"]), root)),
        ])
    return Table(list(TABLE_COLUMNS), out, caption, name="results")


# ---------------------------------------------------------------------------- history
def history_stages(h: Any, name: str = "training") -> dict[str, list[dict]]:
    """Normalise a history.json into ``{stage: [per-epoch dict, ...]}``.

    ``train`` writes a list of epoch records (one stage, called ``name``); a
    multi-stage defense writes a mapping stage -> list (or stage -> {metric: [values]}).
    """
    if isinstance(h, list):
        return {name: [r for r in h if isinstance(r, dict)]}
    if not isinstance(h, dict):
        return {}
    if h and all(isinstance(v, list) and all(isinstance(x, (int, float)) for x in v) for v in h.values()):
        n = max(len(v) for v in h.values())
        return {name: [{k: v[i] for k, v in h.items() if i < len(v)} for i in range(n)]}
    out: dict[str, list[dict]] = {}
    for k, v in h.items():
        if isinstance(v, list) and v and all(isinstance(r, dict) for r in v):
            out[str(k)] = v
        elif isinstance(v, dict):
            sub = history_stages(v, str(k))
            out.update(sub if list(sub) == [str(k)] else {f"{k} / {s}": rows for s, rows in sub.items()})
    return out


def _history_stage(role: str) -> str:
    """What a flat history.json of a run with this role records."""
    if role in (layout.UNDEFENDED, layout.CLEAN_REFERENCE):
        return "supervised training"
    return get_defense(role).history_stage if role in defense_names() else "training"


def _stage_title(name: str) -> str:
    return name.replace("_", " ")


# ---------------------------------------------------------------------------- building
class _Builder:
    def __init__(self, root: Path, opts: ReportOptions):
        self.root = root
        self.opts = opts
        self.models: dict[Path, Any] = {}
        self.figure_names: list[str] = []

    def log(self, msg: str) -> None:
        if self.opts.log:
            self.opts.log(msg)

    def model(self, run: ModelRun):
        if run.path not in self.models:
            self.models[run.path] = load_run_model(run, self.opts.device) if run.has_model else None
        return self.models[run.path]

    def fig(self, name: str, png: bytes, alt: str = "", caption: str = "") -> Figure:
        base, i = _slug(name), 1
        name = base
        while name in self.figure_names:
            i += 1
            name = f"{base}-{i}"
        self.figure_names.append(name)
        return Figure(name, png, caption, alt or caption)

    # -- sections of one group
    def results(self, g: Group, rows: list[dict]) -> list:
        blocks: list = []
        cards = []
        for r in rows:
            sub = f"attack success rate · clean accuracy {pct(r['clean_accuracy'])}"
            if r["der"] is not None:
                sub += f" · DER {r['der']:.3f}"
            cards.append((r["label"], pct(r["attack_success_rate"]), sub, asr_tone(r["attack_success_rate"])))
        blocks.append(Cards(cards))
        blocks.append(_table_for(rows, self.root, caption=(
            "ASR: triggered test images (true label ≠ target) classified as the target. Robust accuracy: the same images "
            "classified correctly. DER = (max(0, ΔASR) − max(0, Δclean accuracy) + 1) / 2 against the undefended model "
            "(1 = backdoor removed at no accuracy cost, 0.5 = no change).")))
        if g.undefended() is None and any(r["role"] in defense_names() for r in rows):
            blocks.append(Note("No undefended model for this attack in the tree: DER is taken from the defense's own metrics.json where present.", "warn"))
        return blocks

    def examples(self, g: Group) -> list:
        test, atk = g.dataset("test"), g.attack_obj()
        if test is None or atk is None:
            return []
        rng = np.random.default_rng(self.opts.seed)
        labels = test.labels.numpy()
        eligible = atk.asr_mask(test.labels).numpy()
        picks = []
        for c in rng.permutation(test.num_classes):
            idx = np.flatnonzero((labels == c) & eligible)
            if len(idx):
                picks.append(int(rng.choice(idx)))
            if len(picks) >= N_EXAMPLES:
                break
        picks.sort(key=lambda i: labels[i])
        clean_u8 = test.images[picks]
        trig_u8 = atk.apply_uint8(clean_u8)
        true = test.labels[picks]
        tgt = atk.target_labels(true)
        cls = test.classes
        captions = [f"true {cls[int(t)]} → target {cls[int(a)]}" if atk.mode == "all-to-all" else f"true {cls[int(t)]}"
                    for t, a in zip(true, tgt)]
        png = figures.examples(clean_u8.float().div(255).numpy(), trig_u8.float().div(255).numpy(), captions)
        caption = (f"{atk.name}: clean test images, the same images with the trigger, and the trigger itself "
                   "(triggered − clean; red brighter, blue darker).")
        blocks: list = [self.fig(f"{g.key}-examples", png, alt=f"{atk.name} example images", caption=caption)]
        rows = []
        for run in g.runs:
            m = self.model(run)
            if m is None:
                continue
            pc, pt = predict_labels(m, clean_u8), predict_labels(m, trig_u8)
            row = [Cell(run.label)]
            for j in range(len(picks)):
                hit_t = int(pt[j]) == int(tgt[j])
                tone = "bad" if hit_t else "good" if int(pt[j]) == int(true[j]) else "warn"
                row.append(Cell(f"{cls[int(pc[j])]} / {cls[int(pt[j])]}", [int(pc[j]), int(pt[j])], tone))
            rows.append(row)
        if rows:
            cols = ["Model"] + [f"true {cls[int(true[j])]}" for j in range(len(picks))]
            blocks.append(Table(cols, rows, "Prediction on the clean / triggered image, per example. Red: the trigger "
                                "made the model answer the attacker's target.", name="examples"))
        return blocks

    def detection(self, g: Group) -> list:
        blocks: list = []
        train = None
        for run in g.runs:
            f = run.detection_file
            if f is None:
                continue
            try:
                det = read_detection(f)
            except (OSError, ValueError, KeyError) as e:
                blocks.append(Note(f"{_rel(f, self.root)}: unreadable ({e})", "warn"))
                continue
            col = "score" if det.get("score") else "loss"  # a detector's suspicion, or DBD's loss (high = suspicious)
            if not det[col] or not det["kept"]:
                blocks.append(Note(f"{_rel(f, self.root)} lacks the 'loss' (or 'score') or 'kept' column", "warn"))
                continue
            train = train if train is not None else g.dataset("train")
            idx = np.asarray(det["index"] if det["index"] else np.arange(len(det[col])), dtype=np.int64)
            loss = np.asarray(det[col], dtype=np.float64)
            kept = np.asarray(det["kept"], dtype=bool)
            if train is not None and train.poisoned is not None:
                if idx.max(initial=-1) >= len(train):
                    blocks.append(Note(f"{_rel(f, self.root)} indexes {idx.max() + 1} samples; train.npz holds {len(train)}", "warn"))
                    continue
                pois = train.poisoned.numpy()[idx]  # the ground truth, from the data folder
            elif len(det.get("poisoned", [])) == len(loss):
                pois = np.asarray([str(v).strip().lower() in ("1", "true") for v in det["poisoned"]], dtype=bool)
            else:
                blocks.append(Note("The training set's poison mask is not available (no train.npz with 'poisoned', "
                                   "no 'poisoned' column): detection quality cannot be measured.", "warn"))
                continue
            sc = detection_scores(torch.from_numpy(~kept), torch.from_numpy(pois))
            from sklearn.metrics import average_precision_score, roc_auc_score

            both = pois.any() and (~pois).any()
            auroc = float(roc_auc_score(pois, loss)) if both else None
            ap = float(average_precision_score(pois, loss)) if both else None
            run.extra["detection"] = {**sc, "auroc": auroc, "average_precision": ap,
                                                                   "kept": int(kept.sum()), "removed": int((~kept).sum()),
                                                                   "poisoned_kept": int((kept & pois).sum())}
            label = run.label

            def row(name: str, flagged: np.ndarray) -> list:
                r = detection_scores(torch.from_numpy(flagged), torch.from_numpy(pois))
                missed = int((~flagged & pois).sum())
                return [Cell(name), Cell(str(r["poisoned"]), r["poisoned"]), Cell(str(int(flagged.sum())), int(flagged.sum())),
                        Cell(str(missed), missed, "good" if not missed else "bad"),
                        Cell(num(r["precision"]), r["precision"]),
                        Cell(num(r["recall"]), r["recall"], "good" if r["recall"] >= 0.99 else "warn"),
                        Cell(num(r["f1"]), r["f1"]), Cell(num(auroc), auroc), Cell(num(ap), ap)]

            rows = [row(label, ~kept)]
            if col == "score":
                caption = (f"{label}'s filter as a detector: a sample it removes before retraining is flagged. "
                           f"AUROC / AP rank samples by {label}'s suspicion score recorded in its detection.csv.")
            else:
                caption = (f"{label}'s final split as a detector: a sample it removes from its labelled data is "
                           "flagged. AUROC / AP rank samples by the loss recorded in its detection.csv.")
            if len(det.get("suspect", [])) == len(loss):
                sus = np.asarray([str(v).strip() in ("1", "True", "true") for v in det["suspect"]], dtype=bool)
                rows.append(row(f"{label}: suspects", sus))
                caption += (" Suspects: the short list cut from the same losses without knowing the poison rate "
                            "(a two-component mixture on the log losses; detection.json).")
            blocks.append(Table(["Model", "Poisoned", "Removed", "Poisoned kept", "Precision", "Recall", "F1", "AUROC",
                                 "AP"], rows, caption, name="detection"))
            if col == "score":
                png = figures.detection(loss, kept, pois, score_name=f"{label}'s suspicion score",
                                        split=("kept (retrained on)", "removed"), split_title=f"{label}'s filter")
                caption = (f"Left: {label}'s suspicion score of every training sample; poisoned samples should sit "
                           f"on the right (high score; {label} cuts each class on its own). Middle: what {label} kept "
                           "to retrain on. Right: precision–recall of the score as a poison score.")
            else:
                png = figures.detection(loss, kept, pois)
                caption = ("Left: the final loss of every training sample; poisoned samples should sit on the right "
                           "(high loss), beyond the split. Middle: what the final split kept as labelled. Right: "
                           "precision–recall of the loss as a poison score.")
            blocks.append(self.fig(f"{g.key}-{run.path.name}-detection", png,
                                   alt=f"{label}: detection of poisoned samples", caption=caption))
        return blocks

    def features(self, g: Group) -> list:
        k = self.opts.embed_points
        # The backdoored model first, then the defenses in registry order (the clean reference
        # after them), as many as there is room for.
        order = [layout.UNDEFENDED, *defense_names(), layout.CLEAN_REFERENCE]
        runs = [r for r in g.runs if r.has_model]
        runs = sorted(runs, key=lambda r: order.index(r.role) if r.role in order else len(order))[:MAX_EMBED_PANELS]
        train = g.dataset("train")
        if k <= 0 or not runs or train is None:
            return []
        idx = subsample(len(train), k, self.opts.seed)
        imgs = train.images[idx]
        true = (train.true_labels if train.true_labels is not None else train.labels)[idx].numpy()
        pois = train.poisoned[idx].numpy() if train.poisoned is not None else np.zeros(len(idx), bool)
        panels, method = [], "t-SNE"
        for run in runs:
            m = self.model(run)
            if m is None:
                continue
            t0 = time.perf_counter()
            feats = features_of(m, imgs)
            xy, method = embed_2d(feats, self.opts.seed)
            nb = poisoned_neighbours(feats, pois)
            run.extra["poisoned_neighbours"] = nb
            self.log(f"  {method} of {run.label} features ({len(idx)} points) in {time.perf_counter() - t0:.1f}s")
            title = run.label + (f"\npoisoned neighbours of poisoned: {nb:.0%}" if nb is not None else "")
            panels.append({"title": title, "xy": xy, "labels": true, "poisoned": pois})
        if not panels:
            return []
        atk = g.attack_obj()
        png = figures.embedding_panels(panels, train.classes, atk.target if atk is not None and atk.mode == "all-to-one" else None)
        caption = (f"{method} of the penultimate features (unit length) of {len(idx)} training images "
                   f"({int(pois.sum())} poisoned, black ×), coloured by true class. A backdoored model gathers the "
                   "poisoned images together, away from their true class; a model whose features never learnt the "
                   "trigger leaves them with their true class. Under each title: the fraction of poisoned samples among "
                   f"the 10 nearest neighbours (cosine, full feature space) of each poisoned sample; chance is "
                   f"{pois.mean():.0%}.")
        return [self.fig(f"{g.key}-features", png, alt=f"{method} of penultimate features", caption=caption)]

    def curves(self, g: Group) -> list:
        blocks: list = []
        for run in g.runs:
            stages = history_stages(run.history, _history_stage(run.role))
            stages = {_stage_title(k): v for k, v in stages.items() if v}
            if stages:
                png = figures.history(stages, title=run.label)
                blocks.append(self.fig(f"{g.key}-{run.path.name}-history", png, alt=f"{run.label}: training curves",
                                       caption=f"{run.label}: training curves per stage "
                                       f"({_rel(run.path / 'history.json', self.root)})."))
            st = run.stages
            if len(st) >= 2:
                rows = [[Cell(k.replace("_", " ")), Cell(pct(v["clean_accuracy"]), v["clean_accuracy"]),
                         Cell(pct(v["attack_success_rate"]), v["attack_success_rate"], asr_tone(v["attack_success_rate"])),
                         Cell(pct(v["robust_accuracy"]), v["robust_accuracy"])] for k, v in st.items()]
                blocks.append(Table(["Stage", "Clean accuracy", "ASR", "Robust accuracy"], rows,
                                    f"{run.label}: the model after each stage.", name="stages"))
            if run.config:
                blocks.append(Details(f"{run.label}: configuration ({_rel(run.path / 'config.yaml', self.root)})",
                                      yaml.safe_dump(run.config, sort_keys=False, width=100)))
        return blocks


def _safe(fn: Callable[[], list], what: str, log) -> list:
    """A figure that fails (an odd file, an unknown architecture) becomes a note, not a failed report."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - the report must still be written
        if log:
            log(f"  {what} skipped: {type(e).__name__}: {e}")
        return [Note(f"{what} could not be drawn: {type(e).__name__}: {e}", "warn")]


def collect(root: str | os.PathLike, opts: ReportOptions | None = None) -> tuple[Report, dict]:
    """Build the report content and the summary dict for the runs under ``root``."""
    opts = opts or ReportOptions()
    root = Path(root)
    data_runs, runs = discover(root)
    if not runs:
        raise UnbackdoorError(f"no runs found under {root} (looked for folders holding metrics.json, model.json or detection.csv)")
    groups = _group_runs(runs, data_runs, root)
    b = _Builder(root, opts)
    sections: list[Section] = []
    summary_groups, flat, points = [], [], []
    for g in groups:
        t0 = time.perf_counter()
        b.log(f"report: {g.title} ({len(g.runs)} runs)")
        und = g.undefended()
        rows = [model_row(r, und) for r in g.runs]
        for r in rows:
            if r["clean_accuracy"] is not None and r["attack_success_rate"] is not None:
                points.append({**r, "group": g.attack})
        sec = Section(g.title, g.key, subtitle=_rel(g.data.path, root) if g.data else "")
        sec.blocks += b.results(g, rows)
        parts = [("Example images", "examples", b.examples), ("Poisoned-sample detection", "detection", b.detection),
                 ("Feature space", "features", b.features), ("Training", "training", b.curves)]
        subs = []
        for title, anchor, fn in parts:
            blocks = _safe(lambda fn=fn: fn(g), title, b.log)
            if blocks:
                subs.append(Section(title, f"{g.key}-{anchor}", blocks, level=3))
        sections.append(sec)
        sections += subs
        for r, run in zip(rows, g.runs):
            det = run.extra.get("detection")
            if det is not None:
                r["detection"] = det
            if run.extra.get("poisoned_neighbours") is not None:
                r["poisoned_neighbours"] = run.extra["poisoned_neighbours"]
        run_rows = [{**r, "attack": g.attack, "data_dir": str(g.data.path) if g.data else None} for r in rows]
        flat += run_rows
        summary_groups.append({"attack": g.attack, "title": g.title, "data_dir": str(g.data.path) if g.data else None,
                               "dataset": g.data.stats.get("dataset") if g.data else None,
                               "rate": g.data.stats.get("rate") if g.data else None,
                               "target": g.data.target if g.data else None, "models": rows})
        b.log(f"report: {g.title} done in {time.perf_counter() - t0:.1f}s")
    overview = Section("Overview", "overview")
    if len(groups) > 1:
        overview.blocks.append(leaderboard_table(flat, root))
    if points:
        caption = ("Clean accuracy against attack success rate, one point per model. The shaded band is "
                   "ASR ≤ 10%: a defended model should sit there, at the right.")
        overview.blocks.append(b.fig("accuracy-vs-asr", figures.accuracy_vs_asr(points, role_order()), alt="clean accuracy vs ASR",
                                     caption=caption))
    if overview.blocks:
        sections.insert(0, overview)
    now = _dt.datetime.now().astimezone()

    report = Report(opts.title, f"{len(runs)} runs under {_shown(root)}", sections,
                    meta={"generated": now.strftime("%Y-%m-%d %H:%M %Z"), "version": __version__})
    summary = {"root": _shown(root), "generated": now.isoformat(timespec="seconds"), "version": __version__,
               "groups": summary_groups, "rows": flat, "figures": list(b.figure_names)}
    return report, summary


def leaderboard_table(rows: list[dict], root: Path) -> Table:
    """One row per (attack, model): the sweep's comparison view."""
    out = []
    for r in rows:
        det = r.get("detection") or {}
        out.append([
            Cell(r["attack"]), Cell(r["label"]),
            Cell(pct(r["clean_accuracy"]), r["clean_accuracy"]),
            Cell(pct(r["attack_success_rate"]), r["attack_success_rate"], asr_tone(r["attack_success_rate"])),
            Cell(pct(r["robust_accuracy"]), r["robust_accuracy"]),
            Cell(num(r["der"]), r["der"], der_tone(r["der"])),
            Cell(num(det.get("recall")), det.get("recall")),
            Cell(_fmt_seconds(r["seconds"]), r["seconds"]),
        ])
    return Table(["Attack", "Model", "Clean accuracy", "ASR", "Robust accuracy", "DER", "Detection recall", "Time"], out,
                 "Every attack × model in the tree.", name="leaderboard")


def build_report(root: str | os.PathLike, out: str | os.PathLike | None = None, opts: ReportOptions | None = None) -> dict:
    """Write ``report.html`` (self-contained), ``report.md`` (+ PNGs in ``report_figures/``)
    and ``summary.json`` for the runs under ``root``.

    ``out`` is the HTML file (default ``root/report.html``); the other files go
    next to it. Returns the summary dict, with the paths written under ``files``.
    """
    root = Path(root)
    html_path = Path(out) if out is not None else root / "report.html"
    if html_path.suffix.lower() not in (".html", ".htm"):
        if html_path.is_dir() or not html_path.suffix:
            html_path = html_path / "report.html"
        else:
            raise UnbackdoorError(f"the report's path must be an .html file or a folder, got {html_path}")
    report, summary = collect(root, opts)
    folder = html_path.parent
    folder.mkdir(parents=True, exist_ok=True)
    write_text(html_path, render_html(report))
    fig_dir = folder / "report_figures"
    md = render_markdown(report, fig_dir, folder)
    write_text(folder / "report.md", md)
    summary["files"] = {"html": str(html_path), "markdown": str(folder / "report.md"), "figures": str(fig_dir)}
    write_json(folder / "summary.json", summary)
    return summary


def stderr_log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
