"""BCU: Backdoor Cleansing with Unlabeled Data (Pang et al., CVPR 2023).

Two stages, each a function of its own:

1. :func:`reinitialize` - the student is a copy of the suspicious teacher in
   which each weight element of each conv / linear layer is replaced, with a
   layer-dependent probability p, by a fresh Kaiming-normal (fan_out) value.
   BatchNorm parameters and statistics are copied unchanged. p grows with
   depth because backdoors live mostly in the deep layers while the shallow
   ones carry generic features worth keeping (:func:`layer_schedule`).
2. :func:`distill` - the student learns to match the frozen teacher's
   softened outputs on *unlabeled* images: loss = KL(softmax(t/T) ||
   softmax(s/T)), batch mean, no T^2 factor, T ramped linearly 1 -> 4.
   The trigger never appears in clean unlabeled data, so the re-initialised
   weights relearn the clean function and not the backdoor.

:func:`run_bcu` chains them with before/after metrics and output files;
:func:`cleanse` is the same call from paths (what ``unbackdoor bcu`` runs).

Layer schedule (any ``nn.Module``)
----------------------------------
Conv/Linear layers are taken in registration order (= depth order for
sequentially defined models); the last Linear is the classifier.

* ``stages`` rule - the feature layers group into a stem plus four block
  stages (children of one container, each stage >= 2 layers: ResNets,
  PreAct-ResNets, torchvision ResNets): each layer gets its stage's paper
  probability (stem 0.01, stage1 0.01, stage2 0.03, stage3 0.09, stage4
  0.27, classifier 0.10). For our ``resnet18``/``preact-resnet18`` this
  reproduces the paper exactly.
* ``depth`` rule - anything else (shallow CNNs, VGG-like stacks). The paper's
  schedule is read as a *re-initialisation dose* along ResNet-18's 17-layer
  main path (stem 1 layer, four stages of 4 layers): per layer, -log(1-p).
  A network with L feature layers splits the same total dose by relative
  depth: layer i, covering depth [i/L, (i+1)/L], gets p = 1 - exp(-dose in
  that interval). A shallow net thus gets what a whole ResNet stage gets
  per layer, instead of single-layer values that leave the backdoor in place
  (docs/results_bcu.md).

``p_scale`` multiplies every rule-derived probability (clamped to 1);
``p_overrides`` (module-name glob -> p, last match wins) sets layers
explicitly and is not scaled.

Additions (not in the paper; ``grating: 0, warp: 0`` gives the reference exactly)
---------------------------------------------------------------------------------
SIG's clean-label sinusoid survived every partial re-initialisation that kept
the clean accuracy (evidence: docs/results_bcu.md, "Random gratings on the
student's input (SIG)"): the kept shallow layers still respond to stripes, and
distillation on clean images never says what to do with them. With ``grating > 0`` the *student* sees, with
probability ``grating_p``, its image plus a random sinusoidal grating (random
amplitude up to ``grating``, frequency, orientation, phase) while the target
stays the teacher's output on the clean image: the student learns that an
additive periodic pattern does not change the class. The teacher's own
(backdoored) response to stripes is never distilled.

Two more student-side additions use the same principle: ``warp > 0`` applies a
random smooth elastic warp (mean displacement up to ``warp / 2`` pixels, with
probability ``warp_p``; against warp triggers such as WaNet, whose residual ASR it
roughly halved on Fashion-MNIST) and ``patches > 0`` pastes random binary squares
(measured no gain against BadNets' patch, so off); docs/results_bcu.md, "Random
warps on the student's input (WaNet)". :func:`student_view` applies them in the
order grating, patches, warp.
"""
from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from unbackdoor.attacks.poisoned_data import load_data
from unbackdoor.core import layout
from unbackdoor.core.errors import EmptyDataset, UnbackdoorError
from unbackdoor.core.files import plain, prepare_out_dir, rollback_on_failure, write_json, write_yaml
from unbackdoor.core.layout import run_metrics
from unbackdoor.data.augment import WeakAugment, random_grating, random_patches, random_warp
from unbackdoor.data.dataset import ImageDataset
from unbackdoor.data.unlabeled import load_unlabeled
from unbackdoor.defenses.bcu.config import BCUConfig, resolve_epochs, temperature_at
from unbackdoor.defenses.bcu.schedule import LayerP, layer_schedule, schedule_mapping
from unbackdoor.metrics import der, evaluate
from unbackdoor.models.model_dir import load_model, save_model, unwrap
from unbackdoor.training.budget import PlateauBudget
from unbackdoor.training.distributed import current_context, run_on_main
from unbackdoor.training.engine import Engine, checkpoint_precision
from unbackdoor.training.loop import Epoch, run_epochs


# ============================================================================ stage 1
@torch.no_grad()
def reinitialize(model: nn.Module, schedule: Mapping[str, float] | list[LayerP], seed: int = 0,
                 linear_init: str = "kaiming_fan_out") -> nn.Module:
    """A copy of ``model`` with weights partially re-initialised.

    For each layer ``name -> p`` in ``schedule`` (module names of Conv/Linear
    layers), every weight element is independently replaced with probability
    p by a fresh Kaiming-normal (fan_out, ReLU gain) value; bias elements
    likewise by PyTorch's default bias init (uniform +-1/sqrt(fan_in)), as the
    reference code does. BatchNorm parameters and running statistics, and every
    layer not in ``schedule``, are copied unchanged. ``model`` is not modified;
    the student's parameters all require gradients (even if the teacher's were frozen).
    Deterministic for a given ``seed`` (CPU generator, any device).
    """
    probs = schedule_mapping(schedule)
    student = copy.deepcopy(unwrap(model)).requires_grad_(True)
    modules = dict(student.named_modules())
    gen = torch.Generator().manual_seed(int(seed))
    for name, p in probs.items():
        if name not in modules:
            raise UnbackdoorError(f"schedule names layer {name!r}, which the model does not have")
        if not 0.0 <= p <= 1.0:
            raise UnbackdoorError(f"re-initialisation probability of {name!r} must be in [0, 1], got {p}")
        m = modules[name]
        w = getattr(m, "weight", None)
        if not isinstance(w, torch.Tensor) or w.ndim < 2:
            raise UnbackdoorError(f"layer {name!r} ({type(m).__name__}) has no conv/linear weight to re-initialise")
        # draw on the CPU with our generator whatever the device: same student everywhere
        fresh = torch.empty(w.shape, dtype=torch.float32)
        if isinstance(m, nn.Linear) and linear_init == "default":
            bound_w = 1.0 / math.sqrt(w.shape[1]) if w.shape[1] else 0.0
            fresh.uniform_(-bound_w, bound_w, generator=gen)
        else:
            nn.init.kaiming_normal_(fresh, mode="fan_out", nonlinearity="relu", generator=gen)
        mask = torch.rand(w.shape, generator=gen) < p
        w.copy_(torch.where(mask, fresh, w.detach().float().cpu()).to(w))
        b = getattr(m, "bias", None)
        if isinstance(b, torch.Tensor):
            fan_in = w[0].numel()
            bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
            fresh_b = torch.empty(b.shape).uniform_(-bound, bound, generator=gen)
            mask_b = torch.rand(b.shape, generator=gen) < p
            b.copy_(torch.where(mask_b, fresh_b, b.detach().float().cpu()).to(b))
    return student


# ============================================================================ stage 2
def student_view(x: torch.Tensor, cfg: BCUConfig, gen: torch.Generator | None = None) -> torch.Tensor:
    """The student's copy of a batch: ``x`` plus the additions that are on (random
    grating, random patches, random elastic warp, in that order); ``x`` itself when none is."""
    xs = x
    if cfg.grating > 0:
        xs = random_grating(xs, cfg.grating, cfg.grating_p, gen)
    if cfg.patches > 0:
        xs = random_patches(xs, cfg.patches, gen=gen)
    if cfg.warp > 0:
        xs = random_warp(xs, cfg.warp, cfg.warp_p, gen=gen)
    return xs


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(teacher/T) || softmax(student/T)), summed over classes, mean over the batch.

    Both inputs: float logits (N, C). No T^2 factor (as the reference code)."""
    s = F.log_softmax(student_logits.float() / temperature, dim=1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    return F.kl_div(s, t, reduction="batchmean", log_target=True)


@dataclass
class DistillResult:
    model: nn.Module  # the student, eval mode, on the engine's device
    history: list[dict]
    seconds: float
    precision: str


def distill(teacher: nn.Module, student: nn.Module, unlabeled: ImageDataset, cfg: BCUConfig | None = None,
            checkpoint: str | os.PathLike | None = None, resume: bool = False,
            evaluate: Callable[[nn.Module], dict] | None = None, desc: str = "bcu") -> DistillResult:
    """Train ``student`` to match the frozen ``teacher`` on ``unlabeled`` images (labels unused).

    Args:
        teacher: the suspicious model (not modified: a frozen eval-mode copy is used).
        student: e.g. :func:`reinitialize` (teacher); trained in place.
        unlabeled: uint8 images (N, C, H, W); ``meta['flip']`` allows horizontal flips.
        cfg: ``cfg.ablation == 'pseudo-label'`` swaps the KL loss for cross-entropy on the
            teacher's argmax labels (the ablation); otherwise KL distillation.
        checkpoint: written atomically after every epoch; ``resume`` continues after it.
        evaluate: called on the student every ``cfg.eval_every`` epochs and at the end;
            its dict joins that epoch's history record.
    """
    cfg = cfg or BCUConfig()
    cfg.validate()
    if len(unlabeled) == 0:
        raise EmptyDataset("the unlabeled set is empty: BCU needs at least one image")
    cfg = resolve_epochs(cfg, len(unlabeled))
    prec = checkpoint_precision(checkpoint) if (resume and checkpoint) else None
    eng = Engine(student, unlabeled.shape, cfg.engine, seed=cfg.seed, batch_size=cfg.batch_size, precision=prec)
    teacher = copy.deepcopy(teacher).to(eng.device).eval().requires_grad_(False)
    if eng.precision.channels_last:
        teacher = teacher.to(memory_format=torch.channels_last)
    n = len(unlabeled)
    steps_per_epoch = max(1, math.ceil(n / cfg.batch_size))
    plateau = cfg.budget == "plateau"
    eng.set_optimizer(eng.model.parameters(), cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay,
                      "constant" if plateau else cfg.schedule, cfg.epochs * steps_per_epoch)
    # the budget's state comes from the checkpoint on resume (run_epochs)
    budget = PlateauBudget(cfg.epochs, cfg.max_epochs, cfg.plateau_patience, cfg.plateau_delta, cfg.cooldown) \
        if plateau else None
    images = unlabeled.images.to(eng.device)
    side = unlabeled.shape[1]
    aug = WeakAugment(padding=max(1, side // 8), flip=bool(unlabeled.meta.get("flip", False))) if cfg.augment else None
    pseudo = cfg.ablation == "pseudo-label"

    def one_epoch(ep: Epoch) -> dict:
        epoch, gen = ep.index, ep.gen
        T = temperature_at(epoch, cfg)
        bar = ep.progress(steps_per_epoch)
        tot = torch.zeros((), device=eng.device)
        agree = torch.zeros((), device=eng.device)
        seen = 0
        # drop_last=False: with a few hundred unlabeled images every one counts (reference DataLoader)
        for idx in eng.batches(n, cfg.batch_size, gen, drop_last=False):
            x = images[idx].float().div_(255)
            if aug is not None:
                x = aug(x, gen)
            x = eng.input(x)
            # Gratings go on the student's copy only: it learns the teacher's answer for the
            # clean image, i.e. that an additive periodic pattern does not change the class.
            xs = student_view(x, cfg, gen)
            if xs is not x:
                xs = eng.input(xs)
            with eng.autocast():
                with torch.no_grad():
                    t_logits = teacher(x)
                s_logits = eng.train_model(xs)
            loss = F.cross_entropy(s_logits.float(), t_logits.argmax(1)) if pseudo else kd_loss(s_logits, t_logits, T)
            if budget is not None:
                for g in eng.optimizer.param_groups:
                    g["lr"] = cfg.lr * budget.lr_factor(epoch + seen / n)
            eng.step(loss)
            tot += loss.detach() * len(idx)
            agree += (s_logits.detach().argmax(1) == t_logits.argmax(1)).sum()
            seen += len(idx)
            bar.update(len(idx) * eng.dist.world_size)
        stats = ep.all_reduce_sum(tot, agree.float(), float(seen))
        rec = {"loss": float(stats[0] / stats[2]), "agreement": float(stats[1] / stats[2]),
               "temperature": T, "lr": eng.optimizer.param_groups[0]["lr"], "images_per_second": bar.images_per_second}
        if budget is not None:
            budget.observe(epoch + 1, rec["agreement"])
            rec["cooldown_from"] = budget.state["cool_start"]
        return rec

    t0 = time.perf_counter()
    # Resume settings: the whole config except how it runs (engine) and the evaluation cadence.
    history = run_epochs(eng, one_epoch, **({"budget": budget} if budget is not None else {"epochs": cfg.epochs}),
                         checkpoint=checkpoint, resume=resume, settings=plain(asdict(cfg)), may_change=("eval_every",),
                         desc=desc, summary=("loss", "temperature", "clean_accuracy", "attack_success_rate"),
                         evaluate=evaluate, eval_every=cfg.eval_every)
    eng.model.eval()
    return DistillResult(eng.model, history, time.perf_counter() - t0, eng.precision.name)




# ============================================================================ one call
@dataclass
class BCUResult:
    model: nn.Module  # the cleansed student (eval mode)
    metrics: dict  # before / after / der (when test data was given), timing
    history: list[dict]
    schedule: list[LayerP]


def _eval(model: nn.Module, test: ImageDataset | None, attack) -> dict:
    if test is None:
        return {}
    return evaluate(model, test, attack)


def run_bcu(teacher: nn.Module, unlabeled: ImageDataset, cfg: BCUConfig | None = None,
            out_dir: str | os.PathLike | None = None, resume: bool = False, test: ImageDataset | None = None,
            attack=None, force: bool = False, provenance: dict | None = None) -> BCUResult:
    """Cleanse ``teacher`` with BCU on ``unlabeled`` images.

    Args:
        teacher: the suspicious classifier taking float (N, C, H, W) in [0, 1]; not modified.
        unlabeled: images of the teacher's input shape (see :func:`load_unlabeled`); labels unused.
        cfg: :class:`BCUConfig` (default: the paper's); ``cfg.ablation`` selects an ablation.
        out_dir: if given, writes the cleansed model directory (``save_model`` at ``out_dir``),
            ``config.yaml``, ``schedule.json``, ``history.json``, ``metrics.json`` and
            ``checkpoint.pt`` (per epoch; ``resume`` continues a killed run).
        test, attack: clean test set and the attack, for BA / ASR / RA before and after and DER.
    Returns a :class:`BCUResult`.
    """
    cfg = cfg or BCUConfig()
    cfg.validate()
    if len(unlabeled) == 0:
        raise EmptyDataset("the unlabeled set is empty: BCU needs at least one image")
    cfg = resolve_epochs(cfg, len(unlabeled))
    arch = getattr(teacher, "arch", None)
    if arch is not None:
        want = (arch["in_channels"], arch["image_size"], arch["image_size"])
        if unlabeled.shape != want:
            raise UnbackdoorError(f"unlabeled images are {unlabeled.shape} but the model expects {want}; "
                                  "convert them with load_unlabeled / match_input")
        if test is not None and test.shape != want:
            raise UnbackdoorError(f"test images are {test.shape} but the model expects {want}")
    # Under torchrun every rank runs this (distill shards the batches); only rank 0
    # prepares OUT, evaluates and writes, the others wait at the barriers.
    ctx = current_context()
    was_missing = out_dir is not None and not Path(out_dir).exists()
    out = Path(run_on_main(ctx, lambda: prepare_out_dir(out_dir, force=force, resume=resume))) if out_dir is not None else None
    with rollback_on_failure(out, was_missing, ctx.is_main and not resume):
        schedule = layer_schedule(teacher, cfg)
        if cfg.ablation != "none":  # both ablations start from the teacher itself
            schedule = [LayerP(lp.name, lp.kind, lp.group, 0.0, "ablation") for lp in schedule]
        student = reinitialize(teacher, schedule, seed=cfg.seed, linear_init=cfg.linear_init)
        if out is not None and ctx.is_main:
            write_yaml(out / layout.CONFIG, {"command": "bcu", "bcu": plain(asdict(cfg)), "n_unlabeled": len(unlabeled),
                                             "unlabeled": unlabeled.meta.get("source", unlabeled.name),
                                             **({"provenance": provenance} if provenance else {})})
            write_json(out / layout.SCHEDULE, [asdict(lp) for lp in schedule])
        before = _eval(teacher, test, attack) if ctx.is_main else {}
        evaluate = None
        if test is not None:
            evaluate = lambda m: {k: v for k, v in _eval(m, test, attack).items() if not k.startswith("n_")}  # noqa: E731
        res = distill(teacher, student, unlabeled, cfg, checkpoint=out / layout.CHECKPOINT if out else None,
                      resume=resume, evaluate=evaluate)
        metrics: dict = {"ablation": cfg.ablation, "n_unlabeled": len(unlabeled), "epochs": cfg.epochs,
                         "distill_seconds": round(res.seconds, 2), "precision": res.precision,
                         "images_per_second": round(sum(h["images_per_second"] for h in res.history) / len(res.history), 1)
                         if res.history else None, "world_size": ctx.world_size}
        if test is not None and ctx.is_main:
            after = _eval(res.model, test, attack)
            metrics.update({"before": before, "after": after})
            if attack is not None:
                metrics["der"] = der(before["clean_accuracy"], before["attack_success_rate"],
                                     after["clean_accuracy"], after["attack_success_rate"])
        label = "BCU" if cfg.ablation == "none" else f"BCU ({cfg.ablation})"
        metrics = run_metrics("bcu", label, metrics.pop("after", None), before=metrics.pop("before", None),
                              der=metrics.pop("der", None), seconds={"total": metrics["distill_seconds"]}, **metrics)
        metrics["after"] = metrics["final"]  # the name this file used before the schema
        if out is not None and ctx.is_main:
            if getattr(res.model, "arch", None) is not None:
                save_model(res.model, out, classes=getattr(teacher, "classes", None),
                           provenance={"command": "bcu", "ablation": cfg.ablation, **(provenance or {})})
            write_json(out / layout.HISTORY, res.history)
            write_json(out / layout.METRICS, metrics)
        ctx.barrier()
        return BCUResult(res.model, metrics, res.history, schedule)


def cleanse(
    model: str | os.PathLike,
    unlabeled: str | os.PathLike,
    out: str | os.PathLike,
    cfg: BCUConfig | None = None,
    data: str | os.PathLike | None = None,
    resume: bool = False,
    force: bool = False,
    fit: str = "resize",
    flip: bool | None = None,
) -> BCUResult:
    """:func:`run_bcu` from paths (what ``unbackdoor bcu`` runs).

    ``model``: a model directory or BackdoorBench ``attack_result.pt`` (loaded without
    executing code); ``unlabeled``: see :func:`load_unlabeled`; ``data``: a poisoned-data
    directory whose clean test set and attack give before/after metrics.
    """
    cfg = cfg or BCUConfig()
    teacher = load_model(model)
    arch = getattr(teacher, "arch", None)
    if arch is None:  # pragma: no cover - load_model always returns registry models
        raise UnbackdoorError(f"{model}: cannot tell the model's input shape")
    shape = (arch["in_channels"], arch["image_size"], arch["image_size"])
    pd = load_data(data) if data is not None else None
    if pd is not None and pd.test.num_classes != arch["num_classes"]:
        raise UnbackdoorError(f"model has {arch['num_classes']} classes, {data} has {pd.test.num_classes}")
    ul = load_unlabeled(unlabeled, shape, fit=fit, seed=cfg.seed, flip=flip)
    prov = {"teacher": str(model), "unlabeled": str(unlabeled)}
    if getattr(teacher, "import_report", None):
        prov["teacher_import"] = teacher.import_report
    return run_bcu(teacher, ul, cfg, out_dir=out, resume=resume, test=pd.test if pd else None,
                   attack=pd.attack if pd else None, force=force, provenance=prov)
