"""Defenses, one module (or small package) each, on one interface (:mod:`.base`).

Built in: :mod:`.dbd` (trains from a poisoned training set), :mod:`.bcu`
(cleanses a trained model with unlabeled images) and the baseline :mod:`.ft`
(fine-tunes it on labelled clean images). Importing this package
registers them; :func:`defenses` lists everything registered.
"""
# isort: off
from unbackdoor.defenses import dbd  # noqa: F401 - registers itself (first: the listing order)
from unbackdoor.defenses import bcu  # noqa: F401 - registers itself
from unbackdoor.defenses import ft  # noqa: F401 - registers itself (a label-based baseline)
# isort: on
from unbackdoor.defenses.base import (
    INPUTS,
    Defense,
    DefenseInputs,
    DefenseResult,
    defense_names,
    defenses,
    get_defense,
    register_defense,
    unregister_defense,
)

__all__ = ["INPUTS", "Defense", "DefenseInputs", "DefenseResult", "defense_names", "defenses", "get_defense",
           "register_defense", "unregister_defense"]
