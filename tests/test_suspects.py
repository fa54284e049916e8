"""DBD's short list of suspects, cut from the final losses without the poison rate."""
from __future__ import annotations

import torch

from unbackdoor.defenses.dbd.split import suspicion_cut


def test_a_separable_minority_is_flagged_and_nothing_else():
    g = torch.Generator().manual_seed(0)
    clean = torch.exp(torch.randn(900, generator=g) * 0.5 - 4)  # low losses
    poisons = torch.exp(torch.randn(100, generator=g) * 0.3 + 1)  # high losses
    flagged = suspicion_cut(torch.cat([clean, poisons]))
    assert flagged[900:].all() and not flagged[:900].any()


def test_a_unimodal_ranking_flags_nothing():
    g = torch.Generator().manual_seed(1)
    assert not suspicion_cut(torch.exp(torch.randn(1000, generator=g))).any()
    assert not suspicion_cut(torch.ones(50)).any()
