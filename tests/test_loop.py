"""The shared epoch loop (training/loop.py): its one resume rule, and a run stopped after
epoch k and resumed that ends exactly like an uninterrupted one."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from unbackdoor.core.errors import UnbackdoorError
from unbackdoor.data import load_splits
from unbackdoor.training.budget import PlateauBudget
from unbackdoor.training.checkpoint import load_checkpoint
from unbackdoor.training.engine import Engine, EngineOptions
from unbackdoor.training.loop import Epoch, run_epochs

FP32 = EngineOptions(device="cpu", precision="fp32", progress=False)
SETTINGS = {"lr": 0.1, "batch_size": 64, "engine": {"device": "cpu", "progress": False}, "eval_every": 1}


@pytest.fixture(scope="module")
def digits():
    return load_splits("digits").train  # 1259 real 8x8 digits


class _Stop(Exception):
    pass


def _train(digits, checkpoint=None, resume=False, settings=SETTINGS, kill_after=None, plateau=False, **kw):
    """A tiny linear classifier, SGD with a cosine schedule, a noise augmentation drawn from the
    epoch's stream; ``plateau``: a PlateauBudget sets the length and the lr (its state is resumed)."""
    torch.manual_seed(0)
    eng = Engine(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), digits.shape, FP32, seed=3, batch_size=64)
    steps = len(digits) // 64
    eng.set_optimizer(eng.model.parameters(), "sgd", 0.1, schedule="constant" if plateau else "cosine",
                      total_steps=4 * steps)
    budget = PlateauBudget(2, 3, 1, 0.5, 0.5) if plateau else None
    seen = {"epochs": 0}

    def one_epoch(ep: Epoch) -> dict:
        bar = ep.progress(steps)
        tot = torch.zeros(())
        for i, idx in enumerate(eng.batches(len(digits), 64, ep.gen)):
            x = digits.images[idx].float() / 255
            x = x + 0.05 * torch.randn(x.shape, generator=ep.gen)
            if budget is not None:
                for g in eng.optimizer.param_groups:
                    g["lr"] = 0.1 * budget.lr_factor(ep.index + i / steps)
            loss = F.cross_entropy(eng.train_model(x), digits.labels[idx])
            eng.step(loss)
            tot += loss.detach()
            bar.update(len(idx))
        seen["epochs"] += 1
        rec = {"loss": float(ep.all_reduce_sum(tot)[0]) / steps}
        if budget is not None:
            budget.observe(ep.index + 1, -rec["loss"])
        return rec

    def on_epoch(rec):
        if rec["epoch"] == kill_after:
            raise _Stop

    length = {"budget": budget} if plateau else {"epochs": 4}
    history = run_epochs(eng, one_epoch, checkpoint=checkpoint, resume=resume, settings=settings,
                         may_change=("eval_every",), state=lambda: {"seen": dict(seen)},
                         restore=lambda st: seen.update(st["seen"]), on_epoch=on_epoch, **length, **kw)
    return eng.model, history, seen, budget


def test_one_resume_rule_refuses_other_settings_and_names_them(digits, tmp_path):
    ck = tmp_path / "ck.pt"
    with pytest.raises(_Stop):
        _train(digits, ck, kill_after=1)
    assert load_checkpoint(ck)["settings"] == {"lr": 0.1, "batch_size": 64, "seed": 3}  # engine / eval_every left out
    with pytest.raises(UnbackdoorError, match=r"different settings \(lr: 0\.1 -> 0\.2\)"):
        _train(digits, ck, resume=True, settings={**SETTINGS, "lr": 0.2})
    with pytest.raises(UnbackdoorError, match=r"batch_size: 64 -> <missing>; momentum: <missing> -> 0\.9"):
        _train(digits, ck, resume=True, settings={"lr": 0.1, "momentum": 0.9})
    # what may change (the engine, the keys named in may_change) does not block a resume
    _, history, seen, _ = _train(digits, ck, resume=True,
                                 settings={**SETTINGS, "engine": {"device": "cuda"}, "eval_every": 5})
    assert [h["epoch"] for h in history] == [1, 2, 3, 4] and seen["epochs"] == 4  # continued after epoch 1


@pytest.mark.parametrize("plateau", [False, True], ids=["epochs", "plateau-budget"])
def test_run_stopped_after_epoch_k_and_resumed_equals_an_uninterrupted_one(digits, tmp_path, plateau):
    ref, ref_hist, _, ref_budget = _train(digits, plateau=plateau)
    ck = tmp_path / "ck.pt"
    with pytest.raises(_Stop):
        _train(digits, ck, kill_after=2, plateau=plateau)
    assert load_checkpoint(ck)["epoch"] == 1  # the checkpoint of epoch 2 (0-based 1) is on disk
    model, hist, seen, budget = _train(digits, ck, resume=True, plateau=plateau)
    a, b = ref.state_dict(), model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [h["loss"] for h in hist] == [h["loss"] for h in ref_hist]
    assert seen["epochs"] == len(ref_hist)  # the stage's own state() came back through restore()
    if plateau:
        assert budget.state == ref_budget.state and len(hist) == ref_budget.end  # the budget's decisions too


def test_evaluation_cadence_and_early_stop(digits):
    calls = []
    _, history, _, _ = _train(digits, evaluate=lambda m: calls.append(1) or {"clean_accuracy": 0.5}, eval_every=3)
    assert [("clean_accuracy" in h) for h in history] == [False, False, True, True]  # every 3rd epoch and the last
    _, history, _, _ = _train(digits, evaluate=lambda m: calls.append(1) or {}, stop=lambda: len(calls) >= 4)
    assert [h["epoch"] for h in history] == [1, 2]  # asked before every epoch
