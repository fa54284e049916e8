"""DBD's split and the detection it exports: per-sample SCE losses of the current
model, the high-/low-credible split (with the optional class floor), and the
per-sample detection table / AUROC written by :func:`unbackdoor.defenses.dbd.run_dbd`."""
from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from unbackdoor.core.errors import UnbackdoorError
from unbackdoor.data.dataset import ImageDataset
from unbackdoor.defenses.dbd.config import _fraction
from unbackdoor.defenses.dbd.losses import symmetric_cross_entropy
from unbackdoor.metrics import detection_scores
from unbackdoor.models.model_dir import penultimate_features
from unbackdoor.training.distributed import DistContext, broadcast_buffers, gather_sharded, shard_indices


@dataclass
class Split:
    """Per-sample SCE losses and the high-credible mask (True = label kept)."""

    losses: torch.Tensor  # float (N,), on CPU
    kept: torch.Tensor  # bool (N,), on CPU: the lowest-loss fraction epsilon
    agreeing: torch.Tensor | None = None  # bool (N,): the model's prediction equals the given label

    def gap(self, tail: float = 0.1) -> float:
        """The stage-2 guard's statistic: mean loss of the highest-loss fraction ``tail``
        minus mean loss of the kept part. It grows while the head learns the clean
        classes and shrinks once it starts fitting the poisoned (highest-loss) samples."""
        k = max(1, int(round(len(self.losses) * tail)))
        top = torch.topk(self.losses, k).values.mean()
        return float(top - self.losses[self.kept].mean())

    def quality(self, poisoned: torch.Tensor | None, tail: float = 0.1) -> dict:
        """Size, loss gap and - given a known poison mask - detection scores of the
        rejected (low-credible) part and the number of poisoned samples kept."""
        out = {"n_kept": int(self.kept.sum()), "loss_gap": self.gap(tail)}
        if self.agreeing is not None:
            out["agreement"] = float(self.agreeing.float().mean())
        if poisoned is not None:
            det = detection_scores(~self.kept, poisoned)
            out.update({"poisoned_kept": int((self.kept & poisoned).sum()), "precision": det["precision"],
                        "recall": det["recall"], "f1": det["f1"]})
        return out


def sample_losses(model: nn.Module, data: ImageDataset, alpha: float = 0.1, beta: float = 1.0,
                  batch_size: int = 512, dist: DistContext | None = None) -> torch.Tensor:
    """Per-sample SCE loss of ``model`` on ``data``: float (N,) on CPU (:func:`sample_scores`)."""
    return sample_scores(model, data, alpha, beta, batch_size, dist)[:, 0].contiguous()


@torch.no_grad()
def sample_scores(model: nn.Module, data: ImageDataset, alpha: float = 0.1, beta: float = 1.0,
                  batch_size: int = 512, dist: DistContext | None = None) -> torch.Tensor:
    """Per-sample SCE loss, agreement (1.0 where the prediction is the given label) and
    plausibility of the given label (log p_given - log p_top: 0 where it is the top class)
    of ``model`` (eval mode, no augmentation) on ``data``: float (N, 3) on CPU.
    Always fp32, whatever the stages train in: scoring with bf16 autocast was faster
    but moved the split enough to let the SIG backdoor through on one seed
    (evidence: docs/results_dbd.md, Benchmark).

    With an enabled ``dist`` (a collective: every rank calls it) each rank scores its
    share ``idx[rank::world]`` with rank 0's BatchNorm statistics and the losses are
    all-gathered, so every rank returns the same (N, 2) tensor a single process computes."""
    dev = next(model.parameters()).device
    ctx = dist or DistContext()
    broadcast_buffers(model, ctx)
    idx = shard_indices(len(data), ctx)
    was_training = model.training
    model.eval()
    out = []
    try:
        for i in range(0, len(idx), batch_size):
            j = idx[i : i + batch_size]
            x = data.images[j].to(dev).float().div_(255)
            y = data.labels[j].to(dev)
            logits = model(x)
            logp = logits.float().log_softmax(1)
            out.append(torch.stack([symmetric_cross_entropy(logits, y, alpha, beta, reduction="none"),
                                    (logits.argmax(1) == y).float(),
                                    logp.gather(1, y[:, None])[:, 0] - logp.max(1).values], 1).cpu())
    finally:
        model.train(was_training)
    local = torch.cat(out) if out else torch.zeros(0, 3)
    if not ctx.enabled:
        return local
    return gather_sharded(local.to(dev), len(data), ctx).cpu()


def split_by_loss(model: nn.Module, train: ImageDataset, eps: float = 0.5, alpha: float = 0.1, beta: float = 1.0,
                  batch_size: int = 512, dist: DistContext | None = None, class_floor: float = 0.0,
                  balanced: bool = False) -> Split:
    """DBD's split: the samples with the lowest SCE loss are high-credible (keep their
    label); the rest is treated as unlabelled. Ties are broken by index (a stable
    sort), so the split is deterministic. Under DDP pass ``dist`` (all ranks call it):
    the losses are computed sharded and all-gathered (:func:`sample_scores`), so every
    rank gets the global split.

    ``balanced=False`` (the paper): the fraction ``eps`` of all samples, by global loss.
    ``class_floor`` then makes every class keep at least ``ceil(class_floor * its size)``
    of its own lowest-loss samples (a class with no labelled sample is never learned).

    ``balanced=True``: each class keeps its ``int(eps * min(its size, median class
    size))`` lowest-loss samples. Hard classes keep as many labels as easy ones, and a
    class inflated by relabelled poisons fills no more than a typical class's quota."""
    _fraction("epsilon", eps)
    if not 0.0 <= class_floor <= eps:
        raise UnbackdoorError(f"class_floor must be in [0, epsilon={eps}], got {class_floor}")
    sc = sample_scores(model, train, alpha, beta, batch_size, dist)
    losses, agreeing = sc[:, 0].contiguous(), sc[:, 1] > 0.5
    order = torch.sort(losses, stable=True).indices
    kept = torch.zeros(len(losses), dtype=torch.bool)
    labels = train.labels.cpu()[order]  # labels in loss order
    if balanced:
        sizes = torch.bincount(train.labels.cpu(), minlength=train.num_classes)
        cap = float(sizes[sizes > 0].float().median()) if len(losses) else 0.0
        for c in labels.unique():
            of_c = order[labels == c]
            kept[of_c[: int(eps * min(len(of_c), cap))]] = True
        return Split(losses, kept, agreeing)
    if class_floor > 0:
        for c in labels.unique():
            of_c = order[labels == c]
            kept[of_c[: math.ceil(class_floor * len(of_c))]] = True
    rest = order[~kept[order]]  # the rest of the budget by global loss
    kept[rest[: max(0, int(len(losses) * eps) - int(kept.sum()))]] = True
    return Split(losses, kept, agreeing)


@dataclass
class Trust:
    """Which given labels the polish trusts (:func:`trusted_labels`)."""

    kept: torch.Tensor  # bool (N,), on CPU: the label is trusted
    implausible: list[float]  # per class: fraction of its samples whose given label is implausible
    suspect: list[int]  # classes where only agreeing, stage-3-labelled samples are trusted

    def summary(self, poisoned: torch.Tensor | None) -> dict:
        out = {"n_trusted": int(self.kept.sum()), "suspect_classes": self.suspect,
               "implausible_fraction": [round(f, 4) for f in self.implausible]}
        if poisoned is not None:
            out["poisoned_trusted"] = int((self.kept & poisoned).sum())
        return out


def trusted_labels(model: nn.Module, train: ImageDataset, plausible: float = 0.01, ratio: float = 1.5,
                   batch_size: int = 512, dist: DistContext | None = None,
                   labelled: torch.Tensor | None = None) -> Trust:
    """The samples whose given label the polish trains on (``PolishConfig``).

    A label is *plausible* when the model gives it at least ``plausible`` times the
    probability of its top class. A single-target attack relabels its poisons to one
    class, so that class holds far more implausible labels than any other: the class
    with the largest implausible fraction is *suspect* when that fraction is at least
    ``ratio`` times the next largest. Trusted: in the suspect class the samples the model
    agrees with that are also in ``labelled`` (stage 3's final high-credible part, where
    given: a poison the model has started to agree with is still a high-loss sample of
    its class there), in the other classes every plausible one. Only the given labels and
    the model's own predictions decide (no poison mask, no test set)."""
    if not 0 < plausible <= 1:
        raise UnbackdoorError(f"polish.plausible must be in (0, 1], got {plausible}")
    sc = sample_scores(model, train, batch_size=batch_size, dist=dist)
    agreeing, ok = sc[:, 1] > 0.5, sc[:, 2] >= math.log(plausible)
    labels = train.labels.cpu()
    sizes = torch.bincount(labels, minlength=train.num_classes).clamp(min=1).float()
    frac = torch.bincount(labels[~ok], minlength=train.num_classes).float() / sizes
    order = frac.argsort(descending=True, stable=True)
    suspect = torch.zeros(train.num_classes, dtype=torch.bool)
    if train.num_classes > 1 and frac[order[0]] > 0 and frac[order[0]] >= ratio * frac[order[1]]:
        suspect[order[0]] = True
    in_suspect = suspect[labels]
    sure = agreeing if labelled is None else agreeing & labelled.cpu()
    kept = (in_suspect & sure) | (~in_suspect & (ok | agreeing))
    return Trust(kept, [float(f) for f in frac], torch.nonzero(suspect).flatten().tolist())


def loss_auroc(losses: torch.Tensor, poisoned: torch.Tensor) -> float | None:
    """Area under the ROC curve of the per-sample loss as a poison score (threshold-free;
    1.0 = every poisoned sample has a higher loss than every clean one). None if one class is empty."""
    if poisoned.all() or not poisoned.any():
        return None
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(poisoned.numpy(), losses.numpy()))


def suspicion_cut(losses: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A short list of suspects from the final losses, chosen without knowing the poison rate.

    The split flags a fixed share by design (1 - epsilon of the data), far more than the
    poisons. Here a two-component Gaussian mixture on the log losses flags the samples
    more likely in the high-loss component, and only when that component is the
    minority (a poisoned fraction is small) and clearly a second mode (Ashman's D > 2;
    a unimodal ranking, as a clean-label attack leaves, flags nothing). Returns a bool
    (N,) mask."""
    from sklearn.mixture import GaussianMixture  # optional-heavy: only when a run ends

    x = torch.log(losses.double().clamp_min(1e-8)).numpy().reshape(-1, 1)
    if len(x) < 4 or float(x.std()) == 0.0:
        return torch.zeros(len(x), dtype=torch.bool)
    gmm = GaussianMixture(2, random_state=seed).fit(x)
    m, sd = gmm.means_.ravel(), np.sqrt(gmm.covariances_.ravel())
    if np.sqrt(2) * abs(m[0] - m[1]) / np.sqrt(sd[0] ** 2 + sd[1] ** 2) <= 2:  # Ashman's D: not two modes
        return torch.zeros(len(x), dtype=torch.bool)
    high = int(m.argmax())
    flagged = torch.from_numpy(gmm.predict_proba(x)[:, high] > 0.5)
    if int(flagged.sum()) * 2 > len(x):
        return torch.zeros(len(x), dtype=torch.bool)
    return flagged


def detection_table(train: ImageDataset, split: Split, suspects: torch.Tensor | None = None) -> str:
    """CSV text: index, label, loss, kept (1 = high-credible), suspect (the short list of
    :func:`suspicion_cut`, where given) and poisoned where known."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    known = train.poisoned is not None
    w.writerow(["index", "label", "loss", "kept"] + (["suspect"] if suspects is not None else [])
               + (["poisoned"] if known else []))
    losses, kept, lab = split.losses.tolist(), split.kept.tolist(), train.labels.tolist()
    pois = train.poisoned.tolist() if known else None
    sus = suspects.tolist() if suspects is not None else None
    for i in range(len(losses)):
        row = [i, lab[i], f"{losses[i]:.6g}", int(kept[i])] + ([int(sus[i])] if sus is not None else [])
        if known:
            row.append(int(pois[i]))
        w.writerow(row)
    return buf.getvalue()


@torch.no_grad()
def knn_agreement(model: nn.Module, data: ImageDataset, queries: ImageDataset | None = None, k: int = 20,
                  max_queries: int = 4096, batch_size: int = 512, seed: int = 0) -> float:
    """How well ``model``'s penultimate features predict ``data``'s labels by k-NN
    (cosine similarity, votes weighted by exp(sim / 0.1)).

    Without ``queries``: leave-one-out agreement with ``data``'s own (given, possibly
    poisoned) labels on up to ``max_queries`` of its samples - what a run can observe.
    With ``queries`` (e.g. a clean test set): k-NN accuracy on them, for reports."""
    dev = next(model.parameters()).device
    was_training = model.training
    model.eval()

    def feats(images: torch.Tensor) -> torch.Tensor:
        out = [penultimate_features(model, images[i: i + batch_size].to(dev).float().div_(255)).flatten(1).float()
               for i in range(0, len(images), batch_size)]
        return F.normalize(torch.cat(out), dim=1)

    try:
        bank, labels = feats(data.images), data.labels.to(dev)
        if queries is None:
            n = len(data)
            pick = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_queries] if n > max_queries \
                else torch.arange(n)
            q, truth, self_idx = bank[pick.to(dev)], labels[pick.to(dev)], pick.to(dev)
        else:
            q, truth, self_idx = feats(queries.images), queries.labels.to(dev), None
        correct = 0
        for i in range(0, len(q), batch_size):
            sim = q[i: i + batch_size] @ bank.T
            if self_idx is not None:  # leave one out
                sim[torch.arange(len(sim), device=dev), self_idx[i: i + batch_size]] = -2.0
            v, j = sim.topk(min(k, len(bank) - (self_idx is not None)), dim=1)
            votes = torch.zeros(len(sim), data.num_classes, device=dev).scatter_add_(1, labels[j], (v / 0.1).exp())
            correct += int((votes.argmax(1) == truth[i: i + batch_size]).sum())
    finally:
        model.train(was_training)
    return correct / max(1, len(q))


def class_balance(train: ImageDataset, split: Split) -> dict:
    """Per class (by name): samples with that given label, and how many of them the split keeps labelled."""
    n = torch.bincount(train.labels.cpu(), minlength=train.num_classes).tolist()
    kept = torch.bincount(train.labels.cpu()[split.kept], minlength=train.num_classes).tolist()
    return {name: {"n": n[c], "kept": kept[c]} for c, name in enumerate(train.classes)}
