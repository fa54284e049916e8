"""Backdoor attacks, one file each, behind one registry (``make_attack``)."""
from unbackdoor.attacks import badnets, blended, custom, label_consistent, sig, wanet  # noqa: F401 - they register themselves
from unbackdoor.attacks.base import MODES, Attack, attack_names, check_rate, load_attack, make_attack, register

__all__ = ["Attack", "make_attack", "load_attack", "attack_names", "register", "check_rate", "MODES"]
