"""BCU's layer schedule: which Conv/Linear layers of any ``nn.Module`` get which
re-initialisation probability (the rules are described in :mod:`unbackdoor.defenses.bcu`)."""
from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from typing import Mapping

from torch import nn

from unbackdoor.core.errors import UnbackdoorError
from unbackdoor.defenses.bcu.config import PAPER_STAGE_P, STAGE_NAMES, BCUConfig
from unbackdoor.models.model_dir import unwrap

# ResNet-18's main path: 1 stem conv, then 4 convs per stage (what the depth rule spreads).
_RESNET18_PATH = (1, 4, 4, 4, 4)
_LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)


@dataclass(frozen=True)
class LayerP:
    """Re-initialisation probability of one layer and where it came from."""

    name: str  # module name in model.named_modules()
    kind: str  # Conv2d, Linear, ...
    group: str  # stem | stage1..4 | classifier | depth i/L
    p: float
    source: str  # stages | depth | override | ablation


def parameterised_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Conv/Linear layers with weights, in registration (= depth) order."""
    return [(n, m) for n, m in unwrap(model).named_modules()
            if isinstance(m, _LAYER_TYPES) and getattr(m, "weight", None) is not None]


def _stage_groups(names: list[str]) -> list[list[int]] | None:
    """Indices of [stem, stage1..stage4] if the layer names show that structure, else None."""
    if len(names) < 9:
        return None
    parts = [n.split(".") for n in names]
    common = 0
    while all(len(p) > common + 1 for p in parts) and len({p[common] for p in parts}) == 1:
        common += 1
    groups: list[tuple[str, list[int]]] = []
    for i, p in enumerate(parts):
        key = p[common]
        if groups and groups[-1][0] == key:
            groups[-1][1].append(i)
        elif any(g[0] == key for g in groups):
            return None  # a container revisited out of order: not a clean stage structure
        else:
            groups.append((key, [i]))
    if len(groups) != 5 or any(len(g[1]) < 2 for g in groups[1:]):
        return None
    return [g[1] for g in groups]


def depth_probabilities(n_layers: int, stage_p: tuple[float, ...] = PAPER_STAGE_P) -> list[float]:
    """The depth rule: split the paper's total re-initialisation dose (along ResNet-18's
    17-layer main path) over ``n_layers`` equally deep layers. Returns one p per layer."""
    if n_layers < 1:
        return []
    total = sum(_RESNET18_PATH)
    # dose density (per unit of relative depth) of each segment of the reference path
    segs, start = [], 0.0
    for n, p in zip(_RESNET18_PATH, stage_p[:5]):
        length = n / total
        segs.append((start, start + length, -math.log(max(1e-12, 1.0 - min(p, 1 - 1e-12))) / (1 / total)))
        start += length
    out = []
    for i in range(n_layers):
        a, b = i / n_layers, (i + 1) / n_layers
        dose = sum(max(0.0, min(b, e) - max(a, s)) * d for s, e, d in segs)
        out.append(1.0 - math.exp(-dose))
    return out


def layer_schedule(model: nn.Module, cfg: BCUConfig | None = None) -> list[LayerP]:
    """Per-layer re-initialisation probabilities for any ``nn.Module`` (module docstring)."""
    if cfg is None:
        cfg = BCUConfig()
    layers = parameterised_layers(model)
    if not layers:
        raise UnbackdoorError("the model has no Conv/Linear layers to re-initialise")
    names = [n for n, _ in layers]
    kinds = [type(m).__name__ for _, m in layers]
    has_head = isinstance(layers[-1][1], nn.Linear) and len(layers) > 1
    feats = names[:-1] if has_head else names
    clamp = lambda p: float(min(1.0, max(0.0, p * cfg.p_scale)))  # noqa: E731
    groups = _stage_groups(feats) if cfg.rule in ("auto", "stages") else None
    if cfg.rule == "stages" and groups is None:
        raise UnbackdoorError("rule 'stages' needs a stem plus four block stages (ResNet-like); "
                              "this model has none: use rule 'depth' or explicit p_overrides")
    sched: list[LayerP] = []
    if groups is not None:
        for g, idx in enumerate(groups):
            for i in idx:
                sched.append(LayerP(names[i], kinds[i], STAGE_NAMES[g], clamp(cfg.stage_p[g]), "stages"))
    else:
        for i, p in enumerate(depth_probabilities(len(feats), cfg.stage_p)):
            sched.append(LayerP(names[i], kinds[i], f"depth {i + 1}/{len(feats)}", clamp(p), "depth"))
    if has_head:
        sched.append(LayerP(names[-1], kinds[-1], "classifier", clamp(cfg.stage_p[5]), sched[0].source if sched else "depth"))
    for pat in cfg.p_overrides:
        if not any(fnmatch.fnmatchcase(n, pat) for n in names):
            raise UnbackdoorError(f"p_overrides pattern {pat!r} matches no Conv/Linear layer; layers are: "
                                  f"{', '.join(names[:8])}{', ...' if len(names) > 8 else ''}")
    out = []
    for lp in sched:
        p, src = lp.p, lp.source
        for pat, v in cfg.p_overrides.items():
            if fnmatch.fnmatchcase(lp.name, pat):
                p, src = float(v), "override"
        out.append(LayerP(lp.name, lp.kind, lp.group, p, src))
    return out


def schedule_mapping(schedule: Mapping[str, float] | list[LayerP]) -> dict[str, float]:
    if isinstance(schedule, Mapping):
        return {str(k): float(v) for k, v in schedule.items()}
    return {lp.name: lp.p for lp in schedule}
