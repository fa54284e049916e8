"""Metrics, defined once (docs/design.md).

- clean accuracy (BA): accuracy on the clean test set;
- attack success rate (ASR): on test images whose true label is not the target
  (all-to-one; all-to-all: every image, target = label + 1 mod C) with the
  trigger applied, the fraction predicted as the attacker's target;
- robust accuracy (RA): the same triggered images, fraction predicted as the true label;
- DER = (max(0, ASR_before - ASR_after) - max(0, BA_before - BA_after) + 1) / 2;
- detection precision / recall / F1 of flagged samples against the poison mask.
"""
from __future__ import annotations

import torch
from torch import nn

from unbackdoor.attacks.base import Attack
from unbackdoor.data.dataset import ImageDataset


def accuracy(pred: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of ``pred == labels`` (both int (N,)); 0.0 for empty input."""
    return float((pred == labels).float().mean()) if len(labels) else 0.0


def attack_success_rate(pred_triggered: torch.Tensor, target_labels: torch.Tensor) -> float:
    """Fraction of triggered, counted images predicted as the attacker's target."""
    return accuracy(pred_triggered, target_labels)


def robust_accuracy(pred_triggered: torch.Tensor, true_labels: torch.Tensor) -> float:
    """Fraction of triggered, counted images still predicted as their true label."""
    return accuracy(pred_triggered, true_labels)


def der(ba_before: float, asr_before: float, ba_after: float, asr_after: float) -> float:
    """Defense effectiveness rating in [0, 1] (BackdoorBench); 0.5 = no change."""
    return (max(0.0, asr_before - asr_after) - max(0.0, ba_before - ba_after) + 1.0) / 2.0


def detection_scores(flagged: torch.Tensor, poisoned: torch.Tensor) -> dict[str, float]:
    """Precision / recall / F1 of ``flagged`` (bool (N,)) as a detector of ``poisoned`` (bool (N,))."""
    flagged, poisoned = flagged.bool(), poisoned.bool()
    tp = int((flagged & poisoned).sum())
    fp = int((flagged & ~poisoned).sum())
    fn = int((~flagged & poisoned).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "flagged": tp + fp, "poisoned": tp + fn,
            "true_positives": tp}


@torch.no_grad()
def predict(model: nn.Module, images_u8: torch.Tensor, batch_size: int = 512, device: torch.device | str | None = None) -> torch.Tensor:
    """Predicted labels (int64 (N,), on CPU) for uint8 (N, C, H, W) images."""
    if device is None:
        param = next(model.parameters(), None)  # a parameter-free model (a fixed rule) runs on the CPU
        device = param.device if param is not None else "cpu"
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(images_u8), batch_size):
        x = images_u8[i : i + batch_size].to(device).float().div_(255)
        out.append(model(x).argmax(1).cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def evaluate(model: nn.Module, test: "ImageDataset", attack: "Attack | None" = None, batch_size: int = 512,
             device: torch.device | str | None = None) -> dict[str, float]:
    """Clean accuracy, and with an attack also ASR and robust accuracy, on ``test`` (clean)."""
    res = {"clean_accuracy": accuracy(predict(model, test.images, batch_size, device), test.labels), "n_test": len(test)}
    if attack is not None:
        keep = attack.asr_mask(test.labels)
        imgs = attack.apply_uint8(test.images[keep])
        true = test.labels[keep]
        pred = predict(model, imgs, batch_size, device)
        res.update({
            "attack_success_rate": attack_success_rate(pred, attack.target_labels(true)),
            "robust_accuracy": robust_accuracy(pred, true),
            "n_triggered": int(keep.sum()),
        })
    return res
