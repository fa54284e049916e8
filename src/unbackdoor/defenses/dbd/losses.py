"""Losses and small helpers of DBD's three stages, as tiny composable pieces.

- :class:`NTXentLoss` — SimCLR's normalised-temperature cross-entropy (stage 1);
- :class:`SCELoss` / :func:`symmetric_cross_entropy` — symmetric cross-entropy
  (stages 2 and 3: the head's loss and the per-sample credibility score);
- :func:`sharpen`, :func:`mixup`, :func:`mixup_lambda`, :func:`mixmatch_loss`,
  :func:`linear_rampup`, :func:`weight_given_label` — MixMatch (stage 3).

Every function is pure: randomness comes in as arguments (a permutation, a
lambda), so tests can compare against hand-computed values.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from unbackdoor.training.distributed import all_gather_with_grad


class NTXentLoss(nn.Module):
    """NT-Xent (SimCLR, Chen et al. 2020) for a batch of positive pairs.

    ``forward(z1, z2)``: z1, z2 float (N, D), the projections of two views of the
    same N images (any scale: they are L2-normalised here). Each of the 2N
    embeddings is an anchor; its positive is the other view of its image, the
    2N - 2 other embeddings are its negatives. Returns the mean over the 2N
    anchors of ``-log softmax(sim / T)[positive]`` (a scalar >= 0), the
    symmetric form of the paper and of lightly's ``NTXentLoss``. DBD uses
    T = 0.5.
    """

    def __init__(self, temperature: float = 0.5):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def forward(self, z1: torch.Tensor, z2: torch.Tensor, dist=None) -> torch.Tensor:
        """``dist``: a :class:`~unbackdoor.training.distributed.DistContext`; under DDP
        (``dist.enabled``) z1, z2 are this rank's share and the negatives come from all
        ranks (:meth:`forward_gathered`)."""
        if dist is not None and dist.enabled:
            return self.forward_gathered(z1, z2, dist)
        n = len(z1)
        z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
        sim = z @ z.t() / self.temperature  # (2N, 2N) cosine similarities / T
        sim.fill_diagonal_(float("-inf"))  # an embedding is not its own negative
        pos = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
        return F.cross_entropy(sim, pos)

    def forward_gathered(self, z1: torch.Tensor, z2: torch.Tensor, dist) -> torch.Tensor:
        """NT-Xent over the *global* batch under DDP, for this rank's anchors.

        Each rank holds n of the W * n images (both views). The normalised local
        embeddings are all-gathered *with autograd*, so every local anchor is scored
        against all 2Wn embeddings, exactly its candidate set on one process. The
        rank returns the mean over its 2n anchors, ``L_r``; the single-process loss
        is their average ``L = (1/W) sum_r L_r``.

        Why the gradient equals the single-process one: the backward of the gathering
        all-gather sums, over ranks, the gradient reaching each block and returns it to
        the block's owner, so rank r's parameters receive ``d(sum_s L_s)/dθ`` through
        its own embeddings z_r. DDP then *averages* the W ranks' parameter gradients:
        ``(1/W) sum_r d(sum_s L_s)/dθ|_{via z_r} = d((1/W) sum_s L_s)/dθ = dL/dθ``.
        No extra scaling is needed (each rank's loss already is a mean over its own
        anchors, all ranks having the same n). BatchNorm still sees only the local
        batch unless ``engine.sync_bn`` is set. Tested in tests/test_distributed.py.
        """
        n = len(z1)
        local = F.normalize(torch.cat([z1, z2]).float(), dim=1)  # (2n, D): [view 1; view 2]
        everything = all_gather_with_grad(local, dist)  # (W * 2n, D), rank-major
        sim = local @ everything.t() / self.temperature  # (2n, 2Wn)
        off = dist.rank * 2 * n  # this rank's block in the gathered set
        rows = torch.arange(2 * n, device=local.device)
        self_mask = torch.zeros_like(sim, dtype=torch.bool)
        self_mask[rows, off + rows] = True
        sim = sim.masked_fill(self_mask, float("-inf"))
        pos = off + torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(local.device)
        return F.cross_entropy(sim, pos)


def reverse_cross_entropy(logits: torch.Tensor, target: torch.Tensor, num_classes: int | None = None,
                          log_zero: float = -math.log(1e-4)) -> torch.Tensor:
    """Per-sample reverse cross-entropy ``-sum_k p_k log q_k`` (float (N,), >= 0).

    logits: (N, C); target: int64 (N,). ``q`` is the one-hot label with its zeros
    clamped to 1e-4 (so ``log 0`` becomes ``-log_zero``) and ``p = softmax(logits)``
    clamped to [1e-7, 1], as in the SCE paper and DBD's reference code; the
    result equals ``log_zero * (1 - p_target)`` up to the clamp.
    """
    prob = logits.float().softmax(1).clamp(min=1e-7, max=1.0)
    p_t = prob.gather(1, target[:, None]).squeeze(1)
    return log_zero * (prob.sum(1) - p_t)


def symmetric_cross_entropy(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.1, beta: float = 1.0,
                            reduction: str = "mean") -> torch.Tensor:
    """Symmetric cross-entropy (Wang et al. 2019): ``alpha * CE + beta * RCE``.

    logits: float (N, C); target: int64 (N,) in [0, C). ``reduction``: ``mean``
    (scalar) or ``none`` (per-sample, float (N,)). Values lie in
    [0, alpha * log(1/1e-7) + beta * 9.21]. DBD: alpha = 0.1, beta = 1.0.
    """
    ce = F.cross_entropy(logits.float(), target, reduction="none")
    loss = alpha * ce + beta * reverse_cross_entropy(logits, target)
    if reduction == "mean":
        return loss.mean()
    if reduction == "none":
        return loss
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


class SCELoss(nn.Module):
    """Module form of :func:`symmetric_cross_entropy`."""

    def __init__(self, alpha: float = 0.1, beta: float = 1.0, reduction: str = "mean"):
        super().__init__()
        self.alpha, self.beta, self.reduction = alpha, beta, reduction

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return symmetric_cross_entropy(logits, target, self.alpha, self.beta, self.reduction)


def sharpen(p: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """MixMatch's sharpening: ``p ** (1/T)`` renormalised over the last axis.

    p: probabilities (..., C), rows summing to 1. T -> 0 gives one-hot, T = 1 the identity.
    """
    pt = p ** (1.0 / temperature)
    return pt / pt.sum(-1, keepdim=True)


def mixup_lambda(alpha: float, rng: np.random.Generator) -> float:
    """MixMatch's mixing weight: ``lam ~ Beta(alpha, alpha)``, then ``max(lam, 1 - lam)``
    (so the mix stays closer to its first input). A Python float in [0.5, 1].

    Drawn on the host from ``rng`` so the training loop never waits for the device.
    """
    lam = float(rng.beta(alpha, alpha))
    return max(lam, 1.0 - lam)


def mixup(x: torch.Tensor, y: torch.Tensor, lam: float, perm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix each sample with the one ``perm`` pairs it with.

    x: float (N, ...) inputs; y: float (N, C) soft targets; perm: int64 (N,), a
    permutation. Returns ``lam * x + (1 - lam) * x[perm]`` and the same for y.
    """
    return torch.lerp(x[perm], x, lam), torch.lerp(y[perm], y, lam)


def mixmatch_loss(logits_x: torch.Tensor, targets_x: torch.Tensor, logits_u: torch.Tensor,
                  targets_u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MixMatch's two terms (Berthelot et al. 2019), as in DBD's reference code.

    logits_x: (B, C) for the mixed labelled part, targets_x: (B, C) soft labels;
    logits_u: (M, C), targets_u: (M, C) for the mixed unlabelled part.
    Returns ``(Lx, Lu)``: Lx = mean soft cross-entropy, Lu = mean squared error
    between ``softmax(logits_u)`` and ``targets_u`` (averaged over samples *and*
    classes, like the reference). The total loss is ``Lx + lambda_u * Lu``.
    """
    lx = -(F.log_softmax(logits_x.float(), 1) * targets_x).sum(1).mean()
    lu = ((logits_u.float().softmax(1) - targets_u) ** 2).mean()
    return lx, lu


def weight_given_label(p: torch.Tensor, given: torch.Tensor, weight: float, gate: float) -> torch.Tensor:
    """Guessed class probabilities ``p`` (N, C) with each row's given label (``given``,
    int64 (N,)) up-weighted by ``weight`` where it is plausible - its probability at
    least ``gate`` times the row's largest - and renormalised. Rows where it is not are
    returned unchanged. A Bayesian reading: the given label is evidence for its class,
    weighed only where the model does not confidently contradict it."""
    idx = given[:, None]
    py = p.gather(1, idx)
    plausible = py >= gate * p.max(1, keepdim=True).values
    out = p.scatter(1, idx, torch.where(plausible, py * weight, py))
    return out / out.sum(1, keepdim=True)


def linear_rampup(progress: float, length: float) -> float:
    """``clip(progress / length, 0, 1)``: the weight of MixMatch's unlabelled term
    after ``progress`` epochs of a ramp-up lasting ``length`` epochs (1 if length is 0)."""
    if length <= 0:
        return 1.0
    return float(min(max(progress / length, 0.0), 1.0))
