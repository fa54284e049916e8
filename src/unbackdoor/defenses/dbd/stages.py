"""DBD: Backdoor Defense via Decoupling the Training Process (Huang et al., ICLR 2022).

Three stages, each a function you can call on its own:

1. :func:`simclr_stage` - self-supervised backbone: SimCLR on the training
   images *without labels* (NT-Xent, T = 0.5, projection head
   Linear(d, d)-BN-ReLU-Linear(d, 128), two batched SimCLR views per image).
   Poisoned labels never reach the backbone, so the trigger is not tied to
   the target class in feature space.
2. :func:`linear_stage` - frozen backbone, a linear head trained on all
   labelled samples with symmetric cross-entropy (SCE, alpha 0.1, beta 1),
   Adam lr 2e-3. Poisoned samples sit with their *true* class in feature
   space, so the head cannot fit their (target) labels: they keep a high loss.
3. :func:`mixmatch_stage` - each epoch, :func:`split_by_loss` keeps the labels
   of the lowest-loss fraction epsilon (0.5, "high-credible") and treats the
   rest as unlabelled; the *whole* model is fine-tuned with MixMatch (K = 2,
   T = 0.5, Beta(0.75) mixup, lambda_u = 15 with linear ramp-up, Adam 2e-3).

:func:`run_dbd` chains them, evaluates after stages 2 and 3, and writes the
outputs (model directory, checkpoints, detection, history, metrics).

Six robustness additions, five fixing a way the published recipe failed on
mnist5k (evidence: docs/results_dbd.md, "The five robustness additions",
sections 1-5), one the clean accuracy it lost on Fashion-MNIST (the polish):

* **Stage-2 guard** (``LinearConfig.guard``). The head is the fragile point:
  trained long enough it learns the trigger from the backbone's features,
  poisoned samples then enter the high-credible half and the per-epoch
  re-split feeds the backdoor back in (Blended with the paper's 10-epoch head
  kept its whole backdoor; with the guard it was removed). See
  :class:`LinearConfig` for the rule.
* **Noise augmentation** on every SimCLR view (``SimCLRConfig.noise``): a
  random global brightness offset plus Gaussian pixel noise, so that the
  self-supervised features cannot cluster images by a global blend
  (without it Blended survives DBD intact).
* **Random gratings** (``grating`` in every stage's augmentation): a sinusoid
  of random frequency, orientation, phase and amplitude added to half the
  images. A clean-label SIG trigger sits on every target-class image with its
  correct label, so no loss-based split can remove it; without the gratings
  both the self-supervised features and the fine-tuned model use it as the
  target class's feature (SIG survives, and clean zeros are no longer
  recognised); with them in all three stages the backdoor goes and the clean
  accuracy stays. Gratings in stage 1 alone clean the head, but stage 3
  relearns the shortcut from the labelled target images.
* **Class-balanced split** (``MixMatchConfig.balanced``, on; ε 0.7): each
  class keeps its lowest-loss ``ε x min(n_c, median class size)`` samples (by
  given label) in the labelled part. The global loss ranking keeps the easy
  classes and drops the hard ones, which MixMatch then learns from its own
  guesses (Fashion-MNIST's coats and shirts). ``class_floor`` (off by default)
  is the earlier, weaker fix: a minimum share per class. Stage 3 also runs on a
  plateau budget with a given-label prior in its cool-down (``MixMatchConfig``).

* **Random patches in stage 3** (``MixMatchConfig.patches``, 0.5): up to four
  random salt-and-pepper squares (2-6 px on 28x28) on half of the MixMatch
  inputs of every class. A clean-label patch trigger (Label-Consistent) keeps
  its correct label and a low loss, so the split leaves it labelled and
  MixMatch learns the patch as the target class. With random patches on every
  class a local patch stops being evidence for one, and the four main attacks
  keep their targets.

* **Polish** (:func:`polish_stage`, ``PolishConfig``): after stage 3, supervised
  fine-tuning on the samples whose given label the stage-3 model trusts
  (:func:`~unbackdoor.defenses.dbd.split.trusted_labels`). MixMatch learns the hard
  clean samples of a class from its own guesses and misses them; their given labels
  are plausible to the defended model, the poisons' are not, and the one class an
  attack relabels to stands out by its share of implausible labels.

All are on by default; ``linear.guard: none``, ``simclr.noise: false``,
``grating: 0`` in each stage, ``mixmatch: {balanced: false, epsilon: 0.5,
label_prior: 1, budget: fixed, patches: 0}``, ``polish: {epochs: 0}`` give the
reference implementation.

Reproducibility and resume: every stage draws its batches, augmentations and
mixup weights from per-epoch streams (``Engine.generator(epoch, stream)`` and a
host ``numpy`` generator seeded with ``(seed, stage, epoch)``) and writes a
checkpoint after every epoch, so a run killed anywhere and resumed ends with
the same model as an uninterrupted one (same device and precision).
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from unbackdoor.attacks.poisoned_data import PoisonedData
from unbackdoor.core import layout
from unbackdoor.core.errors import EmptyDataset, UnbackdoorError
from unbackdoor.core.files import (
    atomic_path,
    plain,
    prepare_out_dir,
    rollback_on_failure,
    write_json,
    write_text,
    write_yaml,
)
from unbackdoor.core.layout import run_metrics
from unbackdoor.data.augment import SimCLRAugment, WeakAugment, random_grating, random_patches
from unbackdoor.data.dataset import ImageDataset
from unbackdoor.defenses.dbd.config import DBDConfig, LinearConfig, MixMatchConfig, PolishConfig, SimCLRConfig
from unbackdoor.defenses.dbd.losses import (
    NTXentLoss,
    linear_rampup,
    mixmatch_loss,
    mixup,
    mixup_lambda,
    sharpen,
    symmetric_cross_entropy,
    weight_given_label,
)
from unbackdoor.defenses.dbd.split import (
    Split,
    class_balance,
    detection_table,
    knn_agreement,
    loss_auroc,
    split_by_loss,
    suspicion_cut,
    trusted_labels,
)
from unbackdoor.metrics import detection_scores, evaluate
from unbackdoor.models.model_dir import last_linear, penultimate_features, save_model, unwrap
from unbackdoor.training.budget import PlateauBudget
from unbackdoor.training.device import pick_device, resolve_precision
from unbackdoor.training.distributed import current_context, run_on_main
from unbackdoor.training.engine import Engine, EngineOptions, checkpoint_precision
from unbackdoor.training.fit import TrainConfig, fit, optim_fields
from unbackdoor.training.loop import Epoch, run_epochs

# Independent random sub-streams per stage (Engine.generator(epoch, stream)).
_STREAM = {"simclr": 1, "linear": 2, "mixmatch": 3}


# ============================================================================ model pieces
class ProjectionHead(nn.Module):
    """SimCLR projection head: Linear(d, d) - BN - ReLU - Linear(d, out). (N, d) -> (N, out)."""

    def __init__(self, dim: int, out_dim: int = 128):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, dim), nn.BatchNorm1d(dim), nn.ReLU(inplace=True), nn.Linear(dim, out_dim))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)


class _SimCLRNet(nn.Module):
    """backbone (the classifier without its head) -> projection head."""

    def __init__(self, model: nn.Module, projector: ProjectionHead):
        super().__init__()
        self.encoder = model
        self.projector = projector
        name = getattr(model, "arch", {}).get("name", type(model).__name__)
        self.arch = {"name": f"simclr:{name}"}  # distinct key for the precision probe's cache

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(penultimate_features(self.encoder, x))


class _LinearProbe(nn.Module):
    """Frozen backbone (no gradients; BN statistics still update in train mode) + trainable head."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.encoder = model
        _, self.head = last_linear(model)
        name = getattr(model, "arch", {}).get("name", type(model).__name__)
        self.arch = {"name": f"probe:{name}"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            h = penultimate_features(self.encoder, x)
        return self.head(h)


def _augmenter(base: Callable | None, grating: float, grating_p: float, patches: float = 0.0) -> Callable | None:
    """``base`` (a batched augmentation or None), then random gratings when ``grating > 0``,
    then random patches when ``patches > 0``."""
    if grating <= 0 and patches <= 0:
        return base

    def aug(x: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
        if base is not None:
            x = base(x, gen)
        if grating > 0:
            x = random_grating(x, grating, grating_p, gen)
        return random_patches(x, patches, gen=gen) if patches > 0 else x
    return aug


def _weak(train: ImageDataset, augment: bool, grating: float, grating_p: float, patches: float = 0.0) -> Callable | None:
    """Weak augmentation (crop + flip where allowed), then gratings and random patches (:func:`_augmenter`)."""
    if not augment:
        return None
    base = WeakAugment(padding=max(1, train.shape[1] // 8), flip=bool(train.meta.get("flip", False)))
    return _augmenter(base, grating, grating_p, patches)


def feature_dim(model: nn.Module) -> int:
    """Size of the penultimate features (the input of the last Linear layer)."""
    return last_linear(model)[1].in_features


@dataclass
class StageResult:
    model: nn.Module  # the classifier (for stage 1: its backbone is trained, its head untouched)
    history: list[dict]
    seconds: float  # training time over all epochs, including those of a resumed run's earlier part
    precision: str
    extra: dict = field(default_factory=dict)


def _stage_engine(net: nn.Module, train: ImageDataset, engine: EngineOptions | None, seed: int, batch_size: int,
                  checkpoint, resume: bool) -> Engine:
    prec = checkpoint_precision(checkpoint) if (resume and checkpoint) else None
    return Engine(net, train.shape, engine or EngineOptions(), seed=seed, batch_size=batch_size, precision=prec)


def _run_stage(eng: Engine, one_epoch: Callable, cfg: Any, checkpoint, resume: bool, stage: str, **kw) -> list[dict]:
    """:func:`run_epochs` for a DBD stage: its random sub-stream, and the resume settings =
    the stage config (and seed) except ``epochs`` (a stage may be extended)."""
    return run_epochs(eng, one_epoch, checkpoint=checkpoint, resume=resume, settings=plain(asdict(cfg)),
                      may_change=("epochs",), stream=_STREAM[stage], **kw)


def _seconds(history: list[dict]) -> float:
    return float(sum(h.get("seconds", 0.0) for h in history))


# ============================================================================ stage 1
def simclr_stage(model: nn.Module, train: ImageDataset, cfg: SimCLRConfig | None = None,
                 checkpoint: str | os.PathLike | None = None, resume: bool = False, *, seed: int = 0,
                 engine: EngineOptions | None = None, on_epoch: Callable[[dict], None] | None = None) -> StageResult:
    """Stage 1: train ``model``'s backbone with SimCLR on ``train``'s images (labels unused).

    Args:
        model: a registry classifier (``features`` + ``fc``) or any ``nn.Module`` whose
            last ``nn.Linear`` is the classifier (its input = the features).
        train: uint8 images (N, C, H, W); ``meta['flip']`` enables horizontal flips.
        checkpoint: written atomically after every epoch (backbone + projection head +
            optimizer); with ``resume`` an existing one is continued.
        on_epoch: called with each epoch's history record after its checkpoint is written.
    Returns the model (in place, on the engine's device, eval mode); history records
    hold the NT-Xent loss and source images per second (each with two views).
    """
    cfg = cfg or SimCLRConfig()
    cfg.validate()
    n = len(train)
    if n < cfg.batch_size:
        raise UnbackdoorError(f"simclr.batch_size {cfg.batch_size} exceeds the {n} training images")
    _, head = last_linear(model)
    with torch.random.fork_rng(devices=[]):  # projection-head init independent of the global RNG state
        torch.manual_seed(seed)
        projector = ProjectionHead(head.in_features, cfg.projection_dim)
    net = _SimCLRNet(model, projector)
    head.requires_grad_(False)  # the classifier gets no gradient here (and DDP must not wait for one)
    try:
        eng = _stage_engine(net, train, engine, seed, cfg.batch_size * 2, checkpoint, resume)
        steps = n // cfg.batch_size
        params = [p for p in eng.model.parameters() if p.requires_grad]
        eng.set_optimizer(params, cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay, cfg.schedule, cfg.epochs * steps)
        aug = _augmenter(SimCLRAugment(scale=tuple(cfg.scale), flip=bool(train.meta.get("flip", False)), noise=cfg.noise,
                                       noise_offset=cfg.noise_offset, noise_std=cfg.noise_std), cfg.grating, cfg.grating_p)
        criterion = NTXentLoss(cfg.temperature)
        images = train.images.to(eng.device)

        def one_epoch(ep: Epoch) -> dict:
            bar = ep.progress(steps)
            tot = torch.zeros((), device=eng.device)
            for idx in eng.batches(n, cfg.batch_size, ep.gen):
                x = images[idx]
                # both views in one batched call and one forward: BN sees both, as in SimCLR
                views = aug(torch.cat([x, x]).float().div_(255), ep.gen)
                with eng.autocast():
                    z = eng.train_model(eng.input(views))
                z1, z2 = z.float().chunk(2)
                loss = criterion(z1, z2, eng.dist)  # negatives from every rank (NTXentLoss.forward_gathered)
                eng.step(loss)
                tot += loss.detach()
                bar.update(len(idx) * eng.dist.world_size)
            stats = ep.all_reduce_sum(tot[None]) / eng.dist.world_size
            return {"loss": float(stats[0]) / steps, "lr": eng.optimizer.param_groups[0]["lr"],
                    "images_per_second": bar.images_per_second}

        history = _run_stage(eng, one_epoch, cfg, checkpoint, resume, "simclr", epochs=cfg.epochs, desc="simclr",
                             on_epoch=on_epoch)
    finally:
        head.requires_grad_(True)
    model.eval()
    return StageResult(model, history, _seconds(history), eng.precision.name, {"projector": projector})


# ============================================================================ stage 2
def _head_state(probe: _LinearProbe) -> dict[str, torch.Tensor]:
    """What stage 2 changes: the head's parameters and the backbone's buffers (BN statistics)."""
    st = {f"head.{k}": v for k, v in probe.head.state_dict().items()}
    st.update({f"buffer.{k}": v for k, v in probe.encoder.named_buffers()})
    return {k: v.detach().cpu().clone() for k, v in st.items()}


def _load_head_state(probe: _LinearProbe, st: dict[str, torch.Tensor]) -> None:
    dev = next(probe.head.parameters()).device
    probe.head.load_state_dict({k[5:]: v.to(dev) for k, v in st.items() if k.startswith("head.")})
    buffers = dict(probe.encoder.named_buffers())
    with torch.no_grad():
        for k, v in st.items():
            if k.startswith("buffer."):
                buffers[k[7:]].copy_(v)


def linear_stage(model: nn.Module, train: ImageDataset, cfg: LinearConfig | None = None,
                 checkpoint: str | os.PathLike | None = None, resume: bool = False, *, seed: int = 0,
                 engine: EngineOptions | None = None, on_epoch: Callable[[dict], None] | None = None,
                 eval_batch_size: int = 512) -> StageResult:
    """Stage 2: train ``model``'s last Linear layer on the frozen backbone with SCE.

    The backbone gets no gradients; its BatchNorm running statistics still update
    (train mode), as in the reference. With ``cfg.guard == "loss-gap"`` the stage
    may stop before ``cfg.epochs`` (see :class:`LinearConfig`); the history records
    per epoch the loss, the split's loss gap and - where ``train.poisoned`` is
    known, for reports only (never used to decide) - how many poisoned samples the
    high-credible part holds. ``extra['guard_epoch']`` is the epoch whose head is kept.
    """
    cfg = cfg or LinearConfig()
    cfg.validate()
    n = len(train)
    bs = min(cfg.batch_size, n)
    probe = _LinearProbe(model)
    frozen = [p for p in model.parameters() if p.requires_grad and all(p is not q for q in probe.head.parameters())]
    for p in frozen:
        p.requires_grad_(False)
    try:
        eng = _stage_engine(probe, train, engine, seed, bs, checkpoint, resume)
        steps = n // bs
        eng.set_optimizer(list(probe.head.parameters()), "adam", cfg.lr, schedule="constant", total_steps=cfg.epochs * steps)
        guard = {"best_gap": -math.inf, "best_epoch": 0, "bad": 0, "done": False, "best_head": None}
        aug = _weak(train, cfg.augment, cfg.grating, cfg.grating_p)
        images, labels = train.images.to(eng.device), train.labels.to(eng.device)

        def one_epoch(ep: Epoch) -> dict:
            bar = ep.progress(steps)
            tot = torch.zeros((), device=eng.device)
            correct = torch.zeros((), device=eng.device)
            for idx in eng.batches(n, bs, ep.gen):
                x = images[idx].float().div_(255)
                if aug is not None:
                    x = aug(x, ep.gen)
                y = labels[idx]
                with eng.autocast():
                    logits = eng.train_model(eng.input(x))
                loss = symmetric_cross_entropy(logits, y, cfg.sce_alpha, cfg.sce_beta)
                eng.step(loss)
                tot += loss.detach()
                correct += (logits.detach().argmax(1) == y).sum()
                bar.update(len(idx) * eng.dist.world_size)
            rec = {"loss": float(tot) / steps, "train_accuracy": float(correct) / (steps * bs),
                   "images_per_second": bar.images_per_second}
            split = split_by_loss(model, train, cfg.epsilon, cfg.sce_alpha, cfg.sce_beta, eval_batch_size, eng.dist)
            rec.update({f"split_{k}": v for k, v in split.quality(train.poisoned, cfg.guard_tail).items()})
            if cfg.guard == "loss-gap" and ep.index + 1 >= cfg.guard_min_epoch:
                gap = rec["split_loss_gap"]
                if gap > guard["best_gap"] * (1 + cfg.guard_min_delta) or guard["best_head"] is None:
                    guard.update(best_gap=gap, best_epoch=ep.index + 1, bad=0, best_head=_head_state(probe))
                else:
                    guard["bad"] += 1
                    if guard["bad"] >= cfg.guard_patience:
                        guard["done"] = True
                rec["guard_best_epoch"] = guard["best_epoch"]
            return rec

        def restore(st: dict) -> None:
            if "guard" in st:
                guard.clear()
                guard.update(st["guard"])

        history = _run_stage(eng, one_epoch, cfg, checkpoint, resume, "linear", epochs=cfg.epochs, desc="dbd head",
                             summary={"loss": "loss", "train_accuracy": "train_accuracy", "gap": "split_loss_gap",
                                      "poisoned_kept": "split_poisoned_kept"},
                             state=lambda: {"guard": guard}, restore=restore, stop=lambda: guard["done"],
                             on_epoch=on_epoch)
        if cfg.guard == "loss-gap" and guard["best_head"] is not None:
            # keep the head of the widest gap: the epochs after it began to fit the trigger
            _load_head_state(probe, guard["best_head"])
    finally:
        for p in frozen:
            p.requires_grad_(True)
    model.eval()
    kept_epoch = guard["best_epoch"] if cfg.guard == "loss-gap" else len(history)
    return StageResult(model, history, _seconds(history), eng.precision.name,
                       {"guard_epoch": kept_epoch, "stopped_early": bool(guard.get("done"))})


# ============================================================================ stage 3
def _cycled_batches(pool: torch.Tensor, batch_size: int, steps: int, gen: torch.Generator) -> torch.Tensor:
    """(steps, batch_size) indices drawn from ``pool`` like a reshuffling, drop-last
    loader restarted when exhausted (the reference's ``iter(loader)`` pattern)."""
    m = len(pool)
    per = m // batch_size  # full batches per pass
    if per == 0:  # fewer samples than one batch: sample with replacement
        pick = torch.randint(0, m, (steps, batch_size), generator=gen, device=gen.device)
        return pool[pick.to(pool.device)]
    passes = math.ceil(steps / per)
    perms = [torch.randperm(m, generator=gen, device=gen.device)[: per * batch_size] for _ in range(passes)]
    order = torch.cat(perms).to(pool.device)[: steps * batch_size]
    return pool[order].view(steps, batch_size)


def epoch_iterations(cfg: MixMatchConfig, n_labelled: int) -> int:
    """Steps of a stage-3 epoch with ``n_labelled`` labelled samples (MixMatchConfig.min_passes)."""
    return max(cfg.iterations, math.ceil(cfg.min_passes * n_labelled / cfg.batch_size))


def mixmatch_stage(model: nn.Module, train: ImageDataset, cfg: MixMatchConfig | None = None,
                   checkpoint: str | os.PathLike | None = None, resume: bool = False, *, seed: int = 0,
                   engine: EngineOptions | None = None, on_epoch: Callable[[dict], None] | None = None,
                   evaluate: Callable[[nn.Module], dict] | None = None, eval_batch_size: int = 512) -> StageResult:
    """Stage 3: semi-supervised fine-tuning of the whole ``model`` with MixMatch.

    Before every epoch :func:`split_by_loss` (SCE, current model) keeps the labels of
    the lowest-loss fraction ``cfg.epsilon``; the rest is unlabelled. Each step takes
    ``batch_size`` labelled and ``batch_size`` unlabelled images, two weak views of
    each unlabelled one (K = 2), guesses their labels (mean softmax, sharpened with
    T), mixes all 3B inputs with a Beta(alpha, alpha) weight and minimises
    ``Lx + lambda_u * ramp * Lu``. One forward pass over the 3B mixed images
    replaces the reference's interleaving (which only serves per-call BatchNorm).
    Under DDP ``batch_size`` is global: each rank guesses, mixes and trains on its
    share of every step's batches (BatchNorm sees the local batch).

    ``evaluate`` (called on the model after every epoch) adds e.g. BA / ASR to the
    history. ``extra['split']`` is the split computed with the final model.
    """
    cfg = cfg or MixMatchConfig()
    cfg.validate()
    n = len(train)
    eng = _stage_engine(model, train, engine, seed, 3 * cfg.batch_size, checkpoint, resume)
    eng.set_optimizer(eng.model.parameters(), "adam", cfg.lr, schedule="constant", total_steps=1)
    aug = _weak(train, cfg.augment, cfg.grating, cfg.grating_p, cfg.patches)
    images, labels = train.images.to(eng.device), train.labels.to(eng.device)
    c = train.num_classes
    # batch_size is global (like Engine.batches): under DDP each of W ranks takes its
    # 1/W share of every step's labelled and unlabelled batch; gradients are averaged.
    world = eng.dist.world_size
    if cfg.batch_size < world:
        raise UnbackdoorError(f"mixmatch.batch_size {cfg.batch_size} is global: it must be >= the {world} processes")
    b = cfg.batch_size // world
    ramp_len = cfg.epochs if cfg.rampup_epochs is None else cfg.rampup_epochs
    budget = None  # budget 'fixed': cfg.epochs at a constant rate
    if cfg.budget == "plateau":  # its state comes from the checkpoint on resume (run_epochs)
        budget = PlateauBudget(ramp_len, cfg.epochs, cfg.plateau_patience, cfg.plateau_delta, cfg.cooldown)
    prev_kept = None

    def one_epoch(ep: Epoch) -> dict:
        nonlocal prev_kept
        epoch, gen = ep.index, ep.gen
        split = split_by_loss(eng.model, train, cfg.epsilon, cfg.sce_alpha, cfg.sce_beta, eval_batch_size, eng.dist,
                              cfg.class_floor, cfg.balanced)
        if budget is not None:
            budget.observe(epoch, float(split.agreeing.float().mean()))
        kept = split.kept.to(eng.device)
        lab_pool, unl_pool = torch.nonzero(kept).flatten(), torch.nonzero(~kept).flatten()
        if len(lab_pool) == 0 or len(unl_pool) == 0:
            raise UnbackdoorError(f"mixmatch.epsilon {cfg.epsilon} leaves an empty labelled or unlabelled set of {n}")
        iters = epoch_iterations(cfg, len(lab_pool))
        lab_idx = _cycled_batches(lab_pool, cfg.batch_size, iters, gen)  # identical on every rank
        unl_idx = _cycled_batches(unl_pool, cfg.batch_size, iters, gen)
        rng = np.random.default_rng([seed, _STREAM["mixmatch"], epoch])
        lams = [mixup_lambda(cfg.alpha, rng) for _ in range(iters)]
        bar = ep.progress(iters)
        sums = torch.zeros(3, device=eng.device)
        for it in range(iters):
            xi, ui = lab_idx[it], unl_idx[it]
            if eng.dist.enabled:
                xi, ui = eng.dist.shard(xi)[:b], eng.dist.shard(ui)[:b]
            batch = torch.cat([images[xi], images[ui], images[ui]]).float().div_(255)
            if aug is not None:
                batch = aug(batch, gen)  # one call: the labelled view and both unlabelled views
            batch = eng.input(batch)
            with torch.no_grad(), eng.autocast():
                p = eng.train_model(batch[b:]).float().softmax(1)
            pbar = (p[:b] + p[b:]) / 2
            progress = epoch + it / iters
            if budget is not None:  # the label prior acts in the cool-down only (MixMatchConfig)
                prior_ramp = budget.cooldown_progress(progress) or 0.0
                for g in eng.optimizer.param_groups:
                    g["lr"] = cfg.lr * budget.lr_factor(progress)
            else:
                prior_ramp = linear_rampup(progress, ramp_len)
            if cfg.label_prior > 1 and prior_ramp > 0:
                pbar = weight_given_label(pbar, labels[ui], 1 + (cfg.label_prior - 1) * prior_ramp, cfg.label_prior_gate)
            q = sharpen(pbar, cfg.temperature)
            targets = torch.cat([F.one_hot(labels[xi], c).float(), q, q])
            perm = torch.randperm(3 * b, generator=gen, device=eng.device)
            mixed_x, mixed_y = mixup(batch, targets, lams[it], perm)
            with eng.autocast():
                logits = eng.train_model(mixed_x)
            lx, lu = mixmatch_loss(logits[:b], mixed_y[:b], logits[b:], mixed_y[b:])
            w = cfg.lambda_u * linear_rampup(progress, ramp_len)
            loss = lx + w * lu
            eng.step(loss)
            sums += torch.stack([loss.detach(), lx.detach(), lu.detach()])
            bar.update(3 * b * world)
        sums = (ep.all_reduce_sum(sums) / (iters * world)).tolist()
        rec = {"loss": sums[0], "loss_x": sums[1], "loss_u": sums[2], "iterations": iters,
               "lambda_u": cfg.lambda_u * linear_rampup(epoch + 1, ramp_len), "images_per_second": bar.images_per_second}
        rec.update({f"split_{k}": v for k, v in split.quality(train.poisoned).items()})
        if prev_kept is not None:
            rec["split_changed"] = float((prev_kept != split.kept).float().mean())
        prev_kept = split.kept
        if budget is not None:
            rec["cooldown_from"] = budget.state["cool_start"]
        return rec

    history = _run_stage(eng, one_epoch, cfg, checkpoint, resume, "mixmatch",
                         **({"budget": budget} if budget is not None else {"epochs": cfg.epochs}),
                         desc="dbd mixmatch", summary=("loss", "clean_accuracy", "attack_success_rate", "split_poisoned_kept"),
                         evaluate=evaluate, on_epoch=on_epoch)
    eng.model.eval()
    final = split_by_loss(eng.model, train, cfg.epsilon, cfg.sce_alpha, cfg.sce_beta, eval_batch_size, eng.dist,
                          cfg.class_floor, cfg.balanced)
    return StageResult(eng.model, history, _seconds(history), eng.precision.name, {"split": final})


# ============================================================================ polish (not in the paper)
def polish_stage(model: nn.Module, train: ImageDataset, cfg: PolishConfig | None = None,
                 checkpoint: str | os.PathLike | None = None, resume: bool = False, *, seed: int = 0,
                 engine: EngineOptions | None = None, on_epoch: Callable[[dict], None] | None = None,
                 evaluate: Callable[[nn.Module], dict] | None = None, eval_batch_size: int = 512,
                 labelled: torch.Tensor | None = None) -> StageResult:
    """Supervised fine-tuning of the stage-3 ``model`` on the samples whose given label it
    trusts (:class:`PolishConfig`, :func:`trusted_labels` with stage 3's final split
    ``labelled``, decided once from the stage-3 model). ``extra['trust']`` summarises the choice."""
    cfg = cfg or PolishConfig()
    cfg.validate()
    trust = trusted_labels(model, train, cfg.plausible, cfg.suspect_ratio, eval_batch_size, current_context(),
                           labelled)
    kept = torch.nonzero(trust.kept).flatten()
    if len(kept) == 0:
        raise UnbackdoorError("the polish trusts none of the training labels")
    train_cfg = TrainConfig(**optim_fields(cfg) | {"batch_size": min(cfg.batch_size, len(kept))}, seed=seed,
                            engine=engine or EngineOptions())
    aug = _weak(train, True, cfg.grating, cfg.grating_p, cfg.patches)
    res = fit(model, train.subset(kept), train_cfg, checkpoint=checkpoint, resume=resume, evaluate=evaluate,
              desc="dbd polish", augment=aug, on_epoch=on_epoch,
              settings={"polish": plain(asdict(cfg)), "n_trusted": len(kept)})
    return StageResult(res.model, res.history, res.seconds, res.precision, {"trust": trust.summary(train.poisoned)})


# ============================================================================ one call
@dataclass
class DBDResult:
    model: nn.Module  # the defended classifier (eval mode)
    split: Split  # final split: ``~split.kept`` are the samples judged poisoned
    metrics: dict
    history: dict  # stage -> list of per-epoch records


def _as_data(data: Any) -> tuple[ImageDataset, ImageDataset | None, Any, dict]:
    if isinstance(data, PoisonedData):
        return data.train, data.test, data.attack, dict(data.meta)
    if isinstance(data, ImageDataset):
        return data, None, None, {}
    raise UnbackdoorError(f"DBD needs a PoisonedData or an ImageDataset, got {type(data).__name__}")


def run_dbd(
    model: nn.Module,
    data: Any,
    cfg: DBDConfig | None = None,
    out_dir: str | os.PathLike | None = None,
    resume: bool = False,
    *,
    force: bool = False,
    on_epoch: Callable[[str, dict], None] | None = None,
    provenance: dict | None = None,
    test: ImageDataset | None = None,
    attack: Any = None,
) -> DBDResult:
    """Run DBD's three stages on ``model`` (trained in place) with ``data``.

    Args:
        model: a fresh classifier (registry model or any ``nn.Module`` whose last
            ``nn.Linear`` is the classifier) taking float (N, C, H, W) in [0, 1].
        data: a :class:`~unbackdoor.attacks.poisoned_data.PoisonedData` (its test set and
            attack give BA / ASR / RA after stages 2 and 3) or a bare :class:`ImageDataset`
            (the training set: detection and the model; ``test`` / ``attack`` measure it).
        out_dir: if given, written: the model directory at ``out_dir`` itself
            (``unbackdoor.load_model(out_dir)``), ``checkpoints/{simclr,linear,mixmatch,polish}.pt``,
            ``config.yaml``, ``metrics.json``, ``detection.csv`` (per sample: index, label, final
            SCE loss, kept, poisoned), ``detection.json`` (scores vs the poison mask where known,
            incl. the loss's AUROC and the split after stage 2; ``flagged_indices``), ``history.json``.
            A non-empty folder needs ``resume`` (continue from the checkpoints) or ``force``.
        on_epoch: called as ``on_epoch(stage, record)`` after every epoch's checkpoint.
    """
    cfg = cfg or DBDConfig()
    cfg.validate()
    train, data_test, data_attack, meta = _as_data(data)
    test = test if test is not None else data_test
    attack = attack if attack is not None else data_attack
    arch = getattr(model, "arch", None)
    if arch is not None and (arch["in_channels"], arch["image_size"], arch["image_size"]) != train.shape:
        raise UnbackdoorError(f"model expects images {(arch['in_channels'], arch['image_size'], arch['image_size'])}, "
                              f"data has {train.shape}")
    if arch is not None and arch["num_classes"] != train.num_classes:
        raise UnbackdoorError(f"model has {arch['num_classes']} classes, data has {train.num_classes}")
    if len(train) == 0:
        raise EmptyDataset("DBD needs a non-empty training set, got 0 images")
    if len(train) < cfg.simclr.batch_size:
        raise UnbackdoorError(f"simclr.batch_size {cfg.simclr.batch_size} exceeds the {len(train)} training images")
    ctx = current_context()  # under torchrun every rank runs this; only rank 0 writes
    was_missing = out_dir is not None and not Path(out_dir).exists()
    out = Path(run_on_main(ctx, lambda: prepare_out_dir(out_dir, force=force, resume=resume))) if out_dir is not None else None
    with rollback_on_failure(out, was_missing, ctx.is_main and not resume):
        ck = (lambda name: out / layout.CHECKPOINTS / f"{name}.pt") if out is not None else (lambda name: None)
        # Resolve 'auto' precision once (a measured probe) and use it in every stage.
        opts = cfg.engine
        if opts.precision == "auto":
            existing = [p for p in (ck("simclr"), ck("linear"), ck("mixmatch"), ck("polish"))
                        if p is not None and resume and p.exists()]
            prec = checkpoint_precision(existing[0]) if existing else resolve_precision(
                "auto", model, train.shape, pick_device(opts.device), cfg.simclr.batch_size)
            opts = replace(opts, precision=ctx.broadcast_object(prec.name))  # ranks agree on rank 0's probe
        cfg = replace(cfg, engine=opts)
        if out is not None and ctx.is_main:
            write_yaml(out / layout.CONFIG, {"command": "dbd", "dbd": plain(asdict(cfg)), "data": meta.get("source", train.name),
                                             "model": (arch or {}).get("name", type(model).__name__),
                                             **({"provenance": provenance} if provenance else {})})
        cb = (lambda stage: (lambda rec: on_epoch(stage, rec))) if on_epoch is not None else (lambda stage: None)
        kw = {"seed": cfg.seed, "engine": opts}
        t0 = time.perf_counter()
        s1 = simclr_stage(model, train, cfg.simclr, ck("simclr"), resume, on_epoch=cb("simclr"), **kw)
        s1.extra["features"] = {"knn_agreement": knn_agreement(model, train, seed=cfg.seed)}  # observable: given labels
        if test is not None and ctx.is_main:
            s1.extra["features"]["knn_test_accuracy"] = knn_agreement(model, train, test)  # for reports only
        s2 = linear_stage(model, train, cfg.linear, ck("linear"), resume, on_epoch=cb("linear"),
                          eval_batch_size=cfg.eval_batch_size, **kw)
        metrics: dict = {"n_train": len(train), "precision": s1.precision,
                         "stage1": s1.extra["features"],
                         "stage2": {"guard": cfg.linear.guard, "guard_epoch": s2.extra["guard_epoch"],
                                    "epochs_trained": len(s2.history)}}
        if test is not None and ctx.is_main:
            metrics["after_stage2"] = evaluate(model, test, attack, cfg.eval_batch_size)
        split2 = split_by_loss(model, train, cfg.mixmatch.epsilon, cfg.mixmatch.sce_alpha, cfg.mixmatch.sce_beta,
                               cfg.eval_batch_size, ctx, cfg.mixmatch.class_floor, cfg.mixmatch.balanced)
        ev = None
        if test is not None:
            ev = lambda m: {k: v for k, v in evaluate(m, test, attack, cfg.eval_batch_size).items() if not k.startswith("n_")}  # noqa: E731
        s3 = mixmatch_stage(model, train, cfg.mixmatch, ck("mixmatch"), resume, on_epoch=cb("mixmatch"), evaluate=ev,
                            eval_batch_size=cfg.eval_batch_size, **kw)
        model = s3.model
        split: Split = s3.extra["split"]
        if test is not None and ctx.is_main:
            metrics["after_stage3"] = evaluate(model, test, attack, cfg.eval_batch_size)
        s4 = None
        if cfg.polish.epochs > 0:
            s4 = polish_stage(model, train, cfg.polish, ck("polish"), resume, on_epoch=cb("polish"), evaluate=ev,
                              eval_batch_size=cfg.eval_batch_size, labelled=split.kept, **kw)
            model = s4.model
            metrics["polish"] = s4.extra["trust"]
            if test is not None and ctx.is_main:
                metrics["after_polish"] = evaluate(model, test, attack, cfg.eval_batch_size)
        last = metrics.get("after_polish", metrics.get("after_stage3"))
        if last is not None:
            metrics.update({k: last[k] for k in ("clean_accuracy", "attack_success_rate", "robust_accuracy") if k in last})
        detection: dict = {"n_flagged": int((~split.kept).sum()), "epsilon": cfg.mixmatch.epsilon,
                           "class_balance": class_balance(train, split),
                           "class_balance_after_stage2": class_balance(train, split2)}
        if train.poisoned is not None:
            detection.update(detection_scores(~split.kept, train.poisoned))
            detection["auroc"] = loss_auroc(split.losses, train.poisoned)
            detection["after_stage2"] = {**detection_scores(~split2.kept, train.poisoned),
                                         "auroc": loss_auroc(split2.losses, train.poisoned)}
        suspects = suspicion_cut(split.losses, seed=cfg.seed)  # a short list, without knowing the poison rate
        detection["suspects"] = {"n_flagged": int(suspects.sum()), "rule": "two-component mixture on log losses"}
        if train.poisoned is not None:
            detection["suspects"].update(detection_scores(suspects, train.poisoned))
        metrics["detection"] = dict(detection)
        detection["flagged_indices"] = torch.nonzero(~split.kept).flatten().tolist()
        detection["suspect_indices"] = torch.nonzero(suspects).flatten().tolist()
        s4_seconds = s4.seconds if s4 is not None else 0.0
        metrics["seconds"] = {"simclr": round(s1.seconds, 2), "linear": round(s2.seconds, 2),
                              "mixmatch": round(s3.seconds, 2), "polish": round(s4_seconds, 2),
                              "total": round(s1.seconds + s2.seconds + s3.seconds + s4_seconds, 2),
                              "this_run": round(time.perf_counter() - t0, 2)}
        history = {"simclr": s1.history, "linear": s2.history, "mixmatch": s3.history,
                   **({"polish": s4.history} if s4 is not None else {})}
        metrics["world_size"] = ctx.world_size
        metrics = run_metrics("dbd", "DBD", last, seconds=metrics.pop("seconds"),
                              stages={k: metrics[k] for k in ("after_stage2", "after_stage3", "after_polish") if k in metrics},
                              **metrics)
        if out is not None and ctx.is_main:
            if arch is not None:
                save_model(model, out, classes=train.classes, provenance={"command": "dbd", **(provenance or {}),
                           "attack": attack.spec() if attack is not None else None})
            else:
                with atomic_path(out / "model.safetensors") as tmp:
                    save_file({k: v.detach().cpu().contiguous() for k, v in unwrap(model).state_dict().items()}, str(tmp))
            write_text(out / layout.DETECTION_CSV, detection_table(train, split, suspects))
            write_json(out / layout.DETECTION_JSON, detection)
            write_json(out / layout.HISTORY, history)
            write_json(out / layout.METRICS, metrics)
        ctx.barrier()  # the outputs exist on every rank's return
        return DBDResult(model, split, metrics, history)
