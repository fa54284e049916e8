"""BCU (defenses/bcu.py); the BackdoorBench import is in test_backdoorbench.py.

Real components on small real data: the layer schedule on our ResNets, the
re-initialisation statistics, the distillation loss against hand-computed
values, a real BadNets-attacked cnn-small whose ASR BCU must lower, resume
equality, and pickles that try to run code.
"""
from __future__ import annotations

import math
import os
import pickle
import types
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from unbackdoor.core.errors import UnbackdoorError
from unbackdoor.data.unlabeled import load_unlabeled, match_input
from unbackdoor.defenses.bcu.config import bcu_preset
from unbackdoor.defenses.bcu.distill import (
    BCUConfig,
    distill,
    kd_loss,
    reinitialize,
    resolve_epochs,
    run_bcu,
    student_view,
    temperature_at,
)
from unbackdoor.defenses.bcu.schedule import PAPER_STAGE_P, depth_probabilities, layer_schedule
from unbackdoor.models.model_dir import load_model, save_model
from unbackdoor.models.registry import create
from unbackdoor.training.engine import EngineOptions

FP32 = EngineOptions(device="cpu", precision="fp32", progress=False)


def quiet(cfg: BCUConfig, **kw) -> BCUConfig:
    return replace(cfg, engine=FP32, **kw)


# ---------------------------------------------------------------------------- schedule
@pytest.mark.parametrize("name,kw", [("resnet18", {}), ("preact-resnet18", {}), ("resnet18", {"stem": "imagenet"}),
                                     ("preact-resnet18", {"final_bn": False})])
def test_resnet_schedule_is_the_papers(name, kw):
    model = create(name, num_classes=10, **kw)
    sched = layer_schedule(model)
    expected = dict(zip(("conv1", "layer1", "layer2", "layer3", "layer4"), PAPER_STAGE_P))
    convs = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert [lp.name for lp in sched] == convs  # every layer, in depth order
    for lp in sched:
        if lp.name == "fc":
            assert (lp.group, lp.p) == ("classifier", 0.10)
        else:
            part = lp.name.split(".")[1]  # backbone.<conv1|layerN>...
            assert lp.p == expected[part], lp
            assert lp.source == "stages"
    # shortcut convs belong to their stage
    assert {lp.p for lp in sched if "shortcut" in lp.name} == {0.03, 0.09, 0.27}


def test_depth_rule_for_shallow_nets_and_overrides():
    model = create("cnn-small", num_classes=10, in_channels=1, image_size=28)
    sched = layer_schedule(model)
    assert [lp.name for lp in sched] == ["backbone.0", "backbone.4", "backbone.8", "fc"]
    ps = [lp.p for lp in sched]
    assert ps[0] < ps[1] < ps[2] and ps[3] == 0.10
    # same total dose as ResNet-18's 17-layer path: prod(1-p) matches
    ref = (1 - 0.01) ** 5 * (1 - 0.03) ** 4 * (1 - 0.09) ** 4 * (1 - 0.27) ** 4
    assert math.prod(1 - p for p in ps[:3]) == pytest.approx(ref, rel=1e-9)
    assert depth_probabilities(17)[-1] == pytest.approx(0.27) and depth_probabilities(17)[0] == pytest.approx(0.01)
    # global multiplier, then explicit globs (last match wins, not scaled)
    cfg = BCUConfig(p_scale=2.0, p_overrides={"backbone.*": 0.5, "backbone.8": 0.9})
    s2 = {lp.name: lp.p for lp in layer_schedule(model, cfg)}
    assert s2 == {"backbone.0": 0.5, "backbone.4": 0.5, "backbone.8": 0.9, "fc": pytest.approx(0.2)}
    with pytest.raises(UnbackdoorError, match="matches no"):
        layer_schedule(model, BCUConfig(p_overrides={"backbone.99": 0.3}))
    with pytest.raises(UnbackdoorError, match="stages"):
        layer_schedule(model, BCUConfig(rule="stages"))


# ---------------------------------------------------------------------------- the student's view
def test_random_warp_moves_pixels_by_at_most_its_strength():
    from unbackdoor.data.augment import random_warp

    w = 28
    ramp = torch.linspace(0, 1, w).view(1, 1, 1, w).expand(64, 1, w, w).contiguous()  # value = column / 27
    out = random_warp(ramp, strength=2.0, p=1.0, gen=torch.Generator().manual_seed(0))
    # on a horizontal ramp the change of value is the horizontal displacement (in pixels / 27)
    dx = ((out - ramp) * (w - 1)).abs()[..., 2:-2].flatten(1).mean(1)  # away from the clamped borders
    assert float(dx.max()) <= 1.25  # mean displacement up to strength / 2 = 1 pixel
    assert 0.2 < float(dx.mean()) < 0.8  # uniform in [0, strength / 2]: neither off nor pinned at the top
    half = random_warp(ramp, strength=2.0, p=0.5, gen=torch.Generator().manual_seed(0))
    assert 10 < int(((half - ramp).abs().flatten(1).amax(1) > 1e-5).sum()) < 54  # p = 0.5: some images
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(random_warp(x, strength=0.0, p=1.0), x, atol=1e-5)  # strength 0: identity


def test_student_view_applies_only_the_additions_that_are_on():
    x = torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    off = BCUConfig(grating=0.0, patches=0.0, warp=0.0)
    assert student_view(x, off, torch.Generator().manual_seed(1)) is x  # nothing to copy
    for kw in ({"grating": 0.5, "grating_p": 1.0}, {"patches": 1.0}, {"warp": 1.0, "warp_p": 1.0}):
        cfg = replace(off, **kw)
        v = student_view(x, cfg, torch.Generator().manual_seed(1))
        assert v.shape == x.shape and not torch.equal(v, x)
        assert torch.equal(v, student_view(x, cfg, torch.Generator().manual_seed(1)))  # seeded
    with pytest.raises(UnbackdoorError, match="bcu.warp"):
        BCUConfig(warp=5.0).validate()
    with pytest.raises(UnbackdoorError, match="bcu.warp_p"):
        BCUConfig(warp=1.0, warp_p=1.5).validate()
    with pytest.raises(UnbackdoorError, match="bcu.patches"):
        BCUConfig(patches=-0.1).validate()


# ---------------------------------------------------------------------------- re-initialisation
def test_reinitialize_fraction_batchnorm_and_determinism():
    torch.manual_seed(0)
    teacher = create("resnet18", num_classes=10, width=16)
    with torch.no_grad():  # BN statistics that differ from their defaults, to see them copied
        for m in teacher.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    sched = {"backbone.layer4.0.conv2": 0.3, "backbone.layer3.1.conv1": 0.05, "fc": 0.5}
    student = reinitialize(teacher, sched, seed=1)
    t_state, s_state = teacher.state_dict(), student.state_dict()
    for k, v in before.items():  # teacher untouched
        assert torch.equal(t_state[k], v)
    for name, p in sched.items():
        w_t, w_s = t_state[f"{name}.weight"], s_state[f"{name}.weight"]
        frac = (w_t != w_s).float().mean().item()
        n = w_t.numel()
        assert abs(frac - p) < 4 * math.sqrt(p * (1 - p) / n) + 1e-3, (name, frac, p, n)
    big = s_state["backbone.layer4.0.conv2.weight"][t_state["backbone.layer4.0.conv2.weight"] != s_state["backbone.layer4.0.conv2.weight"]]
    fan_out = 128 * 3 * 3
    assert big.std().item() == pytest.approx(math.sqrt(2 / fan_out), rel=0.05)  # Kaiming normal, fan_out
    changed = {f"{n}.weight" for n in sched} | {"fc.bias"}
    for k in t_state:
        if k not in changed:  # BN params + stats and all other layers copied unchanged
            assert torch.equal(t_state[k], s_state[k]), k
    again = reinitialize(teacher, sched, seed=1)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in s_state.items())
    other = reinitialize(teacher, sched, seed=2)
    assert not torch.equal(other.state_dict()["fc.weight"], s_state["fc.weight"])


# ---------------------------------------------------------------------------- distillation loss
def test_kd_loss_matches_hand_computation():
    s = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 0.0]])
    t = torch.tensor([[3.0, 2.0, 1.0], [0.0, 0.0, 2.0]])
    T = 2.0

    def softmax(v):
        e = [math.exp(x / T) for x in v]
        return [x / sum(e) for x in e]

    want = 0.0
    for sv, tv in zip(s.tolist(), t.tolist()):
        p, q = softmax(tv), softmax(sv)
        want += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    want /= 2  # batch mean, no T^2 factor
    assert kd_loss(s, t, T).item() == pytest.approx(want, rel=1e-6)
    assert kd_loss(t, t, T).item() == pytest.approx(0.0, abs=1e-7)
    cfg = BCUConfig(epochs=100)
    assert temperature_at(0, cfg) == pytest.approx(1.03) and temperature_at(99, cfg) == pytest.approx(4.0)


# ---------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def badnets_model(mnist_splits):
    """cnn-small trained 5 epochs (fp32) on mnist5k's training split, 10% BadNets-poisoned (target 0);
    with the clean test set, the attack and the 500 clean held-out images."""
    from unbackdoor.attacks.base import make_attack
    from unbackdoor.training import fit
    from unbackdoor.training.engine import set_seed
    from unbackdoor.training.fit import TrainConfig

    atk = make_attack("badnets", mnist_splits.train.shape, 10, target=0, seed=0)
    ptrain, _ = atk.poison(mnist_splits.train, 0.1, seed=0)
    ptrain.meta.update(mnist_splits.train.meta)
    set_seed(0)
    model = create("cnn-small", num_classes=10, in_channels=1, image_size=28)
    res = fit(model, ptrain, TrainConfig(epochs=5, engine=FP32))
    for p in res.model.parameters():
        p.requires_grad_(False)
    return res.model.eval(), types.SimpleNamespace(test=mnist_splits.test, heldout=mnist_splits.heldout, attack=atk)


def test_bcu_lowers_asr_on_an_attacked_model(badnets_model, tmp_path):
    teacher, pd = badnets_model
    cfg = quiet(bcu_preset("quick"), epochs=15, steps=None, eval_every=5)  # ASR settles in ~5-10 epochs
    res = run_bcu(teacher, pd.heldout, cfg, out_dir=tmp_path / "bcu", test=pd.test, attack=pd.attack)
    before, after = res.metrics["before"], res.metrics["after"]
    assert before["attack_success_rate"] > 0.8, before  # the attack worked
    assert after["attack_success_rate"] < 0.2, after
    assert after["clean_accuracy"] > before["clean_accuracy"] - 0.1
    assert 0.5 < res.metrics["der"] <= 1.0
    # the output folder is a model directory plus the run's records
    out = tmp_path / "bcu"
    for f in ("model.safetensors", "model.json", "config.yaml", "schedule.json", "history.json", "metrics.json", "checkpoint.pt"):
        assert (out / f).is_file(), f
    reloaded = load_model(out)
    x = pd.test.images[:64].float() / 255
    assert torch.allclose(reloaded(x), res.model.cpu()(x), atol=1e-5)
    assert [h["epoch"] for h in res.history if "attack_success_rate" in h] == [5, 10, 15]


def test_quick_preset_budgets_steps_whatever_the_pool_size():
    q = bcu_preset("quick")
    assert (q.steps, q.batch_size) == (4800, 32)
    assert resolve_epochs(q, 500).epochs == 300  # 16 steps an epoch
    assert resolve_epochs(q, 5000).epochs == 31  # 157 steps an epoch
    assert resolve_epochs(bcu_preset("paper"), 500).epochs == 100  # no step budget: epochs as given
    with pytest.raises(UnbackdoorError, match="steps"):
        replace(q, steps=0).validate()


def test_resume_ends_where_an_uninterrupted_run_ends(badnets_model, tmp_path):
    teacher, pd = badnets_model
    ul = pd.heldout.subset(torch.arange(96))
    cfg = quiet(BCUConfig(epochs=4, batch_size=32))
    student0 = reinitialize(teacher, layer_schedule(teacher, cfg), seed=0)
    full = distill(teacher, reinitialize(teacher, layer_schedule(teacher, cfg), seed=0), ul, cfg).model

    class Stop(Exception):
        pass

    def stop_after_two(m):
        raise Stop

    ck = tmp_path / "ck.pt"
    with pytest.raises(Stop):  # killed during epoch 2's evaluation: the checkpoint holds epoch 1
        distill(teacher, student0, ul, replace(cfg, eval_every=2), checkpoint=ck, evaluate=stop_after_two)
    fresh = reinitialize(teacher, layer_schedule(teacher, cfg), seed=0)
    resumed = distill(teacher, fresh, ul, cfg, checkpoint=ck, resume=True)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3, 4]
    for (k, a), b in zip(full.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k
    with pytest.raises(UnbackdoorError, match="other settings"):  # never mix two runs' settings
        distill(teacher, fresh, ul, replace(cfg, lr=0.5), checkpoint=ck, resume=True)


def test_unlabeled_sources_are_converted(small_poisoned_dir):
    ul = load_unlabeled(small_poisoned_dir, (1, 28, 28))
    assert ul.shape == (1, 28, 28) and len(ul) == 200 and ul.meta["flip"] is False
    digits = load_unlabeled("digits", (3, 32, 32))
    assert digits.shape == (3, 32, 32) and digits.images.dtype == torch.uint8 and len(digits) > 1000
    padded = match_input(load_unlabeled("digits", (1, 8, 8)), (1, 28, 28), fit="pad")
    assert padded.images[:, :, :4].max() == 0 and padded.images[:, :, 4:24].max() > 0  # 20 px digit, 4 px frame
    with pytest.raises(UnbackdoorError, match="not found"):
        load_unlabeled("/no/such/place", (1, 28, 28))


def test_cli_bcu_and_ablation(badnets_model, small_poisoned_dir, tmp_path, cli):
    teacher, _ = badnets_model
    mdir = tmp_path / "teacher"
    save_model(teacher, mdir)
    out = tmp_path / "cleansed"
    r = cli("bcu", "--model", mdir, "--unlabeled", small_poisoned_dir, "--data", small_poisoned_dir, "--out", out,
            "--preset", "quick", "--epochs", "2", "--ablation", "no-reinit", "--precision", "fp32", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "attack_success_rate" in r.stdout and "DER" in r.stdout
    import json

    m = json.loads((out / "metrics.json").read_text())
    assert m["ablation"] == "no-reinit" and set(m) >= {"before", "after", "der"}
    assert all(lp["p"] == 0.0 for lp in json.loads((out / "schedule.json").read_text()))
    assert load_model(out)(torch.zeros(1, 1, 28, 28)).shape == (1, 10)
    r = cli("bcu", "--model", mdir, "--unlabeled", small_poisoned_dir, "--out", out, "--no-progress")
    assert r.returncode == 2 and "not empty" in r.stderr and "Traceback" not in r.stderr


# ---------------------------------------------------------------------------- untrusted files
class _Evil:
    """Unpickling this runs ``touch <path>`` (if a loader ever executes it)."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_code_running_pickles_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Evil(marker))
    # 1. a pickle where model.safetensors should be (model.json is genuine)
    mdir = tmp_path / "model"
    save_model(create("cnn-small", num_classes=10, in_channels=1, image_size=28), mdir)
    (mdir / "model.safetensors").write_bytes(payload)
    with pytest.raises(UnbackdoorError, match="corrupted"):
        load_model(mdir)
    # ... or a torch zip archive in its place
    torch.save({"x": _Evil(marker)}, mdir / "model.safetensors")
    with pytest.raises(UnbackdoorError):
        load_model(mdir)
    # 2. a .pt (torch zip) with the payload next to real weights, and a raw pickle named .pt
    sd = create("preact-resnet18", num_classes=10, width=8).state_dict()
    torch.save({"model_name": "preactresnet18", "num_classes": 10, "model": sd, "bd_train": _Evil(marker)},
               tmp_path / "attack_result.pt")
    with pytest.raises(UnbackdoorError, match="refusing.*system"):
        load_model(tmp_path / "attack_result.pt")
    (tmp_path / "raw.pt").write_bytes(payload)
    with pytest.raises(UnbackdoorError):
        load_model(tmp_path / "raw.pt")
    assert not marker.exists()
