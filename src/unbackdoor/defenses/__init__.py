"""Defenses, one module (or small package) each, on one interface (:mod:`.base`).

Built in: :mod:`.dbd` (trains from a poisoned training set), :mod:`.bcu`
(cleanses a trained model with unlabeled images) and the baseline :mod:`.ft`
(fine-tunes it on labelled clean images); the data-side detectors :mod:`.spectral`
and :mod:`.activation_clustering` flag training samples with the suspicious model's
features and retrain on the rest (:mod:`.filtering`). Importing this package
registers them; :func:`defenses` lists everything registered.
"""
# isort: off
from unbackdoor.defenses import dbd  # noqa: F401 - registers itself (first: the listing order)
from unbackdoor.defenses import bcu  # noqa: F401 - registers itself
from unbackdoor.defenses import ft  # noqa: F401 - registers itself (a label-based baseline)
from unbackdoor.defenses import fine_pruning  # noqa: F401 - registers itself (label-based)
from unbackdoor.defenses import anp  # noqa: F401 - registers itself (label-based)
from unbackdoor.defenses import nad  # noqa: F401 - registers itself (a label-based baseline)
from unbackdoor.defenses import ft_sam  # noqa: F401 - registers itself (a label-based baseline)
from unbackdoor.defenses import spectral  # noqa: F401 - registers itself (a data-side detector)
from unbackdoor.defenses import activation_clustering  # noqa: F401 - registers itself (a data-side detector)
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
