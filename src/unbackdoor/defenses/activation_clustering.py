"""Activation Clustering (Chen et al., 2018, arXiv:1811.03728): split every class's
activations in two and remove a cluster that is much smaller than the class, then retrain.

A poisoned sample of the target class is classified there for another reason (the
trigger) than its clean samples (their shape), and the last hidden layer shows it: the
class's activations fall into two groups, the poisons the smaller one. Per class (the
given, possibly poisoned labels): reduce the penultimate features to ``nb_dims``
components, split them with 2-means, and flag the smaller cluster when it holds less
than ``size_threshold`` of the class (the paper's *relative size* analysis). A class
that is one blob splits into two halves of similar size, and nothing is flagged.
Then a fresh model of the same architecture is trained on what is left.

Settings from the paper: 2 clusters (k-means), 10 components, the relative-size analysis
with threshold 0.35 (the ``size_threshold`` default of ART's ``ClusteringAnalyzer``, the
authors' IBM library that BackdoorBench's code adapts; a user's share may be set with
``size_threshold``). The paper reduces with ICA; BackdoorBench's ``defense/ac.py`` calls its
reduction with ``reduce='PCA'`` (``nb_dims: 10``, ``nb_clusters: 2`` in
``config/defense/ac/config.yaml``, ``cifar10.yaml``, ``gtsrb.yaml``, ...), and so do we
by default (``reduce: pca``; ``ica`` is sklearn's FastICA, the paper's choice).

BackdoorBench's default analysis is ``cluster_analysis: 'smaller'``: it removes the
smaller cluster of *every* class, whatever its size (``size_threshold: 0.5`` here
reproduces that: a cluster is never more than half of the class). It also clusters each
mini-batch of 256 samples on its own, not the whole class; we cluster the whole class as
the paper does. Retraining, BackdoorBench's settings (same files): SGD lr 0.01, momentum
0.9, weight decay 5e-4, cosine schedule, 100 epochs, batch 256. The ``quick`` preset
retrains as the experiment trains its undefended model (lr 0.05, batch 64, at least 12
epochs and 4,000 steps).

The continuous score (``detection.csv``, AUROC): the k-means margin towards the smaller
cluster, ``|z - c_large| - |z - c_small|`` in the reduced space (positive on the small
cluster's side: the sign is the cluster assignment). It ranks by *where* a sample lies,
not by the size rule, so it is defined in classes the rule leaves alone too. PCA keeps
the features' units, so margins compare across classes; ICA whitens each class, and its
margins are in that class's own units (compare them within a class).

The poisons' share of the target class is what the size rule rests on: our experiments'
(and BackdoorBench's) poison rate is a fraction of the whole training set, so with 10
classes a 10% rate is about half of the target class, and neither 0.35 nor "the smaller
one" then tells the poisoned half from the clean one. On the digits BadNets experiment of
the tests (cnn-small) class 0 splits 125 / 126 with 126 poisons: the 0.35 rule flags
nothing there, "the smaller one" happens to be the poisons' cluster (a coin's throw). With
38 poisons (23% of the class) the 0.35 rule flags exactly them in class 0, and a clean
sub-style of one other class (23 of class 9) (tests/test_detectors.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from unbackdoor.core.config import require_positive
from unbackdoor.core.errors import UnbackdoorError, unknown_name
from unbackdoor.defenses.base import DefenseInputs, Flag, register_defense
from unbackdoor.defenses.filtering import FilterDefense, Flags, RetrainConfig, class_indices, quick_retrain
from unbackdoor.training.engine import EngineOptions

REDUCTIONS = ("pca", "ica")


@dataclass
class ACConfig:
    """Activation Clustering settings; defaults from the paper and BackdoorBench (module docstring)."""

    nb_dims: int = 10  # components the activations are reduced to
    reduce: str = "pca"  # pca (BackdoorBench) | ica (the paper: FastICA)
    size_threshold: float = 0.35  # flag the smaller of the 2 clusters when it holds less than this share of its class
    retrain: RetrainConfig = field(default_factory=RetrainConfig)
    eval_batch_size: int = 512  # feature extraction
    seed: int = 0  # k-means / ICA initialisation and the retrained model
    engine: EngineOptions = field(default_factory=EngineOptions)

    def validate(self) -> None:
        require_positive("ac", nb_dims=self.nb_dims, eval_batch_size=self.eval_batch_size)
        if self.reduce not in REDUCTIONS:
            raise unknown_name("ac.reduce method", self.reduce, REDUCTIONS)
        if not 0.0 < self.size_threshold <= 0.5:
            raise UnbackdoorError(f"ac.size_threshold must be in (0, 0.5] (the smaller of two clusters holds at most "
                                  f"half of its class), got {self.size_threshold}")
        self.retrain.validate_optim("ac.retrain")


def ac_preset(name: str) -> ACConfig:
    """``paper``: the paper's rule (PCA as BackdoorBench) with BackdoorBench's retraining;
    ``quick``: the same rule, retrained like the experiment's undefended model (mnist5k /
    cnn-small on 2 CPU cores; the retraining is nearly all of the cost)."""
    if name == "paper":
        return ACConfig()
    if name == "quick":
        return ACConfig(retrain=quick_retrain())
    raise unknown_name("preset", name, ("paper", "quick"))


def reduce_features(x: np.ndarray, nb_dims: int, method: str = "pca", seed: int = 0) -> np.ndarray:
    """``x`` (n, D) reduced to ``nb_dims`` components; unchanged where it has no more
    dimensions than that, or too few rows to fit them (as ART and BackdoorBench do)."""
    if x.shape[1] <= nb_dims or x.shape[0] <= nb_dims:
        return x
    from sklearn.decomposition import PCA, FastICA  # heavy: only when a run flags

    if method == "ica":
        # ART's / BackdoorBench's FastICA settings (max_iter 1000, tol 0.005)
        return FastICA(n_components=nb_dims, max_iter=1000, tol=0.005, whiten="unit-variance",
                       random_state=seed).fit_transform(x)
    return PCA(n_components=nb_dims, random_state=seed).fit_transform(x)


def ac_flag(feats: torch.Tensor, labels: torch.Tensor, num_classes: int, nb_dims: int = 10, reduce: str = "pca",
            size_threshold: float = 0.35, seed: int = 0) -> Flags:
    """The paper's rule on features (float (N, D)) and given labels (int (N,)): per class,
    reduce, 2-means, and flag the smaller cluster when its share of the class is below
    ``size_threshold``. The score of every sample is its k-means margin towards the smaller
    cluster (module docstring)."""
    from sklearn.cluster import KMeans  # heavy: only when a run flags

    flagged = torch.zeros(len(labels), dtype=torch.bool)
    score = torch.zeros(len(labels), dtype=torch.float64)
    classes = []
    for c, idx in enumerate(class_indices(labels, num_classes)):
        info: dict = {"label": c, "n": len(idx), "flagged": 0}
        x = feats[idx].double().numpy()
        if len(idx) < 2 or float(np.ptp(x, axis=0).max(initial=0.0)) == 0.0:  # nothing to split
            classes.append(info)
            continue
        z = reduce_features(x, nb_dims, reduce, seed)
        km = KMeans(n_clusters=2, n_init=10, random_state=seed).fit(z)
        sizes = np.bincount(km.labels_, minlength=2)
        small = int(np.argmin(sizes))
        share = float(sizes[small] / len(idx))
        d = np.linalg.norm(z[:, None, :] - km.cluster_centers_[None], axis=2)
        score[torch.from_numpy(idx)] = torch.from_numpy(d[:, 1 - small] - d[:, small])
        if share < size_threshold:
            members = idx[km.labels_ == small]
            flagged[torch.from_numpy(members)] = True
            info["flagged"] = len(members)
        info.update({"cluster_sizes": sorted(int(s) for s in sizes), "smaller_share": round(share, 4)})
        classes.append(info)
    return Flags(flagged, score, classes)


class ActivationClustering(FilterDefense):
    """Activation Clustering (Chen et al., 2018): per class, reduce the suspicious model's penultimate features
    to 10 components (PCA as BackdoorBench; --reduce ica: the paper's FastICA), split them with 2-means and
    remove the smaller cluster when it holds less than 35% of the class (the paper's relative size), then
    retrain a fresh model on the rest (BackdoorBench's settings: SGD lr 0.01, cosine, 100 epochs, batch
    256). Writes the model directory at OUT with config.yaml, detection.csv/.json, history.json,
    checkpoint.pt and metrics.json."""

    name, label, config_type = "ac", "AC", ACConfig
    preset_of = staticmethod(ac_preset)
    rule = "per class, 2-means on reduced activations; the smaller cluster if below size_threshold of the class"
    setting_keys = ("nb_dims", "reduce", "size_threshold")
    flags = (Flag("--size-threshold", "flag the smaller cluster below this share of its class (default 0.35, the "
                  "paper's; 0.5: always the smaller one, as BackdoorBench)", float),
             Flag("--reduce", "dimensionality reduction (default pca)", choices=REDUCTIONS), *FilterDefense.flags)
    summary = "Activation Clustering: drop a small second cluster of each class's activations, retrain"

    def describe(self, cfg: ACConfig, inputs: DefenseInputs) -> str:
        return (f"2-means per class on {cfg.nb_dims} {cfg.reduce.upper()} components, drop a cluster under "
                f"{cfg.size_threshold:.0%} of its class, retrain {cfg.retrain.budget}")

    def flag(self, feats: torch.Tensor, labels: torch.Tensor, num_classes: int, cfg: ACConfig) -> Flags:
        return ac_flag(feats, labels, num_classes, cfg.nb_dims, cfg.reduce, cfg.size_threshold, cfg.seed)


register_defense(ActivationClustering())
