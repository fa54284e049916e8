"""The report's figures, drawn with matplotlib's object API on the Agg canvas.

No ``pyplot``: pyplot keeps global figure state and picks a GUI backend; a
:class:`~matplotlib.figure.Figure` rendered by ``FigureCanvasAgg`` needs no
display and leaves nothing behind. Every function returns PNG bytes.
"""
from __future__ import annotations

import io
from typing import Sequence

import numpy as np

# The undefended model red, the clean reference grey; the defenses take the palette in turn.
FIXED_COLORS = {"undefended": "#d1495b", "clean": "#8d99ae"}
PALETTE = ("#2e86ab", "#3c9d5d", "#edae49", "#7b2cbf", "#f18f01", "#00a6a6", "#a4243b", "#5c6b73", "#bc4b51", "#1b998b")


def role_colors(roles: list[str]) -> dict[str, str]:
    """A colour per role, stable for a given order of roles."""
    out, i = {}, 0
    for r in roles:
        if r in FIXED_COLORS:
            out[r] = FIXED_COLORS[r]
        elif r not in out:
            out[r] = PALETTE[i % len(PALETTE)]
            i += 1
    return out
INK = "#1f2933"
MUTED = "#6b7785"
GRID = "#e3e8ee"
CLEAN_COLOR = "#2e86ab"
POISON_COLOR = "#d1495b"
DPI = 110


def _figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _style(ax, grid: bool = True) -> None:
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    for side in ("left", "bottom"):
        ax.spines[side].set_color("#9aa5b1")
    ax.tick_params(colors=MUTED, labelsize=8)
    ax.xaxis.label.set_color(INK)
    ax.yaxis.label.set_color(INK)
    ax.title.set_color(INK)
    if grid:
        ax.grid(True, color=GRID, linewidth=0.8)
        ax.set_axisbelow(True)


def to_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, facecolor="white")
    return buf.getvalue()


# ---------------------------------------------------------------------------- overview
def accuracy_vs_asr(points: Sequence[dict], roles: Sequence[str] = ()) -> bytes:
    """Clean accuracy (x) against attack success rate (y), one point per model.

    ``points``: dicts with ``label``, ``role``, ``group`` (attack), ``clean_accuracy``,
    ``attack_success_rate``; ``roles``: the legend's order. A good defense sits bottom-right.
    """
    present = list(dict.fromkeys(p["role"] for p in points))
    order = [r for r in roles if r in present] + [r for r in present if r not in roles]
    colors = role_colors(order)
    names = {}
    for p in points:
        names.setdefault(p["role"], p["label"])
    fig = _figure(6.4, 4.2)
    ax = fig.add_subplot()
    groups = list(dict.fromkeys(p["group"] for p in points))
    markers = ["o", "s", "D", "^", "v", "P", "X", "*", "h", "<", ">"]
    ax.axhspan(-0.02, 0.1, xmin=0, xmax=1, color="#3c9d5d", alpha=0.06, zorder=0)
    for p in points:
        gi = groups.index(p["group"])
        ax.scatter(p["clean_accuracy"], p["attack_success_rate"], s=70, marker=markers[gi % len(markers)],
                   color=colors[p["role"]], edgecolor="white", linewidth=1.2, zorder=3)
        if len(groups) == 1:  # several attacks: colour (model) + marker (attack) say it; labels would pile up
            ax.annotate(p["label"], (p["clean_accuracy"], p["attack_success_rate"]), xytext=(6, 4),
                        textcoords="offset points", fontsize=7.5, color=INK)
    xs = [p["clean_accuracy"] for p in points]
    lo = min(xs + [0.9]) if xs else 0.0
    ax.set_xlim(max(0.0, lo - 0.05), 1.005)
    ax.set_ylim(-0.03, 1.05)
    ax.set_xlabel("clean accuracy (higher is better)")
    ax.set_ylabel("attack success rate (lower is better)")
    _style(ax)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], marker="o", linestyle="", color=colors[r], label=names[r], markersize=7) for r in order]
    if len(groups) > 1:
        handles += [Line2D([], [], marker=markers[i % len(markers)], linestyle="", color=MUTED, label=g, markersize=7)
                    for i, g in enumerate(groups)]
    if handles:
        ax.legend(handles=handles, fontsize=7.5, frameon=False, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return to_png(fig)


# ---------------------------------------------------------------------------- DBD detection
def detection(loss: np.ndarray, kept: np.ndarray, poisoned: np.ndarray, *, score_name: str | None = None,
              split: tuple[str, str] = ("kept (labelled)", "removed (unlabeled)"),
              split_title: str = "Final split") -> bytes:
    """Three panels: stage-3 loss histogram (poisoned vs clean), the kept/removed split,
    and the precision-recall curve of the loss as a poison score.

    loss: float (N,); kept: bool (N,) (DBD's high-credible, labelled half); poisoned: bool (N,).
    A detector's suspicion score (high = suspicious) in place of DBD's loss: ``score_name`` names
    it, ``split`` / ``split_title`` what its kept and removed samples are.
    """
    from sklearn.metrics import average_precision_score, precision_recall_curve

    fig = _figure(11.5, 3.5)
    a1, a2, a3 = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1.35, 1, 1]})
    loss = np.asarray(loss, dtype=np.float64)
    pos = loss[loss > 0]
    use_log = len(pos) == len(loss) and len(pos) > 1 and pos.max() / max(pos.min(), 1e-12) > 100
    if use_log:
        bins = np.logspace(np.log10(pos.min()), np.log10(pos.max()), 50)
        a1.set_xscale("log")
    else:
        bins = np.linspace(loss.min(), loss.max() if loss.max() > loss.min() else loss.min() + 1, 50)
    a1.hist(loss[~poisoned], bins=bins, color=CLEAN_COLOR, alpha=0.75, label=f"clean ({int((~poisoned).sum())})")
    a1.hist(loss[poisoned], bins=bins, color=POISON_COLOR, alpha=0.75, label=f"poisoned ({int(poisoned.sum())})")
    if kept.any() and (~kept).any():
        thr = (loss[kept].max() + loss[~kept].min()) / 2 if loss[kept].max() <= loss[~kept].min() else loss[kept].max()
        a1.axvline(thr, color=INK, linestyle="--", linewidth=1)
        a1.annotate("kept | removed", (thr, 1), xycoords=("data", "axes fraction"), xytext=(0, -2),
                    textcoords="offset points", ha="center", va="top", fontsize=7.5, color=INK)
    a1.set_yscale("log")
    a1.set_xlabel(score_name or "stage-3 loss (symmetric cross-entropy)")
    a1.set_ylabel("samples")
    a1.set_title("Score of each training sample" if score_name else "Loss of each training sample", fontsize=10)
    a1.legend(fontsize=7.5, frameon=False)
    _style(a1)

    cats = list(split)
    clean_counts = [int((kept & ~poisoned).sum()), int((~kept & ~poisoned).sum())]
    pois_counts = [int((kept & poisoned).sum()), int((~kept & poisoned).sum())]
    y = np.arange(2)
    a2.barh(y, clean_counts, color=CLEAN_COLOR, alpha=0.85, label="clean")
    a2.barh(y, pois_counts, left=clean_counts, color=POISON_COLOR, alpha=0.85, label="poisoned")
    for i in range(2):
        a2.annotate(f"{clean_counts[i]} clean · {pois_counts[i]} poisoned", (clean_counts[i] + pois_counts[i], i),
                    xytext=(4, 0), textcoords="offset points", va="center", fontsize=7.5, color=INK)
    a2.set_yticks(y, cats)
    a2.invert_yaxis()
    a2.set_xlim(0, max(1, max(c + p for c, p in zip(clean_counts, pois_counts))) * 1.9)
    a2.set_xlabel("samples")
    a2.set_title(split_title, fontsize=10)
    _style(a2)

    if poisoned.any() and (~poisoned).any():
        prec, rec, _ = precision_recall_curve(poisoned, loss)
        ap = average_precision_score(poisoned, loss)
        what = "score" if score_name else "loss as score"
        a3.plot(rec, prec, color=POISON_COLOR, linewidth=2, label=f"{what} (AP {ap:.3f})")
        a3.axhline(poisoned.mean(), color=MUTED, linestyle=":", linewidth=1, label=f"chance ({poisoned.mean():.2f})")
        flagged = ~kept
        tp = int((flagged & poisoned).sum())
        if flagged.any():
            a3.scatter([tp / poisoned.sum()], [tp / flagged.sum()], color=INK, zorder=4, s=30,
                       label="the cut" if score_name else "the split")
        a3.legend(fontsize=7.5, frameon=False, loc="lower left")
    else:
        a3.text(0.5, 0.5, "no poisoned samples\nin this training set", ha="center", va="center", color=MUTED,
                transform=a3.transAxes)
    a3.set_xlim(-0.02, 1.02)
    a3.set_ylim(-0.02, 1.05)
    a3.set_xlabel("recall")
    a3.set_ylabel("precision")
    a3.set_title("Detecting poisoned samples", fontsize=10)
    _style(a3)
    return to_png(fig)


# ---------------------------------------------------------------------------- feature space
def embedding_panels(panels: Sequence[dict], classes: Sequence[str], target: int | None) -> bytes:
    """2-D embeddings side by side. Each panel: ``title``, ``xy`` float (N, 2),
    ``labels`` int (N,) (the true class), ``poisoned`` bool (N,).

    Clean samples are coloured by true class; poisoned samples are black crosses:
    in a backdoored model they form their own cluster, in DBD's they scatter
    among their true classes (Huang et al. 2022, Fig. 1).
    """
    from matplotlib import colormaps

    n = max(1, len(panels))
    fig = _figure(4.1 * n + 1.3, 4.3)
    axes = fig.subplots(1, n, squeeze=False)[0]
    nc = len(classes)
    cmap = colormaps["tab10" if nc <= 10 else "tab20" if nc <= 20 else "turbo"]
    for ax, p in zip(axes, panels):
        xy, lab, pois = np.asarray(p["xy"]), np.asarray(p["labels"]), np.asarray(p["poisoned"], dtype=bool)
        cols = cmap(lab % cmap.N) if nc <= 20 else cmap(lab / max(1, nc - 1))
        ax.scatter(xy[~pois, 0], xy[~pois, 1], c=cols[~pois], s=7, alpha=0.65, linewidths=0)
        ax.scatter(xy[pois, 0], xy[pois, 1], c="black", s=16, marker="x", linewidths=0.9, alpha=0.9)
        ax.set_title(p["title"], fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
        _style(ax, grid=False)
        for side in ("left", "bottom"):
            ax.spines[side].set_visible(False)
    from matplotlib.lines import Line2D

    handles = []
    if nc <= 20:
        handles = [Line2D([], [], marker="o", linestyle="", color=cmap(i % cmap.N), label=str(c), markersize=5)
                   for i, c in enumerate(classes)]
    tgt = f" (labelled {classes[target]})" if target is not None and 0 <= target < nc else ""
    handles.append(Line2D([], [], marker="x", linestyle="", color="black", label=f"poisoned{tgt}", markersize=6))
    fig.legend(handles=handles, fontsize=7.5, frameon=False, loc="outside right center", title="true class",
               title_fontsize=8)
    return to_png(fig)


# ---------------------------------------------------------------------------- example images
def examples(clean: np.ndarray, triggered: np.ndarray, captions: Sequence[str]) -> bytes:
    """Rows: clean image, triggered image, the trigger (triggered - clean, rescaled).

    clean / triggered: float (K, C, H, W) in [0, 1]. ``captions``: one line per example.
    """
    k = len(clean)
    fig = _figure(max(1.45 * k + 1.2, 4.0), 4.7)
    axes = fig.subplots(3, k, squeeze=False)
    diff = triggered - clean
    m = float(np.abs(diff).max()) or 1.0
    rows = ("clean", "triggered", "trigger")
    for j in range(k):
        for i, img in enumerate((clean[j], triggered[j], diff[j])):
            ax = axes[i, j]
            if i < 2:
                if img.shape[0] == 1:
                    ax.imshow(img[0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
                else:
                    ax.imshow(np.clip(img.transpose(1, 2, 0), 0, 1), interpolation="nearest")
            else:
                # Signed difference: red where the trigger brightens, blue where it darkens.
                if img.shape[0] == 1:
                    ax.imshow(img[0], cmap="RdBu_r", vmin=-m, vmax=m, interpolation="nearest")
                else:
                    ax.imshow(np.clip(0.5 + img.transpose(1, 2, 0) / (2 * m), 0, 1), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            for s in ax.spines.values():
                s.set_color("#c5ced8")
            if j == 0:
                ax.set_ylabel(rows[i], fontsize=9, color=INK)
        axes[0, j].set_title(captions[j], fontsize=8.5, color=INK)
    return to_png(fig)


# ---------------------------------------------------------------------------- training curves
_RATE_WORDS = ("accuracy", "success", "asr", "precision", "recall", "f1", "rate", "auroc", "fraction")
_SKIP = ("epoch", "step", "lr", "images_per_second", "seconds", "time", "iteration", "iterations", "temperature")


def _series(rows: list[dict]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    keys: list[str] = []
    for r in rows:
        for k, v in r.items():
            if k not in keys and isinstance(v, (int, float)) and not isinstance(v, bool):
                keys.append(k)
    x = np.array([r.get("epoch", i + 1) for i, r in enumerate(rows)], dtype=float)
    out = {}
    for k in keys:
        if k in _SKIP or k.startswith("n_"):
            continue
        out[k] = np.array([float(r[k]) if isinstance(r.get(k), (int, float)) else np.nan for r in rows])
    return x, out


def is_rate(name: str, values: np.ndarray) -> bool:
    v = values[np.isfinite(values)]
    return any(w in name.lower() for w in _RATE_WORDS) and (len(v) == 0 or (v.min() >= -1e-6 and v.max() <= 1 + 1e-6))


def is_loss(name: str) -> bool:
    return "loss" in name.lower() and not name.lower().startswith("n_")


def history(stages: dict[str, list[dict]], title: str = "") -> bytes:
    """Per stage: losses (left) and rates — accuracy, ASR, split precision ... (right);
    a stage that records only one kind gets one wide panel. Counts and schedules
    (kept samples, lambda_u, lr) are left out."""
    from matplotlib.ticker import MaxNLocator

    stages = {k: v for k, v in stages.items() if v}
    n = max(1, len(stages))
    fig = _figure(10.5, 2.55 * n + (0.55 if title else 0.3))
    if title:
        fig.suptitle(title, fontsize=11, color=INK, x=0.01, ha="left", fontweight="bold")
    grid = fig.add_gridspec(n, 2)
    palette = ["#2e86ab", "#d1495b", "#3c9d5d", "#edae49", "#6a4c93", "#00798c", "#8d99ae", "#b5651d", "#17becf"]
    named = {"clean_accuracy": "#2e86ab", "attack_success_rate": "#d1495b", "robust_accuracy": "#3c9d5d",
             "train_accuracy": "#8d99ae"}
    for row, (stage, rows) in enumerate(stages.items()):
        x, series = _series(rows)
        losses = {k: v for k, v in series.items() if is_loss(k)}
        rates = {k: v for k, v in series.items() if not is_loss(k) and is_rate(k, v)}
        panels = [(d, kind) for d, kind in ((losses, "losses"), (rates, "accuracy / rates")) if d] or [({}, "")]
        axes = [fig.add_subplot(grid[row, :])] if len(panels) == 1 else [fig.add_subplot(grid[row, i]) for i in range(2)]
        pad = 0.5 if len(x) < 2 else 0.03 * (x.max() - x.min())
        for ax, (d, kind) in zip(axes, panels):
            # The well-known rates keep their colour everywhere; the others take the next unused one.
            fixed = named if kind != "losses" else {}
            spare = iter([c for c in palette if c not in fixed.values()] * 3)
            for k, v in d.items():
                ok = np.isfinite(v)  # metrics measured every few epochs only: join the measured points
                ax.plot(x[ok], v[ok], marker="o" if ok.sum() < 30 else None, markersize=3, linewidth=1.6,
                        color=fixed.get(k) or next(spare), label=k.replace("_", " "))
            if 0 < len(np.unique(x)) <= 12:
                ax.set_xticks(np.unique(x))
            else:
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            if len(x):
                ax.set_xlim(x.min() - pad, x.max() + pad)
            ax.set_title(f"{stage}: {kind}" if kind else stage, fontsize=9.5, loc="left")
            ax.set_xlabel("epoch", fontsize=8)
            _style(ax)
            if kind == "accuracy / rates":
                ax.set_ylim(-0.03, 1.03)
            if d:  # beside the plot: many curves would hide behind an inside legend
                ax.legend(fontsize=7.5, frameon=False, loc="center left", bbox_to_anchor=(1.0, 0.5))
            else:
                ax.text(0.5, 0.5, "nothing recorded", ha="center", va="center", color=MUTED, transform=ax.transAxes)
    return to_png(fig)
