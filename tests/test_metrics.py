"""Metrics on hand-made predictions (values worked out by hand), and ``evaluate``
on real models."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from unbackdoor.attacks.base import make_attack
from unbackdoor.data.dataset import ImageDataset
from unbackdoor.metrics import accuracy, attack_success_rate, der, detection_scores, evaluate, predict, robust_accuracy


def t(*values):
    return torch.tensor(values)


def test_accuracy():
    assert accuracy(t(0, 1, 2, 3), t(0, 1, 0, 3)) == pytest.approx(0.75)
    assert accuracy(t(1, 1), t(1, 1)) == 1.0
    assert accuracy(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)) == 0.0


def test_asr_and_robust_accuracy_exclude_target_class_images():
    atk = make_attack("badnets", (1, 8, 8), num_classes=4, target=0)
    labels = t(0, 0, 1, 2, 3, 3)
    pred_triggered = t(0, 0, 0, 0, 3, 1)  # predictions on the triggered copies
    keep = atk.asr_mask(labels)
    assert keep.tolist() == [False, False, True, True, True, True]  # target-class images do not count
    asr = attack_success_rate(pred_triggered[keep], atk.target_labels(labels[keep]))
    ra = robust_accuracy(pred_triggered[keep], labels[keep])
    assert asr == pytest.approx(2 / 4)  # labels 1 and 2 flipped to 0
    assert ra == pytest.approx(1 / 4)  # one label-3 image kept its label
    # counting the target-class images would have inflated ASR to 4/6
    assert attack_success_rate(pred_triggered, atk.target_labels(labels)) == pytest.approx(4 / 6)


def test_asr_all_to_all_targets_label_plus_one():
    atk = make_attack("badnets", (1, 8, 8), num_classes=10, mode="all-to-all")
    labels = t(0, 1, 2, 9)
    pred = t(1, 2, 2, 0)
    keep = atk.asr_mask(labels)
    assert keep.all()  # every image counts in all-to-all
    assert atk.target_labels(labels).tolist() == [1, 2, 3, 0]  # 9 wraps to 0
    assert attack_success_rate(pred[keep], atk.target_labels(labels[keep])) == pytest.approx(3 / 4)
    assert robust_accuracy(pred[keep], labels[keep]) == pytest.approx(1 / 4)


def test_der():
    # ASR 1.00 -> 0.02 (drop 0.98), BA 0.95 -> 0.93 (drop 0.02): (0.98 - 0.02 + 1) / 2
    assert der(0.95, 1.00, 0.93, 0.02) == pytest.approx(0.98)
    assert der(0.9, 0.8, 0.9, 0.8) == pytest.approx(0.5)  # no change
    assert der(0.9, 0.1, 0.95, 0.5) == pytest.approx(0.5)  # ASR rise and BA gain are clipped at 0
    assert der(0.9, 1.0, 0.9, 0.0) == pytest.approx(1.0)
    assert der(1.0, 0.0, 0.0, 0.0) == pytest.approx(0.0)


def test_detection_scores():
    poisoned = torch.tensor([1, 1, 1, 0, 0, 0, 0, 0], dtype=torch.bool)
    flagged = torch.tensor([1, 1, 0, 1, 0, 0, 0, 0], dtype=torch.bool)
    s = detection_scores(flagged, poisoned)
    assert s["true_positives"] == 2 and s["flagged"] == 3 and s["poisoned"] == 3
    assert s["precision"] == pytest.approx(2 / 3) and s["recall"] == pytest.approx(2 / 3)
    assert s["f1"] == pytest.approx(2 / 3)
    s = detection_scores(torch.tensor([1, 0, 0, 0, 0, 0, 0, 0]), poisoned)  # ints are accepted
    assert (s["precision"], s["recall"]) == (1.0, pytest.approx(1 / 3))
    assert s["f1"] == pytest.approx(2 * (1 / 3) / (1 + 1 / 3))
    none = detection_scores(torch.zeros(8, dtype=torch.bool), poisoned)
    assert (none["precision"], none["recall"], none["f1"]) == (0.0, 0.0, 0.0)


class PatchDetector(nn.Module):
    """A tiny real model with known behaviour: predicts class 0 when the bottom-right 3x3
    corner is white (the BadNets trigger), else class 1."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lit = (x[:, :, -3:, -3:].mean(dim=(1, 2, 3)) > 0.99).float()
        return torch.stack([lit, 1 - lit, torch.zeros_like(lit)], 1)


def test_evaluate_counts_exactly_on_a_known_model():
    images = torch.zeros(6, 1, 8, 8, dtype=torch.uint8)
    test = ImageDataset(images, t(0, 1, 1, 2, 2, 2), ["a", "b", "c"])
    model = PatchDetector()
    # target 0: the five non-target images are counted; the trigger sends all to 0
    atk0 = make_attack("badnets", (1, 8, 8), 3, target=0)
    r = evaluate(model, test, atk0, device="cpu")
    assert r["clean_accuracy"] == pytest.approx(2 / 6)  # clean images are all predicted 1
    assert (r["attack_success_rate"], r["robust_accuracy"], r["n_triggered"]) == (1.0, 0.0, 5)
    # target 1: label-1 images are excluded; of the 4 counted, none goes to 1, the label-0 image stays 0
    atk1 = make_attack("badnets", (1, 8, 8), 3, target=1)
    r = evaluate(model, test, atk1, device="cpu")
    assert r["n_triggered"] == 4 and r["attack_success_rate"] == 0.0
    assert r["robust_accuracy"] == pytest.approx(1 / 4)
    assert set(evaluate(model, test)) == {"clean_accuracy", "n_test"}  # no attack: clean accuracy only


def test_evaluate_on_a_trained_model(clean_cnn, mnist_splits):
    test = mnist_splits.test
    atk = make_attack("badnets", test.shape, 10, target=0)
    r = evaluate(clean_cnn, test, atk, batch_size=300)
    pred = predict(clean_cnn, test.images)
    assert r["clean_accuracy"] == pytest.approx(float((pred == test.labels).float().mean()))
    assert r["clean_accuracy"] > 0.9
    keep = test.labels != 0
    pred_t = predict(clean_cnn, atk.apply_uint8(test.images[keep]))
    assert r["n_triggered"] == int(keep.sum()) == 900
    assert r["attack_success_rate"] == pytest.approx(float((pred_t == 0).float().mean()))
    assert r["robust_accuracy"] == pytest.approx(float((pred_t == test.labels[keep]).float().mean()))
    assert r["attack_success_rate"] < 0.2  # a clean model ignores the trigger
    assert not clean_cnn.training  # evaluate restores the mode it found
