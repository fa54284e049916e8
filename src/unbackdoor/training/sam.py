"""Sharpness-aware minimisation (Foret et al., ICLR 2021) as one training step, and its
adaptive form ASAM (Kwon et al., ICML 2021), which FT-SAM uses.

One step: the gradient ``g`` at the weights ``w``; a climb to ``w + e`` with
``e = rho * g / ||g||`` (adaptive: ``e = rho * w^2 * g / || |w| * g ||``, a radius
relative to each weight's size); the gradient there; back to ``w``; the base
optimiser's update with that second gradient. BatchNorm's running statistics are
not updated in the second pass, which sees perturbed weights.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from unbackdoor.training.engine import Engine

EPS = 1e-12


@dataclass(frozen=True)
class SAMSettings:
    rho: float = 2.0  # the neighbourhood radius (ASAM radii are larger than SAM's ~0.05)
    adaptive: bool = True


def _frozen_bn_stats(model: nn.Module) -> Callable[[], None]:
    """Stop BatchNorm layers updating running statistics; returns the undo."""
    saved = [(m, m.momentum) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m, _ in saved:
        m.momentum = 0.0

    def undo() -> None:
        for m, mom in saved:
            m.momentum = mom

    return undo


def sam_step(eng: Engine, closure: Callable[[], tuple[torch.Tensor, torch.Tensor]], sam: SAMSettings
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """One SAM step of ``eng``'s optimiser; ``closure()`` computes ``(loss, logits)`` on the
    batch (under autocast). Returns the first pass's loss and logits (what the step saw)."""
    params = [p for g in eng.optimizer.param_groups for p in g["params"] if p.requires_grad]
    loss, out = closure()
    eng.optimizer.zero_grad(set_to_none=True)
    # Loss scaling multiplies every gradient alike: the direction of e (all that is used) is unchanged.
    (eng.scaler.scale(loss) if eng.scaler is not None else loss).backward()
    with torch.no_grad():
        have = [p for p in params if p.grad is not None]
        scaled = [(p.abs() * p.grad if sam.adaptive else p.grad).norm(2) for p in have]
        norm = torch.linalg.vector_norm(torch.stack(scaled)) if scaled else torch.zeros(())
        perturbs = []
        if bool(torch.isfinite(norm)) and float(norm) > 0:
            for p in have:
                e = p.grad * (sam.rho / (norm + EPS))
                if sam.adaptive:
                    e = e * p.pow(2)
                p.add_(e)
                perturbs.append((p, e))
    undo_bn = _frozen_bn_stats(eng.model)
    try:
        loss2, _ = closure()

        def restore() -> None:
            with torch.no_grad():
                for p, e in perturbs:
                    p.sub_(e)

        eng.step(loss2, before_update=restore)
    finally:
        undo_bn()
    return loss.detach(), out.detach()
