"""FP: Fine-Pruning (Liu, Dolan-Gavitt, Garg; RAID 2018), a baseline that uses a small
labelled clean pool.

A backdoor tends to live in neurons the clean data leaves dormant, so:

1. **Prune.** Record the mean activation of every channel of the last convolutional
   layer on the clean pool and prune channels in increasing order of activation
   (dormant first), ``ceil(C * once_prune_ratio)`` at a time, while the clean-pool
   accuracy stays within ``acc_ratio`` (relative) of the unpruned model's and at most
   ``max_prune_ratio`` of the channels are pruned. The last pruning that kept the
   accuracy is the one used.
2. **Fine-tune** the pruned model on the clean pool (FT's trainer), keeping the pruned
   channels at exactly zero after every optimiser step.

What is pruned (:func:`pruning_unit`): the last ``nn.Conv2d`` in ``model.modules()``
order, and the ``BatchNorm2d`` that reads its output directly, if one does (found by
tracing one forward pass, not by module order). A pruned channel ``c`` gets
``conv.weight[c] = 0`` (and ``conv.bias[c] = 0`` where the conv has a bias) and, where a
BatchNorm follows, ``bn.weight[c] = bn.bias[c] = 0``: the channel is exactly 0 after the
conv (+ BN, + ReLU) for every input, in eval and train mode. The pruning is baked into the
weights, so the saved model directory, loaded as a plain model, is pruned.

- ``cnn-small``: ``backbone.8`` (the third block's conv, 64 channels) and ``backbone.9``
  (its BN); a pruned channel is 0 after BN + ReLU + max-pool, i.e. its 3x3 positions of
  the flattened features are 0: the paper's rule (last conv layer, post-activation).
- ``resnet18``: ``backbone.layer4.1.conv2`` (512) with ``bn2``: the last residual branch.
  The identity shortcut still carries the channel into the block's output, so pruning
  removes that channel's contribution of the last branch, not the channel of the final
  feature map.
- ``preact-resnet18``: ``backbone.layer4.1.conv2`` alone (no BN reads it: it is added to
  the shortcut first); likewise for the branch only.

The activation of a channel is the mean over pool images and positions of
``ReLU(unit output)`` (unit = the BN, or the conv where none follows), in eval mode: for
cnn-small exactly the block's post-activation; for the ResNets the branch's.

Settings of BackdoorBench (``config/defense/fp/config.yaml``, ``defense/fp.py``):
fine-tuning SGD lr 0.01, momentum 0.9, weight decay 5e-4, cosine, 100 epochs, batch 256
(:class:`~unbackdoor.defenses.posttrain.FineTuneConfig`'s defaults); ``acc_ratio 0.1``
(stop once the clean accuracy falls by 10% of itself), ``once_prune_ratio 0.01`` (1% of
the channels per step), on 5% of the training set (``ratio 0.05``). Where we deviate:

- BackdoorBench hooks the classifier's input (the pooled features) and masks the fc
  layer's columns; we prune the last conv layer as the paper does, and bake it into the
  conv / BN weights (its mask is a ``torch.nn.utils.prune`` re-parametrisation).
- BackdoorBench decides on the clean *test* set; a defender has only the clean pool, so
  we decide on the pool.
- BackdoorBench prunes ``seq_sort[0:num_pruned - 1]`` (one fewer than it logs) and keeps
  pruning the same module object, so the model it fine-tunes is the first one that
  *failed* the accuracy rule; we fine-tune the last one that passed, with exactly the
  channels we record. It also stops on a 10% *rise* (``abs(...)``); we stop on a drop.
- BackdoorBench has no cap on the pruned fraction (the accuracy rule stops it); we add
  ``max_prune_ratio`` (1.0 = no cap, the ``paper`` preset).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from unbackdoor.core.errors import UnbackdoorError, unknown_name
from unbackdoor.core.files import read_json, write_json
from unbackdoor.data.dataset import ImageDataset
from unbackdoor.defenses.base import DefenseInputs, register_defense
from unbackdoor.defenses.posttrain import QUICK_STEPS, Defended, FineTuneConfig, PostTrainingDefense, measure
from unbackdoor.metrics import accuracy, predict
from unbackdoor.training.device import pick_device

PRUNING_FILE = "pruning.json"  # the pruning step's record (and what a resumed run reuses)


@dataclass
class FPConfig(FineTuneConfig):
    """Fine-Pruning settings: the fine-tuning (inherited fields) plus the pruning rule;
    defaults are BackdoorBench's (module docstring)."""

    acc_ratio: float = 0.1  # stop before the clean-pool accuracy falls by this fraction of itself
    once_prune_ratio: float = 0.01  # fraction of the channels pruned per step (at least one)
    max_prune_ratio: float = 1.0  # at most this fraction of the channels (1.0: no cap)

    def validate(self) -> None:
        super().validate()
        for key in ("acc_ratio", "once_prune_ratio", "max_prune_ratio"):
            v = getattr(self, key)
            if not 0 < v <= 1:
                raise UnbackdoorError(f"fp.{key} must be in (0, 1], got {v}")

    def pruning_settings(self) -> dict:
        return {"acc_ratio": self.acc_ratio, "once_prune_ratio": self.once_prune_ratio,
                "max_prune_ratio": self.max_prune_ratio}


def fp_preset(name: str) -> FPConfig:
    """``paper``: BackdoorBench's settings; ``quick``: FT's quick fine-tuning (1,000 optimiser
    steps at batch 64, :data:`~unbackdoor.defenses.posttrain.QUICK_STEPS`) after the same pruning rule: the pruning search is at most 64 evaluations of
    the pool on cnn-small (seconds), so 500 images on 2 CPU cores take well under a minute."""
    if name == "paper":
        return FPConfig()
    if name == "quick":
        return FPConfig(steps=QUICK_STEPS, batch_size=64)
    raise unknown_name("preset", name, ("paper", "quick"))


@dataclass
class PruningUnit:
    """The layer Fine-Pruning prunes: a conv and the BatchNorm reading its output (if any)."""

    conv_name: str
    bn_name: str | None
    channels: int

    def output_module(self, model: nn.Module) -> nn.Module:
        """The module whose output is the pruned channel map (the BN, else the conv)."""
        return model.get_submodule(self.bn_name or self.conv_name)

    @torch.no_grad()
    def zero(self, model: nn.Module, channels: list[int]) -> None:
        """Set the channels' weights to 0 (conv weight and bias; BN weight and bias)."""
        if not channels:
            return
        mods = [model.get_submodule(self.conv_name)] + ([model.get_submodule(self.bn_name)] if self.bn_name else [])
        for m in mods:
            for p in (m.weight, getattr(m, "bias", None)):
                if p is not None:
                    p[torch.as_tensor(channels, device=p.device)] = 0


def pruning_unit(model: nn.Module, sample: torch.Tensor) -> PruningUnit:
    """The last ``nn.Conv2d`` of ``model`` (``modules()`` order) and the ``BatchNorm2d`` whose
    input is that conv's output tensor in a forward pass on ``sample`` (float images)."""
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise UnbackdoorError("Fine-Pruning prunes the last convolutional layer: the model has no nn.Conv2d")
    conv_name, conv = convs[-1]
    seen: dict[str, torch.Tensor] = {}
    follower: list[str] = []
    hooks = [conv.register_forward_hook(lambda _m, _i, out: seen.__setitem__("out", out))]
    for name, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d) and m.affine:
            hooks.append(m.register_forward_hook(
                lambda _m, inp, _o, name=name: follower.append(name) if inp[0] is seen.get("out") else None))
    try:
        with torch.no_grad():
            was = model.training
            model.eval()
            model(sample)
            model.train(was)
    finally:
        for h in hooks:
            h.remove()
    return PruningUnit(conv_name, follower[0] if follower else None, conv.out_channels)


@torch.no_grad()
def channel_activations(model: nn.Module, unit: PruningUnit, images: torch.Tensor, device: torch.device,
                        batch_size: int = 256) -> torch.Tensor:
    """Mean of ``ReLU(unit output)`` per channel over the images and positions (CPU float64)."""
    total = torch.zeros(unit.channels, dtype=torch.float64, device=device)
    count = 0

    def hook(_m, _i, out):
        nonlocal count
        a = out.detach().float().relu()
        total.add_(a.sum(dim=(0, 2, 3)).double())
        count += a.shape[0] * a.shape[2] * a.shape[3]

    h = unit.output_module(model).register_forward_hook(hook)
    try:
        predict(model, images, batch_size, device)
    finally:
        h.remove()
    return (total / max(1, count)).cpu()


def prune_search(model: nn.Module, unit: PruningUnit, pool: ImageDataset, cfg: FPConfig,
                 device: torch.device) -> dict:
    """Rank channels by clean activation and find how many to prune (module docstring).
    ``model`` is not changed. Returns the record written to ``pruning.json``."""
    act = channel_activations(model, unit, pool.images, device)
    order = [int(i) for i in torch.argsort(act, stable=True)]
    C = unit.channels
    step = max(1, math.ceil(C * cfg.once_prune_ratio))
    k_max = min(C, math.floor(C * cfg.max_prune_ratio + 1e-9))
    mask = torch.ones(C, device=device)
    # The search zeroes the unit's output channels with a hook: the same numbers as zeroed
    # weights (an exact 0 either way), without copying the model per step.
    h = unit.output_module(model).register_forward_hook(lambda _m, _i, out: out * mask.view(1, -1, 1, 1).to(out.dtype))
    steps: list[dict] = []
    try:
        acc0 = None
        kept = 0
        for k in range(0, k_max + 1, step):
            mask.fill_(1.0)
            mask[order[:k]] = 0.0
            acc = accuracy(predict(model, pool.images, 256, device), pool.labels)
            steps.append({"n_pruned": k, "pool_accuracy": acc})
            if acc0 is None:
                acc0 = acc
            elif acc0 - acc < cfg.acc_ratio * acc0:
                kept = k
            else:
                break
    finally:
        h.remove()
    return {"settings": cfg.pruning_settings(), "layer": unit.conv_name, "batchnorm": unit.bn_name, "channels": C,
            "step": step, "activations": [float(a) for a in act], "order": order, "steps": steps,
            "pruned": sorted(order[:kept]), "pool_accuracy_before": steps[0]["pool_accuracy"]}


class FinePruning(PostTrainingDefense):
    """Fine-Pruning (Liu et al., RAID 2018) with BackdoorBench's settings: prune the last convolutional layer's
    channels in increasing order of clean activation (1% at a time) while the clean accuracy stays within
    10% of itself, then fine-tune with the pruned channels held at zero (SGD lr 0.01, momentum 0.9, wd 5e-4,
    cosine, batch 256, 100 epochs). Needs labelled clean images. Writes the model directory at OUT with
    config.yaml, pruning.json, history.json, checkpoint.pt and metrics.json."""

    name, label, config_type = "fp", "FP", FPConfig
    preset_of = staticmethod(fp_preset)
    summary = "FP (baseline): prune the last conv layer's dormant channels on a labelled clean pool, then fine-tune"
    plan = ("prune the last conv layer within {cfg.acc_ratio:.0%} of the clean accuracy, then fine-tune "
            "{cfg.budget} on {n} labelled clean images")

    def defend(self, model: nn.Module, inputs: DefenseInputs, cfg: FPConfig, out: Path, resume: bool) -> Defended:
        pool = inputs.clean
        t0 = time.perf_counter()
        device = pick_device(cfg.engine.device)
        model = model.to(device).eval()
        unit = pruning_unit(model, pool.images[:2].to(device).float().div(255))
        record = read_json(out / PRUNING_FILE) if resume and (out / PRUNING_FILE).is_file() else None
        if record is None or record.get("settings") != cfg.pruning_settings() or record.get("layer") != unit.conv_name:
            record = prune_search(model, unit, pool, cfg, device)
            write_json(out / PRUNING_FILE, record)
        pruned = [int(c) for c in record["pruned"]]
        unit.zero(model, pruned)
        pool_after = accuracy(predict(model, pool.images, 256, device), pool.labels)
        stage = measure(model, inputs)
        prune_seconds = time.perf_counter() - t0

        res = self.fine_tune(model, inputs, cfg, out, resume, desc="fine-tune",
                             after_step=lambda m: unit.zero(m, pruned), settings={"pruning": cfg.pruning_settings(), "pruned": pruned})
        C = unit.channels
        extra = {"pruning": {"layer": unit.conv_name, "batchnorm": unit.bn_name, "channels": C,
                             "n_pruned": len(pruned), "ratio": len(pruned) / C, "pruned_channels": pruned,
                             "pool_accuracy_before": record["pool_accuracy_before"],
                             "pool_accuracy_pruned": pool_after, **cfg.pruning_settings()}}
        history = {"pruning": record["steps"], "fine-tuning": res.history}
        stages = {"pruned": stage} if stage is not None else None
        return Defended(res.model, history, prune_seconds + res.seconds, res.precision, stages=stages, extra=extra)


register_defense(FinePruning())
