"""The report's model-based analysis: load a run's model, predict, take its
penultimate features, and measure / embed them (poisoned-neighbour rate, 2-D map)."""
from __future__ import annotations

import numpy as np
import torch

from unbackdoor.core.errors import UnbackdoorError
from unbackdoor.metrics import predict
from unbackdoor.models.model_dir import load_model, penultimate_features
from unbackdoor.report.runs import ModelRun


def load_run_model(run: ModelRun, device: str):
    """The run's model (eval mode), or None when its files cannot be loaded."""
    try:
        return load_model(run.path, device=device)
    except UnbackdoorError:
        return None


@torch.no_grad()
def predict_labels(model, images_u8: torch.Tensor) -> torch.Tensor:
    """Predicted labels for uint8 images (N, C, H, W)."""
    return predict(model, images_u8, batch_size=256)


@torch.no_grad()
def features_of(model, images_u8: torch.Tensor, batch: int = 256) -> np.ndarray:
    """Penultimate-layer features (N, D) for uint8 images, flattened, float32."""
    dev = next(model.parameters()).device
    out = [penultimate_features(model, images_u8[i : i + batch].to(dev).float().div_(255)).flatten(1).float().cpu()
           for i in range(0, len(images_u8), batch)]
    return torch.cat(out).numpy()


def _unit(feats: np.ndarray) -> np.ndarray:
    # L2-normalised, not standardised per dimension: standardising gives the many
    # shape dimensions the weight of the few the trigger drives, and hid the poisoned
    # cluster of a backdoored cnn-small (seen on the demo's model; evidence:
    # docs/results_dbd.md, "Evidence quoted from earlier docstrings").
    x = feats.astype(np.float32)
    return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-12)


def poisoned_neighbours(feats: np.ndarray, poisoned: np.ndarray, k: int = 10) -> float | None:
    """Mean fraction of poisoned samples among the ``k`` nearest neighbours (cosine) of each
    poisoned sample: high when the features cluster the poisoned samples together; the
    poisoning rate is chance."""
    from sklearn.neighbors import NearestNeighbors

    poisoned = np.asarray(poisoned, dtype=bool)
    if poisoned.sum() < 2 or len(feats) <= k:
        return None
    x = _unit(feats)
    _, ind = NearestNeighbors(n_neighbors=k + 1).fit(x).kneighbors(x[poisoned])
    return float(poisoned[ind[:, 1:]].mean())


def embed_2d(feats: np.ndarray, seed: int = 0) -> tuple[np.ndarray, str]:
    """2-D embedding of features (N, D): UMAP when installed, else t-SNE (after PCA to 50 dims)."""
    from sklearn.decomposition import PCA

    x = _unit(feats)
    if x.shape[1] > 50 and len(x) > 50:
        x = PCA(n_components=50, random_state=seed).fit_transform(x)
    try:
        import umap  # type: ignore[import-not-found]

        return umap.UMAP(n_components=2, random_state=seed).fit_transform(x), "UMAP"
    except ImportError:
        pass
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    perplexity = float(min(30.0, max(2.0, (len(x) - 1) / 3)))
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto", random_state=seed)
    # One thread: on a shared 2-core machine OpenMP spin-waiting made t-SNE several times slower (docs/results_dbd.md).
    with threadpool_limits(limits=1):
        return tsne.fit_transform(x), "t-SNE"


def subsample(n: int, k: int, seed: int) -> np.ndarray:
    """Sorted indices of ``k`` of ``n`` items drawn without replacement (all when k >= n)."""
    if k >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False))
